"""Whatever bytes a producer sends, each message ends as exactly one result or one dead letter,
and the worker's batch step returns: hypothesis generates the payloads (arbitrary bytes, JSON of
any shape, texts with lone surrogates, NUL, bidi controls, combining marks and emoji, numbers
too long to convert) and feeds them through the worker's real parse, token count, engine (the
stored small model) and result and dead-letter encoding.

The broker is a stand-in here, and says so: hypothesis tries hundreds of batches, and a real
broker round trip per batch would take minutes. The same path against the real Tansu broker is
tests/test_kafka_worker.py (a lone surrogate among healthy messages among them)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kafka_worker.worker import Worker
from kubesentiment.settings import get_settings
from runners.engine import load_engine
from runners.model_store import StoredModel
from runners.windowing import Windowing

TOPIC = get_settings().kafka_input_topic
PARTITION = TopicPartition(TOPIC, 0)


class StandInProducer:
    """Takes what aiokafka's producer takes (bytes values and keys) and acknowledges at once."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    async def send(
        self, topic: str, value: bytes, key: bytes | None = None, headers: Any = None
    ) -> asyncio.Future[None]:
        assert isinstance(value, bytes) and (key is None or isinstance(key, bytes))
        self.sent.append((topic, value))
        acknowledged: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        acknowledged.set_result(None)
        return acknowledged


class StandInConsumer:
    def __init__(self) -> None:
        self.committed: dict[TopicPartition, Any] = {}

    def assignment(self) -> set[TopicPartition]:
        return {PARTITION}

    async def commit(self, offsets: dict[TopicPartition, Any]) -> None:
        self.committed.update(offsets)


@pytest.fixture(scope="module")
def worker(small_model: StoredModel) -> Iterator[Worker]:
    engine = load_engine(small_model, "onnx-int8", threads=1)
    model = {"name": small_model.name, "version": small_model.version, "backend": "onnx-int8"}
    worker = Worker(get_settings(), engine, model, Windowing.of(small_model))
    yield worker
    worker.executor.shutdown()


# Every character, lone surrogates included (hypothesis leaves them out by default), and the
# ones that trip text code: NUL, bidi controls, combining marks, emoji.
ANY_CHARACTER = st.characters(codec=None, exclude_categories=())
TRICKY = st.sampled_from(["\x00", "\u202e", "\u2066", "\u0301", "\ud800", "\udfff", "🫰", "\ufeff"])
TEXTS = st.text(st.one_of(ANY_CHARACTER, TRICKY), max_size=80)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | TEXTS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXTS, inner, max_size=4),
    max_leaves=12,
)
MESSAGES = st.fixed_dictionaries(
    {"text": TEXTS}, optional={"id": st.one_of(TEXTS, st.integers(), st.none(), JSON_VALUES)}
)


def as_json(value: Any, ascii_only: bool) -> bytes:
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", errors="surrogatepass")


PAYLOADS = st.one_of(
    st.none(),
    st.binary(max_size=120),
    st.builds(as_json, MESSAGES, st.booleans()),
    st.builds(as_json, JSON_VALUES, st.booleans()),
    TEXTS.map(lambda text: text.encode("utf-8", errors="surrogatepass")),
    st.integers(100, 5000).map(lambda n: b'{"text": "ok", "id": ' + b"9" * n + b"}"),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payloads=st.lists(PAYLOADS, min_size=1, max_size=8))
def test_every_payload_ends_as_exactly_one_result_or_dead_letter(
    worker: Worker, payloads: list[bytes | None]
) -> None:
    records = [
        ConsumerRecord(TOPIC, 0, offset, 0, 0, b"k", value, None, 1, len(value or b""), [])
        for offset, value in enumerate(payloads)
    ]
    producer, consumer = StandInProducer(), StandInConsumer()
    asyncio.run(worker.process(consumer, producer, {PARTITION: records}))
    outputs = [json.loads(value) for _, value in producer.sent]
    assert sorted(o["source"]["offset"] for o in outputs) == list(range(len(payloads)))
    topics = {topic for topic, _ in producer.sent}
    assert topics <= {worker.settings.kafka_output_topic, worker.settings.kafka_dlq_topic}
    assert consumer.committed[PARTITION].offset == len(payloads)  # the partition goes on
