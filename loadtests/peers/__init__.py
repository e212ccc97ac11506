"""Peer serving systems for the benchmark suite: what a user would pick instead of our service,
each serving the same stored model on the same cores with its own recommended batching.

- fastapi: FastAPI + a transformers `pipeline` on the PyTorch model, one text per call, as the
  seed project described it (fastapi_app.py).
- mlserver: MLServer 1.7.1, a custom runtime over the int8 ONNX graph, adaptive batching
  (mlserver_runtime.py).
- ray: Ray Serve with `@serve.batch` over the int8 ONNX graph (ray_app.py).

Each peer runs in a virtual environment of its own, `.venv-peers/<name>`, made from
`loadtests/peers/<name>.txt` by `ensure_env` the first time it is needed; the peers never
import bentoml: `serve` hands them plain paths and values.

    from loadtests.peers import PEERS, serve
    peer = PEERS["mlserver"]
    with serve(peer, model, port=3201) as url:
        run_wrk(url + peer.predict_path, [peer.body(t) for t in texts], 32, 10)
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from devtools.processes import ProcessTree

if TYPE_CHECKING:
    from runners.model_store import StoredModel

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
ENVS = ROOT / ".venv-peers"
HOST = "127.0.0.1"


@dataclass(frozen=True)
class Launch:
    """How to start a peer: its command line (run in a scratch folder) and the environment
    variables it needs on top of ours."""

    argv: tuple[str, ...]
    env: dict[str, str]


Launcher = Callable[[Path, "StoredModel", int, Path], Launch]
"""(the peer's venv python, the model, the port, a scratch folder) -> how to start the peer."""


@dataclass(frozen=True)
class Peer:
    name: str
    summary: str
    predict_path: str
    """The single-text endpoint: POST `body(text)` there."""
    ready_path: str
    """GET answers 200 once the peer is up (`serve` also waits for one good prediction)."""
    launcher: Launcher
    request: Callable[[str], dict[str, Any]]
    """The JSON request for one text."""
    answer: Callable[[Any], tuple[str, float]]
    """(label, score) from the JSON response to one text."""
    ports: int = 1
    """How many consecutive ports from `port` it listens on (MLServer: HTTP, gRPC, metrics)."""
    start_timeout_s: float = 180.0
    stop_grace_s: float = 15.0
    """How long SIGTERM may take before what is left is killed."""

    @property
    def requirements(self) -> Path:
        return HERE / f"{self.name}.txt"

    @property
    def venv(self) -> Path:
        return ENVS / self.name

    def body(self, text: str) -> str:
        """The JSON body wrk sends for one text."""
        return json.dumps(self.request(text))


def _plain_request(text: str) -> dict[str, Any]:
    return {"text": text}


def _plain_answer(response: Any) -> tuple[str, float]:
    return str(response["label"]), float(response["score"])


def _v2_request(text: str) -> dict[str, Any]:
    return {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [text]}]}


def _v2_answer(response: Any) -> tuple[str, float]:
    outputs = {output["name"]: output["data"] for output in response["outputs"]}
    return str(outputs["label"][0]), float(outputs["score"][0])


def _model_args(model: StoredModel) -> list[str]:
    return [
        "--model-file",
        str(model.onnx_file(quantized=True)),
        "--tokenizer-file",
        str(model.tokenizer_file),
        "--labels",
        *model.metadata["labels"],
        "--max-length",
        str(model.metadata["max_length"]),
    ]


def _fastapi(python: Path, model: StoredModel, port: int, scratch: Path) -> Launch:
    argv = [str(python), "-m", "uvicorn", "fastapi_app:app", "--host", HOST, "--port", str(port)]
    return Launch(
        argv=(*argv, "--workers", "1"),
        env={
            # fastapi_app.py, and runners.architecture for the model's custom architecture.
            "PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT)]),
            "PEER_MODEL_DIR": str(model.pytorch_dir),
            "PEER_LABELS": ",".join(model.metadata["labels"]),
            "PEER_MAX_LENGTH": str(model.metadata["max_length"]),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
        },
    )


def _mlserver(python: Path, model: StoredModel, port: int, scratch: Path) -> Launch:
    script = str(HERE / "mlserver_runtime.py")
    return Launch(
        argv=(
            str(python),
            script,
            str(scratch / "models"),
            "--port",
            str(port),
            *_model_args(model),
        ),
        env={"PYTHONPATH": str(HERE)},
    )


def _ray(python: Path, model: StoredModel, port: int, scratch: Path) -> Launch:
    script = str(HERE / "ray_app.py")
    return Launch(
        argv=(str(python), script, "--host", HOST, "--port", str(port), *_model_args(model)),
        env={"PYTHONPATH": str(HERE), "RAY_USAGE_STATS_ENABLED": "0"},
    )


PEERS: dict[str, Peer] = {
    peer.name: peer
    for peer in (
        Peer(
            name="fastapi",
            summary="FastAPI + transformers pipeline (PyTorch), one text per call, uvicorn",
            predict_path="/predict",
            ready_path="/health",
            launcher=_fastapi,
            request=_plain_request,
            answer=_plain_answer,
        ),
        Peer(
            name="mlserver",
            summary="MLServer 1.7.1, custom ONNX int8 runtime, adaptive batching 32 / 3 ms",
            predict_path="/v2/models/sentiment/infer",
            ready_path="/v2/models/sentiment/ready",
            launcher=_mlserver,
            request=_v2_request,
            answer=_v2_answer,
            ports=3,
            # MLServer can hang on SIGTERM waiting for its background tasks.
            stop_grace_s=10.0,
        ),
        Peer(
            name="ray",
            summary="Ray Serve 2.60, ONNX int8, @serve.batch 32 / 3 ms",
            predict_path="/predict",
            ready_path="/-/healthz",
            launcher=_ray,
            request=_plain_request,
            answer=_plain_answer,
        ),
    )
}


