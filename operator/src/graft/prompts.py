"""The chat layout for tokenizers without a chat template, shared by trainer and server.

A base model that has no chat template has seen no chat format, so any layout is a
convention; what matters is that fine-tuning and serving use the same one. Each turn is a
``### <Role>:`` header line, the content, and a blank line; assistant turns end with the
tokenizer's end-of-sequence token in training, so a tuned model learns to stop.
"""

from __future__ import annotations

from collections.abc import Iterable

ROLE_HEADERS = {"system": "### System:\n", "user": "### User:\n", "assistant": "### Assistant:\n"}
TURN_END = "\n\n"
#: Stop strings for generation: the start of the next turn, for models that never learnt EOS.
STOP = (TURN_END + "### ",)


def role_header(role: str) -> str:
    return ROLE_HEADERS.get(role, f"### {role.capitalize()}:\n")


def generation_prompt(messages: Iterable[tuple[str, str]]) -> str:
    """The conversation so far, then the assistant's header, ready for generation."""
    turns = "".join(f"{role_header(role)}{content}{TURN_END}" for role, content in messages)
    return turns + ROLE_HEADERS["assistant"]
