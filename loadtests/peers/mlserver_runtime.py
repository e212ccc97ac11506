"""The MLServer peer: a custom inference runtime over the int8 ONNX graph.

MLServer serves it from a folder holding `settings.json` (the server) and `model-settings.json`
(this model). `python mlserver_runtime.py FOLDER --port ... --model-file ...` writes both, then
replaces itself with `mlserver start FOLDER`. The V2
inference protocol: `POST /v2/models/sentiment/infer` with one BYTES input of one text answers
the outputs `label` (BYTES) and `score` (FP32), one row per text.

Settings, and why:
- `max_batch_size: 32`, `max_batch_time: 0.003`: the benchmark's batching settings, the same for
  every system. MLServer's adaptive batcher runs in the HTTP process and hands whole batches to
  the inference workers.
- `parallel_workers: 2` with one ONNX Runtime thread each: MLServer's docs (Parallel Inference)
  run inference in a pool of worker processes, one by default, and Seldon's tuning guide says to
  set the pool "in line with the number of CPU cores"; two single-threaded workers keep both
  cores busy with two batches at once, where one worker with two threads would leave a core
  idle while it tokenises and while the HTTP process answers. `--workers 1 --threads 2` tries
  that layout.
- Everything else at MLServer's defaults (access log on, metrics server on, gRPC server on):
  gRPC and metrics listen on the HTTP port + 1 and + 2.

Runs in its own virtual environment (loadtests/peers/mlserver.txt) with this folder on
PYTHONPATH, so that `implementation` finds this module in the inference workers too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from mlserver import MLModel
from mlserver.codecs import NumpyCodec, StringCodec
from mlserver.types import InferenceRequest, InferenceResponse

if TYPE_CHECKING:
    from loadtests.peers.onnx_classifier import OnnxClassifier
else:
    from onnx_classifier import OnnxClassifier

MODEL_NAME = "sentiment"


class SentimentRuntime(MLModel):
    async def load(self) -> bool:
        extra = self.settings.parameters.extra
        self.classifier = OnnxClassifier(
            Path(self.settings.parameters.uri),
            Path(extra["tokenizer_file"]),
            extra["labels"],
            int(extra["max_length"]),
            int(extra["threads"]),
        )
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        texts = StringCodec.decode_input(payload.inputs[0])
        predictions = self.classifier.predict(texts)
        labels = [label for label, _ in predictions]
        scores = np.array([score for _, score in predictions], dtype=np.float32)
        return InferenceResponse(
            model_name=self.name,
            outputs=[
                StringCodec.encode_output("label", labels, use_bytes=False),
                NumpyCodec.encode_output("score", scores),
            ],
        )


def write_settings(
    folder: Path,
    port: int,
    model_file: Path,
    tokenizer_file: Path,
    labels: Sequence[str],
    max_length: int,
    workers: int = 2,
    threads: int = 1,
) -> None:
    """settings.json and model-settings.json for `mlserver start folder`."""
    server = {
        "host": "127.0.0.1",
        "http_port": port,
        "grpc_port": port + 1,
        "metrics_port": port + 2,
        "parallel_workers": workers,
    }
    model = {
        "name": MODEL_NAME,
        "implementation": "mlserver_runtime.SentimentRuntime",
        "max_batch_size": 32,
        "max_batch_time": 0.003,
        "parameters": {
            "uri": str(model_file),
            "extra": {
                "tokenizer_file": str(tokenizer_file),
                "labels": list(labels),
                "max_length": max_length,
                "threads": threads,
            },
        },
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "settings.json").write_text(json.dumps(server, indent=2))
    (folder / "model-settings.json").write_text(json.dumps(model, indent=2))


def main() -> None:
    """Write the settings folder, then become `mlserver start FOLDER` (same process)."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model-file", type=Path, required=True)
    parser.add_argument("--tokenizer-file", type=Path, required=True)
    parser.add_argument("--labels", nargs="+", required=True)
    parser.add_argument("--max-length", type=int, required=True)
    parser.add_argument("--workers", type=int, default=2, help="MLServer parallel_workers")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads per worker")
    args = parser.parse_args()
    write_settings(
        args.folder,
        args.port,
        args.model_file,
        args.tokenizer_file,
        args.labels,
        args.max_length,
        args.workers,
        args.threads,
    )
    mlserver = Path(sys.executable).parent / "mlserver"
    os.execv(mlserver, [str(mlserver), "start", str(args.folder)])


if __name__ == "__main__":
    main()
