"""The locust load tests (loadtests/locustfile.py) against a real `bentoml serve` with API keys
on: a short headless run of all three user classes answers every endpoint without one failure
(so the API_KEY header is sent and every check passes), and writes its CSV and HTML reports; the
same run without the key fails with 401s (so the checks can fail). The load shapes' curves are
checked apart, without a server. Locust runs in a subprocess: importing it here would
monkey-patch this whole test process with gevent."""

from __future__ import annotations

import csv
import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from runners.model_store import StoredModel
from tests.conftest import ROOT, Server

pytestmark = pytest.mark.integration

PORT = 3229
LOCUSTFILE = ROOT / "loadtests" / "locustfile.py"
USERS = 6  # PredictUser, BatchPredictUser and BatchJobUser weigh 4:1:1
ENDPOINTS = [
    ("POST", "/api/v1/predict"),
    ("POST", "/api/v1/predict [long]"),
    ("POST", "/api/v1/predict/batch"),
    ("POST", "/api/v1/batch/predict"),
    ("GET", "/api/v1/batch/status/{job_id}"),
    ("GET", "/api/v1/batch/results/{job_id}"),
    ("DELETE", "/api/v1/batch/{job_id}"),
    ("JOB", "submit -> completed -> all results"),
]


@pytest.fixture(scope="module")
def guarded(
    small_model: StoredModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Server, str]]:
    """The entry service with API keys on; yields it and its key."""
    key = secrets.token_urlsafe(24)
    server = Server(
        "service:Sentiment",
        PORT,
        JOBS_DB=str(tmp_path_factory.mktemp("locust") / "jobs.db"),
        API_AUTH="true",
        API_KEYS=f"locust:{key}",
    )
    server.start()
    try:
        yield server, key
    finally:
        server.stop()


def locust(
    server: Server, prefix: Path, *args: str, api_key: str | None = None
) -> subprocess.CompletedProcess[str]:
    """A headless locust run; its CSV files and HTML report are written beside `prefix`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOCUST_") and k != "API_KEY"}
    if api_key is not None:
        env["API_KEY"] = api_key
    command = [
        *(sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless"),
        *("--host", server.url, "--csv", str(prefix), "--html", f"{prefix}.html"),
        *("--only-summary", "--loglevel", "WARNING", *args),
    ]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


def test_every_user_class_runs_without_a_failure_and_writes_reports(
    guarded: tuple[Server, str], tmp_path: Path
) -> None:
    server, key = guarded
    run = locust(
        server,
        tmp_path / "run",
        *("--shape", "constant", "-u", str(USERS), "-r", str(USERS), "-t", "8s"),
        *("--think-time", "0.1", "--long-share", "0.2", "--job-texts", "40", "--page-size", "16"),
        api_key=key,
    )
    output = run.stdout[-3000:] + run.stderr[-3000:]
    assert run.returncode == 0, output
    stats = {(row["Type"], row["Name"]): row for row in rows(tmp_path / "run_stats.csv")}
    for endpoint in ENDPOINTS:
        assert endpoint in stats, f"{endpoint} never called: {sorted(stats)}\n{output}"
        assert int(stats[endpoint]["Request Count"]) > 0, endpoint
    # 40 texts in pages of 16: 3 pages per job.
    jobs = int(stats[ENDPOINTS[-1]]["Request Count"])
    assert int(stats[ENDPOINTS[5]]["Request Count"]) >= 3 * jobs
    total = stats[("", "Aggregated")]
    assert int(total["Failure Count"]) == 0, rows(tmp_path / "run_failures.csv")
    assert rows(tmp_path / "run_failures.csv") == []
    # The shape read -u: all six users ran at once.
    history = rows(tmp_path / "run_stats_history.csv")
    assert max(int(row["User Count"]) for row in history) == USERS
    html = (tmp_path / "run.html").read_text()
    assert "/api/v1/batch/results/{job_id}" in html
    assert key not in html and key not in output and key not in server.log.read_text()


def test_without_the_key_every_request_fails_with_401(
    guarded: tuple[Server, str], tmp_path: Path
) -> None:
    server, _ = guarded
    run = locust(
        server,
        tmp_path / "nokey",
        *("-u", "2", "-r", "2", "-t", "3s", "--long-share", "0"),
        "PredictUser",
    )
    assert run.returncode == 1, run.stdout[-3000:] + run.stderr[-3000:]
    stats = {row["Name"]: row for row in rows(tmp_path / "nokey_stats.csv")}
    predict = stats["/api/v1/predict"]
    assert int(predict["Request Count"]) > 0
    assert predict["Failure Count"] == predict["Request Count"]
    errors = [row["Error"] for row in rows(tmp_path / "nokey_failures.csv")]
    assert errors and all("HTTP 401" in error and "API key" in error for error in errors), errors


LOAD = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("locustfile", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
"""
SHAPES_PROBE = (
    LOAD
    + """
print(json.dumps({
    name: [shape().users_at(t, peak=10, rate=2.0, length=100.0) for t in range(0, 101, 5)]
    for name, shape in module.SHAPES.items()
}))
"""
)


