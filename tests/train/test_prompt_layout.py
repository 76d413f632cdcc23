"""Trainer and server render template-less chats the same way (graft.prompts)."""

from __future__ import annotations

from types import SimpleNamespace

from graft.runtime.serve.chat import render_chat as serve_render
from graft.runtime.train.tokens import render_chat as train_render


def test_served_prompt_is_the_trained_prefix() -> None:
    tok = SimpleNamespace(chat_template=None, bos_token="<s>", eos_token="</s>")
    convo = [("system", "Be brief."), ("user", "Torque for M20 bolts?"), ("assistant", "350 Nm")]
    trained, spans = train_render(tok, convo)
    prompt, _, stops = serve_render(tok, [{"role": r, "content": c} for r, c in convo[:2]])
    assert trained.startswith("<s>" + prompt)
    # the loss covers exactly the answer the server would generate after that prompt
    ((start, end),) = spans
    assert trained[start:end] == "350 Nm</s>"
    assert start == len("<s>" + prompt)
    assert all(s not in "350 Nm" for s in stops)
