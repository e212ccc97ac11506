"""Worker processes x inference threads, and the split layout, side by side in one run: which
layout of the same cores serves /api/v1/predict best.

    python -m loadtests.layouts                      # 1x2, 2x1 and split, 10 s per level
    python -m loadtests.layouts --layouts 1x2 2x1 4x1 --seconds 5
    python -m loadtests.layouts --layouts 2x1 2x1:ACCESS_LOG=true 2x1:TRACING=true --rounds 3

`WxT` is SERVICE_WORKERS=W with INFERENCE_THREADS=T and the model in process; `split` is
RUNNER_LAYOUT=split: one entry worker, the model (2 threads) in a runner service of its own.
Settings after a colon are set on top, to measure what one of them costs. Besides throughput
and latency, each level reports the server's CPU time per request (all its processes), which a
busy shared machine moves less than it moves throughput.
Each layout is served in turn by `bentoml serve` and driven
by wrk with a different short review per request at each concurrency. The layouts alternate
over `--rounds` so that drift of a shared machine does not favour one; the best round of each
is kept. Writes loadtests/reports/layouts.{json,md,html} (the HTML with plots).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tqdm import tqdm

from loadtests.benchmark import (
    HERE,
    latency_row,
    png_base64,
    run_wrk,
    served,
    server_cpu_seconds,
)
from loadtests.texts import sample_texts
from runners.cpu import cpu_summary


def settings_of(layout: str) -> dict[str, str]:
    """`2x1`, `split`, either with settings on top: `2x1:ACCESS_LOG=true,TRACING=true`."""
    layout, _, extra = layout.partition(":")
    more = dict(item.split("=", 1) for item in extra.split(",") if item)
    if layout == "split":
        return {"RUNNER_LAYOUT": "split", "SERVICE_WORKERS": "1", "INFERENCE_THREADS": "2", **more}
    workers, threads = layout.split("x")
    return {"SERVICE_WORKERS": workers, "INFERENCE_THREADS": threads, **more}


def measure(layout: str, concurrency: list[int], seconds: int, port: int) -> list[dict[str, Any]]:
    bodies = [json.dumps({"text": t}) for t in sample_texts(512)]
    rows = []
    with served(port, settings_of(layout)) as url:
        run_wrk(f"{url}/api/v1/predict", bodies, 8, 2)  # warm every worker up
        for c in concurrency:
            cpu = server_cpu_seconds(port)
            r = run_wrk(f"{url}/api/v1/predict", bodies, c, seconds)
            cpu = server_cpu_seconds(port) - cpu
            rows.append(
                {
                    "layout": layout,
                    "concurrency": c,
                    **latency_row(r),
                    "cpu_ms_per_request": cpu * 1e3 / max(1, r["requests"]),
                }
            )
    return rows


def plot(rows: list[dict[str, Any]], layouts: list[str]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for layout in layouts:
        mine = [r for r in rows if r["layout"] == layout]
        conc = [r["concurrency"] for r in mine]
        label = layout if "x" not in layout else layout.replace("x", " workers x ", 1)
        left.plot(conc, [r["requests_per_s"] for r in mine], "o-", label=label)
        right.plot(conc, [r["p99_ms"] for r in mine], "o-", label=label)
    left.set(xscale="log", xlabel="concurrent clients", ylabel="requests/s", title="Throughput")
    right.set(xscale="log", yscale="log", xlabel="concurrent clients", ylabel="p99 ms")
    right.set_title("p99 latency")
    for axis in (left, right):
        axis.legend()
    fig.tight_layout()
    return png_base64(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--layouts", nargs="+", default=["1x2", "2x1", "split"], help="WORKERSxTHREADS or split"
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--seconds", type=int, default=10, help="per load level")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--port", type=int, default=3100)
    parser.add_argument("--out", type=Path, default=HERE / "reports")
    args = parser.parse_args()

    best: dict[tuple[str, int], dict[str, Any]] = {}
    runs = [layout for _ in range(args.rounds) for layout in args.layouts]
    for layout in tqdm(runs, desc="layouts", unit="layout"):
        for row in measure(layout, args.concurrency, args.seconds, args.port):
            key = (layout, row["concurrency"])
            if key not in best or row["requests_per_s"] > best[key]["requests_per_s"]:
                best[key] = row
    rows = [best[(layout, c)] for layout in args.layouts for c in args.concurrency]
    result = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_summary(),
        "cpus": os.cpu_count(),
        "rows": rows,
    }
    lines = [
        f"{result['date']}, {result['cpu']}, {result['cpus']} CPUs; best of {args.rounds} "
        f"alternating rounds, {args.seconds} s per level.\n",
        "| layout | clients | requests/s | p50 ms | p99 ms | errors | CPU ms per request |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['layout']} | {r['concurrency']} | {r['requests_per_s']:.0f} | "
        f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['errors']} | {r['cpu_ms_per_request']:.2f} |"
        for r in rows
    ]
    table = "\n".join(lines)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "layouts.json").write_text(json.dumps(result, indent=2))
    (args.out / "layouts.md").write_text(table + "\n")
    (args.out / "layouts.html").write_text(
        "<!doctype html><meta charset=utf-8><title>Workers x threads</title>"
        f"<h1>Workers x threads, {result['date']}</h1>"
        f"<img src='data:image/png;base64,{plot(rows, args.layouts)}' style='max-width:100%'>"
        f"<pre>{table}</pre>"
    )
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
