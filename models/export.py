"""ONNX export, graph optimisation and int8 quantisation of a fine-tuned classifier.

The exported graph takes input_ids and attention_mask with dynamic batch and sequence axes and
returns logits, so the runners can feed length-grouped batches of any shape.

Dynamic int8 quantises each MatMul's input with one scale for the whole tensor. A few hidden
channels of these encoders run far larger than the rest (one of MiniLM's layer-norm outputs
reaches about 28 where the median channel stays near 2; one GELU channel 24 against at most 6),
so that one scale leaves the ordinary channels a handful of levels. Before quantising, those
outlier channels are divided down by an explicit Mul in front of the MatMul and the same factor
is multiplied into the weight rows they meet: the fp32 result is unchanged, the int8 one loses
about half as many labels (docs/model.md). Only weight MatMuls are quantised: int8 embedding
tables cost labels and bought no speed.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch
from onnx import helper, numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.transformers.optimizer import optimize_model
from transformers import AutoConfig

from runners.architecture import load_classifier
from runners.model_store import FP32_FILE

OPSET = 17
# Ops whose outputs carry the outlier channels, when they feed a weight MatMul.
SMOOTHED_PRODUCERS = (
    "LayerNormalization",
    "SkipLayerNormalization",
    "BiasGelu",
    "Gelu",
    "FastGelu",
)
# A channel is an outlier when its largest value is above this quantile of all channels'.
OUTLIER_QUANTILE = 0.99
CALIBRATION_TEXTS = 512  # training texts whose activations set the smoothing factors
Calibration = list[tuple[np.ndarray, np.ndarray]]  # batches of (input_ids, attention_mask)


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
    most of the label flips and the last layers' hardly any (docs/model.md)."""
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
# and buys accuracy (loadtests/int8_layouts.py measures both). The first layout in which the
# int8 rule (models/evaluate.py) finds no loss on validation is kept.
INT8_FP32_FEED_FORWARD_LAYERS = (0, 1, 2, 3)
# 7-bit weights: on AVX2, and AVX-512 without VNNI, ONNX Runtime adds pairs of uint8 x int8
# products in 16 bits, which 8-bit weights can saturate (255 x 127 x 2 > 32,767) and 7-bit ones
# cannot; VNNI and AMX sum in 32 bits either way. The same file then scores alike on every CPU
# (docs/model.md, int8).
REDUCE_RANGE = True
QUANTIZATION = "dynamic uint8 activations; int8 weights per channel, 7 bits (reduce_range)"


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


def _smoothable_inputs(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    """Activation tensor -> the weight MatMuls it feeds (Q, K and V share one), for tensors
    that a layer norm or a GELU produces."""
    weights = {initializer.name for initializer in model.graph.initializer}
    producer = {output: node for node in model.graph.node for output in node.output}
    inputs: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        source = producer.get(node.input[0]) if node.op_type == "MatMul" else None
        if source is not None and source.op_type in SMOOTHED_PRODUCERS and node.input[1] in weights:
            inputs.setdefault(node.input[0], []).append(node)
    return inputs


def _channel_maxima(
    model: onnx.ModelProto, tensors: list[str], batches: Calibration
) -> dict[str, np.ndarray]:
    """The largest |value| each channel of each tensor takes over real (unpadded) tokens."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for tensor in tensors:
        probe.graph.output.append(
            helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None)
        )
    session = onnxruntime.InferenceSession(
        probe.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    maxima: dict[str, np.ndarray] = {}
    for input_ids, attention_mask in batches:
        feed = {"input_ids": input_ids, "attention_mask": attention_mask}
        for tensor, values in zip(tensors, session.run(tensors, feed), strict=True):
            batch_max = np.abs(values[attention_mask.astype(bool)]).max(axis=0)
            maxima[tensor] = np.maximum(maxima.get(tensor, batch_max), batch_max)
    return maxima


def smooth_outlier_channels(fp32: Path, out: Path, calibration: Calibration) -> Path:
    """Write a copy of the fp32 graph whose outlier channels are moved into the weights: x * (1/s)
    before the MatMul, s times each weight row, with s = 1 for every ordinary channel."""
    model = onnx.load(str(fp32))
    inputs = _smoothable_inputs(model)
    maxima = _channel_maxima(model, list(inputs), calibration)
    weights = {initializer.name: initializer for initializer in model.graph.initializer}
    muls: dict[str, onnx.NodeProto] = {}  # the first MatMul of each group -> its Mul
    for tensor, matmuls in inputs.items():
        typical = np.quantile(maxima[tensor], OUTLIER_QUANTILE)
        scale = np.maximum(1.0, maxima[tensor] / typical).astype(np.float32)
        inverse = numpy_helper.from_array(1.0 / scale, f"{tensor}_smoothing")
        model.graph.initializer.append(inverse)
        muls[matmuls[0].name] = helper.make_node(
            "Mul", [tensor, inverse.name], [f"{tensor}_smoothed"], name=f"{tensor}_Smoothing"
        )
        for matmul in matmuls:
            weight = weights[matmul.input[1]]
            scaled = numpy_helper.to_array(weight) * scale[:, None]
            weight.CopyFrom(numpy_helper.from_array(scaled.astype(np.float32), weight.name))
            matmul.input[0] = f"{tensor}_smoothed"
    nodes = []
    for node in model.graph.node:
        if node.name in muls:
            nodes.append(muls[node.name])
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.save(model, str(out))
    return out


def quantize_int8(smoothed: Path, fp32_feed_forward_layers: int, int8: Path) -> Path:
    """Dynamic int8 of the weight MatMuls of a smoothed graph (`smooth_outlier_channels`), with
    per-channel weights; the first layers' feed-forward MatMuls stay fp32 as asked."""
    quantize_dynamic(
        smoothed,
        int8,
        weight_type=QuantType.QInt8,
        per_channel=True,
        reduce_range=REDUCE_RANGE,
        op_types_to_quantize=["MatMul"],
        nodes_to_exclude=early_feed_forward_matmuls(onnx.load(smoothed), fp32_feed_forward_layers),
        extra_options={
            # Fused attention ops defeat ONNX shape inference; every untyped tensor is float.
            "DefaultTensorType": onnx.TensorProto.FLOAT,
            # Only weight matrices: attention's activation x activation products stay fp32.
            "MatMulConstBOnly": True,
        },
    )
    onnxruntime.InferenceSession(str(int8), providers=["CPUExecutionProvider"])
    return int8
