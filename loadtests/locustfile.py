"""Locust load tests of the HTTP API: single predictions, sync batches and async batch jobs,
under a constant, ramp, spike or wave load.

`make bench` measures the service's ceiling with wrk (one request body, no think time, no
checks). This file is for the rest: a mix of clients that read and check every answer, long texts
that go through the window path, batch jobs followed from submission to their last page of
results, and loads that change over time. Every wrong answer (a status, a count, a text out of
order, a job that failed or never finished) is a failed request in locust's statistics.

    make run                                   # the service, in another terminal
    make loadtest                              # headless; CSV and HTML in loadtests/reports/locust/
    make loadtest SHAPE=spike USERS=64 DURATION=2m USER_CLASSES=PredictUser
    .venv/bin/python -m locust -f loadtests/locustfile.py -H http://127.0.0.1:3000  # web UI :8089

User classes (the mix; default: all three, weighted 4:1:1): `PredictUser` (POST /api/v1/predict,
one text), `BatchPredictUser` (POST /api/v1/predict/batch, 16-32 texts) and `BatchJobUser`
(POST /api/v1/batch/predict, then poll its status and page through its results). Choose some by
naming them after the options or in LOCUST_USER_CLASSES; `--config-users` changes weights.
A share of the single predictions (`--long-share`) sends a text of several hundred words, which
the service scores in windows; batches and jobs send one-sentence reviews.

Load shapes (`--shape`, or LOCUST_SHAPE): `none` (locust's own -u/-r/-t), `constant`, `ramp`,
`spike`, `wave`. Each shape reads -u as its peak users, -r as its spawn rate and -t as its
length (60 s without -t), then ends the run. Locust 2.x selects shape classes by name only in the
web UI (`--class-picker`), hence the option. The texts are loadtests/texts.py's; run locust
with `python -m locust` from the root of the checkout, which puts the root on sys.path.

With API_AUTH on, put a key in the API_KEY environment variable: it is sent as
`Authorization: Bearer <key>` (and never written into locust's options, reports or UI).
"""

from __future__ import annotations

import math
import os
import random
import time
from abc import abstractmethod
from argparse import Namespace
from typing import Any, ClassVar

import gevent
from locust import FastHttpUser, LoadTestShape, events, task
from locust.argument_parser import LocustArgumentParser
from locust.contrib.fasthttp import ResponseContextManager
from locust.env import Environment

from loadtests.texts import long_text, short_text

DEFAULT_HOST = "http://127.0.0.1:3000"  # `make run`
PREDICT = "/api/v1/predict"
PREDICT_BATCH = "/api/v1/predict/batch"
SUBMIT_JOB = "/api/v1/batch/predict"
JOB_STATUS = "/api/v1/batch/status/{job_id}"
JOB_RESULTS = "/api/v1/batch/results/{job_id}"
JOB = "/api/v1/batch/{job_id}"
LONG = " [long]"  # the suffix of a request's name in the statistics when its text is long
LABELS = {"POSITIVE", "NEGATIVE"}
JOB_STATUSES = {"queued", "running", "completed", "failed"}  # schemas.JobStatus
BATCH_TEXTS = (16, 32)  # texts per sync batch, lowest and highest
POLL_SECONDS = 0.5  # between two status requests of a batch job
DEFAULT_SHAPE_SECONDS = 60.0  # a shape's length when -t is not given


@events.init_command_line_parser.add_listener
def add_options(parser: LocustArgumentParser) -> None:
    parser.add_argument(
        "--shape",
        choices=["none", *SHAPES],
        default="none",
        env_var="LOCUST_SHAPE",
        include_in_web_ui=False,  # the web UI picks shape classes itself: --class-picker
        help="Load shape: -u is its peak, -r its spawn rate, -t its length. Default: none.",
    )
    parser.add_argument(
        "--long-share",
        type=float,
        default=0.1,
        env_var="LOCUST_LONG_SHARE",
        help="Share of single predictions whose text is several hundred words long. Default: 0.1.",
    )
    parser.add_argument(
        "--think-time",
        type=float,
        default=0.5,
        env_var="LOCUST_THINK_TIME",
        help="Each user waits 0 to this many seconds between its tasks. Default: 0.5.",
    )
    parser.add_argument(
        "--job-texts",
        type=int,
        default=200,
        env_var="LOCUST_JOB_TEXTS",
        help="Texts per batch job. Default: 200.",
    )
    parser.add_argument(
        "--page-size",
        type=int,
        default=100,
        env_var="LOCUST_PAGE_SIZE",
        help="Results per page when reading a batch job's results (at most 10000). Default: 100.",
    )
    parser.add_argument(
        "--job-timeout",
        type=float,
        default=120.0,
        env_var="LOCUST_JOB_TIMEOUT",
        help="Seconds a batch job may take before it counts as failed. Default: 120.",
    )


