"""Prompt ids from text with a checkpoint's tokenizer: the chat template's generation prompt, or the text as is."""

from __future__ import annotations


def chat_ids(tokenizer, messages: list[dict], tools: list[dict] | None = None, kwargs: dict | None = None) -> list[int]:
    """The chat template applied to `messages` (and `tools`, and any template variables in `kwargs`, such as
    `enable_thinking`), ending in the model turn's generation prompt."""
    ids = tokenizer.apply_chat_template(messages, tools=tools or None, add_generation_prompt=True, **(kwargs or {}))
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)  # a BatchEncoding in transformers 5


def text_ids(tokenizer, text: str) -> list[int]:
    """The plain encoding of `text` (with BOS where the tokenizer adds one), no template."""
    return list(tokenizer(text)["input_ids"])


def prompt_ids(tokenizer, text: str, chat: bool = True) -> list[int]:
    """One user turn through the chat template, or the plain encoding when the tokenizer has no template or
    `chat` is False."""
    if chat and tokenizer.chat_template:
        return chat_ids(tokenizer, [{"role": "user", "content": text}])
    return text_ids(tokenizer, text)
