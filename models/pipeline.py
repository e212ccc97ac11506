"""The chains that put a model into the store: `build` trains the default model from our own
data; `import_model` takes a model a user brings. Both go through the same export, evaluation
and registration, so every stored model carries the same files and the same metadata."""

from __future__ import annotations

import hashlib
import json
import random
import shlex
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from models import LABELS, RECIPE_OF_NAME
from models.data import WHOLE_REVIEWS, Example, Splits, load_splits
from models.distill import teach
from models.evaluate import (
    PAIRED,
    POOLED,
    PairedComparison,
    evaluate,
    int8_losses,
    metrics_table,
    paired_comparisons,
    positive_probabilities,
)
from models.export import (
    CALIBRATION_TEXTS,
    INT8_FP32_FEED_FORWARD_LAYERS,
    QUANTIZATION,
    export_fp32,
    quantize_int8,
    smooth_outlier_channels,
)
from models.train import DEFAULT_CONFIG, RECIPES, TrainConfig, train
from runners import self_check
from runners.cpu import describe_cpu
from runners.engine import WINDOW_AGGREGATIONS, WindowAggregation, fold_windows, load_engine
from runners.model_store import (
    ONNX_DIR,
    PYTORCH_DIR,
    StoredModel,
    find_by_recipe,
    get,
    register,
)
from runners.self_check import PROBE_TEXTS, Probe

log = structlog.get_logger(__name__)

# Bump when a change to the pipeline code should make `make model` build a new version.
PIPELINE_VERSION = 7
SERVING_MAX_LENGTH = 128
PROBE_SEED = 7  # which validation sentences make the probe
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


def choose_int8_layout(
    candidate: StoredModel, train: list[Example], validation: dict[str, list[Example]]
) -> dict[str, Any]:
    """Quantise with the fastest layout that the int8 rule (models/evaluate.py) finds no loss
    in, on any validation domain or on all of them pooled. The test split is not even an
    argument: it reports how the chosen graph does, and chooses nothing. If no layout passes, the
    most precise one is written and `passed` is false: the model is still registered, with every
    back end's figures, and served in fp32 (runners/self_check.py). Training texts set the
    smoothing. Returns what was tried."""
    fp32 = positive_probabilities(candidate, "onnx-fp32", validation)
    tried = []
    calibration = calibration_batches(candidate, train[:CALIBRATION_TEXTS])
    with tempfile.TemporaryDirectory() as tmp:  # one smoothed graph for every layout
        smoothed = Path(tmp) / "smoothed.onnx"
        smooth_outlier_channels(candidate.onnx_file(quantized=False), smoothed, calibration)
        for layers in INT8_FP32_FEED_FORWARD_LAYERS:
            quantize_int8(smoothed, layers, candidate.onnx_file(quantized=True))
            int8 = positive_probabilities(candidate, "onnx-int8", validation)
            comparisons = paired_comparisons(validation, fp32, int8)
            losses = int8_losses(comparisons)
            tried.append({"fp32_feed_forward_layers": layers, "validation_losses": losses})
            log.info("int8 layout", **tried[-1])
            if not losses:
                break
    reason = None
    if losses:
        shown = ", ".join(
            f"{name} {points} points (p={comparisons[name].p_value:.4f})"
            for name, points in losses.items()
        )
        reason = f"every layout loses accuracy on validation; the most precise one loses {shown}"
    return {
        "passed": not losses,
        "reason": reason,
        "quantization": QUANTIZATION,
        "fp32_feed_forward_layers": layers,
        "tried": tried,
        "validation": {name: c.as_dict() for name, c in comparisons.items()},
    }


def write_probe(candidate: StoredModel, validation: dict[str, list[Example]]) -> dict[str, Any]:
    """The probe set the serving processes check int8 with (runners/self_check.py): a seeded
    sample of validation sentences with their fp32 probabilities, written into the model."""
    pool = [e.text for d, examples in validation.items() if d != WHOLE_REVIEWS for e in examples]
    texts = random.Random(PROBE_SEED).sample(pool, min(PROBE_TEXTS, len(pool)))
    fp32 = self_check.positive_scores(load_engine(candidate, "onnx-fp32", 2), texts)
    probe = Probe(texts, [round(float(p), 6) for p in fp32], 0)
    flips, difference = self_check.label_flips(probe, load_engine(candidate, "onnx-int8", 2))
    probe = replace(probe, int8_label_flips_at_build=flips)
    probe.save(candidate.path)
    return {
        "texts": len(texts),
        "int8_label_flips": flips,
        "mean_probability_difference": difference,
    }


def _finish(
    name: str,
    staging: Path,
    splits: Splits,
    metadata: dict[str, Any],
    normalize_text: bool,
) -> StoredModel:
    """Export, quantise, write the probe, evaluate on the untouched test splits, check parity,
    register. An int8 graph that fails its rule is registered all the same, marked so."""
    started = time.monotonic()
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
    int8 = choose_int8_layout(candidate, splits.train, splits.validation)
    probe = write_probe(candidate, splits.validation)
    metrics = evaluate(candidate, splits.test)
    print(f"test accuracy / macro-F1:\n{metrics_table(metrics)}", file=sys.stderr)
    for domain, per_backend in metrics.items():
        fp32 = per_backend["onnx-fp32"]
        if (
            fp32["label_agreement_with_pytorch"] < FP32_MIN_AGREEMENT
            or fp32["max_probability_difference"] > FP32_MAX_PROBABILITY_DIFFERENCE
        ):
            raise RuntimeError(f"ONNX fp32 export disagrees with PyTorch on {domain}: {fp32}")
    int8["test"] = int8_on_test(metrics)  # reported, never used to choose
    if not int8["passed"]:
        log.warning(
            f"int8 fails its rule; registered all the same, served in fp32: {int8['reason']}"
        )
    metadata |= serving | {
        "data_hash": splits.fingerprint(),
        "examples": splits.sizes(),
        "metrics": metrics,
        "window_aggregation_study": window_study,
        "int8": int8,
        "probe": probe,
        "built_on": describe_cpu(),
        "export_seconds": round(time.monotonic() - started, 1),
        "command": shlex.join(["python", "-m", "models", *sys.argv[1:]]),
    }
    stored = register(name, staging, metadata)
    log.info(
        "registered model",
        tag=stored.tag,
        accuracy={d: {b: m["accuracy"] for b, m in per.items()} for d, per in metrics.items()},
        int8_passed=int8["passed"],
    )
    return stored


def int8_on_test(metrics: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """int8 against fp32 on the test split, per domain and pooled, from evaluate's figures."""
    per_domain = {
        domain: PairedComparison(**{k: backends["onnx-int8"]["against_fp32"][k] for k in PAIRED})
        for domain, backends in metrics.items()
    }
    pooled = PairedComparison(*(sum(getattr(c, k) for c in per_domain.values()) for k in PAIRED))
    return {name: c.as_dict() for name, c in (per_domain | {POOLED: pooled}).items()}


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
        return _finish(name, staging, splits, {"source": source}, normalize_text=False)
