"""Push rounds: every device keeps its own copy of the residual stream and adds the parts itself.

In the star (`coordinator`), a network round is a round trip: the coordinator sends the round's
input out and the devices send their parts back. With push rounds a device sends its part straight
to every other device, and each one forms the sum on its own copy of the residual (its *view*):
one one-way hop per round. The coordinator sends the residual only where it computed rounds alone
(its segments: the embedding at least), once per pass. A plan's `star_rounds` send their parts to
the coordinator alone, which hands the residual out again before the next round: a star round
within push rounds, where pushing every part to every device costs more than that round trip (the
last round before one the coordinator computes alone needs no view's sum at all).

The rule every view applies is the coordinator's (`push_sum`): critical parts awaited, a relaxed
part awaited on the tokens where *its own* predictor (on its own attention input) flags the
sender's groups, else used if it came by the deadline and estimated by the same low-rank
compensation if not, summed in one order (the coordinator's part, then the devices' in plan
order, then the estimates; the coordinator's own parts rounded to the wire as every device's).
With nothing lost every view holds the coordinator's residual to the last bit, and on an fp32 wire
the star's (which adds its own parts unrounded). Under loss two views may decide differently about
one late part, and their streams differ. That difference is bounded by construction: the parts
are common (every view adds the same critical parts and the same arrived relaxed parts), so two
views differ by exactly the estimate-minus-part of the relaxed parts they decided differently in
this token, and it never compounds within the token; the next pass starts again from the
coordinator's residual. What it leaves behind is in the KV rows a device wrote from its own view,
which later tokens' attention reads. `ViewStats` measures the drift; docs/ACCURACY.md reports what
it costs.

A view needs, beside its own groups, every layer's two norms, the predictor and the compensation
of the other devices' relaxed groups (`view_tensors` of the coordinator's shard; the compiler
writes them to `plandir.VIEW_FILE` for the boards, `load_view`).

`InProcessPush` models it without sockets, every view in this process and each receiver drawing
its own misses (what `halo-compile eval --rounds push` scores); `net.push` runs it over UDP. The
link model of the in-process one: a relaxed part from s to view v crosses s's link and v's once
each and misses with 1 - (1 - q_s)(1 - q_v), q being the star's miss probability of each link
(`DeliveryPolicy.miss_probability`; the coordinator's clean): an upper bound, since the star's q
counts a request and a reply.

Example (a view's input differing from the coordinator's by one part in a thousand):
    >>> import numpy as np
    >>> s = ViewStats()
    >>> s.add(np.ones((1, 4), np.float32), np.full((1, 4), 1.001, np.float32))
    >>> s.inputs, s.differing, round(s.max_relative, 4)
    (1, 1, 0.001)
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from .codec import as_wire
from .coordinator import Coordinator, rms_norm, sum_parts
from .device import DeviceBackend, DeviceCompute
from .exchange import DeviceLost, DeviceStats, ExchangeStats
from .plan import ROUNDS, Plan
from .plandir import VIEW_FILE, PlanError, check_files
from .predictor import layer_predictor
from .relaxed import awaited_rows, estimate, relaxed_parts
from .segment import Segment, schedule
from .shards import load_shard, read_safetensors
from .spans import Span

__all__ = ["ROUNDS", "InProcessPush", "PushCoordinator", "PushMesh", "View", "ViewStats", "is_view_tensor",
           "load_view", "push_miss", "push_sum", "requested_rounds", "view_over_memory", "view_tensors"]


def is_view_tensor(name: str) -> bool:
    """A tensor of the coordinator's shard that a view needs: a layer's norm, the predictor, the compensation."""
    return name.startswith(("predictor.", "compensation.")) or name.endswith("layernorm")


def view_tensors(shard: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What a view needs of the coordinator's shard (`is_view_tensor`)."""
    return {k: v for k, v in shard.items() if is_view_tensor(k)}


