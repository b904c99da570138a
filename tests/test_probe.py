"""`halo-run probe`: loss and burst statistics on hand-made arrivals, the probe link over loopback
(with the runtime's loss shim), the entry as the compiler's profile parser reads it, and the
command's one-line errors. Loopback only; every socket and process is closed by the test that
opened it."""
from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from halo_runtime import cli
from halo_runtime.core.plan import Device
from halo_runtime.core.plandir import new_key
from halo_runtime.net.auth import Authenticator
from halo_runtime.net.probeclient import LinkOptions, ProbeClient
from halo_runtime.net.probelink import MAGIC, Kind, ProbeError, decode, encode
from halo_runtime.net.proberesponder import Responder
from halo_runtime.net.shim import LossShim
from halo_runtime.probe import (ComputeProbe, Entry, FormatSpeed, LinkReport, StorageSpeed, burst_verdict,
                                loss_statistics, measure_format, measure_storage, parse_power, rtt_statistics,
                                speed_of)

ROOT = Path(__file__).resolve().parents[1]
FAST_LINK = LinkOptions(pings=40, train=3000, rate=30000, bulk_kb=200, timeout_s=2.0)
FAST_COMPUTE = ["--shape", "64x64", "--working-set-mb", "0.5", "--reps", "20", "--duration", "0"]


def _gilbert(n: int, loss: float, burst: float, seed: int) -> list[bool]:
    """Arrivals through a Gilbert channel (everything lost in the bad state) of rate `loss`, bursts `burst`."""
    p, r = loss / (burst * (1 - loss)), 1 / burst
    rng = np.random.default_rng(seed)
    bad, out = rng.random() < loss, []
    for u in rng.random(n):
        bad = u < (1 - r if bad else p)
        out.append(not bad)
    return out


# ---- statistics on hand-made arrivals --------------------------------------------------------------

@pytest.mark.parametrize("arrivals, lost, bursts, mean, written", [
    ([True] * 1000, 0, 0, 0.0, 0.0),                                    # no loss
    (([True] * 19 + [False]) * 200, 200, 200, 1.0, 0.0),                # spread out: independent-looking
    (([True] * 57 + [False] * 3) * 100, 300, 100, 3.0, 3.0),            # bursts of 3
    ([False] * 2 + [True] * 98, 2, 1, 2.0, 2.0),                        # a burst at the start counts
    ([True] * 98 + [False] * 2, 2, 1, 2.0, 2.0),                        # and one cut off at the end
])
def test_loss_statistics_on_hand_made_sequences(arrivals, lost, bursts, mean, written):
    s = loss_statistics(arrivals)
    assert (s.lost, s.bursts, s.mean_burst) == (lost, bursts, mean)
    assert s.loss == lost / len(arrivals)
    assert burst_verdict([s]).written == written


def test_gilbert_transitions_are_counted_from_the_sequence():
    s = loss_statistics([True, True, False, False, True, False, True, True])
    # arrivals with a successor: 4, of which 2 are followed by a loss; losses: 3, of which 2 by an arrival
    assert (s.p_good_bad, s.p_bad_good) == (2 / 4, 2 / 3)


@pytest.mark.parametrize("loss, burst, seed", [(0.05, 1 / 0.95, 1), (0.2, 1 / 0.8, 2), (0.05, 3.0, 3), (0.1, 5.0, 4)])
def test_random_channels_are_recognised(loss, burst, seed):
    """Independent loss is recognised (z < 3) and written as 0 under BURST_FLOOR, else as its mean,
    ~1 / (1 - loss), which the planner's Gilbert channel reads as independent loss again; a bursty
    channel's mean is measured."""
    s = loss_statistics(_gilbert(40000, loss, burst, seed))
    assert abs(s.loss - loss) < 0.25 * loss
    verdict = burst_verdict([s])
    if burst < 1.3:
        assert verdict.z < 3, verdict
        assert verdict.written == 0.0 if burst < 1.2 else abs(verdict.written - burst) < 0.05, verdict
    else:
        assert abs(verdict.written - burst) < 0.15 * burst and abs(1 / s.p_bad_good - burst) < 0.15 * burst
        assert verdict.z > 3


def test_two_directions_combine_their_runs():
    up = loss_statistics(([True] * 57 + [False] * 3) * 50)     # 50 bursts of 3
    down = loss_statistics(([True] * 59 + [False]) * 50)       # 50 single losses
    assert burst_verdict([up, down]).mean == 2.0


