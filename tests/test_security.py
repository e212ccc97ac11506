"""Security against real parts: a real OpenBao (Vault API) for secrets, rotation and outages, and
a real `bentoml serve` for API keys, rate limits, the body limit, request ids and JSON logs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from openapi_spec_validator import validate
from pydantic import SecretStr

from kubesentiment.api.keys import InvalidKeys, KeyRing, parse_keys
from kubesentiment.api.rate_limits import RateLimiter
from kubesentiment.settings import Settings
from kubesentiment.vault import SecretWatch, Vault, VaultError, with_vault_secrets
from runners.model_store import StoredModel
from tests.conftest import CANARY_TEXT, OpenBao, Server

KEY_ALPHA = "alpha-key-9f2c41d7e0b35a86"
KEY_BETA = "beta-key-1c7e5f30a9d24b68"
KEY_OLD = "old-key-4b81e6c2f7a0d953"
KEY_NEW = "new-key-e3a70c9d1f5b2864"
TEST_KEYS = (KEY_ALPHA, KEY_BETA, KEY_OLD, KEY_NEW)  # test_log_hygiene looks for these
CANARY_REQUEST_IDS = ("canary-predict", "canary-batch", "canary-job")
BURST = 10


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def predict(server: Server, headers: dict[str, str], text: str = "A fine film.") -> httpx.Response:
    return httpx.post(
        server.url + "/api/v1/predict", json={"text": text}, headers=headers, timeout=30
    )


def eventually(condition: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not {what} within {timeout} s"
        time.sleep(0.25)


# Keys and buckets, in process


def test_key_ring_names_the_key_presented_and_swaps_whole_sets() -> None:
    ring = KeyRing(parse_keys(f"alpha:{KEY_ALPHA}, beta:{KEY_BETA}"))
    assert ring.identify(KEY_ALPHA) == "alpha" and ring.identify(KEY_BETA) == "beta"
    assert ring.identify(KEY_ALPHA[:-1]) is None and ring.identify("") is None
    ring.replace({"beta": KEY_BETA})
    assert ring.identify(KEY_ALPHA) is None and ring.names == ["beta"]


def test_key_ring_skips_short_keys_and_odd_names_without_quoting_the_key(
    capsys: pytest.CaptureFixture[str],
) -> None:
    ring = KeyRing({"short": "abc123", "has space": KEY_BETA, "alpha": KEY_ALPHA})
    assert ring.names == ["alpha"]  # the valid entry loads; the others are skipped, named
    warnings = capsys.readouterr().out
    assert "'short' is shorter" in warnings and "'has space'" in warnings
    assert "abc123" not in warnings and KEY_BETA not in warnings
    ring.replace({"short": "abc123", "alpha": KEY_ALPHA})
    assert capsys.readouterr().out.count("API key skipped") == 1  # once, not at every refresh
    with pytest.raises(InvalidKeys, match="no valid API key"):
        ring.replace({"short": "abc123"})
    assert ring.names == ["alpha"]  # nothing valid: the keys in use stay
    with pytest.raises(InvalidKeys, match="entry 2"):
        parse_keys(f"alpha:{KEY_ALPHA},{KEY_BETA}")


def test_token_bucket_allows_a_burst_then_refills_at_the_rate() -> None:
    limiter = RateLimiter(rate=20, burst=3)
    decisions = [limiter.take("a") for _ in range(4)]
    assert [d.allowed for d in decisions] == [True, True, True, False]
    assert decisions[2].remaining == 0 and decisions[3].headers()["Retry-After"] == "1"
    assert limiter.take("b").allowed  # each client has a bucket of its own
    time.sleep(0.12)  # 20/s: two requests' worth
    assert limiter.take("a").allowed


# Vault, in process


def test_approle_login_reads_the_kafka_and_database_secrets(openbao: OpenBao) -> None:
    openbao.put("kubesentiment/kafka", username="worker", password="kafka-pass-7d1e")
    openbao.put("kubesentiment/jobs-database", url="postgresql://app:pw@db:5432/jobs")
    env = openbao.approle("reader", "kubesentiment/*")
    settings = Settings(
        vault_addr=env["VAULT_ADDR"],
        vault_auth_method="approle",
        vault_role_id=env["VAULT_ROLE_ID"],
        vault_secret_id=SecretStr(env["VAULT_SECRET_ID"]),
        vault_kafka_path="kubesentiment/kafka",
        vault_jobs_database_path="kubesentiment/jobs-database",
    )
    vault = Vault.connect(settings)
    assert with_vault_secrets(settings, vault) == settings  # nothing asked for, nothing read
    resolved = with_vault_secrets(settings, vault, kafka=True, jobs_database=True)
    assert resolved.kafka_sasl_username == "worker"
    assert resolved.kafka_sasl_password is not None
    assert resolved.kafka_sasl_password.get_secret_value() == "kafka-pass-7d1e"
    assert resolved.jobs_database_url is not None
    assert resolved.jobs_database_url.get_secret_value().endswith("@db:5432/jobs")


def test_vault_errors_name_the_path_and_the_reason(openbao: OpenBao) -> None:
    openbao.put("kubesentiment/kafka", username="worker")  # no password
    denied = openbao.approle("other-only", "other/*")
    vault = Vault(
        Settings(
            vault_addr=openbao.url,
            vault_auth_method="approle",
            vault_role_id=denied["VAULT_ROLE_ID"],
            vault_secret_id=SecretStr(denied["VAULT_SECRET_ID"]),
        )
    )
    with pytest.raises(VaultError, match="secret/kubesentiment/kafka: permission denied"):
        vault.read("kubesentiment/kafka")
    root = Vault(Settings(vault_addr=openbao.url, vault_token=SecretStr(OpenBao.ROOT_TOKEN)))
    with pytest.raises(VaultError, match="secret/kubesentiment/nothing: no secret there"):
        root.read("kubesentiment/nothing")
    with pytest.raises(VaultError, match="secret/kubesentiment/kafka: no password field"):
        root.read("kubesentiment/kafka", ("username", "password"))
    with pytest.raises(VaultError, match=r"approle.*failed"):
        Vault(
            Settings(
                vault_addr=openbao.url,
                vault_auth_method="approle",
                vault_role_id="x",
                vault_secret_id=SecretStr("y"),
            )
        )
    with pytest.raises(VaultError, match="Vault unreachable"):
        Vault(Settings(vault_addr="http://127.0.0.1:9", vault_token=SecretStr(OpenBao.ROOT_TOKEN)))


# Vault, through a real `bentoml serve`


def test_a_denied_secret_stops_the_server_with_one_clear_line(
    openbao: OpenBao, small_model: StoredModel, tmp_path: Path
) -> None:
    env = openbao.approle("no-keys", "other/*")
    server = Server(
        "service:Sentiment", 3226, JOBS_DB=str(tmp_path / "j.db"), API_AUTH="true", **env
    )
    with pytest.raises(RuntimeError, match="exited with status 2 before it was ready"):
        server.start()
    assert server.proc is not None and server.proc.returncode == 2
    lines = server.log.read_text().splitlines()
    fatal = [json.loads(line) for line in lines if "cannot start" in line]
    assert len(fatal) == 1, lines
    assert fatal[0]["event"] == (
        "cannot start: Vault secret secret/kubesentiment/api-keys: "
        "permission denied (the token's policies do not allow it)"
    )


def test_keys_rotated_in_vault_apply_without_restart_and_outlive_an_outage(
    openbao: OpenBao, small_model: StoredModel, tmp_path: Path
) -> None:
    openbao.put("kubesentiment/api-keys", ci=KEY_OLD)
    server = Server(
        "service:Sentiment",
        3227,
        JOBS_DB=str(tmp_path / "j.db"),
        API_AUTH="true",
        VAULT_ADDR=openbao.url,
        VAULT_TOKEN=OpenBao.ROOT_TOKEN,
        VAULT_REFRESH="1s",
        VAULT_MAX_STALE="6s",
    ).start()
    try:
        assert predict(server, bearer(KEY_OLD)).status_code == 200
        assert predict(server, bearer(KEY_NEW)).status_code == 403
        # Rotation: the new key is added beside the old one, clients move, the old one goes.
        openbao.put("kubesentiment/api-keys", ci=KEY_OLD, ci_next=KEY_NEW)
        eventually(lambda: predict(server, bearer(KEY_NEW)).status_code == 200, "new key valid")
        assert predict(server, bearer(KEY_OLD)).status_code == 200
        openbao.put("kubesentiment/api-keys", ci_next=KEY_NEW)
        eventually(lambda: predict(server, bearer(KEY_OLD)).status_code == 403, "old key refused")
        # A bad entry (too short) is skipped; the rest load, and Vault answering is not stale.
        openbao.put("kubesentiment/api-keys", ci_next=KEY_NEW, typo="short", ci_more=KEY_OLD)
        eventually(lambda: predict(server, bearer(KEY_OLD)).status_code == 200, "valid rest loads")
        time.sleep(7)  # past VAULT_MAX_STALE
        assert httpx.get(server.url + "/readyz", timeout=10).status_code == 200
        openbao.put("kubesentiment/api-keys", ci_next=KEY_NEW)
        eventually(lambda: predict(server, bearer(KEY_OLD)).status_code == 403, "old key refused")
        metrics = httpx.get(server.url + "/metrics", timeout=10).text
        assert 'kubesentiment_api_requests_total{api_key="ci_next"}' in metrics
        assert KEY_NEW not in metrics

        openbao.stop()  # Vault goes away: the keys read last keep working
        assert predict(server, bearer(KEY_NEW)).status_code == 200
        assert httpx.get(server.url + "/readyz", timeout=10).status_code == 200
        # ... until they are older than VAULT_MAX_STALE: then the pod reports not ready.
        eventually(
            lambda: httpx.get(server.url + "/readyz", timeout=10).status_code == 503, "not ready"
        )
        health = httpx.get(server.url + "/api/v1/health", timeout=10)
        assert health.status_code == 503 and "vault" in health.json()["reason"]
        assert predict(server, bearer(KEY_NEW)).status_code == 200
        assert predict(server, bearer(KEY_OLD)).status_code == 403
    finally:
        server.stop()


# API keys, limits, request ids and logs, through a real `bentoml serve`


@pytest.fixture(scope="module")
def guarded(small_model: StoredModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = Server(
        "service:Sentiment",
        3228,
        JOBS_DB=str(tmp_path_factory.mktemp("guarded") / "jobs.db"),
        API_AUTH="true",
        API_KEYS=f"alpha:{KEY_ALPHA},beta:{KEY_BETA}",
        RATE_LIMIT_PER_SECOND="2",
        RATE_LIMIT_BURST=str(BURST),
        MAX_REQUEST_BYTES="65536",
        ACCESS_LOG="true",  # off by default
        HTTP_COST_PROBE="true",
    )
    yield server.start()
    server.stop()


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/api/v1/predict", {"text": "fine"}),
        ("POST", "/api/v1/predict/batch", {"texts": ["fine"]}),
        ("POST", "/api/v1/batch/predict", {"texts": ["fine"]}),
        ("GET", "/api/v1/batch/status/abc", None),
        ("GET", "/api/v1/model-info", None),
    ],
)
def test_without_a_key_401_with_a_challenge_and_an_unknown_key_403(
    guarded: Server, method: str, path: str, body: object
) -> None:
    missing = httpx.request(method, guarded.url + path, json=body, timeout=30)
    assert missing.status_code == 401
    assert missing.headers["WWW-Authenticate"] == 'Bearer realm="kubesentiment"'
    assert "API key is required" in missing.json()["error"]
    unknown = httpx.request(
        method, guarded.url + path, json=body, headers=bearer(KEY_ALPHA + "x"), timeout=30
    )
    assert unknown.status_code == 403 and unknown.json() == {"error": "unknown API key"}


def test_a_known_key_works_in_either_header(guarded: Server) -> None:
    assert predict(guarded, bearer(KEY_ALPHA)).status_code == 200
    assert predict(guarded, {"X-API-Key": KEY_ALPHA}).status_code == 200
    assert predict(guarded, {"Authorization": f"Basic {KEY_ALPHA}"}).status_code == 401


def test_probes_metrics_and_docs_stay_open(guarded: Server) -> None:
    for path in (
        "/livez",
        "/readyz",
        "/metrics",
        "/api/v1/health",
        "/api/v1/metrics",
        "/docs.json",
    ):
        assert httpx.get(guarded.url + path, timeout=10).status_code == 200, path


def test_the_openapi_document_declares_the_key_schemes(guarded: Server) -> None:
    spec = httpx.get(guarded.url + "/docs.json", timeout=10).json()
    assert spec["components"]["securitySchemes"]["bearerKey"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "Authorization: Bearer <key>",
    }
    predict_op = spec["paths"]["/api/v1/predict"]["post"]
    assert predict_op["security"] == [{"bearerKey": []}, {"headerKey": []}]
    assert {"401", "403", "413", "429"} <= set(predict_op["responses"])
    assert "security" not in spec["paths"]["/api/v1/health"]["get"]
    validate(spec)  # still a valid OpenAPI 3.0 document with the schemes and refusals added


def test_a_burst_over_the_limit_gets_429_then_recovers(guarded: Server) -> None:
    client = httpx.Client(base_url=guarded.url, timeout=10)  # one connection: a quick burst

    def model_info(key: str) -> httpx.Response:
        return client.get("/api/v1/model-info", headers=bearer(key))

    answers = [model_info(KEY_BETA) for _ in range(BURST + 5)]  # 2/s refill: 429 at 11..15
    statuses = [a.status_code for a in answers]
    assert statuses.count(200) >= BURST and 429 in statuses, statuses
    refused = next(a for a in answers if a.status_code == 429)
    assert refused.headers["RateLimit-Limit"] == str(BURST)
    assert refused.headers["RateLimit-Remaining"] == "0"
    assert int(refused.headers["Retry-After"]) >= 1
    assert "rate limit" in refused.json()["error"]
    assert model_info(KEY_ALPHA).status_code == 200  # another key's bucket is untouched
    time.sleep(int(refused.headers["Retry-After"]))
    recovered = model_info(KEY_BETA)
    assert recovered.status_code == 200 and int(recovered.headers["RateLimit-Remaining"]) >= 0


def test_a_body_over_the_limit_is_refused_before_it_is_read(guarded: Server) -> None:
    # Declared too large: answered from the headers alone, the body never sent.
    with socket.create_connection(("127.0.0.1", guarded.port), timeout=10) as conn:
        conn.sendall(
            b"POST /api/v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {KEY_ALPHA}\r\nContent-Length: 50000000\r\n\r\n".encode()
        )
        answer = b""
        while not answer.endswith(b"}"):  # the head and the JSON body may come apart
            answer += conn.recv(4096)
    assert answer.startswith(b"HTTP/1.1 413"), answer
    assert b"MAX_REQUEST_BYTES" in answer

    # Streamed without a length (chunked): cut off once past the limit.
    def chunks() -> Iterator[bytes]:
        yield b'{"text": "'
        for _ in range(100):
            yield b"a" * 4096

    chunked = httpx.post(
        guarded.url + "/api/v1/predict",
        content=chunks(),
        headers={"Content-Type": "application/json", **bearer(KEY_ALPHA)},
        timeout=30,
    )
    assert chunked.status_code == 413 and "MAX_REQUEST_BYTES" in chunked.json()["error"]
    assert predict(guarded, bearer(KEY_ALPHA)).status_code == 200  # and the server is fine


def test_request_ids_are_returned_and_on_every_json_log_line(guarded: Server) -> None:
    sent = predict(guarded, {**bearer(KEY_ALPHA), "X-Request-ID": "sec-req-1"})
    assert sent.headers["X-Request-ID"] == "sec-req-1"
    made = predict(guarded, bearer(KEY_ALPHA)).headers["X-Request-ID"]
    assert len(made) == 32 and made != "sec-req-1"
    odd = predict(guarded, {**bearer(KEY_ALPHA), "X-Request-ID": "has spaces;and=more"})
    assert odd.headers["X-Request-ID"] != "has spaces;and=more"  # not copied into our logs
    refused = predict(guarded, {"X-Request-ID": "sec-req-2"})
    assert refused.status_code == 401 and refused.headers["X-Request-ID"] == "sec-req-2"

    time.sleep(0.5)  # the access log line is written after the answer
    lines = [json.loads(line) for line in guarded.log.read_text().splitlines() if line.strip()]
    first = [line for line in lines if line.get("request_id") == "sec-req-1"]
    access = [line for line in first if line.get("logger") == "bentoml.access"]
    assert len(access) == 1 and access[0]["api_key"] == "alpha"
    assert "path=/api/v1/predict" in access[0]["event"]
    second = {line["event"] for line in lines if line.get("request_id") == "sec-req-2"}
    assert "request refused" in second and any("status=401" in e for e in second)
    assert all("request_id" in line for line in lines if line.get("logger") == "bentoml.access")


def test_no_model_probe_takes_the_path_of_predict_but_the_model(guarded: Server) -> None:
    """The benchmarks' HTTP cost: the same gate, validation and answer as /predict."""
    url = f"{guarded.url}/api/v1/predict/no-model"
    answer = httpx.post(url, json={"text": "anything"}, headers=bearer(KEY_ALPHA), timeout=10)
    scored = predict(guarded, bearer(KEY_ALPHA))
    assert answer.status_code == 200 and answer.json().keys() == scored.json().keys()
    assert answer.json()["sentiment"]["score"] == 1.0  # a constant: no model was asked
    assert httpx.post(url, json={"text": "anything"}, timeout=10).status_code == 401
    empty = httpx.post(url, json={"text": ""}, headers=bearer(KEY_ALPHA), timeout=10)
    assert empty.status_code == 400
    time.sleep(1.5)  # alpha's bucket refills (2/s) for the tests after this one


