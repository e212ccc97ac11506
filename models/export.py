"""ONNX export, graph optimisation and int8 quantisation of a fine-tuned classifier.

The exported graph takes input_ids and attention_mask with dynamic batch and sequence axes and
returns logits, so the runners can feed length-grouped batches of any shape.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import onnx
import onnxruntime
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.transformers.optimizer import optimize_model
from transformers import AutoConfig

from runners.architecture import load_classifier
from runners.model_store import FP32_FILE, INT8_FILE

OPSET = 17


class _LogitsOnly(torch.nn.Module):
    """Hugging Face models return a dict-like output; ONNX wants plain tensors."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def early_feed_forward_matmuls(model: onnx.ModelProto, layers: int) -> list[str]:
    """The feed-forward MatMuls (intermediate and output projections) of the first `layers`
    encoder layers: where an int8 error is made earliest, and so carried and grown by every
    later layer. Quantising one MatMul at a time, the first layers' feed-forward blocks caused
    most of the label flips and the last layers' hardly any (README, Model)."""
    prefixes = tuple(f"/layer.{i}/" for i in range(layers))
    return [
        node.name
        for node in model.graph.node
        if node.op_type == "MatMul"
        and any(prefix in node.name for prefix in prefixes)
        and ("/intermediate/" in node.name or "/output/dense/" in node.name)
        and "/attention/" not in node.name
    ]


# The int8 layouts the pipeline tries, fastest first: how many leading encoder layers keep their
# feed-forward block in fp32. A fully quantised graph is the fastest; each fp32 layer costs speed
# and buys accuracy (loadtests/int8_layouts.py measures both). The first layout whose accuracy
# is within INT8_MAX_ACCURACY_LOSS of fp32 on every domain is kept.
INT8_FP32_FEED_FORWARD_LAYERS = (0, 1, 2, 3)


def export_fp32(hf_dir: Path, out_dir: Path) -> Path:
    """Write the fp32 model, ORT-optimised with fused attention, into out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model = load_classifier(hf_dir)
    wrapper = _LogitsOnly(model).eval()  # eval() on the wrapper too, or dropout stays on
    sample = torch.ones(2, 16, dtype=torch.long)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.onnx"
        torch.onnx.export(
            wrapper,
            (sample, sample),
            str(raw),
            input_names=["input_ids", "attention_mask"],
            output_names=["logits"],
            dynamic_axes={
                "input_ids": {0: "batch", 1: "sequence"},
                "attention_mask": {0: "batch", 1: "sequence"},
                "logits": {0: "batch"},
            },
            opset_version=OPSET,
            dynamo=False,
        )
        config = AutoConfig.from_pretrained(hf_dir)
        optimized = optimize_model(
            str(raw),
            model_type="bert",
            num_heads=config.num_attention_heads,
            hidden_size=config.hidden_size,
        )
        fp32 = out_dir / FP32_FILE
        optimized.save_model_to_file(str(fp32))
    onnxruntime.InferenceSession(str(fp32), providers=["CPUExecutionProvider"])
    return fp32


def quantize_int8(fp32: Path, fp32_feed_forward_layers: int, int8: Path | None = None) -> Path:
    """Dynamic int8 with per-channel weights (by default next to the fp32 file); the first
    layers' feed-forward MatMuls stay fp32 as asked."""
    int8 = int8 or fp32.with_name(INT8_FILE)
    quantize_dynamic(
        fp32,
        int8,
        weight_type=QuantType.QInt8,
        per_channel=True,
        nodes_to_exclude=early_feed_forward_matmuls(onnx.load(fp32), fp32_feed_forward_layers),
        extra_options={
            # Fused attention ops defeat ONNX shape inference; every untyped tensor is float.
            "DefaultTensorType": onnx.TensorProto.FLOAT,
            # Only weight matrices: attention's activation x activation products stay fp32.
            "MatMulConstBOnly": True,
        },
    )
    onnxruntime.InferenceSession(str(int8), providers=["CPUExecutionProvider"])
    return int8
