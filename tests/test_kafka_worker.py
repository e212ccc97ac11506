"""The Kafka worker against a real broker (Tansu, started per test): every message ends in the
results or the dead-letter topic, through crashes, rebalances, a broker restart and inference
errors."""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import time
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest

from devtools.local_kafka import (
    TansuBroker,
    WorkerProcess,
    collect,
    create_topics,
    produce,
    sources,
)
from kubesentiment.settings import get_settings
from runners.model_store import StoredModel
from tests.conftest import CANARY_TEXT

TOPICS = get_settings().kafka_topics
BROKER_PORT = 19210
FAULTY = "tests.faulty_worker"  # the real worker with a fake engine fault: see that module


@pytest.fixture
def broker(small_model: StoredModel) -> Iterator[TansuBroker]:
    started = TansuBroker(BROKER_PORT).start()
    asyncio.run(create_topics(started.bootstrap, TOPICS))
    yield started
    started.stop()


def outputs(bootstrap: str, wanted: set[tuple[int, int]], timeout: float) -> list[dict]:
    """Results and dead letters from the start, until every wanted source is there."""
    return asyncio.run(
        collect(bootstrap, TOPICS[1:], lambda items: wanted <= set(sources(items)), timeout)
    )


def send_texts(broker: TansuBroker, n: int, start: int = 0) -> list[tuple[int, int]]:
    messages = [
        (
            f"key-{i}".encode(),
            json.dumps({"id": f"msg-{i}", "text": f"Review {i}: a fine, warm film."}).encode(),
        )
        for i in range(start, start + n)
    ]
    return asyncio.run(produce(broker.bootstrap, TOPICS[0], messages))


def score_alive(
    broker: TansuBroker, messages: list[tuple[bytes, bytes]], port: int, timeout: float
) -> list[dict]:
    """Send the messages, let one worker score them all, and check that it is still up and
    ready after the last one and that every input came out exactly once; the outputs."""
    sent = asyncio.run(produce(broker.bootstrap, TOPICS[0], messages))
    worker = WorkerProcess(broker, port)
    try:
        items = outputs(broker.bootstrap, set(sent), timeout)
        assert worker.proc.poll() is None and worker.probe("/readyz") == 200
    finally:
        assert worker.stop() == 0
    assert sources(items) == Counter(sent)  # every input exactly once, nothing lost
    return items


def test_round_trip_of_good_and_bad_messages(broker: TansuBroker) -> None:
    good = [
        (f"k{i}".encode(), json.dumps({"id": f"id-{i}", "text": f"Movie {i} was great"}).encode())
        for i in range(1, 150)
    ]
    good.append((b"k0", json.dumps({"id": "id-0", "text": CANARY_TEXT}).encode()))
    plain = [
        (f"p{i}".encode(), f"plain text review number {i}, rather dull".encode()) for i in range(30)
    ]
    bad = {
        b"tombstone": None,
        b"binary": b"\xff\xfe\xfa",
        b"broken": b'{"id": "x", "text":',
        b"list": b'["not", "an", "object"]',
        b"no-text": b'{"id": "nt"}',
        b"blank": b'{"id": "b", "text": "   "}',
        b"huge": b"x" * 20_001,
    }
    sent = asyncio.run(produce(broker.bootstrap, TOPICS[0], [*good, *plain, *bad.items()]))
    worker = WorkerProcess(broker, 9210)
    try:
        items = outputs(broker.bootstrap, set(sent), timeout=120)
    finally:
        assert worker.stop() == 0
    assert sources(items) == Counter(sent)  # every input exactly once, nothing lost
    results = [i for i in items if i["_topic"] == TOPICS[1]]
    letters = {i["_key"]: i for i in items if i["_topic"] == TOPICS[2]}
    assert len(results) == 180 and len(letters) == len(bad)
    by_key = {r["_key"]: r for r in results}
    assert by_key[b"k7"]["id"] == "id-7"
    assert by_key[b"p3"]["id"].startswith("sentiment-requests-")
    for result in results:
        assert result["sentiment"]["label"] in {"POSITIVE", "NEGATIVE"}
        assert result["model"]["backend"] == "onnx-int8"
    expected = {
        b"tombstone": "empty_message",
        b"binary": "not_utf8",
        b"broken": "bad_json",
        b"list": "not_an_object",
        b"no-text": "missing_text",
        b"blank": "empty_text",
        b"huge": "text_too_long",
    }
    for key, reason in expected.items():
        assert letters[key]["error"] == reason
        assert letters[key]["_headers"]["error"] == reason.encode()
    assert letters[b"broken"]["payload"] == '{"id": "x", "text":'


