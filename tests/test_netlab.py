"""The lossy-network lab (benchmarks/netlab.py) and a generation inside it.

Needs root (CI runs as root) or a shell inside `unshare -rnm`, plus ip, nft, iptables, ethtool and
tc (`make lab-setup`); skipped with the reason otherwise. Delay tests also need PyPI
NetfilterQueue. Every lab gets a unique namespace prefix and is closed by a finalizer; each test
then checks that none of its namespaces or processes is left. Timings are asserted by the
benchmark (benchmarks/plr_sweep.py), not here; only physical lower bounds are checked.
"""
from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import pytest

from benchmarks import netlab
from benchmarks.netlab import Lab, LinkSpec, PortSpec
from benchmarks.netprobe import datagram_test, rtt_test

ROOT = Path(__file__).resolve().parents[1]

INFO = netlab.check()
needs_lab = pytest.mark.skipif(not INFO["ok"], reason=f"network lab unavailable: {INFO['reason']}")
needs_queue = pytest.mark.skipif(not INFO.get("netfilterqueue"),
                                 reason="PyPI NetfilterQueue not importable (apt-get install libnetfilter-queue-dev "
                                        "gcc; pip install NetfilterQueue): delay emulation unavailable")


@pytest.fixture
def make_lab(request):
    """make_lab(devices, **Lab kwargs) -> a started Lab with a unique prefix, closed and checked at teardown."""
    made = []

    def make(devices, **kw):
        lab = Lab(devices, prefix=f"hlt{uuid.uuid4().hex[:8]}", **kw)
        made.append(lab)
        return lab.start()

    def finish():
        for lab in made:
            lab.close()
        left = set(netlab.list_netns())
        for lab in made:
            assert not left & set(lab.namespaces()), "namespaces left behind"
            assert all(p.popen.poll() is not None for p in lab.procs), "processes left behind"
            assert lab.delayd is None or lab.delayd.poll() is not None, "delay process left behind"

    request.addfinalizer(finish)
    return make


@needs_lab
def test_loss_matches_setting_and_clean_link_stays_clean(make_lab):
    lab = make_lab(["a", "b", "c"], links={("a", "b"): LinkSpec(loss=0.05)})
    lossy = datagram_test(lab, "a", "b", 10000)
    assert lossy["sent"] == 10000
    assert abs(lossy["observed_loss"] - 0.05) <= 0.01, lossy
    assert abs((1 - lossy["received_share"]) - 0.05) <= 0.01, lossy
    assert lossy["received"] == lossy["sent"] - lossy["dropped"], "only the emulator may lose datagrams"
    clean = datagram_test(lab, "a", "c", 10000, port=9001)
    assert clean["received"] == 10000 and clean["dropped"] == 0, clean
    back = datagram_test(lab, "b", "a", 2000, port=9002)  # links are directed: b -> a is clean
    assert back["received"] == 2000 and back["dropped"] == 0, back


@needs_lab
def test_ports_offloads_and_tcp_congestion_control(make_lab):
    lab = make_lab(["a", "b"], ports={"a": PortSpec(up_mbit=50, down_mbit=20)})
    up = lab.run("a", ["tc", "qdisc", "show", "dev", "eth0"]).stdout
    down = subprocess.run(["ip", "netns", "exec", lab.switch_ns, "tc", "qdisc", "show", "dev", "p0"],
                          capture_output=True, text=True, check=True).stdout
    assert "tbf" in up and "50Mbit" in up, up
    assert "tbf" in down and "20Mbit" in down, down
    assert "tbf" not in lab.run("b", ["tc", "qdisc", "show", "dev", "eth0"]).stdout
    features = lab.run("a", ["ethtool", "-k", "eth0"]).stdout
    for name in ("tcp-segmentation-offload", "generic-segmentation-offload", "generic-receive-offload"):
        assert f"{name}: off" in features, features
    cc = lab.run("a", ["sysctl", "-n", "net.ipv4.tcp_congestion_control"]).stdout.strip()
    assert cc == lab.tcp_cc and cc in ("cubic", "reno"), (cc, lab.tcp_cc)  # loss-based, never bbr
    assert lab.addr("a").startswith("10.77.0.") and lab.dev_of(lab.addr("b")) == "b"


