"""Chat messages to a prompt: the tokenizer's own chat template, or a documented fallback.

The fallback is ChatML (``<|im_start|>role\\ncontent<|im_end|>``), a format many
instruction-tuned models know; generation stops at ``<|im_end|>``. A model without a
template has seen no chat format, so any choice is a convention; this one is documented
in docs/serving.md so that fine-tuning data can be formatted the same way.
"""

from __future__ import annotations

from typing import Any

FALLBACK_TURN_END = "<|im_end|>"


def message_text(content: Any) -> str:
    """OpenAI content is a string or a list of parts; only text parts are supported."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts: list[str] = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") != "text":
            raise ValueError("only text content parts are supported")
        texts.append(str(part.get("text", "")))
    return "".join(texts)


def render_chat(
    tokenizer: Any, messages: list[dict[str, str]]
) -> tuple[str, bool, tuple[str, ...]]:
    """Return (prompt, whether it already has special tokens, implicit stop strings)."""
    if getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return str(prompt), True, ()
    turns = [f"<|im_start|>{m['role']}\n{m['content']}{FALLBACK_TURN_END}\n" for m in messages]
    return "".join(turns) + "<|im_start|>assistant\n", False, (FALLBACK_TURN_END,)