def probe(code: str) -> object:
    """What `code` prints (JSON), run with the locustfile loaded as `module`."""
    run = subprocess.run(
        [sys.executable, "-c", code, str(LOCUSTFILE)],
        cwd=ROOT,  # the locustfile imports loadtests.texts
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(run.stdout)


def test_load_shapes_follow_their_curves_and_end() -> None:
    curves = probe(SHAPES_PROBE)
    assert isinstance(curves, dict)  # users and spawn rate every 5 s of a 100 s run
    users = {name: [tick[0] for tick in ticks[:-1]] for name, ticks in curves.items()}
    assert all(ticks[-1] is None for ticks in curves.values()), "a shape does not end the run"
    assert users["constant"] == [10] * 20
    assert users["ramp"][0] == 1 and users["ramp"] == sorted(users["ramp"])
    assert users["ramp"][15:] == [10] * 5  # held for the last quarter
    assert users["spike"] == [2] * 8 + [10] * 4 + [2] * 8
    assert min(users["wave"]) == 2 and max(users["wave"]) == 10
    assert (
        users["wave"][0] == users["wave"][10] == 2 and users["wave"][5] == users["wave"][15] == 10
    )
    assert all(tick[1] >= 2.0 for ticks in curves.values() for tick in ticks[:-1])


CHECKS_PROBE = (
    LOAD
    + """
texts = ["good", "bad", "fine"]
item = lambda i: {"index": i, "text": texts[i], "sentiment": {"label": "POSITIVE", "score": 0.9}}
page = lambda *items: {"status": "completed", "total": 3, "results": list(items)}
print(json.dumps([
    module.page_problem(page(item(0), item(1)), texts, 0, 2),
    module.page_problem(page(item(2)), texts, 2, 2),
    module.page_problem(page(item(1), item(0)), texts, 0, 2),
    module.page_problem(page(item(0)), texts, 0, 2),
    module.page_problem({**page(item(2)), "status": "running"}, texts, 2, 2),
    module.status_problem({"status": "failed", "error": "boom", "total": 3}, 3),
    module.status_problem({"status": "completed", "total": 3, "processed": 2}, 3),
    module.batch_problem({"results": [item(1), item(0)]}, texts[:2]),
    module.prediction_problem({"text": "good", "sentiment": {"label": "MEH", "score": 1}}, "good"),
]))
"""
)


def test_the_answer_checks_catch_wrong_answers() -> None:
    """Pages in order pass; out of order, short, unfinished, failed or mislabelled do not."""
    problems = probe(CHECKS_PROBE)
    assert isinstance(problems, list)
    assert problems[:2] == [None, None]
    assert all(problems[2:]), problems
    assert "boom" in problems[5]
