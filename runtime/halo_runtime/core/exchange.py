"""In-process exchange: every device computed in this process, with seeded simulated loss.

Used by tests (the plan's math without sockets) and by `halo-compile eval` (perplexity under
loss). Loss is drawn per token row, because in decode one message carries one token: the
relaxed part of device d for token t in a layer is missed with d's miss probability (from
`DeliveryPolicy.miss_probability`) unless the coordinator awaits that token; critical parts
always arrive, as the network exchange retransmits them until they do. A round of T tokens
(a whole evaluation window) thus sees what T decode steps would, at prefill speed.

Example (the checked-in plan's cluster with a toy one-layer MLP: a critical group on pi5-1, a
relaxed one on the lossy pi5-3, whose relaxed part is lost half the time):
    >>> import dataclasses, torch
    >>> from halo_runtime.core.exchange import InProcessExchange
    >>> from halo_runtime.core.model import ModelConfig
    >>> from halo_runtime.core.plan import Group, load_plan
    >>> cfg = ModelConfig(vocab_size=32, hidden_size=8, intermediate_size=6, num_layers=1,
    ...                   num_heads=2, num_kv_heads=1, head_dim=4)
    >>> groups = (Group("L0.mlp.0", 0, "mlp", 0, (0, 1, 2, 3), "pi5-1", True, 0.8),
    ...           Group("L0.mlp.1", 0, "mlp", 1, (4, 5), "pi5-3", False, 0.2))
    >>> plan = dataclasses.replace(load_plan("artifacts/smollm2-135m-pi5"), model=cfg, groups=groups)
    >>> mlp = lambda n: {"layers.0.mlp.gate_proj": torch.randn(n, 8), "layers.0.mlp.up_proj": torch.randn(n, 8),
    ...                  "layers.0.mlp.down_proj": torch.randn(8, n)}
    >>> ex = InProcessExchange(plan, {"pi5-1": mlp(4), "pi5-2": {}, "pi5-3": mlp(2)}, miss={"pi5-3": 0.5}, seed=0)
    >>> ex.post("mlp", step=0, layer=0, x=torch.randn(6, 8), start=0)      # one round of 6 tokens
    >>> r = ex.collect("mlp", step=0, layer=0, awaited={"pi5-3": torch.tensor([True] + [False] * 5)})
    >>> r.missing["pi5-3"].tolist()    # lost: tokens 0, 2, 3, 4; token 0 was awaited (retransmitted)
    [False, False, True, True, True, False]
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from .codec import decode_tensor, encode_tensor
from .device import DeviceCompute
from .plan import Plan


@dataclass
class RoundResult:
    """What came back for one layer's round."""

    parts: list[torch.Tensor]
    """Partial sums that arrived in time (critical ones always), in device order. Rows of a relaxed
    part that are missing (see `missing`) hold zeros."""
    missing: dict[str, torch.Tensor] = field(default_factory=dict)
    """Device -> bool [T]: tokens whose relaxed part missed the deadline and must be compensated."""


class Exchange(Protocol):
    """Moves requests to devices and partial sums back; the coordinator does not care how."""

    def begin(self, session: int) -> None: ...

    def post(self, phase: str, step: int, layer: int, x: torch.Tensor, start: int) -> None: ...

    def collect(self, phase: str, step: int, layer: int, awaited: dict[str, torch.Tensor]) -> RoundResult:
        """`awaited`: device -> bool [T], tokens whose relaxed part must be awaited; only devices
        flagged on some token are keys, so `device in awaited` means "await it this round"."""

    def stats(self) -> dict: ...

    def close(self) -> None: ...



class InProcessExchange:
    def __init__(self, plan: Plan, shards: dict[str, dict[str, torch.Tensor]],
                 miss: dict[str, float] | None = None, seed: int = 0, wire: str = "fp32",
                 computes: dict[str, DeviceCompute] | None = None):
        """computes: prebuilt devices by name (e.g. a StreamingCompute); their shards are not read."""
        self.plan, self.wire = plan, wire
        self.order = [d for d in plan.device_names if d != plan.coordinator]
        computes = computes or {}
        self.devices = {d: computes.get(d) or DeviceCompute(plan, d, shards[d]) for d in self.order}
        self.miss = miss or {}
        self.gen = torch.Generator().manual_seed(seed)
        self.pending: tuple | None = None
        self.counts = {"relaxed_parts": 0, "compensated": 0}
        # per device, in (token, layer) relaxed parts: expected, lost on the wire, awaited, compensated
        self.per_device = {d: {"rows": 0, "lost": 0, "awaited": 0, "compensated": 0} for d in self.order}

    def begin(self, session: int) -> None:
        for dev in self.devices.values():
            dev.reset()

    def _wire(self, t: torch.Tensor | None) -> torch.Tensor | None:
        """What the tensor becomes on the wire (fp16 rounding included), as the network path sees it."""
        if t is None or self.wire == "fp32":
            return t
        return decode_tensor(encode_tensor(t, self.wire), self.wire)

    def post(self, phase: str, step: int, layer: int, x: torch.Tensor, start: int) -> None:
        self.pending = (phase, layer, self._wire(x), start)

    def collect(self, phase: str, step: int, layer: int, awaited: dict[str, torch.Tensor]) -> RoundResult:
        _, _, x, start = self.pending
        result = RoundResult(parts=[])
        for name in self.order:
            dev = self.devices[name]
            if phase == "attn":
                if dev.has_attention(layer):
                    result.parts.append(self._wire(dev.attention(layer, x, start)))
                continue
            if not dev.has_mlp(layer):
                continue
            critical, relaxed = map(self._wire, dev.mlp(layer, x))
            result.parts.append(critical)
            if relaxed is None:
                continue
            T = relaxed.shape[0]
            # draw for every token, awaited or not, so the random stream does not depend on the
            # predictor or the compensation and runs stay comparable across methods
            lost = torch.rand(T, generator=self.gen) < self.miss.get(name, 0.0)
            wait = _rows(awaited, name, T)
            missing = lost & ~wait
            c = self.per_device[name]
            c["rows"] += T
            c["lost"] += int(lost.sum())
            c["awaited"] += int(wait.sum())
            c["compensated"] += int(missing.sum())
            self.counts["relaxed_parts"] += 1
            if bool(missing.any()):
                self.counts["compensated"] += 1
                result.missing[name] = missing
                if bool(missing.all()):
                    continue
                relaxed = relaxed.masked_fill(missing[:, None], 0.0)
            result.parts.append(relaxed)
        return result

    def stats(self) -> dict:
        return {**self.counts, "devices": {d: dict(c) for d, c in self.per_device.items()}}

    def close(self) -> None:
        pass


def _rows(awaited, name: str, T: int) -> torch.Tensor:
    """Tokens of `name` the coordinator awaits (a set of names, as older callers pass, means all)."""
    if isinstance(awaited, dict):
        rows = awaited.get(name)
        return rows if rows is not None else torch.zeros(T, dtype=torch.bool)
    return torch.full((T,), name in awaited, dtype=torch.bool)
