"""Copies per link (`halo_compile.placecost.link_copies`): the compiler picks how many copies of a
one-datagram message go to and from each lossy board, records them in the plan
(`DeviceReport.copies`), and the plan's loader checks them. Placement itself prices each link at
one copy, so a plan's groups go where they went before.
"""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
from halo_runtime.core.exchange import InProcessExchange
from halo_runtime.core.plan import Device, DeviceReport, Plan, PlanError
from halo_runtime.core.policy import MAX_COPIES, DeliveryPolicy

from halo_compile.placecost import PlaceOptions, link_copies

WIFI = Device("w", "10.0.0.2:7700", 10**9, 2.0, latency_ms=0.5, bandwidth_mbps=200, loss=0.05)


@pytest.mark.parametrize("link, copies", [
    ({"loss": 0.0}, 1),                              # clean: nothing to save
    ({"loss": 0.001}, 1),                            # 0.2% of a 5 ms RTO is less than a copy's CPU
    ({}, 2),                                         # 5% on 200 Mbit/s: q1 9.8% -> 0.5%
    ({"loss": 0.01, "bandwidth_mbps": 1000}, 2),
    ({"loss": 0.3, "bandwidth_mbps": 1000}, MAX_COPIES),
    ({"bandwidth_mbps": 1}, 1),                      # a copy takes 9 ms of a 1 Mbit/s link
    ({"burst": 4.0}, 1),                             # bursts of 4 take both copies: q1 6.3% -> 5.4%
    ({"burst": 1.2}, 2),                             # short bursts: 9.2% -> 1.6%
])
def test_link_copies_weighs_link_time_against_retransmission_waits(link, copies):
    assert link_copies(replace(WIFI, **link), PlaceOptions()) == copies


def test_link_copies_grow_with_loss_and_with_the_wait_a_loss_costs():
    losses = [0.0, 0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4]
    picked = [link_copies(replace(WIFI, loss=p), PlaceOptions()) for p in losses]
    assert picked == sorted(picked) and picked[0] == 1 and picked[-1] > 2
    by_rto = [link_copies(replace(WIFI, loss=0.005), PlaceOptions(rto_ms=r)) for r in (1.0, 5.0, 50.0)]
    assert by_rto == sorted(by_rto) and by_rto[0] < by_rto[-1]


def test_link_copies_is_what_the_runtime_prices():
    """What the plan records is the `planned` the runtime's delivery model takes: 2 copies each way
    of a one-datagram decode message, and a relaxed part missed about (2 x 0.05^2)^2 of the time."""
    q = DeliveryPolicy().miss_probability(0.05, planned=link_copies(WIFI, PlaceOptions()))
    assert DeliveryPolicy().copies(0.05, 1, 2) == 2 and DeliveryPolicy(redundancy=1).copies(0.05, 1, 2) == 1
    assert q == pytest.approx((1 - (1 - 0.05 ** 2) ** 2) ** 2)


def test_the_compiled_plan_records_copies_on_its_lossy_link_only(tiny_plan):
    plan, _ = tiny_plan
    for d in plan.devices:
        want = 1 if d.loss == 0 or d.name == plan.coordinator else 2
        assert plan.link_copies(d.name) == want, d.name


@pytest.mark.parametrize("copies", [0, MAX_COPIES + 1])
def test_a_plan_with_copies_out_of_range_is_refused_naming_the_device(tiny_plan, copies, tmp_path):
    plan, _ = tiny_plan
    data = json.loads(plan.to_json())
    data["device_reports"][-1]["copies"] = copies
    with pytest.raises(PlanError, match=f"{data['device_reports'][-1]['name']}: copies must be in 1..{MAX_COPIES}"):
        Plan.from_json(json.dumps(data), "plan.json")
    with pytest.raises(ValueError, match="copies"):
        DeviceReport("x", 0, 0, 0, 0.0, 0.0, copies=copies)


@pytest.mark.parametrize("redundancy", [0, -1, MAX_COPIES + 1])
def test_a_redundancy_out_of_range_is_refused(redundancy):
    with pytest.raises(ValueError, match=f"redundancy and multi_datagram_copies in 1..{MAX_COPIES}"):
        DeliveryPolicy(redundancy=redundancy)
    assert DeliveryPolicy(redundancy=None).copies(0.05, 1, 3) == 3  # None: the plan's choice


def test_eval_simulates_the_plan_copies_on_a_bursty_link_too(tiny_plan, tiny_shards):
    plan, _ = tiny_plan
    lossy = next(d.name for d in plan.devices if d.loss > 0)
    for policy, copies in ((DeliveryPolicy(), plan.link_copies(lossy)), (DeliveryPolicy(redundancy=1), 1)):
        ex = InProcessExchange(plan, tiny_shards, bursty={lossy: (0.05, 1.2)}, policy=policy)
        # per attempt: the request's copies, then the reply's, each (copies, datagrams per copy)
        assert [c for c, _ in ex.bursty[lossy].layout] == [copies] * len(ex.bursty[lossy].layout)
