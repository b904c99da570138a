"""Calibration and evaluation text: Wikipedia articles shipped with gensim, stripped to prose.

gensim ships a shortened English Wikipedia dump (CC BY-SA) among its test data. We read that file
(never `import gensim`: it needs scipy), drop redirects and stubs, strip wiki markup, and split by
article: the first half calibrates, the second half evaluates, so no sentence is in both.

Example:
    >>> from halo_compile.calib import calibration_articles, evaluation_articles, token_chunks
    >>> len(calibration_articles()) + len(evaluation_articles()) > 80
    True
    >>> [len(c) for c in token_chunks(list(range(100)), chunk_len=40, max_tokens=100)]
    [40, 40, 20]
"""
from __future__ import annotations

import bz2
import html
import importlib.util
import re
import xml.etree.ElementTree as ET
from functools import lru_cache
from pathlib import Path

WIKI_FILE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
MIN_ARTICLE_CHARS = 500
"""Articles shorter than this after stripping are stubs or lists, not prose."""
MIN_TAIL_TOKENS = 16
"""A last partial chunk shorter than this is dropped: too little context to measure anything."""
# Sections after these headings are link lists and citations, not prose.
_TAIL_SECTIONS = ("see also", "references", "external links", "further reading", "notes",
                  "bibliography", "sources", "footnotes", "citations", "notes and references")
_DROP_TAGS = ("ref", "gallery", "math", "timeline", "imagemap", "score", "syntaxhighlight", "source",
              "chem", "hiero", "graph", "mapframe", "references")
_DROP_LINK_PREFIXES = ("file:", "image:", "category:", "media:", "wikipedia:", "wp:", "wikt:", "template:",
                       "help:", "portal:", "special:", "user:")

# Disambiguation pages are lists of links, not prose.
_DISAMBIGUATION = re.compile(r"\{\{\s*(disambig\w*|dab|hndis|geodis)\s*[|}]", re.I)


class CalibError(Exception):
    """Unusable text input; the message is one line naming the file."""


def wiki_dump_path() -> Path:
    """The bz2 Wikipedia dump inside the installed gensim package."""
    spec = importlib.util.find_spec("gensim")  # locate only: importing gensim needs scipy
    if spec is None or not spec.submodule_search_locations:
        raise CalibError("gensim is not installed (pip install --no-deps gensim); it ships the calibration text")
    path = Path(spec.submodule_search_locations[0]) / WIKI_FILE
    if not path.is_file():
        raise CalibError(f"{path}: missing from the installed gensim package")
    return path


def _drop_balanced(text: str, open_: str, close: str) -> str:
    """Remove every balanced open_ ... close span (nesting allowed) and any unmatched delimiter."""
    spans, stack = [], []
    for m in re.finditer(re.escape(open_) + "|" + re.escape(close), text):
        if m.group() == open_:
            stack.append(m.start())
        elif stack:
            start = stack.pop()
            if not stack:
                spans.append((start, m.end()))
        else:
            spans.append((m.start(), m.end()))
    if stack:  # unclosed: keep what follows, drop the delimiters themselves
        inner = _drop_balanced(text[stack[0] + len(open_):], open_, close)
        return _drop_balanced(text[:stack[0]], open_, close) + inner
    out, pos = [], 0
    for start, end in spans:
        out.append(text[pos:start])
        pos = end
    out.append(text[pos:])
    return "".join(out)


def _link_text(m: re.Match) -> str:
    target, _, label = m.group(1).partition("|")
    t = target.strip().lower()
    if t.startswith(_DROP_LINK_PREFIXES) or re.match(r"^:?[a-z]{2,3}(-[a-z]+)?:", t):
        return ""  # files, categories, interwiki and namespace links carry no prose
    return label.split("|")[-1].strip() if label else target.strip().lstrip(":")


