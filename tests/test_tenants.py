"""Keys are tenants, against two real `bentoml serve` replicas sharing a real PostgreSQL: a job
belongs to the key that created it, each key's job texts and bytes are bounded, the job loops
take turns between keys, results page through a running job without a gap, and a database
failing mid-request leaves neither texts, keys nor its address in any log line or health answer.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator

import httpx
import psycopg
import pytest

from runners.model_store import StoredModel
from tests.conftest import Server, fresh_database
from tests.test_service import TEXTS

KEYS = {
    "alpha": "alpha-tenant-key-6d0f3b9a2c",
    "beta": "beta-tenant-key-1e8a7c4d5f",
    "gamma": "gamma-tenant-key-93b2e07a1d",
    "ops": "ops-admin-key-5c4f8e2a0b71",
}
SECRET_TEXT = "Tenant canary 7c2e: the harbour at dawn was quietly wonderful"
PASSWORD = "pg-password-41d8e2"  # PostgreSQL trusts loopback: only the logs could show it
PER_KEY_BYTES, STORED_BYTES = 2_000_000, 3_000_000


@pytest.fixture(scope="module")
def database(postgres: str) -> str:
    return fresh_database(postgres)


@pytest.fixture(scope="module")
def replicas(small_model: StoredModel, database: str) -> Iterator[tuple[Server, Server]]:
    url = database.replace("app@", f"app:{PASSWORD}@")

    def replica(port: int) -> Server:
        return Server(
            "service:Sentiment",
            port,
            JOBS_DATABASE_URL=url,
            API_AUTH="true",
            API_KEYS=",".join(f"{name}:{key}" for name, key in KEYS.items()),
            API_ADMIN_KEYS="ops",
            JOB_QUOTA_TEXTS="30000",
            JOB_QUOTA_BYTES=str(PER_KEY_BYTES),
            JOBS_MAX_STORED_BYTES=str(STORED_BYTES),
        )

    one, two = replica(3234).start(), replica(3235).start()
    yield one, two
    one.stop()
    two.stop()


def client(server: Server, key: str) -> httpx.Client:
    return httpx.Client(
        base_url=server.url, headers={"Authorization": f"Bearer {KEYS[key]}"}, timeout=60
    )


def submit(server: Server, key: str, texts: list[str]) -> httpx.Response:
    with client(server, key) as http:
        return http.post("/api/v1/batch/predict", json={"texts": texts})


def status(server: Server, key: str, job_id: str) -> dict:
    with client(server, key) as http:
        answer = http.get(f"/api/v1/batch/status/{job_id}")
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def eventually(condition: Callable[[], bool], what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not {what} within {timeout} s"
        time.sleep(0.2)


def test_another_keys_job_is_404_as_an_unknown_one_and_an_admin_key_sees_it(
    replicas: tuple[Server, Server],
) -> None:
    one, two = replicas
    job_id = submit(one, "alpha", TEXTS).json()["job_id"]
    eventually(lambda: status(two, "alpha", job_id)["status"] == "completed", "completed")
    unknown = "0" * 32
    with client(two, "beta") as beta:
        for path in ("/api/v1/batch/status/{}", "/api/v1/batch/results/{}"):
            theirs, nobodys = beta.get(path.format(job_id)), beta.get(path.format(unknown))
            assert theirs.status_code == nobodys.status_code == 404
            assert theirs.json()["error"].replace(job_id, unknown) == nobodys.json()["error"]
        assert beta.delete(f"/api/v1/batch/{job_id}").status_code == 404
    with client(one, "ops") as admin:
        assert admin.get(f"/api/v1/batch/results/{job_id}").json()["total"] == len(TEXTS)
    with client(one, "alpha") as alpha:
        assert alpha.delete(f"/api/v1/batch/{job_id}").status_code == 204
        assert alpha.get(f"/api/v1/batch/status/{job_id}").status_code == 404


def test_a_key_over_its_quota_gets_429_and_a_full_store_503(
    replicas: tuple[Server, Server],
) -> None:
    one, two = replicas
    # One "word" of 15,000 letters is one unknown token: bytes to store, next to no scoring.
    blob = "x" * 15_000
    first = submit(one, "gamma", [blob] * 100)  # 1.5 MB of gamma's 2 MB
    assert first.status_code == 202
    over = submit(two, "gamma", [blob] * 40)  # 0.6 MB more
    assert over.status_code == 429 and int(over.headers["Retry-After"]) > 0
    assert "JOB_QUOTA_BYTES" in over.json()["error"]
    beta = submit(two, "beta", [blob] * 66)  # 2.5 MB of the store's 3 MB
    assert beta.status_code == 202
    full = submit(one, "alpha", [blob] * 40)  # alpha is within its quota, the store is not
    assert full.status_code == 503 and "JOBS_MAX_STORED_BYTES" in full.json()["error"]
    too_large = submit(one, "alpha", [blob] * 140)  # over a key's quota on its own
    assert too_large.status_code == 413 and "JOB_QUOTA_BYTES" in too_large.json()["error"]
    with client(one, "gamma") as gamma:
        assert gamma.delete(f"/api/v1/batch/{first.json()['job_id']}").status_code == 204
    assert submit(two, "alpha", [blob] * 40).status_code == 202  # deleting made room
    with client(one, "ops") as admin:  # an admin key deletes any key's job: the store is empty
        for job_id in stored_job_ids(one):
            assert admin.delete(f"/api/v1/batch/{job_id}").status_code == 204


def stored_job_ids(server: Server) -> list[str]:
    """Every job in the store, straight from the database (the API lists none)."""
    url = server.env["JOBS_DATABASE_URL"]
    with psycopg.connect(url) as db:
        return [row[0] for row in db.execute("SELECT id FROM jobs").fetchall()]


def test_a_small_job_of_one_key_finishes_while_another_keys_big_job_runs(
    replicas: tuple[Server, Server],
) -> None:
    one, two = replicas
    big_texts = [f"{TEXTS[i % 4]} {TEXTS[(i + 1) % 4]} (#{i})" for i in range(20_000)]
    big = submit(one, "alpha", big_texts).json()["job_id"]
    eventually(lambda: status(two, "alpha", big)["processed"] > 0, "the big job started")
    small = submit(two, "beta", [f"{TEXTS[i % 4]} [{i}]" for i in range(10)]).json()["job_id"]
    eventually(lambda: status(one, "beta", small)["status"] == "completed", "small job done", 60)
    behind = status(one, "alpha", big)
    print(f"beta's 10 texts done with alpha's job at {behind['processed']} of 20,000")
    assert behind["status"] == "running" and behind["processed"] < 20_000
    with client(one, "alpha") as alpha:
        assert alpha.delete(f"/api/v1/batch/{big}").status_code == 204


def test_paging_a_running_job_returns_every_text_once_in_order(
    replicas: tuple[Server, Server],
) -> None:
    one, two = replicas
    texts = [f"{TEXTS[i % 4]} <{i}>" for i in range(3_000)]
    job_id = submit(one, "beta", texts).json()["job_id"]
    indices: list[int] = []
    pages_while_running = 0
    offset: int | None = 0
    with client(two, "beta") as beta:
        while offset is not None:
            page = beta.get(
                f"/api/v1/batch/results/{job_id}", params={"offset": offset, "limit": 97}
            ).json()
            pages_while_running += page["status"] in ("queued", "running")
            indices += [item["index"] for item in page["results"]]
            assert all(item["text"] == texts[item["index"]] for item in page["results"])
            offset = page["next_offset"]
            if page["status"] in ("queued", "running") and not page["results"]:
                time.sleep(0.05)
    assert indices == list(range(len(texts)))
    assert pages_while_running > 3  # the job really was paged while it ran


def test_a_failing_database_leaves_no_text_key_or_address_in_logs_or_health(
    replicas: tuple[Server, Server], database: str
) -> None:
    """The database fails inside job creation (the INSERT of the texts) and then under the job
    loop (its UPDATEs). The faults are triggers that raise: a full disk or a dropped connection
    cannot be caused on cue, and these reach the same code with the texts in the statement."""
    one, two = replicas
    health_answers: list[str] = []

    def fault(sql: str) -> None:
        with psycopg.connect(database, autocommit=True) as db:
            db.execute(sql)

    fault(
        "CREATE FUNCTION fail() RETURNS trigger AS $$ BEGIN "
        "RAISE EXCEPTION 'simulated disk full'; END $$ LANGUAGE plpgsql"
    )
    fault("CREATE TRIGGER fail_insert BEFORE INSERT ON job_texts EXECUTE FUNCTION fail()")
    refused = submit(one, "alpha", [SECRET_TEXT] * 3)
    assert refused.status_code == 503 and "job store" in refused.json()["error"]
    fault("DROP TRIGGER fail_insert ON job_texts")
    fault("CREATE TRIGGER fail_update BEFORE UPDATE ON job_texts EXECUTE FUNCTION fail()")
    job_id = submit(two, "alpha", [SECRET_TEXT] * 3).json()["job_id"]

    def retrying(server: Server) -> bool:
        answer = httpx.get(server.url + "/api/v1/health", timeout=10)
        health_answers.append(answer.text)
        return answer.status_code == 503

    eventually(lambda: retrying(one) and retrying(two), "health reports the failing loop", 30)
    reported = json.loads(health_answers[-1])["jobs"]["error"]
    assert re.fullmatch(r"[A-Za-z]+Error", reported), reported  # the class, not the message
    fault("DROP TRIGGER fail_update ON job_texts")
    eventually(lambda: status(one, "alpha", job_id)["status"] == "completed", "recovered")
    logs = one.log.read_text() + two.log.read_text()
    assert "simulated disk full" in logs and "Traceback" in logs  # the errors were logged
    port = database.rsplit(":", 1)[1].split("/")[0]
    for where, text in {"logs": logs, "health": "\n".join(health_answers)}.items():
        assert SECRET_TEXT not in text and SECRET_TEXT[:24] not in text, where
        assert PASSWORD not in text, where
        assert f"127.0.0.1:{port}" not in text and f"port {port}" not in text, where
        for key in KEYS.values():
            assert key not in text, where
    assert "simulated disk full" not in "\n".join(health_answers)
