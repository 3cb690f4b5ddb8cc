"""Chat-formatted calibration: conversations rendered through the model's own chat template.

``dialogue:chat:128x512`` (any source whose documents are conversations: lines ``SPEAKER: text``) turns
each document into messages — the first speaker is the ``user``, the second the ``assistant``, turns
alternating as written, consecutive lines of one speaker joined, unlabelled lines continuing the turn
before — and renders them with ``tokenizer.apply_chat_template`` (whatever the template adds, e.g. a
default system prompt, is part of the text, as it is when the model is served). The template's sha256 goes
in the provenance (and the token cache key), so two models with different templates never share sets.

``dialogue:chat:assistant-only:128x512`` also marks the tokens of the assistant's turns: the set carries a
``token_mask`` and the engine's statistics count only those tokens (every token still runs through the
model as context). A token is the assistant's when its characters overlap the text of an assistant message
in the rendered conversation (offsets from the fast tokenizer); the template's own markup around a turn is
not.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from calibrant.errors import CalibrationError

CHAT_OPTION = "chat"
ASSISTANT_ONLY = "assistant-only"
_TURN = re.compile(r"^\s*([A-Za-z][\w .'-]{0,31}?)\s*:\s?(.*)$")
ROLES = ("user", "assistant")


def conversation(doc: str) -> list[dict[str, str]]:
    """Messages of one ``SPEAKER: text`` document (empty when it holds fewer than two speakers' turns)."""
    speakers: list[str] = []
    messages: list[dict[str, str]] = []
    for line in doc.splitlines():
        m = _TURN.match(line)
        if m is not None and (m.group(1) in speakers or len(speakers) < 2):
            who = m.group(1)
            if who not in speakers:
                speakers.append(who)
            role = ROLES[speakers.index(who)]
            if messages and messages[-1]["role"] == role:
                messages[-1]["content"] += "\n" + m.group(2).strip()
            else:
                messages.append({"role": role, "content": m.group(2).strip()})
        elif messages and line.strip():
            messages[-1]["content"] += "\n" + line.strip()
    return messages if len(speakers) == 2 else []


def read_chat_template(path: str | Path) -> str:
    """The Jinja chat template in file ``path`` (``--chat-template FILE``), checked: it exists, is UTF-8 text
    and parses as a template. A one-line CalibrationError otherwise."""
    import jinja2

    p = Path(path).expanduser()
    if not p.is_file():
        raise CalibrationError(f"chat template file '{path}' does not exist; give a Jinja template file (e.g. one "
                               "saved from an instruction model's tokenizer_config.json 'chat_template')")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CalibrationError(f"chat template file '{path}' is not UTF-8 text ({e.reason}); save it as UTF-8") from e
    if not text.strip():
        raise CalibrationError(f"chat template file '{path}' is empty; give a Jinja chat template")
    try:
        jinja2.Environment().parse(text)
    except jinja2.TemplateSyntaxError as e:
        raise CalibrationError(f"chat template file '{path}' line {e.lineno} is not valid Jinja ({e.message}); fix "
                               "the template") from e
    return text


def template_hash(tokenizer: Any) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise CalibrationError(f"tokenizer '{name}' has no chat template, so ':chat' cannot render conversations as "
                               "the model sees them; use an instruction model (e.g. smollm2-135m, whose GGUF carries "
                               "ChatML), pass --chat-template FILE (API: chat_template=FILE), or drop ':chat'")
    text = template if isinstance(template, str) else repr(sorted(template.items()))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def render_chat(docs: Sequence[str | list[dict[str, str]]], tokenizer: Any, source: str,
                conversations: list[list[dict[str, str]]] | None = None) -> tuple[list[str], dict[str, Any]]:
    """Each conversational document (``SPEAKER: text`` lines, or a list of ``{"role", "content"}`` messages as a
    JSONL ``messages`` field holds them) rendered through the chat template; non-conversations are left out
    and counted (the messages of each rendered one are appended to ``conversations`` when given). Refuses a
    source with no conversation at all."""
    digest = template_hash(tokenizer)
    rendered, skipped, turns = [], 0, 0
    for i, doc in enumerate(docs):
        messages = conversation(doc) if isinstance(doc, str) else doc
        if not messages:
            skipped += 1
            continue
        turns += len(messages)
        try:
            rendered.append(tokenizer.apply_chat_template(messages, tokenize=False))
        except Exception as e:  # jinja's TemplateError (e.g. a role order the template refuses) and the like
            raise CalibrationError(f"the chat template refuses conversation {i} of '{source}' "
                                   f"({type(e).__name__}: {e}); fix that conversation or pass another template "
                                   "with --chat-template FILE") from e
        if conversations is not None:
            conversations.append(messages)
    if not rendered:
        raise CalibrationError(f"source '{source}' holds no conversation (documents of lines 'SPEAKER: text' between "
                               "two speakers); ':chat' needs a conversational source such as dialogue")
    return rendered, {"format": "chat", "chat_template_sha256": digest, "conversations": len(rendered),
                      "turns": turns, "not_conversations": skipped}


def assistant_spans(text: str, messages: list[dict[str, str]]) -> list[tuple[int, int]]:
    """Character spans of the assistant messages' text in a rendered conversation (found in order)."""
    spans, pos = [], 0
    for m in messages:
        at = text.find(m["content"], pos) if m["content"] else -1
        if at < 0:
            continue  # a template that rewrites a message's text: that turn cannot be located
        if m["role"] == "assistant":
            spans.append((at, at + len(m["content"])))
        pos = at + len(m["content"])
    return spans


def assistant_token_masks(rendered: list[str], conversations: list[list[dict[str, str]]], tokenizer: Any,
                          lengths: np.ndarray) -> list[np.ndarray]:
    """Per rendered document, 1 for each token of an assistant turn (uint8, one per token), checked against the
    token counts ``lengths`` the ids were cut with."""
    if not getattr(tokenizer, "is_fast", False):
        raise CalibrationError("assistant-only needs a fast tokenizer (it maps tokens to characters to find the "
                               "assistant's turns); load the model's tokenizer.json, or drop ':assistant-only'")
    out = []
    for i in range(0, len(rendered), 64):
        enc = tokenizer(rendered[i:i + 64], add_special_tokens=False, return_offsets_mapping=True)
        for j, offsets in enumerate(enc["offset_mapping"]):
            k = i + j
            if len(offsets) != int(lengths[k]):
                raise CalibrationError(f"document {k} tokenizes to {len(offsets)} tokens with offsets but "
                                       f"{int(lengths[k])} without; assistant-only cannot align its mask")
            bounds = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
            mask = np.zeros(len(offsets), dtype=np.uint8)
            for b, e in assistant_spans(rendered[k], conversations[k]):
                mask |= ((bounds[:, 0] < e) & (bounds[:, 1] > b)).astype(np.uint8)
            out.append(mask)
    return out
