"""A worker's side of push rounds (`net.push`): its view of the residual, walked through the
plan's schedule pass by pass, over a `push.Mesh` (UDP) or a `pushtcp.TcpMesh` (strict). In each
network round it computes its part from its view's input, pushes it to every other device, collects
theirs and adds them as the coordinator's rule says (`core.push.View`); in a star round it sends its
part to the coordinator alone, computed on its view's input or on the request the coordinator sent
(`core.push.requested_rounds`), and takes what the coordinator hands out next.

Example (what `halo-run worker` starts when a push HELLO comes; tests/test_push_net.py runs it):
    $ halo-run local --plan artifacts/smollm2-135m-pi5 --rounds push --prompt "Hello"
"""
from __future__ import annotations

from ..core.codec import WireError, as_wire, decode_request, decode_tensor, encode_tensor
from ..core.exchange import DeviceLost
from ..core.plan import Plan
from ..core.push import View, handoff_with_x, requested_rounds
from ..core.segment import Segment, schedule
from .mesh import _ATTN, _CRIT, _H, _RLX
from .push import PushHello, decode_parts, mlp_want
from .rounds import holders
from .wire import Message


class PushWorker:
    """A worker's side of push rounds: its view, walked through the schedule pass by pass, over a
    `Mesh` (UDP) or a `pushtcp.TcpMesh` (strict)."""

    def __init__(self, plan: Plan, me: str, compute, tensors: dict, mesh, hello: PushHello, log, lock):
        """lock: held while computing (the worker's: a strict pass runs on a thread of its own, and
        a star request after a lost device must not compute beside a pass being given up)."""
        self.plan, self.me, self.compute, self.log, self.lock = plan, me, compute, log, lock
        self.wire, self.width = hello.policy.wire, plan.model.hidden_size
        self.view = View(plan, me, tensors, hello.compensation, hello.await_predicted)
        self.mesh = mesh
        self.strict = hello.strict
        self.holders = holders(plan)
        self.steps = schedule(plan)
        self.starred = plan.starred_rounds()
        self.requested = requested_rounds(self.steps, self.starred)
        self.order = self.view.order
        self.done_step = -1

    def serve(self, timeout_s: float) -> None:
        """Run the next pass if its residual came, else wait for messages up to `timeout_s`."""
        msg = self.mesh.take_start(self.done_step)
        if msg is None:
            self.mesh.pump(timeout_s)
            return
        try:
            self._pass(msg)
        except DeviceLost as e:
            self.log(f"pass of step {msg.step} abandoned: {e}")
        except WireError as e:
            self.mesh.counters["malformed"] += 1
            self.log(f"pass of step {msg.step} abandoned: {e}")
        self.done_step = msg.step

    def _open(self, msg: Message, index: int) -> tuple:
        """The coordinator's PUSH_H before schedule step `index`: (spans, rows, the round's input if
        it is a request, `requested_rounds`; else the view takes the residual, and None)."""
        if self.steps[index] in self.requested:
            spans, _, _, inp = decode_request(msg.payload, self.width)
            return spans, inp.shape[0], inp
        x = handoff_with_x(self.steps, index)
        spans, _, _, hx = decode_request(msg.payload, 2 * self.width if x else self.width)
        self.view.start(hx[:, :self.width], hx[:, self.width:] if x else None)
        return spans, hx.shape[0], None

    def _pass(self, msg: Message) -> None:
        step, mesh, coordinator = msg.step, self.mesh, self.plan.coordinator
        i, opened = msg.layer, msg  # opened: the coordinator's message before step i
        while i < len(self.steps):
            st = self.steps[i]
            inp = None
            if opened is not None:
                spans, rows, inp = self._open(opened, i)
                opened = None
            if isinstance(st, Segment):
                if st.head:
                    return
                i += 1
                opened = mesh.collect(step, i, [(coordinator, _H)])[coordinator, _H]
                continue
            layer, kind = st
            if st in self.starred:  # the part goes to the coordinator alone, which hands out what comes next
                (self._attention if kind == "attn" else self._mlp)(step, layer, spans, [coordinator], inp)
                i += 1
                if not isinstance(self.steps[i], Segment):  # else the segment's comes after it
                    opened = mesh.collect(step, i, [(coordinator, _H)])[coordinator, _H]
                continue
            if kind == "attn":
                own = self._attention(step, layer, spans)
                senders = [d for d in self.holders["attn"][layer] if d != self.me]
                got = mesh.collect(step, layer, [(d, _ATTN) for d in senders])
                parts = {d: decode_tensor(got[(d, _ATTN)].payload, None, self.width) for d in senders}
                parts[self.me] = own
                self.view.add_attention([parts.get(d) for d in self.order])
            else:
                own = self._mlp(step, layer, spans)
                must, optional, relaxed = mlp_want(self.holders, layer, self.me, self.view.awaited(layer))
                got = mesh.collect(step, layer, must, optional)
                parts, missing = decode_parts(got, self.width, self.order, self.me, own, relaxed, rows,
                                              lambda d: mesh.partial_rows(step, layer, d, rows))
                self.mesh.counters["compensated"] += len(missing)
                self.view.add_mlp(layer, parts, missing)
            i += 1

    def _attention(self, step: int, layer: int, spans: tuple, to: list[str] | None = None, inp=None):
        """This device's heads on its view's input as the star's request would carry it (or on the
        request's, `inp`), pushed to `to` (default every other device); the part as every view adds
        it (None: no heads here)."""
        x = as_wire(self.view.attn_input(layer), self.wire) if inp is None else inp
        with self.lock:
            own = self.compute.attention_spans(layer, x, spans) if self.compute.has_attention(layer) else None
        if own is None:
            return None
        sent = encode_tensor(own, self.wire)
        self.mesh.push(_ATTN, step, layer, sent, to=to)
        return decode_tensor(sent, None, self.width)

    def _mlp(self, step: int, layer: int, spans: tuple, to: list[str] | None = None, inp=None) -> tuple:
        """This device's (critical, relaxed) MLP parts on its view's input (or `inp`), pushed as
        `_attention`'s."""
        m = as_wire(self.view.mlp_input(layer), self.wire) if inp is None else inp
        with self.lock:
            own = self.compute.mlp(layer, m) if self.compute.has_mlp(layer) else (None, None)
        sent = [None if t is None else encode_tensor(t, self.wire) for t in own]
        for k, payload in zip((_CRIT, _RLX), sent):
            if payload is not None:
                self.mesh.push(k, step, layer, payload, to=to)
        return tuple(None if p is None else decode_tensor(p, None, self.width) for p in sent)
