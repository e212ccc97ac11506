"""Scoring a batch when the model may fail on some of its texts.

An exception from the engine (a tokenizer or ONNX Runtime error, out of memory on a pathological
batch) must cost the texts that cause it, not their batch mates, and must not end the worker:
that batch would be re-delivered and fail again after every restart. But a model that fails on
everything must not send the whole topic to the dead-letter queue either.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from runners.prediction import Prediction

CANARY = "ok"
"""A text any working model scores: it tells a poison batch from a broken model."""


class Scorer(Protocol):
    def predict(self, texts: Sequence[str]) -> list[Prediction]: ...


class ModelFailure(Exception):
    """Every text of a batch failed and a known-good text fails too: the fault is the model's
    (or its runtime's), not the messages'."""


def score_each(scorer: Scorer, texts: Sequence[str]) -> Sequence[Prediction | Exception]:
    """A prediction or the exception per text. A failing call is split in halves until each
    failure is a single text, so one poison text costs about 2·log2(n) extra calls and the
    rest of its batch is still scored."""
    try:
        return scorer.predict(texts)
    except Exception as err:
        if len(texts) == 1:
            return [err]
    middle = len(texts) // 2
    return [*score_each(scorer, texts[:middle]), *score_each(scorer, texts[middle:])]


def score_isolating_failures(
    scorer: Scorer, texts: Sequence[str]
) -> Sequence[Prediction | Exception]:
    """`score_each`, but raises ModelFailure rather than failing every text of a batch when the
    model cannot score the canary either: those messages are not at fault and must stay in
    the topic."""
    outcomes = score_each(scorer, texts)
    if outcomes and all(isinstance(outcome, Exception) for outcome in outcomes):
        try:
            scorer.predict([CANARY])
        except Exception as err:
            raise ModelFailure(f"a known-good text fails too: {type(err).__name__}: {err}") from err
    return outcomes
