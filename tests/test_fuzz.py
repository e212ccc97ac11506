"""Property-based fuzzing of the HTTP API with schemathesis, against a real `bentoml serve` and
the OpenAPI document that the service itself serves at /docs.json: every operation, with
schema-valid and schema-breaking data (`--mode all`), through the API-key gate. No answer may be
a 5xx, every answer must be documented (status, content type, body schema), invalid data must be
refused with a 4xx and valid data accepted, undeclared methods get 405, requests without a key
are refused.

Reproduce a failure with the seed of its report: FUZZ_SEED=<seed> pytest tests/test_fuzz.py.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from runners.model_store import StoredModel
from tests.conftest import Server

PORT = 3224
ST = Path(sys.executable).parent / "st"
# Test cases per operation and phase: 650-950 in all, 17-30 s on 2 cores.
MAX_EXAMPLES = 50
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "negative_data_rejection",  # --mode all: schema-breaking data gets a 4xx
    "positive_data_acceptance",  # and schema-valid data is not refused
    "unsupported_method",  # 405 for a method that the document does not list
    "ignored_auth",  # the gate refuses requests without (or with a wrong) key
)


@pytest.fixture(scope="module")
def guarded_key(
    small_model: StoredModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """The entry service with API keys on and a rate limit that fuzzing never reaches (so 429 is
    documented but not answered); yields the key."""
    key = secrets.token_urlsafe(24)  # 32 characters
    server = Server(
        "service:Sentiment",
        PORT,
        JOBS_DB=str(tmp_path_factory.mktemp("fuzz") / "jobs.db"),
        API_AUTH="true",
        API_KEYS=f"fuzz:{key}",
        RATE_LIMIT_PER_SECOND="100000",
        RATE_LIMIT_BURST="100000",
        # Smaller limits (the document shows them): generated jobs of up to 100,000 long texts
        # would keep the model busy in the background and double the run's time.
        MAX_TEXT_CHARS="2000",
        MAX_BATCH_TEXTS="32",
        MAX_JOB_TEXTS="64",
    )
    server.start()
    try:
        yield key
    finally:
        server.stop()


def test_fuzzing_finds_no_failure(
    guarded_key: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    record_property: Callable[[str, object], None],
) -> None:
    report = tmp_path / "report.json"
    seed = os.environ.get("FUZZ_SEED")
    command = [
        str(ST),
        "run",
        f"http://127.0.0.1:{PORT}/docs.json",
        "--mode=all",
        f"--checks={','.join(CHECKS)}",
        f"--max-examples={MAX_EXAMPLES}",
        *([f"--seed={seed}"] if seed else []),
        "--generation-database=none",  # no replay of earlier runs' cases: each run is its own
        "--request-timeout=30",
        "--no-color",
        "--report=json",
        f"--report-json-path={report}",
        "--header",
        f"Authorization: Bearer {guarded_key}",  # schemathesis prints it as [Filtered]
    ]
    started = time.monotonic()
    run = subprocess.run(
        command,
        cwd=tmp_path,  # schemathesis keeps a cache folder in its working directory
        capture_output=True,
        text=True,
        timeout=300,
    )
    seconds = time.monotonic() - started
    output = run.stdout + run.stderr
    assert report.exists(), output
    summary = json.loads(report.read_text())
    figures = {
        "operations_tested": summary["operations"]["tested"],
        "operations_total": summary["operations"]["total"],
        "test_cases_generated": summary["test_cases"]["generated"],
        "test_cases_with_failures": summary["test_cases"]["with_failures"],
        "unique_failures": summary["test_cases"]["unique_failures"],
        "errors": len(summary["errors"]),
        "seed": summary["seed"],
        "seconds": round(seconds, 1),
    }
    for name, value in figures.items():
        record_property(name, value)
    with capsys.disabled():
        print(f"\nschemathesis {summary['schemathesis_version']}: {json.dumps(figures)}")
    if run.returncode != 0:
        pytest.fail(f"schemathesis found failures (exit {run.returncode}):\n{output}")
    assert figures["operations_tested"] == figures["operations_total"], output
