"""The runners as standalone BentoML services: a batchable `predict` API over one back end, with
BentoML's adaptive batching. With RUNNER_LAYOUT=split the entry service depends on one of them
(`bentoml serve service:Sentiment` then starts both); either also serves on its own:

    bentoml serve runners.services:OnnxRunner --port 3001
    bentoml serve runners.services:TorchRunner --port 3002
"""

from __future__ import annotations

from typing import Any, ClassVar

import bentoml

from kubesentiment.observability import configure_logging, get_metrics, per_request_options
from kubesentiment.settings import BackendName, get_settings, use_local_models_only
from runners.engine import load_engine
from runners.model_store import StoredModel
from runners.prediction import Prediction

settings = get_settings()
# BentoML 1.4.40 recycles the client session between services every 100 requests, and calls
# in flight then fail ("Connector is closed"): keep one session for the process's life.
ONE_SESSION = {"max_requests": 10**9, "max_age": 1e9}


class _Runner:
    backend: ClassVar[BackendName]
    model_ref = bentoml.models.BentoModel(settings.model_store_tag)

    def __init__(self) -> None:
        use_local_models_only()
        configure_logging()
        model = StoredModel.from_bentoml(self.model_ref)
        self.engine = load_engine(
            model,
            self.backend,
            settings.inference_threads,
            settings.max_batch_size,
            observe_batch=get_metrics().observe_batch,
        )

    @bentoml.api(
        batchable=True,
        max_batch_size=settings.max_batch_size,
        max_latency_ms=settings.max_latency_ms,
    )
    def predict(self, texts: list[str]) -> list[Prediction]:
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


def runner_service(backend: BackendName) -> Any:
    """The runner service (a BentoML Service) that serves a back end."""
    return TorchRunner if backend == "pytorch" else OnnxRunner
