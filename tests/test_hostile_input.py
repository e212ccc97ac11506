"""Valid-looking input that costs a lot cannot stall the service: work is counted in tokens. A
text over MAX_TEXT_TOKENS is refused at once (in a batch job it fails alone), a request over
the whole queue gets 413, and a heavy request within the limits is scored in bounded pieces
while single texts are answered between them. The server runs with the default limits and two
worker processes, as `make run` does."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from kubesentiment.settings import Settings
from runners.model_store import StoredModel
from tests.conftest import Server

PORT = 3231
EMOJI_TEXT = "😍" * 20_000  # 20,000 characters: each emoji becomes its name, ~130,000 tokens
# Ordinary English at the character limit: about 5,000 tokens, within MAX_TEXT_TOKENS
ENGLISH_TEXT = ("The film was long and winding, but it had its moments of real warmth. " * 300)[
    :20_000
]


@pytest.fixture(scope="module")
def defaults(small_model: StoredModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = Server(
        "service:Sentiment",
        PORT,
        SERVICE_WORKERS="2",
        JOBS_DB=str(tmp_path_factory.mktemp("hostile") / "jobs.db"),
    ).start()
    yield server.url
    server.stop()


def post(url: str, path: str, body: object) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = httpx.post(url + path, json=body, timeout=90)
    return response, time.monotonic() - started


def test_two_batches_of_emoji_texts_are_refused_at_once_and_stall_no_one(defaults: str) -> None:
    """The issue's scenario: two /predict/batch of 8 texts of 20,000 emoji at once stalled the
    service (504 after 60 s, single predictions timed out). Now both get a 400 naming the limit
    and the singles sent meanwhile are answered as usual."""
    heavy = {"texts": [EMOJI_TEXT] * 8}
    with ThreadPoolExecutor(2) as pool:
        answers = [pool.submit(post, defaults, "/api/v1/predict/batch", heavy) for _ in range(2)]
        singles = [post(defaults, "/api/v1/predict", {"text": f"Fine film {i}."}) for i in range(5)]
        for response, seconds in (a.result() for a in answers):
            assert response.status_code == 400 and seconds < 60
            assert "texts[0]:" in response.json()["error"]
            assert "MAX_TEXT_TOKENS" in response.json()["error"]
    assert all(r.status_code == 200 and seconds < 2 for r, seconds in singles)
    single, _ = post(defaults, "/api/v1/predict", {"text": EMOJI_TEXT})
    assert single.status_code == 400 and single.json()["error"].startswith("text: ")


def test_heavy_requests_within_the_limits_are_scored_in_pieces_while_singles_get_through(
    defaults: str,
) -> None:
    """Two requests of eight 20,000-character English texts (about 40,000 tokens each) run
    while single predictions keep coming: every single is answered in a small part of the time
    a heavy request takes (it boards between the heavy request's model calls instead of waiting
    behind it), and each heavy request is scored (or refused with 503 when both landed on one
    worker's queue). The bound is relative: the same work takes twice as long on some CPUs."""
    heavy = {"texts": [f"{i} {ENGLISH_TEXT}"[:20_000] for i in range(8)]}
    latencies: list[float] = []
    with ThreadPoolExecutor(2) as pool:
        answers = [pool.submit(post, defaults, "/api/v1/predict/batch", heavy) for _ in range(2)]
        while not all(answer.done() for answer in answers):
            response, seconds = post(defaults, "/api/v1/predict", {"text": "A warm film."})
            assert response.status_code == 200
            latencies.append(seconds)
        results = [answer.result() for answer in answers]
    statuses = sorted(response.status_code for response, _ in results)
    assert statuses in ([200, 200], [200, 503]), [r.text[:200] for r, _ in results]
    assert all(seconds < 60 for _, seconds in results)
    heavy_seconds = min(seconds for r, seconds in results if r.status_code == 200)
    assert latencies and max(latencies) < max(2, heavy_seconds / 4), (latencies, heavy_seconds)
    scored = next(r for r, _ in results if r.status_code == 200).json()["results"]
    assert [r["text"][:2] for r in scored] == [f"{i} " for i in range(8)]  # in order, whole


def test_a_request_larger_than_the_whole_queue_gets_413_at_once(defaults: str) -> None:
    limit = Settings.model_fields["max_queued_tokens"].default
    texts = [f"{i} {ENGLISH_TEXT}"[:20_000] for i in range(20)]  # ~100,000 tokens
    response, seconds = post(defaults, "/api/v1/predict/batch", {"texts": texts})
    assert response.status_code == 413 and seconds < 10
    assert f"more than the {limit}" in response.json()["error"]
    assert "MAX_QUEUED_TOKENS" in response.json()["error"]


def test_a_text_over_the_token_limit_fails_alone_in_a_job_and_the_rest_is_scored(
    defaults: str,
) -> None:
    texts = ["A fine film.", EMOJI_TEXT, "A dull one."]
    response, _ = post(defaults, "/api/v1/batch/predict", {"texts": texts})
    assert response.status_code == 202
    job_id = response.json()["job_id"]
    deadline = time.monotonic() + 60
    while (status := httpx.get(f"{defaults}/api/v1/batch/status/{job_id}").json())[
        "status"
    ] != "completed":
        assert time.monotonic() < deadline and status["status"] != "failed", status
        time.sleep(0.2)
    results = httpx.get(f"{defaults}/api/v1/batch/results/{job_id}").json()["results"]
    assert [r["index"] for r in results] == [0, 1, 2]
    assert results[1]["sentiment"] is None
    assert results[1]["error"].startswith("text_too_long: ")
    assert "MAX_TEXT_TOKENS" in results[1]["error"]
    assert all(results[i]["sentiment"]["label"] and results[i]["error"] is None for i in (0, 2))
