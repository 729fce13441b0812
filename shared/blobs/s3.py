"""The S3-compatible blob store: AWS S3, MinIO, Ceph RGW and the like, through aiobotocore.

Configured by one URL (``VOD_BLOB_URL``)::

    s3://[ACCESS_KEY:SECRET_KEY@]BUCKET[/PREFIX]?endpoint=http://minio:9000&region=us-east-1

- ``endpoint`` (optional): the server's base URL; without it, AWS S3 itself.
- ``region`` (optional, ``us-east-1``): the signing region; MinIO accepts any.
- ``PREFIX`` (optional): every key is stored under ``PREFIX/``, so deployments (or test
  runs) can share a bucket without meeting, as ``VOD_NAMESPACE`` does for Redis.
- Credentials: the URL's user-info when given (percent-encode ``/``, ``@`` and ``:`` in
  the secret), otherwise botocore's standard chain: ``AWS_ACCESS_KEY_ID`` /
  ``AWS_SECRET_ACCESS_KEY`` (and ``AWS_SESSION_TOKEN``) from the environment first, then
  ``~/.aws``, web identity (Kubernetes service accounts), instance metadata. Prefer the
  environment variables: a URL is easier to leak (it is printed with the settings).
  Neither the URL nor the credentials are ever logged or put in an error.

Addressing is path-style (``endpoint/bucket/key``), which MinIO and Ceph need and AWS
still serves. Checksums are sent and checked only where S3 requires them (botocore ≥ 1.36
otherwise adds CRC trailers that several S3-compatible servers reject); integrity is
guarded end to end by the content hashes the services verify.

How the port maps onto S3:

- ``write`` buffers up to ``part_size`` (8 MiB): a body that fits is one ``PutObject``;
  a longer one becomes a multipart upload of ``part_size`` parts (the last one shorter),
  so memory per write is about two parts whatever the size. Nothing is visible before
  ``CompleteMultipartUpload``; a failing source, ``max_bytes`` or a cancellation aborts
  the upload (the abort finishes even if the caller is cancelled again).
- ``read`` is one ranged ``GetObject`` streamed through in pieces ≤ ``chunk_size``.
- ``stat`` is ``HeadObject``; ``delete`` is ``HeadObject`` then ``DeleteObject`` (S3's
  delete succeeds whether or not the key exists, and the port reports which it was).
- ``concatenate`` first heads every part. When every part but the last is ≥ 5 MiB (upload
  chunks are ≥ 8 MiB), the target is a multipart upload whose parts are server-side
  copies (``UploadPartCopy``): no byte passes through this process, and none is read
  back to hash (the port leaves ``sha256`` None; the parts were checked as they arrived).
  Copies are pinned to the ETags seen by the heads (``CopySourceIfMatch``), so the blob
  is exactly the parts that were headed. Otherwise the parts are streamed through
  ``write`` (each read pinned with ``IfMatch``), whose ``sha256`` is dropped as well, so
  ``concatenate`` answers the same whichever way it joined.
- ``list`` pages through ``ListObjectsV2``; ``ping`` is ``HeadBucket``.
- ``abort_stale_multipart_uploads`` lists the bucket's unfinished multipart uploads under
  the prefix and aborts those begun before the cut-off (an S3 lifecycle rule
  ``AbortIncompleteMultipartUpload`` is the belt to this brace).

Errors: a missing object is ``BlobNotFoundError``; a store that cannot be reached, refuses
the credentials, lacks the bucket or answers 5xx is ``BlobStoreUnavailableError`` (503),
logged once here with the cause. No botocore or aiohttp exception leaves this module for
those cases; a request S3 rejects as malformed (a bug) is left to surface as such.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import functools
import hashlib
import io
import logging
import re
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import TYPE_CHECKING, Final
from urllib.parse import parse_qs, unquote, urlsplit

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession
from botocore.exceptions import (
    ClientError,
    CredentialRetrievalError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
)
from botocore.exceptions import ConnectionError as BotocoreConnectionError

from shared.blobs.port import (
    CHUNK_SIZE,
    MAX_KEY_LENGTH,
    MIB,
    BlobInfo,
    BlobNotFoundError,
    BlobStoreUnavailableError,
    BlobTooLargeError,
    InvalidBlobKeyError,
    validate_key,
    validate_prefix,
)
from shared.errors import ConfigError

if TYPE_CHECKING:
    from types_aiobotocore_s3.client import S3Client
    from types_aiobotocore_s3.type_defs import (
        CompletedPartTypeDef,
        GetObjectOutputTypeDef,
        GetObjectRequestTypeDef,
        ListMultipartUploadsRequestTypeDef,
        ListObjectsV2RequestTypeDef,
        ResponseMetadataTypeDef,
    )

logger = logging.getLogger(__name__)

GIB = 1024 * MIB
# S3's rules for multipart uploads: every part but the last is 5 MiB to 5 GiB, at most
# 10,000 parts; a single copy source may not exceed 5 GiB either.
MIN_PART_SIZE: Final = 5 * MIB
MAX_PART_SIZE: Final = 5 * GIB
MAX_PARTS: Final = 10_000
# Large enough that a 20 GiB upload stays well under MAX_PARTS (2,560 parts), small enough
# that a writer holds little memory; equal to the default upload chunk size, so each
# chunk is a single PUT and a copy source of its own.
DEFAULT_PART_SIZE: Final = 8 * MIB
DEFAULT_REGION: Final = "us-east-1"
# Every streamed video holds one connection for its whole length: the pool must be
# larger than the stream_service's concurrent streams plus uploads, or streams queue.
DEFAULT_MAX_CONNECTIONS: Final = 512
# Parallel HeadObject / UploadPartCopy requests of one concatenate.
DEFAULT_COPY_CONCURRENCY: Final = 8
DEFAULT_CONNECT_TIMEOUT: Final = 5.0
DEFAULT_READ_TIMEOUT: Final = 60.0
DEFAULT_MAX_ATTEMPTS: Final = 3

_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_URL_OPTIONS = frozenset({"endpoint", "region"})
_NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NotFound"})
# Answers that mean "this store cannot serve anyone now", whatever the request.
_UNAVAILABLE_CODES = frozenset(
    {
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "NoSuchBucket",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "SlowDown",
    }
)
_CONNECTION_ERRORS = (
    HTTPClientError,  # closed connections, read timeouts, broken streamed bodies
    BotocoreConnectionError,  # refused, unreachable, connect timeouts, TLS failures
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
    CredentialRetrievalError,
    aiohttp.ClientError,
    TimeoutError,
)

_HTTP_FORBIDDEN = 403
_HTTP_SERVER_ERROR = 500


@dataclass(frozen=True, slots=True)
class _Head:
    size: int
    etag: str
    modified: datetime


class S3BlobStore:
    """Blobs as objects of one bucket (under an optional prefix); see the module doc.

    One aiobotocore client per store, created on first use (so opening a store does no
    I/O and a store whose server is down still opens) and closed by ``close``.

    ``prefix`` is "" or ends with "/"; ``credentials`` is (access key, secret key), None
    for botocore's chain; ``max_attempts`` counts every try of a request, the first
    included (botocore's "standard" retries, with backoff, on throttling, 5xx and
    connection errors); ``clock`` tells the time ``abort_stale_multipart_uploads`` compares
    with the server's upload start times.
    """

    def __init__(
        self,
        bucket: str,
        *,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str = DEFAULT_REGION,
        credentials: tuple[str, str] | None = None,
        session: AioSession | None = None,
        part_size: int = DEFAULT_PART_SIZE,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        copy_concurrency: int = DEFAULT_COPY_CONCURRENCY,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        read_timeout: float = DEFAULT_READ_TIMEOUT,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        if not MIN_PART_SIZE <= part_size <= MAX_PART_SIZE:
            raise ValueError("part_size must be 5 MiB to 5 GiB (S3's limits)")
        if copy_concurrency < 1:
            raise ValueError("copy_concurrency must be at least 1")
        if prefix and not prefix.endswith("/"):
            raise ValueError("a key prefix ends with '/'")
        self.bucket = bucket
        self.prefix = prefix
        self.endpoint_url = endpoint_url
        self.region = region
        self.part_size = part_size
        self.copy_concurrency = copy_concurrency
        self._credentials = credentials
        self._session = session or _shared_session()
        self._config = AioConfig(
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"total_max_attempts": max_attempts, "mode": "standard"},
            max_pool_connections=max_connections,
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        self._clock = clock or _utc_now
        self._client: S3Client | None = None
        self._client_lock = asyncio.Lock()
        self._exits = contextlib.AsyncExitStack()
        self._closed = False

    @classmethod
    def from_url(cls, url: str) -> S3BlobStore:
        """The store an ``s3://`` URL names; ``ConfigError`` (naming VOD_BLOB_URL) if bad.

        No message quotes the URL: it may hold a secret key.
        """
        parts = urlsplit(url)
        userinfo, _, bucket = parts.netloc.rpartition("@")
        if not _BUCKET_RE.fullmatch(bucket):
            raise ConfigError(
                "VOD_BLOB_URL",
                "an s3 URL is s3://bucket[/prefix]?endpoint=...&region=..."
                " with a bucket name of 3-63 lower-case letters, digits, dots and hyphens",
            )
        credentials = None
        if userinfo:
            access_key, colon, secret_key = userinfo.partition(":")
            if not access_key or not colon or not secret_key:
                raise ConfigError(
                    "VOD_BLOB_URL", "credentials in an s3 URL are ACCESS_KEY:SECRET_KEY@"
                )
            credentials = (unquote(access_key), unquote(secret_key))
        options = parse_qs(parts.query, keep_blank_values=True)
        unknown = sorted(set(options) - _URL_OPTIONS)
        if unknown:
            raise ConfigError(
                "VOD_BLOB_URL",
                f"unknown s3 option(s) {', '.join(unknown)}; known: endpoint, region",
            )
        if any(len(values) != 1 or not values[0] for values in options.values()):
            raise ConfigError("VOD_BLOB_URL", "each s3 option is given once, with a value")
        endpoint = options.get("endpoint", [None])[0]
        if endpoint is not None:
            endpoint_parts = urlsplit(endpoint)
            if endpoint_parts.scheme not in ("http", "https") or not endpoint_parts.netloc:
                raise ConfigError("VOD_BLOB_URL", "the s3 endpoint must be an http(s) URL")
        return cls(
            bucket,
            prefix=_url_prefix(parts.path),
            endpoint_url=endpoint,
            region=options.get("region", [DEFAULT_REGION])[0],
            credentials=credentials,
        )

    def __repr__(self) -> str:
        # Never the credentials.
        return (
            f"S3BlobStore(bucket={self.bucket!r}, prefix={self.prefix!r}, "
            f"endpoint_url={self.endpoint_url!r}, region={self.region!r})"
        )

    # -- the protocol ----------------------------------------------------------------

    async def write(
        self, key: str, chunks: AsyncIterable[bytes], *, max_bytes: int | None = None
    ) -> BlobInfo:
        writer = _Writer(self, self._object_key(key), max_bytes)
        try:
            async for chunk in chunks:
                await writer.add(chunk)
            modified = await writer.finish()
        except BaseException:
            await writer.abort()
            raise
        return BlobInfo(key=key, size=writer.size, sha256=writer.sha256(), modified=modified)

    async def read(
        self, key: str, *, offset: int = 0, length: int | None = None, chunk_size: int = CHUNK_SIZE
    ) -> AsyncIterator[bytes]:
        if offset < 0 or (length is not None and length < 0) or chunk_size <= 0:
            raise ValueError("offset and length must be ≥ 0, chunk_size > 0")
        object_key = self._object_key(key)
        if length == 0:
            # No byte range is empty in HTTP; only the blob's existence is in question.
            if await self._head(object_key) is None:
                raise BlobNotFoundError(f"No blob {key!r}.")
            return
        last = "" if length is None else str(offset + length - 1)
        async for piece in self._pieces(key, object_key, f"bytes={offset}-{last}", chunk_size):
            yield piece

    async def stat(self, key: str) -> BlobInfo | None:
        head = await self._head(self._object_key(key))
        if head is None:
            return None
        return BlobInfo(key=key, size=head.size, modified=head.modified)

    def local_path(self, key: str) -> Path | None:
        validate_key(key)
        return None  # callers stream through ``read`` instead of using sendfile

    async def delete(self, key: str) -> bool:
        object_key = self._object_key(key)
        if await self._head(object_key) is None:
            return False
        s3 = await self._s3()
        with _translated("delete a blob"):
            await s3.delete_object(Bucket=self.bucket, Key=object_key)
        return True

    async def concatenate(self, target_key: str, part_keys: Sequence[str]) -> BlobInfo:
        target = self._object_key(target_key)
        sources = [self._object_key(key) for key in part_keys]
        heads: builtins.list[_Head] = []
        for key, found in zip(part_keys, await self._head_all(sources), strict=True):
            if found is None:
                raise BlobNotFoundError(f"No blob {key!r}.")
            heads.append(found)
        if _copyable([head.size for head in heads]):
            return await self._concatenate_by_copy(target_key, target, sources, heads)
        written = await self.write(target_key, self._stream_parts(part_keys, sources, heads))
        # The port's contract: no ``sha256`` from ``concatenate``, whichever way it joined.
        return BlobInfo(key=target_key, size=written.size, modified=written.modified)

    async def list(self, prefix: str = "") -> AsyncIterator[str]:
        validate_prefix(prefix)
        s3 = await self._s3()
        request: ListObjectsV2RequestTypeDef = {
            "Bucket": self.bucket,
            "Prefix": self.prefix + prefix,
        }
        while True:
            with _translated("list blobs"):
                page = await s3.list_objects_v2(**request)
            for entry in page.get("Contents", []):
                key = entry["Key"].removeprefix(self.prefix)
                # Objects other tools put in the bucket ("folder/" markers, odd names)
                # are not blobs of this store.
                if _is_key(key):
                    yield key
            if not page.get("IsTruncated"):
                return
            request["ContinuationToken"] = page["NextContinuationToken"]

    async def ping(self) -> None:
        s3 = await self._s3()
        try:
            await s3.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            _log_unavailable("reach the bucket", exc)
            raise BlobStoreUnavailableError(
                f"The blob store's bucket is not usable ({_status(exc)})."
            ) from exc
        except _CONNECTION_ERRORS as exc:
            _log_unavailable("reach the bucket", exc)
            raise BlobStoreUnavailableError("The blob store cannot be reached.") from exc

    async def abort_stale_multipart_uploads(self, older_than: timedelta) -> int:
        cutoff = self._clock() - older_than
        s3 = await self._s3()
        request: ListMultipartUploadsRequestTypeDef = {
            "Bucket": self.bucket,
            "Prefix": self.prefix,
        }
        aborted = 0
        while True:
            with _translated("list unfinished uploads"):
                page = await s3.list_multipart_uploads(**request)
            for upload in page.get("Uploads", []):
                if upload["Initiated"] >= cutoff:
                    continue
                try:
                    with _translated("abort an unfinished upload"):
                        await s3.abort_multipart_upload(
                            Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                        )
                except ClientError as exc:
                    if _code(exc) != "NoSuchUpload":  # finished or aborted meanwhile
                        raise
                    continue
                aborted += 1
            if not page.get("IsTruncated"):
                break
            request["KeyMarker"] = page["NextKeyMarker"]
            request["UploadIdMarker"] = page["NextUploadIdMarker"]
        if aborted:
            logger.info("aborted %d stale multipart upload(s) in the blob store", aborted)
        return aborted

    async def close(self) -> None:
        async with self._client_lock:
            self._closed = True
            self._client = None
            await self._exits.aclose()

    # -- helpers ---------------------------------------------------------------------

    async def _s3(self) -> S3Client:
        client = self._client
        if client is not None:
            return client
        async with self._client_lock:
            if self._closed:
                raise BlobStoreUnavailableError("The blob store is closed.")
            if self._client is None:
                access_key, secret_key = self._credentials or (None, None)
                self._client = await self._exits.enter_async_context(
                    self._session.create_client(
                        "s3",
                        region_name=self.region,
                        endpoint_url=self.endpoint_url,
                        aws_access_key_id=access_key,
                        aws_secret_access_key=secret_key,
                        config=self._config,
                    )
                )
            return self._client

    def _object_key(self, key: str) -> str:
        object_key = self.prefix + validate_key(key)
        if len(object_key.encode()) > MAX_KEY_LENGTH:
            raise InvalidBlobKeyError(f"{key!r} is too long for this store's prefix.")
        return object_key

    async def _put(self, object_key: str, body: bytes) -> datetime | None:
        s3 = await self._s3()
        with _translated("store a blob"):
            # A file, not bytes: aiohttp then sends it in pieces as the socket drains,
            # rather than copying what the socket cannot take at once into its buffer.
            response = await s3.put_object(
                Bucket=self.bucket, Key=object_key, Body=io.BytesIO(body)
            )
        return _server_time(response["ResponseMetadata"])

    async def _start_upload(self, object_key: str) -> _MultipartUpload:
        s3 = await self._s3()
        with _translated("start a multipart upload"):
            response = await s3.create_multipart_upload(Bucket=self.bucket, Key=object_key)
        return _MultipartUpload(s3, self.bucket, object_key, response["UploadId"])

    async def _head(self, object_key: str) -> _Head | None:
        s3 = await self._s3()
        with _translated("look a blob up"):
            try:
                response = await s3.head_object(Bucket=self.bucket, Key=object_key)
            except ClientError as exc:
                if _code(exc) in _NOT_FOUND_CODES:
                    return None
                raise
        return _Head(
            size=response["ContentLength"],
            etag=response["ETag"],
            modified=response["LastModified"].astimezone(UTC),
        )

    async def _head_all(self, object_keys: Sequence[str]) -> builtins.list[_Head | None]:
        heads: builtins.list[_Head | None] = [None] * len(object_keys)
        numbered = iter(enumerate(object_keys))

        async def worker() -> None:
            # Workers share one iterator: each key is taken by exactly one of them.
            for index, object_key in numbered:
                heads[index] = await self._head(object_key)

        await _run_all([worker() for _ in range(min(self.copy_concurrency, len(object_keys)))])
        return heads

    async def _pieces(
        self,
        key: str,
        object_key: str,
        byte_range: str,
        chunk_size: int,
        *,
        if_match: str | None = None,
    ) -> AsyncIterator[bytes]:
        """The bytes of ``byte_range`` of one object, as the server sends them."""
        s3 = await self._s3()
        request: GetObjectRequestTypeDef = {
            "Bucket": self.bucket,
            "Key": object_key,
            "Range": byte_range,
        }
        if if_match is not None:
            request["IfMatch"] = if_match
        response: GetObjectOutputTypeDef
        with _translated("read a blob"):
            try:
                response = await s3.get_object(**request)
            except ClientError as exc:
                code = _code(exc)
                if code in _NOT_FOUND_CODES:
                    raise BlobNotFoundError(f"No blob {key!r}.") from None
                if code == "InvalidRange":  # the blob is there; the range starts at its end
                    return
                if code == "PreconditionFailed":
                    raise _changed(key) from None
                raise
        # Leaving early (a viewer who stops watching) closes the connection rather than
        # reading the rest of the range into the void.
        async with response["Body"] as body:
            while True:
                with _translated("read a blob"):
                    piece = await body.read(chunk_size)
                if not piece:
                    return
                yield piece

    async def _stream_parts(
        self, part_keys: Sequence[str], sources: Sequence[str], heads: Sequence[_Head]
    ) -> AsyncIterator[bytes]:
        for key, source, head in zip(part_keys, sources, heads, strict=True):
            if head.size:
                async for piece in self._pieces(
                    key, source, "bytes=0-", CHUNK_SIZE, if_match=head.etag
                ):
                    yield piece

    async def _concatenate_by_copy(
        self,
        target_key: str,
        target: str,
        sources: Sequence[str],
        heads: Sequence[_Head],
    ) -> BlobInfo:
        upload = await self._start_upload(target)
        size = sum(head.size for head in heads)
        numbered = iter(enumerate(zip(sources, heads, strict=True), start=1))

        async def copy_worker() -> None:
            # Workers share one iterator: each part is copied by exactly one of them.
            for number, (source, head) in numbered:
                await upload.copy(number, source, head.etag)

        try:
            workers = min(self.copy_concurrency, len(sources))
            await _run_all([copy_worker() for _ in range(workers)])
            modified = await upload.complete()
        except BaseException:
            await upload.abort()
            raise
        return BlobInfo(key=target_key, size=size, modified=modified)


class _Writer:
    """One ``write`` in progress: a PUT while the body fits a part, a multipart upload after.

    Holds at most a part and a chunk of the body, plus, while a part is joined, its copy.
    """

    def __init__(self, store: S3BlobStore, object_key: str, max_bytes: int | None) -> None:
        self.size = 0
        self._store = store
        self._key = object_key
        self._max_bytes = max_bytes
        self._hash = hashlib.sha256()
        # The body not sent yet, as it came (views of the immutable chunks, no copy): a
        # list, not a growing bytearray, whose over-allocated capacity would stay behind
        # after each part is cut off.
        self._pending: deque[memoryview] = deque()
        self._pending_size = 0
        self._upload: _MultipartUpload | None = None

    async def add(self, chunk: bytes) -> None:
        if self._max_bytes is not None and self.size + len(chunk) > self._max_bytes:
            raise BlobTooLargeError(
                f"The blob is larger than the limit of {self._max_bytes} bytes."
            )
        self._hash.update(chunk)
        self.size += len(chunk)
        if not chunk:
            return
        self._pending.append(memoryview(chunk))
        self._pending_size += len(chunk)
        part_size = self._store.part_size
        # Strictly more than a part: a body of exactly one part stays a single PUT.
        while self._pending_size > part_size:
            if self._upload is None:
                self._upload = await self._store._start_upload(self._key)
            await self._upload.add(self._take(part_size))

    async def finish(self) -> datetime | None:
        rest = self._take(self._pending_size)
        if self._upload is None:
            return await self._store._put(self._key, rest)
        # Never empty: a part is cut only when more than a part is pending.
        await self._upload.add(rest)
        return await self._upload.complete()

    async def abort(self) -> None:
        if self._upload is not None:
            await self._upload.abort()

    def sha256(self) -> str:
        return self._hash.hexdigest()

    def _take(self, size: int) -> bytes:
        """The first ``size`` pending bytes as one piece; the rest stays pending."""
        pieces: list[memoryview] = []
        needed = size
        while needed:
            first = self._pending[0]
            if len(first) <= needed:
                pieces.append(self._pending.popleft())
                needed -= len(first)
            else:
                pieces.append(first[:needed])
                self._pending[0] = first[needed:]
                needed = 0
        self._pending_size -= size
        return b"".join(pieces)


class _MultipartUpload:
    """One multipart upload in progress: its parts so far, and how to end it."""

    def __init__(self, s3: S3Client, bucket: str, object_key: str, upload_id: str) -> None:
        self._s3 = s3
        self._bucket = bucket
        self._key = object_key
        self._id = upload_id
        self._etags: dict[int, str] = {}

    async def add(self, data: bytes) -> None:
        number = len(self._etags) + 1
        with _translated("store a part"):
            response = await self._s3.upload_part(
                Bucket=self._bucket,
                Key=self._key,
                UploadId=self._id,
                PartNumber=number,
                Body=io.BytesIO(data),
            )
        self._etags[number] = response["ETag"]

    async def copy(self, number: int, source: str, etag: str) -> None:
        with _translated("copy a part"):
            try:
                response = await self._s3.upload_part_copy(
                    Bucket=self._bucket,
                    Key=self._key,
                    UploadId=self._id,
                    PartNumber=number,
                    CopySource={"Bucket": self._bucket, "Key": source},
                    CopySourceIfMatch=etag,
                )
            except ClientError as exc:
                if _code(exc) in _NOT_FOUND_CODES:
                    raise BlobNotFoundError("A part vanished while being joined.") from None
                if _code(exc) == "PreconditionFailed":
                    raise _changed(source) from None
                raise
        self._etags[number] = response["CopyPartResult"]["ETag"]

    async def complete(self) -> datetime | None:
        parts: list[CompletedPartTypeDef] = [
            {"PartNumber": number, "ETag": etag} for number, etag in sorted(self._etags.items())
        ]
        with _translated("complete a multipart upload"):
            response = await self._s3.complete_multipart_upload(
                Bucket=self._bucket,
                Key=self._key,
                UploadId=self._id,
                MultipartUpload={"Parts": parts},
            )
        return _server_time(response["ResponseMetadata"])

    async def abort(self) -> None:
        """Aborts the upload, even if the caller is cancelled while it runs.

        Never raises: the caller is already handling the failure that led here, and an
        upload that cannot be aborted now is left to ``abort_stale_multipart_uploads``.
        """
        aborting = asyncio.ensure_future(self._abort())
        try:
            await asyncio.shield(aborting)
        except asyncio.CancelledError:
            while not aborting.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait([aborting])
            raise

    async def _abort(self) -> None:
        try:
            await self._s3.abort_multipart_upload(
                Bucket=self._bucket, Key=self._key, UploadId=self._id
            )
        except (ClientError, *_CONNECTION_ERRORS) as exc:
            logger.warning(
                "could not abort multipart upload %s of %s (%r); the sweeper will",
                self._id,
                self._key,
                exc,
            )


async def _run_all(awaitables: Sequence[Awaitable[None]]) -> None:
    """Runs ``awaitables`` concurrently; the first failure cancels the rest and is raised.

    Unlike a TaskGroup, raises the failure itself rather than an ExceptionGroup, so the
    port's errors (``BlobNotFoundError``...) reach callers as they are.
    """
    tasks = [asyncio.ensure_future(awaitable) for awaitable in awaitables]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


@contextlib.contextmanager
def _translated(action: str) -> Iterator[None]:
    """Turns "the store is not usable" failures into ``BlobStoreUnavailableError``."""
    try:
        yield
    except ClientError as exc:
        if not _is_unavailable(exc):
            raise
        _log_unavailable(action, exc)
        raise BlobStoreUnavailableError(
            "The blob store is unavailable; try again shortly."
        ) from exc
    except _CONNECTION_ERRORS as exc:
        _log_unavailable(action, exc)
        raise BlobStoreUnavailableError(
            "The blob store is unavailable; try again shortly."
        ) from exc


def _log_unavailable(action: str, exc: BaseException) -> None:
    # botocore's messages name the endpoint and the error, never the credentials.
    logger.warning("the blob store failed to %s: %s", action, exc)


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def _is_unavailable(exc: ClientError) -> bool:
    status = _status(exc)
    return (
        _code(exc) in _UNAVAILABLE_CODES
        or status >= _HTTP_SERVER_ERROR
        or status == _HTTP_FORBIDDEN
    )


def _changed(key: str) -> BlobStoreUnavailableError:
    return BlobStoreUnavailableError(
        f"The blob {key!r} changed while being read; try again.", code="blob_changed"
    )


def _copyable(sizes: Sequence[int]) -> bool:
    """Whether S3 can join objects of these sizes by server-side part copies."""
    if not 1 <= len(sizes) <= MAX_PARTS or not 0 < sizes[-1] <= MAX_PART_SIZE:
        return False
    return all(MIN_PART_SIZE <= size <= MAX_PART_SIZE for size in sizes[:-1])


def _is_key(key: str) -> bool:
    try:
        validate_key(key)
    except InvalidBlobKeyError:
        return False
    return True


def _url_prefix(path: str) -> str:
    stripped = unquote(path).strip("/")
    if not stripped:
        return ""
    try:
        validate_key(stripped)
    except InvalidBlobKeyError:
        raise ConfigError(
            "VOD_BLOB_URL", "the s3 URL's path (the key prefix) breaks the blob key rules"
        ) from None
    return stripped + "/"


def _server_time(metadata: ResponseMetadataTypeDef) -> datetime | None:
    """The server's clock at the response (its ``Date``), as S3 stamps the object."""
    date = metadata.get("HTTPHeaders", {}).get("date")
    if date is None:
        return None
    try:
        return parsedate_to_datetime(date).astimezone(UTC)
    except (TypeError, ValueError):
        return None


@functools.cache
def _shared_session() -> AioSession:
    """The session every store of this process makes its client from.

    A session loads S3's service model once (≈ 0.1 s) and caches it; clients made from one
    session share nothing else that matters.
    """
    return AioSession()


def _utc_now() -> datetime:
    return datetime.now(UTC)
