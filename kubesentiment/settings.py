"""One typed home for every knob: values come from environment variables (or a .env file in
development), are validated once at start-up, and are documented in the README."""

from __future__ import annotations

import ipaddress
import os
import re
from datetime import timedelta
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, Field, SecretStr
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

BackendName = Literal["onnx-int8", "onnx-fp32", "pytorch"]
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration(value: Any) -> Any:
    """Seconds ('3600'), or a number and a unit ('90s', '30m', '24h', '7d'); ISO 8601 ('PT24H')
    too, which pydantic reads itself."""
    if isinstance(value, str) and (match := re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhd]?)", value)):
        return timedelta(seconds=float(match[1]) * _UNITS[match[2] or "s"])
    return value


def _comma_list(value: Any) -> Any:
    return (
        [item.strip() for item in value.split(",") if item.strip()]
        if isinstance(value, str)
        else value
    )


def _networks(value: list[str]) -> list[str]:
    """Each entry must be an address or a network in CIDR notation, without host bits set (a
    typo such as 10.1.2.3/8 is refused rather than read as 10.0.0.0/8)."""
    for item in value:
        ipaddress.ip_network(item)
    return value


Duration = Annotated[timedelta, BeforeValidator(_duration)]
PositiveDuration = Annotated[Duration, Field(gt=timedelta(0))]
CommaList = Annotated[list[str], NoDecode, BeforeValidator(_comma_list)]
AbsolutePath = Annotated[Path, AfterValidator(lambda path: path.expanduser().absolute())]


def _data_home() -> Path:
    """Where a user's application data lives (XDG), never the directory a server started in."""
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")