@needs_lab
def test_set_link_changes_loss_at_run_time(make_lab):
    lab = make_lab(["a", "b"])
    lab.set_link("a", "b", LinkSpec(loss=0.2))
    r = datagram_test(lab, "a", "b", 5000)
    assert abs(r["observed_loss"] - 0.2) <= 0.02, r
    lab.set_link("a", "b", LinkSpec())
    r = datagram_test(lab, "a", "b", 2000)
    assert r["received"] == 2000 and r["dropped"] == 0, r


@needs_lab
@needs_queue
def test_delay_and_burst_loss(make_lab):
    lab = make_lab(["a", "b", "c"], links={("a", "b"): LinkSpec(delay_ms=2.0), ("b", "a"): LinkSpec(delay_ms=2.0),
                                           ("a", "c"): LinkSpec.burst(0.05, 4.0)})
    rtt = rtt_test(lab, "a", "b", 100)
    assert rtt["answered"] == 100
    assert rtt["p10"] >= 3.9, rtt  # two 2 ms hops: no round trip can be shorter (a lower bound, not a timing)
    assert lab.counters()[("a", "b")]["delayed"] >= 100
    burst = datagram_test(lab, "a", "c", 10000, port=9001)
    assert abs(burst["observed_loss"] - 0.05) <= 0.02, burst
    assert burst["dropped_burst"] == burst["dropped"] and burst["received"] == 10000 - burst["dropped"]
    assert burst["mean_loss_burst"] > 2.0, burst  # independent 5% loss gives ~1.05


@needs_lab
def test_stale_lab_of_the_same_prefix_is_removed():
    prefix = f"hlt{uuid.uuid4().hex[:8]}"
    dead = subprocess.Popen(["true"])
    dead.wait()  # its pid names a creator that is gone
    stale = f"{prefix}-{dead.pid}-0-sw"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    lab = Lab(["a"], prefix=prefix)
    try:
        lab.start()
        assert stale in lab.removed_stale
        assert stale not in netlab.list_netns()
    finally:
        lab.close()
        if stale in netlab.list_netns():
            netlab.delete_netns(stale)
    assert not set(lab.namespaces()) & set(netlab.list_netns())


@needs_lab
def test_generation_in_the_lab_at_5pct_loss(tiny_plan):
    """4 devices, one of them behind a 5% lossy link: relaxed and strict generate every token, the
    gloo baseline with the same partition agrees with strict at 0% loss, and nothing is left."""
    from benchmarks.labbench import Bench

    plan, plan_dir = tiny_plan
    delay = 1.0 if INFO.get("netfilterqueue") else 0.0
    bench = Bench(plan_dir, delay, delay / 4, prefix=f"hlt{uuid.uuid4().hex[:8]}", verbose=False,
                  extra_generate=["--wire", "fp32"])
    with bench:
        assert bench.lossy, "the tiny plan has a lossy device"
        bench.set_conditions(0.0, delay, delay / 4)
        strict0 = bench.run("strict", "The capital of France is", 8, timeout_s=300)
        gloo0 = bench.run_gloo("The capital of France is", 8, timeout_s=300, extra=["--wire", "fp32"])
        draft0 = bench.run("draft", "The capital of France is", 8, timeout_s=300)  # relaxed + lookup drafts
        assert gloo0["tokens"] == strict0["tokens"] == draft0["tokens"]
        bench.set_conditions(0.05, delay, delay / 4)
        relaxed = bench.run("relaxed", "The capital of France is", 16, timeout_s=300)
        strict = bench.run("strict", "The capital of France is", 16, timeout_s=300)
        names = bench.lab.namespaces()
        assert set(names) <= set(netlab.list_netns())
    for r in (relaxed, strict):
        assert len(r["tokens"]) == 16 and all(isinstance(t, int) for t in r["tokens"])
        assert r["frames_on_lossy_links"] > 0
    assert 0 <= relaxed["compensated_share"] <= 1
    assert not set(names) & set(netlab.list_netns()), "namespaces left behind"
    assert all(p.popen.poll() is not None for p in bench.lab.procs), "processes left behind"
