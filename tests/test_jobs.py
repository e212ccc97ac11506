"""The job store, one suite for both databases (SQLite, and a real PostgreSQL): jobs and results
survive reopening, workers claim disjoint chunks under leases and take over expired ones, a
result is stored once whatever the workers do, and deleted or expired jobs leave nothing."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
import trustme

from kubesentiment.jobs.store import (
    Chunk,
    Job,
    JobStore,
    QuotaExceeded,
    Quotas,
    StoreFull,
    database_options,
    database_url,
    texts,
)
from kubesentiment.settings import Settings
from runners.prediction import Prediction
from tests.conftest import fresh_database, postgres_cluster

POSITIVE = Prediction("POSITIVE", 0.9)


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return database_url(None, tmp_path / "jobs.db")
    return database_url(fresh_database(request.getfixturevalue("postgres")), Path())


@pytest.fixture
def store(url: str) -> Iterator[JobStore]:
    opened = JobStore(url, lease_seconds=30)
    yield opened
    opened.close()


def save_all(store: JobStore, chunk: Chunk) -> Job | None:
    return store.save(chunk, [POSITIVE] * len(chunk.texts))


def rows(store: JobStore, job_id: str) -> int:
    with store.engine.connect() as db:
        return int(db.scalar(sa.select(sa.func.count()).where(texts.c.job_id == job_id)) or 0)


def test_progress_and_results_survive_a_reopen(url: str) -> None:
    store = JobStore(url)
    job = store.create([f"text {i}" for i in range(10)])
    assert (job.status, job.total, job.done) == ("queued", 10, 0)
    chunk = store.claim("worker-a", 4)
    assert chunk is not None and chunk.texts == [f"text {i}" for i in range(4)]
    saved = store.save(chunk, [POSITIVE] * 4)
    assert saved is not None and (saved.status, saved.done) == ("running", 4)
    store.close()

    reopened = JobStore(url)
    rest = reopened.claim("worker-b", 100)
    assert rest is not None and rest.indices == list(range(4, 10))
    finished = reopened.save(rest, [Prediction("NEGATIVE", 0.8)] * 6)
    assert finished is not None and finished.status == "completed" and finished.done == 10
    assert reopened.claim("worker-b", 100) is None
    page = reopened.results(job.id, offset=3, limit=2)
    assert [(r.index, r.label) for r in page] == [(3, "POSITIVE"), (4, "NEGATIVE")]
    assert reopened.get("unknown") is None
    reopened.close()


def test_workers_claim_disjoint_chunks_oldest_job_first(store: JobStore) -> None:
    first = store.create(["a", "b", "c"])
    second = store.create(["d"])
    one, two, three = (store.claim(worker, 2) for worker in ("w1", "w2", "w3"))
    assert one is not None and (one.job_id, one.texts) == (first.id, ["a", "b"])
    assert two is not None and (two.job_id, two.texts) == (first.id, ["c"])
    assert three is not None and (three.job_id, three.texts) == (second.id, ["d"])
    assert store.claim("w4", 2) is None  # everything is leased
    assert store.get(first.id).status == "running"  # type: ignore[union-attr]


def test_an_expired_lease_is_taken_over_and_the_result_stored_once(url: str) -> None:
    store = JobStore(url, lease_seconds=0.2)
    job = store.create(["a", "b"])
    dead = store.claim("dead-worker", 2)  # its worker dies without saving
    assert dead is not None and store.claim("w2", 2) is None
    time.sleep(0.3)
    taken = store.claim("w2", 2)
    assert taken is not None and taken.indices == dead.indices
    assert (store.save(taken, [POSITIVE] * 2) or job).done == 2
    # The first worker was only slow: its late save must neither overwrite nor count twice.
    late = store.save(dead, [Prediction("NEGATIVE", 0.6)] * 2)
    assert late is not None and (late.status, late.done) == ("completed", 2)
    assert [r.label for r in store.results(job.id, 0, 10)] == ["POSITIVE", "POSITIVE"]
    store.close()


def test_renewing_keeps_a_chunk_from_being_taken(url: str) -> None:
    store = JobStore(url, lease_seconds=0.3)
    store.create(["a"])
    chunk = store.claim("slow-worker", 1)
    assert chunk is not None
    for _ in range(3):
        time.sleep(0.15)
        store.renew(chunk, "slow-worker")
        assert store.claim("other", 1) is None
    store.close()


def test_a_failed_job_keeps_its_reason(store: JobStore) -> None:
    job = store.create(["a"])
    store.fail(job.id, "RuntimeError: boom")
    failed = store.get(job.id)
    assert failed is not None and (failed.status, failed.error) == ("failed", "RuntimeError: boom")
    assert store.claim("w", 10) is None


def test_delete_removes_the_job_and_every_text(store: JobStore) -> None:
    running = store.create(["a", "b", "c"])
    kept = store.create(["d"])
    chunk = store.claim("w", 2)
    assert chunk is not None and chunk.job_id == running.id
    assert store.delete(running.id) is True
    assert store.get(running.id) is None and rows(store, running.id) == 0
    assert store.delete(running.id) is False  # unknown now
    assert save_all(store, chunk) is None  # the loop sees it gone
    assert rows(store, running.id) == 0 and rows(store, kept.id) == 1


def test_purge_deletes_only_finished_jobs_older_than_the_cutoff(store: JobStore) -> None:
    completed = store.create(["a"])
    chunk = store.claim("w", 1)
    assert chunk is not None and save_all(store, chunk) is not None
    failed = store.create(["b"])
    store.fail(failed.id, "RuntimeError: boom")
    queued = store.create(["c"])
    assert store.purge(finished_before=time.time() - 60) == []  # all younger than a minute
    assert sorted(store.purge(finished_before=time.time() + 1)) == sorted([completed.id, failed.id])
    assert rows(store, completed.id) == 0 and rows(store, failed.id) == 0
    assert store.get(queued.id) is not None  # unfinished work is never expired


def test_a_database_from_before_versioning_is_upgraded_in_place(tmp_path: Path) -> None:
    """A jobs.db written by the store before Alembic (its hand-written schema) keeps its jobs."""
    db = tmp_path / "jobs.db"
    with sqlite3.connect(db) as old:
        old.executescript(
            """
            CREATE TABLE jobs (id TEXT PRIMARY KEY, status TEXT NOT NULL, total INTEGER NOT NULL,
                done INTEGER NOT NULL DEFAULT 0, created REAL NOT NULL, updated REAL NOT NULL,
                error TEXT);
            CREATE TABLE job_texts (job_id TEXT NOT NULL, idx INTEGER NOT NULL,
                text TEXT NOT NULL, label TEXT, score REAL, PRIMARY KEY (job_id, idx))
                WITHOUT ROWID;
            INSERT INTO jobs VALUES ('old', 'running', 2, 1, 1.0, 1.0, NULL);
            INSERT INTO job_texts VALUES ('old', 0, 'x', 'POSITIVE', 0.9),
                ('old', 1, 'y', NULL, NULL);
            """
        )
    store = JobStore(database_url(None, db))
    chunk = store.claim("w", 10)
    assert chunk is not None and (chunk.job_id, chunk.texts) == ("old", ["y"])
    finished = store.save(chunk, [POSITIVE])
    assert finished is not None and (finished.status, finished.done) == ("completed", 2)
    store.close()


def test_deleting_a_job_while_its_chunk_is_saved_does_not_deadlock_on_postgresql(
    postgres: str,
) -> None:
    """The race, forced in the order that deadlocked: a third connection holds the job's row,
    DELETE queues for it first, then the chunk's save arrives (it used to lock the chunk's texts
    before queueing for the job's row); then the row is let go. Each must finish without
    PostgreSQL's deadlock detector killing one: delete wins, save finds the job gone."""
    url = fresh_database(postgres)
    store = JobStore(database_url(url, Path()))
    try:
        job = store.create([f"text {i}" for i in range(40)])
        chunk = store.claim("worker", 20)
        assert chunk is not None
        outcomes: dict[str, object] = {}

        def run(name: str, work: Callable[[], object]) -> None:
            try:
                outcomes[name] = work()
            except Exception as err:  # what the test reports
                outcomes[name] = err

        with psycopg.connect(url) as holder:
            holder.execute("SELECT id FROM jobs WHERE id = %s FOR UPDATE", (job.id,))
            deleting = threading.Thread(target=run, args=("delete", lambda: store.delete(job.id)))
            deleting.start()
            time.sleep(0.5)  # DELETE is queued for the job's row
            saving = threading.Thread(
                target=run, args=("save", lambda: store.save(chunk, [POSITIVE] * 20))
            )
            saving.start()
            time.sleep(0.5)
            holder.commit()  # let go of the row: the two transactions meet
        deleting.join(30)
        saving.join(30)
        assert outcomes == {"delete": True, "save": None}
        assert store.get(job.id) is None and store.results(job.id, 0, 100) == []
    finally:
        store.close()


