"""``graft serve`` applies the operator's promotion gate to ``graft run``'s state files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from graft.local import state as st
from graft.local.serve import ServeOptions, resolve_adapters
from graft.local.spec import load_service


def write_job(tmp: Path, name: str, *, gate: bool, evaluation: dict[str, Any] | None) -> None:
    """A job file and the state ``graft run`` leaves after it succeeded."""
    spec: dict[str, Any] = {"baseModel": {"uri": "file:///m"}}
    if gate:
        spec["evaluation"] = {"gate": {"maxPerplexityRatio": 0.9}}
    job_file = tmp / f"{name}.yaml"
    job_file.write_text(yaml.safe_dump({"kind": "FineTuneJob", "spec": spec}))
    record: dict[str, Any] = {
        "kind": "FineTuneJob",
        "name": name,
        "file": str(job_file),
        "phase": "Succeeded",
        "output": {"uri": f"file:///out/{name}", "kind": "adapter", "path": f"/out/{name}"},
    }
    if evaluation is not None:
        record["evaluation"] = evaluation
    st.write_state(tmp / "w", name, record)


def service(tmp: Path, adapters: list[dict[str, Any]]) -> Path:
    f = tmp / "svc.yaml"
    f.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "graft.dev/v1alpha1",
                "kind": "ModelService",
                "metadata": {"name": "svc"},
                "spec": {"model": {"baseModel": {"uri": "file:///m"}, "adapters": adapters}},
            }
        )
    )
    return f


@pytest.mark.parametrize(
    ("gate", "evaluation", "allow", "served"),
    [
        (True, {"passed": True}, False, True),
        (True, {"passed": False}, False, False),
        (True, {"passed": False}, True, True),
        (True, None, False, False),  # a gate and no result
        (False, None, False, True),  # no gate
        (False, {"passed": None}, False, True),
    ],
)
def test_gate_keeps_a_failed_adapter_out(
    tmp_path: Path, gate: bool, evaluation: dict[str, Any] | None, allow: bool, served: bool
) -> None:
    write_job(tmp_path, "j", gate=gate, evaluation=evaluation)
    adapter: dict[str, Any] = {"name": "a", "fromFineTuneJob": "j"}
    if allow:
        adapter["allowUnevaluated"] = True
    notes: list[str] = []
    out = resolve_adapters(
        load_service(service(tmp_path, [adapter, {"name": "b", "uri": "file:///b"}])),
        ServeOptions(workdir=tmp_path / "w"),
        notes,
    )
    assert [a.name for a in out] == (["a", "b"] if served else ["b"])
    if served:
        assert not notes
    else:
        [note] = notes
        assert "FineTuneJob 'j'" in note and "allowUnevaluated: true" in note


def test_canary_from_a_local_run(tmp_path: Path) -> None:
    write_job(tmp_path, "v2", gate=True, evaluation={"passed": True})
    adapter = {
        "name": "a",
        "uri": "file:///a/v1",
        "canary": {"fromFineTuneJob": "v2", "weight": 25},
    }
    [a] = resolve_adapters(
        load_service(service(tmp_path, [adapter])), ServeOptions(workdir=tmp_path / "w")
    )
    assert a.uri == "file:///a/v1"
    assert a.canary is not None and (a.canary.uri, a.canary.weight) == ("file:///out/v2", 25)
