"""``python -m bench [NAME ...]``: run the benchmarks (all, or those named), then write
``bench/results/<NAME>.json`` for each and ``bench/results/SUMMARY.md`` over every result
present (earlier runs of the ones not run now included, with their dates)."""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, cast

import bench

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Benchmark:
    name: str
    run: Callable[[], dict[str, Any]]
    summarize: Callable[[dict[str, Any]], list[str]]


def discover() -> list[Benchmark]:
    found = []
    for info in sorted(pkgutil.iter_modules(bench.__path__), key=lambda info: info.name):
        if info.name.startswith("_"):
            continue
        module: ModuleType = importlib.import_module(f"bench.{info.name}")
        found.append(
            Benchmark(
                name=cast("str", module.NAME),
                run=module.run,
                summarize=module.summarize,
            )
        )
    return found


def draw(name: str, result: dict[str, Any]) -> list[Path]:
    """The PNGs of latency against load, for the benchmarks that sweep a load."""
    from bench import _plots  # noqa: PLC0415 - matplotlib only when plotting

    plotters = {"streaming": _plots.streaming, "danmaku": _plots.danmaku}
    return plotters[name](result, RESULTS) if name in plotters else []


def write_summary(benchmarks: Sequence[Benchmark]) -> Path:
    lines = ["# vod benchmarks", "", "Written by `make bench` (`python -m bench`).", ""]
    for benchmark in benchmarks:
        path = RESULTS / f"{benchmark.name}.json"
        if not path.exists():
            lines += [f"## {benchmark.name}", "", "Not run yet.", ""]
            continue
        result = json.loads(path.read_text())
        lines += [f"## {benchmark.name} ({result.get('measured_at', 'undated')})", ""]
        lines += benchmark.summarize(result)
        plot = RESULTS / f"{benchmark.name}.png"
        if plot.exists():
            lines += ["", f"![latency against load: {benchmark.name}]({plot.name})"]
        lines.append("")
    summary = RESULTS / "SUMMARY.md"
    summary.write_text("\n".join(lines))
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("names", nargs="*", help="benchmarks to run (default: all)")
    args = parser.parse_args(argv)
    benchmarks = discover()
    known = {benchmark.name for benchmark in benchmarks}
    unknown = set(args.names) - known
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(sorted(unknown))}; known: {sorted(known)}")
    RESULTS.mkdir(exist_ok=True)
    for benchmark in benchmarks:
        if args.names and benchmark.name not in args.names:
            continue
        print(f"bench: {benchmark.name} ...", flush=True)
        started = time.perf_counter()
        result = benchmark.run()
        path = RESULTS / f"{benchmark.name}.json"
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"bench: {benchmark.name} done in {time.perf_counter() - started:.0f} s -> {path}")
        for line in benchmark.summarize(result):
            print("  " + line)
        for plot in draw(benchmark.name, result):
            print(f"bench: {benchmark.name} plot -> {plot}")
    print(f"bench: summary -> {write_summary(benchmarks)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
