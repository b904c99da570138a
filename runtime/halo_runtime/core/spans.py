"""Where a pass's rows sit: several sessions' tokens in one round.

A device holds the KV caches of up to `Plan.session_slots()` sessions (slots). A pass carries, for
each slot taking part, a `Span`: which slot, the position its first row goes to, how many rows,
and on a session's first rows, maybe the slot whose KV rows before that position it takes (a
prompt that starts like another session's, such as every chat's system prompt, copies those rows
instead of computing them: the same bits); the rows of all spans travel as one tensor, spans in
order. A device multiplies every row at once (MLP, and attention's projections: each output
element is one dot product whatever rows share the product), and each span attends to its own
slot's KV cache
(`DeviceBackend.attention_spans`): a row's bits never depend on what else is in the pass.

A plain int `start` still means what it always did: every row in slot 0 from `start` on.
`BatchOptions` says how `serve` fills passes (`server.engine`).

Example:
    >>> from halo_runtime.core.spans import Span, spans_of
    >>> spans_of(5, rows=2)
    (Span(slot=0, start=5, rows=2, source=None),)
    >>> spans_of((Span(1, 0, 3), Span(0, 9, 1, source=2)), rows=4)[1]
    Span(slot=0, start=9, rows=1, source=2)
    >>> BatchOptions().prefill_chunk, BatchOptions(slots=4).slots
    (64, 4)
    >>> spans_of((Span(1, 0, 3),), rows=4)
    Traceback (most recent call last):
    ...
    ValueError: spans hold 3 rows, the tensor 4
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

MAX_SLOTS = 8
"""Most sessions a device holds at once (a request's slot travels as one byte; 8 covers what a
board cluster serves at once: a round's cost hardly grows up to 8 rows, docs/BENCHMARKS.md)."""


class Span(NamedTuple):
    """Consecutive rows of one session in a pass."""

    slot: int
    """The session slot (KV cache) they belong to."""
    start: int
    """Position of the first row in that session."""
    rows: int
    """How many rows."""
    source: int | None = None
    """A slot whose KV rows at positions 0..start-1 this slot takes first (copied before the rows
    attend); None: its own rows are already there."""


def spans_of(at, rows: int) -> tuple[Span, ...]:
    """`at` as spans: an int is one span in slot 0 from that position; spans are checked to cover
    exactly `rows` rows."""
    if isinstance(at, (int, np.integer)):
        return (Span(0, int(at), rows),)
    spans = tuple(at)
    if sum(s.rows for s in spans) != rows:
        raise ValueError(f"spans hold {sum(s.rows for s in spans)} rows, the tensor {rows}")
    return spans


@dataclass(frozen=True)
class BatchOptions:
    """How `serve` shares passes among requests."""

    slots: int = 0
    """Sessions served at once (each a KV cache on every device); 0: as many as the plan's memory
    budget allows (`inspect` shows them), up to 8."""
    prefill_chunk: int = 64
    """Prompt tokens a request feeds per pass: a long prompt joins the running batch in chunks,
    so decoding requests are not stalled for its whole prefill."""

    def __post_init__(self):
        if not 0 <= self.slots <= MAX_SLOTS:
            raise ValueError(f"--slots must be in 0..{MAX_SLOTS}, got {self.slots}")
        if self.prefill_chunk < 1:
            raise ValueError(f"--prefill-chunk must be at least 1, got {self.prefill_chunk}")
