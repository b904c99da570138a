"""Generated tokens to text, piece by piece, with stop strings.

A streamed reply must never show text it later takes back. Two things can: a token that ends
inside a multi-byte UTF-8 character (the decoder shows one U+FFFD until a later token completes
it, or makes it invalid for good), and text that may be the start of a stop string (a reply must
not show "\\n\\nUs" and then stop at "\\n\\nUser:"). `TextStream.push` therefore returns only
text that is final, holding back such tails until they resolve; a stop string ends the stream
and is not part of the text. Decoding the whole reply each time keeps byte-level BPE exact (a
token's text depends on the bytes before it); replies are at most the plan's context, so this
stays well under a millisecond.

Example:
    >>> from halo_runtime.core.textstream import TextStream
    >>> pieces = {1: "Hel", 2: "lo", 3: "\\n", 4: "Us", 5: "er: hi"}
    >>> s = TextStream(lambda ids: "".join(pieces[i] for i in ids), stop=["\\nUser:"])
    >>> [s.push(t) for t in (1, 2, 3, 4)]                  # "\\nUs" may start the stop string
    ['Hel', 'lo', '', '']
    >>> s.push(5), s.stopped, s.text
    ('', True, 'Hello')
"""
from __future__ import annotations

from typing import Callable, Sequence

REPLACEMENT = "\ufffd"


class TextStream:
    """Text deltas of a growing list of tokens; `stopped` once a stop string appeared."""

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()):
        """decode: token ids -> text (special tokens skipped); stop: strings that end the reply."""
        self.decode = decode
        self.stop = tuple(s for s in stop if s)
        self.tokens: list[int] = []
        self.text = ""
        """Text returned so far."""
        self.stopped = False

    def push(self, token: int) -> str:
        """Add a token; returns the text that became final (possibly "")."""
        if self.stopped:
            return ""
        self.tokens.append(token)
        full = self.decode(self.tokens)
        done = len(self.text)
        hits = [i for i in (full.find(s, max(0, done - len(s) + 1)) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            return self._emit(full, max(done, min(hits)))
        # an incomplete character at the end decodes to exactly one U+FFFD (Python replaces a maximal
        # valid prefix as one); hold that one back. Earlier ones are invalid bytes for good.
        end = len(full) - full.endswith(REPLACEMENT)
        end -= max((k for s in self.stop for k in range(1, len(s)) if full[:end].endswith(s[:k])), default=0)
        return self._emit(full, max(done, end))

    def flush(self) -> str:
        """The text held back, once no token follows (unless a stop string ended the stream)."""
        if self.stopped or not self.tokens:
            return ""
        full = self.decode(self.tokens)
        return self._emit(full, len(full))

    def _emit(self, full: str, end: int) -> str:
        delta = full[len(self.text):end]
        self.text += delta
        return delta