@pytest.mark.parametrize("loss", [0.01, 0.3, 0.55, 0.7, 0.9])
def test_what_is_written_is_a_burst_the_planner_accepts(loss):
    for seed, burst in enumerate((1.0 / (1 - loss), 2.0, 6.0)):
        if loss / (1 - loss) > burst:
            continue
        up = loss_statistics(_gilbert(3000, loss, burst, seed))
        down = loss_statistics(_gilbert(3000, min(0.95, loss * 1.3), burst, seed + 100))
        verdict = burst_verdict([up, down])
        Device("d", "h:1", 1, 1.0, loss=round((up.loss + down.loss) / 2, 4), burst=round(verdict.written, 2))


def test_rtt_statistics_and_bad_input():
    r = rtt_statistics([1.0, None, 3.0, 2.0])
    assert (r.sent, r.answered, r.mean_ms, r.p50_ms) == (4, 3, 2.0, 2.0)
    with pytest.raises(ValueError, match="no ping"):
        rtt_statistics([None, None])
    with pytest.raises(ValueError):
        loss_statistics([])
    assert parse_power("2.7,7.1") == (2.7, 7.1)
    for bad in ("7.1,2.7", "-1,2", "3", "a,b", "nan,1"):
        with pytest.raises(ValueError, match="--power-w"):
            parse_power(bad)


def test_speeds_report_first_sustained_and_spread():
    s = speed_of("fp32", [1.0] + [3.0] * 9 + [2.0] * 10, matrices=4)
    assert (s.first_gflops, s.sustained_gflops, s.reps) == (1.0, 2.0, 20)
    assert s.p10_gflops <= s.sustained_gflops <= s.p90_gflops


def test_compute_and_storage_measure_something(tmp_path):
    s = measure_format("q4_0", ComputeProbe(shape=(64, 64), working_set_mb=0.2, duration_s=0), threads=1)
    assert s.reps == 20 and s.sustained_gflops > 0 and s.matrices >= 2
    st = measure_storage(str(tmp_path), megabytes=4)
    assert st.mbps > 0 and st.megabytes == 4 and not list(tmp_path.iterdir())  # the file is gone
    with pytest.raises(ValueError, match="multiple of 32"):
        ComputeProbe(shape=(64, 50))
    with pytest.raises(ValueError, match="at least 20"):
        ComputeProbe(reps=5)


# ---- the link over loopback ----------------------------------------------------------------------

@pytest.fixture
def responder_of():
    made = []

    def make(key: bytes, loss: float = 0.0, seed: int = 0) -> Responder:
        shim = LossShim(loss, seed=seed) if loss else None
        r = Responder(("127.0.0.1", 0), Authenticator(key), shim)
        r.start()
        made.append((r, shim))
        return r

    yield make
    for r, shim in made:
        r.close()
        if shim:
            shim.close()


def test_loss_is_measured_per_direction_through_the_shim(responder_of):
    key = new_key()
    responder = responder_of(key, loss=0.04, seed=1)  # the responder's sends: downstream loss
    with LossShim(0.10, seed=2) as shim, ProbeClient(responder.address, Authenticator(key), shim=shim) as c:
        raw = c.measure(FAST_LINK)
    link = LinkReport(raw)
    assert abs(link.up.loss - 0.10) < 0.02 and abs(link.down.loss - 0.04) < 0.015, (link.up, link.down)
    assert link.bursts.written == 0.0, link.bursts        # the shim drops independently
    assert abs(link.loss - 0.07) < 0.015
    assert 20 <= link.rtt.answered < 40                    # a ping fails when either way loses it
    assert link.latency_ms < 5 and link.bandwidth_mbps > 1
    assert raw.forged == 0 and responder.counters.forged == 0


def test_a_forged_datagram_is_dropped_and_counted(responder_of):
    responder = responder_of(new_key())
    with ProbeClient(responder.address, Authenticator(new_key()), timeout_s=0.6) as c:
        with pytest.raises(ProbeError, match=r"no answer from 127\.0\.0\.1:\d+ within 0\.6 s .*same key"):
            c.hello()
    assert responder.counters.forged >= 2 and responder.counters.answered == 0
    # a tampered datagram under the right key is dropped too, and so is a replay of a good one
    key = new_key()
    r2 = responder_of(key)
    good = encode(Authenticator(key), Kind.PING, 7, b"\0\0\0\1")
    assert good[:4] == MAGIC and decode(Authenticator(key), good)[0] == Kind.PING
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(1)
        s.sendto(good[:-1] + bytes([good[-1] ^ 1]), r2.address)
        s.sendto(good, r2.address)
        assert decode(Authenticator(key), s.recv(2048))[0] == Kind.PONG
        s.sendto(good, r2.address)
        s.sendto(b"junk", r2.address)
        time.sleep(0.3)
    c = r2.counters
    assert (c.forged, c.replayed, c.malformed, c.answered) == (1, 1, 1, 1)


