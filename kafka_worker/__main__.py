"""`python -m kafka_worker`: score a Kafka topic with the model in the BentoML store."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")

import structlog
from aiohttp import web

from kafka_worker.metrics import probe_app
from kafka_worker.worker import IdempotenceUnsupported, Worker
from kubesentiment.observability import configure_logging, get_metrics
from kubesentiment.settings import Settings, get_settings, use_local_models_only
from kubesentiment.vault import Vault, VaultError, with_vault_secrets
from runners.model_store import get
from runners.self_check import load_checked_engine
from runners.windowing import Windowing

WORKER_SETTINGS = ("model_name", "model_tag", "backend", "int8_self_check", "max_text_chars")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The worker takes no options: environment variables configure it
    (kubesentiment/settings.py), and --help lists the ones it reads, with their defaults, from
    the settings module itself."""
    lines = [
        f"  {name.upper():<28} {field.description or 'see README'} (default: {field.default})"
        for name, field in Settings.model_fields.items()
        if name in WORKER_SETTINGS or name.startswith(("kafka_", "worker_", "vault_"))
    ]
    parser = argparse.ArgumentParser(
        prog="python -m kafka_worker",
        description="Score texts from a Kafka topic with the model in the BentoML store; results "
        "and dead letters go to their own topics.",
        epilog="environment variables:\n" + "\n".join(lines),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return parser.parse_args(argv)


async def main() -> int:
    """Runs until SIGTERM; the exit status is 2 for a configuration that retrying cannot fix."""
    use_local_models_only()
    configure_logging()
    log = structlog.get_logger("kafka_worker")
    try:  # the Kafka credentials, when VAULT_KAFKA_PATH names them
        settings = with_vault_secrets(get_settings(), Vault.connect(get_settings()), kafka=True)
    except VaultError as err:
        log.critical(f"cannot start: {err}")
        return 2
    model = get(settings.model_store_tag)
    metrics = get_metrics()
    engine, check = load_checked_engine(  # int8 checked on this CPU, as in the API
        model,
        settings.backend,
        settings.worker_inference_threads,
        settings.kafka_batch_size,
        observe_batch=metrics.observe_batch,
        check=settings.int8_self_check,
    )
    metrics.observe_backend(check)
    worker = Worker(
        settings,
        engine,
        {"name": model.name, "version": model.version, "backend": check.served},
        Windowing.of(model),
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
        backend=check.served,
        bootstrap=settings.kafka_bootstrap_servers,
        probes_port=settings.worker_port,
    )
    try:
        await worker.run()
    except IdempotenceUnsupported as err:
        log.error(str(err))
        return 2
    finally:
        await probes.cleanup()
        log.info("worker stopped")
    return 0


if __name__ == "__main__":
    parse_args()
    sys.exit(asyncio.run(main()))