def load_view(directory, plan: Plan) -> dict[str, np.ndarray]:
    """A device's view tensors from the plan directory: `plandir.VIEW_FILE` (checked against the
    manifest), else the coordinator's shard if it is there (a plan compiled before the view file);
    PlanError naming what is missing."""
    path = Path(directory) / VIEW_FILE
    if path.exists():
        check_files(directory, [VIEW_FILE])
        try:
            return read_safetensors(path)
        except (ValueError, KeyError, TypeError, OSError) as e:
            raise PlanError(f"{path}: unreadable ({e})") from None
    if not (Path(directory) / plan.shard_file(plan.coordinator)).exists():
        raise PlanError(f"{path}: missing (push rounds need it on every device: copy it from the plan directory, "
                        "or recompile with this halo-compile)")
    return view_tensors(load_shard(directory, plan, plan.coordinator))


def view_over_memory(plan: Plan, view_bytes: int) -> dict[str, tuple[float, float]]:
    """Remote device -> (MB it would hold, MB the plan gave it) for each device whose weights and
    KV cache, with a push view of `view_bytes` beside them, exceed its memory: placement does not
    count the view (it places for star rounds; `halo_compile.place.choose_rounds` then keeps such a
    plan on star rounds, and `--rounds push` is the user's choice)."""
    out = {}
    for dev, rep in zip(plan.devices, plan.device_reports):
        held = rep.weight_bytes + rep.kv_cache_bytes + view_bytes
        if dev.name != plan.coordinator and held > dev.memory_bytes:
            out[dev.name] = (held / 2**20, dev.memory_bytes / 2**20)
    return out


def requested_rounds(steps: list, starred: frozenset) -> frozenset:
    """The star rounds of a push pass (`Plan.starred_rounds`) that open with the star's request
    (the round's input on the wire) instead of the coordinator's residual: those after one of its
    segments or after another star round. No view adds such a round's sum, and the coordinator
    hands its residual out before the next push round, so a view needs nothing else."""
    return frozenset(st for prev, st in zip(steps, steps[1:])
                     if st in starred and (isinstance(prev, Segment) or prev in starred))


def handoff_with_x(steps: list, index: int) -> bool:
    """Whether the residual handed out before schedule step `index` carries the predictor's input
    too (columns hidden..2 x hidden): after a segment of the coordinator's that ended on an
    attention round, or after a star round of attention (the next round is that layer's MLP)."""
    prev = steps[index - 1]
    return prev.predictor_layer is not None if isinstance(prev, Segment) else prev[1] == "attn"


def push_miss(sender: float, receiver: float) -> float:
    """Chance a relaxed part pushed from a device with miss probability `sender` misses a view
    whose own link misses with `receiver` (independent links)."""
    return 1.0 - (1.0 - sender) * (1.0 - receiver)


def push_sum(order: list[str], parts: dict[str, tuple], missing: dict[str, np.ndarray], estimate_of,
             like: np.ndarray) -> np.ndarray:
    """The sum a view adds in an MLP round: per device in `order` its (critical, relaxed) parts,
    a relaxed one's `missing` rows zeroed and `estimate_of(device, rows)` added after all parts
    (the star's order, so that nothing lost gives the star's bits)."""
    pieces, estimates = [], []
    for s in order:
        critical, rlx = parts.get(s, (None, None))
        pieces.append(critical)
        rows = missing.get(s)
        if rlx is not None and rows is not None and rows.any():
            estimates.append(estimate_of(s, rows))
            rlx = None if rows.all() else np.where(rows[:, None], np.float32(0), rlx)
        pieces.append(rlx)
    return sum_parts(pieces + estimates, like)


