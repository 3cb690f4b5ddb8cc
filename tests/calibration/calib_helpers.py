"""Helpers for the calibration tests: a tiny word-level tokenizer and fake documents (no network)."""

from __future__ import annotations

import re
from collections.abc import Iterable

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIALS = ["[UNK]", "<s>", "</s>"]


def build_tokenizer(texts: Iterable[str], extra: Iterable[str] = ()) -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose vocabulary is every word of ``texts`` (no network, milliseconds)."""
    words: list[str] = []
    seen = set(SPECIALS)
    for w in [*(w for t in texts for w in re.findall(r"\w+|[^\w\s]", t)), *extra]:
        if w not in seen:
            seen.add(w)
            words.append(w)
    vocab = {w: i for i, w in enumerate([*SPECIALS, *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="[UNK]")


def make_docs(k: int = 40, words: int = 30, prefix: str = "d") -> list[str]:
    """``k`` documents, each with its own vocabulary (``d7w3`` only occurs in document 7)."""
    return [" ".join(f"{prefix}{i}w{j}" for j in range(words)) + " ." for i in range(k)]
