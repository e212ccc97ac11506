"""The message contract: what an input may look like, what a result and a dead letter are.

Input value: JSON {"id": "...", "text": "..."}, or plain UTF-8 text (its id is then
topic-partition-offset). Every input ends as exactly one result or one dead letter, whatever its
bytes: nothing a producer sends may stop a partition (a JSON nesting deep enough to overflow the
parser, a number too long to convert, a payload that would make an oversized dead letter).
"""

from __future__ import annotations

import base64
import hashlib
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


MAX_ID_CHARS = 256  # an id travels in every result: a long one could outgrow the producer's limit
MAX_PAYLOAD_BYTES = 64 * 1024
"""How much of the original payload a dead letter carries: with JSON escaping at most about six
times that, well within the producer's max_request_size (1 MiB by default)."""
MAX_EXCEPTION_CHARS = 1000


def parse(value: bytes | None, source: Source, max_chars: int) -> TextMessage | Rejected:
    """The message, or why it is rejected. Never raises: whatever a producer sent, an
    unexpected failure here is a dead letter `bad_message`, not a worker that dies on it and
    on every restart after."""
    try:
        return _parse(value, source, max_chars)
    except Exception:
        return Rejected("bad_message")


def _parse(value: bytes | None, source: Source, max_chars: int) -> TextMessage | Rejected:
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
        except (ValueError, RecursionError):  # malformed, a number too long, nesting too deep
            return Rejected("bad_json")
        if not isinstance(body, dict):
            return Rejected("not_an_object")
        text = body.get("text")
        if not isinstance(text, str):
            return Rejected("missing_text")
        message_id = str(body["id"]) if body.get("id") is not None else default_id
        if len(message_id) > MAX_ID_CHARS:
            return Rejected("id_too_long")
    else:
        text, message_id = decoded, default_id
    if not is_unicode(text):
        return Rejected("invalid_unicode")
    if not text.strip():
        return Rejected("empty_text")
    if len(text) > max_chars:
        return Rejected("text_too_long")
    return TextMessage(message_id, text)


def is_unicode(text: str) -> bool:
    """False for a text with a lone surrogate (JSON's "\\ud800" decodes to one): it is no
    Unicode text, no tokenizer can read it, and no UTF-8 can carry it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


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
    value: bytes | None,
    reason: str,
    source: Source,
    error: BaseException | None = None,
    max_payload_bytes: int = MAX_PAYLOAD_BYTES,
) -> bytes:
    """The original payload travels along: as text when it is UTF-8, else base64, its first
    `max_payload_bytes` at most, with the original length and sha256 so that whoever replays
    the dead letters can tell it was cut and find the original. An error adds the exception's
    type and message."""
    payload: str | None = None
    encoding = "utf-8"
    letter: dict[str, Any] = {"error": reason, "source": source.as_dict()}
    if value is not None:
        kept = value[:max_payload_bytes]
        try:
            value.decode("utf-8")
            payload = kept.decode("utf-8", errors="ignore")  # a character cut at the end
        except UnicodeDecodeError:
            payload, encoding = base64.b64encode(kept).decode(), "base64"
        if len(value) > max_payload_bytes:
            letter["payload_truncated"] = True
            letter["payload_bytes"] = len(value)
            letter["payload_sha256"] = hashlib.sha256(value).hexdigest()
    letter["payload"] = payload
    letter["payload_encoding"] = encoding
    if error is not None:
        message = str(error)[:MAX_EXCEPTION_CHARS]
        letter["exception"] = {"type": type(error).__name__, "message": message}
    # An exception's message may quote a lone surrogate: written as its JSON escape, not lost.
    return json.dumps(letter, ensure_ascii=False).encode("utf-8", errors="backslashreplace")