class View:
    """One device's copy of the residual in push rounds: its inputs to the rounds and the sums it adds."""

    def __init__(self, plan: Plan, name: str, tensors: dict[str, np.ndarray], compensation: str,
                 await_predicted: bool):
        """tensors: `view_tensors` of the coordinator's shard; compensation, await_predicted: the
        coordinator's (every view applies one rule)."""
        L, f32 = plan.model.num_layers, (lambda k: np.ascontiguousarray(tensors[k], dtype=np.float32))  # noqa: E731
        self.name, self.eps = name, plan.model.rms_norm_eps
        self.order = [plan.coordinator] + [d for d in plan.device_names if d != plan.coordinator]
        self.norms = [(f32(f"layers.{i}.input_layernorm"), f32(f"layers.{i}.post_attention_layernorm"))
                      for i in range(L)]
        self.predictors = [layer_predictor(tensors, i) for i in range(L)]
        self.compensation, self.await_predicted = compensation, await_predicted
        # the coordinator computes its MLP groups in one product (`DeviceCompute.mlp`): one part,
        # awaited by every view like a critical one
        self.relaxed = relaxed_parts(plan, tensors, [d for d in self.order[1:] if d != name], compensation == "lowrank")
        """Per layer, the other remote devices' relaxed parts this view may miss."""
        self.h = self.x = self.m = None

    def start(self, h: np.ndarray, x: np.ndarray | None = None) -> None:
        """Take the coordinator's residual (and its predictor input, when its rounds ended on an attention)."""
        self.h = h
        if x is not None:
            self.x = x

    def attn_input(self, layer: int) -> np.ndarray:
        self.x = rms_norm(self.h, self.norms[layer][0], self.eps)
        return self.x

    def mlp_input(self, layer: int) -> np.ndarray:
        self.m = rms_norm(self.h, self.norms[layer][1], self.eps)
        return self.m

    def awaited(self, layer: int) -> dict[str, np.ndarray]:
        """Device -> rows on which its relaxed part is awaited (this view's predictor)."""
        return awaited_rows(self.relaxed[layer], self.predictors[layer], self.x) if self.await_predicted else {}

    def add_attention(self, parts: list) -> None:
        """Every device's heads (own included, in `order`), all awaited."""
        self.h = self.h + sum_parts(parts, self.h)

    def add_mlp(self, layer: int, parts: dict[str, tuple], missing: dict[str, np.ndarray]) -> None:
        self.h = self.h + push_sum(self.order, parts, missing,
                                   lambda s, rows: estimate(self.compensation, self.relaxed[layer][s], self.m, rows),
                                   self.m)


class PushMesh(Protocol):
    """The coordinator's side of push rounds: hand the residual to the views, push its own parts
    and collect the others'. `x` and `m` (the coordinator's inputs) only serve the in-process
    model's drift measurement."""

    wire: str
    """The parts' dtype on the wire (`codec.as_wire`): the coordinator's own parts too."""

    def configure(self, compensation: str, await_predicted: bool) -> None:
        """The coordinator's rule, which every view applies."""

    def begin(self, session: int) -> None: ...

    def handoff(self, step: int, index: int, spans: tuple, h: np.ndarray, x: np.ndarray | None) -> None:
        """Before schedule step `index`, after a segment or a star round of the coordinator's: every
        view takes h (and x, `handoff_with_x`)."""

    def request(self, step: int, index: int, spans: tuple, inp: np.ndarray) -> None:
        """Before a star round at schedule step `index` that opens with a request (`requested_rounds`):
        every device computes on `inp`, the round's input, rounded to the wire."""

    def remember(self, layer: int, x: np.ndarray, spans: tuple) -> None:
        """The input of an attention round (what a failover would rebuild KV caches from)."""

    def attention(self, step: int, layer: int, own: np.ndarray | None, x: np.ndarray) -> list[np.ndarray]:
        """Push the coordinator's heads' part; the other devices' parts of `layer`, in device order."""

    def mlp(self, step: int, layer: int, own: tuple, awaited: dict[str, np.ndarray],
            m: np.ndarray) -> tuple[dict[str, tuple], dict[str, np.ndarray]]:
        """Push the coordinator's (critical, relaxed) parts; the others' by device, and the rows of
        relaxed parts that missed the coordinator's deadline."""

    def stats(self) -> ExchangeStats: ...

    def close(self) -> None: ...


@dataclass
class ViewStats:
    """How far the other devices' views drift from the coordinator's, measured on the round inputs
    (the normalised residual each device computes its part from)."""

    inputs: int = 0
    """Round inputs compared: one per other view, network round and row."""
    differing: int = 0
    """Of those, the ones not equal to the coordinator's to the last bit."""
    max_relative: float = 0.0
    """Largest |input - coordinator's| / |coordinator's| (L2 norms over the hidden size)."""
    sum_relative: float = 0.0
    """Their sum (the mean is sum_relative / inputs)."""
    disagreements: int = 0
    """Relaxed (sender, row) parts that some view compensated and the coordinator used, or the
    other way round."""
    compensated: int = 0
    """Relaxed rows compensated by views other than the coordinator."""

    def add(self, view: np.ndarray, coordinator: np.ndarray) -> None:
        diff = np.linalg.norm(view - coordinator, axis=-1) / np.maximum(np.linalg.norm(coordinator, axis=-1), 1e-30)
        self.inputs += diff.size
        self.differing += int(np.count_nonzero(diff))
        self.max_relative = max(self.max_relative, float(diff.max(initial=0.0)))
        self.sum_relative += float(diff.sum())

    def to_json(self) -> dict:
        return {"inputs": self.inputs, "differing": self.differing,
                "mean_relative": self.sum_relative / self.inputs if self.inputs else 0.0,
                "max_relative": self.max_relative, "disagreements": self.disagreements,
                "compensated": self.compensated}


