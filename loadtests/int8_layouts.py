"""The int8 layouts of a stored model side by side in one run: speed and accuracy.

    python -m loadtests.int8_layouts                  # the latest stored model
    python -m loadtests.int8_layouts --tag sentiment:abc --rounds 5

For the fp32 graph, the fully quantised reference (every op int8, not smoothed) and each int8
layout the pipeline can choose (every weight MatMul int8 after outlier smoothing, or the first
N encoder layers' feed-forward block kept in fp32 as well), measures texts/s of ONNX Runtime
alone at batch 32 of 14-token texts on every core, in alternating rounds so that a shared
machine's drift favours none (the best round of each is kept), and test accuracy per domain.
The pipeline's rule: the int8 graph it stores must be within 0.5 points of fp32 on every domain
and at least 90% of the fully quantised graph's speed. Writes
loadtests/reports/int8-layouts.{json,md,html}.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnxruntime.quantization import QuantType, quantize_dynamic
from tokenizers import Encoding
from tqdm import tqdm

from kubesentiment.settings import get_settings
from loadtests.benchmark import HERE, best_rate, png_base64
from loadtests.texts import sample_texts
from models.data import load_splits
from models.evaluate import accuracies, engine_probabilities
from models.export import CALIBRATION_TEXTS, quantize_int8, smooth_outlier_channels
from models.pipeline import calibration_batches
from runners.cpu import cpu_summary
from runners.engine import SentimentEngine, load_engine
from runners.model_store import StoredModel, get

FULLY_QUANTISED = "int8, every op, not smoothed"


def fully_quantised(fp32: Path, out: Path) -> Path:
    """The speed reference: every op ONNX Runtime can quantise dynamically in int8 (weight
    MatMuls and the embedding tables), with no smoothing and nothing kept in fp32."""
    quantize_dynamic(
        fp32,
        out,
        weight_type=QuantType.QInt8,
        per_channel=True,
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT, "MatMulConstBOnly": True},
    )
    return out


def graphs(model: StoredModel, folder: Path, layers: list[int]) -> dict[str, Path]:
    """fp32, the reference, the stored int8 graph, and one int8 graph per layout, as files."""
    fp32 = model.onnx_file(quantized=False)
    found = {
        "fp32": fp32,
        FULLY_QUANTISED: fully_quantised(fp32, folder / "int8-reference.onnx"),
        "stored int8": model.onnx_file(quantized=True),
    }
    train = load_splits(get_settings().data_dir).train[:CALIBRATION_TEXTS]
    smoothed = smooth_outlier_channels(
        fp32, folder / "smoothed.onnx", calibration_batches(model, train)
    )
    for n in tqdm(layers, desc="quantising layouts", unit="layout"):
        name = "int8, smoothed" if n == 0 else f"int8, smoothed, first {n} feed-forward fp32"
        found[name] = quantize_int8(smoothed, n, folder / f"int8-{n}.onnx")
    return found


def batch_of(engine: SentimentEngine, windows: list[Encoding]) -> Callable[[], int]:
    """One timed unit of work: score the same pre-tokenised batch."""
    return lambda: len(engine.probabilities(windows))


def measure(tag: str, layers: list[int], rounds: int, seconds: float) -> dict[str, Any]:
    model = get(tag)
    threads = os.cpu_count() or 2
    test = load_splits(get_settings().data_dir).test
    with tempfile.TemporaryDirectory() as tmp:
        files = graphs(model, Path(tmp), layers)
        engines = {
            name: load_engine(model, "onnx-int8", threads, onnx_file=file)
            for name, file in files.items()
        }
        windows, _ = next(iter(engines.values())).windows(sample_texts(32))
        speed = dict.fromkeys(engines, 0.0)
        for _ in tqdm(range(rounds), desc="speed rounds", unit="round"):
            for name, engine in engines.items():
                speed[name] = max(speed[name], best_rate(batch_of(engine, windows), seconds))
        scores = {
            name: {
                d: round(a, 4) for d, a in accuracies(engine_probabilities(e, test), test).items()
            }
            for name, e in engines.items()
        }
        sizes = {name: file.stat().st_size for name, file in files.items()}
        stored_bytes = model.onnx_file(quantized=True).read_bytes()
        same_as_stored = [
            name
            for name, file in files.items()
            if name.startswith("int8") and file.read_bytes() == stored_bytes
        ]
    full = speed[FULLY_QUANTISED]
    rows = [
        {
            "graph": name,
            "texts_per_s": round(speed[name], 1),
            "ratio_to_fully_quantised": round(speed[name] / full, 3),
            "accuracy": scores[name],
            "loss_vs_fp32_points": {
                d: round(100 * (scores["fp32"][d] - scores[name][d]), 2) for d in scores[name]
            },
            "megabytes": round(sizes[name] / 1e6, 1),
        }
        for name in engines
    ]
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_summary(),
        "cpus": threads,
        "model": model.tag,
        "stored_layout": model.metadata.get("int8", {}).get("fp32_feed_forward_layers"),
        "stored_graph_is": same_as_stored,
        "batch_size": 32,
        "rows": rows,
    }


def report(result: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "int8-layouts.json").write_text(json.dumps(result, indent=2))
    domains = list(result["rows"][0]["accuracy"])
    lines = [
        f"{result['model']} on {result['cpu']} ({result['cpus']} CPUs), {result['date']}, "
        f"batch {result['batch_size']}; stored int8 layout: {result['stored_layout']} fp32 "
        "feed-forward layers",
        "",
        "| graph | texts/s | vs fully quantised | MB | "
        + " | ".join(f"{d} (loss)" for d in domains)
        + " |",
        "|---|---:|---:|---:|" + "---:|" * len(domains),
    ]
    for r in result["rows"]:
        cells = [f"{r['accuracy'][d]:.3f} ({r['loss_vs_fp32_points'][d]:+.1f})" for d in domains]
        lines.append(
            f"| {r['graph']} | {r['texts_per_s']:.0f} | {r['ratio_to_fully_quantised']:.2f} | "
            f"{r['megabytes']} | " + " | ".join(cells) + " |"
        )
    table = "\n".join(lines)
    (out / "int8-layouts.md").write_text(table + "\n")
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    names = [r["graph"] for r in result["rows"]]
    left.barh(names, [r["texts_per_s"] for r in result["rows"]])
    left.set(xlabel="texts/s at batch 32", title="Speed")
    left.invert_yaxis()
    width = 0.8 / len(names)
    for i, r in enumerate(result["rows"]):
        right.bar(
            np.arange(len(domains)) + i * width,
            [r["accuracy"][d] for d in domains],
            width,
            label=r["graph"],
        )
    right.set_xticks(np.arange(len(domains)) + 0.4 - width / 2, domains)
    right.set(ylim=(0.6, 1.0), ylabel="test accuracy", title="Accuracy per domain")
    right.legend(fontsize=7)
    fig.tight_layout()
    (out / "int8-layouts.html").write_text(
        "<!doctype html><meta charset=utf-8><title>int8 layouts</title>"
        f"<h1>int8 layouts, {result['date']}</h1>"
        f"<img src='data:image/png;base64,{png_base64(fig)}' style='max-width:100%'>"
        f"<pre>{table}</pre>"
    )
    print(table)
    print(f"\nreport: {out / 'int8-layouts.html'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tag", default=get_settings().model_store_tag)
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--out", type=Path, default=HERE / "reports")
    args = parser.parse_args()
    report(measure(args.tag, args.layers, args.rounds, args.seconds), args.out)


if __name__ == "__main__":
    main()
