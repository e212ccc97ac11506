"""In-process adaptive batching for the entry service.

Requests wait in a queue while the model is busy; the moment it is free, everything queued (up to
the maximum batch size) becomes the next batch. Under light load a request runs alone and at
once; under heavy load batches grow by themselves. Interactive requests always board first; bulk
work (async batch jobs) only fills the seats they leave, so a 100,000-text job never makes a
single `/predict` call wait for more than one batch.

Why not BentoML's own dispatcher between two processes: each hop costs an HTTP round trip per
text on a 2-core machine, and the dispatcher waits to fill batches; both cost more than the model
itself at this size (see docs/performance.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from runners.prediction import Prediction


class Overloaded(Exception):
    """More interactive texts are waiting than the service will queue: answer 503 now rather
    than make the caller wait for a timeout."""


Predict = (
    Callable[[list[str]], list[Prediction]] | Callable[[list[str]], Awaitable[list[Prediction]]]
)
"""Scores one batch: a plain function runs in the inference thread (the model in process); a
coroutine function is awaited on the event loop (a call to a model elsewhere)."""


@dataclass
class _Request:
    texts: Sequence[str]
    future: asyncio.Future[list[Prediction]]


@dataclass(frozen=True)
class QueueState:
    """What an autoscaler or an alert wants to know about the queue."""

    interactive_texts: int  # waiting to board, from /predict and /predict/batch
    bulk_texts: int  # waiting to board, from batch jobs
    requests_in_flight: int  # submitted and not yet answered: waiting or being scored


class BatchScheduler:
    def __init__(
        self,
        predict: Predict,
        max_batch_size: int,
        max_queued_texts: int,
        observe_queue: Callable[[QueueState], None] | None = None,
        observe_dropped: Callable[[int], None] | None = None,
    ) -> None:
        self.predict = predict
        self._awaits_predict = inspect.iscoroutinefunction(predict)
        self.max_batch_size = max_batch_size
        self.max_queued_texts = max_queued_texts
        self.queued_texts = 0  # interactive texts waiting, for admission control
        self.queued_bulk_texts = 0
        self.in_flight = 0
        self.observe_queue = observe_queue
        self.observe_dropped = observe_dropped
        self._interactive: deque[_Request] = deque()
        self._bulk: deque[_Request] = deque()
        self._wakeup = asyncio.Event()
        # One inference thread: the model uses every core already, and the event loop stays free.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self._loop_task: asyncio.Task[None] | None = None

    async def submit(self, texts: Sequence[str], bulk: bool = False) -> list[Prediction]:
        if not bulk and self.queued_texts + len(texts) > self.max_queued_texts:
            raise Overloaded(
                f"{self.queued_texts} texts are already waiting (limit {self.max_queued_texts})"
            )
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._run())
        request = _Request(texts, asyncio.get_running_loop().create_future())
        if bulk:
            self._bulk.append(request)
            self.queued_bulk_texts += len(texts)
        else:
            self._interactive.append(request)
            self.queued_texts += len(texts)
        self.in_flight += 1
        self._changed()
        self._wakeup.set()
        try:
            # Cancelling the caller (its client went away) cancels this future too: the texts
            # are then dropped when their turn comes instead of being scored for nobody.
            return await request.future
        finally:
            self.in_flight -= 1
            self._changed()

    @property
    def state(self) -> QueueState:
        return QueueState(self.queued_texts, self.queued_bulk_texts, self.in_flight)

    def _changed(self) -> None:
        if self.observe_queue is not None:
            self.observe_queue(self.state)

    def _next_batch(self) -> list[_Request]:
        batch: list[_Request] = []
        size = 0
        for lane in (self._interactive, self._bulk):
            while lane and (not batch or size + len(lane[0].texts) <= self.max_batch_size):
                request = lane.popleft()
                if lane is self._interactive:
                    self.queued_texts -= len(request.texts)
                else:
                    self.queued_bulk_texts -= len(request.texts)
                if request.future.cancelled():  # the caller went away
                    if self.observe_dropped is not None:
                        self.observe_dropped(len(request.texts))
                    continue
                batch.append(request)
                size += len(request.texts)
        self._changed()
        return batch

    async def close(self) -> None:
        """Stop the batching loop, then the inference thread once it has finished its batch."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        await asyncio.to_thread(self._executor.shutdown, wait=True)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while batch := self._next_batch():
                texts = [text for request in batch for text in request.texts]
                try:
                    if self._awaits_predict:
                        predictions = await self.predict(texts)  # type: ignore[misc]
                    else:
                        predictions = await loop.run_in_executor(
                            self._executor, self.predict, texts
                        )
                except Exception as err:  # the callers get the error; the loop lives on
                    for request in batch:
                        if not request.future.done():
                            request.future.set_exception(err)
                    continue
                start = 0
                for request in batch:
                    end = start + len(request.texts)
                    if not request.future.done():
                        request.future.set_result(predictions[start:end])
                    start = end
