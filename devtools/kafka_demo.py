"""`make kafka-demo`: a local Tansu broker, the worker, a few messages, and what came out."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from devtools.local_kafka import TansuBroker, WorkerProcess, collect, create_topics, produce
from kubesentiment.settings import get_settings

SAMPLES: list[tuple[bytes, bytes | None]] = [
    (
        b"review-1",
        json.dumps({"id": "review-1", "text": "I love this movie, it was wonderful!"}).encode(),
    ),
    (
        b"review-2",
        json.dumps({"id": "review-2", "text": "This was a terrible waste of time."}).encode(),
    ),
    (b"review-3", b"Plain text works too: a quietly moving, beautifully acted film."),
    (b"broken-1", b'{"id": "broken-1", "text": '),
    (b"broken-2", b"\xff\xfe not UTF-8"),
    (b"broken-3", json.dumps({"id": "broken-3", "text": "   "}).encode()),
]


def main() -> None:
    settings = get_settings()
    port = int(settings.kafka_bootstrap_servers.rsplit(":", 1)[1])
    broker = TansuBroker(port, log_file=Path("/tmp/kubesentiment-tansu.log")).start()
    topics = settings.kafka_topics
    worker = None
    try:
        asyncio.run(create_topics(broker.bootstrap, topics))
        print(f"broker: Tansu on {broker.bootstrap}; topics: {', '.join(topics)}")
        worker = WorkerProcess(broker, settings.worker_port)
        print(f"worker: ready; probes and metrics on http://127.0.0.1:{settings.worker_port}")
        asyncio.run(produce(broker.bootstrap, settings.kafka_input_topic, SAMPLES))
        print(f"sent {len(SAMPLES)} messages\n")
        items = asyncio.run(
            collect(broker.bootstrap, topics[1:], lambda got: len(got) >= len(SAMPLES), timeout=60)
        )
        results = [i for i in items if i["_topic"] == settings.kafka_output_topic]
        letters = [i for i in items if i["_topic"] == settings.kafka_dlq_topic]
        print(f"{settings.kafka_output_topic}:")
        for r in results:
            print(f"  {r['id']:<28} {r['sentiment']['label']:<8} {r['sentiment']['score']:.3f}")
        print(f"\n{settings.kafka_dlq_topic}:")
        for d in letters:
            print(f"  {d['_key'].decode():<28} {d['error']:<14} payload={d['payload']!r}")
    finally:
        if worker is not None:
            worker.stop()
        broker.stop()


if __name__ == "__main__":
    main()
