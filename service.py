"""KubeSentiment's HTTP API: the entry service.

request -> Sentiment (this file) -> BatchScheduler (runners/scheduler.py) -> SentimentEngine
(runners/engine.py) -> ONNX Runtime or PyTorch model from the BentoML store (models/).

The model runs inside this process, batched adaptively by the scheduler: on 2 cores an HTTP hop
to a separate runner process costs more than scoring the text (see README, Performance). The same
engine also runs as standalone BentoML runner services (runners/services.py) and in the Kafka
worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from typing import Any

import bentoml
import structlog
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.responses import JSONResponse

from api_errors import ApiErrors, readable
from jobs import Job, JobStore
from models.store import StoredModel
from observability import configure_logging, get_metrics, render_metrics
from runners.engine import Prediction, load_engine
from runners.scheduler import BatchScheduler, Overloaded
from schemas import (
    BatchPredictResponse,
    BatchTexts,
    Health,
    JobResultItem,
    JobResults,
    JobStatus,
    JobTexts,
    ModelInfo,
    ModelRef,
    PredictResponse,
    SentimentScore,
    Text,
)
from settings import get_settings

settings = get_settings()
log = structlog.get_logger("kubesentiment")
GC_THRESHOLDS = (100_000, 50, 1000)  # CPython's defaults: (2000, 10, 10)
read_api = FastAPI(title="KubeSentiment", description="Health, model, metrics and job results.")


@read_api.exception_handler(HTTPException)
async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
    """The same {"error": ...} body as every other error of the API."""
    return JSONResponse({"error": exc.detail}, status_code=exc.status_code)


@read_api.exception_handler(RequestValidationError)
async def invalid_query(_: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse(readable({"detail": exc.errors()}), status_code=400)


def overloaded(err: Overloaded) -> Any:
    """A prompt 503 with Retry-After. Returned (not raised) so BentoML passes it through as is."""
    return JSONResponse(
        {"error": f"overloaded: {err}; retry shortly"},
        status_code=503,
        headers={"Retry-After": "1"},
    )


def sentiment(label: str, score: float) -> SentimentScore:
    return SentimentScore.model_validate({"label": label, "score": score})


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


@bentoml.service(name="kubesentiment", workers=1, traffic={"timeout": 60})
@bentoml.asgi_app(read_api, path="/api/v1")
class Sentiment:
    """Sentiment analysis of English text: POSITIVE or NEGATIVE with a probability."""

    model_ref = bentoml.models.BentoModel(settings.model_store_tag)

    def __init__(self) -> None:
        configure_logging()
        self.metrics = get_metrics()
        self.model = StoredModel.from_bentoml(self.model_ref)
        self.engine = load_engine(
            self.model,
            settings.backend,
            settings.inference_threads,
            settings.max_batch_size,
            observe_batch=self.metrics.observe_batch,
        )
        self.engine.predict(["warm-up"])  # first call allocates; don't bill it to a user
        self.scheduler = BatchScheduler(
            self.engine.predict, settings.max_batch_size, settings.max_queued_texts
        )
        self.jobs = JobStore(settings.jobs_db)
        self.jobs_wakeup = asyncio.Event()
        self.ref = ModelRef(
            name=self.model.name, version=self.model.version, backend=settings.backend
        )
        self.started = time.monotonic()
        # Everything loaded so far lives as long as the process: move it out of the garbage
        # collector's sight, and collect the young generations less often. With the defaults,
        # collections stalled requests for 100-300 ms (p99 at 8 clients went from 312 to ~40 ms).
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)
        log.info("model loaded", tag=self.model.tag, backend=settings.backend)

    async def score(self, texts: list[str], bulk: bool = False) -> list[Prediction]:
        predictions = await self.scheduler.submit(texts, bulk=bulk)
        self.metrics.observe_predictions(texts, predictions, settings.backend)
        return predictions

    def response(self, text: str, prediction: Prediction) -> PredictResponse:
        return PredictResponse(
            text=text, sentiment=sentiment(prediction.label, prediction.score), model=self.ref
        )

    @bentoml.api(route="/api/v1/predict")
    async def predict(self, text: Text) -> PredictResponse:
        """Score one text."""
        try:
            (prediction,) = await self.score([text])
        except Overloaded as err:
            return overloaded(err)
        return self.response(text, prediction)

    @bentoml.api(route="/api/v1/predict/batch")
    async def predict_batch(self, texts: BatchTexts) -> BatchPredictResponse:
        """Score up to MAX_BATCH_TEXTS texts at once; results keep the input order."""
        try:
            predictions = await self.score(texts)
        except Overloaded as err:
            return overloaded(err)
        results = [self.response(t, p) for t, p in zip(texts, predictions, strict=True)]
        return BatchPredictResponse(results=results, model=self.ref)

    @bentoml.api(route="/api/v1/batch/predict")
    async def submit_job(self, texts: JobTexts, ctx: bentoml.Context) -> JobStatus:
        """Queue up to MAX_JOB_TEXTS texts; poll /api/v1/batch/status/{job_id}."""
        job = await asyncio.to_thread(self.jobs.create, texts)
        self.jobs_wakeup.set()
        ctx.response.status_code = 202
        return job_status(job)

    @bentoml.on_startup
    async def resume_jobs(self) -> None:
        """Run queued jobs in the background, resuming any that a restart interrupted."""
        # Keep a reference: the event loop holds tasks weakly.
        self.jobs_task = asyncio.get_running_loop().create_task(self.run_jobs())

    async def run_jobs(self) -> None:
        chunk = max(1, settings.max_batch_size // 2)  # leaves seats for interactive texts
        while True:
            self.jobs_wakeup.clear()  # before looking, so a job submitted meanwhile wakes us
            job = await asyncio.to_thread(self.jobs.next_unfinished)
            if job is None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.jobs_wakeup.wait(), timeout=5)
                continue
            try:
                while job.done < job.total:
                    texts = await asyncio.to_thread(self.jobs.pending, job, chunk)
                    predictions = await self.score(texts, bulk=True)
                    job = await asyncio.to_thread(self.jobs.save, job, predictions)
                log.info("batch job completed", job_id=job.id, texts=job.total)
            except Exception as err:  # a job fails alone; the service and other jobs go on
                log.exception("batch job failed", job_id=job.id)
                await asyncio.to_thread(self.jobs.fail, job, f"{type(err).__name__}: {err}")

    @read_api.get(
        "/batch/status/{job_id}",
        response_model=JobStatus,
        responses={404: {"description": "Unknown job id"}},
    )
    def batch_status(self, job_id: str) -> JobStatus:
        job = self.jobs.get(job_id)
        if job is None:
            raise HTTPException(404, f"no batch job with id {job_id!r}")
        return job_status(job)

    @read_api.get(
        "/batch/results/{job_id}",
        response_model=JobResults,
        responses={404: {"description": "Unknown job id"}},
    )
    def batch_results(
        self, job_id: str, offset: int = Query(0, ge=0), limit: int = Query(1000, ge=1, le=10_000)
    ) -> JobResults:
        """Scored texts of a job, in input order, a page at a time (partial while running)."""
        job = self.jobs.get(job_id)
        if job is None:
            raise HTTPException(404, f"no batch job with id {job_id!r}")
        rows = self.jobs.results(job_id, offset, limit)
        items = [
            JobResultItem(index=r.index, text=r.text, sentiment=sentiment(r.label, r.score))
            for r in rows
        ]
        return JobResults(
            job_id=job_id,
            status=job.status,
            total=job.total,
            offset=offset,
            limit=limit,
            results=items,
        )

    @read_api.get("/health", response_model=Health)
    def health(self) -> Health:
        """Ready means the model is loaded and answered a warm-up call."""
        return Health(
            status="ok",
            model_loaded=True,
            backend=settings.backend,
            model_version=self.model.version,
            uptime_seconds=round(time.monotonic() - self.started, 1),
        )

    @read_api.get("/model-info", response_model=ModelInfo)
    def model_info(self) -> ModelInfo:
        meta = self.model.metadata
        return ModelInfo(
            name=self.model.name,
            tag=self.model.tag,
            version=self.model.version,
            backend=settings.backend,
            labels=meta["labels"],
            max_length=meta["max_length"],
            source=meta.get("source"),
            data_hash=meta.get("data_hash"),
            metrics=meta.get("metrics", {}),
        )

    @read_api.get("/metrics", response_class=Response)
    def metrics_text(self) -> Response:
        """Prometheus text format: our metrics and BentoML's, for scrapers that want /api/v1."""
        payload, content_type = render_metrics()
        return Response(payload, media_type=content_type)


# The decorators return a bentoml Service; their type hints don't say so.
Sentiment.add_asgi_middleware(ApiErrors)  # type: ignore[attr-defined]
