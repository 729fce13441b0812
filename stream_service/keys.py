"""Every web.AppKey of the stream service."""

from aiohttp import web
from prometheus_client import Counter

from stream_service.services.uploads import UploadService
from stream_service.streaming.catalog import VideoCatalog
from stream_service.streaming.limiter import StreamLimiter
from stream_service.streaming.metrics import StreamMetrics
from stream_service.streaming.open_files import OpenBlobFiles

UPLOADS = web.AppKey("uploads", UploadService)
# Chunk bytes stored (repeats of a stored chunk are not counted).
UPLOADED_BYTES = web.AppKey("uploaded_bytes", Counter)
CATALOG = web.AppKey("video_catalog", VideoCatalog)
LIMITER = web.AppKey("stream_limiter", StreamLimiter)
STREAM_METRICS = web.AppKey("stream_metrics", StreamMetrics)
# Open files of local blobs, kept between range requests.
OPEN_FILES = web.AppKey("open_blob_files", OpenBlobFiles)
