"""The monitoring of deploy/: the Prometheus rules (the chart's single source) pass promtool's
checks and their own unit tests, the Grafana dashboard is well-formed, and every metric and label
that the rules and the dashboard query is really exported by a live service and a live worker."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from devtools.local_kafka import TansuBroker, WorkerProcess, create_topics, produce
from kubesentiment.settings import get_settings
from runners.model_store import StoredModel
from tests.conftest import ROOT, Server

RULES = ROOT / "deploy/helm/kubesentiment/files/prometheus-rules.yaml"
RULE_TESTS = ROOT / "deploy/prometheus/tests.yaml"
DASHBOARD = ROOT / "deploy/grafana/kubesentiment.json"
SERVICE_PORT, BROKER_PORT, WORKER_PORT = 3240, 19240, 9240
# Labels that Prometheus adds to every target (ServiceMonitor/PodMonitor), never the app.
TARGET_LABELS = {"namespace", "pod", "job", "instance", "service", "container", "endpoint_name"}
# Label values the live run cannot produce cheaply; each is documented in the README.
UNPRODUCED = {("kubesentiment_worker_dead_lettered_total", "reason", "inference_error")}
GRAFANA_VARS = {"$__rate_interval": "5m", "$__interval": "1m", "$namespace": ".*"}


def promtool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail(
            "promtool is missing: install Debian's package with "
            "`apt-get install -y --no-install-recommends prometheus` (promtool 2.42)"
        )
    return subprocess.run(
        [binary, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


def load_rules() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(RULES.read_text())
    return loaded


def rules() -> list[dict[str, Any]]:
    return [rule for group in load_rules()["groups"] for rule in group["rules"]]


def load_dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def dashboard_panels() -> list[dict[str, Any]]:
    panels = []
    for panel in load_dashboard()["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # the panels of a collapsed row
    return panels


def dashboard_queries() -> list[str]:
    """Every PromQL of the dashboard, Grafana's variables replaced by values."""
    queries = [
        target["expr"]
        for panel in dashboard_panels()
        if panel["type"] != "row"
        for target in panel["targets"]
    ]
    for variable in load_dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            queries.append(re.sub(r"label_values\(([^,]+),.*\)", r"\1", variable["definition"]))
    for name, value in GRAFANA_VARS.items():
        queries = [q.replace(name, value) for q in queries]
    return queries


def test_the_rules_pass_promtool_check() -> None:
    checked = promtool("check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS" in checked.stdout


def test_the_rules_are_a_plain_groups_mapping_for_the_chart() -> None:
    """The chart puts this file's `groups` into a PrometheusRule with .Files.Get: no templating."""
    loaded = load_rules()
    assert list(loaded) == ["groups"] and isinstance(loaded["groups"], list)
    assert "{{-" not in RULES.read_text() and ".Values" not in RULES.read_text()
    names = [group["name"] for group in loaded["groups"]]
    assert len(names) == len(set(names))


def test_the_rules_pass_their_unit_tests_with_a_firing_and_a_quiet_case_per_alert() -> None:
    tested = promtool("test", "rules", str(RULE_TESTS), cwd=Path(tempfile.gettempdir()))
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout
    fires: set[str] = set()
    quiet: set[str] = set()
    for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check["exp_alerts"] else quiet).add(check["alertname"])
    alerts = {rule["alert"] for rule in rules() if "alert" in rule}
    assert len(alerts) >= 10
    assert alerts - fires == set(), "alerts without a case where they fire"
    assert alerts - quiet == set(), "alerts without a case where they must stay quiet"


def test_the_dashboard_is_well_formed() -> None:
    dashboard = load_dashboard()
    assert dashboard["schemaVersion"] >= 36 and dashboard["uid"] and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = dashboard_panels()
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"]), panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], f"{panel['title']}: no query"
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), f"{panel['title']}: empty query"
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
    covered = " ".join(p["title"].lower() for p in panels)
    for topic in (
        "request rate",
        "latency",
        "batch size",
        "tokens",
        "queue depth",
        "predictions by label",
        "score distribution",
        "worker throughput",
        "lag",
        "dead letters by reason",
        "job progress",
    ):
        assert topic in covered, f"no panel for {topic}"


