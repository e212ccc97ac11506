"""Kafka end to end: throughput against the raw runner, and a SIGKILL soak.

    python -m loadtests.kafka_benchmark [--messages 20000] [--cycles 5] [--per-cycle 10000]

1. Throughput: the raw in-process engine (ONNX int8, the worker's batch size) is timed on the
   same texts, then N messages wait in a local Tansu topic and one worker drains them.
2. Soak: per cycle, 10,000 more messages are sent, a worker starts, and is killed with SIGKILL at
   a random moment; a last worker finishes. Every input must appear in the results or the
   dead-letter topic; duplicates are counted.
Writes kafka-benchmark.json / .md / .html (with a plot) to loadtests/reports/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tqdm import tqdm

from devtools.local_kafka import (
    TansuBroker,
    WorkerProcess,
    collect,
    create_topics,
    produce,
    sources,
)
from kubesentiment.settings import get_settings
from loadtests.benchmark import HERE, best_rate, png_base64
from loadtests.texts import sample_texts
from runners.engine import load_engine
from runners.model_store import get

TOPICS = get_settings().kafka_topics
PRODUCED = "kubesentiment_worker_produced_total"


def raw_runner_throughput(texts: list[str]) -> float:
    """Texts/s of the worker's own engine, in process, at the worker's batch size."""
    s = get_settings()
    engine = load_engine(
        get(s.model_store_tag), s.backend, s.worker_inference_threads, s.kafka_batch_size
    )
    batch = texts[: s.kafka_batch_size]
    return best_rate(lambda: len(engine.predict(batch)))


def messages(start: int, n: int) -> list[tuple[bytes | None, bytes | None]]:
    texts = sample_texts(512)
    return [
        (f"k{i}".encode(), json.dumps({"id": f"m{i}", "text": texts[i % 512]}).encode())
        for i in range(start, start + n)
    ]


def throughput(broker: TansuBroker, n: int) -> dict[str, Any]:
    raw = raw_runner_throughput(sample_texts(512))
    asyncio.run(produce(broker.bootstrap, TOPICS[0], messages(0, n)))
    worker = WorkerProcess(broker, 9400)
    started = time.perf_counter()
    with tqdm(total=n, desc="worker draining", unit="msg") as bar:
        while (done := worker.metric(PRODUCED)) < n:
            bar.update(int(done) - bar.n)
            time.sleep(0.1)
        bar.update(n - bar.n)
    elapsed = time.perf_counter() - started
    worker.stop()
    e2e = n / elapsed
    return {
        "messages": n,
        "seconds": round(elapsed, 2),
        "end_to_end_per_s": e2e,
        "raw_runner_per_s": raw,
        "ratio": e2e / raw,
    }


def soak(broker: TansuBroker, cycles: int, per_cycle: int, seed: int = 5) -> dict[str, Any]:
    rng = random.Random(seed)
    sent: list[tuple[int, int]] = []
    kills = []
    for cycle in tqdm(range(cycles), desc="SIGKILL cycles", unit="cycle"):
        sent += asyncio.run(
            produce(broker.bootstrap, TOPICS[0], messages(cycle * per_cycle, per_cycle))
        )
        worker = WorkerProcess(broker, 9401)
        time.sleep(rng.uniform(1.0, 4.0))
        kills.append(worker.metric(PRODUCED))
        worker.stop(signal.SIGKILL)
    last = WorkerProcess(broker, 9401)
    wanted = set(sent)
    items = asyncio.run(
        collect(
            broker.bootstrap,
            TOPICS[1:],
            lambda got: len(got) >= len(wanted) and wanted <= set(sources(got)),
            timeout=600,
        )
    )
    last.stop()
    counts = sources(items)
    lost = len(wanted - set(counts))
    return {
        "cycles": cycles,
        "messages": len(sent),
        "lost": lost,
        "duplicates": sum(counts.values()) - len(counts),
        "produced_before_each_kill": kills,
    }


def write_report(result: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "kafka-benchmark.json").write_text(json.dumps(result, indent=2))
    t, s = result["throughput"], result["soak"]
    table = (
        f"Kafka end to end ({result['date']}, backend {result['backend']}): "
        f"{t['end_to_end_per_s']:.0f} msg/s vs raw runner {t['raw_runner_per_s']:.0f} "
        f"texts/s, ratio {t['ratio']:.2f} ({t['messages']} messages).\n"
        f"SIGKILL soak: {s['cycles']} cycles, {s['messages']} messages, lost {s['lost']}, "
        f"duplicates {s['duplicates']}."
    )
    (out / "kafka-benchmark.md").write_text(table + "\n")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(
        ["raw runner", "Kafka end to end"],
        [t["raw_runner_per_s"], t["end_to_end_per_s"]],
        color=["grey", "tab:blue"],
    )
    ax.axhline(0.7 * t["raw_runner_per_s"], color="red", ls=":", label="70% of raw")
    ax.set_ylabel("texts / s")
    ax.legend()
    fig.tight_layout()
    (out / "kafka-benchmark.html").write_text(
        f"<!doctype html><meta charset=utf-8><title>Kafka benchmark</title>"
        f"<h1>KubeSentiment Kafka benchmark</h1><img src='data:image/png;base64,"
        f"{png_base64(fig)}'><pre>{table}</pre>"
    )
    print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--cycles", type=int, default=5)
    parser.add_argument("--per-cycle", type=int, default=10_000)
    parser.add_argument("--out", type=Path, default=HERE / "reports")
    args = parser.parse_args()
    result: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "backend": get_settings().backend,
    }
    for part, port in (("throughput", 19400), ("soak", 19401)):
        broker = TansuBroker(port).start()
        try:
            asyncio.run(create_topics(broker.bootstrap, TOPICS))
            result[part] = (
                throughput(broker, args.messages)
                if part == "throughput"
                else soak(broker, args.cycles, args.per_cycle)
            )
        finally:
            broker.stop()
    write_report(result, args.out)


if __name__ == "__main__":
    main()
