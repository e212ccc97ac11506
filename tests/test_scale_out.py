"""Scaling out and up. Replicas sharing jobs on a real PostgreSQL: two `bentoml serve` instances,
one database; a job submitted to one is polled and paged on the other; the instance scoring it
is SIGKILLed and the other finishes it; every text ends with exactly one result. And two worker
processes in one instance: jobs shared, no text scored twice, metrics summed, not doubled. And
the split layout, the model in a runner service of its own, answering as the in-process one."""

from __future__ import annotations

import re
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from runners.model_store import StoredModel
from tests.conftest import Server, fresh_database
from tests.test_service import TEXTS, eventually, positive, post, scored_rows, wait_for_job


def test_two_replicas_share_a_job_and_one_finishes_what_a_killed_one_left(
    small_model: StoredModel, postgres: str
) -> None:
    url = fresh_database(postgres)
    one = Server("service:Sentiment", 3219, JOBS_DATABASE_URL=url, JOB_LEASE="3s").start()
    two = Server("service:Sentiment", 3220, JOBS_DATABASE_URL=url, JOB_LEASE="3s").start()
    texts = [f"{TEXTS[i % 4]} #{i}" for i in range(6_000)]
    try:
        job = post(one, "/api/v1/batch/predict", {"texts": texts}).json()
        status_path = f"/api/v1/batch/status/{job['job_id']}"
        eventually(lambda: httpx.get(two.url + status_path).json()["processed"] > 0, "started")
        one.stop(signal.SIGKILL)  # mid-job, with a chunk leased and unsaved
        assert wait_for_job(two, job["job_id"], timeout=300)["status"] == "completed"
        indices: list[int] = []
        for offset in range(0, len(texts), 2_500):
            page = httpx.get(
                f"{two.url}/api/v1/batch/results/{job['job_id']}",
                params={"offset": offset, "limit": 2_500},
            ).json()
            indices += [x["index"] for x in page["results"]]
        assert indices == list(range(len(texts)))  # none lost, none twice
        assert httpx.get(two.url + status_path).json()["processed"] == len(texts)
    finally:
        one.stop()
        two.stop()
    # Both replicas scored (the work was shared), and only what the killed one had leased and
    # not saved was scored again: at most its chunk in flight (32) over the 6,000 and 2 warm-ups.
    first, second = scored_rows(one), scored_rows(two)
    again = first + second - len(texts) - 2
    print(f"replicas: {len(texts)} texts, lost 0, duplicated in results 0, scored again {again}")
    assert first > 1 and second > 1 and 0 <= again <= 32


def test_two_worker_processes_share_the_jobs_and_their_metrics_add_up(
    small_model: StoredModel, tmp_path: Path
) -> None:
    server = Server(
        "service:Sentiment",
        3221,
        JOBS_DB=str(tmp_path / "jobs.db"),
        SERVICE_WORKERS="2",
        INFERENCE_THREADS="1",
    ).start()
    texts = [f"{TEXTS[i % 4]} @{i}" for i in range(3_000)]
    try:
        jobs = [
            post(server, "/api/v1/batch/predict", {"texts": part}).json()
            for part in (texts[:1_500], texts[1_500:])
        ]
        for job in jobs:
            assert wait_for_job(server, job["job_id"], timeout=300)["status"] == "completed"
        metrics = httpx.get(server.url + "/api/v1/metrics").text
    finally:
        server.stop()
    predicted = re.findall(r"^kubesentiment_predictions_total\{[^}]*\} ([0-9.e+]+)$", metrics, re.M)
    assert sum(float(value) for value in predicted) == len(texts)  # summed over both workers
    for gauge in (
        'kubesentiment_queued_texts{lane="bulk"}',
        "kubesentiment_scheduler_requests_in_flight",
    ):
        assert re.search(rf"^{re.escape(gauge)} 0\.0$", metrics, re.M), gauge
    # One warm-up text per worker, and each job text scored by exactly one of them, once.
    assert scored_rows(server) == len(texts) + 2


def test_the_split_layout_answers_as_the_in_process_one(service: Server, tmp_path: Path) -> None:
    """RUNNER_LAYOUT=split: `bentoml serve` starts the runner service beside the entry service,
    which calls it once per batch (with the internal token, which the runner checks)."""
    split = Server(
        "service:Sentiment",
        3222,
        RUNNER_LAYOUT="split",
        RUNNER_TOKEN=RUNNER_TOKEN,
        JOBS_DB=str(tmp_path / "jobs.db"),
    ).start()
    texts = [f"{text} ({i})" for i, text in enumerate(TEXTS * 8)]
    try:
        with ThreadPoolExecutor(16) as pool:  # concurrent singles: batches cross the hop
            singles = list(pool.map(lambda t: post(split, "/api/v1/predict", {"text": t}), texts))
        job = post(split, "/api/v1/batch/predict", {"texts": texts}).json()
        assert wait_for_job(split, job["job_id"])["status"] == "completed"
        paged = httpx.get(f"{split.url}/api/v1/batch/results/{job['job_id']}").json()["results"]
    finally:
        split.stop()
    here = post(service, "/api/v1/predict/batch", {"texts": texts}).json()["results"]
    assert all(r.status_code == 200 for r in singles)
    for local, remote, queued in zip(here, [r.json() for r in singles], paged, strict=True):
        # int8 activations are quantised per batch: a text's neighbours move its score a little
        # (up to about 0.03 in a fully quantised graph), enough to flip the label of a text
        # scored within that of 0.5.
        assert positive(remote) == pytest.approx(positive(local), abs=0.05)
        assert positive(queued) == pytest.approx(positive(local), abs=0.05)
        if abs(positive(local) - 0.5) > 0.05:
            labels = {x["sentiment"]["label"] for x in (local, remote, queued)}
            assert len(labels) == 1, (local, remote, queued)


RUNNER_TOKEN = "runner-token-7c1f"


def test_a_runner_service_takes_calls_from_its_entry_service_only(small_model: StoredModel) -> None:
    """A runner deployed apart listens on TCP and unpickles what its callers send: without the
    internal token it answers 403 to everyone (its probes stay open), and it applies the entry
    service's text limits itself."""
    runner = Server("runners.services:OnnxRunner", 3233, RUNNER_TOKEN=RUNNER_TOKEN).start()
    try:
        url = runner.url + "/predict"
        body = {"texts": ["A fine film."]}
        assert httpx.post(url, json=body, timeout=30).status_code == 403
        wrong = {"X-Runner-Token": "guess"}
        assert httpx.post(url, json=body, headers=wrong, timeout=30).status_code == 403
        right = {"X-Runner-Token": RUNNER_TOKEN}
        answer = httpx.post(url, json=body, headers=right, timeout=30)
        assert answer.status_code == 200 and answer.json()[0]["label"] in ("POSITIVE", "NEGATIVE")
        heavy = {"texts": ["😍" * 20_000]}
        assert httpx.post(url, json=heavy, headers=right, timeout=60).status_code == 400
        assert httpx.get(runner.url + "/readyz", timeout=10).status_code == 200
    finally:
        runner.stop()
