"""The runners as standalone BentoML services: a batchable `predict` API over one back end, with
BentoML's adaptive batching. Serve one on its own to put the model behind its own pods:

    bentoml serve runners.services:OnnxRunner --port 3001
    bentoml serve runners.services:TorchRunner --port 3002
"""

from __future__ import annotations

from typing import ClassVar

import bentoml

from runners.engine import load_engine
from runners.model_store import StoredModel
from runners.prediction import Prediction
from settings import Backend, get_settings, use_local_models_only

settings = get_settings()


class _Runner:
    backend: ClassVar[Backend]
    model_ref = bentoml.models.BentoModel(settings.model_store_tag)

    def __init__(self) -> None:
        use_local_models_only()
        model = StoredModel.from_bentoml(self.model_ref)
        self.engine = load_engine(
            model, self.backend, settings.inference_threads, settings.max_batch_size
        )

    @bentoml.api(
        batchable=True,
        max_batch_size=settings.max_batch_size,
        max_latency_ms=settings.max_latency_ms,
    )
    def predict(self, texts: list[str]) -> list[Prediction]:
        return self.engine.predict(texts)


@bentoml.service(name="onnx-runner", workers=1)
class OnnxRunner(_Runner):
    """ONNX Runtime, int8 unless BACKEND=onnx-fp32."""

    backend = "onnx-fp32" if settings.backend == "onnx-fp32" else "onnx-int8"


@bentoml.service(name="torch-runner", workers=1)
class TorchRunner(_Runner):
    """PyTorch fp32: the reference the ONNX back ends are checked against."""

    backend = "pytorch"
