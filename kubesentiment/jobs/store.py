"""Async batch jobs in a SQL database, so that a restart loses neither a job nor its finished work:
SQLite by default (one pod, nothing to install) or PostgreSQL (shared by every replica and
worker), through one SQLAlchemy Core code path. The schema is versioned (migrations/).

Any number of job loops, in any number of processes and pods, share the work: each claims a
chunk of unscored texts under a lease (`FOR UPDATE SKIP LOCKED` on PostgreSQL; SQLite serialises
writers), renews it while scoring, and a chunk whose lease ran out because its worker died is
claimed again by another. A result is written only where none is stored yet, so every text of a
job ends with exactly one result whatever crashes. Finished jobs are deleted after the retention
period (`purge`), or at once on request (`delete`): user text is not kept longer than needed.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import sqlalchemy as sa
from alembic import command
from alembic.config import Config

from runners.prediction import Prediction

JobState = Literal["queued", "running", "completed", "failed"]
UNFINISHED = ("queued", "running")
MIGRATIONS = Path(__file__).with_name("migrations")
CONNECT_TIMEOUT_S = 10  # an unreachable database host fails the attempt instead of hanging it
MIGRATION_LOCK = 7_305_613  # any constant: PostgreSQL's advisory lock id for schema upgrades

# The tables as the queries see them; migrations/ creates and upgrades them.
schema = sa.MetaData()
jobs = sa.Table(
    "jobs",
    schema,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("status", sa.String(16)),
    sa.Column("total", sa.Integer),
    sa.Column("done", sa.Integer),
    sa.Column("created", sa.Float),
    sa.Column("updated", sa.Float),
    sa.Column("error", sa.Text),
)
texts = sa.Table(
    "job_texts",
    schema,
    sa.Column("job_id", sa.String(32), primary_key=True),
    sa.Column("idx", sa.Integer, primary_key=True),
    sa.Column("text", sa.Text),
    sa.Column("label", sa.String(16)),
    sa.Column("score", sa.Float),
    sa.Column("lease_owner", sa.String(64)),
    sa.Column("lease_until", sa.Float),
    sa.Column("error", sa.Text),
)


@dataclass(frozen=True)
class Job:
    id: str
    status: JobState
    total: int
    done: int
    created: float
    updated: float
    error: str | None


@dataclass(frozen=True)
class Chunk:
    """Texts of one job that one worker has claimed, by index, in input order."""

    job_id: str
    indices: list[int]
    texts: list[str]


@dataclass(frozen=True)
class JobResult:
    """A scored text (label and score), or one that failed alone (error)."""

    index: int
    text: str
    label: str | None
    score: float | None
    error: str | None


def database_url(url: str | None, sqlite_file: Path) -> str:
    """JOBS_DATABASE_URL when set (postgresql://... goes through psycopg 3), else SQLite."""
    if url is None:
        return f"sqlite:///{sqlite_file}"
    return url.replace("postgresql://", "postgresql+psycopg://", 1)


def create_engine(url: str) -> sa.Engine:
    """hide_parameters: SQLAlchemy would put the statement's parameters (users' texts) into
    every exception message, and exception messages reach logs."""
    if not url.startswith("sqlite"):
        return sa.create_engine(
            url,
            pool_pre_ping=True,
            hide_parameters=True,
            connect_args={"connect_timeout": CONNECT_TIMEOUT_S},
        )
    Path(sa.make_url(url).database or "").parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(
        url, hide_parameters=True, connect_args={"check_same_thread": False, "timeout": 30}
    )

    @sa.event.listens_for(engine, "connect")
    def configure(connection: Any, _: Any) -> None:
        connection.isolation_level = None  # SQLAlchemy says when transactions begin, below
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")

    @sa.event.listens_for(engine, "begin")
    def begin_immediate(connection: sa.Connection) -> None:
        # Take the write lock up front: two processes that both read, then both write, would
        # otherwise deadlock into "database is locked" instead of waiting their turn.
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def migrate(engine: sa.Engine) -> None:
    """Bring the schema to the newest revision; replicas that start together take turns."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(sa.select(sa.func.pg_advisory_xact_lock(MIGRATION_LOCK)))
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


class JobStore:
    """`migrate_now=False` connects nothing until `migrate()`: the service starts, and serves
    predictions, while the database is away; its job loop migrates, with backoff, once it can."""

    def __init__(self, url: str, lease_seconds: float = 30.0, migrate_now: bool = True) -> None:
        self.engine = create_engine(url)
        self.lease_seconds = lease_seconds
        self.migrated = False
        if migrate_now:
            self.migrate()

    def migrate(self) -> None:
        migrate(self.engine)
        self.migrated = True

    def create(self, job_texts: Sequence[str], refused: Mapping[int, str] | None = None) -> Job:
        """A queued job; the texts at the indices of `refused` fail alone, with that reason, and
        count as done from the start (a job of only those is completed at once)."""
        refused = refused or {}
        now = time.time()
        done = len(refused)
        status: JobState = "completed" if done == len(job_texts) else "queued"
        job = Job(uuid.uuid4().hex, status, len(job_texts), done, now, now, None)
        with self.engine.begin() as db:
            db.execute(jobs.insert().values(**asdict(job)))
            db.execute(
                texts.insert(),
                [
                    {"job_id": job.id, "idx": i, "text": text, "error": refused.get(i)}
                    for i, text in enumerate(job_texts)
                ],
            )
        return job

    def get(self, job_id: str) -> Job | None:
        with self.engine.connect() as db:
            row = db.execute(sa.select(jobs).where(jobs.c.id == job_id)).first()
        return Job(*row) if row else None

    def claim(self, owner: str, limit: int) -> Chunk | None:
        """Up to `limit` unscored, unleased texts of the oldest unfinished job, now leased to
        `owner`; None when there is nothing to claim."""
        now = time.time()
        claimable = sa.and_(
            texts.c.label.is_(None),
            texts.c.error.is_(None),
            sa.or_(texts.c.lease_until.is_(None), texts.c.lease_until < now),
        )
        oldest = (
            sa.select(jobs.c.id)
            .where(
                jobs.c.status.in_(UNFINISHED),
                sa.exists().where(texts.c.job_id == jobs.c.id, claimable),
            )
            .order_by(jobs.c.created)
            .limit(1)
        )
        with self.engine.begin() as db:
            job_id = db.scalar(oldest)
            if job_id is None or not self._lock_job(db, job_id):
                return None
            rows = db.execute(
                sa.select(texts.c.job_id, texts.c.idx, texts.c.text)
                .where(texts.c.job_id == job_id, claimable)
                .order_by(texts.c.idx)
                .limit(limit)
                .with_for_update(skip_locked=True)
            ).all()
            if not rows:
                return None
            chunk = Chunk(rows[0].job_id, [r.idx for r in rows], [r.text for r in rows])
            self._lease(db, chunk, owner, now)
            db.execute(
                jobs.update()
                .where(jobs.c.id == chunk.job_id, jobs.c.status == "queued")
                .values(status="running", updated=now)
            )
        return chunk

    def renew(self, chunk: Chunk, owner: str) -> None:
        """Keep a chunk that is still being scored (long texts, a slow node) from being taken."""
        with self.engine.begin() as db:
            self._lease(db, chunk, owner, time.time())

    def _lease(self, db: sa.Connection, chunk: Chunk, owner: str, now: float) -> None:
        db.execute(
            texts.update()
            .where(texts.c.job_id == chunk.job_id, texts.c.idx.in_(chunk.indices))
            .values(lease_owner=owner, lease_until=now + self.lease_seconds)
        )

    def save(self, chunk: Chunk, predictions: Sequence[Prediction]) -> Job | None:
        """Store the results of a chunk where none is stored yet (another worker may have
        finished the chunk after our lease ran out), and count them. None when the job was
        deleted meanwhile."""
        stored = 0
        with self.engine.begin() as db:
            if not self._lock_job(db, chunk.job_id):
                return None
            for idx, prediction in zip(chunk.indices, predictions, strict=True):
                stored += db.execute(
                    texts.update()
                    .where(
                        texts.c.job_id == chunk.job_id, texts.c.idx == idx, texts.c.label.is_(None)
                    )
                    .values(
                        label=prediction.label,
                        score=prediction.score,
                        lease_owner=None,
                        lease_until=None,
                    )
                ).rowcount
            done = jobs.c.done + stored
            db.execute(
                jobs.update()
                .where(jobs.c.id == chunk.job_id, jobs.c.status.in_(UNFINISHED))
                .values(
                    done=done,
                    status=sa.case((done >= jobs.c.total, "completed"), else_="running"),
                    updated=time.time(),
                )
            )
        return self.get(chunk.job_id)

    def fail(self, job_id: str, error: str) -> None:
        with self.engine.begin() as db:
            db.execute(
                jobs.update()
                .where(jobs.c.id == job_id)
                .values(status="failed", error=error, updated=time.time())
            )

    def delete(self, job_id: str) -> bool:
        """Remove a job, its texts and its results, whatever its state; False if unknown."""
        with self.engine.begin() as db:
            if not self._lock_job(db, job_id):
                return False
            db.execute(texts.delete().where(texts.c.job_id == job_id))
            db.execute(jobs.delete().where(jobs.c.id == job_id))
        return True

    @staticmethod
    def _lock_job(db: sa.Connection, job_id: str) -> bool:
        """Lock the job's row, first, in every transaction that writes the job and its texts:
        one lock order for claim, save and delete. (Save used to lock texts then the job and
        delete the job then its texts, which deadlocked on PostgreSQL.) False if it is gone.
        SQLite's BEGIN IMMEDIATE serialises writers already; there this is a plain read."""
        query = sa.select(jobs.c.id).where(jobs.c.id == job_id).with_for_update()
        return db.execute(query).first() is not None

    def purge(self, finished_before: float) -> list[str]:
        """Delete completed and failed jobs last updated before `finished_before` (epoch s)."""
        with self.engine.connect() as db:
            expired = db.scalars(
                sa.select(jobs.c.id).where(
                    jobs.c.status.in_(("completed", "failed")), jobs.c.updated < finished_before
                )
            ).all()
        for job_id in expired:
            self.delete(job_id)
        return list(expired)

    def results(self, job_id: str, offset: int, limit: int) -> list[JobResult]:
        with self.engine.connect() as db:
            done = sa.or_(texts.c.label.is_not(None), texts.c.error.is_not(None))
            rows = db.execute(
                sa.select(texts.c.idx, texts.c.text, texts.c.label, texts.c.score, texts.c.error)
                .where(texts.c.job_id == job_id, done, texts.c.idx >= offset)
                .order_by(texts.c.idx)
                .limit(limit)
            ).all()
        return [JobResult(*row) for row in rows]

    def close(self) -> None:
        self.engine.dispose()
