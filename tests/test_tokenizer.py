"""The pure-Python byte-level BPE tokenizer gives the same ids as HF `tokenizers`."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from halo_runtime.core.tokenizer import Tokenizer
from tinytok import VOCAB_SIZE, tiny_tokenizer_json, write_tiny_tokenizer

CASES = [
    "12345 3.14",
    "x  12 ab1c 1,000,000 ²½Ⅳ ٣٤",
    "Café naïve façade — Ærøskøbing, 東京の日本語テキスト, 😀👍🏽🇺🇸 done",
    "a   b\n\n\n  c\t\td  \n",
    "   leading spaces",
    " ",
    "",
    "<|im_start|>user\nhi<|im_end|>",
    "x<|im_end|><|im_end|>y <|endoftext|> <|im_start",
    "it's don't I'M we'll 'd",
    "\u0301a\u0301 \u00a0nbsp\u3000ideographic\u2009thin \x1c\x1e",
    "def __init__(self):\n    return {'a': [1, 2]}  # ok",
]


# the suite's own tiny tokenizer (tests/tinytok.py) in the fast suite; SmolLM2's where slow tests run
@pytest.fixture(scope="module", params=["tiny", pytest.param("smollm2", marks=pytest.mark.slow)])
def tokenizer_file(request, tmp_path_factory):
    if request.param == "smollm2":
        return request.getfixturevalue("builtin_model").tokenizer_file
    path = tmp_path_factory.mktemp("tiny-tokenizer") / "tokenizer.json"
    write_tiny_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def smollm2_tokenizer_file(builtin_model):
    return builtin_model.tokenizer_file


@pytest.fixture(scope="module")
def hf_tokenizer(tokenizer_file):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file))


@pytest.fixture(scope="module")
def ours(tokenizer_file):
    return Tokenizer.from_file(tokenizer_file)


@pytest.mark.parametrize("text", CASES)
def test_matches_hf(ours, hf_tokenizer, text):
    ids = ours.encode(text)
    assert ids == hf_tokenizer.encode(text, add_special_tokens=False)
    assert ours.decode(ids) == text


def test_matches_hf_on_calibration_text(ours, hf_tokenizer):
    """The compiler tokenises the built-in Wikipedia text with transformers; the runtime's own
    tokenizer reads the same ids."""
    from halo_compile.calib import calibration_text

    text = calibration_text()[:20000]
    ids = ours.encode(text)
    assert ids == hf_tokenizer.encode(text, add_special_tokens=False)
    assert ours.decode(ids) == text and len(ids) > 3000


@pytest.mark.slow
def test_bytes_missing_from_vocab_are_dropped_like_hf(smollm2_tokenizer_file):
    # SmolLM2's vocabulary lacks a few byte tokens (0x1D, 0xC0, ...); `tokenizers` drops them silently.
    from transformers import PreTrainedTokenizerFast

    ours, hf_tokenizer = (Tokenizer.from_file(smollm2_tokenizer_file),
                          PreTrainedTokenizerFast(tokenizer_file=str(smollm2_tokenizer_file)))
    text = "a\x1db \x04"
    assert ours.encode(text) == hf_tokenizer.encode(text, add_special_tokens=False)
    assert ours.decode(ours.encode(text)) == "ab "


def test_special_tokens(ours, hf_tokenizer):
    ids = ours.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert ours.decode(ids, skip_special=True) == "user\nhi"
    assert ours.decode(ids, skip_special=True) == hf_tokenizer.decode(ids, skip_special_tokens=True)
    assert ours.vocab_size == len(hf_tokenizer) in (VOCAB_SIZE, 49152)


@pytest.mark.slow
def test_digits_split_like_original_smollm2(smollm2_tokenizer_file):
    # The GGUF names its pre-tokenizer "smollm" (digits one by one); the converted file must say so.
    pre = json.loads(smollm2_tokenizer_file.read_text(encoding="utf-8"))["pre_tokenizer"]
    assert pre["type"] == "Sequence" and pre["pretokenizers"][0] == {"type": "Digits", "individual_digits": True}


def test_llama3_style_split_pretokenizer(tokenizer_file, tmp_path):
    """Llama 3 tokenizers split with their own regex first; same vocabulary, different pre-tokenizer."""
    from tokenizers import Tokenizer as HFTokenizer

    data = json.loads(tokenizer_file.read_text(encoding="utf-8"))
    pattern = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    data["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    ours, theirs = Tokenizer.from_file(path), HFTokenizer.from_file(str(path))
    for text in CASES + ["IT'S 1234567 x\r\n\r\n  y  "]:
        assert ours.encode(text) == theirs.encode(text).ids, text


def test_unsupported_tokenizers_rejected(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps({"model": {"type": "WordPiece", "vocab": {}}}))
    with pytest.raises(ValueError, match="unsupported tokenizer model 'WordPiece'"):
        Tokenizer.from_file(path)
    path.write_text(json.dumps({"model": {"type": "BPE", "vocab": {}, "merges": []},
                                "pre_tokenizer": {"type": "Metaspace", "replacement": "▁"}}))
    with pytest.raises(ValueError, match="unsupported pre-tokenizer 'Metaspace'"):
        Tokenizer.from_file(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="unreadable tokenizer.json"):
        Tokenizer.from_file(path)


def test_tiny_handmade_bpe(tmp_path):
    """Merge order decides the split; no real model needed."""
    vocab = {c: i for i, c in enumerate(["a", "b", "c", "Ġ", "ab", "abc", "Ġa"])}
    data = {"model": {"type": "BPE", "vocab": vocab, "merges": ["a b", ["ab", "c"], "Ġ a"]},
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True},
            "added_tokens": [{"id": 7, "content": "<s>", "special": True}]}
    tok = Tokenizer(data)
    ids = [5, 3, 5, 4, 3, 4, 6, 2, 7]  # " ab": a+b outranks Ġ+a; " ac": only Ġ+a applies
    assert tok.encode("abc abcab ab ac<s>") == ids
    assert tok.decode(ids) == "abc abcab ab ac<s>"
    assert tok.decode([5, 7], skip_special=True) == "abc"


def test_tiny_tokenizer_is_built_byte_identically_in_another_process():
    """The fast suite's tokenizer.json is trained at test time: the same bytes in every process
    (hash seeds differ between processes; `tokenizers` must not let them reach the merges)."""
    code = "import sys; sys.stdout.write(__import__('tinytok').tiny_tokenizer_json())"
    env = {**os.environ, "PYTHONHASHSEED": "random", "PYTHONPATH": str(Path(__file__).parent)}
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env,
                           encoding="utf-8").stdout
    assert other == tiny_tokenizer_json()
    data = json.loads(other)
    assert len(data["model"]["vocab"]) == VOCAB_SIZE and len(data["model"]["merges"]) == VOCAB_SIZE - 3 - 256
    assert data["pre_tokenizer"]["pretokenizers"][0] == {"type": "Digits", "individual_digits": True}