# ---- the entry, as the compiler reads it ------------------------------------------------------------

def _entry(link=None, storage=None, power=(2.7, 7.1), name="pi5-2") -> Entry:
    speeds = tuple(FormatSpeed(f, g * 1.05, g, g * 0.95, g * 1.04, 20, 8)
                   for f, g in (("fp32", 2.0), ("bf16", 2.6), ("q8_0", 5.1), ("q4_0", 7.9)))
    return Entry(name=name, address="10.77.0.3:7700", memory_mb=6144, compute=speeds, probe=ComputeProbe(),
                 link=link, storage=storage, power_w=power, host="raspberrypi", when="2026-12-06T02:30:00Z",
                 version="0.1.0")


def test_the_entry_is_a_profile_the_compiler_accepts(responder_of):
    """The final format (compute_gflops_by_format, power_w): halo_compile.cluster.parse_profile reads
    the entry as is, each device field equal to the measurement."""
    from halo_compile.cluster import parse_profile

    key = new_key()
    responder = responder_of(key)
    with ProbeClient(responder.address, Authenticator(key)) as c:
        link = LinkReport(c.measure(FAST_LINK))
    entry = _entry(link)
    text = entry.yaml()
    assert text.startswith("# halo-run probe on pi5-2 (hostname raspberrypi), 2026-12-06T02:30:00Z, halo 0.1.0\n")
    assert "    compute_gflops_by_format: {fp32: 2.0, bf16: 2.6, q8_0: 5.1, q4_0: 7.9}\n" in text
    assert '    address: "10.77.0.3:7700"\n' in text and "    power_w: [2.7, 7.1]\n" in text
    profile = parse_profile(text, "pi5-2.yaml")
    assert profile.coordinator == "pi5-2" and len(profile.devices) == 1
    d = profile.devices[0]
    assert (d.name, d.address, d.memory_bytes, d.compute_gflops) == ("pi5-2", "10.77.0.3:7700", 6144 << 20, 2.0)
    assert d.latency_ms == round(link.latency_ms, 3) and d.loss == 0.0 and d.burst == 0.0
    assert d.bandwidth_mbps == pytest.approx(link.bandwidth_mbps, rel=0.01)
    assert tuple(d.power_w) == (2.7, 7.1)
    assert parse_profile(text, "pi5-2.yaml", weights="q4_0").devices[0].compute_gflops == 7.9


def test_entry_with_storage_and_a_lossy_link_reads_back(responder_of):
    """A measured storage_mbps (on the entry's own coordinator, which the parser accepts as a
    measurement); loss and bursts that pass the planner's Gilbert check; a name YAML would misread."""
    import yaml
    from halo_compile.cluster import parse_profile

    key = new_key()
    responder = responder_of(key, loss=0.05, seed=3)
    with LossShim(0.05, seed=4) as shim, ProbeClient(responder.address, Authenticator(key), shim=shim) as c:
        link = LinkReport(c.measure(FAST_LINK))
    text = _entry(link, StorageSpeed(91.3, 256, "/srv", True), power=None, name="yes").yaml()
    raw = yaml.safe_load(text)
    assert raw["name"] == "yes" and raw["devices"][0]["name"] == "yes"  # quoted: YAML 1.1 reads yes as True
    dev = raw["devices"][0]
    assert dev["storage_mbps"] == 91.3 and 0.03 < dev["loss"] < 0.07 and "power_w" not in dev
    d = parse_profile(text, "e.yaml").devices[0]
    assert d.name == "yes" and d.loss == dev["loss"] and d.burst == dev["burst"]
    coordinator_entry = _entry(None, None, None).yaml()  # no --peer: no link keys, the defaults apply
    assert "latency_ms" not in coordinator_entry and "link: not measured" in coordinator_entry
    parse_profile(coordinator_entry, "c.yaml")


# ---- the command -------------------------------------------------------------------------------------

