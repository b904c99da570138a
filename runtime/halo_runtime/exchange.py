"""In-process exchange: every device computed in this process, with seeded simulated loss.

Used by tests (the plan's math without sockets) and by `halo-compile eval` (perplexity under
loss). A relaxed part is missed with its device's miss probability unless the coordinator
awaits it; critical parts always arrive, as the network exchange retransmits them until they do.

Example:
    >>> # ex = InProcessExchange(plan, {d: load_shard(dir, plan, d) for d in remote}, miss={"pi5-2": 0.01})
    >>> # Coordinator(plan, coordinator_shard, ex).generate(prompt, 16)
"""
from __future__ import annotations

import random

import torch

from .coordinator import RoundResult
from .device import DeviceCompute
from .plan import Plan
from .wire import decode_tensor, encode_tensor


class InProcessExchange:
    def __init__(self, plan: Plan, shards: dict[str, dict[str, torch.Tensor]],
                 miss: dict[str, float] | None = None, seed: int = 0, wire: str = "fp32"):
        self.plan, self.wire = plan, wire
        self.order = [d for d in plan.device_names if d != plan.coordinator]
        self.devices = {d: DeviceCompute(plan, d, shards[d]) for d in self.order}
        self.miss = miss or {}
        self.rng = random.Random(seed)
        self.pending: tuple | None = None
        self.counts = {"relaxed_parts": 0, "compensated": 0}

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

    def collect(self, phase: str, step: int, layer: int, awaited: set[str]) -> RoundResult:
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
            self.counts["relaxed_parts"] += 1
            # draw for every relaxed part, awaited or not, so the random stream does not depend
            # on the predictor and runs stay comparable across methods
            lost = self.rng.random() < self.miss.get(name, 0.0)
            if lost and name not in awaited:
                result.missing.append(name)
                self.counts["compensated"] += 1
            else:
                result.parts.append(relaxed)
        return result

    def stats(self) -> dict:
        return dict(self.counts)

    def close(self) -> None:
        pass
