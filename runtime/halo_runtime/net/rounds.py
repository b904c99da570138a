"""What the two network exchanges share: the request kind of each round, which remote devices
answer which round with which parts, how long a replaced device may take to return, and how a
warning is printed. `exchange.UdpExchange` (relaxed) and `tcpexchange.TcpExchange` (strict) import it.

Example:
    >>> from halo_runtime.core.plan import load_plan
    >>> from halo_runtime.net.rounds import _layout
    >>> plan = load_plan("artifacts/smollm2-135m-pi5")
    >>> [len(_layout(plan)[k]) for k in ("attn", "crit", "relaxed")]     # one list per layer
    [30, 30, 30]
"""
from __future__ import annotations

import sys

from ..core.plan import Plan
from .wire import Kind

RETURN_GRACE_S = 0.2
"""How long a new session waits for a device replaced by its failover: if it answers, it is back."""
PHASE_REQUEST = {"attn": Kind.REQUEST_ATTN, "mlp": Kind.REQUEST_MLP}


def _layout(plan: Plan) -> dict:
    """Per layer: which remote devices answer which round with which parts."""
    remote = [d for d in plan.device_names if d != plan.coordinator]
    out = {"attn": [], "crit": [], "relaxed": []}
    for layer in range(plan.model.num_layers):
        on = {d: plan.groups_on(d, layer) for d in remote}
        out["attn"].append([d for d in remote if any(g.kind == "attn" for g in on[d])])
        out["crit"].append([d for d in remote if any(g.kind == "mlp" and g.critical for g in on[d])])
        out["relaxed"].append([d for d in remote if any(g.kind == "mlp" and not g.critical for g in on[d])])
    return out


def _warn(msg: str) -> None:
    print(f"halo-run: warning: {msg}", file=sys.stderr, flush=True)
