"""One typed home for every knob: values come from environment variables (or a .env file in
development), are validated once at start-up, and are documented in the README."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

Backend = Literal["onnx-int8", "onnx-fp32", "pytorch"]


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
    inference_threads: int = Field(default=2, ge=1, description="Threads for torch / ONNX Runtime.")
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
    jobs_db: Path = Field(
        default=Path("kubesentiment-jobs.db"), description="SQLite file of async batch jobs."
    )

    # Kafka worker
    kafka_bootstrap_servers: str = "127.0.0.1:9092"
    kafka_input_topic: str = "sentiment-requests"
    kafka_output_topic: str = "sentiment-results"
    kafka_dlq_topic: str = "sentiment-dlq"
    kafka_group_id: str = "sentiment-worker"
    kafka_batch_size: int = Field(default=64, ge=1, description="Messages scored per batch.")
    kafka_linger_ms: int = Field(
        default=20, ge=0, description="How long a poll waits to fill a batch."
    )
    kafka_idempotent_producer: bool = Field(
        default=True,
        description="Exactly-once writes per producer session; off only for brokers without "
        "InitProducerId (the Tansu used in tests and the demo).",
    )
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: Path | None = Field(
        default=None, description="CA bundle for TLS; the system's when unset."
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
