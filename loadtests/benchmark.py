"""HTTP benchmark of the entry service, side by side with the raw model in the same run.

    python -m loadtests.benchmark            # starts its own `bentoml serve` on port 3100
    python -m loadtests.benchmark --url http://127.0.0.1:3000

Measures the raw in-process ONNX Runtime throughput at batch 32 (the ceiling), then drives
/api/v1/predict at several concurrencies and /api/v1/predict/batch with 32 texts per request,
using wrk (a C load generator, so the client does not eat the server's CPU). Writes JSON, a
Markdown table and an HTML report with plots to loadtests/reports/.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psutil
from tqdm import tqdm

from devtools.processes import ProcessTree
from kubesentiment.settings import get_settings
from loadtests.texts import sample_texts
from runners.engine import load_engine
from runners.model_store import get

HERE = Path(__file__).parent


def best_rate(work: Callable[[], int], seconds: float = 3.0, rounds: int = 3) -> float:
    """Items/s of `work` (which returns how many items one call did) after a warm-up call: the
    best of `rounds` timed runs of at least one call and `seconds`, since a shared machine only
    ever makes runs slower."""
    work()
    best = 0.0
    for _ in range(rounds):
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            done += work()
        best = max(best, done / (time.perf_counter() - started))
    return best


def latency_row(result: dict[str, Any]) -> dict[str, Any]:
    """The figures of one wrk run (`run_wrk`) that every report shows."""
    return {
        "requests_per_s": result["requests_per_s"],
        "p50_ms": result["p50_us"] / 1e3,
        "p95_ms": result["p95_us"] / 1e3,
        "p99_ms": result["p99_us"] / 1e3,
        "errors": result["socket_errors"] + result["non_2xx"],
    }


def raw_throughput(batch_size: int = 32) -> float:
    """Texts/s of ONNX Runtime int8 alone, on every core: pre-tokenised batches, no HTTP, no
    scheduler. The ceiling the service is measured against."""
    model = get(get_settings().model_store_tag)
    engine = load_engine(model, "onnx-int8", threads=os.cpu_count() or 2)
    windows, _ = engine.windows(sample_texts(batch_size))
    return best_rate(lambda: len(engine.probabilities(windows)))


def run_wrk(url: str, bodies: list[str], connections: int, seconds: int) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as file:
        file.write("\n".join(bodies))
    threads = min(2, connections)
    out = subprocess.run(
        [
            "wrk",
            "-t",
            str(threads),
            "-c",
            str(connections),
            "-d",
            f"{seconds}s",
            "--timeout",
            "10s",
            "-s",
            str(HERE / "wrk_json.lua"),
            url,
            "--",
            file.name,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    os.unlink(file.name)
    line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line.removeprefix("RESULT "))
    result["requests_per_s"] = result["requests"] / (result["duration_us"] / 1e6)
    return result


@contextmanager
def served(
    port: int, settings: dict[str, str] | None = None, cwd: Path = HERE.parent
) -> Iterator[str]:
    """`bentoml serve` of the service in `cwd` (this checkout by default) with these settings
    (environment variables) on top."""
    url = f"http://127.0.0.1:{port}"
    bentoml = Path(sys.executable).parent / "bentoml"
    argv = [str(bentoml), "serve", "service:Sentiment", "--host", "127.0.0.1", "--port", str(port)]
    env = {**os.environ, **(settings or {})}
    tree = ProcessTree(argv, cwd=cwd, env=env, die_with_parent=True)
    try:
        tree.start().wait_until(
            lambda: httpx.get(f"{url}/api/v1/health", timeout=1).status_code == 200, "healthy", 120
        )
        yield url
    finally:
        tree.stop(whole_tree=True)


def server_processes(port: int) -> list[psutil.Process]:
    """Every process of the `bentoml serve` listening on `port`: the server and its workers."""
    listening = {
        c.pid
        for c in psutil.net_connections("tcp")
        if c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN and c.pid
    }
    roots = set()
    for pid in listening:
        process = psutil.Process(pid)
        # up to `bentoml serve`, whose worker processes answer on the port
        while (parent := process.parent()) is not None and "bentoml" in " ".join(parent.cmdline()):
            process = parent
        roots.add(process)
    return [p for root in roots for p in (root, *root.children(recursive=True))]


def server_cpu_seconds(port: int) -> float:
    """CPU seconds used so far by the `bentoml serve` listening on `port`, all its processes:
    divided by the requests served, the CPU a request costs, a figure that other work on a
    shared machine does not move the way it moves throughput."""
    total = 0.0
    for process in server_processes(port):
        with contextlib.suppress(psutil.NoSuchProcess):
            times = process.cpu_times()
            total += times.user + times.system
    return total


def plot(rows: list[dict[str, Any]], raw: float) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conc = [r["concurrency"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(conc, [r["requests_per_s"] for r in rows], "o-", label="/api/v1/predict")
    left.axhline(raw, color="grey", ls="--", label="raw ONNX int8, batch 32")
    left.axhline(0.4 * raw, color="red", ls=":", label="40% of raw")
    left.set(xscale="log", xlabel="concurrent clients", ylabel="requests/s", title="Throughput")
    left.set_xticks(conc, [str(c) for c in conc])
    left.legend()
    for key, label in (("p50_ms", "p50"), ("p95_ms", "p95"), ("p99_ms", "p99")):
        right.plot(conc, [r[key] for r in rows], "o-", label=label)
    right.set(xscale="log", yscale="log", xlabel="concurrent clients", ylabel="ms", title="Latency")
    right.set_xticks(conc, [str(c) for c in conc])
    right.legend()
    fig.tight_layout()
    return png_base64(fig)


def png_base64(fig: Any) -> str:
    """A matplotlib figure as a base64 PNG, to inline in a self-contained HTML report."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return base64.b64encode(buffer.getvalue()).decode()


