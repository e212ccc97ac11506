"""KubeSentiment's HTTP API: the entry service.

request -> Sentiment (this file) -> BatchScheduler (runners/scheduler.py) -> SentimentEngine
(runners/engine.py) -> ONNX Runtime or PyTorch model from the BentoML store (models/).

The model runs inside this process, batched adaptively by the scheduler: on 2 cores an HTTP hop
to a separate runner process costs more than scoring the text (see docs/performance.md). The same
engine also runs as standalone BentoML runner services (runners/services.py) and in the Kafka
worker.
"""

from __future__ import annotations

import asyncio
import gc
import os
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict
from typing import Any, TypeVar

import bentoml
import httpx
import numpy as np
import structlog
from bentoml.exceptions import BentoMLException
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

from kubesentiment.api.errors import ApiErrors, readable
from kubesentiment.api.gate import ApiGate, charge_tokens
from kubesentiment.api.keys import InvalidKeys, KeyRing, key_name, parse_keys
from kubesentiment.api.openapi import OpenApiDocument
from kubesentiment.api.request_ids import RequestIds
from kubesentiment.api.schemas import (
    BackendCheckInfo,
    BatchPredictResponse,
    BatchTexts,
    Health,
    JobLoopHealth,
    JobResultItem,
    JobResults,
    JobStatus,
    JobTexts,
    ModelInfo,
    ModelRef,
    PredictResponse,
    QueueHealth,
    SentimentScore,
    Text,
)
from kubesentiment.jobs.loop import JobLoop
from kubesentiment.jobs.store import (
    Job,
    JobStore,
    QuotaExceeded,
    Quotas,
    StoreFull,
    database_options,
    database_url,
)
from kubesentiment.observability import (
    configure_logging,
    get_metrics,
    hide_in_logs,
    per_request_options,
    render_metrics,
)
from kubesentiment.settings import Settings, get_settings, use_local_models_only
from kubesentiment.vault import SecretWatch, Vault, VaultError, with_vault_secrets
from runners.engine import SentimentEngine
from runners.model_store import StoredModel
from runners.prediction import Prediction
from runners.scheduler import BatchScheduler, Overloaded, Predict, TooMuchWork
from runners.self_check import BackendCheck, load_checked_engine
from runners.services import RUNNER_TOKEN_HEADER, runner_service
from runners.windowing import Windowing

settings = get_settings()
log = structlog.get_logger("kubesentiment")
GC_THRESHOLDS = (100_000, 50, 1000)  # CPython's defaults: (2000, 10, 10)
CLIENT_CLOSED_REQUEST = 499  # nginx's status for it: nobody reads it, the logs and metrics do
MAX_OFFSET = 2**63 - 1  # the largest integer SQLite and PostgreSQL take: more would be a 500
JOB_ID = re.compile(r"[0-9a-f]{32}")  # what JobStore.create makes (uuid4().hex)
QUOTA_RETRY_S = "60"  # jobs progress, finish or are deleted: a minute is a fair first wait
T = TypeVar("T")
INLINE_MEASURE_CHARS = 4096  # longer inputs are tokenised in a thread, off the event loop
# The API keys valid now, shared with the ApiGate middleware; Vault's refresh replaces them.
API_KEYS = KeyRing()
read_api = FastAPI(title="KubeSentiment", description="Health, model, metrics and job results.")


@read_api.exception_handler(StarletteHTTPException)
async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    """The same {"error": ...} body as every other error of the API, routing's 404 and 405 (with
    their Allow header) included."""
    return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)


@read_api.exception_handler(SQLAlchemyError)
async def job_store_failed(_: Request, exc: SQLAlchemyError) -> JSONResponse:
    """The database went away while a job endpoint used it: 503, and the service goes on."""
    return JSONResponse(
        {"error": job_store_unavailable(exc)}, status_code=503, headers={"Retry-After": "5"}
    )


