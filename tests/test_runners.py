"""The runners as standalone BentoML services: a batchable `predict` with BentoML's adaptive
batching, on ONNX Runtime and on PyTorch, agreeing with each other."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from runners.model_store import StoredModel
from tests.conftest import Server

TEXTS = [
    f"Film {i}: {t}"
    for i in range(12)
    for t in ("a wonderful, moving story", "a dull and lifeless mess", "fine, if forgettable")
]


def test_runner_services_batch_adaptively_and_agree(small_model: StoredModel) -> None:
    onnx = Server("runners.services:OnnxRunner", 3214).start()
    torch = Server("runners.services:TorchRunner", 3215).start()
    try:
        with ThreadPoolExecutor(16) as pool:
            singles = list(
                pool.map(
                    lambda t: httpx.post(f"{onnx.url}/predict", json={"texts": [t]}, timeout=60),
                    TEXTS,
                )
            )
        assert all(r.status_code == 200 for r in singles)
        onnx_scores = [r.json()[0] for r in singles]
        torch_scores = httpx.post(f"{torch.url}/predict", json={"texts": TEXTS}, timeout=60).json()
        metrics = httpx.get(f"{onnx.url}/metrics").text
    finally:
        onnx.stop()
        torch.stop()
    assert len(torch_scores) == len(TEXTS)
    for a, b in zip(onnx_scores, torch_scores, strict=True):
        positive_a = a["score"] if a["label"] == "POSITIVE" else 1 - a["score"]
        positive_b = b["score"] if b["label"] == "POSITIVE" else 1 - b["score"]
        assert positive_a == pytest.approx(positive_b, abs=0.05)

    # BentoML's dispatcher merged concurrent single-text calls: fewer batches than texts.
    def total(series: str) -> float:
        pattern = rf"^bentoml_service_adaptive_batch_size_{series}\{{.*\}} ([0-9.]+)$"
        return sum(map(float, re.findall(pattern, metrics, re.MULTILINE)))

    assert total("sum") == len(TEXTS)
    assert total("sum") / total("count") > 1
