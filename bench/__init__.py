"""Benchmarks of vod, run by ``make bench`` (``python -m bench``), never by the test suite.

Every module here but ``__main__`` and the ``_``-prefixed helpers (``_harness``: tools,
ports, processes, rows, wrk; ``_plots``: the PNGs) is one benchmark and exposes:

- ``NAME``: the file stem of its results (``bench/results/<NAME>.json``);
- ``run() -> dict``: measures (starting whatever processes it needs, blocking until done)
  and returns JSON-able figures, each beside the reference it is compared with, measured
  in the same run (absolute figures drift with the machine and its load, ratios hold);
- ``summarize(result) -> list[str]``: the Markdown lines it adds to ``SUMMARY.md``.

The benchmarks: ``api`` (cached metadata read through the gateway vs a bare aiohttp proxy),
``danmaku`` (live fan-out to 1,000 viewers vs a bare broadcast loop), ``danmaku_persistence``
(events through RabbitMQ into MariaDB rows by the scheduler), ``streaming`` (256 MiB, full
and 1 MiB ranges vs nginx sendfile, plus a latency-against-load sweep), ``upload`` (1 GiB in
4 parallel chunks vs ``dd``). ``streaming`` and ``danmaku`` also draw
``bench/results/<NAME>.png``, latency against load.
"""
