"""Turning a user message into prompt ids with a checkpoint's tokenizer."""

from __future__ import annotations


def prompt_ids(tokenizer, text: str, chat: bool = True) -> list[int]:
    """The chat template's generation prompt for one user turn, or the plain encoding (with BOS) when the
    tokenizer has no template or `chat` is False."""
    if chat and tokenizer.chat_template:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)  # a BatchEncoding in transformers 5
    return list(tokenizer(text)["input_ids"])
