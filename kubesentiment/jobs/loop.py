"""The background loop that runs async batch jobs: it claims a chunk of texts (jobs.py leases
it), scores it through the bulk lane of the scheduler and stores the results. Every worker
process of every replica runs one; they share the work through the store.

It is supervised: an error outside one job (the database is away, a disk filled up) is logged
and retried with backoff instead of ending the loop for good, and `state` says so, for the
health endpoint. It stops cleanly: `stop()` lets the chunk in flight finish and be saved, so a
job interrupted by a shutdown resumes after the restart without scoring any text twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Literal

import structlog

from kubesentiment.jobs.store import Chunk, JobStore
from kubesentiment.observability import get_metrics
from runners.prediction import Prediction
from runners.scheduler import Overloaded

log = structlog.get_logger("kubesentiment.jobs")
LoopState = Literal["starting", "running", "retrying", "stopped"]
IDLE_POLL_S = 5.0
PURGE_EVERY_S = 60.0
MIN_BACKOFF_S, MAX_BACKOFF_S = 1.0, 60.0


class JobLoop:
    def __init__(
        self,
        store: JobStore,
        score: Callable[[list[str]], Awaitable[list[Prediction]]],
        chunk: int,
        retention: timedelta,
    ) -> None:
        self.store = store
        self.score = score
        self.chunk = chunk
        self.retention = retention
        self.state: LoopState = "starting"
        self.error: str | None = None
        self.wakeup = asyncio.Event()
        self.stopping = asyncio.Event()
        self.next_purge = 0.0
        self.task: asyncio.Task[None] | None = None
        # Who holds a lease, for the logs of whoever finds it expired.
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"

    def start(self) -> None:
        # Keep a reference: the event loop holds tasks weakly.
        self.task = asyncio.get_running_loop().create_task(self.run())

    async def run(self) -> None:
        backoff = MIN_BACKOFF_S
        while not self.stopping.is_set():
            try:
                worked = await self.step()
                self.state, self.error, backoff = "running", None, MIN_BACKOFF_S
            except Exception as err:
                # Health shows `error` to anyone: the class says what failed; the message may
                # name the database's host, user and SQL, and goes to the log only.
                self.state, self.error = "retrying", type(err).__name__
                log.exception("job loop failed; retrying", retry_in_s=backoff)
                await self.pause(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
                continue
            if not worked:
                await self.pause(IDLE_POLL_S, wake_on_submit=True)
        self.state = "stopped"

    async def step(self) -> bool:
        """One unit of work: bring the store's schema up to date if it is not yet (the database
        may have been away when the service started), delete expired jobs when due, then claim
        and score one chunk of the next job in turn (JobStore.claim). False when there was nothing
        to claim."""
        if not self.store.migrated:
            await asyncio.to_thread(self.store.migrate)
            log.info("job store ready")
        if time.monotonic() >= self.next_purge:
            cutoff = time.time() - self.retention.total_seconds()
            if expired := await asyncio.to_thread(self.store.purge, cutoff):
                log.info("expired batch jobs deleted", jobs=len(expired))
            # A short retention (tests, strict privacy settings) is honoured to the second.
            self.next_purge = time.monotonic() + min(PURGE_EVERY_S, self.retention.total_seconds())
        self.wakeup.clear()  # before looking, so a job submitted meanwhile wakes us
        chunk = await asyncio.to_thread(self.store.claim, self.owner, self.chunk)
        if chunk is None:
            return False
        await self.run_chunk(chunk)
        return True

    async def run_chunk(self, chunk: Chunk) -> None:
        renewing = asyncio.ensure_future(self.keep_leased(chunk))
        try:
            predictions = await self.score(chunk.texts)
        except Overloaded:  # the model is busy or away (split layout): not the job's fault
            raise  # run() retries with backoff; the chunk is claimed again when its lease ends
        except Exception as err:  # a job fails alone; the service and other jobs go on
            log.exception("batch job failed", job_id=chunk.job_id)
            await asyncio.to_thread(self.store.fail, chunk.job_id, f"{type(err).__name__}: {err}")
            get_metrics().jobs.labels("failed").inc()
            return
        finally:
            renewing.cancel()
        saved = await asyncio.to_thread(self.store.save, chunk, predictions)
        if saved is None:
            log.info("batch job deleted while running", job_id=chunk.job_id)
            return
        get_metrics().job_texts.inc(len(chunk.texts))
        if saved.status == "completed":
            get_metrics().jobs.labels("completed").inc()
            log.info("batch job completed", job_id=chunk.job_id, texts=saved.total)

    async def keep_leased(self, chunk: Chunk) -> None:
        while True:
            await asyncio.sleep(self.store.lease_seconds / 3)
            await asyncio.to_thread(self.store.renew, chunk, self.owner)

    async def pause(self, seconds: float, wake_on_submit: bool = False) -> None:
        """Sleep, but wake at once when asked to stop (or, if asked, when a job is submitted)."""
        events = [self.stopping, self.wakeup] if wake_on_submit else [self.stopping]
        waiters = [asyncio.ensure_future(event.wait()) for event in events]
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        for waiter in waiters:
            waiter.cancel()

    async def stop(self, timeout: timedelta) -> None:
        """Finish and save the chunk in flight, then end. A chunk still running after `timeout`
        is abandoned; its job stays resumable and that chunk is scored again after a restart."""
        self.stopping.set()
        if self.task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self.task), timeout.total_seconds())
        except TimeoutError:
            log.warning("job loop did not stop in time; abandoning its chunk in flight")
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
