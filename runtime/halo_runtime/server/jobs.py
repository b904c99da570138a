"""What a request asks of the engine and what comes back: `Work` in, then `Piece`s (one per
token) and a `Finished` or `Failed`, through the `Job`'s `deliver` callback (the HTTP side hands
one that wakes its event loop; `server.engine` runs the work).

Example:
    >>> from halo_runtime.server.jobs import Job, Work, Failed
    >>> got = []
    >>> job = Job(Work(prompt=(1, 2), max_tokens=4), got.append)
    >>> job.cancel(); job.cancelled.is_set()
    True
    >>> job.fail(503, "device dev2 stopped answering", "device_lost"); got
    [Failed(status=503, message='device dev2 stopped answering', code='device_lost')]
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable

from ..core.sampling import SamplingParams


@dataclass(frozen=True)
class Work:
    """One generation to run."""

    prompt: tuple[int, ...]
    """Prompt token ids (chat template applied)."""
    max_tokens: int
    """Most tokens to generate."""
    sampling: SamplingParams = SamplingParams()
    """How tokens are chosen (greedy by default)."""
    stop: tuple[str, ...] = ()
    """Strings that end the reply."""
    ignore_eos: bool = False
    """Do not stop at the end-of-sequence token."""

    def __post_init__(self):
        if not self.prompt or self.max_tokens < 1:
            raise ValueError("a generation needs a prompt and max_tokens >= 1")


@dataclass(frozen=True)
class Piece:
    """Text that became final after a token (may be empty), with that token's statistics."""

    text: str
    """New text (stop strings and incomplete characters held back)."""
    step: int
    """Index of the token in the reply."""
    token_ms: float | None
    """Time the token took (the first one includes the prompt); None for text held back until the end."""
    compensated: int
    """Relaxed parts compensated on this token, all devices."""


@dataclass(frozen=True)
class Finished:
    """The reply ended normally."""

    reason: str
    """OpenAI's finish_reason: "stop" (end token or stop string) or "length"."""
    prompt_tokens: int
    """Tokens in the prompt."""
    completion_tokens: int
    """Tokens generated (the end token included)."""
    summary: dict = field(default_factory=dict)
    """ttft_ms, tpot_ms_p50, compensated_share, tokens_per_s."""
    cached_tokens: int = 0
    """Prompt tokens the devices held from the conversation's earlier request (not computed again)."""


@dataclass(frozen=True)
class Failed:
    """The reply could not be produced."""

    status: int
    """HTTP status (503: a device holding critical groups is lost; 500: a bug)."""
    message: str
    """One line naming what failed."""
    code: str
    """OpenAI error code."""


class Job:
    """A queued generation and the way back to its client."""

    def __init__(self, work: Work, deliver: Callable[[object], None]):
        self.work, self.deliver = work, deliver
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        """The client went away: stop before the next token (or never start)."""
        self.cancelled.set()

    def fail(self, status: int, message: str, code: str) -> None:
        self.deliver(Failed(status, message, code))
