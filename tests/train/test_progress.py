"""Progress reporting: JSON lines, rate-limited Pod patches that never fail training."""

from __future__ import annotations

import io
import json
import time
from typing import Any

from graft.runtime.train.progress import ANNOTATION, PodAnnotator, Reporter, format_eta


class FakeApi:
    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple[str, str, dict[str, Any]]] = []
        self.fail = fail

    def patch_namespaced_pod(self, name: str, ns: str, body: dict[str, Any], **kw: Any) -> None:
        self.calls.append((name, ns, body))
        if self.fail:
            raise RuntimeError("apiserver down")


def test_json_lines_rate_limited() -> None:
    buf = io.StringIO()
    seen: list[dict[str, Any]] = []
    r = Reporter(enabled=True, interval=3600, stream=buf, on_progress=seen.append)
    r.emit(force=True, state="training", step=1)
    r.emit(step=2)  # within the interval: not printed
    r.emit(force=True, step=3)
    lines = [json.loads(x) for x in buf.getvalue().splitlines()]
    assert [x["step"] for x in lines] == [1, 3] and seen[-1]["step"] == 3
    assert lines[0]["state"] == "training" and lines[0]["time"].endswith("Z")


def test_disabled_on_other_ranks() -> None:
    buf = io.StringIO()
    r = Reporter(enabled=False, interval=0, stream=buf)
    r.emit(force=True, step=1)
    assert buf.getvalue() == ""


def test_annotator_sends_latest_and_survives_failures() -> None:
    api = FakeApi(fail=True)
    a = PodAnnotator("p-0", "ns", interval=0.2)
    a._api = api
    for i in range(50):
        a.submit(json.dumps({"step": i}))
    time.sleep(0.5)
    a.submit(json.dumps({"step": 99, "state": "succeeded"}))
    a.close()
    assert 2 <= len(api.calls) <= 6, len(api.calls)  # coalesced, not one per report
    name, ns, body = api.calls[-1]
    assert (name, ns) == ("p-0", "ns")
    assert json.loads(body["metadata"]["annotations"][ANNOTATION])["step"] == 99


def test_eta_format() -> None:
    assert format_eta(750) == "12m30s"
    assert format_eta(4000) == "1h06m"
    assert format_eta(None) is None
