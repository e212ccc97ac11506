"""Accuracy, F1 and confusion matrix per domain and back end, through the same engine that
serves; agreement of each ONNX back end with PyTorch; the accuracy rule an int8 graph must pass."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, get_args

import numpy as np
from tqdm import tqdm

from kubesentiment.settings import BackendName
from models.data import Example
from runners.engine import SentimentEngine, load_engine
from runners.model_store import StoredModel

BACKENDS: tuple[BackendName, ...] = get_args(BackendName)[::-1]  # pytorch first: the reference


def _f1(truth: np.ndarray, predicted: np.ndarray, label: int) -> float:
    tp = int(np.sum((predicted == label) & (truth == label)))
    fp = int(np.sum((predicted == label) & (truth != label)))
    fn = int(np.sum((predicted != label) & (truth == label)))
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def classification_metrics(truth: np.ndarray, predicted: np.ndarray) -> dict[str, Any]:
    """Accuracy; F1 of POSITIVE and macro-F1 (the mean of both classes' F1, which a model that
    favours one class cannot hide behind); the confusion matrix."""
    f1 = {label: _f1(truth, predicted, label) for label in (0, 1)}
    matrix = [[int(np.sum((truth == t) & (predicted == p))) for p in (0, 1)] for t in (0, 1)]
    return {
        "accuracy": round(float(np.mean(truth == predicted)), 4) if len(truth) else 0.0,
        "f1": round(f1[1], 4),
        "macro_f1": round((f1[0] + f1[1]) / 2, 4),
        "confusion_matrix": {
            "labels": ["NEGATIVE", "POSITIVE"],
            "rows_true_cols_predicted": matrix,
        },
    }


def metrics_table(metrics: dict[str, dict[str, dict[str, Any]]]) -> str:
    """Accuracy / macro-F1 per domain (rows) and back end (columns), as Markdown."""
    backends = list(next(iter(metrics.values())))
    lines = [
        "| domain | " + " | ".join(backends) + " |",
        "|---|" + "---:|" * len(backends),
    ]
    for domain, per_backend in metrics.items():
        cells = [f"{m['accuracy']:.3f} / {m['macro_f1']:.3f}" for m in per_backend.values()]
        lines.append(f"| {domain} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def positive_probabilities(
    model: StoredModel, backend: BackendName, sets: dict[str, list[Example]]
) -> dict[str, np.ndarray]:
    """Per domain, each text's positive-class probability, through the engine that serves."""
    return engine_probabilities(load_engine(model, backend, threads=2), sets, backend)


def engine_probabilities(
    engine: SentimentEngine, sets: dict[str, list[Example]], name: str = "scoring"
) -> dict[str, np.ndarray]:
    """Each domain is scored on its own: int8 activations are quantised per batch, so a text's
    int8 score moves a little with its batch neighbours, and a domain's figures should not
    depend on which other domains are evaluated with it."""
    scores = {}
    for domain, examples in sets.items():
        texts = [e.text for e in examples]
        positive = []
        for start in tqdm(range(0, len(texts), 256), desc=f"{name} {domain}", unit="chunk"):
            for p in engine.predict(texts[start : start + 256]):
                positive.append(p.score if p.label == "POSITIVE" else 1 - p.score)
        scores[domain] = np.array(positive)
    return scores


def accuracies(probabilities: dict[str, np.ndarray], sets: dict[str, list[Example]]) -> dict:
    return {
        domain: float(np.mean((probs >= 0.5) == np.array([e.label for e in sets[domain]])))
        if len(probs)
        else 0.0
        for domain, probs in probabilities.items()
    }


