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

import numpy as np
import structlog

from models import LABELS, RECIPE_OF_NAME
from models.data import WHOLE_REVIEWS, Example, Splits, load_splits
from models.distill import teach
from models.evaluate import (
    INT8_MAX_ACCURACY_LOSS,
    accuracies,
    evaluate,
    int8_shortfalls,
    metrics_table,
    positive_probabilities,
)
from models.export import (
    CALIBRATION_TEXTS,
    INT8_FP32_FEED_FORWARD_LAYERS,
    export_fp32,
    quantize_int8,
    smooth_outlier_channels,
)
from models.train import DEFAULT_CONFIG, RECIPES, TrainConfig, train
from runners.engine import WINDOW_AGGREGATIONS, WindowAggregation, fold_windows, load_engine
from runners.model_store import (
    ONNX_DIR,
    PYTORCH_DIR,
    StoredModel,
    find_by_recipe,
    get,
    register,
)

log = structlog.get_logger(__name__)

# Bump when a change to the pipeline code should make `make model` build a new version.
PIPELINE_VERSION = 6
SERVING_MAX_LENGTH = 128
# Gates that catch a broken export: a stored ONNX graph must agree with its PyTorch source.
FP32_MIN_AGREEMENT = 0.999
FP32_MAX_PROBABILITY_DIFFERENCE = 1e-3


class ModelSourceError(ValueError):
    """A model folder or hub id that cannot become a sentiment model, with the reason."""


def recipe_hash(splits: Splits, config: TrainConfig, teacher: StoredModel | None = None) -> str:
    """The encoder is named in the config; its package versions and hashes are pinned. A
    student's recipe includes its teacher's version: a new teacher makes a new student."""
    train = asdict(config)
    if config.distillation is None:  # so that the models stored before it keep their hash
        del train["distillation"]
    payload = {
        "pipeline": PIPELINE_VERSION,
        "data": splits.fingerprint(),
        "train": train,
    } | ({"teacher": teacher.tag} if teacher is not None else {})
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def choose_window_aggregation(
    candidate: StoredModel, reviews: list[Example]
) -> tuple[WindowAggregation, dict[str, float]]:
    """The way of folding window scores that scores the validation's whole reviews best (the
    first of WINDOW_AGGREGATIONS on a tie), and what each one scored."""
    if not reviews:  # a smoke run's split can hold no whole review
        return WINDOW_AGGREGATIONS[0], {}
    engine = load_engine(candidate, "onnx-fp32", threads=2)
    windows, owners = engine.windows([e.text for e in reviews])
    window_probs = engine.probabilities(windows)
    tokens = np.array([len(w.ids) for w in windows])
    positive = engine.labels.index("POSITIVE")
    truth = np.array([e.label for e in reviews])
    scores: dict[str, float] = {}
    for how in WINDOW_AGGREGATIONS:
        folded = fold_windows(window_probs, owners, tokens, len(reviews), how)
        scores[how] = round(float(np.mean((folded[:, positive] >= 0.5) == truth)), 4)
    return max(WINDOW_AGGREGATIONS, key=scores.__getitem__), scores


