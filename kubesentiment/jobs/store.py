"""Async batch jobs in a SQL database, so that a restart loses neither a job nor its finished work:
SQLite by default (one pod, nothing to install) or PostgreSQL (shared by every replica and
worker), through one SQLAlchemy Core code path. The schema is versioned (migrations/).

Any number of job loops, in any number of processes and pods, share the work: each claims a
chunk of unscored texts under a lease (`FOR UPDATE SKIP LOCKED` on PostgreSQL; SQLite serialises
writers), renews it while scoring, and a chunk whose lease ran out because its worker died is
claimed again by another. A result is written only where none is stored yet, so every text of a
job ends with exactly one result whatever crashes. Finished jobs are deleted after the retention
period (`purge`), or at once on request (`delete`): user text is not kept longer than needed.

With API keys on, keys are tenants: a job belongs to the key that created it (its name, in
`owner`), each key's unfinished texts and stored bytes are bounded (`Quotas`), and the loops take
turns between keys, whichever replica they run in: the next chunk comes from the key whose last
turn is oldest, and within a key from its oldest job.
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

from kubesentiment.settings import Settings
from runners.prediction import Prediction

JobState = Literal["queued", "running", "completed", "failed"]
UNFINISHED = ("queued", "running")
MIGRATIONS = Path(__file__).with_name("migrations")
CONNECT_TIMEOUT_S = 10  # an unreachable database host fails the attempt instead of hanging it
# A replica that dies inside a transaction (SIGKILL, a lost node) holds its row locks, and every
# other replica's claims wait on them, until PostgreSQL drops the session; its TCP connection may
# never say so. These bound that to about half a minute: a session idle inside a transaction is
# ended, and one whose peer is gone is found by keepalives.
SESSION_OPTIONS = (
    "-c idle_in_transaction_session_timeout=30s -c tcp_keepalives_idle=10 "
    "-c tcp_keepalives_interval=5 -c tcp_keepalives_count=3"
)
MIGRATION_LOCK = 7_305_613  # any constant: PostgreSQL's advisory lock id for schema upgrades
MAX_INDEX = 2**31 - 1  # job_texts.idx is an INTEGER
QUOTA_LOCK = 7_305_614  # with a hash of the owner: one key's submissions take turns at its quota

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
    sa.Column("owner", sa.String(64)),
    sa.Column("bytes", sa.BigInteger),
    sa.Column("last_turn", sa.Float),
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
    owner: str | None = None  # the name of the API key that created it; None with auth off
    bytes: int = 0  # of text stored, for the quotas

    @classmethod
    def of(cls, row: sa.Row[Any]) -> Job:
        return cls(**{name: row._mapping[name] for name in JOB_FIELDS})


JOB_FIELDS = tuple(Job.__dataclass_fields__)


@dataclass(frozen=True)
class Quotas:
    """Bounds on what jobs may store (0: no bound). Per key: its unfinished texts and its stored
    bytes, finished jobs included until they expire or are deleted. Service-wide: the bytes of
    every job, kept under the volume the database lives on, so that it never fills up."""

    texts_per_key: int = 0
    bytes_per_key: int = 0
    bytes_in_all: int = 0


class QuotaExceeded(Exception):
    """A key's submission over one of its quotas; `setting` names the quota."""

    def __init__(self, setting: str, used: int, asked: int, limit: int) -> None:
        unit = "texts unfinished" if setting == "JOB_QUOTA_TEXTS" else "bytes stored"
        super().__init__(
            f"job quota exceeded: {used} {unit} and {asked} more asked, over the {limit} a key "
            f"may have ({setting})"
        )
        self.setting = setting
        self.never = asked > limit  # too large on its own: waiting will not help


class StoreFull(Exception):
    """The service-wide bound on stored job bytes (JOBS_MAX_STORED_BYTES) is reached."""


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


def database_options(settings: Settings) -> dict[str, str]:
    """libpq's TLS options from the settings (JOBS_DATABASE_SSLMODE, JOBS_DATABASE_SSLROOTCERT)."""
    options = {
        "sslmode": settings.jobs_database_sslmode,
        "sslrootcert": settings.jobs_database_sslrootcert,
    }
    return {name: str(value) for name, value in options.items() if value is not None}


