"""Prometheus metrics of the worker, served on its own port with its probes."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from kafka_worker.worker import Worker

# A loop that has not come round for this long is stuck: /livez says so and Kubernetes restarts.
STALE_AFTER_S = 120


class WorkerMetrics:
    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.consumed = Counter("kubesentiment_worker_consumed", "Messages consumed")
        self.produced = Counter("kubesentiment_worker_produced", "Results produced")
        self.dead_lettered = Counter(
            "kubesentiment_worker_dead_lettered", "Messages sent to the DLQ", ["reason"]
        )
        self.batch_size = Histogram(
            "kubesentiment_worker_batch_size",
            "Messages per processed batch",
            buckets=(1, 4, 16, 32, 64, 128, 256, 512),
        )
        self.latency = Histogram(
            "kubesentiment_worker_batch_seconds",
            "Score + produce + commit time of a batch",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
        self.failed_batches = Counter(
            "kubesentiment_worker_failed_batches",
            "Batches the model failed as a whole, a known-good text too (retried, never "
            "dead-lettered)",
        )
        self.lag = Gauge(
            "kubesentiment_worker_lag",
            "Messages behind the high-water mark",
            ["topic", "partition"],
        )
        self.ready = Gauge(
            "kubesentiment_worker_ready", "1 when /readyz answers 200, 0 when not (set at scrape)"
        )

    def observe_batch(
        self, consumed: int, produced: int, dead_letters: list[str], seconds: float
    ) -> None:
        self.consumed.inc(consumed)
        self.produced.inc(produced)
        for reason in dead_letters:
            self.dead_lettered.labels(reason).inc()
        self.batch_size.observe(consumed)
        self.latency.observe(seconds)


def probe_app(worker: Worker) -> web.Application:
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    async def metrics(_: web.Request) -> web.Response:
        worker.metrics.ready.set(1 if worker.ready else 0)
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def livez(_: web.Request) -> web.Response:
        # A halted worker idles on purpose (see /readyz): restarting it would not mend the model.
        alive = worker.halted is not None or time.monotonic() - worker.heartbeat < STALE_AFTER_S
        return web.Response(text="ok" if alive else "stuck", status=200 if alive else 503)

    async def readyz(_: web.Request) -> web.Response:
        if worker.ready:
            return web.Response(text="ready")
        return web.Response(text=worker.halted or "not ready", status=503)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/livez", livez)
    app.router.add_get("/readyz", readyz)
    return app