@events.init.add_listener
def select_shape(environment: Environment, **_: Any) -> None:
    """Run the shape named by --shape; none: locust's own -u, -r and -t. (Locust would otherwise
    run the first shape class of this file.) The same as what the web UI's class picker does."""
    name = getattr(environment.parsed_options, "shape", "none")
    shape = None if name == "none" else SHAPES[name]()
    if shape is not None:
        shape.runner = environment.runner
    environment.shape_class = shape


def api_headers() -> dict[str, str]:
    key = os.environ.get("API_KEY", "").strip()
    return {"Authorization": f"Bearer {key}"} if key else {}


def option(user: FastHttpUser, name: str, default: Any) -> Any:
    """A KubeSentiment option of this run (they change in the web UI between runs)."""
    return getattr(user.environment.parsed_options, name, default)


def think_time(user: FastHttpUser) -> float:
    return random.uniform(0.0, max(0.0, float(option(user, "think_time", 0.5))))


def failed(response: ResponseContextManager, expected: int) -> str | None:
    """Why the response is not the expected status with a JSON object; None when it is (then
    `response.json()` is that object)."""
    if response.status_code == 0:
        return f"no response: {getattr(response, 'error', 'connection failed')}"
    try:
        body = response.json()
    except (ValueError, TypeError):  # not JSON, or no body at all
        body = None
    if response.status_code != expected:
        reason = body.get("error") if isinstance(body, dict) else response.text
        return f"HTTP {response.status_code} (expected {expected}): {str(reason)[:200]}"
    if not isinstance(body, dict):
        return "the body is not a JSON object"
    return None


def sentiment_problem(sentiment: Any) -> str | None:
    if not isinstance(sentiment, dict) or sentiment.get("label") not in LABELS:
        return f"no POSITIVE/NEGATIVE label in {sentiment!r}"
    score = sentiment.get("score")
    if not isinstance(score, int | float) or not 0 <= score <= 1:
        return f"score {score!r} is not a probability"
    return None


def prediction_problem(item: Any, text: str) -> str | None:
    """What is wrong with one PredictResponse for `text`; None if nothing."""
    if not isinstance(item, dict) or item.get("text") != text:
        return "the answer is not for the text sent"
    return sentiment_problem(item.get("sentiment"))


class ApiUser(FastHttpUser):
    """What every user of the API shares: the host, the API key and a random source of texts.
    Batches and jobs are of short sentences, so their texts/s compare with `make bench`."""

    abstract = True
    host = DEFAULT_HOST
    default_headers = api_headers()
    wait_time = think_time

    def on_start(self) -> None:
        self.rng = random.Random()

    def texts(self, n: int) -> list[str]:
        return [short_text(self.rng) for _ in range(n)]


class PredictUser(ApiUser):
    """One text per request: the interactive path. A share of them (--long-share) are long texts,
    with a name of their own in the statistics: each costs the model 4-8 windows of 128 tokens."""

    weight = 4

    @task
    def predict(self) -> None:
        long = self.rng.random() < float(option(self, "long_share", 0.1))
        text = long_text(self.rng) if long else short_text(self.rng)
        name = PREDICT + (LONG if long else "")
        with self.client.post(PREDICT, json={"text": text}, name=name, catch_response=True) as r:
            problem = failed(r, 200) or prediction_problem(r.json(), text)
            if problem:
                r.failure(problem)


