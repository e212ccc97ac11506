"""The in-process batcher: batching forms under load, interactive work boards first, overload is
refused at once, an inference error reaches the callers without killing the loop, the queue is
visible, a caller that went away is dropped, and closing waits for the batch in flight."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from runners.prediction import Prediction
from runners.scheduler import BatchScheduler, Overloaded, QueueState, TooMuchWork


class RecordingModel:
    """Stands in for the engine so the test controls timing: each call takes `delay` seconds."""

    def __init__(self, delay: float = 0.02) -> None:
        self.delay = delay
        self.batches: list[list[str]] = []
        self.fail_on: str | None = None

    def __call__(self, texts: list[str]) -> list[Prediction]:
        time.sleep(self.delay)
        self.batches.append(list(texts))
        if self.fail_on in texts:
            raise RuntimeError("model exploded")
        return [Prediction("POSITIVE", len(t) / 100) for t in texts]


def test_concurrent_requests_share_batches_and_get_their_own_answers() -> None:
    model = RecordingModel()
    scheduler = BatchScheduler(model, max_batch_size=16, max_queued_tokens=1000)

    async def scenario() -> list[list[Prediction]]:
        return await asyncio.gather(*(scheduler.submit(["x" * i]) for i in range(1, 41)))

    answers = asyncio.run(scenario())
    assert [a[0].score for a in answers] == [i / 100 for i in range(1, 41)]
    assert max(len(b) for b in model.batches) > 1
    assert all(len(b) <= 16 for b in model.batches)
    assert sum(len(b) for b in model.batches) == 40


def test_interactive_requests_board_before_bulk_work() -> None:
    model = RecordingModel(delay=0.05)
    scheduler = BatchScheduler(model, max_batch_size=4, max_queued_tokens=1000)

    async def scenario() -> None:
        bulk = [
            asyncio.create_task(scheduler.submit([f"bulk{i}"] * 4, bulk=True)) for i in range(5)
        ]
        await asyncio.sleep(0.01)  # the first bulk batch is running now
        interactive = asyncio.create_task(scheduler.submit(["user"]))
        await asyncio.gather(interactive, *bulk)

    asyncio.run(scenario())
    position = next(i for i, b in enumerate(model.batches) if "user" in b)
    assert position == 1  # right after the batch that was already running


def test_overload_is_refused_immediately() -> None:
    model = RecordingModel(delay=0.2)
    scheduler = BatchScheduler(model, max_batch_size=2, max_queued_tokens=4)

    async def scenario() -> None:
        first = asyncio.create_task(scheduler.submit(["a", "b"]))
        await asyncio.sleep(0.05)  # running: the queue is empty again
        waiting = asyncio.create_task(scheduler.submit(["c", "d", "e"]))
        await asyncio.sleep(0)
        started = time.monotonic()
        with pytest.raises(Overloaded, match="limit 4"):
            await scheduler.submit(["f", "g"])
        assert time.monotonic() - started < 0.05
        await asyncio.gather(first, waiting)

    asyncio.run(scenario())


def test_a_failing_batch_fails_its_callers_and_the_loop_goes_on() -> None:
    model = RecordingModel()
    model.fail_on = "boom"
    scheduler = BatchScheduler(model, max_batch_size=8, max_queued_tokens=100)

    async def scenario() -> list[Prediction]:
        with pytest.raises(RuntimeError, match="exploded"):
            await scheduler.submit(["boom"])
        return await scheduler.submit(["fine"])

    assert asyncio.run(scenario())[0].label == "POSITIVE"


def test_inference_runs_off_the_event_loop_thread() -> None:
    seen: list[str] = []

    def model(texts: list[str]) -> list[Prediction]:
        seen.append(threading.current_thread().name)
        return [Prediction("NEGATIVE", 0.9) for _ in texts]

    scheduler = BatchScheduler(model, max_batch_size=8, max_queued_tokens=100)
    asyncio.run(scheduler.submit(["x"]))
    assert seen and seen[0].startswith("inference")


class GatedModel:
    """Scores only once the test opens the gate, so the queue holds still while it looks."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.batches: list[list[str]] = []

    def __call__(self, texts: list[str]) -> list[Prediction]:
        assert self.gate.wait(10), "the test never opened the gate"
        self.batches.append(list(texts))
        return [Prediction("POSITIVE", 0.9) for _ in texts]


def gated_scheduler(**observers: Any) -> tuple[GatedModel, BatchScheduler]:
    model = GatedModel()
    return model, BatchScheduler(model, max_batch_size=4, max_queued_tokens=100, **observers)


async def submitted(
    scheduler: BatchScheduler, *requests: tuple[list[str], bool]
) -> list[asyncio.Task[list[Prediction]]]:
    """(texts, bulk) requests handed to the scheduler, once the event loop has queued them."""
    tasks = [asyncio.create_task(scheduler.submit(texts, bulk=bulk)) for texts, bulk in requests]
    await asyncio.sleep(0.05)
    return tasks


