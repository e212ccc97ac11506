"""This checkout against another revision of the project on the same model, or the default
model against another model in this checkout, side by side on the same settings and the same
machine: single-text /api/v1/predict at 32 clients (short texts), and each server's peak memory
per worker process while it scores the heaviest requests its limits let through (two
/predict/batch of eight 20,000-character English texts at once).

    python -m loadtests.versus d4bc45d                 # 2 rounds of 15 s each
    python -m loadtests.versus HEAD~3 --rounds 3 --seconds 20
    python -m loadtests.versus --model sentiment-distilled   # against the default model

The other revision is checked out into a temporary git worktree and served from there with this
environment. The two alternate within each round, in turns, so that drift of a shared machine
favours neither; the report gives each round's ratio and their range. Writes
loadtests/reports/versus.{json,md,html} (the HTML with a plot). Needs wrk.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psutil
from tqdm import tqdm

from kubesentiment.settings import get_settings
from loadtests.benchmark import (
    HERE,
    latency_row,
    png_base64,
    run_wrk,
    served,
    server_cpu_seconds,
    server_processes,
)
from loadtests.texts import sample_texts
from runners.cpu import cpu_summary

PORT = 3260
HEAVY = {
    "texts": [
        f"{i} " + ("The film was long, but it had real warmth. " * 500)[:19_990] for i in range(8)
    ]
}


@contextmanager
def worktree(revision: str) -> Any:
    """The revision checked out beside this one; the folder `bentoml serve` runs in (the root,
    or src/ for revisions from before the card's layout)."""
    folder = Path(tempfile.mkdtemp(prefix="kubesentiment-versus-")) / "tree"
    git = ["git", "-C", str(HERE.parent)]
    subprocess.run([*git, "worktree", "add", "--detach", str(folder), revision], check=True)
    try:
        yield folder if (folder / "service.py").exists() else folder / "src"
    finally:
        subprocess.run([*git, "worktree", "remove", "--force", str(folder)], check=True)


def peak_pss_mib(port: int, url: str) -> tuple[float, list[int]]:
    """The largest proportional set size of one worker process, sampled while two heavy
    requests run, and their status codes."""
    workers = [p for p in server_processes(port) if p.children() == []]
    peak, done = 0.0, threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            for process in workers:
                with suppress(psutil.NoSuchProcess):
                    peak = max(peak, process.memory_full_info().pss / 2**20)
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        with ThreadPoolExecutor(2) as pool:
            codes = list(
                pool.map(
                    lambda _: (
                        httpx.post(
                            f"{url}/api/v1/predict/batch", json=HEAVY, timeout=120
                        ).status_code
                    ),
                    range(2),
                )
            )
    finally:
        done.set()
        sampler.join()
    return peak, codes


@dataclass(frozen=True)
class Contender:
    name: str
    folder: Path  # where `bentoml serve` runs
    settings: dict[str, str]


def measure(contender: Contender, seconds: int) -> dict[str, Any]:
    bodies = [json.dumps({"text": t}) for t in sample_texts(512)]
    # A job store of its own: revisions may differ in its schema
    with (
        tempfile.TemporaryDirectory(prefix="kubesentiment-versus-") as scratch,
        served(
            PORT, {"JOBS_DB": f"{scratch}/jobs.db", **contender.settings}, cwd=contender.folder
        ) as url,
    ):
        run_wrk(f"{url}/api/v1/predict", bodies, 32, 3)  # warm-up
        # The best of three runs: with several workers, which worker accepts which connection
        # is chance, and a run whose connections crowd onto one worker is a slow run.
        cpu_before = server_cpu_seconds(PORT)
        runs = [
            run_wrk(f"{url}/api/v1/predict", bodies, 32, max(1, seconds // 3)) for _ in range(3)
        ]
        # CPU per request: a figure a busy shared machine moves less than it moves throughput
        cpu_ms = 1e3 * (server_cpu_seconds(PORT) - cpu_before) / sum(r["requests"] for r in runs)
        row = latency_row(max(runs, key=lambda run: run["requests_per_s"]))
        pss, codes = peak_pss_mib(PORT, url)
    return {
        "name": contender.name,
        **row,
        "cpu_ms_per_request": round(cpu_ms, 3),
        "peak_worker_pss_mib": round(pss),
        "heavy_statuses": codes,
    }


def plot(rounds: list[list[dict[str, Any]]], names: list[str]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        rows = [next(r for r in one if r["name"] == name) for one in rounds]
        xs = [k + i * width for k in range(len(rounds))]
        left.bar(xs, [r["requests_per_s"] for r in rows], width, label=name)
        right.bar(xs, [r["peak_worker_pss_mib"] for r in rows], width, label=name)
    left.set(title="/api/v1/predict, 32 clients", xlabel="round", ylabel="requests/s")
    right.set(title="peak PSS of a worker, heavy requests", xlabel="round", ylabel="MiB")
    for axis in (left, right):
        axis.set_xticks(
            [k + width / 2 for k in range(len(rounds))], [str(k + 1) for k in range(len(rounds))]
        )
        axis.legend()
    fig.tight_layout()
    return png_base64(fig)


def race(contenders: list[Contender], rounds: int, seconds: int) -> list[list[dict[str, Any]]]:
    """Each round measures both, in turns, so that drift of a shared machine favours neither."""
    results = []
    with tqdm(total=len(contenders) * rounds, desc="versus", unit="server") as progress:
        for number in range(rounds):
            one = []
            for contender in contenders if number % 2 == 0 else contenders[::-1]:
                one.append(measure(contender, seconds))
                progress.update()
            results.append(one)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    chosen = parser.add_mutually_exclusive_group(required=True)
    chosen.add_argument(
        "revision", nargs="?", help="the git revision to compare this checkout with"
    )
    chosen.add_argument(
        "--model", help="a stored model (name or name:version) to compare the default model with"
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=int, default=15)
    args = parser.parse_args()
    with ExitStack() as stack:
        if args.model:
            default = get_settings().model_name
            name, _, version = args.model.partition(":")
            contenders = [
                Contender(default, HERE.parent, {"MODEL_NAME": default, "MODEL_TAG": "latest"}),
                Contender(
                    args.model, HERE.parent, {"MODEL_NAME": name, "MODEL_TAG": version or "latest"}
                ),
            ]
        else:
            other = stack.enter_context(worktree(args.revision))
            contenders = [
                Contender(args.revision, other, {}),
                Contender("this checkout", HERE.parent, {}),
            ]
        rounds = race(contenders, args.rounds, args.seconds)
    names = [c.name for c in contenders]
    ratios = [
        next(r for r in one if r["name"] == names[1])["requests_per_s"]
        / next(r for r in one if r["name"] == names[0])["requests_per_s"]
        for one in rounds
    ]
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu": cpu_summary(),
        "contenders": names,
        "rounds": rounds,
        "throughput_ratio": {"min": min(ratios), "max": max(ratios)},
    }
    out = HERE / "reports"
    out.mkdir(parents=True, exist_ok=True)
    (out / "versus.json").write_text(json.dumps(result, indent=2))
    lines = [
        f"# {names[1]} against {names[0]}",
        "",
        f"{result['date']}, {result['cpu']}; /api/v1/predict at 32 clients, short texts.",
        "",
        "| round | server | requests/s | p50 ms | p99 ms | errors | CPU ms/request | "
        "peak worker PSS MiB | heavy |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for number, one in enumerate(rounds, 1):
        for r in one:
            lines.append(
                f"| {number} | {r['name']} | {r['requests_per_s']:.0f} | {r['p50_ms']:.1f} | "
                f"{r['p99_ms']:.1f} | {r['errors']} | {r['cpu_ms_per_request']} | "
                f"{r['peak_worker_pss_mib']} | "
                f"{r['heavy_statuses']} |"
            )
    lines += [
        "",
        f"Throughput, {names[1]} / {names[0]}: "
        f"{min(ratios):.3f} to {max(ratios):.3f} over {len(ratios)} rounds.",
    ]
    markdown = "\n".join(lines) + "\n"
    (out / "versus.md").write_text(markdown)
    (out / "versus.html").write_text(
        "<html><body style='font-family:sans-serif'>"
        f"<pre>{markdown}</pre><img src='data:image/png;base64,{plot(rounds, names)}'>"
        "</body></html>"
    )
    print(markdown)


if __name__ == "__main__":
    main()