def create_engine(url: str, options: Mapping[str, str] | None = None) -> sa.Engine:
    """hide_parameters: SQLAlchemy would put the statement's parameters (users' texts) into
    every exception message, and exception messages reach logs. `options`: libpq connection
    parameters (TLS) for PostgreSQL."""
    if not url.startswith("sqlite"):
        return sa.create_engine(
            url,
            pool_pre_ping=True,
            hide_parameters=True,
            connect_args={
                "connect_timeout": CONNECT_TIMEOUT_S,
                "options": SESSION_OPTIONS,
                **(options or {}),
            },
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

    def __init__(
        self,
        url: str,
        lease_seconds: float = 30.0,
        migrate_now: bool = True,
        quotas: Quotas | None = None,
        options: Mapping[str, str] | None = None,
    ) -> None:
        self.engine = create_engine(url, options)
        self.lease_seconds = lease_seconds
        self.quotas = quotas or Quotas()
        self.migrated = False
        if migrate_now:
            self.migrate()

    def migrate(self) -> None:
        migrate(self.engine)
        self.migrated = True

    def create(
        self,
        job_texts: Sequence[str],
        refused: Mapping[int, str] | None = None,
        owner: str | None = None,
    ) -> Job:
        """A queued job of `owner`; the texts at the indices of `refused` fail alone, with that
        reason, and count as done from the start (a job of only those is completed at once).
        Raises QuotaExceeded or StoreFull, and then stores nothing."""
        refused = refused or {}
        now = time.time()
        done = len(refused)
        status: JobState = "completed" if done == len(job_texts) else "queued"
        size = sum(len(text.encode()) for text in job_texts)
        job = Job(uuid.uuid4().hex, status, len(job_texts), done, now, now, None, owner, size)
        with self.engine.begin() as db:
            self._check_quotas(db, job)
            db.execute(jobs.insert().values(**asdict(job)))
            db.execute(
                texts.insert(),
                [
                    {"job_id": job.id, "idx": i, "text": text, "error": refused.get(i)}
                    for i, text in enumerate(job_texts)
                ],
            )
        return job

    def _check_quotas(self, db: sa.Connection, job: Job) -> None:
        """Raise if `job` would take its owner or the service past a quota. On PostgreSQL one
        key's submissions take turns here, so that replicas do not both admit the last room;
        the service-wide bound may be passed by the submissions in flight at once."""
        quotas = self.quotas
        if job.owner is not None:
            if db.dialect.name == "postgresql":
                lock = sa.func.pg_advisory_xact_lock(QUOTA_LOCK, sa.func.hashtext(job.owner))
                db.execute(sa.select(lock))
            left = sa.case((jobs.c.status.in_(UNFINISHED), jobs.c.total - jobs.c.done), else_=0)
            owned = sa.select(
                sa.func.coalesce(sa.func.sum(left), 0),
                sa.func.coalesce(sa.func.sum(jobs.c.bytes), 0),
            ).where(jobs.c.owner == job.owner)
            unfinished, stored = db.execute(owned).one()
            if quotas.texts_per_key and unfinished + job.total - job.done > quotas.texts_per_key:
                raise QuotaExceeded(
                    "JOB_QUOTA_TEXTS", unfinished, job.total - job.done, quotas.texts_per_key
                )
            if quotas.bytes_per_key and stored + job.bytes > quotas.bytes_per_key:
                raise QuotaExceeded("JOB_QUOTA_BYTES", stored, job.bytes, quotas.bytes_per_key)
        if quotas.bytes_in_all:
            stored_in_all = db.scalar(sa.select(sa.func.coalesce(sa.func.sum(jobs.c.bytes), 0)))
            if int(stored_in_all or 0) + job.bytes > quotas.bytes_in_all:
                raise StoreFull(
                    f"the job store is full ({quotas.bytes_in_all} bytes of job texts, "
                    "JOBS_MAX_STORED_BYTES); retry once jobs finish or expire"
                )

    def get(self, job_id: str) -> Job | None:
        with self.engine.connect() as db:
            row = db.execute(sa.select(jobs).where(jobs.c.id == job_id)).first()
        return Job.of(row) if row else None

    def claim(self, owner: str, limit: int) -> Chunk | None:
        """Up to `limit` unscored, unleased texts, now leased to `owner` (a worker): of the key
        whose last turn is oldest, of that key's oldest unfinished job; None when there is
        nothing to claim."""
        now = time.time()
        claimable = sa.and_(
            texts.c.label.is_(None),
            texts.c.error.is_(None),
            sa.or_(texts.c.lease_until.is_(None), texts.c.lease_until < now),
        )
        same_key = jobs.alias("same_key")
        keys_last_turn = (
            sa.select(sa.func.max(sa.func.coalesce(same_key.c.last_turn, 0.0)))
            .where(sa.func.coalesce(same_key.c.owner, "") == sa.func.coalesce(jobs.c.owner, ""))
            .scalar_subquery()
        )
        next_job = (
            sa.select(jobs.c.id)
            .where(
                jobs.c.status.in_(UNFINISHED),
                sa.exists().where(texts.c.job_id == jobs.c.id, claimable),
            )
            .order_by(keys_last_turn, jobs.c.created)
            .limit(1)
        )
        with self.engine.begin() as db:
            job_id = db.scalar(next_job)
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
                .where(jobs.c.id == chunk.job_id)
                .values(
                    last_turn=now,
                    status=sa.case((jobs.c.status == "queued", "running"), else_=jobs.c.status),
                    updated=now,
                )
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

    def results(
        self, job_id: str, offset: int, limit: int, in_order: bool = True
    ) -> list[JobResult]:
        """Up to `limit` finished texts from index `offset` on. `in_order`: only those before
        the first unfinished one, so that a client paging a running job on from the last index
        it got misses none that are scored later (replicas score chunks out of order)."""
        done = sa.or_(texts.c.label.is_not(None), texts.c.error.is_not(None))
        page = texts.c.idx >= offset
        if in_order:
            first_unfinished = (
                sa.select(sa.func.min(texts.c.idx))
                .where(texts.c.job_id == job_id, texts.c.idx >= offset, sa.not_(done))
                .scalar_subquery()
            )
            page = sa.and_(page, texts.c.idx < sa.func.coalesce(first_unfinished, MAX_INDEX))
        with self.engine.connect() as db:
            rows = db.execute(
                sa.select(texts.c.idx, texts.c.text, texts.c.label, texts.c.score, texts.c.error)
                .where(texts.c.job_id == job_id, done, page)
                .order_by(texts.c.idx)
                .limit(limit)
            ).all()
        return [JobResult(*row) for row in rows]

    def close(self) -> None:
        self.engine.dispose()
