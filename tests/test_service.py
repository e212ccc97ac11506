"""The HTTP API against a real `bentoml serve`: every endpoint, every kind of bad input,
batching under load, overload, back-end agreement and a batch job that survives a restart."""

from __future__ import annotations

import json
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from models.store import StoredModel
from tests.conftest import Server

TEXTS = [
    "I love this movie, it was wonderful!",
    "This was a terrible waste of time.",
    "The plot was thin but the acting carried it.",
    "Dull, slow and far too long.",
]


def post(server: Server, path: str, body: object, **kw: object) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=60, **kw)  # type: ignore[arg-type]


def positive(item: dict) -> float:
    s = item["sentiment"]
    return s["score"] if s["label"] == "POSITIVE" else 1 - s["score"]


def metric_value(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.MULTILINE)
    assert match, f"{name} not in metrics"
    return float(match.group(1))


def test_predict_answers_label_score_and_model(service: Server, small_model: StoredModel) -> None:
    r = post(service, "/api/v1/predict", {"text": TEXTS[0]})
    assert r.status_code == 200
    body = r.json()
    assert body["text"] == TEXTS[0]
    assert body["sentiment"]["label"] in {"POSITIVE", "NEGATIVE"}
    assert 0.5 <= body["sentiment"]["score"] <= 1
    assert body["model"] == {
        "name": "sentiment",
        "version": small_model.version,
        "backend": "onnx-int8",
    }


def test_sync_batch_keeps_input_order_and_matches_single_calls(service: Server) -> None:
    r = post(service, "/api/v1/predict/batch", {"texts": TEXTS})
    assert r.status_code == 200
    results = r.json()["results"]
    assert [x["text"] for x in results] == TEXTS
    singles = [post(service, "/api/v1/predict", {"text": t}).json() for t in TEXTS]
    # int8 activations are quantised per batch, so a text's neighbours move its score a little.
    for batched, single in zip(results, singles, strict=True):
        assert positive(batched) == pytest.approx(positive(single), abs=0.02)


LONG = "x" * 20_001