def evaluate(
    model: StoredModel, sets: dict[str, list[Example]], backends: tuple[BackendName, ...] = BACKENDS
) -> dict[str, dict[str, dict[str, Any]]]:
    """Metrics per domain and back end; ONNX back ends also report agreement with PyTorch, and
    int8 its paired comparison with fp32 (`against_fp32`)."""
    report: dict[str, dict[str, dict[str, Any]]] = {domain: {} for domain in sets}
    reference: dict[str, np.ndarray] | None = None
    scored: dict[str, dict[str, np.ndarray]] = {}
    for backend in backends:
        probabilities = scored[backend] = positive_probabilities(model, backend, sets)
        reference = reference or probabilities
        for domain, probs in probabilities.items():
            truth = np.array([e.label for e in sets[domain]])
            metrics = classification_metrics(truth, (probs >= 0.5).astype(int))
            if backend != backends[0]:
                agree = (probs >= 0.5) == (reference[domain] >= 0.5)
                metrics["label_agreement_with_pytorch"] = round(float(np.mean(agree)), 5)
                metrics["max_probability_difference"] = float(
                    np.max(np.abs(probs - reference[domain]), initial=0.0)
                )
            report[domain][backend] = metrics
    if {"onnx-fp32", "onnx-int8"} <= set(scored):
        paired = paired_comparisons(sets, scored["onnx-fp32"], scored["onnx-int8"])
        for domain in sets:
            report[domain]["onnx-int8"]["against_fp32"] = paired[domain].as_dict()
    return report


# The int8 rule. A loss counts when it is both material (more than half a point of accuracy)
# and beyond noise: the one-sided exact sign test on the texts that int8 and fp32 label
# differently (McNemar's test) finds fewer than a 1% chance that fp32 wins that many of them by
# luck. 1%, not 5%: five domains and the pooled set are tested at once (Bonferroni, roughly).
# Four tweets lost and none gained is p = 0.0625 (no loss); eight lost and none gained is
# p = 0.004 (a loss, where 8 texts are over half a point). docs/model.md, "The int8 rule".
INT8_MAX_ACCURACY_LOSS = 0.005
INT8_LOSS_P_VALUE = 0.01
POOLED = "pooled"
PAIRED = ("texts", "fp32_only_right", "int8_only_right")  # what a PairedComparison is made of


@dataclass(frozen=True)
class PairedComparison:
    """fp32 and int8 labels on the same texts against the truth. The texts both get right or
    both get wrong say nothing about int8: only the ones they disagree on do."""

    texts: int
    fp32_only_right: int
    int8_only_right: int

    @property
    def loss_points(self) -> float:
        """Accuracy int8 loses against fp32, in points (negative: int8 is better)."""
        return 100 * (self.fp32_only_right - self.int8_only_right) / max(self.texts, 1)

    @property
    def p_value(self) -> float:
        """P(fp32 wins at least this many of the disagreements | each is a coin toss)."""
        n, wins = self.fp32_only_right + self.int8_only_right, self.fp32_only_right
        return sum(math.comb(n, k) for k in range(wins, n + 1)) / 2**n

    @property
    def is_loss(self) -> bool:
        return self.loss_points > 100 * INT8_MAX_ACCURACY_LOSS and self.p_value < INT8_LOSS_P_VALUE

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {
            "loss_points": round(self.loss_points, 2),
            "p_value": round(self.p_value, 4),
            "is_loss": self.is_loss,
        }


def paired_comparisons(
    sets: dict[str, list[Example]],
    fp32: dict[str, np.ndarray],
    int8: dict[str, np.ndarray],
) -> dict[str, PairedComparison]:
    """Per domain, and over every text of every domain pooled."""
    comparisons = {}
    for domain, examples in sets.items():
        truth = np.array([e.label for e in examples], dtype=bool)
        fp32_right = (fp32[domain] >= 0.5) == truth
        int8_right = (int8[domain] >= 0.5) == truth
        comparisons[domain] = PairedComparison(
            texts=len(examples),
            fp32_only_right=int(np.sum(fp32_right & ~int8_right)),
            int8_only_right=int(np.sum(int8_right & ~fp32_right)),
        )
    comparisons[POOLED] = PairedComparison(
        texts=sum(c.texts for c in comparisons.values()),
        fp32_only_right=sum(c.fp32_only_right for c in comparisons.values()),
        int8_only_right=sum(c.int8_only_right for c in comparisons.values()),
    )
    return comparisons


def int8_losses(comparisons: dict[str, PairedComparison]) -> dict[str, float]:
    """The sets on which int8 loses accuracy by the rule, with the loss in points."""
    return {
        name: round(comparison.loss_points, 2)
        for name, comparison in comparisons.items()
        if comparison.is_loss
    }