class BatchPredictUser(ApiUser):
    """16-32 texts per request, answered together in input order."""

    weight = 1

    @task
    def predict_batch(self) -> None:
        texts = self.texts(self.rng.randint(*BATCH_TEXTS))
        with self.client.post(PREDICT_BATCH, json={"texts": texts}, catch_response=True) as r:
            problem = failed(r, 200) or batch_problem(r.json(), texts)
            if problem:
                r.failure(problem)


def batch_problem(body: Any, texts: list[str]) -> str | None:
    results = body.get("results") if isinstance(body, dict) else None
    if not isinstance(results, list) or len(results) != len(texts):
        count = len(results) if isinstance(results, list) else "no"
        return f"{count} results for {len(texts)} texts"
    for i, (item, text) in enumerate(zip(results, texts, strict=True)):
        if problem := prediction_problem(item, text):
            return f"result {i}: {problem}"
    return None


class JobFailed(Exception):
    """A batch job that did not end with all its results read back (for the JOB statistics)."""


class BatchJobUser(ApiUser):
    """Submits a batch job, polls its status until it is completed, reads every page of its
    results and checks them against the texts sent, then deletes the job (a long test would
    otherwise fill the service's job store for JOB_RETENTION). Each job is also recorded as one
    request of type JOB: its time is from submission to the last page."""

    weight = 1

    @task
    def batch_job(self) -> None:
        texts = self.texts(max(1, int(option(self, "job_texts", 200))))
        started = time.perf_counter()
        problem = self.run_job(texts)
        self.environment.events.request.fire(
            request_type="JOB",
            name="submit -> completed -> all results",
            response_time=(time.perf_counter() - started) * 1000,
            response_length=len(texts),
            exception=JobFailed(problem) if problem else None,
            context={},
        )

    def run_job(self, texts: list[str]) -> str | None:
        """Why the job went wrong, or None. The request that showed it is marked failed."""
        with self.client.post(SUBMIT_JOB, json={"texts": texts}, catch_response=True) as r:
            problem = failed(r, 202)
            body: dict[str, Any] = {} if problem else r.json()
            if problem := problem or submit_problem(body, len(texts)):
                r.failure(problem)
                return f"submit: {problem}"
        return self.wait_for(body["job_id"], len(texts)) or self.read_results(body["job_id"], texts)

    def wait_for(self, job_id: str, total: int) -> str | None:
        deadline = time.monotonic() + float(option(self, "job_timeout", 120.0))
        path = JOB_STATUS.format(job_id=job_id)
        while True:
            with self.client.get(path, name=JOB_STATUS, catch_response=True) as r:
                problem = failed(r, 200)
                body: dict[str, Any] = {} if problem else r.json()
                problem = problem or status_problem(body, total)
                status = body.get("status")
                if problem is None and status != "completed" and time.monotonic() > deadline:
                    problem = f"still {status} ({body.get('processed')}/{total}) at the timeout"
                if problem:
                    r.failure(problem)
                    return f"status: {problem}"
                if status == "completed":
                    return None
            gevent.sleep(POLL_SECONDS)

    def read_results(self, job_id: str, texts: list[str]) -> str | None:
        page = min(max(1, int(option(self, "page_size", 100))), 10_000)
        offset = 0
        while offset < len(texts):
            path = f"{JOB_RESULTS.format(job_id=job_id)}?offset={offset}&limit={page}"
            with self.client.get(path, name=JOB_RESULTS, catch_response=True) as r:
                problem = failed(r, 200)
                body: dict[str, Any] = {} if problem else r.json()
                if problem := problem or page_problem(body, texts, offset, page):
                    r.failure(problem)
                    return f"results at {offset}: {problem}"
                offset += len(body["results"])
        with self.client.delete(JOB.format(job_id=job_id), name=JOB, catch_response=True) as r:
            if r.status_code != 204:
                r.failure(f"HTTP {r.status_code} (expected 204): {r.text}"[:300])
                return "delete failed"
        return None


def submit_problem(body: dict[str, Any], total: int) -> str | None:
    if not isinstance(body.get("job_id"), str):
        return "no job_id"
    if body.get("status") != "queued" or body.get("total") != total:
        return (
            f"submitted {total} texts: status {body.get('status')!r}, total {body.get('total')!r}"
        )
    return None


