"""Our own Prometheus metrics and structured logs.

prometheus_client is imported inside `get_metrics`, never at module import: BentoML workers set
PROMETHEUS_MULTIPROC_DIR after importing the service module, and a client imported earlier would
write to a registry that BentoML's /metrics never reads.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import structlog
from pydantic import ValidationError
from starlette.requests import ClientDisconnect

from kubesentiment.settings import get_settings
from runners.prediction import Prediction

if TYPE_CHECKING:
    from runners.scheduler import QueueState
    from runners.self_check import BackendCheck


class Metrics:
    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.predictions = Counter(
            "kubesentiment_predictions", "Texts scored, by label and back end", ["label", "backend"]
        )
        self.scores = Histogram(
            "kubesentiment_prediction_score",
            "Confidence of the predicted label",
            ["backend"],
            buckets=(0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0),
        )
        self.batch_size = Histogram(
            "kubesentiment_inference_batch_size",
            "Rows (text windows) per model call",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
        )
        self.batch_tokens = Histogram(
            "kubesentiment_inference_batch_tokens",
            "Real (non-padding) tokens per model call",
            buckets=(16, 64, 256, 1024, 4096, 16384),
        )
        self.text_length = Histogram(
            "kubesentiment_text_length_chars",
            "Length of scored texts in characters",
            buckets=(16, 64, 256, 1024, 4096, 20000),
        )
        self.errors = Counter(
            "kubesentiment_errors", "Requests answered with an error, by reason", ["reason"]
        )
        self.requests_by_key = Counter(
            "kubesentiment_api_requests",
            "Requests let through to the API, by API key name (anonymous with API_AUTH off)",
            ["api_key"],
        )
        # Gauges add up over the live worker processes ("livesum"): one number per pod.
        self.queued_texts = Gauge(
            "kubesentiment_queued_texts",
            "Texts waiting for a model batch, by lane (interactive requests, bulk job work)",
            ["lane"],
            multiprocess_mode="livesum",
        )
        self.requests_in_flight = Gauge(
            "kubesentiment_scheduler_requests_in_flight",
            "Requests handed to the batcher and not yet answered (waiting or being scored)",
            multiprocess_mode="livesum",
        )
        self.dropped_texts = Counter(
            "kubesentiment_dropped_texts",
            "Texts not scored because their client disconnected while they waited",
        )
        # 1 while this worker process answers /readyz with 200; "livemin": 0 if any live one is
        # not ready (shutting down, stale API keys). A model that fails to load leaves no process.
        self.ready = Gauge(
            "kubesentiment_ready",
            "1 when the model is loaded and the service accepts work, 0 when not ready",
            multiprocess_mode="livemin",
        )
        # "livemax": 1 if any live worker of the pod serves another back end than asked for.
        self.backend_fallback = Gauge(
            "kubesentiment_backend_fallback",
            "1 when this process serves another back end than BACKEND asks for (int8 failed its "
            "start-up self-check on this CPU, or its accuracy rule at build), else 0",
            ["requested", "served"],
            multiprocess_mode="livemax",
        )
        self.jobs = Counter(
            "kubesentiment_jobs",
            "Async batch jobs, by event: submitted, completed, failed",
            ["event"],
        )
        for event in ("submitted", "completed", "failed"):
            self.jobs.labels(event)  # every series exists from the start, at 0
        self.job_texts = Counter(
            "kubesentiment_job_texts_scored", "Texts of async batch jobs scored and saved"
        )

    def observe_backend(self, check: BackendCheck) -> None:
        self.backend_fallback.labels(check.requested, check.served).set(int(check.fell_back))

    def observe_batch(self, rows: int, tokens: int) -> None:
        self.batch_size.observe(rows)
        self.batch_tokens.observe(tokens)

    def observe_queue(self, state: QueueState) -> None:
        self.queued_texts.labels("interactive").set(state.interactive_texts)
        self.queued_texts.labels("bulk").set(state.bulk_texts)
        self.requests_in_flight.set(state.requests_in_flight)

    def observe_predictions(
        self, texts: Sequence[str], predictions: Sequence[Prediction], backend: str
    ) -> None:
        for text, prediction in zip(texts, predictions, strict=True):
            self.predictions.labels(prediction.label, backend).inc()
            self.scores.labels(backend).observe(prediction.score)
            self.text_length.observe(len(text))


@lru_cache
def get_metrics() -> Metrics:
    """One set per process: a second registration of a metric name would fail."""
    return Metrics()


def render_metrics() -> tuple[bytes, str]:
    """The Prometheus exposition of this process, or of all workers when BentoML runs several."""
    from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    registry: Any = REGISTRY
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
    return generate_latest(registry), CONTENT_TYPE_LATEST


class ClientErrors(logging.Filter):
    """BentoML logs a request with an invalid body as an ERROR with a traceback, and pydantic's
    message in it quotes the input: the text being scored. Such a record keeps its line and
    gains the field errors, at INFO, without the input or the traceback (the client got a 400
    that says the same)."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, ValidationError):
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}"
                for e in error.errors(include_input=False, include_url=False)
            )
        elif isinstance(error, ClientDisconnect):
            problems = "the client went away (or its body was cut at MAX_REQUEST_BYTES)"
        else:
            return True
        record.msg, record.args = f"{record.getMessage()}: {problems}", ()
        record.exc_info, record.exc_text = None, None
        record.levelno, record.levelname = logging.INFO, "INFO"
        return True


