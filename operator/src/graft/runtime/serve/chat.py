"""Chat messages to a prompt: the tokenizer's own chat template, or a documented fallback.

The fallback is the layout the trainer uses for template-less tokenizers
(``graft.prompts``), so an adapter is served with exactly the prompts it was tuned on.
"""

from __future__ import annotations

from typing import Any

from graft.prompts import STOP, generation_prompt
from graft.runtime.serve.protocol import ContentPart


def message_text(content: str | list[ContentPart] | None) -> str:
    """OpenAI content is a string or a list of parts; only text parts are supported."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts: list[str] = []
    for part in content:
        if part.type != "text":
            raise ValueError(f"only text content parts are supported, not {part.type!r}")
        texts.append(part.text)
    return "".join(texts)


def render_chat(
    tokenizer: Any, messages: list[dict[str, str]]
) -> tuple[str, bool, tuple[str, ...]]:
    """Return (prompt, whether it already has special tokens, implicit stop strings)."""
    if getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return str(prompt), True, ()
    prompt = generation_prompt((m["role"], m["content"]) for m in messages)
    return prompt, False, STOP
