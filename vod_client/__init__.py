"""vod's client for people and programs: the upload CLI (``vod``, or ``python -m
vod_client``) and the async client class it is built on, which the tests and the
benchmarks use too, and a blocking client of the same API (``SyncVodClient``) for code
that is not asyncio, such as the locust load test."""

from vod_client.client import ApiError, OfflineError, UploadResult, VodClient
from vod_client.progress import ProgressBar
from vod_client.resume import ResumeStore
from vod_client.source import BytesSource, Digests, FileSource, Source, compute_digests
from vod_client.sync import SyncVodClient

__all__ = [
    "ApiError",
    "BytesSource",
    "Digests",
    "FileSource",
    "OfflineError",
    "ProgressBar",
    "ResumeStore",
    "Source",
    "SyncVodClient",
    "UploadResult",
    "VodClient",
    "compute_digests",
]