def status_problem(body: dict[str, Any], total: int) -> str | None:
    status = body.get("status")
    if status == "failed":
        return f"the job failed: {body.get('error')}"
    if status not in JOB_STATUSES:
        return f"unknown status {status!r}"
    if body.get("total") != total:
        return f"total {body.get('total')!r}, sent {total} texts"
    if status == "completed" and body.get("processed") != total:
        return f"completed with {body.get('processed')!r} of {total} texts processed"
    return None


def page_problem(body: dict[str, Any], texts: list[str], offset: int, limit: int) -> str | None:
    """What is wrong with one page of a completed job's results: all of them, in order, each
    for the text sent at its index."""
    if body.get("status") != "completed" or body.get("total") != len(texts):
        return f"status {body.get('status')!r}, total {body.get('total')!r}"
    results = body.get("results")
    expected = min(limit, len(texts) - offset)
    if not isinstance(results, list) or len(results) != expected:
        count = len(results) if isinstance(results, list) else "no"
        return f"{count} results, expected {expected}"
    for index, item in enumerate(results, start=offset):
        if not isinstance(item, dict) or item.get("index") != index:
            return f"expected the result of text {index}, got {item!r}"[:300]
        if problem := prediction_problem(item, texts[index]):
            return f"text {index}: {problem}"
    return None


# Load shapes


class PeakShape(LoadTestShape):
    """A shape drawn from the run's -u (peak users), -r (spawn rate) and -t (length); it ends
    the run at the end of its length. `users_at` is the shape itself, free of locust's clock."""

    abstract: ClassVar[bool] = True
    use_common_options: ClassVar[bool] = True  # -u, -r and -t are read, not ignored

    def tick(self) -> tuple[int, float] | None:
        options = self.runner.environment.parsed_options if self.runner else Namespace()
        peak = max(1, int(getattr(options, "num_users", None) or 1))
        rate = float(getattr(options, "spawn_rate", None) or 1)
        length = float(getattr(options, "run_time", None) or DEFAULT_SHAPE_SECONDS)
        return self.users_at(self.get_run_time(), peak, rate, length)

    @abstractmethod
    def users_at(self, t: float, peak: int, rate: float, length: float) -> tuple[int, float] | None:
        """(users, spawn rate) at t seconds into the run; None once it is over."""

    @staticmethod
    def low(peak: int) -> int:
        """The quiet level of the spike and the wave: a fifth of the peak."""
        return max(1, round(peak / 5))


class ConstantShape(PeakShape):
    """The peak from the start (spawned at -r) to the end."""

    def users_at(self, t: float, peak: int, rate: float, length: float) -> tuple[int, float] | None:
        return (peak, rate) if t < length else None


class RampShape(PeakShape):
    """From one user up to the peak, linearly over the first three quarters, then held: where
    latency turns or errors start is the capacity."""

    def users_at(self, t: float, peak: int, rate: float, length: float) -> tuple[int, float] | None:
        if t >= length:
            return None
        rising = 0.75 * length
        users = max(1, math.ceil(peak * min(1.0, t / rising)))
        return users, max(rate, peak / rising)  # fast enough to follow the line


class SpikeShape(PeakShape):
    """A fifth of the peak, the whole peak within a second for the middle fifth of the run,
    then a fifth again: how the queue limit, 503s and recovery behave."""

    def users_at(self, t: float, peak: int, rate: float, length: float) -> tuple[int, float] | None:
        if t >= length:
            return None
        users = peak if 0.4 * length <= t < 0.6 * length else self.low(peak)
        return users, max(rate, float(peak))


class WaveShape(PeakShape):
    """Between a fifth of the peak and the peak along a cosine, two periods per run: load that
    comes and goes, as autoscaling sees it."""

    def users_at(self, t: float, peak: int, rate: float, length: float) -> tuple[int, float] | None:
        if t >= length:
            return None
        low, period = self.low(peak), length / 2
        users = round(low + (peak - low) * (1 - math.cos(2 * math.pi * t / period)) / 2)
        steepest = (peak - low) * math.pi / period  # users per second, mid-slope
        return max(1, users), max(rate, steepest)


SHAPES: dict[str, type[PeakShape]] = {
    "constant": ConstantShape,
    "ramp": RampShape,
    "spike": SpikeShape,
    "wave": WaveShape,
}