def job_store_unavailable(exc: SQLAlchemyError) -> str:
    """The answer to a client when the database failed: its class, never its message (which
    may name the database's host, user and SQL). The log has the whole error, the database's
    address hidden."""
    log.warning("job store failed", exc_info=exc)
    return f"job store unavailable ({type(exc).__name__}); retry later"


@read_api.exception_handler(RequestValidationError)
async def invalid_query(_: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse(readable({"detail": exc.errors()}), status_code=400)


def error(ctx: bentoml.Context, status: int, reason: str, **headers: str) -> Any:
    """An error answer from an API method. Returned, not raised; BentoML gives a returned response
    the status and headers of `ctx.response`, so they are set there too."""
    ctx.response.status_code = status
    ctx.response.headers.update(headers)
    return JSONResponse({"error": reason}, status_code=status, headers=headers)


def unavailable(ctx: bentoml.Context, reason: str) -> Any:
    """A prompt 503 with Retry-After: overload and shutdown are refused at once, not queued."""
    return error(ctx, 503, reason, **{"Retry-After": "1"})


async def unless_client_leaves(request: Request, work: Awaitable[T]) -> T | None:
    """The result of `work`, or None (and `work` cancelled) if the client disconnects first:
    a client that gave up (a timeout, a closed tab) does not keep a seat in the next batch."""

    async def disconnected() -> None:
        # The body is read already: the next message is the disconnect (or the end of the
        # exchange, when the response is sent).
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, watcher = asyncio.ensure_future(work), asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # the request itself was cancelled (a server timeout)
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    return None


class TextTooLong(ValueError):
    """A text costs more tokens than MAX_TEXT_TOKENS allows."""

    def __init__(self, index: int, tokens: int) -> None:
        super().__init__(index, tokens)
        self.index, self.tokens = index, tokens

    @property
    def reason(self) -> str:
        return (
            f"{self.tokens} tokens after normalisation, more than the "
            f"{settings.max_text_tokens} a text may have (MAX_TEXT_TOKENS)"
        )

    def naming(self, field: str) -> str:
        where = field if field == "text" else f"{field}[{self.index}]"
        return f"{where}: {self.reason}"


def refuse_too_long(costs: Iterable[float]) -> None:
    """Raise TextTooLong for the first text that costs more than MAX_TEXT_TOKENS."""
    for index, cost in enumerate(costs):
        if cost > settings.max_text_tokens:
            raise TextTooLong(index, int(cost))


class OverTokenRate(Exception):
    """The caller has spent its tokens per minute (RATE_LIMIT_TOKENS_PER_MINUTE)."""


def charge(caller: Request | None, tokens: int) -> None:
    """Charge a request's tokens to its caller's bucket, the same count admission control uses;
    job texts (no caller) are bounded by the job quotas instead."""
    if caller is not None and (refusal := charge_tokens(caller, tokens)) is not None:
        raise OverTokenRate(refusal)


def sentiment(label: str, score: float) -> SentimentScore:
    return SentimentScore.model_validate({"label": label, "score": score})


def no_such_job(job_id: str) -> HTTPException:
    """The one 404 of the job endpoints: an unknown id and another key's job answer alike."""
    return HTTPException(404, f"no batch job with id {job_id!r}")


def job_status(job: Job) -> JobStatus:
    return JobStatus(
        job_id=job.id,
        status=job.status,
        total=job.total,
        processed=job.done,
        progress=round(job.done / job.total, 4),
        created_at=job.created,
        updated_at=job.updated,
        error=job.error,
    )


def load_api_keys(vault: Vault | None) -> SecretWatch | None:
    """Fill API_KEYS from Vault (and the watch that re-reads them, returned) or from API_KEYS.
    Auth off: no keys, and a warning that the API is open."""
    if not settings.api_auth:
        ignored = " (API_KEYS is set but not used)" if settings.api_keys else ""
        log.warning(f"API_AUTH is off: anyone who can reach this port can use the API{ignored}")
        return None
    watch = None
    if vault is not None:
        watch = SecretWatch(vault, settings.vault_api_keys_path, API_KEYS.replace)
    elif settings.api_keys is not None:
        API_KEYS.replace(parse_keys(settings.api_keys.get_secret_value()))
    if not API_KEYS.names:
        raise InvalidKeys("API_AUTH is on but there are no API keys (API_KEYS or Vault)")
    log.info("API keys loaded", names=API_KEYS.names, source="vault" if watch else "env")
    return watch


def forget_api_keys() -> None:
    """In a worker, once its key ring holds the keys' digests: drop the keys from the environment
    and the settings, so that nothing the worker runs or prints later (a subprocess, a dump of
    its settings) finds them. `bentoml serve` itself keeps them, to start workers again."""
    global settings
    os.environ.pop("API_KEYS", None)
    get_settings.cache_clear()
    settings = get_settings()


def open_secrets() -> tuple[Settings, SecretWatch | None]:
    """The settings with the secrets from Vault in them, and the watch that keeps the API keys
    fresh (not started). A secret that cannot be had ends the process: one line, status 2."""
    try:
        vault = Vault.connect(settings)
        return with_vault_secrets(settings, vault, jobs_database=True), load_api_keys(vault)
    except (VaultError, InvalidKeys) as err:
        log.critical(f"cannot start: {err}")
        raise SystemExit(2) from None


@bentoml.service(
    name="kubesentiment",
    workers=settings.service_workers,
    traffic={"timeout": 60},
    **per_request_options(),
)
@bentoml.asgi_app(read_api, path="/api/v1")
class Sentiment:
    """Sentiment analysis of English text: POSITIVE or NEGATIVE with a probability."""

    model_ref = bentoml.models.BentoModel(settings.model_store_tag)
    # RUNNER_LAYOUT=split: the model runs in a runner service of its own, which BentoML starts
    # beside this one (and Kubernetes can scale apart from it); None: in this process.
    runner = (
        bentoml.depends(runner_service(settings.backend))
        if settings.runner_layout == "split"
        else None
    )

    def __init__(self) -> None:
        use_local_models_only()
        configure_logging()
        secrets, self.key_watch = open_secrets()
        forget_api_keys()
        if self.key_watch is not None:
            self.key_watch.start()
        self.metrics = get_metrics()
        self.model = StoredModel.from_bentoml(self.model_ref)
        self.windowing = Windowing.of(self.model)  # what a text costs, in either layout
        self.engine: SentimentEngine | None = None  # the model in process: load_predict()
        # In the split layout the runner service checks its int8 graph itself.
        self.backend_check = BackendCheck(settings.backend, settings.backend)
        self.scheduler = BatchScheduler(
            self.load_predict(),
            settings.max_batch_size,
            settings.max_queued_tokens,
            settings.max_batch_tokens,
            observe_queue=self.metrics.observe_queue,
            observe_dropped=self.metrics.dropped_texts.inc,
        )
        url = secrets.jobs_database_url
        jobs_url = database_url(url.get_secret_value() if url else None, settings.jobs_db)
        hide_in_logs(jobs_url)
        self.jobs = JobStore(
            jobs_url,
            lease_seconds=settings.job_lease.total_seconds(),
            migrate_now=False,
            quotas=Quotas(
                settings.job_quota_texts, settings.job_quota_bytes, settings.jobs_max_stored_bytes
            ),
            options=database_options(settings),
        )
        try:  # once now; if the database is away, the job loop keeps trying with backoff
            self.jobs.migrate()
        except SQLAlchemyError as err:
            log.warning(
                "job store unavailable: serving predictions, jobs once it answers", exc_info=err
            )
        self.job_loop = JobLoop(
            self.jobs,
            lambda texts: self.score(texts, bulk=True),
            chunk=max(1, settings.max_batch_size // 2),  # leaves seats for interactive texts
            retention=settings.job_retention,
        )
        self.accepting = True
        self.backend = self.backend_check.served
        self.metrics.observe_backend(self.backend_check)
        self.ref = ModelRef(name=self.model.name, version=self.model.version, backend=self.backend)
        self.started = time.monotonic()
        # Everything loaded so far lives as long as the process: move it out of the garbage
        # collector's sight, and collect the young generations less often: with the defaults,
        # collections stalled requests (docs/performance.md, the single-text path).
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)
        self.metrics.ready.set(1)
        log.info(
            "model loaded",
            tag=self.model.tag,
            backend=self.backend,
            jobs=self.jobs.engine.url.get_backend_name(),
        )

    @bentoml.on_deployment
    def check_secrets() -> None:
        """Once, in `bentoml serve` itself before any worker starts: a secret that cannot be had
        stops the server with one line and exit status 2. (A worker failing its start-up would
        be restarted by BentoML for ever, repeating the error.)"""
        configure_logging()
        open_secrets()

    def load_predict(self) -> Predict[Any, Any]:
        """What the scheduler calls with each batch: in process, the model on a batch of windows
        (so that a long text's windows can ride in several batches, and no batch is longer than
        MAX_BATCH_TOKENS); in the split layout, one HTTP call per batch of texts to the runner
        service (whose own batching merges the batches of several entry pods). In process, int8
        is checked on this CPU first and fp32 serves where it fails (runners/self_check.py)."""
        if self.runner is not None:
            runner = self.runner
            if settings.runner_token is not None:  # read when the client first connects
                token = settings.runner_token.get_secret_value()
                runner.to_async.default_headers[RUNNER_TOKEN_HEADER] = token

            async def remote(texts: list[str]) -> list[Prediction]:
                try:
                    predictions: list[Prediction] = await runner.to_async.predict(texts=texts)
                except (BentoMLException, httpx.HTTPError) as err:  # busy, down, restarting
                    raise Overloaded(f"the runner service did not score the batch: {err}") from err
                return predictions

            return remote
        engine, self.backend_check = load_checked_engine(
            self.model,
            settings.backend,
            settings.inference_threads,
            settings.max_batch_size,
            observe_batch=self.metrics.observe_batch,
            check=settings.int8_self_check,
        )
        engine.predict(["warm-up"])  # first call allocates; don't bill it to a user
        self.engine = engine
        return lambda windows: list(engine.probabilities(windows))

    def __is_ready__(self) -> bool:
        """BentoML's /readyz: not ready once shutdown began, or once the API keys from Vault
        are too old to trust, so no new work is routed here."""
        ready = self.accepting and self.secrets_problem is None
        self.metrics.ready.set(1 if ready else 0)
        return ready

    @property
    def secrets_problem(self) -> str | None:
        return self.key_watch.stale if self.key_watch is not None else None

    async def off_the_loop(self, work: Callable[[list[str]], T], texts: list[str]) -> T:
        """`work(texts)` (tokenising), in a thread when the texts are long: the event loop
        serves everyone else meanwhile."""
        if sum(map(len, texts)) <= INLINE_MEASURE_CHARS:
            return work(texts)
        return await asyncio.to_thread(work, texts)

    async def measure(self, texts: list[str]) -> list[int]:
        """Tokens per text."""
        return await self.off_the_loop(self.windowing.costs, texts)

    async def score(
        self, texts: list[str], bulk: bool = False, caller: Request | None = None
    ) -> list[Prediction]:
        """Predictions; a text over MAX_TEXT_TOKENS raises TextTooLong. The tokens are charged
        to the `caller`'s tokens per minute once they are measured and found within the limits
        (OverTokenRate when there are not enough left)."""
        if self.engine is None:  # split layout: texts go to the runner service
            costs = await self.measure(texts)
            refuse_too_long(costs)
            charge(caller, sum(costs))
            predictions: list[Prediction] = await self.scheduler.submit(texts, costs, bulk=bulk)
        else:
            windows, owners = await self.off_the_loop(self.windowing.windows, texts)
            lengths = [len(window.ids) for window in windows]
            refuse_too_long(np.bincount(owners, weights=lengths, minlength=len(texts)))
            charge(caller, sum(lengths))
            probabilities = await self.scheduler.submit(windows, lengths, bulk=bulk)
            predictions = self.engine.fold(np.array(probabilities), lengths, owners, len(texts))
        self.metrics.observe_predictions(texts, predictions, self.backend)
        return predictions

    def response(self, text: str, prediction: Prediction) -> PredictResponse:
        return PredictResponse(
            text=text, sentiment=sentiment(prediction.label, prediction.score), model=self.ref
        )

    async def score_for(
        self, ctx: bentoml.Context, texts: list[str], field: str
    ) -> list[Prediction] | Any:
        """The predictions of a caller's texts, or the error answer to return instead: a text
        over MAX_TEXT_TOKENS (400), more work than may ever queue (413), over the caller's
        tokens per minute (429), shutting down or overloaded (both 503), or the client went away
        before its turn."""
        if not self.accepting:
            return unavailable(ctx, "shutting down; retry on another replica")
        try:
            scored = await unless_client_leaves(ctx.request, self.score(texts, caller=ctx.request))
        except TextTooLong as err:
            return error(ctx, 400, err.naming(field))
        except OverTokenRate as err:
            return error(ctx, 429, str(err))
        except TooMuchWork as err:
            return error(ctx, 413, str(err))
        except Overloaded as err:
            return unavailable(ctx, f"overloaded: {err}; retry shortly")
        if scored is None:
            return error(ctx, CLIENT_CLOSED_REQUEST, "client closed the request")
        return scored

    @bentoml.api(route="/api/v1/predict")
    async def predict(self, text: Text, ctx: bentoml.Context) -> PredictResponse:
        """Score one text."""
        scored = await self.score_for(ctx, [text], "text")
        if not isinstance(scored, list):  # the error answer
            return scored
        return self.response(text, scored[0])

    if settings.http_cost_probe:

        @bentoml.api(route="/api/v1/predict/no-model")
        async def predict_no_model(self, text: Text) -> PredictResponse:
            """/predict without the scheduler and the model (HTTP_COST_PROBE): what the HTTP path
            costs per request, the other half of the ceiling `make bench` reports."""
            return self.response(text, Prediction(self.model.metadata["labels"][-1], 1.0))

    @bentoml.api(route="/api/v1/predict/batch")
    async def predict_batch(self, texts: BatchTexts, ctx: bentoml.Context) -> BatchPredictResponse:
        """Score up to MAX_BATCH_TEXTS texts at once; results keep the input order."""
        scored = await self.score_for(ctx, texts, "texts")
        if not isinstance(scored, list):  # the error answer
            return scored
        results = [self.response(t, p) for t, p in zip(texts, scored, strict=True)]
        return BatchPredictResponse(results=results, model=self.ref)

    @bentoml.api(route="/api/v1/batch/predict")
    async def submit_job(self, texts: JobTexts, ctx: bentoml.Context) -> JobStatus:
        """Queue up to MAX_JOB_TEXTS texts; poll /api/v1/batch/status/{job_id}."""
        if not self.accepting:
            return unavailable(ctx, "shutting down; retry on another replica")
        if (problem := self.job_store_problem) is not None:
            return unavailable(ctx, problem)
        # A text over MAX_TEXT_TOKENS fails alone, with the reason; the rest of the job goes on.
        costs = await self.measure(texts)
        refused = {
            i: f"text_too_long: {TextTooLong(i, cost).reason}"
            for i, cost in enumerate(costs)
            if cost > settings.max_text_tokens
        }
        owner = key_name(ctx.request) if settings.api_auth else None
        try:
            job = await asyncio.to_thread(self.jobs.create, texts, refused, owner)
        except QuotaExceeded as err:
            return error(ctx, 413 if err.never else 429, str(err), **{"Retry-After": QUOTA_RETRY_S})
        except StoreFull as err:
            return error(ctx, 503, str(err), **{"Retry-After": QUOTA_RETRY_S})
        except SQLAlchemyError as err:
            return unavailable(ctx, job_store_unavailable(err))
        self.metrics.jobs.labels("submitted").inc()
        self.job_loop.wakeup.set()
        ctx.response.status_code = 202
        return job_status(job)

    @bentoml.on_startup
    async def start_job_loop(self) -> None:
        """Run queued jobs in the background, resuming any that a restart interrupted."""
        self.job_loop.start()

    @bentoml.on_shutdown
    async def shut_down(self) -> None:
        """SIGTERM, after BentoML has answered the requests in flight: refuse new work, let the
        job loop save its chunk in flight (the job stays resumable), close what we opened."""
        self.accepting = False
        self.metrics.ready.set(0)
        log.info("shutting down", grace_s=settings.shutdown_timeout.total_seconds())
        await self.job_loop.stop(settings.shutdown_timeout)
        await self.scheduler.close()
        await asyncio.to_thread(self.jobs.close)
        if self.key_watch is not None:
            self.key_watch.stop()
        log.info("shut down cleanly")

    @property
    def job_store_problem(self) -> str | None:
        """Why jobs cannot be served now: the store has not been reached since the start."""
        if self.jobs.migrated:
            return None
        return f"job store unavailable: {self.job_loop.error or 'connecting'}; retry later"

    def job_store(self) -> JobStore:
        """The store, for the job endpoints; 503 while it has not been reached yet."""
        if (problem := self.job_store_problem) is not None:
            raise HTTPException(503, problem, headers={"Retry-After": "5"})
        return self.jobs

    def find_job(self, job_id: str, request: Request) -> Job:
        """The job, if the caller may see it: its own (the key that created it), or any with an
        admin key or with auth off. Otherwise 404, exactly as for an id that is not one of ours,
        so that ids tell nothing across keys. (A malformed id is not looked up: a NUL or a huge
        id would make PostgreSQL fail instead of answering "no such job".)"""
        job = self.job_store().get(job_id) if JOB_ID.fullmatch(job_id) else None
        caller = key_name(request)
        if job is None or not (
            not settings.api_auth or caller in settings.api_admin_keys or job.owner == caller
        ):
            raise no_such_job(job_id)
        return job

    @read_api.get(
        "/batch/status/{job_id}",
        response_model=JobStatus,
        responses={404: {"description": "Unknown job id"}},
    )
    def batch_status(self, job_id: str, request: Request) -> JobStatus:
        return job_status(self.find_job(job_id, request))

    @read_api.get(
        "/batch/results/{job_id}",
        response_model=JobResults,
        responses={404: {"description": "Unknown job id"}},
    )
    def batch_results(
        self,
        job_id: str,
        request: Request,
        offset: int = Query(0, ge=0, le=MAX_OFFSET),
        limit: int = Query(1000, ge=1, le=10_000),
    ) -> JobResults:
        """Scored texts of a job, in input order, a page at a time. While the job runs, a page
        ends before the first text not scored yet; ask again from `next_offset` until it is
        null, and every text comes exactly once."""
        job = self.find_job(job_id, request)
        running = job.status in ("queued", "running")
        rows = self.job_store().results(job_id, offset, limit, in_order=running)
        if running:
            next_offset: int | None = offset + len(rows)
        else:
            last = rows[-1].index if rows else job.total
            next_offset = last + 1 if len(rows) == limit and last + 1 < job.total else None
        items = [
            JobResultItem(index=r.index, text=r.text, error=r.error)
            if r.error is not None or r.label is None or r.score is None
            else JobResultItem(index=r.index, text=r.text, sentiment=sentiment(r.label, r.score))
            for r in rows
        ]
        return JobResults(
            job_id=job_id,
            status=job.status,
            total=job.total,
            offset=offset,
            limit=limit,
            next_offset=next_offset,
            results=items,
        )

    @read_api.delete(
        "/batch/{job_id}",
        status_code=204,
        response_class=Response,
        responses={404: {"description": "Unknown job id"}},
    )
    def delete_job(self, job_id: str, request: Request) -> Response:
        """Cancel a queued or running job and delete it with its texts and results."""
        self.find_job(job_id, request)
        if not self.job_store().delete(job_id):
            raise no_such_job(job_id)
        log.info("batch job deleted", job_id=job_id)
        return Response(status_code=204)

    @read_api.get(
        "/health",
        response_model=Health,
        responses={503: {"model": Health, "description": "Shutting down, or jobs cannot run"}},
    )
    def health(self) -> Any:
        """The model is loaded (the server answers only then); 503 with a reason while the
        service shuts down or the batch job loop is retrying after an error."""
        loop = self.job_loop
        reason = None
        if not self.accepting:
            reason = "shutting down"
        elif self.secrets_problem is not None:
            reason = self.secrets_problem
        elif self.job_store_problem is not None:
            reason = self.job_store_problem
        elif loop.state in ("retrying", "stopped"):
            reason = f"batch job loop {loop.state}" + (f" after {loop.error}" if loop.error else "")
        body = Health(
            status="ok" if reason is None else "unavailable",
            reason=reason,
            model_loaded=True,
            backend=self.backend,
            backend_check=self.backend_check_info,
            model_version=self.model.version,
            uptime_seconds=round(time.monotonic() - self.started, 1),
            jobs=JobLoopHealth(state=loop.state, error=loop.error),
            queue=QueueHealth(**asdict(self.scheduler.state)),
        )
        if reason is None:
            return body
        return JSONResponse(body.model_dump(), status_code=503)

    @property
    def backend_check_info(self) -> BackendCheckInfo:
        return BackendCheckInfo(**self.backend_check.as_dict())

    @read_api.get("/model-info", response_model=ModelInfo)
    def model_info(self) -> ModelInfo:
        """The model, its figures at build (and the CPU that made them), and which back end
        serves on this CPU, with why."""
        meta = self.model.metadata
        metrics = meta.get("metrics", {})
        return ModelInfo(
            name=self.model.name,
            tag=self.model.tag,
            version=self.model.version,
            backend=self.backend,
            labels=meta["labels"],
            max_length=meta["max_length"],
            source=meta.get("source"),
            data_hash=meta.get("data_hash"),
            accuracy={
                domain: per_backend[self.backend]["accuracy"]
                for domain, per_backend in metrics.items()
                if self.backend in per_backend
            },
            test_examples=meta.get("examples", {}).get("test", {}),
            normalize_text=bool(meta.get("normalize_text")),
            window_aggregation=meta.get("window_aggregation", "probability_mean"),
            metrics=metrics,
            backend_check=self.backend_check_info,
            int8=meta.get("int8"),
            built_on=meta.get("built_on"),
        )

    @read_api.get("/metrics", response_class=Response)
    def metrics_text(self) -> Response:
        """Prometheus text format: our metrics and BentoML's, for scrapers that want /api/v1."""
        payload, content_type = render_metrics()
        return Response(payload, media_type=content_type)


# The decorators return a bentoml Service; their type hints don't say so. The first added is the
# outermost: every answer gets a request id, every error is counted, then the gate checks.
Sentiment.add_asgi_middleware(RequestIds)  # type: ignore[attr-defined]
Sentiment.add_asgi_middleware(ApiErrors)  # type: ignore[attr-defined]
Sentiment.add_asgi_middleware(ApiGate, keys=API_KEYS)  # type: ignore[attr-defined]
Sentiment.add_asgi_middleware(OpenApiDocument)  # type: ignore[attr-defined]