class InProcessPush:
    """Every other device and its view in this process, each computing on its own view's input;
    each view draws its own misses of the others' relaxed parts (seeded). The push counterpart of
    InProcessExchange, and a `PushMesh`."""

    def __init__(self, plan: Plan, shards: dict[str, dict[str, np.ndarray]], miss: dict[str, float] | None = None,
                 seed: int = 0, wire: str = "fp32", computes: dict[str, DeviceBackend] | None = None):
        """miss: device -> the miss probability of its link (absent: clean; the coordinator's too).
        The views are made when PushCoordinator gives the rule (`configure`)."""
        self.plan, self.wire = plan, wire
        self.order = [d for d in plan.device_names if d != plan.coordinator]
        computes = computes or {}
        self.devices = {d: computes.get(d) or DeviceCompute(plan, d, shards[d]) for d in self.order}
        self.tensors = view_tensors(shards[plan.coordinator])
        self.views: dict[str, View] = {}
        self.miss = miss or {}
        self.gen = np.random.default_rng(seed)
        self.per_device = {d: DeviceStats() for d in self.order}
        self.starred = plan.starred_rounds()
        self.requested = requested_rounds(schedule(plan), self.starred)
        self.input: np.ndarray | None = None
        """The input of the star round that opened with a request (`request`)."""
        self.drift = ViewStats()
        self.spans: tuple = ()
        self.relaxed_parts = self.compensated = self.awaited_relaxed = 0

    def configure(self, compensation: str, await_predicted: bool) -> None:
        """The coordinator's rule, for every view."""
        self.views = {d: View(self.plan, d, self.tensors, compensation, await_predicted) for d in self.order}

    def begin(self, session: int) -> None:
        for dev in self.devices.values():
            dev.reset()

    def _wire(self, t: np.ndarray | None) -> np.ndarray | None:
        return as_wire(t, self.wire)

    def remember(self, layer: int, x: np.ndarray, spans: tuple) -> None:
        pass  # no device of this process is ever lost

    def handoff(self, step: int, index: int, spans: tuple, h: np.ndarray, x: np.ndarray | None) -> None:
        self.spans = spans
        for v in self.views.values():
            v.start(h, x)

    def request(self, step: int, index: int, spans: tuple, inp: np.ndarray) -> None:
        self.spans, self.input = spans, self._wire(inp)

    def _inputs(self, layer: int, kind: str, coordinators: np.ndarray) -> dict[str, np.ndarray]:
        """Each device's input to a round: the request's, or its view's (its drift measured)."""
        if (layer, kind) in self.requested:
            return dict.fromkeys(self.order, self.input)
        out = {}
        for d in self.order:
            view = self.views[d]
            out[d] = view.attn_input(layer) if kind == "attn" else view.mlp_input(layer)
            self.drift.add(out[d], coordinators)
        return out

    def attention(self, step: int, layer: int, own: np.ndarray | None, x: np.ndarray) -> list[np.ndarray]:
        parts = []
        for d, xd in self._inputs(layer, "attn", x).items():
            if self.devices[d].has_attention(layer):  # computed on its input as the wire carries it
                parts.append(self._wire(self.devices[d].attention_spans(layer, self._wire(xd), self.spans)))
        if (layer, "attn") not in self.starred:  # else the parts came to the coordinator alone
            for v in self.views.values():
                v.add_attention([own] + parts)
        return parts

    def mlp(self, step: int, layer: int, own: tuple, awaited: dict[str, np.ndarray],
            m: np.ndarray) -> tuple[dict[str, tuple], dict[str, np.ndarray]]:
        parts = {}
        for d, md in self._inputs(layer, "mlp", m).items():
            if self.devices[d].has_mlp(layer):
                parts[d] = tuple(map(self._wire, self.devices[d].mlp(layer, self._wire(md))))
        every = {self.plan.coordinator: own, **parts}
        T = m.shape[0]
        decided: dict[str, dict[str, np.ndarray]] = {}  # sender -> view -> rows compensated
        at_coordinator = {}
        for view in [self.plan.coordinator] + ([] if (layer, "mlp") in self.starred else self.order):
            wanted = awaited if view == self.plan.coordinator else self.views[view].awaited(layer)
            missing = {}
            for s in [self.plan.coordinator] + self.order:
                if s == view or every.get(s, (None, None))[1] is None:
                    continue
                # drawn for every pair and row, awaited or not: the stream does not depend on the predictor
                lost = self.gen.random(T) < push_miss(self.miss.get(s, 0.0), self.miss.get(view, 0.0))
                wait = wanted.get(s, np.zeros(T, dtype=bool))
                missing[s] = decided.setdefault(s, {})[view] = lost & ~wait
                if view == self.plan.coordinator:
                    self._record(s, T, lost, wait, missing[s])
                else:
                    self.drift.compensated += int(missing[s].sum())
            if view == self.plan.coordinator:
                at_coordinator = {s: rows for s, rows in missing.items() if rows.any()}
            else:
                self.views[view].add_mlp(layer, every, missing)
        self._disagreements(decided)
        return parts, at_coordinator

    def _record(self, sender: str, rows: int, lost: np.ndarray, wait: np.ndarray, missing: np.ndarray) -> None:
        """The coordinator's view of `sender`'s relaxed part (what `stats().devices` reports)."""
        self.per_device[sender] += DeviceStats(rows, int(lost.sum()), int(wait.sum()), int(missing.sum()))
        self.relaxed_parts += 1
        self.awaited_relaxed += bool(wait.any())
        self.compensated += bool(missing.any())

    def _disagreements(self, decided: dict[str, dict[str, np.ndarray]]) -> None:
        """Relaxed rows some view decided otherwise than the coordinator (which always uses its own part)."""
        for sender, views in decided.items():
            ref = views.get(self.plan.coordinator)
            if ref is None:
                ref = np.zeros_like(next(iter(views.values())))
            differ = np.zeros_like(ref)
            for rows in views.values():
                differ |= rows != ref
            self.drift.disagreements += int(differ.sum())

    def stats(self) -> ExchangeStats:
        return ExchangeStats(compensated=self.compensated, relaxed_parts=self.relaxed_parts,
                             awaited_relaxed=self.awaited_relaxed, devices=dict(self.per_device))

    def close(self) -> None:
        pass


