"""In-process adaptive batching for the entry service.

Requests wait in a queue while the model is busy; the moment it is free, everything queued (up to
the maximum batch size) becomes the next batch. Under light load a request runs alone and at
once; under heavy load batches grow by themselves. Interactive requests always board first; bulk
work (async batch jobs) only fills the seats they leave, so a 100,000-text job never makes a
single `/predict` call wait for more than one batch. Work is counted in tokens, not texts: a
batch has a token budget, and a request of many long texts is split across batches that other
requests board between.

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
from dataclasses import dataclass, field
from typing import Generic, TypeVar


class Overloaded(Exception):
    """More interactive work is waiting than the service will queue: answer 503 now rather
    than make the caller wait for a timeout."""


class TooMuchWork(Exception):
    """One request costs more than the whole queue may hold: it can never be admitted."""


Item = TypeVar("Item")
Result = TypeVar("Result")
Predict = Callable[[list[Item]], list[Result]] | Callable[[list[Item]], Awaitable[list[Result]]]
"""Scores one batch: a plain function runs in the inference thread (the model in process); a
coroutine function is awaited on the event loop (a call to a model elsewhere)."""


@dataclass
class _Request(Generic[Item, Result]):
    texts: Sequence[Item]  # texts, or the windows of texts (the model in process)
    costs: Sequence[int]  # tokens each (runners/windowing.py)
    future: asyncio.Future[list[Result]]
    bulk: bool
    boarded: int = 0  # items already taken into a batch, in order
    scored: list[Result] = field(default_factory=list)

    def left(self) -> tuple[int, int]:
        """Items and tokens not yet in a batch."""
        return len(self.texts) - self.boarded, sum(self.costs[self.boarded :])


@dataclass(frozen=True)
class QueueState:
    """What an autoscaler or an alert wants to know about the queue."""

    interactive_texts: int  # waiting to board, from /predict and /predict/batch
    interactive_tokens: int  # their cost, what admission control counts
    bulk_texts: int  # waiting to board, from batch jobs
    requests_in_flight: int  # submitted and not yet answered: waiting or being scored


class BatchScheduler(Generic[Item, Result]):
    """`max_batch_size` texts and `max_batch_tokens` tokens at most per model call (a single
    item above the token budget goes alone); `max_queued_tokens` of interactive work waiting at
    most. A request larger than one batch is split across batches, and smaller requests board
    between its pieces, so no request holds the model for more than one bounded batch."""

    def __init__(
        self,
        predict: Predict[Item, Result],
        max_batch_size: int,
        max_queued_tokens: int,
        max_batch_tokens: int = 2048,
        observe_queue: Callable[[QueueState], None] | None = None,
        observe_dropped: Callable[[int], None] | None = None,
    ) -> None:
        self.predict = predict
        self._awaits_predict = inspect.iscoroutinefunction(predict)
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_queued_tokens = max_queued_tokens
        self.queued_texts = 0  # interactive texts waiting to board
        self.queued_tokens = 0  # and their tokens, for admission control
        self.queued_bulk_texts = 0
        self.in_flight = 0
        self.observe_queue = observe_queue
        self.observe_dropped = observe_dropped
        self._interactive: deque[_Request[Item, Result]] = deque()
        self._bulk: deque[_Request[Item, Result]] = deque()
        self._wakeup = asyncio.Event()
        # One inference thread: the model uses every core already, and the event loop stays free.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self._loop_task: asyncio.Task[None] | None = None

    async def submit(
        self, texts: Sequence[Item], costs: Sequence[int] | None = None, bulk: bool = False
    ) -> list[Result]:
        """The results of `texts` (or windows), whose `costs` (tokens each; one each if not
        given) decide how they are batched and whether an interactive request is admitted."""
        costs = [1] * len(texts) if costs is None else costs
        tokens = sum(costs)
        if not bulk and tokens > self.max_queued_tokens:
            raise TooMuchWork(
                f"the texts are {tokens} tokens, more than the {self.max_queued_tokens} that may "
                "wait at once (MAX_QUEUED_TOKENS): send fewer or shorter texts per request, or "
                "submit a batch job"
            )
        if not bulk and self.queued_tokens + tokens > self.max_queued_tokens:
            raise Overloaded(
                f"{self.queued_tokens} tokens are already waiting (limit {self.max_queued_tokens})"
            )
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._run())
        request = _Request(texts, costs, asyncio.get_running_loop().create_future(), bulk)
        if bulk:
            self._bulk.append(request)
            self.queued_bulk_texts += len(texts)
        else:
            self._interactive.append(request)
            self.queued_texts += len(texts)
            self.queued_tokens += tokens
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
        return QueueState(
            self.queued_texts, self.queued_tokens, self.queued_bulk_texts, self.in_flight
        )

    def _changed(self) -> None:
        if self.observe_queue is not None:
            self.observe_queue(self.state)

    def _left_the_queue(self, request: _Request[Item, Result], upto: int) -> None:
        """Texts of `request` up to `upto` boarded a batch (or were dropped)."""
        if request.bulk:
            self.queued_bulk_texts -= upto - request.boarded
        else:
            self.queued_texts -= upto - request.boarded
            self.queued_tokens -= sum(request.costs[request.boarded : upto])
        request.boarded = upto

    def _next_batch(self) -> list[tuple[_Request[Item, Result], int, int]]:
        """The next model call as (request, first text, end) pieces. The interactive lane boards
        first. In each lane, every request that fits whole boards, in the order they came;
        then the first one that does not fit fills what is left with a piece of itself and
        keeps its place. So a small request always boards the next batch, and a large one
        moves on one bounded piece per batch."""
        pieces: list[tuple[_Request[Item, Result], int, int]] = []
        texts = tokens = 0
        for lane in (self._interactive, self._bulk):
            waiting: deque[_Request[Item, Result]] = deque()
            for request in lane:
                if request.future.done():  # the caller went away, or a batch of it failed
                    dropped, _ = request.left()
                    self._left_the_queue(request, len(request.texts))
                    if request.future.cancelled() and self.observe_dropped is not None:
                        self.observe_dropped(dropped)
                    continue
                count, cost = request.left()
                alone = texts == 0 and count == 1  # one text over the budget goes alone
                fits = texts + count <= self.max_batch_size and (
                    tokens + cost <= self.max_batch_tokens or alone
                )
                if not fits:
                    waiting.append(request)
                    continue
                pieces.append((request, request.boarded, len(request.texts)))
                self._left_the_queue(request, len(request.texts))
                texts, tokens = texts + count, tokens + cost
            if waiting:
                request = waiting[0]
                start = end = request.boarded
                while end < len(request.texts) and texts < self.max_batch_size:
                    if texts and tokens + request.costs[end] > self.max_batch_tokens:
                        break
                    texts, tokens = texts + 1, tokens + request.costs[end]
                    end += 1
                if end > start:
                    pieces.append((request, start, end))
                    self._left_the_queue(request, end)
            lane.clear()
            lane.extend(r for r in waiting if r.boarded < len(r.texts))
        self._changed()
        return pieces

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
                texts = [text for r, start, end in batch for text in r.texts[start:end]]
                try:
                    if self._awaits_predict:
                        predictions = await self.predict(texts)  # type: ignore[misc]
                    else:
                        predictions = await loop.run_in_executor(
                            self._executor, self.predict, texts
                        )
                except Exception as err:  # the callers get the error; the loop lives on
                    for request, _, _ in batch:
                        if not request.future.done():
                            request.future.set_exception(err)
                    continue
                offset = 0
                for request, start, end in batch:
                    request.scored.extend(predictions[offset : offset + end - start])
                    offset += end - start
                    if end == len(request.texts) and not request.future.done():
                        request.future.set_result(request.scored)
