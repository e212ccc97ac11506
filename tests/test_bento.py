"""`bentoml build` works offline, ships src/ and nothing else, pins the model version and the CPU
build of torch, and the built Bento serves, in process and in the split layout."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from runners.model_store import StoredModel
from tests.conftest import ROOT, Server


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
    shipped = {str(p.relative_to(bento_dir / "src")) for p in (bento_dir / "src").rglob("*.py")}
    assert shipped >= {"service.py", "job_loop.py", "runners/engine.py", "kafka_worker/worker.py"}
    assert not [
        p for p in shipped if p.startswith(("models/", "devtools/", "tests/", "loadtests/"))
    ]
    requirements = (bento_dir / "env" / "python" / "requirements.txt").read_text()
    assert "torch==2.13.0+cpu" in requirements and "whl/cpu" in requirements
    assert "aiokafka==0.14.0" in requirements  # the same image runs the Kafka worker
    dockerfile = (bento_dir / "env" / "docker" / "Dockerfile").read_text()
    assert "requirements.txt" in dockerfile

    server = Server(tag, port, RUNNER_LAYOUT=layout, JOBS_DB=str(tmp_path / "jobs.db")).start()
    try:
        r = httpx.post(server.url + "/api/v1/predict", json={"text": "A fine film."}, timeout=30)
        assert r.status_code == 200 and r.json()["model"]["version"] == small_model.version
    finally:
        server.stop()
