"""The runners as standalone BentoML services: a batchable `predict` API over one back end, with
BentoML's adaptive batching. With RUNNER_LAYOUT=split the entry service depends on one of them
(`bentoml serve service:Sentiment` then starts both); either also serves on its own:

    bentoml serve runners.services:OnnxRunner --port 3001
    bentoml serve runners.services:TorchRunner --port 3002

A runner takes pickled inputs from its client (BentoML's own media type between services), so
it must take calls from its entry service only: with RUNNER_TOKEN set, calls must carry it in
X-Runner-Token (the entry service sends it); without, only calls over a Unix socket (how
`bentoml serve` connects the two) or from loopback are taken. Probes and metrics stay open. It
applies the entry service's text limits again, in case a caller does not.
"""

from __future__ import annotations

import hmac
from typing import Any, ClassVar

import bentoml
from bentoml.exceptions import InvalidArgument
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from kubesentiment.observability import configure_logging, get_metrics, per_request_options
from kubesentiment.settings import BackendName, get_settings, use_local_models_only
from runners.model_store import StoredModel
from runners.prediction import Prediction
from runners.self_check import load_checked_engine

settings = get_settings()
# BentoML 1.4.40 recycles the client session between services every 100 requests, and calls
# in flight then fail ("Connector is closed"): keep one session for the process's life.
ONE_SESSION = {"max_requests": 10**9, "max_age": 1e9}
RUNNER_TOKEN_HEADER = "X-Runner-Token"
OPEN_PATHS = ("/livez", "/readyz", "/healthz", "/metrics")
LOOPBACK = ("127.0.0.1", "::1")


class EntryServiceOnly:
    """403 for any call but from the entry service: the right X-Runner-Token when RUNNER_TOKEN
    is set, else a Unix-socket or loopback peer."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        token = settings.runner_token
        self.token = token.get_secret_value().encode() if token else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        guarded = scope["type"] == "http" and not scope["path"].startswith(OPEN_PATHS)
        if guarded and not self.allowed(scope):
            reason = "runner services take calls from the entry service only"
            await JSONResponse({"error": reason}, status_code=403)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def allowed(self, scope: Scope) -> bool:
        if self.token is not None:
            sent = dict(scope["headers"]).get(RUNNER_TOKEN_HEADER.lower().encode(), b"")
            return hmac.compare_digest(sent, self.token)
        client = scope.get("client")
        return client is None or client[0] in LOOPBACK  # None: a Unix socket


class _Runner:
    backend: ClassVar[BackendName]
    model_ref = bentoml.models.BentoModel(settings.model_store_tag)

    def __init__(self) -> None:
        use_local_models_only()
        configure_logging()
        model = StoredModel.from_bentoml(self.model_ref)
        metrics = get_metrics()
        self.engine, check = load_checked_engine(
            model,
            self.backend,
            settings.inference_threads,
            settings.max_batch_size,
            observe_batch=metrics.observe_batch,
            check=settings.int8_self_check,
        )
        metrics.observe_backend(check)

    @bentoml.api(
        batchable=True,
        max_batch_size=settings.max_batch_size,
        max_latency_ms=settings.max_latency_ms,
    )
    def predict(self, texts: list[str]) -> list[Prediction]:
        costs = self.engine.windowing.costs(texts)
        for text, cost in zip(texts, costs, strict=True):
            if len(text) > settings.max_text_chars or cost > settings.max_text_tokens:
                raise InvalidArgument(
                    f"a text of {len(text)} characters and {cost} tokens is over "
                    "MAX_TEXT_CHARS or MAX_TEXT_TOKENS"
                )
        return self.engine.predict(texts)


@bentoml.service(
    name="onnx-runner", workers=1, runner_connection=ONE_SESSION, **per_request_options()
)
class OnnxRunner(_Runner):
    """ONNX Runtime, int8 unless BACKEND=onnx-fp32."""

    backend = "onnx-fp32" if settings.backend == "onnx-fp32" else "onnx-int8"


@bentoml.service(
    name="torch-runner", workers=1, runner_connection=ONE_SESSION, **per_request_options()
)
class TorchRunner(_Runner):
    """PyTorch fp32: the reference the ONNX back ends are checked against."""

    backend = "pytorch"


OnnxRunner.add_asgi_middleware(EntryServiceOnly)  # type: ignore[attr-defined]
TorchRunner.add_asgi_middleware(EntryServiceOnly)  # type: ignore[attr-defined]


def runner_service(backend: BackendName) -> Any:
    """The runner service (a BentoML Service) that serves a back end."""
    return TorchRunner if backend == "pytorch" else OnnxRunner
