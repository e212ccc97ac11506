"""The job loop over a real SQLite job store, with a stand-in model (the test decides when it
fails): a busy model delays a job, a job whose texts break the model fails alone."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

from kubesentiment.jobs.loop import JobLoop
from kubesentiment.jobs.store import JobStore, database_url
from runners.prediction import Prediction
from runners.scheduler import Overloaded


def run_until_finished(store: JobStore, loop: JobLoop, job_id: str) -> None:
    async def scenario() -> None:
        loop.start()
        for _ in range(400):
            job = store.get(job_id)
            if job is not None and job.status in ("completed", "failed"):
                break
            await asyncio.sleep(0.05)
        await loop.stop(timedelta(seconds=5))

    asyncio.run(scenario())


def test_a_busy_model_delays_a_job_but_does_not_fail_it(tmp_path: Path) -> None:
    store = JobStore(database_url(None, tmp_path / "jobs.db"), lease_seconds=0.2)
    job = store.create(["a", "b", "c"])
    calls: list[list[str]] = []

    async def score(texts: list[str]) -> list[Prediction]:
        calls.append(texts)
        if len(calls) == 1:
            raise Overloaded("the runner service did not score the batch")
        return [Prediction("POSITIVE", 0.9) for _ in texts]

    loop = JobLoop(store, score, chunk=2, retention=timedelta(hours=1))
    run_until_finished(store, loop, job.id)
    finished = store.get(job.id)
    assert finished is not None and (finished.status, finished.done) == ("completed", 3)
    assert calls[0] == ["a", "b"] and ["a", "b"] in calls[1:]  # the refused chunk came back
    assert loop.state == "stopped"


def test_a_job_that_breaks_the_model_fails_alone(tmp_path: Path) -> None:
    store = JobStore(database_url(None, tmp_path / "jobs.db"))
    broken = store.create(["boom"])
    fine = store.create(["fine"])

    async def score(texts: list[str]) -> list[Prediction]:
        if "boom" in texts:
            raise ValueError("cannot tokenise")
        return [Prediction("NEGATIVE", 0.7) for _ in texts]

    run_until_finished(store, JobLoop(store, score, chunk=8, retention=timedelta(hours=1)), fine.id)
    failed, done = store.get(broken.id), store.get(fine.id)
    assert failed is not None and (failed.status, failed.error) == (
        "failed",
        "ValueError: cannot tokenise",
    )
    assert done is not None and done.status == "completed"