def test_queue_state_counts_waiting_texts_per_lane_and_requests_in_flight() -> None:
    seen: list[QueueState] = []
    model, scheduler = gated_scheduler(observe_queue=seen.append)

    async def scenario() -> QueueState:
        running = await submitted(scheduler, (["a"], False))  # boards at once, holds the model
        waiting = await submitted(scheduler, (["b", "c"], False), (["d", "e", "f"], True))
        state = scheduler.state
        model.gate.set()
        await asyncio.gather(*running, *waiting)
        return state

    assert asyncio.run(scenario()) == QueueState(2, 2, 3, 3)
    assert scheduler.state == QueueState(0, 0, 0, 0) and seen[-1] == QueueState(0, 0, 0, 0)
    assert max(s.requests_in_flight for s in seen) == 3


def test_a_cancelled_request_is_dropped_not_scored() -> None:
    dropped: list[int] = []
    model, scheduler = gated_scheduler(observe_dropped=dropped.append)

    async def scenario() -> None:
        running = await submitted(scheduler, (["a"], False))
        leaving, staying = await submitted(scheduler, (["x", "y"], False), (["z"], False))
        leaving.cancel()  # what the service does when the HTTP client disconnects
        model.gate.set()
        await asyncio.gather(*running, staying)

    asyncio.run(scenario())
    assert dropped == [2]
    assert model.batches == [["a"], ["z"]]
    assert scheduler.state == QueueState(0, 0, 0, 0)


def test_close_waits_for_the_batch_in_flight_and_stops_the_inference_thread() -> None:
    model, scheduler = gated_scheduler()

    async def scenario() -> None:
        (running,) = await submitted(scheduler, (["a"], False))
        threading.Timer(0.1, model.gate.set).start()
        await scheduler.close()
        running.cancel()

    asyncio.run(scenario())
    assert model.batches == [["a"]]  # the batch in flight was finished, not abandoned
    with pytest.raises(RuntimeError, match="shutdown"):
        scheduler._executor.submit(print)


def test_a_coroutine_predict_is_awaited_on_the_event_loop() -> None:
    """The split layout's predict is an HTTP call to the runner service: awaited, not threaded."""
    seen: list[str] = []

    async def remote(texts: list[str]) -> list[Prediction]:
        seen.append(threading.current_thread().name)
        return [Prediction("NEGATIVE", 0.5) for _ in texts]

    scheduler = BatchScheduler(remote, max_batch_size=8, max_queued_tokens=100)
    assert asyncio.run(scheduler.submit(["x", "y"])) == [Prediction("NEGATIVE", 0.5)] * 2
    assert seen == [threading.main_thread().name]


def test_a_request_of_many_tokens_is_split_and_single_texts_board_between_its_batches() -> None:
    """Two requests of eight 1,000-token texts hold the model one 4,096-token batch at a time;
    a single text sent meanwhile boards the next batch, not the last."""
    model = RecordingModel(delay=0.05)
    scheduler = BatchScheduler(
        model, max_batch_size=64, max_queued_tokens=100_000, max_batch_tokens=4096
    )

    async def scenario() -> list[list[Prediction]]:
        heavy = [
            asyncio.create_task(scheduler.submit([f"h{r}-{i}" for i in range(8)], [1000] * 8))
            for r in range(2)
        ]
        await asyncio.sleep(0.02)  # the first batch is running
        single = await scheduler.submit(["single"], [10])
        return [single, *await asyncio.gather(*heavy)]

    single, *heavy = asyncio.run(scenario())
    assert len(single) == 1 and [len(answer) for answer in heavy] == [8, 8]
    assert [a.score for a in heavy[0]] == [len(f"h0-{i}") / 100 for i in range(8)]  # in order
    heavy_per_batch = [sum(text.startswith("h") for text in batch) for batch in model.batches]
    assert heavy_per_batch == [4, 4, 4, 4]  # 4 x 1,000 tokens at most per batch
    assert "single" in model.batches[1]  # it boarded the batch after the one running


def test_a_text_over_the_batch_budget_goes_alone() -> None:
    model = RecordingModel(delay=0)
    scheduler = BatchScheduler(
        model, max_batch_size=64, max_queued_tokens=10_000, max_batch_tokens=100
    )
    answers = asyncio.run(scheduler.submit(["big", "small", "small2"], [500, 10, 10]))
    assert len(answers) == 3 and model.batches == [["big"], ["small", "small2"]]


def test_work_larger_than_the_whole_queue_is_refused_even_when_idle() -> None:
    scheduler = BatchScheduler(RecordingModel(), max_batch_size=8, max_queued_tokens=1000)
    with pytest.raises(TooMuchWork, match="1200 tokens, more than the 1000"):
        asyncio.run(scheduler.submit(["a", "b"], [600, 600]))
    assert scheduler.state == QueueState(0, 0, 0, 0)
