"""The message contract, without a broker: what is scored and what is dead-lettered, and why."""

from __future__ import annotations

import base64
import json

import pytest

from kafka_worker.messages import (
    Rejected,
    Source,
    TextMessage,
    dead_letter_value,
    parse,
    result_value,
)
from runners.prediction import Prediction

SOURCE = Source("sentiment-requests", 2, 41)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b'{"id": "a1", "text": "Great film"}', TextMessage("a1", "Great film")),
        (b'{"id": 7, "text": "Great film"}', TextMessage("7", "Great film")),
        (b'{"text": "no id"}', TextMessage("sentiment-requests-2-41", "no id")),
        (
            "plain UTF-8 text, déjà vu".encode(),
            TextMessage("sentiment-requests-2-41", "plain UTF-8 text, déjà vu"),
        ),
        (None, Rejected("empty_message")),
        (b"\xff\xfe\x00", Rejected("not_utf8")),
        (b'{"id": "a1", "text": ', Rejected("bad_json")),
        (b'["a", "list"]', Rejected("not_an_object")),
        (b'{"id": "a1"}', Rejected("missing_text")),
        (b'{"id": "a1", "text": 5}', Rejected("missing_text")),
        (b'{"id": "a1", "text": "  \\n "}', Rejected("empty_text")),
        (b"   ", Rejected("empty_text")),
        (b"x" * 101, Rejected("text_too_long")),
    ],
)
def test_parse(value: bytes | None, expected: TextMessage | Rejected) -> None:
    assert parse(value, SOURCE, max_chars=100) == expected


def test_result_carries_id_sentiment_model_and_source() -> None:
    value = json.loads(
        result_value(
            TextMessage("a1", "Great"),
            Prediction("POSITIVE", 0.97),
            {"name": "sentiment", "version": "v1", "backend": "onnx"},
            SOURCE,
        )
    )
    assert value == {
        "id": "a1",
        "sentiment": {"label": "POSITIVE", "score": 0.97},
        "model": {"name": "sentiment", "version": "v1", "backend": "onnx"},
        "source": {"topic": "sentiment-requests", "partition": 2, "offset": 41},
    }


def test_dead_letter_keeps_the_original_payload() -> None:
    text = json.loads(dead_letter_value(b"{oops", "bad_json", SOURCE))
    assert (text["error"], text["payload"], text["payload_encoding"]) == (
        "bad_json",
        "{oops",
        "utf-8",
    )
    binary = json.loads(dead_letter_value(b"\xff\xfe", "not_utf8", SOURCE))
    assert base64.b64decode(binary["payload"]) == b"\xff\xfe"
    assert binary["payload_encoding"] == "base64" and binary["source"]["offset"] == 41
