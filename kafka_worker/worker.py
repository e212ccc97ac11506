"""The consume -> score -> produce loop, at least once.

A batch's results and dead letters are all acknowledged by the brokers (acks=all, idempotent
producer where the broker supports it) before its offsets are committed, so a crash at any point
re-delivers, never drops.
The loop does not poll again until the batch in flight is acknowledged: work in flight is one
batch. A broker that goes away is waited for with backoff; the process never crash-loops.
A text the engine raises on is dead-lettered and its batch mates are scored (isolation.py); a
model that fails on everything makes the worker retry, then stop consuming and report not ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import BrokerResponseError, CommitFailedError, IllegalStateError, KafkaError
from aiokafka.helpers import create_ssl_context
from aiokafka.structs import ConsumerRecord, OffsetAndMetadata

from kafka_worker import messages
from kafka_worker.isolation import ModelFailure, Scorer, score_isolating_failures
from kafka_worker.messages import INFERENCE_ERROR, Rejected, Source, TextMessage
from kafka_worker.metrics import WorkerMetrics
from kubesentiment.settings import Settings
from runners.prediction import Prediction
from runners.windowing import Windowing

log = structlog.get_logger("kafka_worker")
T = TypeVar("T")
UNDELIVERABLE = "undeliverable"
"""The reason of a message whose result or dead letter the brokers refused for good."""
MAX_BACKOFF_S = 30.0
BROKER_CHECK_S = 2.0


class IdempotenceUnsupported(Exception):
    """The broker refused the producer id an idempotent producer needs. Configuration, not an
    outage: retrying cannot fix it."""


class FinishBatchBeforeRevoke(ConsumerRebalanceListener):
    """Partitions leave this worker only after the batch in flight is produced and committed,
    and take their lag series with them (another worker reports them now)."""

    def __init__(self, batch_lock: asyncio.Lock, metrics: WorkerMetrics) -> None:
        self.batch_lock, self.metrics = batch_lock, metrics

    async def on_partitions_revoked(self, revoked: Any) -> None:
        async with self.batch_lock:
            log.info("partitions revoked", partitions=sorted(str(tp) for tp in revoked))
        for tp in revoked:
            with contextlib.suppress(KeyError):  # never reported
                self.metrics.lag.remove(tp.topic, str(tp.partition))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        log.info("partitions assigned", partitions=sorted(str(tp) for tp in assigned))


class Worker:
    def __init__(
        self, settings: Settings, engine: Scorer, model: dict[str, str], windowing: Windowing
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.windowing = windowing
        self.model = model
        self.metrics = WorkerMetrics()
        self.stopping = asyncio.Event()
        self.batch_lock = asyncio.Lock()
        self.ready = False
        self.halted: str | None = None  # why the worker stopped consuming for good
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
        """Consume until asked to stop; reconnect with backoff whenever Kafka goes away. A halted
        worker waits for SIGTERM: a restart would only fail the same way."""
        backoff = 0.5
        while not self.stopping.is_set() and self.halted is None:
            started = time.monotonic()
            try:
                await self.consume()
            except KafkaError as err:
                self.ready = False
                if time.monotonic() - started > 60:
                    backoff = 0.5  # it ran fine for a while: start over gently
                log.warning("kafka unavailable, retrying", error=repr(err), backoff_s=backoff)
                await self.pause(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
        await self.stopping.wait()

    async def pause(self, seconds: float) -> None:
        """Sleep, but wake up at once on SIGTERM."""
        self.heartbeat = time.monotonic()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), timeout=seconds)

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
        listener = FinishBatchBeforeRevoke(self.batch_lock, self.metrics)
        consumer.subscribe([s.kafka_input_topic], listener=listener)
        try:
            try:
                await producer.start()
            except BrokerResponseError as err:
                # start() fails on connection errors (KafkaConnectionError, retried by run()) or,
                # with idempotence on, on the broker's answer to InitProducerId.
                raise IdempotenceUnsupported(
                    f"the broker refused a producer id (InitProducerId: {err!r}): it does not "
                    "support idempotent producers; set KAFKA_IDEMPOTENT_PRODUCER=false for such "
                    "brokers (e.g. Tansu)"
                ) from err
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
                    if not await self.process_with_retries(consumer, producer, batches):
                        break  # leave the group: its other members get these partitions
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

    async def process_with_retries(
        self,
        consumer: AIOKafkaConsumer,
        producer: AIOKafkaProducer,
        batches: dict[TopicPartition, list[ConsumerRecord]],
    ) -> bool:
        """Process a batch; while the model fails as a whole (or the batch meets a fault that no
        single message owns: a bug), retry it with backoff, nothing committed. The process never
        exits on a batch's account. False when the worker stops consuming instead: SIGTERM, or
        KAFKA_MAX_FAILED_BATCHES failures in a row (uncommitted, the batch goes to whoever gets
        its partitions)."""
        failures, backoff = 0, 1.0
        while True:
            try:
                async with self.batch_lock:
                    await self.process(consumer, producer, batches)
                return True
            except KafkaError:
                raise  # the brokers': run() reconnects
            except Exception as err:  # the model's (ModelFailure), or a fault no message owns
                failures += 1
                self.metrics.failed_batches.inc()
                if failures >= self.settings.kafka_max_failed_batches:
                    self.halted = (
                        f"stopped consuming: {failures} batches failed in a row "
                        f"(KAFKA_MAX_FAILED_BATCHES); {type(err).__name__}: {err}"
                    )
                    log.error("the batch cannot be processed", reason=self.halted)
                    return False
                log.warning(
                    "a whole batch failed; retrying it",
                    error=repr(err),
                    failures=failures,
                    backoff_s=backoff,
                    exc_info=not isinstance(err, ModelFailure),
                )
            await self.pause(backoff)
            if self.stopping.is_set():
                return False
            backoff = min(backoff * 2, MAX_BACKOFF_S)

    async def process(
        self,
        consumer: AIOKafkaConsumer,
        producer: AIOKafkaProducer,
        batches: dict[TopicPartition, list[ConsumerRecord]],
    ) -> None:
        started = time.perf_counter()
        # A partition revoked while this batch was fetched belongs to another worker now: its
        # records are that worker's to score (and ours could no longer be committed).
        assigned = consumer.assignment()
        batches = {tp: part for tp, part in batches.items() if tp in assigned}
        records = [record for part in batches.values() for record in part]
        parsed: list[tuple[ConsumerRecord, Source, TextMessage]] = []
        bad: list[tuple[ConsumerRecord, Source, Rejected]] = []
        for record in records:
            source = Source(record.topic, record.partition, record.offset)
            message = messages.parse(record.value, source, self.settings.max_text_chars)
            if isinstance(message, TextMessage):
                parsed.append((record, source, message))
            else:
                bad.append((record, source, message))
        good: list[tuple[ConsumerRecord, Source, TextMessage]] = []
        costs: list[int] = []
        unmeasured: list[tuple[ConsumerRecord, Source, TextMessage]] = []
        measured = await self.in_executor(self.measure_each, [m.text for _, _, m in parsed])
        for (record, source, message), cost in zip(parsed, measured, strict=True):
            if isinstance(cost, Exception):
                unmeasured.append((record, source, message))
            elif cost > self.settings.max_text_tokens:
                bad.append((record, source, Rejected("text_too_long")))
            else:
                good.append((record, source, message))
                costs.append(cost)
        outcomes = await self.score([m.text for _, _, m in good], costs)
        good += unmeasured  # dead letters with their exception, as texts the engine raised on
        outcomes += [cost for cost in measured if isinstance(cost, Exception)]

        acks: list[tuple[ConsumerRecord, Source, asyncio.Future[Any]]] = []
        dead_letters = [rejected.reason for _, _, rejected in bad]
        for (record, source, message), outcome in zip(good, outcomes, strict=True):
            if isinstance(outcome, Exception):
                log.warning(
                    "the engine failed on a message", source=source.as_dict(), error=repr(outcome)
                )
                letter = await self.dead_letter(producer, record, source, INFERENCE_ERROR, outcome)
                acks.append((record, source, letter))
                dead_letters.append(INFERENCE_ERROR)
            else:
                value = messages.result_value(message, outcome, self.model, source)
                topic = self.settings.kafka_output_topic
                acks.append((record, source, await self.send(producer, topic, value, record.key)))
        for record, source, rejected in bad:
            letter = await self.dead_letter(producer, record, source, rejected.reason)
            acks.append((record, source, letter))
        await self.confirm(producer, acks, dead_letters)
        # stored on the brokers: only now may offsets move on

        offsets = {tp: OffsetAndMetadata(part[-1].offset + 1, "") for tp, part in batches.items()}
        try:
            await consumer.commit(offsets)
        except (CommitFailedError, IllegalStateError) as err:  # the group moved on meanwhile
            log.warning(
                "commit failed after a rebalance; batch will be re-delivered", error=str(err)
            )
        self.metrics.observe_batch(
            consumed=len(records),
            produced=len(records) - len(dead_letters),
            dead_letters=dead_letters,
            seconds=time.perf_counter() - started,
        )

    def measure_each(self, texts: list[str]) -> list[int | Exception]:
        """Tokens per text, or the exception measuring it raised: a text the tokenizer cannot
        read costs only itself, never the batch (and never the worker)."""
        try:
            return list(self.windowing.costs(texts))
        except Exception:
            return [self.measure_one(text) for text in texts]

    def measure_one(self, text: str) -> int | Exception:
        try:
            return self.windowing.costs([text])[0]
        except Exception as err:
            return err

    async def in_executor(self, work: Callable[[list[str]], list[T]], texts: list[str]) -> list[T]:
        """`work(texts)` in the inference thread, so that the event loop keeps heartbeats going."""
        if not texts:
            return []
        return await asyncio.get_running_loop().run_in_executor(self.executor, work, texts)

    async def score(self, texts: list[str], costs: Sequence[int]) -> list[Prediction | Exception]:
        """Outcomes per text, scored MAX_BATCH_TOKENS at a time: one model call holds a bounded
        amount of work and memory, and the liveness heartbeat moves between calls."""
        outcomes: list[Prediction | Exception] = []
        start = 0
        while start < len(texts):
            end, tokens = start + 1, costs[start]
            while end < len(texts) and tokens + costs[end] <= self.settings.max_batch_tokens:
                tokens += costs[end]
                end += 1
            outcomes += await self.in_executor(
                lambda chunk: list(score_isolating_failures(self.engine, chunk)), texts[start:end]
            )
            self.heartbeat = time.monotonic()
            start = end
        return outcomes

    async def send(
        self,
        producer: AIOKafkaProducer,
        topic: str,
        value: bytes,
        key: bytes | None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> asyncio.Future[Any]:
        """A send whose future carries every failure: aiokafka raises some at once (a message
        over max_request_size), an outage raises here so that run() reconnects."""
        try:
            return await producer.send(topic, value, key=key, headers=headers)
        except KafkaError as err:
            if err.retriable:
                raise
            failed: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            failed.set_exception(err)
            return failed

    async def confirm(
        self,
        producer: AIOKafkaProducer,
        acks: list[tuple[ConsumerRecord, Source, asyncio.Future[Any]]],
        dead_letters: list[str],
    ) -> None:
        """Wait until every result and dead letter is stored. One the brokers refuse for good (a
        reason other than availability: too large, say) becomes a small dead letter without the
        payload, `undeliverable`; only an outage, or a dead-letter topic that refuses even that,
        raises (and the batch comes again)."""
        outcomes = await asyncio.gather(*(ack for _, _, ack in acks), return_exceptions=True)
        fallbacks = []
        for (record, source, _), outcome in zip(acks, outcomes, strict=True):
            if isinstance(outcome, KafkaError) and not outcome.retriable:
                log.warning(
                    "the broker refused a message for good; dead-lettering it without payload",
                    source=source.as_dict(),
                    error=repr(outcome),
                )
                fallbacks.append(
                    await self.dead_letter(producer, record, source, UNDELIVERABLE, outcome, 0)
                )
                dead_letters.append(UNDELIVERABLE)
            elif isinstance(outcome, BaseException):
                raise outcome
        await asyncio.gather(*fallbacks)

    async def dead_letter(
        self,
        producer: AIOKafkaProducer,
        record: ConsumerRecord,
        source: Source,
        reason: str,
        error: BaseException | None = None,
        max_payload_bytes: int = messages.MAX_PAYLOAD_BYTES,
    ) -> asyncio.Future[Any]:
        """Send one dead letter; the future resolves when the brokers have stored it."""
        headers = [("error", reason.encode())]
        if error is not None:
            headers.append(("exception", type(error).__name__.encode()))
        value = messages.dead_letter_value(record.value, reason, source, error, max_payload_bytes)
        return await self.send(
            producer, self.settings.kafka_dlq_topic, value, record.key, headers=headers
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
