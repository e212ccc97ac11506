"""Task-specific knowledge distillation: `sentiment-large` teaches a MiniLM student.

The large model is right more often but serves a quarter as many texts. A student that learns
the teacher's probabilities learns more than the sign of the human ratings: how sure the teacher
is, and what it says of texts no person rated (Hinton et al. 2015). So the student also trains
on a transfer set made from the training texts, the lever of DistilBERT, TinyBERT and Tang et
al. (2019), which a search over hard-label recipes cannot pull:

- phrases: a contiguous span of each training text's words, as SST's phrase labels teach
  sentence models what the parts of a sentence say;
- perturbed: each training text with a tenth of its words dropped and two neighbours swapped;
- review windows: consecutive sentences of each training review joined, the longer texts the
  API is also sent.

Only the training split feeds it, and a transfer text that equals a validation or test text is
dropped. The teacher's scores are cached per teacher version and part of the texts, so the
student's next seed, or the next student, does not score them again.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog
from tqdm import tqdm

from kubesentiment.settings import BackendName
from models.data import Example, Splits, review_of
from runners.engine import load_engine
from runners.model_store import StoredModel

log = structlog.get_logger(__name__)

# One transfer set for every student seed, so that one pass of the teacher serves them all.
TRANSFER_SEED = 13
# The teacher as it serves: its int8 graph is within 0.5 points of fp32 on every domain (the
# int8 rule) and scores about 2.5 times as many texts per second.
TEACHER_BACKEND: BackendName = "onnx-int8"
# Probabilities are kept as log-odds, clipped where float32 can no longer tell p from 1.
MAX_LOG_ODDS = 16.0
WORD_DROPOUT = 0.1


@dataclass(frozen=True)
class TeacherTargets:
    """What the student learns from: the training texts first (in the split's order), then the
    transfer texts, each with the teacher's log-odds of POSITIVE."""

    texts: list[str]
    log_odds: np.ndarray
    report: dict[str, Any]


def sub_phrase(words: list[str], rng: random.Random) -> str:
    """A contiguous span of two words up to all but one."""
    length = rng.randint(2, len(words) - 1)
    start = rng.randint(0, len(words) - length)
    return " ".join(words[start : start + length])


def perturbed(words: list[str], rng: random.Random) -> str:
    """Word dropout, then one swap of neighbours: the same sentiment, worded a little off."""
    kept = [w for w in words if rng.random() >= WORD_DROPOUT] or words[:1]
    if len(kept) > 1:
        i = rng.randrange(len(kept) - 1)
        kept[i], kept[i + 1] = kept[i + 1], kept[i]
    return " ".join(kept)


def review_windows(train: list[Example]) -> list[str]:
    """Each pair of consecutive sentences of every training review, joined."""
    reviews: dict[str, list[Example]] = {}
    for example in train:
        if example.domain == "amazon":
            reviews.setdefault(review_of(example), []).append(example)
    windows = []
    for sentences in reviews.values():
        sentences.sort(key=lambda e: int(e.source.split("_")[1]))
        windows += [f"{a.text} {b.text}" for a, b in itertools.pairwise(sentences)]
    return windows


def transfer_texts(splits: Splits, sources: tuple[str, ...]) -> dict[str, list[str]]:
    """The transfer set by source, from the training split only, without any text that is
    also a rated text (held-out ones above all) or that an earlier source already made. Each
    source's texts are the same whichever sources are chosen, so their scores can be cached
    per source."""
    rng = random.Random(TRANSFER_SEED)
    seen = {e.text.strip().lower() for e in splits.train}
    seen |= {
        e.text.strip().lower()
        for part in (splits.validation, splits.test)
        for d in part
        for e in part[d]
    }
    made: dict[str, list[str]] = {"phrases": [], "perturbed": []}
    for example in splits.train:
        words = example.text.split()
        if len(words) >= 3:  # a shorter text has no span of two words that is not itself
            made["phrases"].append(sub_phrase(words, rng))
            made["perturbed"].append(perturbed(words, rng))
    made["review_windows"] = review_windows(splits.train)
    kept: dict[str, list[str]] = {}
    for source, texts in made.items():
        kept[source] = []
        for text in texts:
            if (key := text.strip().lower()) not in seen:
                seen.add(key)
                kept[source].append(text)
    return {source: kept[source] for source in sources}


def score_with_teacher(teacher: StoredModel, texts: list[str]) -> np.ndarray:
    """The teacher's log-odds of POSITIVE for each text, through the engine that serves it."""
    engine = load_engine(teacher, TEACHER_BACKEND, threads=2)
    positive = np.empty(len(texts), dtype=np.float64)
    # Length-sorted chunks: the engine pads within a chunk, and similar lengths pad least.
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    chunk = 512
    with tqdm(total=len(texts), desc=f"teacher {teacher.tag} scores", unit="text") as bar:
        for start in range(0, len(order), chunk):
            idx = order[start : start + chunk]
            for i, p in zip(idx, engine.predict([texts[i] for i in idx]), strict=True):
                positive[i] = p.score if p.label == "POSITIVE" else 1 - p.score
            bar.update(len(idx))
    positive = np.clip(positive, 1e-7, 1 - 1e-7)
    return np.clip(np.log(positive / (1 - positive)), -MAX_LOG_ODDS, MAX_LOG_ODDS).astype(
        np.float32
    )


def teach(
    teacher: StoredModel, splits: Splits, sources: tuple[str, ...], data_dir: Path
) -> TeacherTargets:
    """The training texts and the transfer set with the teacher's scores, each part from the
    cache where this teacher has scored exactly its texts before."""
    parts = {"training": [e.text for e in splits.train]} | transfer_texts(splits, sources)
    started = time.monotonic()
    scores, cached = [], []
    for part, texts in parts.items():
        digest = hashlib.sha256(json.dumps([teacher.tag, texts]).encode()).hexdigest()[:16]
        cache = data_dir / "teacher-scores" / f"{teacher.name}-{part}-{digest}.npy"
        if cache.exists():
            scores.append(np.load(cache))
            cached.append(part)
            log.info("teacher scores from the cache", part=part, file=str(cache))
            continue
        scores.append(score_with_teacher(teacher, texts))
        cache.parent.mkdir(parents=True, exist_ok=True)
        partial = cache.with_suffix(".partial.npy")
        np.save(partial, scores[-1])
        partial.replace(cache)  # whole or not at all
    report = {
        "teacher": teacher.tag,
        "teacher_backend": TEACHER_BACKEND,
        "rated_texts": len(splits.train),
        "transfer_texts": {source: len(parts[source]) for source in sources},
        "teacher_scores_cached": cached,
        "teacher_seconds": round(time.monotonic() - started, 1),
    }
    log.info("transfer set", **report)
    texts = [text for part in parts.values() for text in part]
    return TeacherTargets(texts, np.concatenate(scores), report)