class Settings(BaseSettings):
    # An empty variable (a Helm value left as "") means unset, not an empty path or name.
    model_config = SettingsConfigDict(
        env_file=".env", extra="ignore", frozen=True, env_ignore_empty=True
    )

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
    backend: BackendName = Field(default="onnx-int8", description="Back end that scores texts.")
    int8_self_check: bool = Field(
        default=True,
        description="With BACKEND=onnx-int8, score the model's probe texts at start and serve "
        "onnx-fp32 instead where int8 changes too many labels on this CPU, or failed its "
        "accuracy rule at build. Off: int8 is served unchecked.",
    )
    runner_layout: Literal["in-process", "split"] = Field(
        default="in-process",
        description="Where the model runs: in each worker of the HTTP service, or in a runner "
        "service of its own that the HTTP service calls once per batch (scaled apart).",
    )
    # Two workers of one thread serve more than one of two threads on a 2-core pod at 8 clients
    # and more (docs/scaling.md, Workers and threads).
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
    # Observability per request (docs/performance.md): BentoML writes an access log line and
    # records an OpenTelemetry span for every request even when no trace is sampled or exported;
    # together they were about a third of the CPU of the single-text HTTP path.
    access_log: bool = Field(
        default=False,
        description="BentoML's access log line per request (with its request id and API key "
        "name). Off: requests are counted and timed in /metrics only.",
    )
    tracing: bool = Field(
        default=False,
        description="An OpenTelemetry span per request, exported as BentoML's tracing "
        "configuration says (BENTOML_CONFIG_OPTIONS). Off: no spans are made at all.",
    )
    http_cost_probe: bool = Field(
        default=False,
        description="Add /api/v1/predict/no-model: the single-text path with everything but the "
        "model, so that benchmarks can measure the HTTP cost per request (never in production).",
    )
    max_latency_ms: int = Field(
        default=2000, ge=1, description="Batching deadline of the runner services."
    )
    runner_token: SecretStr | None = Field(
        default=None,
        description="Shared secret between the entry service and a runner service deployed "
        "apart (RUNNER_LAYOUT=split over TCP); unset, runners take calls over a Unix socket or "
        "from loopback only.",
    )

    # HTTP API limits
    max_text_chars: int = Field(default=20_000, ge=1, description="Longest accepted text.")
    max_batch_texts: int = Field(default=256, ge=1, description="Texts per sync batch request.")
    max_job_texts: int = Field(default=100_000, ge=1, description="Texts per async batch job.")
    # Work is counted in tokens: the tokens the model reads, after normalisation, the overlaps of
    # a long text's windows included (runners/windowing.py). Characters say little: an emoji
    # becomes its name, and 20,000 of them are about 130,000 tokens.
    max_text_tokens: int = Field(
        default=8192,
        ge=1,
        description="Most tokens one text may cost (20,000 characters of English are about "
        "5,000); a longer one gets 400, a dead letter text_too_long in Kafka.",
    )
    max_batch_tokens: int = Field(
        default=2048,
        ge=1,
        description="Tokens per model call: larger requests, and long texts' windows, are split "
        "across calls, and others board between them.",
    )
    max_queued_tokens: int = Field(
        default=65_536,
        ge=1,
        description="Interactive tokens waiting for the model per worker process before new "
        "requests get 503; a request above it on its own gets 413.",
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
    job_lease: PositiveDuration = Field(
        default=timedelta(seconds=30),
        description="How long a worker keeps a claimed chunk of job texts without renewing it; "
        "after that (its worker died) another worker takes the chunk over.",
    )
    job_retention: PositiveDuration = Field(
        default=timedelta(hours=24),
        description="How long finished and failed jobs (texts and results) are kept.",
    )
    jobs_database_sslmode: (
        Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"] | None
    ) = Field(
        default=None,
        description="TLS to PostgreSQL (libpq's sslmode); verify-full checks the server's "
        "certificate and name against JOBS_DATABASE_SSLROOTCERT. Unset: libpq's default (prefer).",
    )
    jobs_database_sslrootcert: Path | None = Field(
        default=None, description="CA bundle that signed the PostgreSQL server's certificate."
    )
    job_quota_texts: int = Field(
        default=200_000,
        ge=0,
        description="Unfinished job texts one API key may have queued; more gets 429. 0: no bound.",
    )
    job_quota_bytes: int = Field(
        default=128 * 2**20,
        ge=0,
        description="Bytes of job text one API key may have stored (finished jobs count until "
        "deleted or expired); more gets 429. 0: no bound.",
    )
    jobs_max_stored_bytes: int = Field(
        default=384 * 2**20,
        ge=0,
        description="Bytes of job text the whole service may store; more gets 503. Keep it well "
        "under the database's volume (the SQLite file takes about 2x the text). 0: no bound.",
    )
    shutdown_timeout: Duration = Field(
        default=timedelta(seconds=20),
        description="On SIGTERM, how long the job loop may take to finish its chunk in flight; "
        "keep it under the pod's termination grace period.",
    )

    # Security (docs/security.md)
    api_auth: bool = Field(
        default=False,
        description="Require an API key (Authorization: Bearer, or X-API-Key) on the prediction, "
        "job and model endpoints. Off for `make run` (a warning says so); on in the Helm chart.",
    )
    api_keys: SecretStr | None = Field(
        default=None,
        description="name:key[,name:key...] when the keys are not in Vault. Several keys are valid "
        "at once (rotation); the name, never the key, appears in logs and metrics.",
    )
    api_admin_keys: CommaList = Field(
        default=[],
        description="Names of API keys that see and delete every key's batch jobs "
        "(comma-separated); other keys see only their own.",
    )
    api_open_paths: CommaList = Field(
        default=["/api/v1/health", "/api/v1/metrics"],
        description="Paths under /api/v1 that need no key (comma-separated). BentoML's own "
        "/livez, /readyz, /metrics and the docs are always open.",
    )
    rate_limit_per_second: float = Field(
        default=0,
        ge=0,
        description="Requests per second per API key (per client address with auth off), "
        "per pod: the worker processes share the buckets; 0 turns the request limit off.",
    )
    rate_limit_burst: int = Field(
        default=20, ge=1, description="Requests a key may send at once before the rate applies."
    )
    rate_limit_tokens_per_minute: int = Field(
        default=0,
        ge=0,
        description="Tokens of text per minute per API key (per client address with auth off), "
        "per pod, for /predict and /predict/batch (jobs are not counted); one request may cost "
        "more if the key has spent nothing for a minute. 0 turns the token limit off.",
    )
    trusted_proxies: Annotated[CommaList, AfterValidator(_networks)] = Field(
        default=[],
        description="Networks (CIDR, comma-separated) of proxies whose X-Forwarded-For names the "
        "client, for the limits with auth off; the right-most address not in them is the client.",
    )
    max_request_bytes: int = Field(
        default=32 * 2**20,
        ge=1024,
        description="Largest request body; larger ones get 413 before they are read in full.",
    )
    vault_addr: str | None = Field(
        default=None,
        description="Vault (or OpenBao) URL. Set: the API keys, and the Kafka and jobs database "
        "secrets where their paths are set, come from Vault; unset: from the environment.",
    )
    vault_auth_method: Literal["token", "approle", "kubernetes"] = Field(
        default="token",
        description="How to log in to Vault: VAULT_TOKEN, an AppRole (VAULT_ROLE_ID, "
        "VAULT_SECRET_ID) or the pod's service account (VAULT_KUBERNETES_ROLE).",
    )
    vault_auth_mount: str | None = Field(
        default=None, description="Mount point of the auth method; its name when unset."
    )
    vault_token: SecretStr | None = Field(default=None, description="For VAULT_AUTH_METHOD=token.")
    vault_role_id: str | None = Field(default=None, description="For VAULT_AUTH_METHOD=approle.")
    vault_secret_id: SecretStr | None = Field(
        default=None, description="For VAULT_AUTH_METHOD=approle."
    )
    vault_kubernetes_role: str | None = Field(
        default=None, description="For VAULT_AUTH_METHOD=kubernetes: the Vault role to log in as."
    )
    vault_kubernetes_token_file: Path = Field(
        default=Path("/var/run/secrets/kubernetes.io/serviceaccount/token"),
        description="The pod's service account token, for VAULT_AUTH_METHOD=kubernetes.",
    )
    vault_cacert: Path | None = Field(
        default=None, description="CA bundle of Vault's TLS certificate; the system's when unset."
    )
    vault_kv_mount: str = Field(default="secret", description="Mount point of the KV v2 engine.")
    vault_api_keys_path: str = Field(
        default="kubesentiment/api-keys",
        description="KV v2 path of the API keys: one field per key, the field name is the key's "
        "name. Re-read every VAULT_REFRESH: a key added or removed there takes effect live.",
    )
    vault_kafka_path: str | None = Field(
        default=None,
        description="KV v2 path with `username` and `password` for Kafka SASL (read at start).",
    )
    vault_jobs_database_path: str | None = Field(
        default=None, description="KV v2 path with `url`, the JOBS_DATABASE_URL (read at start)."
    )
    vault_refresh: PositiveDuration = Field(
        default=timedelta(seconds=60),
        description="How often secrets are re-read from Vault (and the token renewed).",
    )
    vault_max_stale: PositiveDuration = Field(
        default=timedelta(hours=1),
        description="How long the last secrets read stay in use while Vault cannot be reached; "
        "after that the service reports not ready until a read succeeds.",
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