class PushCoordinator(Coordinator):
    """The coordinator of push rounds over a `PushMesh`: its own view is the star's residual (it
    alone computes the logits); segments, generation and drafts are the star's. A device lost in
    push rounds is replaced by the plan's failover, and the session goes on in star rounds (where
    failover is built) if its mesh can (`to_star`; one that restarted meanwhile rejoins instead of
    being replaced); else the loss ends the run."""

    def __init__(self, plan: Plan, shard: dict[str, np.ndarray], mesh: PushMesh, compensation: str | None = None,
                 await_predicted: bool = True, threads: int = 1):
        super().__init__(plan, shard, mesh, compensation, await_predicted, threads)
        self.order = [plan.coordinator] + self.remote
        mesh.configure(self.compensation, self.await_predicted)
        self.starred = plan.starred_rounds()
        self.requested = requested_rounds(self.steps, self.starred)
        self.index = {st: i for i, st in enumerate(self.steps) if not isinstance(st, Segment)}
        self._pass: tuple = (0, ())
        self.pushing = True
        """False once a lost device moved the session to star rounds."""

    def reset(self, session: int) -> None:
        super().reset(session)
        # push rounds again once a session's HELLO finds every device (`UdpPush.begin`)
        self.pushing = getattr(self.exchange, "star", None) is None

    def run(self, feeds, step: int, stats):
        self._pass = (step, tuple(Span(f.slot, f.start, len(f.tokens), f.source) for f in feeds))
        return super().run(feeds, step, stats)

    def _fail_over(self, lost: DeviceLost, start) -> None:
        to_star = getattr(self.exchange, "to_star", None)
        if not (self.pushing and to_star is not None and lost.device is not None):
            return super()._fail_over(lost, start)
        # the device named is the first whose part did not come; one that waited for a dead
        # device's part is silent too, so the star's handshake says which one is gone
        t0 = time.perf_counter()
        dead = to_star(lost.device, start)
        self.pushing = False
        if dead is None:  # it restarted and rejoined: nobody to replace, the pass runs again in star rounds
            return
        super()._fail_over(DeviceLost(str(lost), dead), start)
        self.failovers[-1].switch_ms = 1e3 * (time.perf_counter() - t0)  # the star's handshake included

    def _segment_done(self, i: int, h, x) -> None:
        # the coordinator sends the residual it computed to every view, unless a request opens the next round
        if h is not None and self.pushing and self.steps[i + 1] not in self.requested:
            self.exchange.handoff(self._pass[0], i + 1, self._pass[1], h, x)

    def _round_done(self, i: int, h: np.ndarray, x: np.ndarray | None) -> None:
        # a round whose parts came to the coordinator alone: the views take its residual before the
        # next push round (a segment of the coordinator's hands it out after itself; the head ends the pass)
        after = self.steps[i + 1]
        if self.pushing and self.steps[i] in self.starred and not isinstance(after, Segment) \
                and after not in self.requested:
            x = x if handoff_with_x(self.steps, i + 1) else None
            self.exchange.handoff(self._pass[0], i + 1, self._pass[1], h, x)

    def _opens(self, layer: int, kind: str, inp: np.ndarray) -> None:
        """A star round that opens with a request: every device gets its input (`requested_rounds`)."""
        if (layer, kind) in self.requested:
            self.exchange.request(self._pass[0], self.index[layer, kind], self._pass[1], inp)

    def _attention(self, step: int, layer: int, spans: tuple, stats, x: np.ndarray) -> np.ndarray:
        """Push the coordinator's heads, add everyone's (all awaited)."""
        if not self.pushing:
            return super()._attention(step, layer, spans, stats, x)
        self.exchange.remember(layer, x, spans)
        self._opens(layer, "attn", x)
        t0 = time.perf_counter()
        # rounded to the wire as every device's part is, so that it travels in one datagram a row
        # of fp16 instead of two of fp32, and every view (this one too) adds the same bits
        own = self.part.attention_spans(layer, x, spans) if self.part.has_attention(layer) else None
        own = as_wire(own, self.exchange.wire)
        t1 = time.perf_counter()
        others = self.exchange.attention(step, layer, own, x)
        _times(stats, t0, t1)
        return sum_parts([own] + others, x)

    def _mlp(self, step: int, layer: int, spans: tuple, bounds, stats, x: np.ndarray, m: np.ndarray) -> np.ndarray:
        """Push the coordinator's MLP parts; add everyone's as the star would, estimating the relaxed
        parts that missed this view's deadline."""
        if not self.pushing:
            return super()._mlp(step, layer, spans, bounds, stats, x, m)
        awaited = self._awaited(layer, x)
        self._opens(layer, "mlp", m)
        t0 = time.perf_counter()
        own = self.part.mlp(layer, m) if self.part.has_mlp(layer) else (None, None)
        own = tuple(as_wire(t, self.exchange.wire) for t in own)  # rounded as the attention part
        t1 = time.perf_counter()
        parts, missing = self.exchange.mlp(step, layer, own, awaited, m)
        _times(stats, t0, t1)
        self._count(layer, stats, bounds, missing, awaited)
        return push_sum(self.order, {self.plan.coordinator: own, **parts}, missing,
                        lambda dev, rows: self._compensate(layer, dev, m, rows), m)


def _times(stats, t0: float, t1: float) -> None:
    """A round's compute (t0..t1: the coordinator's own part) and wait (t1..now: pushing, collecting)."""
    compute_ms, wait_ms = 1e3 * (t1 - t0), 1e3 * (time.perf_counter() - t1)
    for s in stats:
        s.compute_ms += compute_ms
        s.wait_ms += wait_ms
