"""The OCI image of a Bento (`make containerize`: deploy/container/), both flavours, built from a
Bento of the suite's small model: it serves on a read-only root filesystem as UID 1034 (the
chart's api args), runs the Kafka worker (the chart's worker args), keeps the layout the chart
relies on, and holds no compiler, git, apt lists, pip cache, build secret or CA certificate of
the build machine. `full` has the CPU build of torch and serves BACKEND=pytorch; `onnx` has no
torch and serves the ONNX back ends.

Needs rootful podman set up by deploy/container/setup-podman.sh; builds take minutes, so the
tests are marked `container` and run only when asked: `pytest -m container`. The images are
tagged localhost/kubesentiment-test:<Bento version>[-onnx] and removed at the end of the run;
the base image and the build cache stay.
"""

from __future__ import annotations

import json
import re
import ssl
import subprocess
import tarfile
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from runners.model_store import StoredModel
from tests.conftest import podman

pytestmark = [pytest.mark.container, pytest.mark.timeout(1800)]
UID = 1034
LIKED, HATED = "I love this movie, it was wonderful!", "Dreadful, boring and far too long."
HOST_CA_DIR = Path("/usr/local/share/ca-certificates")
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
# What the chart gives the pods (deploy/helm/kubesentiment): writable BentoML home and job store.
CHART_ENV = {"BENTOML_HOME": "/tmp/bentoml", "JOBS_DB": "/tmp/jobs.db", "TMPDIR": "/tmp"}
# Upper bounds, well above what was measured (docs/deploy.md): a CUDA torch, a compiler or a
# second copy of the packages would pass them.
MAX_SIZE_MB = {"full": 2300, "onnx": 1200}


def run_container(name: str, image: str, port: int, **env: str) -> None:
    """The image as the chart's api container runs it: read-only root, /tmp writable, its args."""
    podman("rm", "--force", name, check=False)
    environment = [f"--env={key}={value}" for key, value in {**CHART_ENV, **env}.items()]
    podman(
        *("run", "--detach", "--name", name, "--read-only", "--tmpfs", "/tmp"),
        *environment,
        *("--publish", f"127.0.0.1:{port}:3000", image),
        *("serve", "--host", "0.0.0.0", "--port", "3000"),
    )


def wait_ready(name: str, url: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        state = podman("inspect", "--format", "{{.State.Status}}", name, check=False).strip()
        assert state == "running", f"{name} is {state}:\n{podman('logs', name, check=False)}"
        time.sleep(1)
    raise AssertionError(f"{name} not ready in {timeout} s:\n{podman('logs', name)}")


@pytest.mark.parametrize(
    ("flavor", "backend", "port"),
    [
        ("full", "onnx-int8", 3240),
        ("onnx", "onnx-int8", 3241),
        ("full", "pytorch", 3242),
        ("onnx", "onnx-fp32", 3243),
    ],
)
def test_the_image_serves_on_a_read_only_root_as_the_chart_runs_it(
    images: dict[str, str], small_model: StoredModel, flavor: str, backend: str, port: int
) -> None:
    name, url = f"kubesentiment-test-{port}", f"http://127.0.0.1:{port}"
    run_container(name, images[flavor], port, BACKEND=backend, SERVICE_WORKERS="1")
    try:
        wait_ready(name, url)
        for text, label in ((LIKED, "POSITIVE"), (HATED, "NEGATIVE")):
            answer = httpx.post(url + "/api/v1/predict", json={"text": text}, timeout=30)
            assert answer.status_code == 200, answer.text
            assert answer.json()["sentiment"]["label"] == label, answer.text
            assert answer.json()["model"] == {
                "name": "sentiment",
                "version": small_model.version,
                "backend": backend,
            }
        processes = podman("top", name, "huser", "args")
        assert all(line.split()[0] == str(UID) for line in processes.splitlines()[1:]), processes
    finally:
        podman("rm", "--force", name, check=False)


@pytest.mark.parametrize("flavor", ["full", "onnx"])
def test_the_worker_runs_from_the_image(images: dict[str, str], flavor: str) -> None:
    """The chart's worker args, as the chart's init container sees the Bento's models."""
    image = images[flavor]
    worker = podman("run", "--rm", "--read-only", image, "python", "-m", "kafka_worker", "--help")
    assert "usage: python -m kafka_worker" in worker
    models = podman(
        *("run", "--rm", "--read-only", "--entrypoint", "sh", image),
        *("-c", "echo /home/bentoml/bento/models/*/"),
    )
    assert models.split() == ["/home/bentoml/bento/models/sentiment/"]


@pytest.mark.parametrize("flavor", ["full", "onnx"])
def test_the_image_keeps_the_contract_the_chart_relies_on(
    images: dict[str, str], bento_tag: str, flavor: str
) -> None:
    config: dict[str, Any] = json.loads(podman("image", "inspect", images[flavor]))[0]["Config"]
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["PATH"].startswith("/app/.venv/bin:")
    assert {key: env.get(key) for key in ("BENTO_PATH", "BENTOML_HOME", "PYTHONPATH")} == {
        "BENTO_PATH": "/home/bentoml/bento",
        "BENTOML_HOME": "/home/bentoml/",
        "PYTHONPATH": "/home/bentoml/bento/src",
    }
    assert env["BENTOML_CONTAINERIZED"] == env["BENTOML_DO_NOT_TRACK"] == "true"
    assert env["LANG"] == env["LC_ALL"] == "C.UTF-8" and env["PYTHONUNBUFFERED"] == "1"
    assert config["User"] == "bentoml" and config["WorkingDir"] == "/home/bentoml/bento"
    assert config["Entrypoint"] == ["/home/bentoml/bento/env/docker/entrypoint.sh"]
    assert "3000/tcp" in config["ExposedPorts"]
    assert config["Labels"]["io.kubesentiment.flavor"] == flavor
    assert config["Labels"]["io.kubesentiment.bento"] == bento_tag
    inside = podman(
        *("run", "--rm", "--read-only", images[flavor], "python", "-c"),
        "import os, sys, importlib.util as u; print(os.getuid(), os.getgid(), sys.version_info[:2],"
        " (u.find_spec('torch') and __import__('torch').__version__))",
    )
    torch = "2.13.0+cpu" if flavor == "full" else "None"
    assert inside.strip() == f"{UID} {UID} (3, 11) {torch}"


def host_ca_needles() -> dict[str, bytes]:
    """What would give the build machine's own CA certificates away: per certificate of
    /usr/local/share/ca-certificates, its DER bytes and two lines of its PEM body; and the
    machine's whole bundle, when it holds such certificates (without them it is Debian's)."""
    needles: dict[str, bytes] = {}
    pem = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)
    for path in sorted(HOST_CA_DIR.glob("**/*.crt")):
        for number, block in enumerate(pem.findall(path.read_text(errors="replace"))):
            body = [line.strip() for line in block.splitlines()[1:-1] if line.strip()]
            needles[f"{path.name}#{number} (DER)"] = ssl.PEM_cert_to_DER_cert(block)
            for index in (1, len(body) - 2):
                needles[f"{path.name}#{number} (PEM line {index})"] = body[index].encode()
    if needles and HOST_CA_BUNDLE.is_file():
        needles[str(HOST_CA_BUNDLE)] = HOST_CA_BUNDLE.read_bytes()
    return needles


