"""The real Serve app on a local Ray, driven by the official openai client."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from servekit import LocalServe, TinyModels, modelservice, serve_config

pytestmark = pytest.mark.slow

PROMPT = "the model serves tokens"


@pytest.fixture(scope="module")
def app(local_serve: LocalServe, tiny: TinyModels) -> Iterator[LocalServe]:
    local_serve.deploy(serve_config(modelservice(tiny.base), {"a1": tiny.a1}))
    yield local_serve


@pytest.fixture
def client(app: LocalServe) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{app.url}/v1", api_key="unused", max_retries=0)


def complete(client: openai.OpenAI, model: str, **kw: Any) -> Any:
    args: dict[str, Any] = {"max_tokens": 16, "temperature": 0} | kw
    return client.completions.create(model=model, prompt=PROMPT, **args)


def test_models_lists_base_and_adapters(client: openai.OpenAI) -> None:
    models = {m.id: m for m in client.models.list()}
    assert set(models) == {"tiny", "a1"}
    assert models["a1"].owned_by == "graft"
    assert client.models.retrieve("a1").id == "a1"


def test_completion_base_and_adapter_differ(client: openai.OpenAI) -> None:
    base = complete(client, "tiny")
    again = complete(client, "tiny")
    adapter = complete(client, "a1")
    assert base.choices[0].text == again.choices[0].text, "greedy decoding is deterministic"
    assert base.choices[0].text != adapter.choices[0].text
    assert base.model == "tiny" and adapter.model == "a1"
    assert base.object == "text_completion"
    assert base.usage is not None and base.usage.prompt_tokens > 0


def test_max_tokens_and_stop(client: openai.OpenAI) -> None:
    full = complete(client, "tiny", max_tokens=12)
    assert full.choices[0].finish_reason == "length"
    assert full.usage is not None and full.usage.completion_tokens == 12
    text = full.choices[0].text
    stop = text[4:6]
    cut = complete(client, "tiny", max_tokens=12, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[: text.find(stop)]


def test_chat_completion(client: openai.OpenAI) -> None:
    messages: Any = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "the gpu serves"},
    ]
    base = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=10, temperature=0
    )
    adapter = client.chat.completions.create(
        model="a1", messages=messages, max_tokens=10, temperature=0
    )
    assert base.object == "chat.completion"
    assert base.choices[0].message.role == "assistant"
    assert base.choices[0].message.content
    assert base.choices[0].message.content != adapter.choices[0].message.content


def test_sampling_is_seeded(client: openai.OpenAI) -> None:
    a = complete(client, "tiny", temperature=0.9, top_p=0.9, seed=5)
    b = complete(client, "tiny", temperature=0.9, top_p=0.9, seed=5)
    assert a.choices[0].text == b.choices[0].text


def test_stream_completion_matches_non_stream(client: openai.OpenAI) -> None:
    whole = complete(client, "a1").choices[0].text
    chunks = list(complete(client, "a1", stream=True))
    assert chunks, "no chunks"
    assert "".join(c.choices[0].text for c in chunks) == whole
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_stream_chat_with_usage(client: openai.OpenAI) -> None:
    messages: Any = [{"role": "user", "content": "ray serve"}]
    whole = client.chat.completions.create(
        model="a1", messages=messages, max_tokens=12, temperature=0
    )
    stream = client.chat.completions.create(
        model="a1",
        messages=messages,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens  # type: ignore[union-attr]


def test_stream_is_sse_ending_in_done(app: LocalServe) -> None:
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{app.url}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    first = json.loads(events[0].removeprefix("data: "))
    assert first["object"] == "text_completion"


def test_unknown_model_is_openai_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as exc:
        complete(client, "no-such-model")
    err = exc.value.body
    assert isinstance(err, dict)
    assert err["code"] == "model_not_found"
    assert err["param"] == "model"
    assert err["type"] == "invalid_request_error"
    assert "no-such-model" in err["message"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "x"}]
        )


def test_malformed_json_is_openai_400(app: LocalServe) -> None:
    r = httpx.post(
        f"{app.url}/v1/chat/completions",
        content=b'{"model": "tiny", "messages": [',
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error"
    assert "JSON" in err["message"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "tiny", "prompt": "x", "temperature": 7}, "temperature"),
        ({"model": "tiny", "prompt": "x", "n": 2}, "n"),
        ({"model": "tiny"}, "prompt"),
        ({"model": "tiny", "prompt": "x", "max_tokens": 100000}, None),
    ],
)
def test_bad_fields_are_openai_400(
    app: LocalServe, body: dict[str, Any], param: str | None
) -> None:
    r = httpx.post(f"{app.url}/v1/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param


def test_health_and_readiness(app: LocalServe) -> None:
    assert httpx.get(f"{app.url}/healthz", timeout=10).status_code == 200
    ready = httpx.get(f"{app.url}/readyz", timeout=10).json()
    assert ready["ready"] is True
    assert ready["adapters"] == ["a1"]


def test_adapter_hot_add_and_remove_without_restart(
    app: LocalServe, tiny: TinyModels, client: openai.OpenAI
) -> None:
    before = httpx.get(f"{app.url}/readyz", timeout=10).json()
    base_text = complete(client, "tiny").choices[0].text
    a1_text = complete(client, "a1").choices[0].text

    # Same ModelService, new adapter list: only user_config changes in the serve config.
    app.deploy(serve_config(modelservice(tiny.base), {"a1": tiny.a1, "a2": tiny.a2}))
    after = httpx.get(f"{app.url}/readyz", timeout=10).json()
    assert after["adapters"] == ["a1", "a2"]
    assert (after["replica"], after["pid"]) == (before["replica"], before["pid"])
    a2_text = complete(client, "a2").choices[0].text
    assert a2_text not in (base_text, a1_text)
    assert complete(client, "tiny").choices[0].text == base_text

    app.deploy(serve_config(modelservice(tiny.base), {"a2": tiny.a2}))
    gone = httpx.get(f"{app.url}/readyz", timeout=10).json()
    assert gone["adapters"] == ["a2"]
    assert (gone["replica"], gone["pid"]) == (before["replica"], before["pid"])
    with pytest.raises(openai.NotFoundError):
        complete(client, "a1")
    assert complete(client, "a2").choices[0].text == a2_text

    # A broken adapter is reported, and the others keep serving.
    broken = {"a2": tiny.a2, "bad": tiny.base / "missing"}
    app.deploy(serve_config(modelservice(tiny.base), broken))
    state = httpx.get(f"{app.url}/readyz", timeout=10).json()
    assert state["adapters"] == ["a2"] and "bad" in state["failedAdapters"]
    assert complete(client, "a2").choices[0].text == a2_text

    app.deploy(serve_config(modelservice(tiny.base), {"a1": tiny.a1}))
    assert complete(client, "a1").choices[0].text == a1_text
