"""What ships: a wheel built from a clean copy of the repository installs into a fresh virtual
environment and serves; the small contract modules stay small; library modules leave the
environment alone."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
import pytest

from runners.model_store import StoredModel
from tests.conftest import ROOT, Server
from tests.test_bento import RUNTIME_REQUIREMENTS, RUNTIME_TOP_LEVEL, requirements_of

RUNTIME = {
    "service.py",
    "kubesentiment/settings.py",
    "kubesentiment/jobs/store.py",
    "kubesentiment/jobs/migrations/env.py",
    "runners/engine.py",
    "kafka_worker/__main__.py",
}


def python(code: str, **env: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env or None,
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    return done.stdout.strip()


def test_contract_modules_import_neither_the_engine_nor_its_libraries() -> None:
    loaded = python(
        "import sys, kafka_worker.messages, runners.prediction\n"
        "import kubesentiment.observability, kubesentiment.jobs.store\n"
        "heavy = {'numpy', 'tokenizers', 'onnxruntime', 'torch', 'bentoml', 'runners.engine'}\n"
        "print(sorted(heavy & set(sys.modules)))"
    )
    assert loaded == "[]"


def test_library_modules_leave_the_hub_settings_alone() -> None:
    env = {
        k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    }
    seen = python(
        "import os, runners.engine, runners.services, kafka_worker.worker, models.pipeline\n"
        "print(os.environ.get('HF_HUB_OFFLINE'), os.environ.get('TRANSFORMERS_OFFLINE'))",
        **env,
    )
    assert seen == "None None"


@pytest.mark.integration  # it waits out the hub client's five retries, about 30 s
def test_importing_a_hub_id_asks_the_hub() -> None:
    """`python -m models import <hub id>` must not run offline. A closed local port stands in
    for the hub: the connection is refused, which shows that it was tried."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    }
    done = subprocess.run(
        [sys.executable, "-m", "models", "import", "someone/some-model"],
        cwd=ROOT,
        env={**env, "HF_ENDPOINT": "http://127.0.0.1:9"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2
    assert "Connection refused" in done.stderr and "127.0.0.1:9/someone/some-model" in done.stderr


def clean_copy(target: Path) -> Path:
    """The files a fresh clone of this working tree would have (tracked or not ignored)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, (n.decode() for n in listed)):
        if (ROOT / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target / name)
    return target


@pytest.mark.packaging  # minutes: `make deploy-test` runs it
def test_the_wheel_installs_in_a_fresh_environment_and_serves(
    small_model: StoredModel, tmp_path: Path
) -> None:
    source = clean_copy(tmp_path / "clone")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", str(source), "-w", str(tmp_path)], check=True)
    (wheel,) = tmp_path.glob("kubesentiment-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    assert shipped >= RUNTIME
    # No generic module names in site-packages besides the card's own
    metadata_dir = "kubesentiment-0.1.0.dist-info"
    assert {name.split("/")[0] for name in shipped} == RUNTIME_TOP_LEVEL | {metadata_dir}
    metadata = zipfile.ZipFile(wheel).read(f"{metadata_dir}/METADATA").decode()
    requires = "\n".join(
        line.removeprefix("Requires-Dist: ")
        for line in metadata.splitlines()
        if line.startswith("Requires-Dist: ") and "extra ==" not in line
    )
    assert requirements_of(requires) == requirements_of(RUNTIME_REQUIREMENTS.read_text())

    venv = tmp_path / "venv"
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run(  # every dependency comes from the wheel's own metadata
            [str(venv / "bin" / "python"), *pip[1:], "install", "--no-compile", str(wheel)],
            check=True,
        )
        elsewhere = tmp_path / "elsewhere"  # nothing of the repository on sys.path
        elsewhere.mkdir()
        worker = subprocess.run(
            [str(venv / "bin" / "python"), "-m", "kafka_worker", "--help"],
            cwd=elsewhere,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert worker.returncode == 0 and "KAFKA_BOOTSTRAP_SERVERS" in worker.stdout
        server = Server(
            "service:Sentiment",
            3218,
            bentoml=venv / "bin" / "bentoml",
            cwd=elsewhere,
            JOBS_DB=str(tmp_path / "jobs.db"),
        ).start()
        try:
            r = httpx.post(
                server.url + "/api/v1/predict", json={"text": "A fine film."}, timeout=30
            )
            assert r.status_code == 200 and r.json()["model"]["version"] == small_model.version
        finally:
            server.stop()
    finally:
        shutil.rmtree(venv, ignore_errors=True)  # 1.4 GB
