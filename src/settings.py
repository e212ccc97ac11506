"""One typed home for every knob: values come from environment variables (or a .env file in
development), are validated once at start-up, and are documented in the README."""

from __future__ import annotations

import os
import re
from datetime import timedelta
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

Backend = Literal["onnx-int8", "onnx-fp32", "pytorch"]
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration(value: Any) -> Any:
    """Seconds ('3600'), or a number and a unit ('90s', '30m', '24h', '7d'); ISO 8601 ('PT24H')
    too, which pydantic reads itself."""
    if isinstance(value, str) and (match := re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhd]?)", value)):
        return timedelta(seconds=float(match[1]) * _UNITS[match[2] or "s"])
    return value


Duration = Annotated[timedelta, BeforeValidator(_duration)]
AbsolutePath = Annotated[Path, AfterValidator(lambda path: path.expanduser().absolute())]


def _data_home() -> Path:
    """Where a user's application data lives (XDG), never the directory a server started in."""
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", frozen=True)

    # Model pipeline
    data_dir: Path = Field(
        default=Path.home() / ".cache" / "kubesentiment",
        description="Where the downloaded training data is cached (never committed).",
    )
    model_name: str = Field(default="sentiment", description="Model name in the BentoML store.")
    model_tag: str = Field(
        default="latest", description="Version of the model to serve, or 'latest'."
    )

    # Inference
    backend: Backend = Field(default="onnx-int8", description="Back end that scores texts.")
    runner_layout: Literal["in-process", "split"] = Field(
        default="in-process",
        description="Where the model runs: in each worker of the HTTP service, or in a runner "
        "service of its own that the HTTP service calls once per batch (scaled apart).",
    )
    # Two workers of one thread served 16-53% more than one of two threads at 8-64 clients on
    # the 2-core build machine, and answered a lone client 2 ms later (README, Scaling).
    service_workers: int = Field(
        default=2, ge=1, description="Worker processes of the HTTP service, each with the model."
    )
    inference_threads: int = Field(
        default=1,
        ge=1,
        description="Threads for torch / ONNX Runtime per worker process of the HTTP service "
        "(or of a runner service): workers x threads = the pod's cores.",
    )
    max_batch_size: int = Field(default=64, ge=1, description="Largest inference batch.")
    max_latency_ms: int = Field(
        default=2000, ge=1, description="Batching deadline of the runner services."
    )

    # HTTP API limits
    max_text_chars: int = Field(default=20_000, ge=1, description="Longest accepted text.")
    max_batch_texts: int = Field(default=256, ge=1, description="Texts per sync batch request.")
    max_job_texts: int = Field(default=100_000, ge=1, description="Texts per async batch job.")
    max_queued_texts: int = Field(
        default=4096, ge=1, description="Interactive texts waiting before new ones get 503."
    )
    jobs_db: AbsolutePath = Field(
        default_factory=lambda: _data_home() / "kubesentiment" / "jobs.db",
        description="SQLite file of async batch jobs.",
    )
    jobs_database_url: SecretStr | None = Field(
        default=None,
        description="postgresql://user:password@host:5432/db: jobs shared by every replica and "
        "worker (a secret: it holds the password). Unset: the SQLite file JOBS_DB.",
    )
    job_lease: Duration = Field(
        default=timedelta(seconds=30),
        gt=timedelta(0),
        description="How long a worker keeps a claimed chunk of job texts without renewing it; "
        "after that (its worker died) another worker takes the chunk over.",
    )
    job_retention: Duration = Field(
        default=timedelta(hours=24),
        gt=timedelta(0),
        description="How long finished and failed jobs (texts and results) are kept.",
    )
    shutdown_timeout: Duration = Field(
        default=timedelta(seconds=20),
        description="On SIGTERM, how long the job loop may take to finish its chunk in flight; "
        "keep it under the pod's termination grace period.",
    )

    # Kafka worker
    kafka_bootstrap_servers: str = Field(
        default="127.0.0.1:9092", description="Brokers, host:port[,...]."
    )
    kafka_input_topic: str = Field(default="sentiment-requests", description="Texts to score.")
    kafka_output_topic: str = Field(default="sentiment-results", description="Results.")
    kafka_dlq_topic: str = Field(default="sentiment-dlq", description="Dead letters.")
    kafka_group_id: str = Field(default="sentiment-worker", description="Consumer group.")
    kafka_batch_size: int = Field(default=64, ge=1, description="Messages scored per batch.")
    kafka_linger_ms: int = Field(
        default=20, ge=0, description="How long a poll waits to fill a batch."
    )
    kafka_idempotent_producer: bool = Field(
        default=True,
        description="Exactly-once writes per producer session; off only for brokers without "
        "InitProducerId (the Tansu used in tests and the demo).",
    )
    kafka_max_failed_batches: int = Field(
        default=5,
        ge=1,
        description="Consecutive batches the model fails as a whole (a known-good text fails "
        "too) before the worker stops consuming and reports not ready.",
    )
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: Path | None = Field(
        default=None, description="CA bundle for TLS; the system's when unset."
    )
    worker_inference_threads: int = Field(
        default=2, ge=1, description="Threads of the Kafka worker's model (one process: all cores)."
    )
    worker_host: str = Field(default="0.0.0.0", description="Where the worker's probes listen.")
    worker_port: int = Field(default=9102, description="/metrics, /livez, /readyz of the worker")

    @property
    def model_store_tag(self) -> str:
        """The model to load, as the BentoML store names it."""
        return f"{self.model_name}:{self.model_tag}"

    @property
    def kafka_topics(self) -> tuple[str, str, str]:
        """Input, results and dead-letter topics, in that order."""
        return (self.kafka_input_topic, self.kafka_output_topic, self.kafka_dlq_topic)


@lru_cache
def get_settings() -> Settings:
    return Settings()


def use_local_models_only() -> None:
    """Called once by each entry point that loads models from the store or a local folder, before
    transformers is imported: it then never tries the Hugging Face hub, which most clusters
    cannot reach (a lookup would only add a timeout). Library modules leave the environment
    alone, so `python -m models import <hub id>` can still reach a hub where one is reachable."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
