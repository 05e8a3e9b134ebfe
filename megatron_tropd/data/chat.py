"""The one prompt builder: chat messages -> (text, token ids), for training prompts and benchmark problems.

With the tokenizer's chat template (and `use_chat_template`): the template with a generation prompt, tokenized
without extra special tokens (the template has them). Without: the messages' contents joined by blank lines,
tokenized with the tokenizer's own special tokens (e.g. a BOS).
"""
from __future__ import annotations

from typing import Any


def chat_messages(prompt: str, system_prompt: str | None = None) -> list[dict]:
    """[system?, user] messages of a plain prompt."""
    return ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": prompt}]


def build_prompt(tokenizer: Any, messages: list[dict], use_chat_template: bool = True) -> tuple[str, list[int]]:
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text, list(tokenizer.encode(text, add_special_tokens=False))
    text = "\n\n".join(m["content"] for m in messages)
    return text, list(tokenizer.encode(text))
