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
