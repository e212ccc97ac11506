"""Accuracy, F1 and confusion matrix per back end, through the same engine that serves, and
agreement of each ONNX back end with PyTorch."""

from __future__ import annotations

from typing import Any, get_args

import numpy as np
from tqdm import tqdm

from models.data import Example
from runners.engine import load_engine
from runners.model_store import StoredModel
from settings import Backend

BACKENDS: tuple[Backend, ...] = get_args(Backend)[::-1]  # pytorch first: the reference


def classification_metrics(truth: np.ndarray, predicted: np.ndarray) -> dict[str, Any]:
    tp = int(np.sum((predicted == 1) & (truth == 1)))
    tn = int(np.sum((predicted == 0) & (truth == 0)))
    fp = int(np.sum((predicted == 1) & (truth == 0)))
    fn = int(np.sum((predicted == 0) & (truth == 1)))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": round((tp + tn) / len(truth), 4),
        "f1": round(f1, 4),
        "confusion_matrix": {
            "labels": ["NEGATIVE", "POSITIVE"],
            "rows_true_cols_predicted": [[tn, fp], [fn, tp]],
        },
    }


def positive_probabilities(model: StoredModel, backend: Backend, texts: list[str]) -> np.ndarray:
    engine = load_engine(model, backend, threads=2)
    scores = []
    for start in tqdm(range(0, len(texts), 256), desc=f"evaluate {backend}", unit="chunk"):
        for p in engine.predict(texts[start : start + 256]):
            scores.append(p.score if p.label == "POSITIVE" else 1 - p.score)
    return np.array(scores)


def evaluate(model: StoredModel, examples: list[Example]) -> dict[str, dict[str, Any]]:
    """Metrics per back end; ONNX back ends also report agreement with PyTorch."""
    texts = [e.text for e in examples]
    truth = np.array([e.label for e in examples])
    report: dict[str, dict[str, Any]] = {}
    reference: np.ndarray | None = None
    for backend in BACKENDS:
        probs = positive_probabilities(model, backend, texts)
        metrics = classification_metrics(truth, (probs >= 0.5).astype(int))
        if reference is None:
            reference = probs
        else:
            metrics["label_agreement_with_pytorch"] = round(
                float(np.mean((probs >= 0.5) == (reference >= 0.5))), 5
            )
            metrics["max_probability_difference"] = float(np.max(np.abs(probs - reference)))
        report[backend] = metrics
    return report
