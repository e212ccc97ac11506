"""The SQLite job store: a job, its progress and its results survive reopening the file."""

from __future__ import annotations

from pathlib import Path

from jobs import JobStore
from runners.engine import Prediction


def test_job_progress_and_results_survive_a_reopen(tmp_path: Path) -> None:
    db = tmp_path / "jobs.db"
    store = JobStore(db)
    job = store.create([f"text {i}" for i in range(10)])
    assert (job.status, job.total, job.done) == ("queued", 10, 0)
    assert store.pending(job, 4) == ["text 0", "text 1", "text 2", "text 3"]
    job = store.save(job, [Prediction("POSITIVE", 0.9)] * 4)
    assert (job.status, job.done) == ("running", 4)
    store.close()

    reopened = JobStore(db)
    resumed = reopened.next_unfinished()
    assert resumed is not None and resumed.id == job.id and resumed.done == 4
    assert reopened.pending(resumed, 100) == [f"text {i}" for i in range(4, 10)]
    finished = reopened.save(resumed, [Prediction("NEGATIVE", 0.8)] * 6)
    assert finished.status == "completed"
    assert reopened.next_unfinished() is None
    page = reopened.results(job.id, offset=3, limit=2)
    assert [(r.index, r.label) for r in page] == [(3, "POSITIVE"), (4, "NEGATIVE")]
    assert reopened.get("unknown") is None


def test_a_failed_job_keeps_its_reason(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.db")
    job = store.create(["a"])
    store.fail(job, "RuntimeError: boom")
    failed = store.get(job.id)
    assert failed is not None and (failed.status, failed.error) == ("failed", "RuntimeError: boom")
    assert store.next_unfinished() is None
