"""Async batch jobs, kept in SQLite so that a restart loses neither a job nor its finished work.

Texts and their results live in one table; `done` counts the texts scored so far, in input
order, so a restarted service resumes a job where it stopped instead of starting over. Finished
jobs are deleted after the retention period (`purge`), or at once on request (`delete`): user
text is not kept longer than it is needed.
"""

from __future__ import annotations

import sqlite3
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from runners.prediction import Prediction

JobState = Literal["queued", "running", "completed", "failed"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    total INTEGER NOT NULL,
    done INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    error TEXT
);
CREATE TABLE IF NOT EXISTS job_texts (
    job_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    text TEXT NOT NULL,
    label TEXT,
    score REAL,
    PRIMARY KEY (job_id, idx)
) WITHOUT ROWID;
"""


@dataclass(frozen=True)
class Job:
    id: str
    status: JobState
    total: int
    done: int
    created: float
    updated: float
    error: str | None


@dataclass(frozen=True)
class JobResult:
    index: int
    text: str
    label: str
    score: float


class JobStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()

    def create(self, texts: Sequence[str]) -> Job:
        job_id, now = uuid.uuid4().hex, time.time()
        with self._lock, self._db:
            self._db.execute("BEGIN")
            self._db.execute(
                "INSERT INTO jobs (id, status, total, created, updated) VALUES (?, ?, ?, ?, ?)",
                (job_id, "queued", len(texts), now, now),
            )
            self._db.executemany(
                "INSERT INTO job_texts (job_id, idx, text) VALUES (?, ?, ?)",
                ((job_id, i, text) for i, text in enumerate(texts)),
            )
        job = self.get(job_id)
        assert job is not None
        return job

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            row = self._db.execute(
                "SELECT id, status, total, done, created, updated, error FROM jobs WHERE id = ?",
                (job_id,),
            ).fetchone()
        return Job(*row) if row else None

    def next_unfinished(self) -> Job | None:
        """The oldest job still to do, including one a restart interrupted."""
        with self._lock:
            row = self._db.execute(
                "SELECT id FROM jobs WHERE status IN ('queued', 'running') ORDER BY created LIMIT 1"
            ).fetchone()
        return self.get(row[0]) if row else None

    def pending(self, job: Job, limit: int) -> list[str]:
        """The next texts to score, in input order, starting after the scored ones."""
        with self._lock:
            rows = self._db.execute(
                "SELECT text FROM job_texts WHERE job_id = ? AND idx >= ? ORDER BY idx LIMIT ?",
                (job.id, job.done, limit),
            ).fetchall()
        return [row[0] for row in rows]

    def save(self, job: Job, predictions: Sequence[Prediction]) -> Job | None:
        """Store results for the texts right after the scored ones, and move `done` on. None when
        the job was deleted meanwhile."""
        with self._lock, self._db:
            self._db.execute("BEGIN")
            self._db.executemany(
                "UPDATE job_texts SET label = ?, score = ? WHERE job_id = ? AND idx = ?",
                ((p.label, p.score, job.id, job.done + i) for i, p in enumerate(predictions)),
            )
            done = job.done + len(predictions)
            status = "completed" if done >= job.total else "running"
            self._db.execute(
                "UPDATE jobs SET done = ?, status = ?, updated = ? WHERE id = ?",
                (done, status, time.time(), job.id),
            )
        return self.get(job.id)

    def fail(self, job: Job, error: str) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE jobs SET status = 'failed', error = ?, updated = ? WHERE id = ?",
                (error, time.time(), job.id),
            )

    def delete(self, job_id: str) -> bool:
        """Remove a job, its texts and its results, whatever its state; False if unknown."""
        with self._lock, self._db:
            self._db.execute("BEGIN")
            found = self._db.execute("DELETE FROM jobs WHERE id = ?", (job_id,)).rowcount > 0
            self._db.execute("DELETE FROM job_texts WHERE job_id = ?", (job_id,))
        return found

    def purge(self, finished_before: float) -> list[str]:
        """Delete completed and failed jobs last updated before `finished_before` (epoch s)."""
        with self._lock:
            expired = [
                row[0]
                for row in self._db.execute(
                    "SELECT id FROM jobs WHERE status IN ('completed', 'failed') AND updated < ?",
                    (finished_before,),
                )
            ]
        for job_id in expired:
            self.delete(job_id)
        return expired

    def results(self, job_id: str, offset: int, limit: int) -> list[JobResult]:
        with self._lock:
            rows = self._db.execute(
                "SELECT idx, text, label, score FROM job_texts "
                "WHERE job_id = ? AND label IS NOT NULL AND idx >= ? ORDER BY idx LIMIT ?",
                (job_id, offset, limit),
            ).fetchall()
        return [JobResult(*row) for row in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()
