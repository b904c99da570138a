"""Every remote device of a plan as a `halo-run worker` process on loopback, for `halo-run local`
and `halo-run serve --local` (a one-machine try; the in-process shim emulates loss and delay).

Example:
    >>> from types import SimpleNamespace
    >>> from halo_runtime.core.plan import Device
    >>> plan = SimpleNamespace(devices=[Device("a", "127.0.0.1:1", 1, 1), Device("b", "127.0.0.1:2", 1, 1, loss=0.05)])
    >>> local_loss(SimpleNamespace(plr=0.1), plan), local_loss(SimpleNamespace(plr=None), plan)
    ({'a': 0.0, 'b': 0.1}, {'a': 0.0, 'b': 0.05})
"""
from __future__ import annotations

import json
import os
import subprocess
import sys


def local_auth(args):
    """The plan's key (or --key-file, $HALO_KEY...), else a fresh one for this run: `local` starts
    every process itself, so a plan compiled before keys existed still runs."""
    from .core.plandir import KeyFileError, new_key, resolve_key
    from .net.auth import Authenticator

    try:
        return Authenticator(resolve_key(args.key_file, args.plan)[0])
    except KeyFileError:
        if args.key_file or os.environ.get("HALO_KEY_FILE") or os.environ.get("HALO_KEY"):
            raise
        return Authenticator(new_key())


def local_loss(args, plan) -> dict[str, float]:
    """Emulated loss per device: --plr on the plan's lossy links, else the plan's own rates."""
    if args.plr is not None and not 0 <= args.plr < 1:
        raise ValueError(f"--plr {args.plr}: must be in [0, 1)")
    return {d.name: (args.plr if args.plr is not None and d.loss > 0 else d.loss) for d in plan.devices}


def start_local_workers(args, plan, loss: dict[str, float], auth, workers: dict,
                        kernels: dict | None = None) -> dict[str, tuple[str, int]]:
    """Start every remote device of `plan` as a `halo-run worker` on loopback, adding each process to
    `workers` as it starts (so the caller's `stop_workers` ends them all, even after a failure);
    returns their addresses. `kernels`, if given, receives each worker's kernel choice per format."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HALO_KEY": auth.key.hex()}
    env.pop("HALO_KEY_FILE", None)  # the workers take exactly the coordinator's key
    peers = {}
    for i, d in enumerate(plan.device_names):
        if d == plan.coordinator:
            continue
        cmd = [sys.executable, "-m", "halo_runtime.cli", "worker", "--plan", args.plan, "--device", d,
               "--bind", "127.0.0.1:0", "--announce", "--shim-loss", str(loss[d]),
               "--shim-delay-ms", str(args.delay_ms), "--shim-jitter-ms", str(args.jitter_ms),
               "--shim-seed", str(args.seed * 1000 + i)]
        workers[d] = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env, text=True)
    for d, proc in workers.items():
        line = proc.stdout.readline()
        if not line:
            raise ChildProcessError(f"worker {d} did not start (exit code {proc.wait()})")
        info = json.loads(line)
        peers[d] = (info["host"], info["port"])
        if kernels is not None:
            kernels[d] = info.get("kernels", {})
    return peers


def stop_workers(workers: dict) -> None:
    for proc in workers.values():
        proc.terminate()
    for proc in workers.values():
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def local_shims(args, loss: dict[str, float], peers: dict, seed: int) -> dict:
    """Device -> the in-process shim emulating its link (--plr loss, --delay-ms/--jitter-ms), for
    the devices whose link loses or delays anything; seeded from `seed`."""
    from .net.shim import LossShim

    return {d: LossShim(loss[d], args.delay_ms, args.jitter_ms, seed=seed + i)
            for i, d in enumerate(peers) if loss[d] > 0 or args.delay_ms > 0}


def make_exchange(sync: str, plan, peers: dict, policy, shims: dict, auth, bind_host: str = "127.0.0.1",
                  rounds: str = "star"):
    """The coordinator's exchange (generate, local, serve) for `sync`: TCP (strict) or UDP (relaxed), through `shims`; for
    push rounds, a `net.pushtcp.TcpPush` or `net.push.UdpPush`."""
    from .net.exchange import UdpExchange
    from .net.push import UdpPush
    from .net.pushtcp import TcpPush
    from .net.shim import PeerShims
    from .net.tcpexchange import TcpExchange

    if sync == "strict":
        return (TcpPush if rounds == "push" else TcpExchange)(plan, peers, policy, shims, auth=auth)
    shim = PeerShims({peers[d]: s for d, s in shims.items()}) if shims else None
    if rounds == "push":
        return UdpPush(plan, peers, policy, bind_host=bind_host, shim=shim, auth=auth)
    return UdpExchange(plan, peers, policy, bind_host=bind_host, shim=shim, auth=auth)