def calibration_batches(
    candidate: StoredModel, examples: list[Example]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Training texts as the served model will read them (normalised where it was trained
    so, padded as the engine pads): the activations that set int8's smoothing factors."""
    engine = load_engine(candidate, "onnx-fp32", threads=2)
    windows, _ = engine.windows([e.text for e in examples])
    return [(input_ids, attention_mask) for _, input_ids, attention_mask in engine.batches(windows)]


def choose_int8_layout(candidate: StoredModel, splits: Splits) -> dict[str, Any]:
    """Quantise with the fastest layout that keeps int8 within INT8_MAX_ACCURACY_LOSS of fp32
    on every domain, first on validation, then on test. The test split only gates: it can send
    the choice to a more precise layout, never make any figure look better than it is. If no
    layout passes, the most precise one stays and the caller decides. Returns what was tried."""
    reference = {
        name: accuracies(positive_probabilities(candidate, "onnx-fp32", sets), sets)
        for name, sets in (("validation", splits.validation), ("test", splits.test))
    }
    tried = []
    calibration = calibration_batches(candidate, splits.train[:CALIBRATION_TEXTS])
    with tempfile.TemporaryDirectory() as tmp:  # one smoothed graph for every layout
        smoothed = Path(tmp) / "smoothed.onnx"
        smooth_outlier_channels(candidate.onnx_file(quantized=False), smoothed, calibration)
        for layers in INT8_FP32_FEED_FORWARD_LAYERS:
            quantize_int8(smoothed, layers, candidate.onnx_file(quantized=True))
            attempt: dict[str, Any] = {"fp32_feed_forward_layers": layers}
            for name, sets in (("validation", splits.validation), ("test", splits.test)):
                int8 = accuracies(positive_probabilities(candidate, "onnx-int8", sets), sets)
                sizes = {domain: len(examples) for domain, examples in sets.items()}
                attempt[f"{name}_shortfalls"] = int8_shortfalls(reference[name], int8, sizes)
                last_layout = layers == INT8_FP32_FEED_FORWARD_LAYERS[-1]
                if attempt[f"{name}_shortfalls"] and not last_layout:
                    break  # the last layout is checked on test too: the caller's gate needs it
            tried.append(attempt)
            log.info("int8 layout", **attempt)
            if not any(attempt.get(f"{name}_shortfalls") for name in reference):
                break
    return {
        "fp32_feed_forward_layers": layers,
        "tried": tried,
        "test_shortfalls": tried[-1]["test_shortfalls"],
    }


def _finish(
    name: str,
    staging: Path,
    splits: Splits,
    metadata: dict[str, Any],
    normalize_text: bool,
    gate_int8: bool,
) -> StoredModel:
    """Export, quantise, evaluate on the untouched test splits, check parity and the int8
    rule, register."""
    export_fp32(staging / PYTORCH_DIR, staging / ONNX_DIR)
    id2label = json.loads((staging / PYTORCH_DIR / "config.json").read_text())["id2label"]
    labels = [str(id2label[str(i)]).upper() for i in range(len(id2label))]
    serving: dict[str, Any] = {
        "labels": labels,
        "max_length": SERVING_MAX_LENGTH,
        "normalize_text": normalize_text,
    }
    candidate = StoredModel("staging:0", staging, serving)
    serving["window_aggregation"], window_study = choose_window_aggregation(
        candidate, splits.validation[WHOLE_REVIEWS]
    )
    int8_layout = choose_int8_layout(candidate, splits)
    metrics = evaluate(candidate, splits.test)
    print(f"test accuracy / macro-F1:\n{metrics_table(metrics)}", file=sys.stderr)
    for domain, per_backend in metrics.items():
        fp32 = per_backend["onnx-fp32"]
        if (
            fp32["label_agreement_with_pytorch"] < FP32_MIN_AGREEMENT
            or fp32["max_probability_difference"] > FP32_MAX_PROBABILITY_DIFFERENCE
        ):
            raise RuntimeError(f"ONNX fp32 export disagrees with PyTorch on {domain}: {fp32}")
    if int8_layout["test_shortfalls"] and gate_int8:
        raise RuntimeError(
            f"not registered: the int8 graph loses more than {100 * INT8_MAX_ACCURACY_LOSS} "
            f"points of accuracy against fp32 on the test split of "
            f"{int8_layout['test_shortfalls']}"
        )
    metadata |= serving | {
        "data_hash": splits.fingerprint(),
        "examples": splits.sizes(),
        "metrics": metrics,
        "window_aggregation_study": window_study,
        "int8_layout": int8_layout,
        "command": shlex.join(["python", "-m", "models", *sys.argv[1:]]),
    }
    stored = register(name, staging, metadata)
    log.info(
        "registered model",
        tag=stored.tag,
        accuracy={d: {b: m["accuracy"] for b, m in per.items()} for d, per in metrics.items()},
    )
    return stored


def build(
    name: str,
    data_dir: Path,
    config: TrainConfig = DEFAULT_CONFIG,
    limit: int | None = None,
    force: bool = False,
) -> StoredModel:
    """Train (taught by the config's teacher where it names one), export, evaluate and
    register, unless the store already holds a model made from the same data, code, settings
    and teacher."""
    splits = load_splits(data_dir, limit=limit)  # one split for every training seed
    distill = config.distillation
    teacher = teacher_model(distill.teacher, data_dir, limit) if distill is not None else None
    recipe = recipe_hash(splits, config, teacher)
    if not force and (existing := find_by_recipe(name, recipe)) is not None:
        log.info("store already holds the current model; nothing to do", tag=existing.tag)
        return existing
    source = f"{config.encoder} fine-tuned on Hutto & Gilbert (ICWSM 2014) ratings"
    targets = None
    if teacher is not None and distill is not None:
        targets = teach(teacher, splits, distill.transfer, data_dir)
        source += f", distilled from {teacher.tag}"
    log.info("training", **splits.sizes())
    with tempfile.TemporaryDirectory(prefix="kubesentiment-") as tmp:
        staging = Path(tmp)
        report = train(splits, staging / PYTORCH_DIR, data_dir, config, targets)
        if targets is not None:
            report["distillation"] = targets.report
        return _finish(
            name,
            staging,
            splits,
            {"recipe": recipe, "source": source, "training": report},
            normalize_text=True,
            gate_int8=limit is None,  # a smoke run's test splits are too small for the rule
        )


def teacher_model(name: str, data_dir: Path, limit: int | None) -> StoredModel:
    """The newest stored model of that name; one our recipes make is built first if missing."""
    try:
        return get(name)
    except LookupError:
        if name not in RECIPE_OF_NAME:
            raise
    log.info("building the teacher first", teacher=name)
    return build(name, data_dir, RECIPES[RECIPE_OF_NAME[name]], limit)


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
        # A model trained elsewhere never saw our text normalisation: it reads what it is given.
        return _finish(
            name, staging, splits, {"source": source}, normalize_text=False, gate_int8=limit is None
        )