def strip_markup(wikitext: str) -> str:
    """Plain prose from MediaWiki markup: no templates, tables, refs, tags or link syntax."""
    t = re.sub(r"<!--.*?(-->|$)", "", wikitext, flags=re.S)
    tags = "|".join(_DROP_TAGS)
    t = re.sub(rf"<({tags})\b[^>]*/>", "", t, flags=re.I)
    t = re.sub(rf"<({tags})\b[^>]*>.*?</\1\s*>", "", t, flags=re.I | re.S)
    t = re.sub(r"\{\{\s*(?:lang|nowrap|transl|small|nobr)(?:-\w+)?\s*\|(?:[^{}|]*\|)*([^{}|]*)\}\}", r"\1", t,
               flags=re.I)  # templates whose last argument is running text
    t = re.sub(r"\{\{\s*convert\s*\|\s*([\d.,]+)\s*\|\s*([^{}|]*)[^{}]*\}\}", r"\1 \2", t, flags=re.I)
    t = _drop_balanced(t, "{{", "}}")
    t = _drop_balanced(t, "{|", "|}")
    t = re.sub(r"</?[a-zA-Z][^<>]*>", "", t)  # remaining tags: keep their content
    while True:  # innermost links first, so captions with links inside File: links resolve
        t, n = re.subn(r"\[\[([^\[\]]*)\]\]", _link_text, t)
        if not n:
            break
    t = _drop_balanced(t, "[[", "]]")  # File: captions holding stray brackets; no prose lost
    t = re.sub(r"\[(?:https?:)?//[^\s\]]+\s*([^\]]*)\]", r"\1", t)
    t = re.sub(r"'{2,}", "", t)
    t = re.sub(r"__[A-Z]+__", "", t)
    t = html.unescape(t).replace("\xa0", " ")
    lines = []
    for line in t.split("\n"):
        heading = re.match(r"^(=+)\s*(.*?)\s*\1\s*$", line)
        if heading:
            if heading.group(2).lower() in _TAIL_SECTIONS:
                break
            line = heading.group(2)
        line = re.sub(r"^[*#:;]+\s*", "", line)
        line = re.sub(r"[ \t]+", " ", line).strip()
        if line.startswith(("|", "!")):  # rows of a table whose opener was lost
            continue
        lines.append(line)
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
    text = re.sub(r"\(\s*[,;]?\s*\)", "", text)  # "( )" left where a template stood
    return re.sub(r" +([,.;:])", r"\1", text)


@lru_cache(maxsize=1)
def _articles(path: str) -> tuple[str, ...]:
    out = []
    with bz2.open(path, "rb") as f:
        for _, elem in ET.iterparse(f, events=("end",)):
            if not elem.tag.endswith("}page"):
                continue
            ns = elem.findtext("{*}ns")
            text = elem.findtext("{*}revision/{*}text") or ""
            redirect = elem.find("{*}redirect") is not None or text.lstrip().upper().startswith("#REDIRECT")
            if ns == "0" and not redirect and not _DISAMBIGUATION.search(text):
                title = (elem.findtext("{*}title") or "").strip()
                body = strip_markup(text)
                if len(body) >= MIN_ARTICLE_CHARS:
                    out.append(f"{title}\n\n{body}" if title else body)
            elem.clear()  # iterparse keeps the whole tree otherwise
    return tuple(out)


def wiki_articles() -> list[str]:
    """All usable articles (title, blank line, prose) in dump order."""
    return list(_articles(str(wiki_dump_path())))


def calibration_articles() -> list[str]:
    """First half of the articles: the text the compiler profiles and trains on."""
    arts = wiki_articles()
    return arts[: len(arts) // 2]


def evaluation_articles() -> list[str]:
    """Second half of the articles: held out for perplexity."""
    arts = wiki_articles()
    return arts[len(arts) // 2:]


def calibration_text() -> str:
    return "\n\n".join(calibration_articles())


def evaluation_text() -> str:
    return "\n\n".join(evaluation_articles())


def read_text_file(path: str | Path) -> str:
    """UTF-8 text of a user-supplied calibration file; raises CalibError naming the file."""
    p = Path(path)
    if not p.exists():
        raise CalibError(f"{p}: no such file")
    if not p.is_file():
        raise CalibError(f"{p}: not a regular file")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise CalibError(f"{p}: not UTF-8 text (bad byte at offset {e.start})") from None
    except OSError as e:
        raise CalibError(f"{p}: unreadable ({e.strerror})") from None
    if not text.strip():
        raise CalibError(f"{p}: empty file")
    return text


def token_chunks(token_ids: list[int], chunk_len: int, max_tokens: int) -> list[list[int]]:
    """Consecutive non-overlapping chunks of chunk_len tokens, at most max_tokens in all.

    The last, shorter chunk is kept only if it holds at least MIN_TAIL_TOKENS tokens.
    """
    if chunk_len <= 0 or max_tokens < 0:
        raise ValueError(f"token_chunks: chunk_len must be positive and max_tokens >= 0, "
                         f"got {chunk_len}, {max_tokens}")
    ids = list(token_ids[:max_tokens])
    chunks = [ids[i:i + chunk_len] for i in range(0, len(ids), chunk_len)]
    if chunks and len(chunks[-1]) < chunk_len and len(chunks[-1]) < MIN_TAIL_TOKENS:
        chunks.pop()
    return chunks
