"""`bentoml build` from the root of the checkout (the project is not installed in the test
environment) works offline, ships the runtime code and nothing else, pins the model version and
the CPU build of torch, and the built Bento serves, in process and in the split layout."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml
from packaging.requirements import Requirement

from runners.model_store import StoredModel
from tests.conftest import ROOT, Server

# Minutes each, and the artefact the image is built from: `make deploy-test` runs them.
pytestmark = pytest.mark.packaging
RUNTIME_TOP_LEVEL = {"service.py", "runners", "kafka_worker", "kubesentiment"}
RUNTIME_REQUIREMENTS = ROOT / "requirements" / "runtime.txt"


def requirements_of(text: str) -> set[str]:
    """The requirement lines of a requirements file, comments and BentoML's own pin left out."""
    lines = (line.split("#")[0].strip() for line in text.splitlines())
    found = {str(Requirement(line)) for line in lines if line and not line.startswith("-")}
    return {line for line in found if not line.startswith("bentoml")}


@pytest.mark.parametrize(
    ("layout", "services", "port"),
    [("in-process", ["kubesentiment"], 3213), ("split", ["kubesentiment", "onnx-runner"], 3223)],
)
def test_bento_builds_offline_pins_model_and_serves(
    small_model: StoredModel, tmp_path: Path, layout: str, services: list[str], port: int
) -> None:
    bentoml = Path(sys.executable).parent / "bentoml"
    built = subprocess.run(  # the layout at build time is the service graph the Bento records
        [str(bentoml), "build", "--output", "tag"],
        cwd=ROOT,
        env={**os.environ, "RUNNER_LAYOUT": layout},
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    tag = built.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    name, version = tag.split(":")
    bento_dir = Path(os.environ["BENTOML_HOME"]) / "bentos" / name / version
    manifest = yaml.safe_load((bento_dir / "bento.yaml").read_text())
    assert [svc["name"] for svc in manifest["services"]] == services
    assert {m["tag"] for svc in manifest["services"] for m in svc["models"]} == {small_model.tag}
    src = bento_dir / "src"
    shipped = {str(p.relative_to(src)) for p in src.rglob("*") if p.is_file()}
    assert shipped >= {
        "service.py",
        "runners/engine.py",
        "kafka_worker/worker.py",
        "kubesentiment/jobs/loop.py",
        "kubesentiment/jobs/migrations/versions/r0001_jobs_and_texts.py",
    }
    # bentofile.yaml: BentoML copies its build configuration into every Bento
    assert {p.split("/")[0] for p in shipped} == RUNTIME_TOP_LEVEL | {"bentofile.yaml"}
    requirements = (bento_dir / "env" / "python" / "requirements.txt").read_text()
    assert requirements_of(requirements) == requirements_of(RUNTIME_REQUIREMENTS.read_text())
    assert "aiokafka==0.14.0" in requirements  # the same image runs the Kafka worker
    assert "onnx>" not in requirements  # only the training pipeline exports to ONNX
    # torch==2.13.0 resolves to 2.13.0+cpu there: a local version sorts above PyPI's CUDA build
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in requirements
    dockerfile = (bento_dir / "env" / "docker" / "Dockerfile").read_text()
    assert "requirements.txt" in dockerfile

    server = Server(tag, port, RUNNER_LAYOUT=layout, JOBS_DB=str(tmp_path / "jobs.db")).start()
    try:
        r = httpx.post(server.url + "/api/v1/predict", json={"text": "A fine film."}, timeout=30)
        assert r.status_code == 200 and r.json()["model"]["version"] == small_model.version
    finally:
        server.stop()