@pytest.mark.parametrize(
    ("path", "body", "field", "limit"),
    [
        ("/api/v1/predict", {}, "text", "Field required"),
        ("/api/v1/predict", {"text": ""}, "text", "at least 1 character"),
        ("/api/v1/predict", {"text": "  \n\t "}, "text", "whitespace"),
        ("/api/v1/predict", {"text": 42}, "text", "valid string"),
        ("/api/v1/predict", {"text": ["a"]}, "text", "valid string"),
        ("/api/v1/predict", {"text": LONG}, "text", "20000"),
        ("/api/v1/predict/batch", {"texts": []}, "texts", "at least 1 item"),
        ("/api/v1/predict/batch", {"texts": ["ok"] * 257}, "texts", "256"),
        ("/api/v1/predict/batch", {"texts": ["ok", " "]}, "texts.1", "whitespace"),
        ("/api/v1/predict/batch", {"texts": "not a list"}, "texts", "valid array"),
        ("/api/v1/batch/predict", {"texts": ["ok"] * 100_001}, "texts", "100000"),
        ("/api/v1/batch/predict", {"texts": [LONG]}, "texts.0", "20000"),
    ],
)
def test_bad_input_gets_400_naming_field_and_limit(
    service: Server, path: str, body: object, field: str, limit: str
) -> None:
    r = post(service, path, body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error.startswith(f"{field}:") and limit in error, error


def test_malformed_json_and_wrong_content_type_are_4xx(service: Server) -> None:
    r = httpx.post(
        service.url + "/api/v1/predict",
        content=b'{"text": "unterminated',
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 400 and "Invalid JSON" in r.json()["error"]
    r = httpx.post(
        service.url + "/api/v1/predict",
        content=b"text=hello",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert r.status_code == 415 and "application/json" in r.json()["error"]
    r = httpx.post(service.url + "/api/v1/predict", content=json.dumps({"text": "hi"}))
    assert r.status_code == 415  # no Content-Type at all


def test_health_model_info_and_metrics(service: Server, small_model: StoredModel) -> None:
    health = httpx.get(service.url + "/api/v1/health").json()
    assert health["status"] == "ok" and health["model_loaded"] is True
    assert health["model_version"] == small_model.version and health["uptime_seconds"] >= 0
    info = httpx.get(service.url + "/api/v1/model-info").json()
    assert info["tag"] == small_model.tag and info["labels"] == ["NEGATIVE", "POSITIVE"]
    assert info["max_length"] == 128 and set(info["metrics"]) >= {"pytorch", "onnx-int8"}
    post(service, "/api/v1/predict", {"text": "count me"})
    ours = httpx.get(service.url + "/api/v1/metrics")
    assert ours.status_code == 200 and ours.headers["content-type"].startswith("text/plain")
    for name in (
        "kubesentiment_predictions_total",
        "kubesentiment_prediction_score_bucket",
        "kubesentiment_inference_batch_size_bucket",
        "kubesentiment_inference_batch_tokens_bucket",
        "kubesentiment_text_length_chars_bucket",
        "kubesentiment_errors_total",
    ):
        assert name in ours.text
    bentoml_metrics = httpx.get(service.url + "/metrics").text
    assert "bentoml_service_request_total" in bentoml_metrics
    for probe in ("/livez", "/readyz"):
        assert httpx.get(service.url + probe).status_code == 200


def test_errors_are_counted_by_reason(service: Server) -> None:
    def errors(reason: str) -> float:
        text = httpx.get(service.url + "/api/v1/metrics").text
        line = f'kubesentiment_errors_total{{reason="{reason}"}}'
        return metric_value(text, line) if line in text else 0.0

    before = errors("invalid_input")
    post(service, "/api/v1/predict", {"text": ""})
    assert errors("invalid_input") == before + 1


def test_openapi_lists_every_endpoint_with_schemas(service: Server) -> None:
    spec = httpx.get(service.url + "/docs.json").json()
    paths = spec["paths"]
    for path in (
        "/api/v1/predict",
        "/api/v1/predict/batch",
        "/api/v1/batch/predict",
        "/api/v1/batch/status/{job_id}",
        "/api/v1/batch/results/{job_id}",
        "/api/v1/health",
        "/api/v1/model-info",
        "/api/v1/metrics",
    ):
        assert path in paths, path
    predict = paths["/api/v1/predict"]["post"]
    assert "requestBody" in predict and "200" in predict["responses"]
    assert "I love this movie" in json.dumps(spec)  # examples are there


def test_batches_larger_than_one_form_under_concurrent_load(service: Server) -> None:
    def batch_stats() -> tuple[float, float]:
        text = httpx.get(service.url + "/api/v1/metrics").text
        return (
            metric_value(text, "kubesentiment_inference_batch_size_count"),
            metric_value(text, "kubesentiment_inference_batch_size_sum"),
        )

    calls_before, rows_before = batch_stats()
    with ThreadPoolExecutor(32) as pool:
        codes = list(
            pool.map(
                lambda i: (
                    post(service, "/api/v1/predict", {"text": f"{TEXTS[i % 4]} #{i}"}).status_code
                ),
                range(256),
            )
        )
    assert codes == [200] * 256
    calls, rows = batch_stats()
    assert rows - rows_before == 256
    assert (rows - rows_before) / (calls - calls_before) > 1.5  # fewer model calls than texts


def test_overload_gets_a_prompt_503_with_retry_after(service: Server) -> None:
    big = {"texts": [f"{TEXTS[i % 4]} {i}" for i in range(256)]}
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda _: post(service, "/api/v1/predict/batch", big), range(8)))
    codes = sorted(r.status_code for r in responses)
    assert set(codes) <= {200, 503} and 200 in codes and 503 in codes
    refused = next(r for r in responses if r.status_code == 503)
    assert refused.headers["Retry-After"] == "1" and "overloaded" in refused.json()["error"]


def test_unknown_job_is_404_and_bad_paging_is_400(service: Server) -> None:
    r = httpx.get(service.url + "/api/v1/batch/status/nope")
    assert r.status_code == 404 and "nope" in r.json()["error"]
    assert httpx.get(service.url + "/api/v1/batch/results/nope").status_code == 404
    job = post(service, "/api/v1/batch/predict", {"texts": TEXTS}).json()
    r = httpx.get(service.url + f"/api/v1/batch/results/{job['job_id']}?offset=-1")
    assert r.status_code == 400 and "offset" in r.json()["error"]


def wait_for_job(server: Server, job_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = httpx.get(f"{server.url}/api/v1/batch/status/{job_id}").json()
        if status["status"] in ("completed", "failed"):
            return status
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} still {status} after {timeout} s")


def test_batch_job_reports_progress_and_pages_results(service: Server) -> None:
    texts = [f"{TEXTS[i % 4]} ({i})" for i in range(500)]
    r = post(service, "/api/v1/batch/predict", {"texts": texts})
    assert r.status_code == 202
    job = r.json()
    assert job["status"] in ("queued", "running") and job["total"] == 500
    status = wait_for_job(service, job["job_id"])
    assert status["status"] == "completed" and status["processed"] == 500
    assert status["progress"] == 1.0
    page = httpx.get(
        f"{service.url}/api/v1/batch/results/{job['job_id']}", params={"offset": 490, "limit": 50}
    ).json()
    assert [x["index"] for x in page["results"]] == list(range(490, 500))
    assert [x["text"] for x in page["results"]] == texts[490:]
    single = post(service, "/api/v1/predict", {"text": texts[495]}).json()
    assert positive(page["results"][5]) == pytest.approx(positive(single), abs=0.02)


def test_batch_job_survives_a_restart(small_model: StoredModel, tmp_path: Path) -> None:
    db = tmp_path / "jobs.db"
    first = Server("service:Sentiment", 3212, JOBS_DB=str(db)).start()
    texts = [f"{TEXTS[i % 4]} [{i}]" for i in range(20_000)]
    job = post(first, "/api/v1/batch/predict", {"texts": texts}).json()
    while httpx.get(f"{first.url}/api/v1/batch/status/{job['job_id']}").json()["processed"] == 0:
        time.sleep(0.05)
    first.stop(signal.SIGKILL)  # no chance to tidy up
    second = Server("service:Sentiment", 3212, JOBS_DB=str(db)).start()
    try:
        resumed = httpx.get(f"{second.url}/api/v1/batch/status/{job['job_id']}").json()
        assert 0 < resumed["processed"] < 20_000, "the job should be caught half way"
        status = wait_for_job(second, job["job_id"], timeout=300)
        assert status["status"] == "completed" and status["processed"] == 20_000
        indices: list[int] = []
        for offset in range(0, 20_000, 10_000):
            page = httpx.get(
                f"{second.url}/api/v1/batch/results/{job['job_id']}",
                params={"offset": offset, "limit": 10_000},
            ).json()
            indices += [x["index"] for x in page["results"]]
        assert indices == list(range(20_000))
    finally:
        second.stop()


def test_pytorch_and_onnx_back_ends_agree_through_the_api(
    service: Server, jobs_db: Path, tmp_path: Path
) -> None:
    torch_server = Server(
        "service:Sentiment", 3211, BACKEND="pytorch", JOBS_DB=str(tmp_path / "torch-jobs.db")
    ).start()
    try:
        texts = [f"{t} {i}" for i, t in enumerate(TEXTS * 8)]
        onnx = post(service, "/api/v1/predict/batch", {"texts": texts}).json()
        torch = post(torch_server, "/api/v1/predict/batch", {"texts": texts}).json()
    finally:
        torch_server.stop()
    assert torch["model"]["backend"] == "pytorch" and onnx["model"]["backend"] == "onnx-int8"
    for a, b in zip(onnx["results"], torch["results"], strict=True):
        assert positive(a) == pytest.approx(positive(b), abs=0.05)
