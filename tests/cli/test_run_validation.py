"""``graft run``/``graft serve`` refuse an invalid file with exit 2 and name the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from clikit import job_yaml

from graft.api.finetunejob import FineTuneJobSpec
from graft.cli import main
from graft.local.run import local_processes

GOOD: dict[str, Any] = {
    "baseModel": {"uri": "file:///models/base"},
    "stages": [{"type": "SFT", "dataset": {"uri": "file:///data.jsonl", "format": "alpaca"}}],
    "output": {"uri": "file:///out"},
}


def with_(path: str, value: Any) -> dict[str, Any]:
    spec = yaml.safe_load(yaml.safe_dump(GOOD))
    *parents, last = path.split(".")
    node = spec
    for p in parents:
        node = node[int(p)] if p.isdigit() else node.setdefault(p, {})
    node[last] = value
    return dict(spec)


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        (with_("hyperparameters.microBatchSize", 0), "spec.hyperparameters.microBatchSize"),
        (with_("stages.0.dataset.format", "csv"), "spec.stages.0.dataset.format"),
        (with_("stages.0.dataset.formt", "text"), "spec.stages.0.dataset.formt"),
        (with_("method", "adapters"), "spec.method"),
        (with_("baseModel.uri", "/no/scheme"), "spec.baseModel.uri"),
        (with_("resources.gpus", -1), "spec.resources.gpus"),
        ({k: v for k, v in GOOD.items() if k != "output"}, "spec.output"),
    ],
)
def test_invalid_spec_names_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], spec: dict[str, Any], field: str
) -> None:
    f = job_yaml(tmp_path / "job.yaml", spec)
    assert main(["run", str(f), "--workdir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err.replace("\n", " ")
    assert field in err
    assert str(f) in err.replace(" ", "") or "job.yaml" in err
    assert not (tmp_path / "w" / "runs").exists(), "nothing runs for an invalid spec"


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("kind: FineTuneJob\napiVersion: graft.dev/v1alpha1\nspec: {}\n", "metadata"),
        (
            "kind: FineTuneJob\napiVersion: graft.dev/v1alpha1\nmetadata: {name: Bad_Name}\n",
            "metadata.name",
        ),
        ("kind: ModelService\napiVersion: graft.dev/v1alpha1\n", "kind: expected FineTuneJob"),
        ("kind: FineTuneJob\napiVersion: v1\nmetadata: {name: a}\n", "apiVersion"),
        ("kind: [unclosed\n", "not valid YAML"),
    ],
)
def test_invalid_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, field: str
) -> None:
    f = tmp_path / "job.yaml"
    f.write_text(text)
    assert main(["run", str(f), "--workdir", str(tmp_path / "w")]) == 2
    assert field in capsys.readouterr().err.replace("\n", " ")


def test_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_serve_names_adapter_without_local_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "svc.yaml"
    f.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "graft.dev/v1alpha1",
                "kind": "ModelService",
                "metadata": {"name": "svc"},
                "spec": {
                    "model": {
                        "baseModel": {"uri": "file:///m"},
                        "adapters": [{"name": "a", "fromFineTuneJob": "never-run"}],
                    }
                },
            }
        )
    )
    from graft.local.serve import ServeOptions, resolve_adapters
    from graft.local.spec import SpecError, load_service

    with pytest.raises(SpecError, match=r"adapters\[a\]\.fromFineTuneJob: no local run"):
        resolve_adapters(load_service(f), ServeOptions(workdir=tmp_path / "w"))


@pytest.mark.parametrize(
    ("resources", "gbs", "mbs", "cpus", "expected"),
    [
        ({}, 8, 1, 2, 1),
        ({"gpus": 0}, 8, 1, 2, 1),
        ({"gpus": 4}, 8, 1, 2, 2),
        ({"gpus": 4}, 8, 1, 16, 4),
        ({"nodes": 2, "gpusPerNode": 8}, 64, 4, 16, 16),
        ({"nodes": 2, "gpusPerNode": 0}, 8, 1, 16, 2),
        ({"gpus": 8}, 12, 2, 8, 6),  # 12 = 2 x 6: the largest count that divides the batch
        ({"gpus": 3}, 8, 4, 8, 2),
    ],
)
def test_gpus_map_to_local_processes(
    resources: dict[str, Any], gbs: int, mbs: int, cpus: int, expected: int
) -> None:
    spec = FineTuneJobSpec.model_validate(
        {
            **GOOD,
            "resources": resources,
            "hyperparameters": {"globalBatchSize": gbs, "microBatchSize": mbs},
        }
    )
    n, why = local_processes(spec, cpus)
    assert n == expected, why


def test_cli_does_not_import_torch_or_ray() -> None:
    import subprocess
    import sys

    code = (
        "import sys, graft.cli, graft.local.run, graft.local.serve, graft.local.plan, graft.demo;"
        "graft.cli.main(['--version'])"
    )
    probe = (
        "import sys, runpy\n"
        "try:\n"
        f"    exec({code!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        "bad = [m for m in ('torch', 'ray', 'transformers') if m in sys.modules]\n"
        "print('IMPORTED', bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert "IMPORTED []" in out.stdout, out.stdout + out.stderr


def test_examples_local_are_what_the_demo_runs() -> None:
    from graft.demo import FINETUNEJOB_YAML, MODELSERVICE_YAML
    from graft.local.spec import load_job, load_service

    root = Path(__file__).resolve().parents[2] / "examples" / "local"
    assert (root / "finetunejob-local.yaml").read_text() == FINETUNEJOB_YAML
    assert (root / "modelservice-local.yaml").read_text() == MODELSERVICE_YAML
    job = load_job(root / "finetunejob-local.yaml")
    assert [s.type.value for s in job.spec.stages] == ["ContinuedPretraining", "SFT"]
    assert job.spec.method.value == "lora"
    svc = load_service(root / "modelservice-local.yaml")
    assert svc.spec.model.adapters[0].from_fine_tune_job == job.name