def _run(argv, capsys, monkeypatch, env: dict | None = None) -> tuple[int, str, str]:
    for k in ("HALO_KEY", "HALO_KEY_FILE"):
        monkeypatch.delenv(k, raising=False)
    for k, v in (env or {}).items():
        monkeypatch.setenv(k, v)
    try:
        cli.main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, "\n".join(line for line in err.splitlines() if "warning:" not in line)


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("argv, message", [
    (["--power-w", "7,2"], "halo-run: error: --power-w '7,2': need 0 <= IDLE <= BUSY watts"),
    (["--power-w", "x"], "halo-run: error: --power-w 'x': expected IDLE,BUSY in watts, e.g. 2.7,7.1"),
    (["--peer", "127.0.0.1:9"], "halo-run: error: no deployment key: neither --key-file nor $HALO_KEY_FILE nor "
                                "$HALO_KEY is set"),
    (["--serve", ":0"], "halo-run: error: no deployment key"),
    (["--name", "pi 5"], "halo-run: error: --name 'pi 5': letters, digits, - and _ only"),
    (["--shape", "64x50"], "halo-run: error: --shape 64x50: need rows >= 1 and cols a multiple of 32"),
    (["--reps", "3"], "halo-run: error: --reps must be at least 20"),
    (["--formats", "fp32,int3"], "halo-run: error: "),
    (["--peer", "127.0.0.1:9", "--serve", ":0"], "halo-run: error: --serve answers probes, --peer sends them"),
])
def test_bad_options_give_one_error_line(argv, message, capsys, monkeypatch):
    code, out, err = _run(["probe", *argv], capsys, monkeypatch)
    assert code == 2 and out == "" and len(err.splitlines()) == 1 and err.startswith(message), err


def test_a_silent_peer_gives_one_error_line(capsys, monkeypatch):
    port = _free_udp_port()
    started = time.monotonic()
    code, out, err = _run(["probe", "--peer", f"127.0.0.1:{port}", "--timeout", "0.5"], capsys, monkeypatch,
                          {"HALO_KEY": new_key().hex()})
    assert code == 2 and out == ""
    assert err == (f"halo-run: error: no answer from 127.0.0.1:{port} within 0.5 s (is `halo-run probe --serve` "
                   "running there, with the same key?)")
    assert time.monotonic() - started < 3


def test_probe_command_end_to_end(tmp_path, capsys, monkeypatch):
    """`probe --serve` in its own process (lossy sends), `probe --peer` writing the entry and the JSON."""
    import json

    from halo_compile.cluster import load_profile

    key_file = tmp_path / "halo.key"
    key_file.write_text(new_key().hex() + "\n")
    port = _free_udp_port()
    server = subprocess.Popen([sys.executable, "-m", "halo_runtime.cli", "probe", "--serve", f"127.0.0.1:{port}",
                               "--serve-for", "30", "--key-file", str(key_file), "--shim-loss", "0.05"],
                              stderr=subprocess.PIPE, text=True, cwd=ROOT,
                              env={k: v for k, v in os.environ.items() if not k.startswith("HALO_KEY")})
    try:
        assert "answering link probes" in server.stderr.readline()
        out_file = tmp_path / "entry.yaml"
        code, out, err = _run(["probe", "--peer", f"127.0.0.1:{port}", "--name", "board-1", "--key-file", str(key_file),
                               "--power-w", "2.5,6", "--pings", "30", "--train", "2000", "--rate", "20000",
                               "--bulk-kb", "100", "--storage", str(tmp_path), "--storage-mb", "2",
                               "-o", str(out_file), "--json", *FAST_COMPUTE], capsys, monkeypatch)
    finally:
        server.terminate()
        _, server_err = server.communicate(timeout=10)
    assert code == 0, err
    assert "stopped:" in server_err
    report = json.loads(out)
    assert set(report["compute"]) == {"fp32", "bf16", "q8_0", "q4_0"}
    assert 0.0 < report["link"]["down"]["loss"] < 0.12 and report["link"]["up"]["loss"] == 0.0
    assert report["link"]["rtt_ms"]["answered"] >= 20
    assert report["entry"]["memory_mb"] > 0 and report["entry"]["power_w"] == [2.5, 6.0]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(("entry.yaml.tmp", ".halo-probe"))]
    d = load_profile(out_file).devices[0]
    assert d.name == "board-1" and d.address.endswith(":7700") and math.isclose(d.loss, report["entry"]["loss"])
    assert report["entry"]["storage_mbps"] > 0 and "storage_mbps:" in out_file.read_text()