def test_canary_text_is_scored_everywhere(guarded: Server) -> None:
    """Sends a text that test_log_hygiene then looks for in every log of the run."""
    headers = bearer(KEY_ALPHA)
    one = httpx.post(
        guarded.url + "/api/v1/predict",
        json={"text": CANARY_TEXT},
        headers={**headers, "X-Request-ID": CANARY_REQUEST_IDS[0]},
        timeout=30,
    )
    batch = httpx.post(
        guarded.url + "/api/v1/predict/batch",
        json={"texts": [CANARY_TEXT, "dull"]},
        headers={**headers, "X-Request-ID": CANARY_REQUEST_IDS[1]},
        timeout=30,
    )
    job = httpx.post(
        guarded.url + "/api/v1/batch/predict",
        json={"texts": [CANARY_TEXT] * 3},
        headers={**headers, "X-Request-ID": CANARY_REQUEST_IDS[2]},
        timeout=30,
    )
    assert (one.status_code, batch.status_code, job.status_code) == (200, 200, 202)
    status = guarded.url + f"/api/v1/batch/status/{job.json()['job_id']}"
    eventually(
        lambda: httpx.get(status, headers=headers, timeout=10).json()["status"] == "completed",
        "job done",
    )


def test_the_kafka_worker_stops_with_one_line_when_vault_is_unreachable(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "VAULT_ADDR": "http://127.0.0.1:9",  # nothing listens on the discard port
        "VAULT_TOKEN": OpenBao.ROOT_TOKEN,
        "VAULT_KAFKA_PATH": "kubesentiment/kafka",
    }
    done = subprocess.run(
        [sys.executable, "-m", "kafka_worker"], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2, done.stdout + done.stderr
    fatal = [json.loads(line) for line in done.stdout.splitlines() if "cannot start" in line]
    assert [line["event"] for line in fatal] == [
        "cannot start: Vault login (token, auth/token) at http://127.0.0.1:9 failed: "
        "Vault unreachable"
    ]


def test_a_short_lived_token_is_renewed_and_replaced_by_a_new_login(openbao: OpenBao) -> None:
    """AppRole tokens that live 3 s, renewable up to 5 s: the watch renews them, logs in again
    near the end of their life, and never misses a read."""
    openbao.put("kubesentiment/api-keys", ci=KEY_OLD)
    env = openbao.approle("short", "kubesentiment/*", token_ttl="3s", token_max_ttl="5s")
    vault = Vault(
        Settings(
            vault_addr=env["VAULT_ADDR"],
            vault_auth_method="approle",
            vault_role_id=env["VAULT_ROLE_ID"],
            vault_secret_id=SecretStr(env["VAULT_SECRET_ID"]),
            vault_refresh=timedelta(seconds=1),
        )
    )
    ring = KeyRing()
    watch = SecretWatch(vault, "kubesentiment/api-keys", ring.replace).start()
    try:
        first_token = vault.client.token
        assert ring.identify(KEY_OLD) == "ci"
        time.sleep(8)  # beyond the first token's max TTL
        assert vault.client.token != first_token and watch.error is None
        openbao.put("kubesentiment/api-keys", ci_next=KEY_NEW)
        eventually(lambda: ring.identify(KEY_NEW) == "ci_next", "read with the new token", 5)
        assert watch.error is None and watch.stale is None
    finally:
        watch.stop()
