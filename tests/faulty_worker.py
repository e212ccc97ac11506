"""`python -m tests.faulty_worker`: the real Kafka worker and model, with a FAKE fault in the
engine. The faults the worker must survive (a tokenizer or ONNX Runtime error on one message,
a model broken for every input) cannot be caused on demand with a real model, so this wraps the
real engine and raises instead:

- FAULT_MARKER=<text>: any call whose texts contain <text> raises RuntimeError (a poison message);
- FAULT_ALWAYS=true: every call raises RuntimeError (a broken model).
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Sequence
from typing import Any
from unittest import mock

from kafka_worker import __main__ as entry
from runners.engine import SentimentEngine
from runners.prediction import Prediction
from runners.self_check import BackendCheck, load_checked_engine


class FaultyEngine:
    def __init__(self, engine: SentimentEngine) -> None:
        self.engine = engine
        self.marker = os.environ.get("FAULT_MARKER")
        self.always = os.environ.get("FAULT_ALWAYS") == "true"

    def predict(self, texts: Sequence[str]) -> list[Prediction]:
        if self.always:
            raise RuntimeError("fake fault: the model is broken")
        if self.marker and any(self.marker in text for text in texts):
            raise RuntimeError(f"fake fault: a text contains {self.marker!r}")
        return self.engine.predict(texts)


def load_faulty_engine(*args: Any, **kwargs: Any) -> tuple[FaultyEngine, BackendCheck]:
    engine, check = load_checked_engine(*args, **kwargs)
    return FaultyEngine(engine), check


if __name__ == "__main__":
    with mock.patch.object(entry, "load_checked_engine", load_faulty_engine):
        sys.exit(asyncio.run(entry.main()))
