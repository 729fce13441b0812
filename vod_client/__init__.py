"""vod's client for people and programs: the upload CLI (``python -m vod_client``) and the
async client class it is built on, which the tests and the benchmarks use too."""

from vod_client.client import ApiError, OfflineError, UploadResult, VodClient
from vod_client.progress import ProgressBar
from vod_client.resume import ResumeStore
from vod_client.source import BytesSource, Digests, FileSource, Source, compute_digests

__all__ = [
    "ApiError",
    "BytesSource",
    "Digests",
    "FileSource",
    "OfflineError",
    "ProgressBar",
    "ResumeStore",
    "Source",
    "UploadResult",
    "VodClient",
    "compute_digests",
]
