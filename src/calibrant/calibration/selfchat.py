"""``self:chat``: self-calibration for instruction models — the model answers seed prompts through its chat
template.

Each row starts with one prompt rendered as a user turn by ``tokenizer.apply_chat_template(...,
add_generation_prompt=True)`` (so it ends where the assistant's answer begins, with whatever system prompt the
template adds by default), and the model samples the rest of the row's ``L`` tokens after it, with the same
temperature schedule and options as ``self`` (:mod:`~calibrant.calibration.selfgen`). A sampled end-of-turn does
not end the row: the model goes on, as it would in a conversation.

The prompts are the first user turns of the offline ``dialogue`` corpus's calibration split (human
conversation openers; its held-out split stays unseen), drawn without replacement in a seeded order; a
prompt whose rendering takes more than half of ``L`` is skipped. ``self:chat:assistant-only`` marks the
sampled tokens, so the statistics count the model's answers only.
"""

from __future__ import annotations

from typing import Any

import torch

from calibrant.calibration.chat import conversation, template_hash
from calibrant.calibration.corpora import get_corpus
from calibrant.errors import CalibrationError

PROMPT_CORPUS = "dialogue"


def chat_prompts(tokenizer: Any, n: int, seq_len: int, seed: int) -> tuple[list[list[int]], dict[str, Any]]:
    """``n`` templated prompts (token ids, each at most ``seq_len // 2`` long) and their provenance."""
    digest = template_hash(tokenizer)  # refuses a tokenizer without a chat template
    corpus = get_corpus(PROMPT_CORPUS)
    openers, seen = [], set()
    for doc in corpus.split("calib"):
        messages = conversation(doc)
        text = messages[0]["content"].strip() if messages else ""
        if text and text not in seen:
            seen.add(text)
            openers.append(text)
    probe = [{"role": "user", "content": "hi"}]
    if tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True) == \
            tokenizer.apply_chat_template(probe, tokenize=False):
        raise CalibrationError("the chat template ignores add_generation_prompt, so self:chat cannot open the "
                               "assistant's turn after a prompt; pass a template that does (--chat-template FILE)")
    limit = seq_len // 2
    order = torch.randperm(len(openers), generator=torch.Generator().manual_seed(seed)).tolist()
    prefixes: list[list[int]] = []
    for i in order:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": openers[i]}], tokenize=False,
                                                 add_generation_prompt=True)
        ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
        if 0 < len(ids) <= limit:
            prefixes.append(list(ids))
            if len(prefixes) == n:
                break
    if len(prefixes) < n:
        raise CalibrationError(f"self:chat found {len(prefixes)} of the {n} prompts it needs among "
                               f"{len(openers)} '{PROMPT_CORPUS}' openers that render in at most L/2 = {limit} tokens; "
                               "use a longer L or a smaller n")
    info = {"source": PROMPT_CORPUS, "split": "calib", "corpus_checksum": corpus.checksum, "prompt": "first user turn",
            "openers": len(openers), "max_prefix_tokens": limit, "chat_template_sha256": digest}
    return prefixes, info


def generated_mask(prefix_lengths: list[int], seq_len: int) -> torch.Tensor:
    """bool [n, L]: True on each row's sampled tokens (the positions after its prefix)."""
    cols = torch.arange(seq_len).unsqueeze(0)
    return cols >= torch.as_tensor(prefix_lengths, dtype=torch.long).unsqueeze(1)