@dataclass(frozen=True)
class EnvInfo:
    path: Path
    install_seconds: float
    """How long the install that made it took (venv creation and pip)."""
    size_bytes: int


def _digest(peer: Peer) -> str:
    return hashlib.sha256(peer.requirements.read_bytes()).hexdigest()


def _marker(peer: Peer) -> Path:
    return peer.venv / ".installed"


def env_info(peer: Peer) -> EnvInfo | None:
    """What `ensure_env` recorded about the peer's environment, if it is up to date."""
    try:
        recorded = json.loads(_marker(peer).read_text())
    except (OSError, ValueError):
        return None
    if recorded.get("requirements_sha256") != _digest(peer):
        return None
    return EnvInfo(peer.venv, recorded["install_seconds"], recorded["size_bytes"])


def _folder_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink())


def _base_python() -> str:
    """The interpreter our own .venv was made from (Python 3.11), not whatever `python3` is
    first on PATH."""
    python = Path(sys.base_prefix) / "bin" / "python3"
    return str(python) if python.exists() else "python3"


def ensure_env(peer: Peer) -> Path:
    """`.venv-peers/<name>` with the peer's pinned requirements, installed once: a marker holds
    the requirements file's hash, so an edited file installs again (on top, like the Makefile's
    `.venv/.installed`). Returns the environment's folder."""
    if env_info(peer) is not None:
        return peer.venv
    print(f"[peers] {peer.name}: installing {peer.requirements.name} into {peer.venv} ...")
    sys.stdout.flush()
    started = time.monotonic()
    log = peer.venv.parent / f"{peer.name}-pip.log"
    peer.venv.parent.mkdir(parents=True, exist_ok=True)
    python = peer.venv / "bin" / "python"
    steps = [] if python.exists() else [[_base_python(), "-m", "venv", str(peer.venv)]]
    steps += [
        [str(python), "-m", "pip", "install", "--upgrade", "pip"],
        # torch, where a peer needs it, is pinned in its file: unpinned it is a CUDA build.
        [str(python), "-m", "pip", "install", "-r", str(peer.requirements)],
    ]
    with log.open("w") as out:
        for step in steps:
            out.write(f"$ {' '.join(step)}\n")
            out.flush()
            if subprocess.run(step, stdout=out, stderr=subprocess.STDOUT).returncode != 0:
                raise RuntimeError(
                    f"installing the {peer.name} peer failed: {' '.join(step)}\n"
                    f"the end of {log}:\n{_tail(log)}"
                )
    seconds = time.monotonic() - started
    size = _folder_size(peer.venv)
    _marker(peer).write_text(
        json.dumps(
            {
                "requirements_sha256": _digest(peer),
                "install_seconds": round(seconds, 1),
                "size_bytes": size,
            }
        )
    )
    print(f"[peers] {peer.name}: installed in {seconds:.0f} s, {size / 2**20:.0f} MiB on disk")
    sys.stdout.flush()
    return peer.venv


def _tail(log: Path, lines: int = 40) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _check_ports_free(port: int, count: int) -> None:
    """A port already taken would make the ready check talk to someone else's server."""
    for p in range(port, port + count):
        with socket.socket() as probe:
            try:
                probe.bind((HOST, p))
            except OSError as err:
                raise RuntimeError(f"port {p} on {HOST} is already in use") from err


def _environment(peer: Peer, launch: Launch) -> dict[str, str]:
    """Ours, less what points into our own .venv, plus the peer's venv on PATH and its own."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP"}
    }
    env["PATH"] = os.pathsep.join([str(peer.venv / "bin"), env.get("PATH", "")])
    return {**env, **launch.env}


def _ready(peer: Peer, client: httpx.Client, url: str) -> bool:
    """`ready_path` answers 200 and one prediction succeeds."""
    if client.get(url + peer.ready_path).status_code != 200:
        return False
    response = client.post(
        url + peer.predict_path,
        content=peer.body("warm-up"),
        headers={"Content-Type": "application/json"},
    )
    if response.status_code != 200:
        return False
    peer.answer(response.json())
    return True


@contextmanager
def serve(peer: Peer, model: StoredModel, port: int, log: Path | None = None) -> Iterator[str]:
    """The peer serving `model` on 127.0.0.1:`port` (and the next `peer.ports - 1` ports),
    from its own environment (installed first if need be); yields the base URL once it answers
    a prediction, and stops it and every process it started on exit (SIGTERM, `stop_grace_s`
    for it to stop its children, then signals to what is left). Its output goes to `log`
    (default: a temporary file, shown in the error if it fails to start)."""
    venv = ensure_env(peer)
    _check_ports_free(port, peer.ports)
    url = f"http://{HOST}:{port}"
    with tempfile.TemporaryDirectory(prefix=f"peer-{peer.name}-") as scratch_dir:
        scratch = Path(scratch_dir)
        launch = peer.launcher(venv / "bin" / "python", model, port, scratch)
        tree = ProcessTree(
            launch.argv,
            cwd=scratch,
            env=_environment(peer, launch),
            log=log or scratch / "peer.log",
            die_with_parent=True,
        )
        try:
            with httpx.Client(timeout=10) as client:
                tree.start().wait_until(
                    lambda: _ready(peer, client, url), "ready", peer.start_timeout_s
                )
            yield url
        finally:
            tree.stop(grace=peer.stop_grace_s)


def predict(peer: Peer, url: str, text: str) -> tuple[str, float]:
    """One text through a served peer: (label, score)."""
    response = httpx.post(
        url + peer.predict_path,
        content=peer.body(text),
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    response.raise_for_status()
    return peer.answer(response.json())
