"""The benchmark suite's report: index.html (plots and tables, self-contained), bench.json (every
figure) and bench.md (the summary docs/performance.md quotes)."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from loadtests.benchmark import png_base64

OURS = "kubesentiment"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def raw_plot(rows: list[dict[str, Any]]) -> str:
    plt = _pyplot()
    lengths = sorted({r["tokens"] for r in rows})
    fig, axes = plt.subplots(1, len(lengths), figsize=(4 * len(lengths), 3.6), squeeze=False)
    for axis, tokens in zip(axes[0], lengths, strict=True):
        for backend in dict.fromkeys(r["backend"] for r in rows):
            mine = [r for r in rows if r["backend"] == backend and r["tokens"] == tokens]
            axis.plot(
                [r["batch"] for r in mine], [r["texts_per_s"] for r in mine], "o-", label=backend
            )
        axis.set(xscale="log", yscale="log", xlabel="batch size", title=f"~{tokens} tokens")
        axis.set_ylabel("texts/s")
        axis.legend(fontsize=8)
    fig.suptitle("Back ends in process, every core")
    fig.tight_layout()
    return png_base64(fig)


def load_plot(series: dict[str, list[dict[str, Any]]], title: str) -> str:
    """Throughput and p99 against concurrent clients, one line per system."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, rows in series.items():
        clients = [r["clients"] for r in rows]
        style = "o-" if name == OURS else "s--"
        left.plot(clients, [r["requests_per_s"] for r in rows], style, label=name)
        right.plot(clients, [r["p99_ms"] for r in rows], style, label=name)
    left.set(xscale="log", xlabel="concurrent clients", ylabel="requests/s", title=title)
    right.set(
        xscale="log",
        yscale="log",
        xlabel="concurrent clients",
        ylabel="p99 ms",
        title="p99 latency",
    )
    for axis in (left, right):
        axis.legend()
    fig.tight_layout()
    return png_base64(fig)


def ceiling_plot(ceiling: dict[str, Any]) -> str:
    plt = _pyplot()
    fig, axis = plt.subplots(figsize=(7, 2.2))
    names = ["ceiling: 1 / (HTTP + model)", "/api/v1/predict, 32 clients"]
    values = [ceiling["ceiling_requests_per_s"], ceiling["service_requests_per_s"]]
    axis.barh(names, values, color=["grey", "tab:blue"])
    axis.set_xlabel("requests/s")
    axis.set_title(f"{ceiling['fraction']:.0%} of the ceiling")
    fig.tight_layout()
    return png_base64(fig)


def cost_plot(cost: dict[str, Any]) -> str:
    plt = _pyplot()
    instances = cost["instances"]
    systems = list(dict.fromkeys(s for i in instances for s in i["usd_per_million"]))
    fig, axis = plt.subplots(figsize=(11, 4))
    width = 0.8 / max(1, len(systems))
    for k, system in enumerate(systems):
        axis.bar(
            [i + k * width for i in range(len(instances))],
            [i["usd_per_million"].get(system, 0) for i in instances],
            width,
            label=system,
        )
    axis.set_xticks(
        [i + width * (len(systems) - 1) / 2 for i in range(len(instances))],
        [f"{i['provider']}\n{i['instance']}" for i in instances],
        fontsize=8,
    )
    axis.set(
        yscale="log",
        ylabel="USD per million predictions",
        title=f"Single-text predictions at 32 clients, prices of {cost['prices_as_of']}",
    )
    axis.legend()
    fig.tight_layout()
    return png_base64(fig)


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 10 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---:|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


LOAD_COLUMNS = ["clients", "requests_per_s", "p50_ms", "p95_ms", "p99_ms", "errors"]


