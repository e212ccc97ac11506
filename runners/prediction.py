"""What scoring one text gives: the one type the HTTP API, the job store, the Kafka message
contract and the metrics share. It lives apart from the engine so that those import a dataclass,
not numpy, tokenizers and the model store."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Prediction:
    label: str
    score: float