def report(result: dict[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "benchmark.json").write_text(json.dumps(result, indent=2))
    lines = [
        "| concurrency | requests/s | p50 ms | p95 ms | p99 ms | errors | ratio to raw |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["predict"]:
        lines.append(
            f"| {r['concurrency']} | {r['requests_per_s']:.0f} | {r['p50_ms']:.1f} | "
            f"{r['p95_ms']:.1f} | {r['p99_ms']:.1f} | {r['errors']} | "
            f"{r['ratio_to_raw']:.2f} |"
        )
    b = result["batch32"]
    lines.append(
        f"\n/api/v1/predict/batch, 32 texts per request, {b['concurrency']} clients: "
        f"{b['texts_per_s']:.0f} texts/s, ratio to raw {b['ratio_to_raw']:.2f}, "
        f"p99 {b['p99_ms']:.1f} ms."
    )
    lines.insert(
        0,
        f"Raw in-process ONNX int8 at batch 32: {result['raw_texts_per_s']:.0f} "
        f"texts/s ({result['date']}, {result['cpus']} CPUs).\n",
    )
    table = "\n".join(lines)
    (out_dir / "benchmark.md").write_text(table + "\n")
    image = plot(result["predict"], result["raw_texts_per_s"])
    html = (
        f"<!doctype html><meta charset=utf-8><title>KubeSentiment benchmark</title>"
        f"<h1>KubeSentiment benchmark, {result['date']}</h1>"
        f"<img src='data:image/png;base64,{image}' style='max-width:100%'>"
        f"<pre>{table}</pre>"
    )
    (out_dir / "benchmark.html").write_text(html)
    print(table)
    print(f"\nreport: {out_dir / 'benchmark.html'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", help="a running service (default: start one on --port)")
    parser.add_argument("--port", type=int, default=3100)
    parser.add_argument("--seconds", type=int, default=10, help="per load level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--out", type=Path, default=HERE / "reports")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("wrk is needed: apt-get install -y wrk", file=sys.stderr)
        return 2

    texts = sample_texts(512)
    singles = [json.dumps({"text": t}) for t in texts]
    batches = [json.dumps({"texts": texts[i : i + 32]}) for i in range(0, len(texts), 32)]
    with served(args.port) if args.url is None else nullcontext(args.url) as url:
        print("measuring raw ONNX int8 throughput at batch 32 ...")
        raw = raw_throughput()
        rows = []
        for c in tqdm(args.concurrency, desc="/api/v1/predict", unit="level"):
            r = run_wrk(f"{url}/api/v1/predict", singles, c, args.seconds)
            rows.append(
                {"concurrency": c, **latency_row(r), "ratio_to_raw": r["requests_per_s"] / raw}
            )
        r = run_wrk(f"{url}/api/v1/predict/batch", batches, 4, args.seconds)
        batch32 = {
            "concurrency": 4,
            "texts_per_s": r["requests_per_s"] * 32,
            "p99_ms": r["p99_us"] / 1e3,
            "errors": r["socket_errors"] + r["non_2xx"],
            "ratio_to_raw": r["requests_per_s"] * 32 / raw,
        }
    result = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": os.cpu_count(),
        "backend": get_settings().backend,
        "raw_texts_per_s": raw,
        "predict": rows,
        "batch32": batch32,
    }
    report(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
