"""PNG plots of latency against load (matplotlib, no display): one per benchmark that
has a load sweep, next to its JSON in bench/results/."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib as mpl

mpl.use("Agg")  # files only: no display on a server

import matplotlib.pyplot as plt  # after choosing the backend

STYLES = {"p50_ms": "--", "p99_ms": "-"}
# One colour per server: p50 dashed and p99 solid in the same colour.
COLOURS = {"gateway": "C0", "direct": "C1", "nginx": "C2", "vod": "C0", "bare": "C2"}


def streaming(result: dict[str, Any], folder: Path) -> list[Path]:
    """1 MiB random-range GETs: latency (p50, p99) and throughput against connections."""
    sweep = result.get("sweep") or []
    if not sweep:
        return []
    figure, (latency, throughput) = plt.subplots(1, 2, figsize=(11, 4.2))
    for target in sorted({point["target"] for point in sweep}):
        points = sorted((p for p in sweep if p["target"] == target), key=lambda p: p["connections"])
        x = [p["connections"] for p in points]
        for field, style in STYLES.items():
            latency.plot(
                x,
                [p[field] for p in points],
                style,
                color=COLOURS.get(target),
                marker="o",
                label=f"{target} {field[:3]}",
            )
        throughput.plot(
            x, [p["mb_per_s"] for p in points], color=COLOURS.get(target), marker="o", label=target
        )
    latency.set(xlabel="concurrent connections", ylabel="latency (ms)", xscale="log", yscale="log")
    latency.set_title("1 MiB random ranges: latency")
    throughput.set(xlabel="concurrent connections", ylabel="MB/s", xscale="log")
    throughput.set_title("1 MiB random ranges: throughput")
    for axes in (latency, throughput):
        axes.grid(visible=True, which="both", alpha=0.3)
        axes.legend(fontsize="small")
    figure.suptitle(f"streaming, {result['measured_at']}")
    figure.tight_layout()
    path = folder / "streaming.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return [path]


def danmaku(result: dict[str, Any], folder: Path) -> list[Path]:
    """Live fan-out: delivery latency (p50, p99) against deliveries asked per second."""
    figure, axes = plt.subplots(figsize=(7.5, 4.5))
    viewers = int(result["viewers"])
    for name in ("vod", "bare"):
        steps = [s for s in result[name]["steps"] if s["p99_ms"] is not None]
        x = [s["rate"] * viewers for s in steps]
        for field, style in STYLES.items():
            axes.plot(
                x,
                [s[field] for s in steps],
                style,
                color=COLOURS[name],
                marker="o",
                label=f"{name} {field[:3]}",
            )
    axes.axhline(1000, color="grey", linewidth=0.8, label="p99 limit (1 s)")
    axes.set(
        xlabel=f"deliveries asked per second (send rate x {viewers} viewers)",
        ylabel="delivery latency (ms)",
        yscale="log",
    )
    axes.set_title(f"danmaku fan-out, {result['measured_at']}")
    axes.grid(visible=True, which="both", alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    path = folder / "danmaku.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return [path]
