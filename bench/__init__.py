"""Benchmarks of vod, run by ``make bench`` (``python -m bench``), never by the test suite.

Every module here but ``__main__`` is one benchmark and exposes:

- ``NAME``: the file stem of its results (``bench/results/<NAME>.json``);
- ``run() -> dict``: measures (starting whatever processes it needs, blocking until done)
  and returns JSON-able figures, each beside the reference it is compared with, measured
  in the same run (``../shared/PERF-NOTES.md``: absolute figures drift, ratios hold);
- ``summarize(result) -> list[str]``: the Markdown lines it adds to ``SUMMARY.md``.
"""
