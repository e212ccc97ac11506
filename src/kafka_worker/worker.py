"""The consume -> score -> produce loop, at least once.

A batch's results and dead letters are all acknowledged by the brokers (acks=all, idempotent
producer where the broker supports it) before its offsets are committed, so a crash at any point
re-delivers, never drops.
The loop does not poll again until the batch in flight is acknowledged: work in flight is one
batch. A broker that goes away is waited for with backoff; the process never crash-loops.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError
from aiokafka.helpers import create_ssl_context
from aiokafka.structs import ConsumerRecord, OffsetAndMetadata

from kafka_worker.messages import (
    Rejected,
    Source,
    TextMessage,
    dead_letter_value,
    parse,
    result_value,
)
from kafka_worker.metrics import WorkerMetrics
from runners.engine import SentimentEngine
from settings import Settings

log = structlog.get_logger("kafka_worker")
MAX_BACKOFF_S = 30.0
BROKER_CHECK_S = 2.0


class FinishBatchBeforeRevoke(ConsumerRebalanceListener):
    """Partitions leave this worker only after the batch in flight is produced and committed."""

    def __init__(self, batch_lock: asyncio.Lock) -> None:
        self.batch_lock = batch_lock

    async def on_partitions_revoked(self, revoked: Any) -> None:
        async with self.batch_lock:
            log.info("partitions revoked", partitions=sorted(str(tp) for tp in revoked))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        log.info("partitions assigned", partitions=sorted(str(tp) for tp in assigned))


class Worker:
    def __init__(self, settings: Settings, engine: SentimentEngine, model: dict[str, str]) -> None:
        self.settings = settings
        self.engine = engine
        self.model = model
        self.metrics = WorkerMetrics()
        self.stopping = asyncio.Event()
        self.batch_lock = asyncio.Lock()
        self.ready = False
        self.heartbeat = time.monotonic()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")

    def client_options(self) -> dict[str, Any]:
        s = self.settings
        options: dict[str, Any] = {
            "bootstrap_servers": s.kafka_bootstrap_servers,
            "security_protocol": s.kafka_security_protocol,
        }
        if s.kafka_security_protocol in ("SSL", "SASL_SSL"):
            options["ssl_context"] = (
                create_ssl_context(cafile=str(s.kafka_ssl_cafile))
                if s.kafka_ssl_cafile
                else ssl.create_default_context()
            )
        if s.kafka_security_protocol.startswith("SASL"):
            options["sasl_mechanism"] = s.kafka_sasl_mechanism
            options["sasl_plain_username"] = s.kafka_sasl_username
            options["sasl_plain_password"] = (
                s.kafka_sasl_password.get_secret_value() if s.kafka_sasl_password else None
            )
        return options

    async def run(self) -> None:
        """Consume until asked to stop; reconnect with backoff whenever Kafka goes away."""
        backoff = 0.5
        while not self.stopping.is_set():
            started = time.monotonic()
            try:
                await self.consume()
            except KafkaError as err:
                self.ready = False
                if time.monotonic() - started > 60:
                    backoff = 0.5  # it ran fine for a while: start over gently
                log.warning("kafka unavailable, retrying", error=repr(err), backoff_s=backoff)
                self.heartbeat = time.monotonic()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), timeout=backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)

    async def consume(self) -> None:
        s = self.settings
        consumer = AIOKafkaConsumer(
            group_id=s.kafka_group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=s.kafka_batch_size,
            session_timeout_ms=10_000,
            heartbeat_interval_ms=1_000,
            fetch_max_bytes=8 * 1024 * 1024,
            **self.client_options(),
        )
        producer = AIOKafkaProducer(
            acks="all",
            enable_idempotence=s.kafka_idempotent_producer,
            linger_ms=5,
            request_timeout_ms=15_000,
            **self.client_options(),
        )
        consumer.subscribe([s.kafka_input_topic], listener=FinishBatchBeforeRevoke(self.batch_lock))
        try:
            await producer.start()
            await consumer.start()
            self.ready = True
            log.info("consuming", topic=s.kafka_input_topic, group=s.kafka_group_id)
            checked = time.monotonic()
            while not self.stopping.is_set():
                self.heartbeat = time.monotonic()
                batches = await consumer.getmany(
                    timeout_ms=max(s.kafka_linger_ms, 1), max_records=s.kafka_batch_size
                )
                if batches:
                    async with self.batch_lock:
                        await self.process(consumer, producer, batches)
                    self.ready, checked = True, time.monotonic()
                elif time.monotonic() - checked > BROKER_CHECK_S:
                    # The client retries a lost broker by itself; readiness tells the world.
                    self.ready, checked = await self.broker_reachable(producer), time.monotonic()
                await self.report_lag(consumer)
        finally:
            self.ready = False
            # Everything processed is committed already; stop() leaves the group at once.
            with contextlib.suppress(Exception):
                await consumer.stop()
            with contextlib.suppress(Exception):
                await producer.stop()

    async def process(
        self,
        consumer: AIOKafkaConsumer,
        producer: AIOKafkaProducer,
        batches: dict[TopicPartition, list[ConsumerRecord]],
    ) -> None:
        started = time.perf_counter()
        records = [record for part in batches.values() for record in part]
        good: list[tuple[ConsumerRecord, Source, TextMessage]] = []
        bad: list[tuple[ConsumerRecord, Source, Rejected]] = []
        for record in records:
            source = Source(record.topic, record.partition, record.offset)
            parsed = parse(record.value, source, self.settings.max_text_chars)
            if isinstance(parsed, TextMessage):
                good.append((record, source, parsed))
            else:
                bad.append((record, source, parsed))
        predictions = []
        if good:
            predictions = await asyncio.get_running_loop().run_in_executor(
                self.executor, self.engine.predict, [m.text for _, _, m in good]
            )

        s = self.settings
        acks = []
        for (record, source, message), prediction in zip(good, predictions, strict=True):
            value = result_value(message, prediction, self.model, source)
            acks.append(await producer.send(s.kafka_output_topic, value, key=record.key))
        for record, source, rejected in bad:
            value = dead_letter_value(record.value, rejected.reason, source)
            acks.append(
                await producer.send(
                    s.kafka_dlq_topic,
                    value,
                    key=record.key,
                    headers=[("error", rejected.reason.encode())],
                )
            )
        await asyncio.gather(*acks)  # stored on the brokers: only now may offsets move on

        offsets = {tp: OffsetAndMetadata(part[-1].offset + 1, "") for tp, part in batches.items()}
        try:
            await consumer.commit(offsets)
        except CommitFailedError as err:  # the group moved on; these records come back again
            log.warning(
                "commit failed after a rebalance; batch will be re-delivered", error=str(err)
            )
        self.metrics.observe_batch(
            consumed=len(records),
            produced=len(good),
            dead_letters=[r.reason for _, _, r in bad],
            seconds=time.perf_counter() - started,
        )

    async def broker_reachable(self, producer: AIOKafkaProducer) -> bool:
        try:
            await asyncio.wait_for(producer.client.fetch_all_metadata(), BROKER_CHECK_S)
        except (KafkaError, TimeoutError) as err:
            if self.ready:
                log.warning("broker unreachable; the client keeps retrying", error=repr(err))
            return False
        if not self.ready:
            log.info("broker reachable again")
        return True

    async def report_lag(self, consumer: AIOKafkaConsumer) -> None:
        """Lag from the fetch high-water mark (Tansu's ListOffsets(LATEST) is unreliable)."""
        for tp in consumer.assignment():
            highwater = consumer.highwater(tp)
            if highwater is None:
                continue
            with contextlib.suppress(KafkaError, AssertionError):
                position = await consumer.position(tp)
                self.metrics.lag.labels(tp.topic, str(tp.partition)).set(
                    max(highwater - position, 0)
                )
