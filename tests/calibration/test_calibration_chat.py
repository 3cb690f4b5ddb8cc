"""Chat-formatted calibration: conversations parsed into alternating user/assistant turns and rendered through
the tokenizer's own template; template hash in provenance and cache key; one-line refusals."""

from __future__ import annotations

import pytest
from calib_helpers import build_tokenizer

from calibrant.calibration import make_calibration
from calibrant.calibration.chat import conversation
from calibrant.errors import CalibrationError

TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|> {% endfor %}"
DIALOGUES = [f"Alice: hello there friend number {i} .\nBob: nice to meet you {i} .\nAlice: what is new today ?\n"
             f"Bob: the weather is fine {i} ." for i in range(40)]


def _tok(template: str | None = TEMPLATE):
    tok = build_tokenizer(DIALOGUES + ["user assistant"], extra=["<|im_start|>", "<|im_end|>"])
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = template
    return tok


@pytest.fixture
def dialogue(fake_corpus):
    fake_corpus(DIALOGUES, "dialogue")
    fake_corpus([f"plain news text number {i} ." for i in range(40)], "news")


def test_turns_alternate_and_continuations_join():
    doc = "Alice: hi\nBob: hello\nand more\nBob: still me\nAlice: bye"
    assert conversation(doc) == [{"role": "user", "content": "hi"},
                                 {"role": "assistant", "content": "hello\nand more\nstill me"},
                                 {"role": "user", "content": "bye"}]
    assert conversation("just prose: with a colon\nand nothing else") == []  # one 'speaker' is no conversation
    assert conversation("Note: a\nNote: b") == []


def test_chat_rows_carry_the_template_not_the_speaker_labels(dialogue):
    tok = _tok()
    chat = make_calibration("dialogue:chat:6x16", tok, seed=0)
    plain = make_calibration("dialogue:6x16", tok, seed=0)
    start, alice = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("Alice")
    assert start in chat.input_ids and alice not in chat.input_ids
    assert start not in plain.input_ids and alice in plain.input_ids
    prov = chat.provenance
    assert prov["format"] == "chat" and len(prov["chat_template_sha256"]) == 16
    assert prov["conversations"] == prov["documents"] and prov["turns"] == 4 * prov["conversations"]
    other = _tok(TEMPLATE.replace(" {% endfor %}", "\n{% endfor %}"))
    assert make_calibration("dialogue:chat:6x16", other, seed=0).provenance["chat_template_sha256"] != \
        prov["chat_template_sha256"]


@pytest.mark.parametrize("spec, template, message", [
    ("dialogue:chat:4x16", None, "has no chat template, so ':chat' cannot render"),
    ("news:chat:4x16", TEMPLATE, "source 'news' holds no conversation"),
])
def test_refusals(dialogue, spec, template, message):
    with pytest.raises(CalibrationError) as e:
        make_calibration(spec, _tok(template), seed=0)
    assert message in str(e.value) and "\n" not in str(e.value)


ASSISTANT_WORDS = {"nice", "to", "meet", "you", "the", "weather", "is", "fine", "."} | {str(i) for i in range(40)}


@pytest.mark.parametrize("sampling", ["", "docs:", "packed:"])
def test_assistant_only_marks_exactly_the_assistant_turns(dialogue, sampling, tmp_path):
    from calibrant.calibration import CalibrationSet

    tok = _tok()
    masked = make_calibration(f"dialogue:chat:assistant-only:{sampling}6x16", tok, seed=1)
    plain = make_calibration(f"dialogue:chat:{sampling}6x16", tok, seed=1)
    assert masked.input_ids.equal(plain.input_ids)  # the mask rides along: the same windows are drawn
    assert masked.token_mask is not None and plain.token_mask is None and masked.hash != plain.hash
    words = tok.convert_ids_to_tokens(masked.input_ids.flatten().tolist())
    flags = masked.token_mask.flatten().tolist()
    assert {w for w, f in zip(words, flags, strict=True) if f} <= ASSISTANT_WORDS
    user_only = {"hello", "there", "friend", "number", "what", "new", "today", "?", "<|im_start|>", "<|im_end|>",
                 "user", "assistant"}
    assert not any(f for w, f in zip(words, flags, strict=True) if w in user_only)
    assert 0 < masked.provenance["token_mask"]["share"] < 1
    masked.save(tmp_path / "m.safetensors")
    back = CalibrationSet.load(tmp_path / "m.safetensors")
    assert back.hash == masked.hash and back.token_mask.equal(masked.token_mask)


def test_assistant_only_needs_chat(dialogue):
    with pytest.raises(CalibrationError, match="write dialogue:chat:assistant-only:4x16"):
        make_calibration("dialogue:assistant-only:4x16", _tok(), seed=0)


# --------------------------------------------------------------------------------------------------
# JSONL `messages`, --chat-template FILE, held-out chat text, self:chat

MESSAGES = [[{"role": "system", "content": "be brief ."}, {"role": "user", "content": f"hello there friend {i} ?"},
             {"role": "assistant", "content": f"nice to meet you {i} ."}] for i in range(30)]


