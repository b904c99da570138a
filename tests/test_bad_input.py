"""Bad input to either program: one clear line on stderr, exit code 2, no traceback.

Covered elsewhere and not repeated here: a missing checkpoint, a directory that is not one, profile
errors and a model too large for the cluster (tests/test_cli_compile.py: test_plan_nonexistent_model,
test_plan_directory_that_is_not_a_checkpoint, test_plan_bad_profile, test_plan_missing_profile,
test_plan_cluster_too_small), damaged plans at the schema level (tests/test_plan.py) and a damaged
shard under `halo-compile verify` (test_verify_catches_a_flipped_byte).
"""
from __future__ import annotations

import inspect
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from halo_runtime.core.plan import PLAN_FILE
from halo_runtime.core.plandir import KEY_FILE
from test_cli_compile import FAST, assert_user_error, cli


@pytest.fixture
def profile(tmp_path):
    from conftest import cluster_yaml

    f = tmp_path / "cluster.yaml"
    f.write_text(cluster_yaml(4, lossy=1))
    return f


def halo_run(*args, timeout=60) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("HALO_KEY", None)
    env.pop("HALO_KEY_FILE", None)
    return subprocess.run([sys.executable, "-m", "halo_runtime.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env)


def assert_run_error(r: subprocess.CompletedProcess, *parts: str) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("halo-run: error: "), r.stderr
    for p in parts:
        assert p in lines[0], f"{p!r} not in {lines[0]!r}"
    return lines[0]


# ---- halo-compile ------------------------------------------------------------------------------

def test_compile_corrupted_checkpoint(tiny_llama_dir, tmp_path, profile):
    m = tmp_path / "m"
    shutil.copytree(tiny_llama_dir(), m)
    st = m / "model.safetensors"
    st.write_bytes(st.read_bytes()[:1000])
    assert_user_error(cli("plan", m, "--cluster", profile, "-o", tmp_path / "out", *FAST),
                      str(st), "unreadable safetensors file")
    assert not (tmp_path / "out").exists()


def test_compile_unsupported_architecture(tiny_llama_dir, tmp_path, profile):
    m = tmp_path / "m"
    shutil.copytree(tiny_llama_dir(), m)
    cfg = json.loads((m / "config.json").read_text())
    (m / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    assert_user_error(cli("plan", m, "--cluster", profile, "-o", tmp_path / "out", *FAST),
                      "unsupported architecture 'gpt2'")


def test_compile_over_a_damaged_key_file(tiny_vocab_dir, tmp_path, profile):
    out = tmp_path / "out"
    out.mkdir()
    (out / KEY_FILE).write_text("0123\n")
    assert_user_error(cli("plan", tiny_vocab_dir, "--cluster", profile, "-o", out, *FAST), KEY_FILE,
                      "not a HALO key")
    assert (out / KEY_FILE).read_text() == "0123\n"


# ---- halo-run: plan directory ------------------------------------------------------------------

def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_worker_corrupted_shard(plan_copy):
    shard = plan_copy / "shard-dev1.safetensors"
    _flip(shard, shard.stat().st_size - 10)
    assert_run_error(halo_run("worker", "--plan", plan_copy, "--device", "dev1", "--bind", "127.0.0.1:0"),
                     str(shard), "SHA-256 does not match manifest.json")


def test_worker_shard_from_another_device(plan_copy):
    shutil.copyfile(plan_copy / "shard-dev2.safetensors", plan_copy / "shard-dev1.safetensors")
    assert_run_error(halo_run("worker", "--plan", plan_copy, "--device", "dev1", "--bind", "127.0.0.1:0"),
                     "shard-dev1.safetensors", "SHA-256 does not match")


def test_worker_missing_shard(plan_copy):
    (plan_copy / "shard-dev3.safetensors").unlink()
    assert_run_error(halo_run("worker", "--plan", plan_copy, "--device", "dev3", "--bind", "127.0.0.1:0"),
                     "shard-dev3.safetensors", "missing")


def test_coordinator_corrupted_shard(plan_copy):
    shard = plan_copy / "shard-dev0.safetensors"
    _flip(shard, 200)
    assert_run_error(halo_run("generate", "--plan", plan_copy, "--prompt", "hi"), str(shard), "SHA-256")


def test_plan_from_another_schema_version(plan_copy):
    p = plan_copy / PLAN_FILE
    data = json.loads(p.read_text())
    p.write_text(json.dumps({**data, "schema_version": data["schema_version"] + 1}))
    for args in (("worker", "--device", "dev1"), ("generate", "--prompt", "hi")):
        assert_run_error(halo_run(*args, "--plan", plan_copy), "plan.json", "schema_version")


def test_no_plan_here(tmp_path):
    assert_run_error(halo_run("worker", "--plan", tmp_path, "--device", "dev1"), "no plan here")


# ---- halo-run: network -------------------------------------------------------------------------

def test_worker_port_in_use(plan_copy):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        assert_run_error(halo_run("worker", "--plan", plan_copy, "--device", "dev1", "--bind", f"127.0.0.1:{port}"),
                         f"cannot bind 127.0.0.1:{port}: address already in use")


def test_a_worker_on_any_port_tries_another_when_tcp_holds_the_one_udp_got(tiny_plan, tiny_shards, monkeypatch):
    """UDP and TCP share a worker's port; asked for any, the one UDP gets may be some TCP
    connection's local port (seen as a flaky "address already in use" in the test suite)."""
    import halo_runtime.net.worker as worker_module

    plan, _ = tiny_plan
    device = next(d for d in plan.device_names if d != plan.coordinator)
    real, asked = worker_module.UdpEndpoint, []
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        def udp_first_on_the_taken_port(host, p, **kw):
            asked.append(p)
            return real(host, port if len(asked) == 1 else p, **kw)

        monkeypatch.setattr(worker_module, "UdpEndpoint", udp_first_on_the_taken_port)
        worker = worker_module.Worker(plan, device, tiny_shards[device], "127.0.0.1", 0)
        try:
            assert asked == [0, 0] and worker.udp.address[1] == worker.tcp.address[1] != port
        finally:
            worker.close()
        with pytest.raises(worker_module.TransportError, match="address already in use"):
            worker_module.Worker(plan, device, tiny_shards[device], "127.0.0.1", port)  # a port asked for: no other


def test_run_with_no_threads(tmp_path):
    for args in (("worker", "--device", "dev1"), ("generate", "--prompt", "hi")):
        assert_run_error(halo_run(*args, "--plan", tmp_path, "--threads", "0"), "threads must be", "got 0")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_peer(plan_copy):
    """Strict: the TCP connection is refused at once. Relaxed: HELLO goes unanswered until the
    handshake timeout. Both end with one line naming the device; the relaxed run takes what the
    strict one takes (start-up, loading) plus about that timeout, never a hang (compared with the
    strict run, not an absolute bound: a busy machine slows both start-ups alike)."""
    from halo_runtime.net.exchange import UdpExchange

    seconds = {}
    for sync, message in (("strict", "cannot connect"), ("relaxed", "does not answer")):
        peers = [a for i in (1, 2, 3) for a in ("--peer", f"dev{i}=127.0.0.1:{_free_port()}")]
        t0 = time.monotonic()
        assert_run_error(halo_run("generate", "--plan", plan_copy, "--prompt", "hi", "--sync", sync, *peers),
                         "device dev1", message)
        seconds[sync] = time.monotonic() - t0
    from halo_runtime.core.policy import DeliveryPolicy

    default = inspect.signature(UdpExchange.begin).parameters["timeout_s"].default
    handshake_s = DeliveryPolicy().dead_after_s if default is None else default  # None: the policy's
    assert seconds["relaxed"] > handshake_s, seconds
    assert seconds["relaxed"] < 2 * (seconds["strict"] + handshake_s), seconds


def test_bad_peer_address(plan_copy):
    assert_run_error(halo_run("generate", "--plan", plan_copy, "--prompt", "hi", "--peer", "dev1=nowhere"),
                     "--peer dev1", "not HOST:PORT")