def test_sigkill_mid_stream_loses_nothing(broker: TansuBroker) -> None:
    sent = send_texts(broker, 3000)
    first = WorkerProcess(broker, 9211)
    first.wait_until(lambda: first.metric("kubesentiment_worker_produced_total") >= 500, "half way")
    first.stop(signal.SIGKILL)
    second = WorkerProcess(broker, 9211)
    try:
        items = outputs(broker.bootstrap, set(sent), timeout=180)
    finally:
        second.stop()
    counts = sources(items)
    assert set(counts) == set(sent), f"lost {len(set(sent) - set(counts))} messages"
    duplicates = sum(counts.values()) - len(counts)
    print(f"SIGKILL: {len(sent)} messages, {duplicates} delivered twice, none lost")


def test_two_workers_share_partitions_and_one_takes_over(broker: TansuBroker) -> None:
    one, two = WorkerProcess(broker, 9212), WorkerProcess(broker, 9213)
    time.sleep(4)  # both join the group and split the 4 partitions
    sent = send_texts(broker, 3000)
    try:
        for worker in (one, two):

            def has_consumed(w: WorkerProcess = worker) -> bool:
                return w.metric("kubesentiment_worker_consumed_total") > 0

            worker.wait_until(has_consumed, "given partitions", timeout=60)
        assert one.stop(signal.SIGTERM) == 0  # finishes its batch, commits, leaves the group
        sent += send_texts(broker, 1000, start=3000)
        items = outputs(broker.bootstrap, set(sent), timeout=180)
    finally:
        one.stop()
        two.stop()
    assert set(sources(items)) == set(sent)


def test_worker_recovers_when_the_broker_comes_back(broker: TansuBroker) -> None:
    worker = WorkerProcess(broker, 9214)
    try:
        before = send_texts(broker, 100)
        assert set(sources(outputs(broker.bootstrap, set(before), 60))) == set(before)
        broker.stop()
        worker.wait_until(lambda: worker.probe("/readyz") == 503, "aware of the outage")
        assert worker.probe("/livez") == 200  # alive and waiting, not crash-looping
        broker.start()
        asyncio.run(create_topics(broker.bootstrap, TOPICS))  # in-memory broker starts empty
        after = send_texts(broker, 100)
        items = outputs(broker.bootstrap, set(after), timeout=120)
        assert set(sources(items)) == set(after)
        assert worker.proc.poll() is None and worker.probe("/readyz") == 200
    finally:
        assert worker.stop() == 0


def test_a_poison_message_is_dead_lettered_and_its_batch_mates_scored(broker: TansuBroker) -> None:
    """The fault is a fake (tests/faulty_worker.py): the engine raises on any call whose texts
    contain the marker, as a tokenizer or ONNX Runtime error on one message would."""
    marker = "POISON-PILL"
    messages = [
        (f"key-{i}".encode(), json.dumps({"id": f"msg-{i}", "text": f"Film {i}: warm"}).encode())
        for i in range(200)
    ]
    messages.insert(50, (b"poison-1", json.dumps({"text": f"{marker} one"}).encode()))
    messages.insert(140, (b"poison-2", f"plain {marker} two".encode()))
    sent = asyncio.run(produce(broker.bootstrap, TOPICS[0], messages))
    worker = WorkerProcess(broker, 9215, module=FAULTY, FAULT_MARKER=marker)
    try:
        items = outputs(broker.bootstrap, set(sent), timeout=120)
        assert worker.proc.poll() is None and worker.probe("/readyz") == 200
        assert worker.metric("kubesentiment_worker_failed_batches_total") == 0
    finally:
        assert worker.stop() == 0
    assert sources(items) == Counter(sent)  # every input exactly once, nothing lost
    results = {i["_key"] for i in items if i["_topic"] == TOPICS[1]}
    letters = {i["_key"]: i for i in items if i["_topic"] == TOPICS[2]}
    assert results == {key for key, _ in messages} - {b"poison-1", b"poison-2"}
    assert set(letters) == {b"poison-1", b"poison-2"}
    for letter in letters.values():
        assert letter["error"] == "inference_error"
        assert letter["_headers"] == {"error": b"inference_error", "exception": b"RuntimeError"}
        assert letter["exception"]["type"] == "RuntimeError"
        assert marker in letter["exception"]["message"] and marker in letter["payload"]


