"""A tiny byte-level BPE tokenizer.json made inside the test suite, so fast tests need no real model.

Shaped like SmolLM2's (special tokens first with BOS <|im_start|> = 1 and EOS <|im_end|> = 2, a
Digits + ByteLevel pre-tokenizer, a ByteLevel decoder, no normalizer) but with a few hundred merges
learnt from the short text below. Both the runtime's pure-Python Tokenizer and transformers'
PreTrainedTokenizerFast load it. `tokenizers`' BPE trainer breaks ties by pair ids, so the same
text and vocabulary size give the same bytes in every process (tests/test_tokenizer.py checks this).

    >>> data = json.loads(tiny_tokenizer_json(300))
    >>> len(data["model"]["vocab"]), data["added_tokens"][1]["content"]     # specials are in the vocab too
    (300, '<|im_start|>')
"""
from __future__ import annotations

import json

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
"""Ids 0, 1, 2 as in SmolLM2: unknown/padding, BOS and chat turn start, EOS and chat turn end."""
VOCAB_SIZE = 512
"""The tiny models' vocabulary: 3 special tokens, 256 bytes and 253 merges."""

# Plain prose (some digits and punctuation) so the merges are English-like: the calibration text
# then tokenises to roughly two or three characters a token, as the compiler's budget expects.
TEXT = """\
The capital of France is Paris, and the capital of Italy is Rome. A small cluster of boards can run a
language model together when each board holds a part of every layer. The coordinator keeps the
embedding and the output head; the other devices hold groups of attention heads and groups of
neurons of the feed-forward network. For every token the coordinator sends the hidden state to the
devices, and each device sends back its partial result, which the coordinator adds to the residual.

Some parts of the model matter more than others. The compiler measures how much each group of
neurons contributes on calibration text, and the most important groups are marked critical: the
coordinator always waits for them. The other groups are relaxed: when a packet is lost on a wireless
link, the coordinator does not wait for a second try but uses a cheap estimate of the missing part.
This keeps the time per token steady on a lossy network, and the text stays close to what the full
model would have written.

There are 4 devices in the test cluster, with 2 GB, 4 GB or 8 GB of memory each. At 5% loss a
strict exchange waits about 120 ms for a retransmission, while a relaxed one waits at most 30 ms.
In 2024 the board cost 80 dollars; 3 of them cost 240 dollars, and the network switch cost 25.
The numbers 0 1 2 3 4 5 6 7 8 9 appear here so that every digit is seen at least once or twice.

Once upon a time there was a little robot who lived in a workshop by the sea. Every morning the
robot opened the window, looked at the boats and the birds, and counted the waves. One day the
robot found a book about the stars and read it from the first page to the last. Then the robot
built a telescope from old parts, and at night it watched the moon rise over the water. The other
machines in the workshop asked what it was doing, and the robot said that it was learning about
the world, because there is always something new to learn when you look carefully.

"What is a Raspberry Pi?" asked the user. "It is a small computer on a single board," said the
assistant, "and it is often used for teaching, for home projects and for small servers."
"""


def tiny_tokenizer_json(vocab_size: int = VOCAB_SIZE, text: str = TEXT) -> str:
    """tokenizer.json text of a byte-level BPE with SPECIAL_TOKENS and vocab_size ids in all."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"vocab_size {vocab_size}: needs room for {len(SPECIAL_TOKENS)} specials and 256 bytes")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, show_progress=False,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text], trainer=trainer)
    if tok.get_vocab_size() != vocab_size:  # the text ran out of pairs to merge
        raise ValueError(f"vocab_size {vocab_size}: the text yields only {tok.get_vocab_size()} ids")
    # indent: one token per line, so a diff between two builds reads well
    return json.dumps(json.loads(tok.to_str()), ensure_ascii=False, indent=1) + "\n"


def write_tiny_tokenizer(path, vocab_size: int = VOCAB_SIZE) -> None:
    """Write tiny_tokenizer_json(vocab_size) to path (UTF-8)."""
    from pathlib import Path

    Path(path).write_text(tiny_tokenizer_json(vocab_size), encoding="utf-8")