FORBIDDEN = [
    (
        re.compile(r"usr/(local/)?bin/([\w-]+-linux-gnu-)?(gcc|cc|c\+\+|g\+\+|clang)(-[\d.]+)?$"),
        "compiler",
    ),
    (re.compile(r"usr/(local/)?bin/git$"), "git"),
    (re.compile(r"usr/lib/gcc/.+/cc1(plus)?$"), "compiler"),
    (re.compile(r"var/lib/apt/lists/[^/]+$"), "apt list"),
    (re.compile(r"var/cache/apt/.+\.(bin|deb)$"), "apt cache"),
    (re.compile(r"(root|home/[^/]+)/\.cache/(pip|uv)/"), "pip or uv cache"),
    (re.compile(r"run/secrets/.+"), "build secret"),
]


def findings(container: str) -> tuple[int, list[str]]:
    """Every file of a container's filesystem (`podman export`), read once: how many, and what
    of FORBIDDEN and of the host's CA certificates they hold."""
    needles = host_ca_needles()
    found: list[str] = []
    files = 0
    with subprocess.Popen(["podman", "export", container], stdout=subprocess.PIPE) as export:
        assert export.stdout is not None
        with tarfile.open(fileobj=export.stdout, mode="r|") as tar:
            for member in tar:
                path = member.name.removeprefix("./")
                for pattern, what in FORBIDDEN:
                    if pattern.search(path) and not path.endswith(("/lock", "/partial")):
                        found.append(f"{what}: {path}")
                if not member.isfile():
                    continue
                files += 1
                data = tar.extractfile(member)
                content = data.read() if data is not None else b""
                found += [
                    f"{what}: {path}" for what, needle in needles.items() if needle in content
                ]
    assert export.returncode == 0
    return files, found


@pytest.mark.parametrize("flavor", ["full", "onnx"])
def test_the_image_holds_no_build_tools_caches_or_host_certificates(
    images: dict[str, str], flavor: str
) -> None:
    container = podman("create", images[flavor]).strip()
    try:
        files, found = findings(container)
    finally:
        podman("rm", "--force", container, check=False)
    assert files > 10_000  # the whole filesystem was read
    assert not found, "\n".join(found)


def test_size_and_largest_layers(
    images: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Prints what docs/deploy.md quotes; onnx is the full image less torch (hundreds of MB)."""
    sizes: dict[str, float] = {}
    for flavor in ("full", "onnx"):
        reference = images[flavor]
        sizes[flavor] = int(podman("image", "inspect", "--format", "{{.Size}}", reference)) / 1e6
        history = podman("history", "--format", "{{.Size}}\t{{.CreatedBy}}", reference)
        layers = [line.split("\t") for line in history.splitlines()]
        with capsys.disabled():
            print(f"\n{reference}: {sizes[flavor]:.0f} MB")
            for size, step in layers:
                if not size.startswith("0 B"):
                    print(f"  {size:>9}  {step[:90]}")
        assert sizes[flavor] < MAX_SIZE_MB[flavor], f"{reference}: {sizes[flavor]:.0f} MB"
    assert sizes["full"] - sizes["onnx"] > 500
