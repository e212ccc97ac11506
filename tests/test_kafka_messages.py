"""The message contract, without a broker: what is scored and what is dead-lettered, and why."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Sequence

import pytest

from kafka_worker.isolation import CANARY, ModelFailure, score_each, score_isolating_failures
from kafka_worker.messages import (
    INFERENCE_ERROR,
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
        # Valid JSON whose text holds a lone surrogate: no Unicode, no tokenizer reads it.
        (b'{"id": "x", "text": "great \\ud800 film"}', Rejected("invalid_unicode")),
        (b'{"id": "a1"}', Rejected("missing_text")),
        (b'{"id": "a1", "text": 5}', Rejected("missing_text")),
        (b'{"id": "a1", "text": "  \\n "}', Rejected("empty_text")),
        (b"   ", Rejected("empty_text")),
        (b"x" * 101, Rejected("text_too_long")),
        # Hostile: each once stopped a partition (the parser raised, the worker died on it)
        (b"[" * 100_000, Rejected("bad_json")),  # RecursionError
        (b'{"id": ' + b"9" * 5000 + b', "text": "hi"}', Rejected("bad_json")),  # int limit
        (b'{"id": "' + b"i" * 257 + b'", "text": "hi"}', Rejected("id_too_long")),
        (b'{"id": {"a": "b"}, "text": "hi"}', TextMessage("{'a': 'b'}", "hi")),
    ],
)
def test_parse(value: bytes | None, expected: TextMessage | Rejected) -> None:
    assert parse(value, SOURCE, max_chars=100) == expected


def test_any_unexpected_failure_while_parsing_is_a_rejection_not_a_crash() -> None:
    class Exploding(bytes):
        """A fake: stands in for a parser fault that no real payload reproduces reliably."""

        def decode(self, *args: object, **kwargs: object) -> str:
            raise MemoryError("the parser ran out of memory")

    assert parse(Exploding(b"x"), SOURCE, max_chars=100) == Rejected("bad_message")


def test_a_dead_letter_of_a_huge_payload_is_cut_with_its_length_and_hash() -> None:
    """100,000 emoji (400 KB) once made a 1.2 MB dead letter, over the producer's limit."""
    value = ("😍" * 100_000).encode()
    letter = dead_letter_value(value, "text_too_long", SOURCE, max_payload_bytes=65_536)
    assert len(letter) < 70_000
    parsed = json.loads(letter)
    assert parsed["payload_truncated"] is True and parsed["payload_bytes"] == len(value)
    assert parsed["payload_sha256"] == hashlib.sha256(value).hexdigest()
    assert parsed["payload"] == "😍" * (65_536 // 4) and parsed["payload_encoding"] == "utf-8"
    small = json.loads(dead_letter_value(b"short", "bad_json", SOURCE))
    assert "payload_truncated" not in small and small["payload"] == "short"
    binary = json.loads(dead_letter_value(b"\xff" * 10, "not_utf8", SOURCE, max_payload_bytes=4))
    assert base64.b64decode(binary["payload"]) == b"\xff" * 4 and binary["payload_bytes"] == 10


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


def test_a_dead_letter_keeps_a_lone_surrogate_as_its_json_escape() -> None:
    error = TypeError("cannot encode 'great \ud800 film'")
    letter = dead_letter_value(b'{"text": "\\ud800"}', INFERENCE_ERROR, SOURCE, error)
    assert json.loads(letter)["exception"]["message"] == "cannot encode 'great \ud800 film'"


def test_dead_letter_of_an_inference_error_names_the_exception() -> None:
    letter = json.loads(
        dead_letter_value(b"bad", INFERENCE_ERROR, SOURCE, MemoryError("out of memory"))
    )
    assert letter["error"] == "inference_error"
    assert letter["exception"] == {"type": "MemoryError", "message": "out of memory"}
    assert "exception" not in json.loads(dead_letter_value(b"{oops", "bad_json", SOURCE))


class FakeScorer:
    """Raises on any call whose texts include a poison text, or on every call when broken."""

    def __init__(self, poison: set[str], broken: bool = False) -> None:
        self.poison, self.broken = poison, broken
        self.calls: list[list[str]] = []

    def predict(self, texts: Sequence[str]) -> list[Prediction]:
        self.calls.append(list(texts))
        if self.broken or self.poison & set(texts):
            raise ValueError("cannot score")
        return [Prediction("POSITIVE", len(text)) for text in texts]


def test_bisection_isolates_each_poison_text_and_scores_the_rest() -> None:
    texts = [f"text {i}" for i in range(64)]
    scorer = FakeScorer({"text 5", "text 40"})
    outcomes = score_each(scorer, texts)
    failed = [text for text, o in zip(texts, outcomes, strict=True) if isinstance(o, Exception)]
    assert failed == ["text 5", "text 40"]
    assert [o.score for o in outcomes if isinstance(o, Prediction)] == [
        len(t) for t in texts if t not in failed
    ]
    assert len(scorer.calls) <= 1 + 2 * 2 * 6  # the first call, then 2·log2(64) per poison text
    healthy = FakeScorer(set())
    score_each(healthy, texts)
    assert healthy.calls == [texts]


def test_a_batch_of_only_poison_is_dead_lettered_when_the_canary_passes() -> None:
    scorer = FakeScorer({"a", "b"})
    outcomes = score_isolating_failures(scorer, ["a", "b"])
    assert all(isinstance(o, ValueError) for o in outcomes)
    assert scorer.calls[-1] == [CANARY]


def test_a_broken_model_fails_the_batch_instead_of_every_message() -> None:
    with pytest.raises(ModelFailure, match="ValueError: cannot score"):
        score_isolating_failures(FakeScorer(set(), broken=True), ["a", "b", "c"])
