"""int8 that is right on the CPU that serves it: the paired rule the pipeline chooses a layout
by (validation only), the AVX2 kernels checked under emulation whatever this CPU has, and the
start-up self-check that serves fp32 where a graph disagrees, in the API and the Kafka worker."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from devtools.local_kafka import TansuBroker, WorkerProcess, create_topics
from kubesentiment.settings import get_settings
from models.data import load_splits
from models.evaluate import PairedComparison, int8_losses
from models.export import quantize_int8
from models.pipeline import choose_int8_layout
from runners.cpu import cpu_class
from runners.engine import load_engine
from runners.model_store import StoredModel, register
from runners.self_check import Probe, label_flips, load_checked_engine
from runners.windowing import Windowing
from tests.conftest import ROOT, SMALL_LIMIT, Server

BAD_INT8 = "sentiment-bad-int8"


def test_int8_rule_counts_a_loss_only_when_material_and_beyond_noise() -> None:
    # The refusal of the AVX2 build: 4 tweets of 419 lost, none gained, is p = 0.0625: noise.
    assert not PairedComparison(419, 4, 0).is_loss
    assert PairedComparison(419, 4, 0).p_value == pytest.approx(1 / 16)
    # Eight lost and none gained is beyond noise (p = 0.004) and 1.9 points: a loss.
    assert PairedComparison(419, 8, 0).is_loss
    # Beyond noise but immaterial: 12 of 10,000 texts is 0.12 points.
    assert PairedComparison(10_000, 12, 0).p_value < 0.001
    assert not PairedComparison(10_000, 12, 0).is_loss
    # Many disagreements that cancel out are no loss, however material each side is.
    assert not PairedComparison(419, 20, 14).is_loss
    # One review of 29 is 3.4 points, and no evidence at all.
    assert not PairedComparison(29, 1, 0).is_loss
    # Nine lost and one gained: p = 11/1024, just short of the evidence the rule asks for.
    assert not PairedComparison(419, 9, 1).is_loss
    comparisons = {"tweets": PairedComparison(419, 10, 1), "nyt": PairedComparison(488, 2, 0)}
    assert int8_losses(comparisons) == {"tweets": 2.15}


def test_cpu_class_is_the_best_kernel_family_it_has() -> None:
    assert cpu_class(["avx2", "fma"]) == "avx2"
    assert cpu_class(["avx2", "fma", "avx512f"]) == "avx512"
    assert cpu_class(["avx2", "avx512f", "avx512_vnni", "avx512_bf16"]) == "avx512-vnni"
    assert cpu_class(["avx2", "avx512f", "avx512_vnni", "amx_bf16", "amx_int8"]) == "amx"


def staged_copy(model: StoredModel, folder: Path) -> StoredModel:
    shutil.copytree(model.path, folder)
    return StoredModel("staging:0", folder, model.metadata)


def test_layout_choice_never_reads_the_test_split(
    small_model: StoredModel, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every text the choice tokenises is recorded: validation and training (the smoothing's
    calibration) texts, and not one test text."""
    splits = load_splits(data_dir, limit=SMALL_LIMIT)
    seen: set[str] = set()
    tokenise = Windowing.windows

    def recording(self: Windowing, texts: list[str]) -> Any:
        seen.update(texts)
        return tokenise(self, texts)

    monkeypatch.setattr(Windowing, "windows", recording)
    chosen = choose_int8_layout(
        staged_copy(small_model, tmp_path / "model"), splits.train, splits.validation
    )
    validation = {e.text for examples in splits.validation.values() for e in examples}
    test = {e.text for examples in splits.test.values() for e in examples} - validation
    assert validation <= seen
    assert not seen & (test - {e.text for e in splits.train})
    assert chosen["passed"] is True and set(chosen["validation"]) >= {"pooled", "tweets"}
    assert "test" not in chosen


def test_build_records_the_rule_the_probe_and_the_cpu(small_model: StoredModel) -> None:
    meta = small_model.metadata
    # `passed` says what the last layout tried found on validation.
    assert meta["int8"]["passed"] == (not meta["int8"]["tried"][-1]["validation_losses"])
    assert meta["int8"]["validation"]["pooled"]["texts"] > 0
    assert set(meta["int8"]["test"]) == {*meta["metrics"], "pooled"}  # reported, per domain
    assert meta["built_on"]["class"] in ("avx2", "avx512", "avx512-vnni", "amx")
    probe = Probe.of(small_model)
    assert probe is not None and len(probe.texts) == meta["probe"]["texts"] > 50
    # The probe's fp32 figures are the fp32 graph's, here as at build.
    flips, difference = label_flips(probe, load_engine(small_model, "onnx-fp32", threads=2))
    assert flips == 0 and difference < 1e-4


