"""The start-up self-check: is the int8 graph right on the CPU that serves it?

Dynamic int8 runs through different ONNX Runtime kernels on each CPU class, and some of them
(AVX2, AVX-512 without VNNI) can saturate where the build machine's did not: the same file may
score differently on the node that serves it than on the one that built and measured it. So
every stored model carries a probe: a few hundred validation texts with the probabilities the
fp32 graph gave them at build. Each process that serves int8 (an API worker, a runner service,
a Kafka worker) scores the probe first, and serves fp32 instead when int8 changes more of its
labels than it did at build, beyond a margin, or when the build already found int8 short of
the accuracy rule. It says why in its log, `/api/v1/health`, `model-info` and the
`kubesentiment_backend_fallback` metric (docs/model.md, "The start-up self-check").
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from kubesentiment.settings import BackendName, get_settings
from runners.cpu import describe_cpu
from runners.engine import BatchObserver, SentimentEngine, load_engine
from runners.model_store import StoredModel, get

log = structlog.get_logger(__name__)

PROBE_FILE = "probe.json"  # beside pytorch/ and onnx/ in the stored model's folder
PROBE_TEXTS = 256
# On the serving CPU, int8 may change as many of the probe's fp32 labels as it did at build, and
# this share more (at least one: a text at 0.5 falls on either side after any rounding). The
# default model changes 5 of 256 at build (2%) and the same 5 on AVX2; a graph whose kernels
# saturate, or a broken one, changes far more (docs/model.md, "The start-up self-check").
PROBE_FLIP_MARGIN = 0.02


@dataclass(frozen=True)
class Probe:
    texts: list[str]
    fp32_positive: list[float]  # the fp32 graph's probability of POSITIVE, on the build CPU
    int8_label_flips_at_build: int

    def save(self, model_dir: Path) -> None:
        (model_dir / PROBE_FILE).write_text(json.dumps(asdict(self)))

    @classmethod
    def of(cls, model: StoredModel) -> Probe | None:
        """The model's probe; None for a model stored before probes existed."""
        path = model.path / PROBE_FILE
        return cls(**json.loads(path.read_text())) if path.exists() else None


def max_label_flips(probe: Probe, texts: int) -> int:
    """What the build saw on that many of the probe's texts, plus the margin."""
    at_build = probe.int8_label_flips_at_build * texts / max(len(probe.texts), 1)
    return int(at_build + max(1.0, PROBE_FLIP_MARGIN * texts))


def positive_scores(engine: SentimentEngine, texts: list[str]) -> np.ndarray:
    """Each text's probability of POSITIVE."""
    return np.array(
        [p.score if p.label == "POSITIVE" else 1 - p.score for p in engine.predict(texts)]
    )


def label_flips(probe: Probe, engine: SentimentEngine) -> tuple[int, float]:
    """How many probe labels the engine changes against fp32, and the mean |difference| of the
    probabilities."""
    reference = np.array(probe.fp32_positive)
    scored = positive_scores(engine, probe.texts)
    flips = int(np.sum((scored >= 0.5) != (reference >= 0.5)))
    return flips, float(np.mean(np.abs(scored - reference)))


@dataclass(frozen=True)
class BackendCheck:
    """Which back end serves, and why it is not the one asked for."""

    requested: BackendName
    served: BackendName
    reason: str | None = None
    probe_texts: int | None = None  # None: not checked (not int8, or a model without a probe)
    label_flips: int | None = None
    max_label_flips: int | None = None
    mean_probability_difference: float | None = None
    seconds: float | None = None

    @property
    def fell_back(self) -> bool:
        return self.served != self.requested

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"cpu": describe_cpu()}


def load_checked_engine(
    model: StoredModel,
    requested: BackendName,
    threads: int,
    max_batch_size: int = 64,
    observe_batch: BatchObserver | None = None,
    check: bool = True,
) -> tuple[SentimentEngine, BackendCheck]:
    """The engine that should serve `requested` on this CPU, and what the check found."""

    def engine_for(backend: BackendName) -> SentimentEngine:
        return load_engine(model, backend, threads, max_batch_size, observe_batch)

    if requested != "onnx-int8" or not check:
        return engine_for(requested), BackendCheck(requested, requested)
    at_build = model.metadata.get("int8", {})
    if at_build.get("passed") is False:
        reason = f"the int8 graph failed the accuracy rule at build: {at_build.get('reason')}"
        return fall_back(engine_for, BackendCheck(requested, "onnx-fp32", reason))
    probe = Probe.of(model)
    if probe is None:
        return engine_for(requested), BackendCheck(requested, requested)
    started = time.monotonic()
    engine = load_engine(model, requested, threads, max_batch_size)  # the probe is not traffic
    flips, difference = label_flips(probe, engine)
    allowed = max_label_flips(probe, len(probe.texts))
    checked = BackendCheck(
        requested,
        requested,
        probe_texts=len(probe.texts),
        label_flips=flips,
        max_label_flips=allowed,
        mean_probability_difference=round(difference, 5),
        seconds=round(time.monotonic() - started, 2),
    )
    if flips > allowed:
        reason = (
            f"on this CPU (class {describe_cpu()['class']}) the int8 graph changed {flips} of "
            f"{len(probe.texts)} probe labels against fp32, more than the {allowed} allowed"
        )
        return fall_back(engine_for, replace(checked, served="onnx-fp32", reason=reason))
    engine.observe_batch = observe_batch
    log.info("int8 self-check passed", **checked.as_dict())
    return engine, checked


def fall_back(
    engine_for: Callable[[BackendName], SentimentEngine], check: BackendCheck
) -> tuple[SentimentEngine, BackendCheck]:
    log.warning(f"serving {check.served} instead of {check.requested}", **check.as_dict())
    return engine_for(check.served), check


def main(argv: list[str] | None = None) -> int:
    """`python -m runners.self_check [TAG] [--limit N]`: the int8 self-check of a stored model
    on this CPU, as JSON; exit status 1 when int8 would not serve. `--limit` scores the first N
    probe texts only (under an emulator, tests/test_int8_cpus.py)."""
    parser = argparse.ArgumentParser(prog="python -m runners.self_check")
    parser.add_argument("tag", nargs="?", default=get_settings().model_store_tag)
    parser.add_argument("--limit", type=int, default=None)
    args = parser.parse_args(argv)
    model = get(args.tag)
    probe = Probe.of(model)
    if probe is None:
        print(f"{model.tag} has no probe set (built before probes existed)", file=sys.stderr)
        return 2
    n = min(args.limit or len(probe.texts), len(probe.texts))
    allowed = max_label_flips(probe, n)
    probe = replace(probe, texts=probe.texts[:n], fp32_positive=probe.fp32_positive[:n])
    flips, difference = label_flips(probe, load_engine(model, "onnx-int8", threads=2))
    report = {
        "model": model.tag,
        "probe_texts": n,
        "label_flips": flips,
        "max_label_flips": allowed,
        "mean_probability_difference": round(difference, 5),
        "passed": flips <= allowed,
        "cpu": describe_cpu(),
    }
    print(json.dumps(report))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
