"""`python -m kafka_worker`: score a Kafka topic with the model in the BentoML store."""

from __future__ import annotations

import asyncio
import os
import signal

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")

import structlog
from aiohttp import web

from kafka_worker.metrics import probe_app
from kafka_worker.worker import Worker
from observability import configure_logging, get_metrics
from runners.engine import load_engine
from runners.model_store import get
from settings import get_settings, use_local_models_only


async def main() -> None:
    use_local_models_only()
    settings = get_settings()
    configure_logging()
    log = structlog.get_logger("kafka_worker")
    model = get(settings.model_store_tag)
    engine = load_engine(
        model,
        settings.backend,
        settings.inference_threads,
        settings.kafka_batch_size,
        observe_batch=get_metrics().observe_batch,
    )
    worker = Worker(
        settings,
        engine,
        {"name": model.name, "version": model.version, "backend": settings.backend},
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):  # finish the batch in flight, commit, leave
        loop.add_signal_handler(sig, worker.stopping.set)
    probes = web.AppRunner(probe_app(worker), access_log=None)
    await probes.setup()
    await web.TCPSite(probes, settings.worker_host, settings.worker_port).start()
    log.info(
        "worker started",
        model=model.tag,
        backend=settings.backend,
        bootstrap=settings.kafka_bootstrap_servers,
        probes_port=settings.worker_port,
    )
    try:
        await worker.run()
    finally:
        await probes.cleanup()
        log.info("worker stopped")


if __name__ == "__main__":
    asyncio.run(main())