def test_the_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses each query as a recording rule (no server needed)."""
    rule_file = tmp_path / "dashboard-rules.yaml"
    queries = dashboard_queries()
    rule_file.write_text(
        yaml.safe_dump(
            {
                "groups": [
                    {
                        "name": "dashboard",
                        "rules": [
                            {"record": f"dashboard:q{i}", "expr": q} for i, q in enumerate(queries)
                        ],
                    }
                ]
            }
        )
    )
    checked = promtool("check", "rules", str(rule_file))
    assert checked.returncode == 0, checked.stdout + checked.stderr


# A rough PromQL reader: enough for our own queries.
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}
KEYWORDS |= {"and", "or", "unless", "inf", "nan"}
MATCHER = re.compile(r'([a-zA-Z_]\w*)\s*(=~|!~|!=|=)\s*"([^"]*)"')


def selectors(query: str) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """(metric name, [(label, operator, value)]) of every series selector in a query."""
    query = re.sub(r"\[[^\]]*\]", "", query)  # ranges
    query = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", query)
    found = []
    for match in re.finditer(r"(?<![\w:.$])([a-zA-Z_:][\w:]*)\s*(\{[^}]*\})?(\s*\()?", query):
        name, braces, call = match.groups()
        if call or name.lower() in KEYWORDS:
            continue  # a function or an aggregation, or a keyword
        found.append((name, MATCHER.findall(braces or "")))
    return found


def grouping_labels(query: str) -> set[str]:
    labels: set[str] = set()
    for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", query):
        labels |= {label.strip() for label in group.split(",") if label.strip()}
    return labels


def test_the_promql_reader() -> None:
    query = (
        "sum by (namespace, le) (rate(bentoml_service_request_duration_seconds_bucket"
        '{endpoint=~"/api/v1/predict.*", namespace=~".*"}[5m])) / on (namespace) '
        "kubesentiment:requests:rate5m > 1 and deriv(kubesentiment_worker_lag[15m]) > 0"
    )
    assert selectors(query) == [
        (
            "bentoml_service_request_duration_seconds_bucket",
            [("endpoint", "=~", "/api/v1/predict.*"), ("namespace", "=~", ".*")],
        ),
        ("kubesentiment:requests:rate5m", []),
        ("kubesentiment_worker_lag", []),
    ]
    assert grouping_labels(query) == {"namespace", "le"}


Exported = dict[str, dict[str, set[str]]]  # sample name -> label -> values seen


def scrape(url: str) -> Exported:
    exported: Exported = defaultdict(lambda: defaultdict(set))
    for family in text_string_to_metric_families(httpx.get(url, timeout=5).text):
        for sample in family.samples:
            labels = exported[sample.name]
            for label, value in sample.labels.items():
                labels[label].add(value)
    return exported


@pytest.fixture(scope="module")
def exported(
    small_model: StoredModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Exported]:
    """The metrics of a live service and a live worker after some work of every kind: predictions,
    a batch job, a 400, a 503 (a second request finds the queue full) and 429s (10 requests a
    burst), and Kafka messages of which one is dead-lettered."""
    topics = get_settings().kafka_topics
    broker = TansuBroker(BROKER_PORT).start()
    worker: WorkerProcess | None = None
    worker_url = f"http://127.0.0.1:{WORKER_PORT}"
    server = Server(
        "service:Sentiment",
        SERVICE_PORT,
        JOBS_DB=str(tmp_path_factory.mktemp("monitoring") / "jobs.db"),
        MAX_QUEUED_TOKENS="2000",
        MAX_BATCH_TOKENS="16",
        RATE_LIMIT_PER_SECOND="1",
        RATE_LIMIT_BURST="10",
    )
    try:
        asyncio.run(create_topics(broker.bootstrap, topics))
        messages = [
            (f"k{i}".encode(), json.dumps({"id": f"m{i}", "text": f"Film {i}: warm"}).encode())
            for i in range(20)
        ]
        messages.append((b"broken", b'{"id": "x", "text":'))
        asyncio.run(produce(broker.bootstrap, topics[0], messages))
        worker = WorkerProcess(broker, WORKER_PORT, wait=False)
        server.start()
        api = f"{server.url}/api/v1"
        with httpx.Client(timeout=30) as client:
            job = client.post(f"{api}/batch/predict", json={"texts": ["good", "bad", "fine"]})
            assert job.status_code == 202, job.text
            for text in ("A wonderful film", "A dull, dreary film"):
                assert client.post(f"{api}/predict", json={"text": text}).status_code == 200
            assert (
                client.post(f"{api}/predict/batch", json={"texts": ["x", "y"]}).status_code == 200
            )
            assert client.post(f"{api}/predict", json={"text": ""}).status_code == 400
            # One text per model call (MAX_BATCH_TOKENS): the first request's texts wait long
            # enough for the second to find the queue (MAX_QUEUED_TOKENS) too full for it.
            many = {"texts": [f"a film, number {i}" for i in range(256)]}  # ~1,800 tokens
            with ThreadPoolExecutor(1) as pool:
                first = pool.submit(httpx.post, f"{api}/predict/batch", json=many, timeout=60)
                deadline = time.monotonic() + 30
                while client.get(f"{api}/health").json()["queue"]["interactive_tokens"] < 1000:
                    assert time.monotonic() < deadline, "the first request never queued"
                    time.sleep(0.01)
                overload = client.post(f"{api}/predict/batch", json=many)
                assert overload.status_code == 503, overload.text
                assert first.result().status_code == 200
            codes = [
                client.post(f"{api}/predict", json={"text": "hi"}).status_code for _ in range(20)
            ]
            assert 429 in codes

        def jobs_completed() -> float:
            text = httpx.get(f"{server.url}/metrics", timeout=5).text
            return sum(
                sample.value
                for family in text_string_to_metric_families(text)
                for sample in family.samples
                if sample.name == "kubesentiment_jobs_total"
                and sample.labels.get("event") == "completed"
            )

        deadline = time.monotonic() + 30
        while jobs_completed() < 1:
            assert time.monotonic() < deadline, "the job did not complete"
            time.sleep(0.3)
        worker.wait_until(
            lambda: (
                worker.metric("kubesentiment_worker_consumed_total") >= len(messages)
                and "kubesentiment_worker_lag{" in httpx.get(f"{worker_url}/metrics").text
            ),
            "done with the messages",
        )
        merged: Exported = defaultdict(lambda: defaultdict(set))
        for part in (scrape(f"{server.url}/metrics"), scrape(f"{worker_url}/metrics")):
            for name, labels in part.items():
                into = merged[name]  # a metric without labels is there too
                for label, values in labels.items():
                    into[label] |= values
        yield merged
    finally:
        server.stop()
        if worker is not None:
            worker.stop()
        broker.stop()


@pytest.mark.parametrize("source", ["rules", "dashboard"])
def test_every_queried_metric_and_label_is_exported(exported: Exported, source: str) -> None:
    recorded = {rule["record"] for rule in rules() if "record" in rule}
    queries = [rule["expr"] for rule in rules()] if source == "rules" else dashboard_queries()
    problems = []
    for query in queries:
        inputs = [(name, m) for name, m in selectors(query) if name not in recorded]
        for name, matchers in inputs:
            if name not in exported:
                problems.append(f"{name} is not exported")
                continue
            for label, operator, value in matchers:
                if label in TARGET_LABELS:
                    continue
                seen = exported[name].get(label)
                if not seen:
                    problems.append(f"{name} has no label {label}")
                elif (name, label, value) in UNPRODUCED or operator.startswith("!"):
                    continue
                elif operator == "=" and value not in seen:
                    problems.append(f'{name}{{{label}="{value}"}} not seen; seen {sorted(seen)}')
                elif operator == "=~" and not any(re.fullmatch(value, v) for v in seen):
                    problems.append(f'{name}{{{label}=~"{value}"}} matches none of {sorted(seen)}')
        if len(inputs) == len(selectors(query)):  # only raw metrics: check its grouping too
            available = TARGET_LABELS | {"le"}
            for name, _ in inputs:
                available |= set(exported.get(name, {}))
            for label in grouping_labels(query) - available:
                problems.append(f"grouping by {label}, which none of its metrics has: {query}")
    assert not problems, "\n".join(problems)