def _jsonl(path, rows):
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_messages_render_through_the_template(tmp_path):
    tok = _tok()
    tok.add_tokens(["be", "brief", "system"])
    path = _jsonl(tmp_path / "chats.jsonl", [{"messages": m} for m in MESSAGES])
    chat = make_calibration(f"file:{path}:chat:assistant-only:4x16", tok, seed=0)  # 'messages' is the default field
    assert chat.provenance["field"] == "messages" and chat.provenance["messages"] is True
    assert chat.provenance["format"] == "chat" and chat.provenance["turns"] == 90
    words = tok.convert_ids_to_tokens(chat.input_ids.flatten().tolist())
    assert "<|im_start|>" in words and "system" in words  # the template's markup and the system turn are there
    counted = {w for w, f in zip(words, chat.token_mask.flatten().tolist(), strict=True) if f}
    assert counted and counted <= ASSISTANT_WORDS  # the system and user turns are context only
    plain = make_calibration(f"file:{path}:messages:4x16", tok, seed=0)  # without :chat: 'role: text' lines
    assert "<|im_start|>" not in tok.convert_ids_to_tokens(plain.input_ids.flatten().tolist())
    assert plain.hash != chat.hash


@pytest.mark.parametrize("rows, message", [
    ([{"messages": [{"role": "narrator", "content": "hi"}]}], "role 'narrator'"),
    ([{"messages": "hi"}], "is str, not a list"),
    ([{"messages": [{"role": "user"}]}], "message 0 is not an object with a text 'role' and 'content'"),
    ([{"messages": MESSAGES[0]}, {"messages": "x", "text": "plain"}], "is str, not a list"),
])
def test_bad_messages_are_refused_with_the_line(tmp_path, rows, message):
    path = _jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(CalibrationError) as e:
        make_calibration(f"file:{path}:messages:chat:2x8", _tok(), seed=0)
    assert message in str(e.value) and "line" in str(e.value) and "\n" not in str(e.value)


def test_chat_template_file_is_read_and_checked(tmp_path):
    from calibrant.calibration import read_chat_template

    good = tmp_path / "t.jinja"
    good.write_text(TEMPLATE)
    assert read_chat_template(good) == TEMPLATE
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}{{ m['content'] }")
    for path, message in [(tmp_path / "none.jinja", "does not exist"), (bad, "is not valid Jinja")]:
        with pytest.raises(CalibrationError, match=message):
            read_chat_template(path)


def test_cli_chat_template_lets_a_base_model_calibrate_on_chat(dialogue, tmp_path, capsys):
    from calib_helpers import run_cli

    from calibrant.calibration import CalibrationSet

    tok = _tok(None)  # a base model: no template of its own
    model = __import__("calib_helpers").tiny_llama(len(tok))
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    (tmp_path / "t.jinja").write_text(TEMPLATE)
    code, _, err = run_cli(capsys, "calib", "make", "dialogue:chat:4x16", "--model", str(tmp_path / "m"),
                           "--out", str(tmp_path / "no.safetensors"), "--quiet")
    assert code == 2 and "--chat-template FILE" in err and not (tmp_path / "no.safetensors").exists()
    code, out, err = run_cli(capsys, "calib", "make", "dialogue:chat:4x16", "--model", str(tmp_path / "m"),
                             "--chat-template", str(tmp_path / "t.jinja"), "--out", str(tmp_path / "c.safetensors"),
                             "--quiet")
    assert code == 0, err
    made = CalibrationSet.load(tmp_path / "c.safetensors")
    assert made.provenance["chat_template_sha256"] == make_calibration("dialogue:chat:4x16", _tok(), seed=0) \
        .provenance["chat_template_sha256"]


def test_heldout_chat_text_renders_the_heldout_conversations(dialogue):
    from calibrant.calibration import heldout_token_ids

    tok = _tok()
    ids, info = heldout_token_ids("dialogue:chat", tok)
    plain, _ = heldout_token_ids("dialogue", tok)
    start = tok.convert_tokens_to_ids("<|im_start|>")
    assert start in ids and start not in plain and info["format"] == "chat"
    assert info["conversations"] == info["documents"] and len(info["chat_template_sha256"]) == 16
    with pytest.raises(CalibrationError, match="write CORPUS or CORPUS:chat"):
        heldout_token_ids("dialogue:docs", tok)


GENERATION_PROMPT = "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
PROMPTS = [f"Alice: question {i} about {'the ' * (i % 4)}weather ?\nBob: answer {i} ." for i in range(30)]


@pytest.fixture
def chat_model(fake_corpus):
    from calib_helpers import tiny_llama

    fake_corpus(PROMPTS, "dialogue")
    tok = _tok(TEMPLATE + GENERATION_PROMPT)
    tok.add_tokens(["question", "about", "answer", "weather"] + [f"w{i}" for i in range(20)])
    return tok, tiny_llama(len(tok), context=64)


def test_self_chat_rows_start_with_templated_prompts_and_mask_the_answers(chat_model, tmp_path, monkeypatch):
    import torch

    tok, model = chat_model
    masked = make_calibration("self:chat:assistant-only:batch=3:5x24", tok, seed=2, model=model)
    start = tok.convert_tokens_to_ids("<|im_start|>")
    mask = masked.token_mask
    assert masked.input_ids.shape == (5, 24) and (masked.input_ids[:, 0] == start).all()
    for row, m in zip(masked.input_ids, mask, strict=True):
        k = int((~m).sum())  # the prefix: a user turn and the generation prompt, exactly as the template renders it
        assert not m[:k].any() and m[k:].all()
        text = tok.decode(row[:k])
        assert "question" in text and text.rstrip().endswith("assistant")
    prov = masked.provenance
    assert prov["format"] == "chat" and prov["prompts"]["source"] == "dialogue" and 0 < prov["token_mask"]["share"] < 1
    plain = make_calibration("self:chat:batch=3:5x24", tok, seed=2, model=model)  # served from the cache
    assert plain.token_mask is None and plain.input_ids.equal(masked.input_ids) and plain.hash != masked.hash
    monkeypatch.setenv("CALIBRANT_CACHE", str(tmp_path / "fresh"))
    fake = __import__("calibrant.calibration.corpora", fromlist=["_store_corpus"])
    fake._store_corpus("dialogue", PROMPTS, {"fake": True})
    again = make_calibration("self:chat:assistant-only:batch=3:5x24", tok, seed=2, model=model)
    assert again.input_ids.equal(masked.input_ids) and again.hash == masked.hash  # generated again: same ids
    other = make_calibration("self:chat:batch=3:5x24", tok, seed=3, model=model)
    assert not torch.equal(other.input_ids, plain.input_ids)
    assert make_calibration("self:batch=3:5x24", tok, seed=2, model=model).hash != plain.hash


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # rotary (relative) and learned absolute positions
def test_left_padded_batches_decode_like_single_rows(chat_model, family):
    """Greedy decoding (top_k=1) after prompts of different lengths: a batch with left padding must pick the
    same tokens as each row decoded alone (positions and the padding mask are right)."""
    import torch
    import transformers as T

    from calibrant.calibration.selfchat import chat_prompts
    from calibrant.calibration.selfgen import SelfGenConfig, generate_after_prefixes

    tok, model = chat_model
    if family == "gpt2":
        torch.manual_seed(0)
        model = T.GPT2LMHeadModel(T.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                               vocab_size=len(tok))).eval()
    prefixes, _ = chat_prompts(tok, 4, 40, seed=0)
    assert len({len(p) for p in prefixes}) > 1  # the batch really is padded
    batched, _ = generate_after_prefixes(model, tok, prefixes, 40, SelfGenConfig(top_k=1, batch_size=4), seed=0)
    single, _ = generate_after_prefixes(model, tok, prefixes, 40, SelfGenConfig(top_k=1, batch_size=1), seed=0)
    assert batched.equal(single)


