"""The SQLite job store: a job, its progress and its results survive reopening the file; a
deleted or expired job leaves nothing behind."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from jobs import JobStore
from runners.prediction import Prediction


def test_job_progress_and_results_survive_a_reopen(tmp_path: Path) -> None:
    db = tmp_path / "jobs.db"
    store = JobStore(db)
    job = store.create([f"text {i}" for i in range(10)])
    assert (job.status, job.total, job.done) == ("queued", 10, 0)
    assert store.pending(job, 4) == ["text 0", "text 1", "text 2", "text 3"]
    saved = store.save(job, [Prediction("POSITIVE", 0.9)] * 4)
    assert saved is not None and (saved.status, saved.done) == ("running", 4)
    store.close()

    reopened = JobStore(db)
    resumed = reopened.next_unfinished()
    assert resumed is not None and resumed.id == job.id and resumed.done == 4
    assert reopened.pending(resumed, 100) == [f"text {i}" for i in range(4, 10)]
    finished = reopened.save(resumed, [Prediction("NEGATIVE", 0.8)] * 6)
    assert finished is not None and finished.status == "completed"
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


def rows(db: Path, job_id: str) -> int:
    with sqlite3.connect(db) as con:
        return con.execute("SELECT COUNT(*) FROM job_texts WHERE job_id = ?", (job_id,)).fetchone()[
            0
        ]


def test_delete_removes_the_job_and_every_text(tmp_path: Path) -> None:
    db = tmp_path / "jobs.db"
    store = JobStore(db)
    running = store.create(["a", "b", "c"])
    kept = store.create(["d"])
    assert store.delete(running.id) is True
    assert store.get(running.id) is None and rows(db, running.id) == 0
    assert store.delete(running.id) is False  # unknown now
    assert store.save(running, [Prediction("POSITIVE", 0.9)]) is None  # the loop sees it gone
    assert store.get(kept.id) is not None and rows(db, kept.id) == 1


def test_purge_deletes_only_finished_jobs_older_than_the_cutoff(tmp_path: Path) -> None:
    db = tmp_path / "jobs.db"
    store = JobStore(db)
    completed = store.create(["a"])
    store.save(completed, [Prediction("POSITIVE", 0.9)])
    failed = store.create(["b"])
    store.fail(failed, "RuntimeError: boom")
    queued = store.create(["c"])
    assert store.purge(finished_before=time.time() - 60) == []  # all younger than a minute
    assert sorted(store.purge(finished_before=time.time() + 1)) == sorted([completed.id, failed.id])
    assert store.get(completed.id) is None and rows(db, completed.id) == 0
    assert store.get(failed.id) is None and rows(db, failed.id) == 0
    assert store.get(queued.id) is not None  # unfinished work is never expired