def summary(result: dict[str, Any]) -> str:
    """Markdown: what docs/performance.md quotes."""
    parts = [
        f"{result['date']}, {result['cpu']}, {result['cpus']} CPUs, model {result['model']['tag']}"
        f" ({result['settings']['backend']}, {result['settings']['service_workers']} workers x "
        f"{result['settings']['inference_threads']} inference threads), "
        f"{'quick' if result['quick'] else 'full'} run of {result['timings_s']['total']:.0f} s."
    ]
    if result.get("verdicts"):
        parts.append(table(result["verdicts"], ["target", "measured", "best_peer", "met"]))
    if "service" in result:
        s = result["service"]
        parts.append(
            "Single short texts (`/api/v1/predict`, ~14 tokens):\n\n"
            + table(s["single_short"], [*LOAD_COLUMNS, "mean_model_batch", "cpu_ms_per_request"])
        )
        parts.append(
            "Single long texts (~256 tokens):\n\n"
            + table(s["single_long"], [*LOAD_COLUMNS, "mean_model_batch", "cpu_ms_per_request"])
        )
        b = s["batch32"]
        parts.append(
            f"`/api/v1/predict/batch`, 32 texts, 4 clients: {b['texts_per_s']:.0f} "
            f"texts/s, p99 {b['p99_ms']:.1f} ms."
        )
    if "ceiling" in result:
        c = result["ceiling"]
        fractions = ", ".join(f"{f:.0%}" for f in c["fractions"])
        parts.append(
            f"Ceiling (the median of {len(c['fractions'])} rounds: {fractions}): no-model "
            f"endpoint {c['no_model']['requests_per_s']:.0f} requests/s = HTTP "
            f"{c['http_ms_per_request']:.3f} ms of the machine per request; the model alone "
            f"({c['model_path']['workers']} processes x {c['model_path']['threads']} threads, "
            f"batches of {c['model_path']['batch']}) {c['model_ms_per_text']:.3f} ms per text; "
            f"1 / (HTTP + model) = {c['ceiling_requests_per_s']:.0f} requests/s; the service "
            f"{c['service_requests_per_s']:.0f} = **{c['fraction']:.0%}**."
        )
    if "peers" in result:
        rows = [{"system": name, **r} for name, rs in peer_series(result).items() for r in rs]
        parts.append("Side by side:\n\n" + table(rows, ["system", *LOAD_COLUMNS]))
    if "kafka" in result:
        k = result["kafka"]
        parts.append(
            f"Kafka worker end to end: {k['messages']} messages in {k['seconds']} s = "
            f"{k['end_to_end_per_s']:.0f} messages/s ({k['ratio']:.0%} of its engine "
            f"alone, {k['raw_runner_per_s']:.0f} texts/s)."
        )
    if "cost" in result:
        rows = [
            {
                "instance": f"{i['provider']} {i['instance']} ({i['vcpus']} vCPU)",
                "usd_per_hour": i["usd_per_hour"],
                **i["usd_per_million"],
            }
            for i in result["cost"]["instances"]
        ]
        systems = list(
            dict.fromkeys(k for i in result["cost"]["instances"] for k in i["usd_per_million"])
        )
        parts.append(
            f"USD per million single-text predictions (prices of "
            f"{result['cost']['prices_as_of']}):\n\n"
            + table(rows, ["instance", "usd_per_hour", *systems])
        )
    return "\n\n".join(parts) + "\n"


def peer_series(result: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Ours (at the peers' client counts) and each peer's load rows."""
    levels = {r["clients"] for rows in result["peers"].values() for r in rows}
    ours = [r for r in result.get("service", {}).get("single_short", []) if r["clients"] in levels]
    return {OURS: ours, **result["peers"]}


def write_report(result: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=2))
    text = summary(result)
    (out / "bench.md").write_text(text)
    images = []
    if "raw" in result:
        images.append(raw_plot(result["raw"]))
    if "service" in result:
        images.append(load_plot({OURS: result["service"]["single_short"]}, "/api/v1/predict"))
    if "ceiling" in result:
        images.append(ceiling_plot(result["ceiling"]))
    if "peers" in result:
        images.append(load_plot(peer_series(result), "Same model, same cores"))
    if "cost" in result:
        images.append(cost_plot(result["cost"]))
    raw_table = table(result.get("raw", []), ["backend", "tokens", "batch", "texts_per_s"])
    (out / "index.html").write_text(
        "<!doctype html><meta charset=utf-8><title>KubeSentiment benchmark suite</title>"
        "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}"
        "img{max-width:100%}pre{white-space:pre-wrap}</style>"
        f"<h1>KubeSentiment benchmark suite, {html.escape(result['date'])}</h1>"
        + "".join(f"<img src='data:image/png;base64,{image}'>" for image in images)
        + f"<h2>Figures</h2><pre>{html.escape(text)}</pre>"
        + (f"<h2>Raw back ends</h2><pre>{html.escape(raw_table)}</pre>" if "raw" in result else "")
        + "<p>Every figure: bench.json next to this file.</p>"
    )
    print(text)
    print(f"report: {out / 'index.html'}")
