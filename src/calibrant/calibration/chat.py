"""Chat-formatted calibration: conversations rendered through the model's own chat template.

``dialogue:chat:128x512`` (any source whose documents are conversations: lines ``SPEAKER: text``) turns
each document into messages — the first speaker is the ``user``, the second the ``assistant``, turns
alternating as written, consecutive lines of one speaker joined, unlabelled lines continuing the turn
before — and renders them with ``tokenizer.apply_chat_template`` (whatever the template adds, e.g. a
default system prompt, is part of the text, as it is when the model is served). The template's sha256 goes
in the provenance (and the token cache key), so two models with different templates never share sets.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from calibrant.errors import CalibrationError

CHAT_OPTION = "chat"
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


def template_hash(tokenizer: Any) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise CalibrationError(f"tokenizer '{name}' has no chat template, so ':chat' cannot render conversations as "
                               "the model sees them; use an instruction model's tokenizer (e.g. smollm2-135m, whose "
                               "GGUF carries ChatML) or drop ':chat'")
    text = template if isinstance(template, str) else repr(sorted(template.items()))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def render_chat(docs: list[str], tokenizer: Any, source: str) -> tuple[list[str], dict[str, Any]]:
    """Each conversational document rendered through the chat template; non-conversations are left out and
    counted. Refuses a source with no conversation at all."""
    digest = template_hash(tokenizer)
    rendered, skipped, turns = [], 0, 0
    for doc in docs:
        messages = conversation(doc)
        if not messages:
            skipped += 1
            continue
        turns += len(messages)
        rendered.append(tokenizer.apply_chat_template(messages, tokenize=False))
    if not rendered:
        raise CalibrationError(f"source '{source}' holds no conversation (documents of lines 'SPEAKER: text' between "
                               "two speakers); ':chat' needs a conversational source such as dialogue")
    return rendered, {"format": "chat", "chat_template_sha256": digest, "conversations": len(rendered),
                      "turns": turns, "not_conversations": skipped}
