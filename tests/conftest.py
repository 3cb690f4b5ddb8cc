"""Shared fixtures: tiny randomly initialised models of every supported family, built from configs."""

from __future__ import annotations

import pytest
import torch
import transformers as T

VOCAB = 96


def tiny_config(family: str) -> T.PretrainedConfig:
    common = {"vocab_size": VOCAB}
    if family == "llama":
        return T.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=128, **common)
    if family == "opt":
        return T.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                           word_embed_proj_dim=64, max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
                           pad_token_id=0, **common)
    if family == "gpt2":
        return T.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=1, eos_token_id=2, **common)
    if family == "gpt_neox":
        return T.GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                               max_position_embeddings=128, bos_token_id=1, eos_token_id=2, **common)
    if family == "gemma3":
        return T.Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=16, sliding_window=8, max_position_embeddings=128,
                                  layer_types=["sliding_attention", "full_attention", "sliding_attention"], **common)
    raise ValueError(family)


FAMILIES = ["llama", "opt", "gpt2", "gpt_neox", "gemma3"]


def tiny_model(family: str = "llama", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return T.AutoModelForCausalLM.from_config(tiny_config(family)).eval()


def token_batch(n: int = 6, length: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n, length), generator=g)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch, request):
    """Unit tests get a private cache; tests marked slow use the real one (the model and corpora live there)."""
    if "slow" not in request.keywords:
        monkeypatch.setenv("CALIBRANT_CACHE", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
