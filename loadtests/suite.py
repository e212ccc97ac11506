"""`make bench`: every figure a user compares serving systems by, measured in one run on one
machine with one model, in one HTML report (loadtests/reports/index.html) and one JSON file.

    python -m loadtests.suite            # the full run (about 13 minutes on 2 cores)
    python -m loadtests.suite --quick    # fewer levels and shorter runs (about 3 minutes)
    python -m loadtests.suite --only raw service     # some sections

Sections:
- raw: the back ends in process (PyTorch fp32, ONNX fp32, ONNX int8) at batch sizes 1-64 and
  texts of about 16, 64, 256 and 1,000 tokens, through the engine's whole path (tokeniser, the
  window path for long texts, folding);
- service: `bentoml serve` at 1-64 concurrent clients, wrk as the client (a C load generator,
  so the client does not eat the server's CPU): single short and long texts, batches of 32,
  latency percentiles, errors and the model batch sizes the scheduler formed;
- ceiling: what the single-text endpoint could serve on these cores, 1 / (HTTP cost + model
  cost): the HTTP cost from a no-model endpoint of the same service (HTTP_COST_PROBE), the model
  cost from the engine alone in the service's layout (SERVICE_WORKERS processes of
  INFERENCE_THREADS threads);
- kafka: the worker end to end, a topic drained through a local Tansu broker;
- peers: a seed-style FastAPI + transformers pipeline app, MLServer and Ray Serve, each in its
  own virtual environment (loadtests/peers/), serving the same model on the same cores;
- cost: dollars per million predictions on a few cloud instances (loadtests/prices.json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import httpx
from tokenizers import Tokenizer
from tqdm import tqdm

from kubesentiment.settings import BackendName, get_settings
from loadtests.benchmark import (
    HERE,
    best_rate,
    latency_row,
    run_wrk,
    served,
    server_cpu_seconds,
)
from loadtests.cost import costs
from loadtests.texts import sample_texts
from runners.cpu import cpu_summary
from runners.engine import load_engine
from runners.model_store import StoredModel, get

BACKENDS: tuple[BackendName, ...] = ("pytorch", "onnx-fp32", "onnx-int8")
TOKEN_LENGTHS = (16, 64, 256, 1000)
SERVICE_PORT, PEER_PORT, KAFKA_PORT = 3100, 3101, 19410


@dataclass(frozen=True)
class Plan:
    """How much of each section to measure: `--quick` trims every list and shortens every run."""

    seconds: int  # per load level
    raw_seconds: float  # per raw grid point
    batch_sizes: tuple[int, ...]
    token_lengths: tuple[int, ...]
    clients: tuple[int, ...]
    long_clients: tuple[int, ...]
    peer_clients: tuple[int, ...]
    kafka_messages: int
    ceiling_rounds: int
    sections: tuple[str, ...] = field(default=())

    @classmethod
    def of(cls, quick: bool, sections: tuple[str, ...]) -> Plan:
        if quick:
            return cls(4, 0.5, (1, 32), (16, 1000), (1, 8, 32), (8,), (8, 32), 3000, 1, sections)
        return cls(
            10,
            1.5,
            (1, 4, 16, 32, 64),
            TOKEN_LENGTHS,
            (1, 2, 4, 8, 16, 32, 64),
            (8, 32),
            (1, 8, 32, 64),
            20_000,
            3,
            sections,
        )


def texts_of_tokens(tokenizer: Tokenizer, tokens: int, count: int) -> list[str]:
    """`count` different texts of about `tokens` tokens each: review sentences joined."""
    tokenizer.no_truncation()  # a tokenizer.json may cut at the model's window
    sentences = sample_texts(count * 80, seed=tokens)
    texts, used = [], 0
    for _ in range(count):
        words: list[str] = []
        while len(tokenizer.encode(" ".join(words)).ids) < tokens:
            words.append(sentences[used % len(sentences)])
            used += 1
        texts.append(" ".join(words))
    return texts


def raw_backends(model: StoredModel, plan: Plan) -> list[dict[str, Any]]:
    """Texts/s of each back end in this process on every core, over the grid of the plan."""
    tokenizer = Tokenizer.from_file(str(model.tokenizer_file))
    max_batch = max(plan.batch_sizes)
    texts = {n: texts_of_tokens(tokenizer, n, max_batch) for n in plan.token_lengths}
    rows = []
    grid = [(b, n, bs) for b in BACKENDS for n in plan.token_lengths for bs in plan.batch_sizes]
    engines = {}
    for backend, tokens, batch in tqdm(grid, desc="raw back ends", unit="point"):
        if backend not in engines:
            engines[backend] = load_engine(model, backend, os.cpu_count() or 1, max_batch)
        score = partial(engines[backend].predict, texts[tokens][:batch])
        per_s = best_rate(lambda: len(score()), plan.raw_seconds, rounds=1)  # noqa: B023
        rows.append({"backend": backend, "tokens": tokens, "batch": batch, "texts_per_s": per_s})
    return rows


def _model_rate_in_process(args: tuple[str, BackendName, int, int, float, float]) -> float:
    """Texts/s of one engine in a process of its own, timed from `start` (a shared wall-clock
    moment, so that the processes measure together, each on its core)."""
    tag, backend, threads, batch, start, seconds = args
    engine = load_engine(get(tag), backend, threads, batch)
    texts = sample_texts(batch)
    engine.predict(texts)
    time.sleep(max(0.0, start - time.time()))
    return best_rate(lambda: len(engine.predict(texts)), seconds)


def model_cost_layout(model: StoredModel, seconds: float, batch: int) -> dict[str, Any]:
    """Texts/s of the model path alone as the service runs it: SERVICE_WORKERS processes of
    INFERENCE_THREADS threads, at once, short texts in batches of what each worker forms."""
    s = get_settings()
    start = time.time() + 15  # after every process has loaded its model
    job = (model.tag, s.backend, s.inference_threads, batch, start, seconds)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(s.service_workers, mp_context=context) as pool:
        rates = list(pool.map(_model_rate_in_process, [job] * s.service_workers))
    return {
        "workers": s.service_workers,
        "threads": s.inference_threads,
        "batch": batch,
        "texts_per_s": sum(rates),
    }


def batch_rows_seen(url: str) -> tuple[float, float]:
    """(sum, count) of the model batch sizes the service has formed so far, from /metrics."""
    text = httpx.get(f"{url}/api/v1/metrics", timeout=10).text
    pattern = r"^kubesentiment_inference_batch_size_(sum|count) (\S+)$"
    found = {m[1]: float(m[2]) for m in re.finditer(pattern, text, re.M)}
    return found.get("sum", 0.0), found.get("count", 0.0)


def drive(url: str, path: str, bodies: list[str], clients: int, seconds: int) -> dict[str, Any]:
    """One wrk run, with the mean model batch the scheduler formed during it."""
    port = int(url.rsplit(":", 1)[1])
    before, cpu_before = batch_rows_seen(url), server_cpu_seconds(port)
    r = run_wrk(f"{url}{path}", bodies, clients, seconds)
    after, cpu = batch_rows_seen(url), server_cpu_seconds(port) - cpu_before
    calls = after[1] - before[1]
    return {
        "clients": clients,
        **latency_row(r),
        "mean_model_batch": (after[0] - before[0]) / calls if calls else 0.0,
        "cpu_ms_per_request": cpu * 1e3 / max(1, r["requests"]),
    }


def service(model: StoredModel, plan: Plan) -> dict[str, Any]:
    """The HTTP service at every client count; then, on the same server, the ceiling."""
    tokenizer = Tokenizer.from_file(str(model.tokenizer_file))
    short = [json.dumps({"text": t}) for t in sample_texts(512)]
    long = [json.dumps({"text": t}) for t in texts_of_tokens(tokenizer, 256, 64)]
    texts = sample_texts(512)
    batches = [json.dumps({"texts": texts[i : i + 32]}) for i in range(0, 512, 32)]
    result: dict[str, Any] = {}
    steps = len(plan.clients) + len(plan.long_clients) + 1
    with served(SERVICE_PORT, {"HTTP_COST_PROBE": "true"}) as url:
        with tqdm(total=steps, desc="service", unit="level") as bar:
            run_wrk(f"{url}/api/v1/predict", short, 8, 2)  # warm every worker up
            result["single_short"] = []
            for clients in plan.clients:
                result["single_short"].append(
                    drive(url, "/api/v1/predict", short, clients, plan.seconds)
                )
                bar.update()
            result["single_long"] = []
            for clients in plan.long_clients:
                result["single_long"].append(
                    drive(url, "/api/v1/predict", long, clients, plan.seconds)
                )
                bar.update()
            batch = drive(url, "/api/v1/predict/batch", batches, 4, plan.seconds)
            result["batch32"] = {**batch, "texts_per_s": batch["requests_per_s"] * 32}
            bar.update()
        if "ceiling" in plan.sections:
            result["ceiling"] = ceiling(model, url, short, plan)
    return result


def ceiling(model: StoredModel, url: str, bodies: list[str], plan: Plan) -> dict[str, Any]:
    """/api/v1/predict at 32 clients against 1 / (HTTP cost + model cost), the three measured
    back to back in each round (a shared machine's speed drifts between minutes): the HTTP cost
    from the no-model endpoint, the model's from the engine alone in the service's layout, at
    the batch size the service formed."""
    s = get_settings()
    rounds = []
    for _ in tqdm(range(plan.ceiling_rounds), desc="ceiling", unit="round"):
        service = drive(url, "/api/v1/predict", bodies, 32, plan.seconds)
        no_model = drive(url, "/api/v1/predict/no-model", bodies, 32, plan.seconds)
        batch = min(s.max_batch_size, max(1, round(service["mean_model_batch"])))
        model_path = model_cost_layout(model, plan.seconds / 3, batch)
        http_cost = 1 / no_model["requests_per_s"]
        model_cost = 1 / model_path["texts_per_s"]
        limit = 1 / (http_cost + model_cost)
        rounds.append(
            {
                "http_ms_per_request": http_cost * 1e3,
                "model_ms_per_text": model_cost * 1e3,
                "no_model": no_model,
                "model_path": model_path,
                "ceiling_requests_per_s": limit,
                "service": service,
                "service_requests_per_s": service["requests_per_s"],
                "fraction": service["requests_per_s"] / limit,
            }
        )
    middle = sorted(rounds, key=lambda r: r["fraction"])[len(rounds) // 2]
    return {**middle, "rounds": rounds, "fractions": [r["fraction"] for r in rounds]}


def kafka(plan: Plan) -> dict[str, Any]:
    from devtools.local_kafka import TansuBroker, create_topics
    from loadtests.kafka_benchmark import TOPICS, throughput

    broker = TansuBroker(KAFKA_PORT).start()
    try:
        asyncio.run(create_topics(broker.bootstrap, TOPICS))
        return throughput(broker, plan.kafka_messages)
    finally:
        broker.stop()


def peers(model: StoredModel, plan: Plan) -> dict[str, list[dict[str, Any]]]:
    """Each peer in its own environment, started, driven like our service, stopped."""
    from loadtests.peers import PEERS, ensure_env, serve

    texts = sample_texts(512)
    result = {}
    for name, peer in PEERS.items():
        ensure_env(peer)
        bodies = [peer.body(t) for t in texts]
        rows = []
        with serve(peer, model, PEER_PORT) as url:
            run_wrk(f"{url}{peer.predict_path}", bodies, 8, 2)
            for clients in tqdm(plan.peer_clients, desc=name, unit="level"):
                r = run_wrk(f"{url}{peer.predict_path}", bodies, clients, plan.seconds)
                rows.append({"clients": clients, **latency_row(r)})
        result[name] = rows
    return result


def verdicts(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with the figure that meets or misses it."""
    ours = {r["clients"]: r for r in result.get("service", {}).get("single_short", [])}
    found = []
    for name, rows in result.get("peers", {}).items():
        theirs = {r["clients"]: r for r in rows}
        if 32 in ours and 32 in theirs:
            ratio = ours[32]["requests_per_s"] / theirs[32]["requests_per_s"]
            need = 10.0 if name == "fastapi" else 1.3
            found.append(
                {
                    "target": f"single text, 32 clients: >= {need:g}x {name}",
                    "measured": ratio,
                    "met": ratio >= need,
                }
            )
    p99s = [
        rows_by[8]["p99_ms"]
        for rows in result.get("peers", {}).values()
        if 8 in (rows_by := {r["clients"]: r for r in rows})
    ]
    if 8 in ours and p99s:
        found.append(
            {
                "target": "p99 at 8 clients <= best peer's (ms)",
                "measured": ours[8]["p99_ms"],
                "best_peer": min(p99s),
                "met": ours[8]["p99_ms"] <= min(p99s),
            }
        )
    if "ceiling" in result:
        fraction = result["ceiling"]["fraction"]
        found.append(
            {
                "target": "service >= 90% of the ceiling",
                "measured": fraction,
                "met": fraction >= 0.9,
            }
        )
    return found


def per_core(result: dict[str, Any]) -> dict[str, float]:
    """Single-text predictions per second per core at 32 clients, ours and each peer's."""
    cores = os.cpu_count() or 1
    rates = {}
    for r in result.get("service", {}).get("single_short", []):
        if r["clients"] == 32:
            rates["kubesentiment"] = r["requests_per_s"] / cores
    for name, rows in result.get("peers", {}).items():
        for r in rows:
            if r["clients"] == 32:
                rates[name] = r["requests_per_s"] / cores
    return rates


@contextmanager
def timed(name: str, timings: dict[str, float]) -> Iterator[None]:
    started = time.monotonic()
    yield
    timings[name] = round(time.monotonic() - started, 1)


SECTIONS = ("raw", "service", "ceiling", "kafka", "peers", "cost")


def main() -> int:
    from loadtests.suite_report import write_report

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer levels, shorter runs")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--out", type=Path, default=HERE / "reports")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("wrk is needed: apt-get install -y wrk", file=sys.stderr)
        return 2
    plan = Plan.of(args.quick, tuple(args.only))
    print(
        f"{'quick' if args.quick else 'full'} run of {', '.join(plan.sections)}: about "
        f"{'3' if args.quick else '13'} minutes on 2 cores (measured with every section), plus "
        "a minute for each peer's virtual environment the first time"
    )
    model = get(get_settings().model_store_tag)
    started = time.monotonic()
    timings: dict[str, float] = {}
    result: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_summary(),
        "cpus": os.cpu_count(),
        "quick": args.quick,
        "model": {
            "tag": model.tag,
            "int8_layout": model.metadata.get("int8", {}).get("fp32_feed_forward_layers"),
        },
        "settings": {
            "backend": get_settings().backend,
            "service_workers": get_settings().service_workers,
            "inference_threads": get_settings().inference_threads,
        },
        "timings_s": timings,
    }
    if "raw" in plan.sections:
        with timed("raw", timings):
            result["raw"] = raw_backends(model, plan)
    if "service" in plan.sections or "ceiling" in plan.sections:
        with timed("service and ceiling", timings):
            result["service"] = service(model, plan)
        if "ceiling" in result["service"]:
            result["ceiling"] = result["service"].pop("ceiling")
    if "kafka" in plan.sections:
        with timed("kafka", timings):
            result["kafka"] = kafka(plan)
    if "peers" in plan.sections:
        with timed("peers", timings):
            result["peers"] = peers(model, plan)
    if "cost" in plan.sections:
        result["cost"] = costs(per_core(result))
    result["verdicts"] = verdicts(result)
    timings["total"] = round(time.monotonic() - started, 1)
    write_report(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