HIDDEN = "[hidden]"
_hidden: re.Pattern[str] | None = None  # what hide_in_logs registered, as one pattern


def hide_in_logs(database_url: str) -> None:
    """Keep the database's address and password out of every log line from now on. Driver errors
    name them ('connection to server at "db.internal", port 5432 failed'), their tracebacks are
    logged, and logs travel further than the secrets do."""
    global _hidden
    url = urlsplit(database_url)
    patterns = [re.escape(database_url)]
    if url.password:
        patterns.append(re.escape(url.password))
    if url.hostname and url.port:
        host = re.escape(url.hostname)
        patterns.append(rf'"?{host}"?(?:,? port |:){url.port}\b')
        patterns.append(rf"\bport {url.port}\b")
    _hidden = re.compile("|".join(patterns))


def hide_what_must_not_be_logged(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    """The structlog processor of hide_in_logs, after the exception is formatted."""
    if _hidden is not None:
        for name, value in event.items():
            if isinstance(value, str):
                event[name] = _hidden.sub(HIDDEN, value)
    return event


def configure_logging(level: str = "INFO") -> None:
    """JSON logs, one event per line, ready for any log shipper: ours (structlog) and those of
    the libraries (BentoML's access log, uvicorn, aiokafka) alike. Each line carries the
    context bound for the request or message it belongs to (`request_id`, `api_key`)."""
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso"),
    ]
    # Exceptions are logged with their tracebacks (format_exc_info), after which anything that
    # must not be logged is hidden. Texts never reach a message: SQLAlchemy hides statement
    # parameters (jobs/store.py) and ClientErrors drops pydantic's copies of the input.
    last: list[Any] = [
        structlog.processors.format_exc_info,
        hide_what_must_not_be_logged,
        structlog.processors.JSONRenderer(),
    ]
    structlog.configure(
        processors=[*shared, *last],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.addFilter(ClientErrors())
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                *last,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(logging.WARNING)
    # BentoML gives its loggers handlers of its own, with a plain-text format: route them to ours.
    for name in ("bentoml", "bentoml.access", "circus", "uvicorn", "uvicorn.error"):
        library = logging.getLogger(name)
        library.handlers = []
        library.propagate = True
    logging.getLogger("bentoml").setLevel(level)


def per_request_options() -> dict[str, Any]:
    """BentoML service options for ACCESS_LOG and TRACING. BentoML records a span for every
    request even when none is sampled or exported (its sampler always records, for the access
    log's trace ids); excluding every URL from its tracing middleware skips span and all."""
    settings = get_settings()
    options: dict[str, Any] = {"logging": {"access": {"enabled": settings.access_log}}}
    if not settings.tracing:
        options["tracing"] = {"excluded_urls": [".*"]}
    return options
