"""What the network exchanges share: the request kind of each round, which remote devices answer
which round with which parts, how long a replaced device may take to return, the UDP session
handshake, and how a warning is printed. `exchange.UdpExchange` (relaxed), `tcpexchange.TcpExchange`
(strict) and `push.UdpPush` import it.

Example:
    >>> from halo_runtime.core.plan import load_plan
    >>> from halo_runtime.net.rounds import _layout
    >>> plan = load_plan("artifacts/smollm2-135m-pi5")
    >>> [len(_layout(plan)[k]) for k in ("attn", "crit", "relaxed")]     # one list per layer
    [30, 30, 30]
"""
from __future__ import annotations

import sys
import time

from ..core.plan import Plan
from .wire import Kind, Message, make_flags

RETURN_GRACE_S = 0.2
"""How long a new session waits for a device replaced by its failover: if it answers, it is back."""
PHASE_REQUEST = {"attn": Kind.REQUEST_ATTN, "mlp": Kind.REQUEST_MLP}


def holders(plan: Plan) -> dict[str, list[list[str]]]:
    """Per layer, the devices (the coordinator first, then plan order) holding attention heads,
    critical MLP groups (the coordinator: any), relaxed MLP groups (remote devices)."""
    order = [plan.coordinator] + [d for d in plan.device_names if d != plan.coordinator]
    out = {"attn": [], "crit": [], "relaxed": []}
    for layer in range(plan.model.num_layers):
        on = {d: plan.groups_on(d, layer) for d in order}
        out["attn"].append([d for d in order if any(g.kind == "attn" for g in on[d])])
        # the coordinator's MLP groups are one part (one product, `DeviceCompute.mlp`), awaited
        out["crit"].append([d for d in order if any(g.kind == "mlp" and (g.critical or d == plan.coordinator)
                                                    for g in on[d])])
        out["relaxed"].append([d for d in order[1:] if any(g.kind == "mlp" and not g.critical for g in on[d])])
    return out


def hello_until_echoed(endpoint, plan: Plan, session: int, body: bytes, peers: dict, timeout_s: float,
                       restarted: set[str] | None = None) -> set[str]:
    """The coordinator's HELLO of `session` (payload `body`) to every device of `peers` (name ->
    address) over UDP, sent again with a growing pause until each echoes it or `timeout_s` passes;
    the names that did not answer. With `restarted`, a RESET (a device that does not hold the
    session: restarted since) answers too, and its name is added there."""
    names, me = plan.device_names, plan.device_names.index(plan.coordinator)
    waiting, attempt, deadline = set(peers), 0, time.monotonic() + timeout_s
    while waiting and time.monotonic() < deadline:
        for d in sorted(waiting):
            endpoint.send(Message(Kind.HELLO, session, 0, 0, me, body), peers[d], make_flags(min(attempt, 15)),
                          dest=names.index(d))
        attempt += 1
        until = min(deadline, time.monotonic() + 0.05 * attempt)
        while waiting and time.monotonic() < until:
            got = endpoint.recv(until - time.monotonic())
            if got and got[0].session == session and got[0].sender < len(names):
                if got[0].kind == Kind.HELLO:
                    waiting.discard(names[got[0].sender])
                elif got[0].kind == Kind.RESET and restarted is not None and names[got[0].sender] in waiting:
                    waiting.discard(names[got[0].sender])
                    restarted.add(names[got[0].sender])
    return waiting


def _layout(plan: Plan) -> dict:
    """Per layer: which remote devices answer which star round with which parts (`holders`
    without the coordinator, which never answers itself)."""
    return {kind: [[d for d in devices if d != plan.coordinator] for devices in per_layer]
            for kind, per_layer in holders(plan).items()}


def attention_layers(layout: dict, device: str) -> list[int]:
    """The layers in which `device` holds attention heads (`_layout`): the KV caches it keeps."""
    return [i for i, held in enumerate(layout["attn"]) if device in held]


def _warn(msg: str) -> None:
    print(f"halo-run: warning: {msg}", file=sys.stderr, flush=True)
