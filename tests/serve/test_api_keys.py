"""API keys on the real Serve app, driven by the official openai client."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from servekit import LocalServe, TinyModels, modelservice, serve_config

from graft.runtime.serve.auth import ApiKeys, bearer, parse_keys

pytestmark = pytest.mark.slow

KEY_A = "sk-team-a-0f9e8d7c6b5a"
KEY_B = "sk-team-b-1a2b3c4d5e6f"


@pytest.fixture(scope="module")
def keyed(
    local_serve: LocalServe, tiny: TinyModels, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[LocalServe, Path]]:
    keys = tmp_path_factory.mktemp("keys") / "keys"
    keys.write_text(f"# one key per line\n{KEY_A}\n\n{KEY_B}\n")
    cfg = serve_config(modelservice(tiny.base), {"a1": tiny.a1})
    cfg["applications"][0]["args"]["apiKeyFile"] = str(keys)
    local_serve.deploy(cfg)
    yield local_serve, keys


def _client(app: LocalServe, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{app.url}/v1", api_key=key, max_retries=0)


def _ask(client: openai.OpenAI) -> Any:
    return client.completions.create(model="a1", prompt="hello", max_tokens=4, temperature=0)


def test_each_listed_key_works(keyed: tuple[LocalServe, Path]) -> None:
    app, _ = keyed
    for key in (KEY_A, KEY_B):
        client = _client(app, key)
        assert {m.id for m in client.models.list()} == {"tiny", "a1"}
        assert _ask(client).choices[0].text is not None
        chat = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3
        )
        assert chat.choices[0].message.role == "assistant"


@pytest.mark.parametrize("key", ["sk-wrong", KEY_A[:-1], KEY_A + "x", f"{KEY_A} {KEY_B}"])
def test_wrong_key_is_openai_401(keyed: tuple[LocalServe, Path], key: str) -> None:
    app, _ = keyed
    with pytest.raises(openai.AuthenticationError) as exc:
        _ask(_client(app, key))
    assert exc.value.status_code == 401
    body = exc.value.body
    assert isinstance(body, dict) and body["code"] == "invalid_api_key"
    assert body["type"] == "invalid_request_error"
    with pytest.raises(openai.AuthenticationError):
        _client(app, key).models.list()


def test_missing_key_is_openai_401(keyed: tuple[LocalServe, Path]) -> None:
    app, _ = keyed
    for path in ("/v1/models", "/v1/models/a1"):
        r = httpx.get(f"{app.url}{path}", timeout=30)
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.post(
        f"{app.url}/v1/completions",
        json={"model": "tiny", "prompt": "x"},
        headers={"authorization": "Basic " + KEY_A},
        timeout=30,
    )
    assert r.status_code == 401 and "Authorization" in r.json()["error"]["message"]
    # Probes stay open: they say nothing about the model and run no generation.
    assert httpx.get(f"{app.url}/healthz", timeout=10).status_code == 200


def test_keys_rotate_without_restart(keyed: tuple[LocalServe, Path]) -> None:
    app, keys = keyed
    before = httpx.get(f"{app.url}/readyz", timeout=10).json()
    new = "sk-rotated-99aa88bb"
    # As the kubelet updates a mounted Secret: a new file swapped in by rename.
    tmp = keys.with_suffix(".new")
    tmp.write_text(f"{new}\n{KEY_B}\n")
    os.replace(tmp, keys)
    try:
        assert _ask(_client(app, new)).choices
        with pytest.raises(openai.AuthenticationError):
            _ask(_client(app, KEY_A))
        after = httpx.get(f"{app.url}/readyz", timeout=10).json()
        assert (after["replica"], after["pid"]) == (before["replica"], before["pid"])
        keys.write_text("# nobody\n")
        with pytest.raises(openai.AuthenticationError):
            _ask(_client(app, KEY_B))
    finally:
        keys.write_text(f"{KEY_A}\n{KEY_B}\n")


def test_key_file_parsing_and_bearer(tmp_path: Path) -> None:
    assert parse_keys(" a \n#c\n\n b\r\n") == ["a", "b"]
    assert bearer("Bearer  k ") == "k" and bearer("bearer k") == "k"
    assert bearer(None) is None and bearer("Basic k") is None and bearer("Bearer ") is None
    keys = ApiKeys(tmp_path / "absent")
    assert not keys.accepts("") and not keys.accepts("k")
    (tmp_path / "absent").write_text("k\n")
    assert keys.accepts("k") and not keys.accepts("K")
