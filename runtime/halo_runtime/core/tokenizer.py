"""Byte-level BPE tokenizer reading an HF tokenizer.json, in pure Python (stdlib only).

Devices must not need transformers or the `tokenizers` package, so this re-implements the subset
that GPT-2-style LLaMA tokenizers (SmolLM2, Llama 3) use: added/special tokens matched literally,
pre-tokenizers ByteLevel, Digits and Split (regex), byte-level BPE, and the ByteLevel decoder.
Token ids equal those of `tokenizers` (the tests compare them on real text).

Example (a toy vocabulary; a plan's tokenizer.json is read with `Tokenizer.from_file`):
    >>> from halo_runtime.core.tokenizer import Tokenizer
    >>> vocab = {c: i for i, c in enumerate(["h", "i", "Ġ", "Ċ", "hi", "Ġhi"], start=2)}
    >>> tok = Tokenizer({"model": {"type": "BPE", "vocab": vocab, "merges": ["h i", "Ġ hi"]},
    ...                  "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False},
    ...                  "added_tokens": [{"id": 0, "content": "<s>", "special": True},
    ...                                   {"id": 1, "content": "</s>", "special": True}]})
    >>> ids = tok.encode("<s>hi hi\\n</s>")     # ByteLevel: " " is "Ġ", "\\n" is "Ċ"
    >>> ids, tok.decode(ids, skip_special=True)
    ([0, 6, 7, 5, 1], 'hi hi\\n')
"""
from __future__ import annotations

import json
import re
import unicodedata
from functools import lru_cache
from pathlib import Path

# The GPT-2 split pattern, as `tokenizers` runs it (with Oniguruma's Unicode classes).
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# Oniguruma's \s is Unicode White_Space; Python's \s also matches U+001C..U+001F, so spell it out.
_SPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"


@lru_cache(maxsize=None)
def _category_class(prefix: str) -> str:
    """Regex class body (no brackets) of all code points whose general category starts with prefix."""
    parts, start = [], None
    for cp in range(0x110001):
        inside = cp < 0x110000 and unicodedata.category(chr(cp)).startswith(prefix)
        if inside and start is None:
            start = cp
        elif not inside and start is not None:
            lo, hi = re.escape(chr(start)), re.escape(chr(cp - 1))
            parts.append(lo if start == cp - 1 else f"{lo}-{hi}")
            start = None
    return "".join(parts)


def translate_pattern(pattern: str) -> re.Pattern:
    """Compile an Oniguruma-style pattern with stdlib re: \\p{L}, \\p{N}, \\s, \\S become explicit classes."""
    bodies = {"L": _category_class("L"), "N": _category_class("N")}
    out, i, in_class = [], 0, False
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern):
            nxt = pattern[i + 1]
            m = re.match(r"\\[pP]\{(\w+)\}", pattern[i:])
            if m:
                key = m.group(1)[0]
                if key not in bodies or m.group(0)[1] == "P" and in_class:
                    raise ValueError(f"tokenizer.json: unsupported regex class {m.group(0)}")
                body = bodies[key]
                neg = m.group(0)[1] == "P"
                out.append(body if in_class else f"[{'^' if neg else ''}{body}]")
                i += len(m.group(0))
                continue
            if nxt in "sS":
                if in_class and nxt == "S":
                    raise ValueError("tokenizer.json: unsupported regex: \\S inside a character class")
                out.append(_SPACE if in_class else f"[{'^' if nxt == 'S' else ''}{_SPACE}]")
            else:
                out.append(pattern[i:i + 2])
            i += 2
            continue
        if c == "[" and not in_class:
            in_class = True
            out.append(c)
            # A ']' right after '[' or '[^' is a literal, not the end of the class.
            for lead in ("^", "]"):
                if pattern.startswith(lead, i + 1):
                    out.append(lead)
                    i += 1
        elif c == "]" and in_class:
            in_class = False
            out.append(c)
        else:
            out.append(c)
        i += 1
    return re.compile("".join(out))


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_CHAR = _bytes_to_unicode()
_CHAR_BYTE = {c: b for b, c in _BYTE_CHAR.items()}


def _split(pieces: list[str], regex: re.Pattern, behavior: str = "Isolated") -> list[str]:
    """Split every piece on regex matches; Isolated keeps matches as pieces, Removed drops them."""
    out = []
    for piece in pieces:
        pos = 0
        for m in regex.finditer(piece):
            if m.start() == m.end():
                continue
            if m.start() > pos:
                out.append(piece[pos:m.start()])
            if behavior == "Isolated":
                out.append(m.group())
            pos = m.end()
        if pos < len(piece):
            out.append(piece[pos:])
    return out


