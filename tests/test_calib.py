"""Calibration/evaluation text from gensim's Wikipedia sample, and token chunking."""
from __future__ import annotations

import re

import pytest

from halo_compile.calib import (
    CalibError,
    calibration_articles,
    calibration_text,
    evaluation_articles,
    evaluation_text,
    read_text_file,
    strip_markup,
    token_chunks,
    wiki_articles,
)


def test_articles_plausible_and_deterministic():
    arts = wiki_articles()
    assert 80 <= len(arts) <= 110
    assert arts == wiki_articles()
    assert all(len(a) >= 500 for a in arts)
    assert arts[0].startswith("Anarchism\n\n")
    assert not any("(disambiguation)" in a.split("\n", 1)[0] for a in arts)


def test_halves_disjoint_and_cover_everything():
    cal, ev = calibration_articles(), evaluation_articles()
    assert cal + ev == wiki_articles() and abs(len(cal) - len(ev)) <= 1
    assert not set(cal) & set(ev)
    assert calibration_text() == "\n\n".join(cal) and evaluation_text() == "\n\n".join(ev)


def test_no_markup_left():
    text = calibration_text() + evaluation_text()
    for leftover in ("{{", "}}", "[[", "]]", "{|", "|}", "<ref", "</", "<!--", "'''", "''", "&nbsp;",
                     "&amp;", "thumb|", "Category:", "__NOTOC__"):
        assert leftover not in text, leftover
    assert not re.search(r"^=+.*=+$", text, flags=re.M)  # headings are plain lines
    assert "\n\n\n" not in text


def test_strip_markup_examples():
    wiki = ("{{Infobox|a={{nested|x}}|b=2}}'''Bold''' text with [[Target page|label]] and [[plain]]"
            "<ref name=x>cite {{cite web|url=u}}</ref> and {{lang|grc|ἀναρχία}}.<!-- hidden -->\n"
            "[[File:x.jpg|thumb|A [[cat]] on a mat]]\n{| class=wikitable\n|-\n| cell\n|}\n"
            "== History ==\n* item one\n[http://example.org Example site] ran 5&nbsp;km, {{convert|3|km|mi}}.\n"
            "[[Category:Things]][[de:Ding]]\n== References ==\nRef list")
    assert strip_markup(wiki) == ("Bold text with label and plain and ἀναρχία.\n\nHistory\nitem one\n"
                                  "Example site ran 5 km, 3 km.")


def test_token_chunks():
    ids = list(range(100))
    assert [len(c) for c in token_chunks(ids, 40, 1000)] == [40, 40, 20]
    assert token_chunks(ids, 40, 1000)[1] == list(range(40, 80))
    assert [len(c) for c in token_chunks(ids, 45, 1000)] == [45, 45]  # a 10-token tail is dropped
    assert [len(c) for c in token_chunks(ids, 30, 70)] == [30, 30]  # 70 tokens at most: tail of 10 dropped
    assert [len(c) for c in token_chunks(ids, 30, 76)] == [30, 30, 16]
    assert token_chunks(ids, 8, 20) == [list(range(8)), list(range(8, 16))]  # tail of 4 < 16
    assert token_chunks(ids, 8, 16) == [list(range(8)), list(range(8, 16))]
    assert token_chunks([], 8, 100) == [] and token_chunks(ids, 8, 0) == []
    with pytest.raises(ValueError):
        token_chunks(ids, 0, 10)


def test_read_text_file(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("héllo\n", encoding="utf-8")
    assert read_text_file(good) == "héllo\n"
    cases = {tmp_path / "missing.txt": "no such file", tmp_path: "not a regular file"}
    (tmp_path / "empty.txt").write_text("  \n")
    cases[tmp_path / "empty.txt"] = "empty file"
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    cases[tmp_path / "latin1.txt"] = "not UTF-8 text"
    for path, msg in cases.items():
        with pytest.raises(CalibError, match=re.escape(f"{path}: {msg}")) as e:
            read_text_file(path)
        assert "\n" not in str(e.value)
