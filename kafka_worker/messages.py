"""The message contract: what an input may look like, what a result and a dead letter are.

Input value: JSON {"id": "...", "text": "..."}, or plain UTF-8 text (its id is then
topic-partition-offset). Every input ends as exactly one result or one dead letter.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

from runners.prediction import Prediction


@dataclass(frozen=True)
class Source:
    topic: str
    partition: int
    offset: int

    def as_dict(self) -> dict[str, Any]:
        return {"topic": self.topic, "partition": self.partition, "offset": self.offset}


@dataclass(frozen=True)
class TextMessage:
    id: str
    text: str


@dataclass(frozen=True)
class Rejected:
    reason: str  # a short machine-readable reason, also the dead letter's header


def parse(value: bytes | None, source: Source, max_chars: int) -> TextMessage | Rejected:
    if value is None:
        return Rejected("empty_message")
    try:
        decoded = value.decode("utf-8")
    except UnicodeDecodeError:
        return Rejected("not_utf8")
    default_id = f"{source.topic}-{source.partition}-{source.offset}"
    if decoded.lstrip().startswith(("{", "[")):
        try:
            body = json.loads(decoded)
        except json.JSONDecodeError:
            return Rejected("bad_json")
        if not isinstance(body, dict):
            return Rejected("not_an_object")
        text = body.get("text")
        if not isinstance(text, str):
            return Rejected("missing_text")
        message_id = str(body["id"]) if body.get("id") is not None else default_id
    else:
        text, message_id = decoded, default_id
    if not text.strip():
        return Rejected("empty_text")
    if len(text) > max_chars:
        return Rejected("text_too_long")
    return TextMessage(message_id, text)


def result_value(
    message: TextMessage, prediction: Prediction, model: dict[str, str], source: Source
) -> bytes:
    return json.dumps(
        {
            "id": message.id,
            "sentiment": {"label": prediction.label, "score": prediction.score},
            "model": model,
            "source": source.as_dict(),
        }
    ).encode()


INFERENCE_ERROR = "inference_error"
"""The reason of a message the engine raised on while the model itself works (isolation.py)."""


def dead_letter_value(
    value: bytes | None, reason: str, source: Source, error: Exception | None = None
) -> bytes:
    """The original payload travels along: as text when it is UTF-8, else base64. An inference
    error adds the exception's type and message, for whoever replays the dead letters."""
    payload: str | None
    encoding = "utf-8"
    if value is None:
        payload = None
    else:
        try:
            payload = value.decode("utf-8")
        except UnicodeDecodeError:
            payload, encoding = base64.b64encode(value).decode(), "base64"
    letter: dict[str, Any] = {
        "error": reason,
        "payload": payload,
        "payload_encoding": encoding,
        "source": source.as_dict(),
    }
    if error is not None:
        letter["exception"] = {"type": type(error).__name__, "message": str(error)}
    return json.dumps(letter).encode()
