"""The Ray Serve peer: one deployment over the int8 ONNX graph with `@serve.batch`, behind Ray
Serve's HTTP proxy. `POST /predict` with `{"text": "..."}` answers `{"label": ..., "score": ...}`.

    python ray_app.py --port 3201 --model-file model-int8.onnx --tokenizer-file tokenizer.json \\
        --labels NEGATIVE POSITIVE --max-length 128

Runs in its own virtual environment (loadtests/peers/ray.txt) with this folder on PYTHONPATH.
The launcher starts a private local Ray instance, deploys the app, blocks until SIGTERM or
SIGINT, then shuts Serve and Ray down, so stopping this one process stops every Ray process it
started (they also die with it: Ray ties its processes' lives to their parent on Linux).

Settings, and why:
- `ray.init(address="local")`: always a new private instance, never one that `ray start` left
  on the machine; `num_cpus=2` (the benchmark's cores), no dashboard, a small object store
  (requests and answers are a few bytes) and a temporary directory of its own. Only the HTTP
  proxy binds `--host`: Ray's internal servers listen on the machine's address, one of them
  (the dashboard agent) on its fixed port 52365.
- `@serve.batch(max_batch_size=32, batch_wait_timeout_s=0.003)`: the benchmark's batching
  settings, the same for every system.
- `max_ongoing_requests=64`: Ray Serve's default of 5 per replica would cap every batch at 5
  texts; 64 lets one batch of 32 fill while the previous one runs.
- One replica with two ONNX Runtime threads by default: the proxy, the controller and the
  replica are separate processes on the same two cores, and a second replica would be a
  second copy of the model competing with the proxy for them (`--replicas 2 --threads 1`
  tries that layout).
"""

from __future__ import annotations

import argparse
import signal
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

if TYPE_CHECKING:
    from loadtests.peers.onnx_classifier import OnnxClassifier
else:
    from onnx_classifier import OnnxClassifier


@serve.deployment(max_ongoing_requests=64)
class Sentiment:
    def __init__(
        self,
        model_file: str,
        tokenizer_file: str,
        labels: list[str],
        max_length: int,
        threads: int,
    ) -> None:
        self.classifier = OnnxClassifier(
            Path(model_file), Path(tokenizer_file), labels, max_length, threads
        )

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.003)
    async def classify(self, texts: list[str]) -> list[dict[str, Any]]:
        return [{"label": label, "score": score} for label, score in self.classifier.predict(texts)]

    async def __call__(self, request: Request) -> Any:
        if request.url.path.rstrip("/") != "/predict" or request.method != "POST":
            return JSONResponse({"detail": "POST /predict"}, status_code=404)
        body = await request.json()
        return await self.classify(body["text"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model-file", required=True)
    parser.add_argument("--tokenizer-file", required=True)
    parser.add_argument("--labels", nargs="+", required=True)
    parser.add_argument("--max-length", type=int, required=True)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads per replica")
    parser.add_argument("--num-cpus", type=int, default=2)
    args = parser.parse_args()

    stop = threading.Event()
    with tempfile.TemporaryDirectory(prefix="ray-peer-") as temp_dir:
        ray.init(
            address="local",
            num_cpus=args.num_cpus,
            include_dashboard=False,
            object_store_memory=100 * 1024**2,
            _temp_dir=temp_dir,
        )
        # After ray.init, which installs a SIGTERM handler of its own that dies on the spot.
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        try:
            serve.start(http_options={"host": args.host, "port": args.port})
            deployment: Any = Sentiment  # @serve.deployment made the class a Deployment
            app = deployment.options(num_replicas=args.replicas).bind(
                args.model_file, args.tokenizer_file, args.labels, args.max_length, args.threads
            )
            serve.run(app, name="sentiment", route_prefix="/")
            print(f"ray peer ready on http://{args.host}:{args.port}/predict", flush=True)
            while not stop.wait(timeout=1):
                pass
            serve.shutdown()
        finally:
            ray.shutdown()


if __name__ == "__main__":
    main()