def test_a_refused_text_fails_alone_is_never_claimed_and_counts_as_done(store: JobStore) -> None:
    job = store.create(["fine", "far too long", "dull"], refused={1: "text_too_long: 9000 tokens"})
    assert (job.status, job.done) == ("queued", 1)
    chunk = store.claim("worker", 10)
    assert chunk is not None and chunk.indices == [0, 2]
    saved = store.save(chunk, [POSITIVE, POSITIVE])
    assert saved is not None and (saved.status, saved.done) == ("completed", 3)
    results = store.results(job.id, 0, 10)
    assert [(r.index, r.label, r.error) for r in results] == [
        (0, "POSITIVE", None),
        (1, None, "text_too_long: 9000 tokens"),
        (2, "POSITIVE", None),
    ]
    only_refused = store.create(["x"], refused={0: "text_too_long"})
    assert only_refused.status == "completed" and store.claim("worker", 10) is None


def test_keys_take_turns_and_each_key_runs_its_oldest_job_first(store: JobStore) -> None:
    big = store.create([f"a{i}" for i in range(10)], owner="alpha")
    later = store.create(["a-later"], owner="alpha")
    first = store.claim("w", 2)
    assert first is not None and first.job_id == big.id
    small = store.create(["b0", "b1", "b2"], owner="beta")
    # beta has not had a turn: it goes next, then alpha (its oldest job), then beta again.
    turns = [store.claim("w", 2) for _ in range(3)]
    assert [(c.job_id, c.texts) for c in turns if c] == [
        (small.id, ["b0", "b1"]),
        (big.id, ["a2", "a3"]),
        (small.id, ["b2"]),
    ]
    assert later.owner == "alpha" and store.get(later.id).owner == "alpha"  # type: ignore[union-attr]