class Tokenizer:
    """Encode/decode with the byte-level BPE described by an HF tokenizer.json."""

    def __init__(self, data: dict, source: str = "tokenizer.json"):
        model = data.get("model") or {}
        if model.get("type") != "BPE":
            raise ValueError(f"{source}: unsupported tokenizer model {model.get('type')!r} (only byte-level BPE)")
        if data.get("normalizer") is not None:
            raise ValueError(f"{source}: unsupported normalizer {data['normalizer'].get('type')!r} "
                             "(only byte-level BPE without a normalizer)")
        if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
            raise ValueError(f"{source}: unsupported BPE subword prefix/suffix")
        self.source = source
        self.vocab: dict[str, int] = dict(model["vocab"])
        merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
        self.ranks = {pair: r for r, pair in enumerate(merges)}
        self.ignore_merges = bool(model.get("ignore_merges"))
        self.steps = self._pre_tokenizer_steps(data.get("pre_tokenizer"))
        if not any(s[0] == "bytelevel" for s in self.steps):
            raise ValueError(f"{source}: unsupported pre-tokenizer (no ByteLevel step; only byte-level BPE)")
        self.added = {t["content"]: t["id"] for t in data.get("added_tokens", [])}
        self.special_ids = {t["id"] for t in data.get("added_tokens", []) if t.get("special")}
        self.id_to_token = {i: t for t, i in self.vocab.items()}
        self.id_to_token.update({i: t for t, i in self.added.items()})
        # Longest first, so the alternation finds the leftmost-longest added token as `tokenizers` does.
        contents = sorted(self.added, key=len, reverse=True)
        self.added_re = re.compile("|".join(map(re.escape, contents))) if contents else None
        self._bpe = lru_cache(maxsize=1 << 16)(self._bpe_uncached)

    @classmethod
    def from_file(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: unreadable tokenizer.json ({e})") from None
        return cls(data, source=str(path))

    def _pre_tokenizer_steps(self, pre: dict | None) -> list[tuple]:
        if pre is None:
            raise ValueError(f"{self.source}: unsupported pre-tokenizer None (only byte-level BPE)")
        kind = pre.get("type")
        if kind == "Sequence":
            return [s for p in pre["pretokenizers"] for s in self._pre_tokenizer_steps(p)]
        if kind == "ByteLevel":
            regex = translate_pattern(GPT2_PATTERN) if pre.get("use_regex", True) else None
            return [("bytelevel", regex, bool(pre.get("add_prefix_space")))]
        if kind == "Digits":
            n = _category_class("N")
            return [("split", re.compile(f"[{n}]" if pre.get("individual_digits") else f"[{n}]+"), "Isolated")]
        if kind == "Split" and pre.get("behavior") in ("Isolated", "Removed") and not pre.get("invert"):
            pat = pre["pattern"]
            regex = translate_pattern(pat["Regex"]) if "Regex" in pat else re.compile(re.escape(pat["String"]))
            return [("split", regex, pre["behavior"])]
        raise ValueError(f"{self.source}: unsupported pre-tokenizer {kind!r} "
                         f"{json.dumps(pre)[:80]} (supported: ByteLevel, Digits, Split, Sequence)")

    def _words(self, text: str) -> list[str]:
        """Pre-tokenize a stretch of ordinary text into byte-level words."""
        pieces = [text]
        for step in self.steps:
            if step[0] == "split":
                pieces = _split(pieces, step[1], step[2])
            else:
                _, regex, prefix = step
                if prefix and pieces and not pieces[0].startswith(" "):
                    pieces[0] = " " + pieces[0]
                if regex is not None:
                    pieces = [w for p in pieces for w in regex.findall(p)]
                pieces = ["".join(_BYTE_CHAR[b] for b in p.encode("utf-8")) for p in pieces]
        return pieces

    def _bpe_uncached(self, word: str) -> tuple[int, ...]:
        if self.ignore_merges and word in self.vocab:
            return (self.vocab[word],)
        # Like `tokenizers` without an unk token, characters outside the vocabulary are dropped
        # (some bytes never occur in UTF-8, e.g. 0xC0, and a vocabulary may omit them).
        parts = [c for c in word if c in self.vocab]
        ranks = self.ranks
        while len(parts) > 1:
            best, best_rank = None, None
            for i in range(len(parts) - 1):
                r = ranks.get((parts[i], parts[i + 1]))
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = i, r
            if best is None:
                break
            a, b = parts[best], parts[best + 1]
            merged, i = [], 0
            # Merge every occurrence left to right, as a priority queue keyed by (rank, position) would.
            while i < len(parts):
                if i < len(parts) - 1 and parts[i] == a and parts[i + 1] == b:
                    merged.append(a + b)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return tuple(self.vocab[p] for p in parts)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no BOS is added; special tokens written literally become their ids."""
        ids: list[int] = []
        pos = 0
        matches = self.added_re.finditer(text) if self.added_re is not None else ()
        for m in matches:
            if m.start() > pos:
                ids.extend(i for w in self._words(text[pos:m.start()]) for i in self._bpe(w))
            ids.append(self.added[m.group()])
            pos = m.end()
        if pos < len(text):
            ids.extend(i for w in self._words(text[pos:]) for i in self._bpe(w))
        return ids

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        """Text of `ids`; bytes that do not form valid UTF-8 become U+FFFD."""
        out = bytearray()
        for i in ids:
            i = int(i)
            if skip_special and i in self.special_ids:
                continue
            token = self.id_to_token.get(i)
            if token is None:
                raise ValueError(f"token id {i} outside the vocabulary of {self.source}")
            try:
                out += bytes(_CHAR_BYTE[c] for c in token)
            except KeyError:  # e.g. an added token with characters outside the byte map
                out += token.encode("utf-8")
        return out.decode("utf-8", errors="replace")

    @property
    def vocab_size(self) -> int:
        return max(self.id_to_token) + 1
