"""Helpers for the search tests: tiny GQA models (3 KV groups of 2 query heads) of each prunable family."""

from __future__ import annotations

import torch
import transformers as T

VOCAB = 96


def gqa_config(family: str = "llama", layers: int = 3) -> T.PretrainedConfig:
    common = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=layers,
                  num_attention_heads=6, num_key_value_heads=3, head_dim=8, max_position_embeddings=128)
    if family == "llama":
        return T.LlamaConfig(**common, tie_word_embeddings=True)
    if family == "mistral":
        return T.MistralConfig(**common)
    if family == "qwen2":
        return T.Qwen2Config(**common)  # q/k/v carry biases
    if family == "qwen3":
        return T.Qwen3Config(**common)  # per-head q/k RMSNorm
    if family == "gemma3_text":  # q/k norms, sliding-window layers, scaled embeddings, soft-capped logits
        kinds = [("full_attention" if i % 2 else "sliding_attention") for i in range(layers)]
        return T.Gemma3TextConfig(**common, sliding_window=8, layer_types=kinds, final_logit_softcapping=30.0)
    raise ValueError(family)


def gqa_model(family: str = "llama", layers: int = 3, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(gqa_config(family, layers)).eval()
    with torch.no_grad():  # random init leaves biases at zero: make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


def tokens(n: int = 4, length: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n, length), generator=g)


def word_tokenizer(words: int = VOCAB - 3):
    """A word-level tokenizer (no network) so tiny model directories load through calibrant's loader."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[UNK]", "<s>", "</s>", *(f"w{j}" for j in range(words))])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="[UNK]")


def run_cli(capsys, *argv):
    """Run ``calibrant`` in-process; return (exit code, stdout, stderr)."""
    from calibrant.cli import main

    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err