def test_hostile_messages_are_dead_lettered_and_the_worker_scores_everything_else(
    broker: TansuBroker,
) -> None:
    """The issue's producer: among 2,000 ordinary messages, JSON nested 100,000 deep (a
    RecursionError once killed the worker, and every worker after it on that offset), an id of
    5,000 digits (beyond Python's int-string limit), 100,000 emoji (400 KB: its dead letter was
    1.2 MB, over the producer's limit, and the worker re-sent the batch for ever) and 20,000
    emoji (within the characters, far over MAX_TEXT_TOKENS)."""
    messages = [
        (f"key-{i}".encode(), json.dumps({"id": f"msg-{i}", "text": f"Film {i}: warm"}).encode())
        for i in range(2000)
    ]
    hostile = {
        b"deep": b"[" * 100_000,
        b"long-id": b'{"id": ' + b"7" * 5000 + b', "text": "fine"}',
        b"emoji-400k": ("😍" * 100_000).encode(),
        b"emoji-tokens": json.dumps({"id": "e", "text": "😍" * 20_000}).encode(),
    }
    for n, item in enumerate(hostile.items()):
        messages.insert(300 + 400 * n, item)
    items = score_alive(broker, messages, 9216, timeout=240)
    letters = {i["_key"]: i for i in items if i["_topic"] == TOPICS[2]}
    assert {key: letter["error"] for key, letter in letters.items()} == {
        b"deep": "bad_json",
        b"long-id": "bad_json",
        b"emoji-400k": "text_too_long",
        b"emoji-tokens": "text_too_long",
    }
    big = letters[b"emoji-400k"]
    assert big["payload_truncated"] is True and big["payload_bytes"] == 400_000
    assert big["payload_sha256"] == hashlib.sha256(hostile[b"emoji-400k"]).hexdigest()
    results = [i for i in items if i["_topic"] == TOPICS[1]]
    assert len(results) == 2000 and {r["id"] for r in results} == {f"msg-{i}" for i in range(2000)}


def test_a_broken_model_stops_the_worker_and_dead_letters_nothing(broker: TansuBroker) -> None:
    """The fault is a fake (tests/faulty_worker.py): every call of the engine raises, a
    known-good text's too. The batch must stay in the topic for a healthy worker."""
    broken = WorkerProcess(
        broker, 9216, module=FAULTY, FAULT_ALWAYS="true", KAFKA_MAX_FAILED_BATCHES="2"
    )

    def readiness() -> str:
        return httpx.get(f"http://127.0.0.1:{broken.port}/readyz", timeout=2).text

    try:
        sent = send_texts(broker, 300)
        broken.wait_until(lambda: "KAFKA_MAX_FAILED_BATCHES" in readiness(), "halted")
        assert broken.probe("/readyz") == 503 and broken.probe("/livez") == 200
        assert "RuntimeError" in readiness()
        assert "KAFKA_MAX_FAILED_BATCHES" in broken.log.read_text()
        assert broken.metric("kubesentiment_worker_failed_batches_total") == 2
        assert broken.metric("kubesentiment_worker_produced_total") == 0
        healthy = WorkerProcess(broker, 9217)  # same group: gets the uncommitted messages
        try:
            items = outputs(broker.bootstrap, set(sent), timeout=120)
        finally:
            assert healthy.stop() == 0
        assert broken.proc.poll() is None  # halted, not crash-looping
    finally:
        assert broken.stop() == 0
    assert sources(items) == Counter(sent)
    assert {i["_topic"] for i in items} == {TOPICS[1]}  # all scored, none dead-lettered


def test_an_idempotent_producer_on_a_broker_without_it_fails_fast(broker: TansuBroker) -> None:
    """Tansu 0.6 answers InitProducerId with UnknownError: a configuration error, which no
    retry mends, so the worker says what to change and exits."""
    worker = WorkerProcess(broker, 9218, wait=False, KAFKA_IDEMPOTENT_PRODUCER="true")
    try:
        returncode = worker.proc.wait(timeout=120)
    finally:
        worker.stop()
    assert returncode == 2
    assert "KAFKA_IDEMPOTENT_PRODUCER=false" in worker.log.read_text()


def test_a_lone_surrogate_is_a_dead_letter_and_the_partition_goes_on(broker: TansuBroker) -> None:
    """`{"text": "great \\ud800 film"}` is valid JSON, but its text is no Unicode: it used to
    raise in the token count, outside every isolation, and end the worker (and every worker
    that took the partition after it)."""
    surrogate = b'{"id": "s%d", "text": "great \\ud800 film"}'
    messages = [
        (f"k{i}".encode(), surrogate % i if i % 100 == 50 else f"Film {i} was fine".encode())
        for i in range(300)
    ]
    items = score_alive(broker, messages, 9219, timeout=120)
    letters = [i for i in items if i["_topic"] == TOPICS[2]]
    assert sorted(i["_key"] for i in letters) == [b"k150", b"k250", b"k50"]
    assert {i["error"] for i in letters} == {"invalid_unicode"}
    assert json.loads(letters[0]["payload"])["text"] == "great \ud800 film"
    assert sum(i["_topic"] == TOPICS[1] for i in items) == 297
