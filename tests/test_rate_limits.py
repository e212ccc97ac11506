"""Rate limits per pod, per client, in requests and in tokens: the bucket table shared by the
worker processes, the client address behind trusted proxies, and a real `bentoml serve` of two
workers whose buckets add up to one pod's."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from ipaddress import ip_network
from pathlib import Path

import httpx
import pytest
from prometheus_client.multiprocess import MultiProcessCollector
from pydantic import ValidationError

from kubesentiment.api.gate import client_address
from kubesentiment.api.rate_limits import PROBES, RateLimiter
from kubesentiment.settings import Settings
from runners.model_store import StoredModel
from tests.conftest import ROOT, Server

RATE, BURST, TOKENS_PER_MINUTE = 5, 5, 3000
KEYS = {
    "hammer": "hammer-key-5d0c7a93e1f2b846",
    "heavy": "heavy-key-8e41b07c2d9a6f35",
    "light": "light-key-2a9f6e13c8d70b54",
}
# About 70 words, some 80 tokens: 32 of them cost more than half of TOKENS_PER_MINUTE.
LONG_TEXT = " ".join(
    ["The actors gave their all, yet the plot wandered and the ending fell flat."] * 4
    + ["Still, the music and the photography were a pleasure from start to end."]
)


def bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name]}"}


def remaining(answer: httpx.Response, policy: str) -> int:
    """`r` of one policy in the RateLimit field: `"requests";r=3;t=1, "tokens";r=98;t=2`."""
    items = dict(item.strip().split(";", 1) for item in answer.headers["RateLimit"].split(","))
    return int(dict(p.split("=") for p in items[f'"{policy}"'].split(";"))["r"])


# The bucket table, in process


def test_limiters_opened_on_one_directory_share_the_buckets(tmp_path: Path) -> None:
    first, second = (RateLimiter(rate=0.001, burst=2, directory=tmp_path) for _ in range(2))
    assert first.take("ci").allowed and second.take("ci").allowed
    assert not first.take("ci").allowed and not second.take("ci").allowed
    assert RateLimiter(rate=0.001, burst=2).take("ci").allowed  # no directory: a private table


TAKER = """
import sys
from pathlib import Path
from kubesentiment.api.rate_limits import RateLimiter
limiter = RateLimiter(rate=0.001, burst=50, directory=Path(sys.argv[1]))
print(sum(limiter.take("ci").allowed for _ in range(20_000)))
"""


def test_processes_taking_at_once_lose_no_take(tmp_path: Path) -> None:
    """Each take reads and writes the bucket under the lock: four processes taking at the same
    time are allowed the burst exactly, never more."""
    takers = [
        subprocess.Popen(
            [sys.executable, "-c", TAKER, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE
        )
        for _ in range(4)
    ]
    allowed = [int(taker.communicate(timeout=120)[0]) for taker in takers]
    assert sum(allowed) == 50, allowed


def test_a_full_probe_window_forgets_its_least_recently_seen_client(tmp_path: Path) -> None:
    limiter = RateLimiter(rate=0.001, burst=1, directory=tmp_path, slots=PROBES)
    clients = [f"client-{i}" for i in range(PROBES)]
    for client in clients:  # every slot taken, every bucket empty
        assert limiter.take(client).allowed and not limiter.take(client).allowed
    assert limiter.take("newcomer").allowed  # takes client-0's slot
    assert not limiter.take(clients[1]).allowed  # remembered
    assert limiter.take(clients[0]).allowed  # forgotten: a full bucket, as if new


def test_a_request_over_the_whole_token_bucket_passes_when_full_and_leaves_a_debt() -> None:
    limiter = RateLimiter(rate=0, burst=1, tokens_per_minute=600)  # 10 tokens a second
    assert limiter.limits.keys() == {"tokens"}  # the request limit is off
    big = limiter.charge("ci", "tokens", 1000)
    assert big.allowed and big.remaining == 0 and big.window_s == 60
    assert big.reset_s == 100  # 1000 tokens at 10 a second
    refused = limiter.charge("ci", "tokens", 1)
    assert not refused.allowed and refused.retry_after_s == 41  # 400 of debt, then 1 token


# The client's address, in process


def scope(peer: str, *forwarded: str) -> dict[str, object]:
    headers = [(b"x-forwarded-for", value.encode()) for value in forwarded]
    return {"type": "http", "client": (peer, 50000), "headers": headers}


TRUSTED = (ip_network("10.0.0.0/8"), ip_network("fd00::/8"))


def test_forwarded_for_is_ignored_unless_the_peer_is_a_trusted_proxy() -> None:
    assert client_address(scope("203.0.113.7", "198.51.100.1"), TRUSTED) == "203.0.113.7"
    assert client_address(scope("10.1.2.3", "198.51.100.1"), ()) == "10.1.2.3"


def test_behind_trusted_proxies_the_client_is_the_right_most_untrusted_address() -> None:
    # The client wrote the first entry itself; the proxies appended the rest.
    chain = scope("10.0.0.2", "6.6.6.6, 198.51.100.1", "10.0.0.1")
    assert client_address(chain, TRUSTED) == "198.51.100.1"
    assert client_address(scope("::ffff:10.0.0.2", "198.51.100.1"), TRUSTED) == "198.51.100.1"
    assert client_address(scope("fd00::1", "2001:db8::5"), TRUSTED) == "2001:db8::5"
    # A malformed entry ends the walk at the last trusted hop: nothing left of it is believed.
    assert client_address(scope("10.0.0.2", "198.51.100.1, junk, 10.0.0.1"), TRUSTED) == "10.0.0.1"
    assert client_address(scope("10.0.0.2", "10.9.9.9"), TRUSTED) == "10.9.9.9"  # all trusted
    assert client_address(scope("10.0.0.2"), TRUSTED) == "10.0.0.2"  # no header


def test_trusted_proxies_must_be_networks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRUSTED_PROXIES", "10.0.0.0/8, 2001:db8::/32,192.0.2.1")
    assert Settings().trusted_proxies == ["10.0.0.0/8", "2001:db8::/32", "192.0.2.1"]
    for wrong in ("10.1.2.3/8", "proxy.local"):
        monkeypatch.setenv("TRUSTED_PROXIES", wrong)
        with pytest.raises(ValidationError, match="trusted_proxies"):
            Settings()


# A real `bentoml serve` of two workers


@pytest.fixture(scope="module")
def limited(small_model: StoredModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = Server(
        "service:Sentiment",
        3236,
        JOBS_DB=str(tmp_path_factory.mktemp("limited") / "jobs.db"),
        SERVICE_WORKERS="2",
        API_AUTH="true",
        API_KEYS=",".join(f"{name}:{key}" for name, key in KEYS.items()),
        RATE_LIMIT_PER_SECOND=str(RATE),
        RATE_LIMIT_BURST=str(BURST),
        RATE_LIMIT_TOKENS_PER_MINUTE=str(TOKENS_PER_MINUTE),
    )
    server.start()
    # /readyz answered once one worker was up; the test needs both.
    deadline = time.monotonic() + 60
    while per_worker(server, "gauge_livemin", "kubesentiment_ready") != [1.0, 1.0]:
        assert time.monotonic() < deadline, "the second worker did not get ready"
        time.sleep(0.25)
    yield server
    server.stop()


def per_worker(server: Server, kind: str, name: str, **labels: str) -> list[float]:
    """A metric's value in each worker process's own file (`kind`: counter, gauge_livemin...)."""
    values = []
    for path in (server.home / "prometheus_multiproc_dir").glob(f"{kind}_*.db"):
        for metric in MultiProcessCollector.merge([str(path)]):
            values += [
                sample.value
                for sample in metric.samples
                if sample.name == name and labels.items() <= sample.labels.items()
            ]
    return values


def test_the_request_limit_holds_for_the_pod_whichever_worker_answers(limited: Server) -> None:
    """Fresh connections land on either worker; together they let through one bucket's worth:
    the burst, then the rate (with a bucket in each worker, about twice that)."""
    url = limited.url + "/api/v1/model-info"
    started = time.monotonic()

    def hammer(_: int) -> list[int]:
        statuses = []
        no_keep_alive = httpx.Limits(max_keepalive_connections=0)  # a new connection each time
        with httpx.Client(headers=bearer("hammer"), limits=no_keep_alive, timeout=10) as client:
            while time.monotonic() - started < 4:
                statuses.append(client.get(url).status_code)
        return statuses

    with ThreadPoolExecutor(8) as pool:
        statuses = [s for batch in pool.map(hammer, range(8)) for s in batch]
    elapsed = time.monotonic() - started
    passed = statuses.count(200)
    assert set(statuses) == {200, 429}
    assert BURST <= passed <= BURST + RATE * elapsed + 1, (passed, elapsed, len(statuses))
    admitted = per_worker(limited, "counter", "kubesentiment_api_requests_total", api_key="hammer")
    assert len(admitted) == 2 and all(admitted), admitted  # both workers let some in
    assert sum(admitted) == passed
    assert (limited.home / "prometheus_multiproc_dir" / "rate-limits.buckets").is_file()


def test_a_key_sending_long_texts_runs_out_of_tokens_before_requests(limited: Server) -> None:
    def batch(key: str, texts: list[str]) -> httpx.Response:
        return httpx.post(
            limited.url + "/api/v1/predict/batch",
            json={"texts": texts},
            headers=bearer(key),
            timeout=60,
        )

    heavy = [f"{i}. {LONG_TEXT}" for i in range(32)]
    answers = [batch("heavy", heavy) for _ in range(3)]  # within the request burst
    statuses = [a.status_code for a in answers]
    assert statuses[0] == 200 and 429 in statuses, statuses
    first = answers[0].headers
    assert first["RateLimit-Policy"] == (
        f'"requests";q={BURST};w={BURST // RATE}, "tokens";q={TOKENS_PER_MINUTE};w=60'
    )
    assert remaining(answers[0], "tokens") < TOKENS_PER_MINUTE / 2  # the texts were charged
    refused = next(a for a in answers if a.status_code == 429)
    assert "RATE_LIMIT_TOKENS_PER_MINUTE" in refused.json()["error"]
    assert int(refused.headers["Retry-After"]) >= 1
    assert refused.headers["RateLimit-Policy"] == first["RateLimit-Policy"]
    assert int(refused.headers["RateLimit-Remaining"]) > 0  # requests were not the limit

    light = batch("light", ["Great fun.", "A dull, tedious film."])
    assert light.status_code == 200, light.text  # another key's tokens are its own
    assert remaining(light, "tokens") >= TOKENS_PER_MINUTE - 20
    job = httpx.post(
        limited.url + "/api/v1/batch/predict", json={"texts": heavy}, headers=bearer("heavy")
    )
    assert job.status_code == 202, job.text  # jobs are not charged tokens (quotas govern them)