def test_self_chat_refusals(chat_model):
    tok, model = chat_model
    with pytest.raises(CalibrationError, match="write self:chat:assistant-only:4x24"):
        make_calibration("self:assistant-only:4x24", tok, seed=0, model=model)
    with pytest.raises(CalibrationError, match="use a longer L or a smaller n"):
        make_calibration("self:chat:4x8", tok, seed=0, model=model)
    tok.chat_template = TEMPLATE
    with pytest.raises(CalibrationError, match="ignores add_generation_prompt"):
        make_calibration("self:chat:4x24", tok, seed=0, model=model)
    tok.chat_template = None
    with pytest.raises(CalibrationError, match="has no chat template"):
        make_calibration("self:chat:4x24", tok, seed=0, model=model)


def test_assistant_masks_are_cached_beside_the_ids(dialogue, monkeypatch):
    from calibrant.calibration import calibset

    tok = _tok()
    first = make_calibration("dialogue:chat:assistant-only:6x16", tok, seed=4)

    def no_retokenizing(*args, **kwargs):
        raise AssertionError("the masks were recomputed")

    monkeypatch.setattr(calibset, "assistant_token_masks", no_retokenizing)
    again = make_calibration("dialogue:chat:assistant-only:6x16", tok, seed=4)
    assert again.token_mask.equal(first.token_mask) and again.hash == first.hash
    with pytest.raises(AssertionError, match="recomputed"):  # another template is other content: not served
        make_calibration("dialogue:chat:assistant-only:6x16", _tok(TEMPLATE + " "), seed=4)


def test_inspect_names_a_self_chat_set_and_a_selections_time(chat_model):
    from calibrant.calibration import inspect_calibration

    tok, model = chat_model
    rows = dict(inspect_calibration(make_calibration("self:chat:assistant-only:batch=3:3x24", tok, seed=0,
                                                     model=model)).rows())
    assert "3 answers to templated prompts (first user turns of dialogue)" in rows["format"]
    assert rows["token mask"].startswith("generated (assistant) tokens: statistics count")