def test_quotas_bound_each_keys_unfinished_texts_and_bytes_and_the_whole_store(url: str) -> None:
    store = JobStore(url, quotas=Quotas(texts_per_key=5, bytes_per_key=60, bytes_in_all=100))
    store.create(["ten bytes."] * 3, owner="alpha")  # 3 texts, 30 bytes
    with pytest.raises(QuotaExceeded) as texts_over:
        store.create(["ten bytes."] * 3, owner="alpha")
    assert texts_over.value.setting == "JOB_QUOTA_TEXTS" and not texts_over.value.never
    # A refused text is done from the start: it takes no room in the queue.
    store.create(["ten bytes."] * 3, refused={0: "text_too_long"}, owner="alpha")  # 5, 60 bytes
    with pytest.raises(QuotaExceeded) as bytes_over:
        store.create(["x"], owner="alpha")
    assert bytes_over.value.setting == "JOB_QUOTA_TEXTS"
    finished = store.claim("w", 10)
    assert finished is not None and save_all(store, finished) is not None
    # alpha's first job is done: the texts quota has room, but its bytes stay until deleted.
    with pytest.raises(QuotaExceeded, match="JOB_QUOTA_BYTES") as stored:
        store.create(["ten bytes."], owner="alpha")
    with pytest.raises(QuotaExceeded) as alone:
        store.create(["x" * 61], owner="beta")
    assert stored.value.setting == "JOB_QUOTA_BYTES" and alone.value.never
    store.create(["ten bytes."] * 3, owner="beta")  # 90 bytes in all
    with pytest.raises(StoreFull, match="JOBS_MAX_STORED_BYTES"):
        store.create(["ten bytes."] * 2)  # auth off: no key quota, the store's bound still holds
    store.delete(finished.job_id)
    store.create(["ten bytes."] * 2, owner="alpha")  # deleting made room
    with store.engine.connect() as db:
        assert db.scalar(sa.select(sa.func.count()).select_from(texts)) == 8
    store.close()


def test_a_page_of_a_running_job_ends_at_the_first_text_not_scored(store: JobStore) -> None:
    job = store.create([f"t{i}" for i in range(6)])
    early, late = store.claim("w1", 2), store.claim("w2", 2)
    assert early is not None and late is not None
    save_all(store, late)  # texts 2 and 3 finish before 0 and 1
    assert store.results(job.id, 0, 10) == []
    assert [r.index for r in store.results(job.id, 0, 10, in_order=False)] == [2, 3]
    save_all(store, early)
    assert [r.index for r in store.results(job.id, 0, 10)] == [0, 1, 2, 3]
    assert [r.index for r in store.results(job.id, 1, 2)] == [1, 2]


def test_postgresql_over_verified_tls_and_a_server_the_ca_did_not_sign_refused(
    tmp_path: Path,
) -> None:
    ours, theirs = trustme.CA(), trustme.CA()
    server = ours.issue_cert("127.0.0.1")
    tls = (
        b"".join(blob.bytes() for blob in server.cert_chain_pems),
        server.private_key_pem.bytes(),
    )
    for name, ca in (("ours.pem", ours), ("theirs.pem", theirs)):
        ca.cert_pem.write_to_path(str(tmp_path / name))

    def options(ca_file: str) -> dict[str, str]:
        tls_settings = Settings(
            jobs_database_sslmode="verify-full", jobs_database_sslrootcert=tmp_path / ca_file
        )
        return database_options(tls_settings)

    with postgres_cluster(15435, tls=tls) as url:
        store = JobStore(database_url(url, Path()), options=options("ours.pem"))
        job = store.create(["over TLS"])
        with store.engine.connect() as db:
            in_use = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
            assert db.exec_driver_sql(in_use).scalar() is True
        assert store.get(job.id) is not None
        store.close()
        impostor = JobStore(
            database_url(url, Path()), migrate_now=False, options=options("theirs.pem")
        )
        with pytest.raises(sa.exc.OperationalError, match="certificate verify failed"):
            impostor.migrate()
        impostor.close()


def test_a_session_idle_inside_a_transaction_is_ended_by_postgresql(postgres: str) -> None:
    """A replica killed inside a transaction keeps its row locks until PostgreSQL ends the
    session (tests/test_deploy_pods.py kills one mid-job): ours ask for that to happen soon."""
    store = JobStore(database_url(fresh_database(postgres), Path()))
    with store.engine.connect() as db:
        assert db.exec_driver_sql("SHOW idle_in_transaction_session_timeout").scalar() == "30s"
        assert db.exec_driver_sql("SHOW tcp_keepalives_idle").scalar() == "10"
    store.close()