def test_int8_holds_on_avx2_kernels_whatever_this_cpu_has(small_model: StoredModel) -> None:
    """QEMU's user mode presents a Haswell (AVX2 and FMA, no AVX-512, no VNNI) to the process,
    so ONNX Runtime picks its AVX2 int8 kernels, where unsigned x signed products can saturate.
    The self-check's rule must hold there on the probe (a part of it: emulation is slow)."""
    qemu = shutil.which("qemu-x86_64")
    assert qemu, "needs QEMU's user mode: apt-get install qemu-user (.ci/run does)"
    check = (
        "from numpy._core._multiarray_umath import __cpu_features__ as f;"
        "assert f['AVX2'] and not f['AVX512F'], f;"
        "from runners.self_check import main; raise SystemExit(main())"
    )
    done = subprocess.run(
        [qemu, "-cpu", "Haswell-v4", sys.executable, "-c", check, small_model.tag, "--limit", "16"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["passed"] and report["probe_texts"] == 16
    assert report["label_flips"] <= report["max_label_flips"]


@pytest.fixture(scope="module")
def bad_int8(small_model: StoredModel, tmp_path_factory: pytest.TempPathFactory) -> StoredModel:
    """A copy of the small model whose int8 graph was quantised badly on purpose: its classifier
    weights are negated before quantising, so int8 and fp32 disagree on nearly every text."""
    staging = tmp_path_factory.mktemp("bad") / "model"
    shutil.copytree(small_model.path, staging)
    model = onnx.load(staging / "onnx" / "model.onnx")
    (head,) = [node for node in model.graph.node if "logits" in node.output]  # a Gemm
    (classifier,) = [i for i in model.graph.initializer if i.name == head.input[1]]
    negated = -numpy_helper.to_array(classifier)
    classifier.CopyFrom(numpy_helper.from_array(negated.astype(np.float32), classifier.name))
    broken = staging / "broken.onnx"
    onnx.save(model, broken)
    quantize_int8(broken, 0, staging / "onnx" / "model-int8.onnx")
    broken.unlink()
    return register(BAD_INT8, staging, small_model.metadata)


def test_self_check_serves_fp32_when_int8_disagrees(bad_int8: StoredModel) -> None:
    engine, check = load_checked_engine(bad_int8, "onnx-int8", threads=1)
    assert check.served == "onnx-fp32" and check.fell_back
    assert check.label_flips is not None and check.max_label_flips is not None
    assert check.label_flips > check.max_label_flips and "probe labels" in (check.reason or "")
    fp32 = load_engine(bad_int8, "onnx-fp32", threads=1)
    texts = ["a wonderful, moving film", "dull and far too long"]
    assert engine.predict(texts) == fp32.predict(texts)
    # Unchecked, the broken graph would have served.
    _, unchecked = load_checked_engine(bad_int8, "onnx-int8", threads=1, check=False)
    assert unchecked.served == "onnx-int8"


def test_a_model_whose_int8_failed_its_rule_is_served_in_fp32(small_model: StoredModel) -> None:
    failed = small_model.metadata | {"int8": {"passed": False, "reason": "tweets 1.9 points"}}
    model = StoredModel(small_model.tag, small_model.path, failed)
    _, check = load_checked_engine(model, "onnx-int8", threads=1)
    assert check.served == "onnx-fp32" and "tweets 1.9 points" in (check.reason or "")
    assert check.probe_texts is None  # nothing to check: the build said no


def test_api_and_worker_say_they_serve_fp32_and_why(bad_int8: StoredModel) -> None:
    server = Server("service:Sentiment", 3237, MODEL_NAME=BAD_INT8).start()
    try:
        health = httpx.get(f"{server.url}/api/v1/health").json()
        info = httpx.get(f"{server.url}/api/v1/model-info").json()
        predicted = httpx.post(f"{server.url}/api/v1/predict", json={"text": "lovely"}).json()
        metrics = httpx.get(f"{server.url}/metrics").text
    finally:
        server.stop()
    assert health["status"] == "ok" and health["backend"] == "onnx-fp32"
    assert "probe labels" in health["backend_check"]["reason"]
    assert health["backend_check"]["cpu"]["class"]
    assert info["backend"] == "onnx-fp32" and info["backend_check"]["requested"] == "onnx-int8"
    assert info["accuracy"] == {d: m["onnx-fp32"]["accuracy"] for d, m in info["metrics"].items()}
    assert info["built_on"]["flags"] and info["int8"]["fp32_feed_forward_layers"] >= 0
    assert predicted["model"]["backend"] == "onnx-fp32"
    fallback = 'kubesentiment_backend_fallback{requested="onnx-int8",served="onnx-fp32"} 1.0'
    assert fallback in metrics

    broker = TansuBroker(19225).start()
    try:
        asyncio.run(create_topics(broker.bootstrap, get_settings().kafka_topics))
        worker = WorkerProcess(broker, 9225, MODEL_NAME=BAD_INT8)
        worker_metrics = httpx.get(f"http://127.0.0.1:{worker.port}/metrics").text
        worker.stop()
    finally:
        broker.stop()
    assert fallback in worker_metrics
    assert "serving onnx-fp32 instead of onnx-int8" in worker.log.read_text()
