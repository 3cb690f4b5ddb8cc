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


def tiny_llama(vocab_size: int, seed: int = 0, context: int = 128):
    """A tiny randomly initialised Llama (2 blocks, hidden 32) for generation and perplexity tests."""
    import torch
    import transformers as T

    cfg = T.LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
                        bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    return T.LlamaForCausalLM(cfg).eval()


def tiny_model_dir(root, text: str, context: int = 64):
    """Save a tiny Llama plus a word-level tokenizer over ``text`` into ``root/model``; return that path."""
    from pathlib import Path

    tok = build_tokenizer([text])
    path = Path(root) / "model"
    tiny_llama(len(tok), context=context).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def run_cli(capsys, *argv):
    """Run ``calibrant`` in-process; return (exit code, stdout, stderr)."""
    from calibrant.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err
