"""The one frozen settings object, read from the environment once in each ``__main__``.

Services mode reads everything from ``VOD_*`` variables and refuses to start when a
required one is missing; the standalone launcher passes ``STANDALONE_DEFAULTS`` so that
``make run`` needs nothing. Tests build settings from a plain dict.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

from shared.errors import ConfigError
from shared.logging import LOG_FORMATS

T = TypeVar("T")

MIB = 1024 * 1024
GIB = 1024 * MIB

# Values a human may have copied from an example file; a secret set to one of these
# is refused rather than trusted.
PLACEHOLDER_SECRETS = frozenset({"changeme", "change-me", "secret", "xxx", "todo", "<secret>"})

STANDALONE_DEFAULTS: Mapping[str, str] = {
    "VOD_DB_URL": "sqlite+aiosqlite:///var/vod.db",
    "VOD_REDIS_URL": "memory://",
    "VOD_AMQP_URL": "memory://",
    "VOD_BLOB_URL": "file://./var/blobs",
    "VOD_API_URL": "http://127.0.0.1:8001",
    "VOD_STREAM_URL": "http://127.0.0.1:8002",
    "VOD_SCHEDULER_URL": "http://127.0.0.1:8003",
    "VOD_DB_MIGRATE": "1",
}

MIN_SECRET_LENGTH = 16
MAX_PORT = 65535
_NAMESPACE_RE = re.compile(r"^[a-z][a-z0-9_]{0,39}$")


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """Everything a vod process can be told. Immutable; built once."""

    db_url: str = field(repr=False)
    redis_url: str = field(repr=False)
    amqp_url: str = field(repr=False)
    blob_url: str = field(repr=False)  # an s3:// URL may carry credentials
    api_url: str
    stream_url: str
    scheduler_url: str
    internal_token: str = field(repr=False)
    jwt_private_key: str | None = field(default=None, repr=False)
    jwt_public_key: str | None = field(default=None, repr=False)
    # Prefix of every Redis key, RabbitMQ exchange and queue: lets test runs (or two
    # deployments sharing a broker) never see each other's data.
    namespace: str = "vod"
    host: str = "127.0.0.1"
    gateway_port: int = 8000
    api_port: int = 8001
    stream_port: int = 8002
    scheduler_port: int = 8003
    # The gateway's operators' listener (/metrics and the detailed /readyz, docs/security.md):
    # a second socket, never the public one; 127.0.0.1 unless told (the pod IP in Kubernetes).
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 8090
    db_migrate: bool = False
    # A MySQL read replica for reads that may lag (lists, search); None = all on the primary.
    db_read_url: str | None = field(default=None, repr=False)
    # After a user's write, their reads stay on the primary this long (replica lag bound).
    db_read_your_writes_seconds: float = 5.0
    cors_origins: tuple[str, ...] = ()
    # The page's session cookies are Secure even when the gateway is reached over plain
    # http: TLS ends at a balancer in front of it (api_service.session_cookies).
    secure_cookies: bool = False
    # Where clients reach the gateway (``https://vod.example.com``, maybe with a path
    # prefix), for URLs vod hands out (the tus ``Location``); None: such URLs are relative.
    # Never taken from a request's Host, which any client may set.
    public_url: str | None = None
    max_upload_bytes: int = 20 * GIB
    # Bytes each user may keep in videos and uploads; 0 = unlimited (stream_service).
    user_quota_bytes: int = 0
    # Uploads (native and tus) each user may have in progress at once (stream_service).
    max_uploads_in_progress: int = 20
    max_json_bytes: int = 64 * 1024
    stream_max_connections: int = 256
    stream_max_per_client: int = 8
    # A streamed response (the stream service's, and the gateway's relay of any) whose
    # client takes no bytes this long is dropped, freeing its stream slot (shared.stall).
    stream_stall_seconds: float = 30.0
    upstream_connect_timeout: float = 5.0
    upstream_read_timeout: float = 60.0
    # Slow clients at the gateway (docs/security.md): the time to send a request's
    # headers (from connecting, or from the end of the previous response, which also
    # bounds an idle keep-alive connection); the longest wait for the next piece of a
    # body; and the slowest body rate tolerated (bytes/s, 0 = no rate floor).
    client_header_timeout: float = 10.0
    client_body_timeout: float = 30.0
    client_min_body_rate: int = 1024
    # SIGTERM: readiness (and /healthz) turn 503 at once and the process keeps serving for
    # shutdown_drain_seconds, so balancers and the gateway stop sending new requests; then
    # it stops accepting connections and in-flight requests get shutdown_timeout to finish.
    shutdown_drain_seconds: float = 0.0
    shutdown_timeout: float = 30.0
    log_level: str = "INFO"
    # "auto": short text lines when stderr is a terminal, JSON lines otherwise (shared.logging).
    log_format: str = "auto"
    # The gateway, the api and the scheduler run on uvloop unless this is off (the
    # standard loop, to rule uvloop out when chasing a problem); see shared.runner.
    uvloop: bool = True
    # Argon2id cost; the defaults are argon2-cffi's (RFC 9106 "low memory"). Tests lower them.
    argon2_time_cost: int = 3
    argon2_memory_kib: int = 65536
    # Password hashes (sign-up, sign-in, rehash) computing at once in one api process; more
    # wait their turn. Each takes argon2_memory_kib, so this bounds that memory.
    password_hash_concurrency: int = 4
    # Failed sign-ins tolerated per username (and 5x that per client address) in a window.
    login_max_failures: int = 10
    login_window_seconds: int = 900
    # Sign-ups per client address as (count, seconds): each costs a password hash and opens
    # a fresh allowance of failed sign-ins.
    signup_rate: tuple[int, float] = (20, 3600.0)
    # Lifetime of an access token (the api signs, the gateway checks; live sockets end
    # with it). Tests shorten it.
    access_token_seconds: int = 900
    # Per-user rate limits as (count, seconds): at most count in each window of seconds.
    comment_rate: tuple[int, float] = (10, 60.0)
    danmaku_rate: tuple[int, float] = (10, 10.0)
    # Words (case-insensitive substrings) that reject a comment and hide a danmaku.
    blocked_words: tuple[str, ...] = ()
    # Seconds between the live channel's {"type": "viewers"} pushes.
    live_viewer_interval: float = 5.0
    var_dir: Path = Path("var")

    @classmethod
    def from_env(
        cls, env: Mapping[str, str], *, defaults: Mapping[str, str] | None = None
    ) -> Settings:
        """Build settings from ``env``; ``defaults`` fill what ``env`` lacks.

        Raises ``ConfigError`` naming the first variable that is missing or malformed.
        """
        source: dict[str, str] = dict(defaults or {})
        source.update({k: v for k, v in env.items() if k.startswith("VOD_") and v != ""})
        reader = _Reader(source)
        internal_token = source.get("VOD_INTERNAL_TOKEN")
        if internal_token is None and defaults is not None:
            # Standalone: the four apps share one process, so a fresh random token
            # per start is all they need.
            internal_token = secrets.token_urlsafe(32)
        return cls(
            db_url=reader.url("VOD_DB_URL", ("mysql+aiomysql", "sqlite+aiosqlite")),
            redis_url=reader.url("VOD_REDIS_URL", ("redis", "rediss", "memory")),
            amqp_url=reader.url("VOD_AMQP_URL", ("amqp", "amqps", "memory")),
            blob_url=reader.url("VOD_BLOB_URL", ("file", "s3")),
            api_url=reader.upstreams("VOD_API_URL"),
            stream_url=reader.upstreams("VOD_STREAM_URL"),
            scheduler_url=reader.upstreams("VOD_SCHEDULER_URL"),
            internal_token=_secret("VOD_INTERNAL_TOKEN", internal_token),
            jwt_private_key=reader.key_material("VOD_JWT_PRIVATE_KEY"),
            jwt_public_key=reader.key_material("VOD_JWT_PUBLIC_KEY"),
            namespace=reader.parse("VOD_NAMESPACE", "vod", _namespace),
            host=source.get("VOD_HOST", "127.0.0.1"),
            gateway_port=reader.parse("VOD_GATEWAY_PORT", "8000", _port),
            api_port=reader.parse("VOD_API_PORT", "8001", _port),
            stream_port=reader.parse("VOD_STREAM_PORT", "8002", _port),
            scheduler_port=reader.parse("VOD_SCHEDULER_PORT", "8003", _port),
            metrics_host=source.get("VOD_METRICS_HOST", "127.0.0.1"),
            metrics_port=reader.parse("VOD_METRICS_PORT", "8090", _port),
            db_migrate=reader.parse("VOD_DB_MIGRATE", "0", _bool),
            db_read_url=_read_replica_url(reader, source),
            db_read_your_writes_seconds=reader.parse(
                "VOD_DB_READ_YOUR_WRITES_SECONDS", "5", _positive_float
            ),
            cors_origins=reader.parse("VOD_CORS_ORIGINS", "", _origins),
            secure_cookies=reader.parse("VOD_SECURE_COOKIES", "0", _bool),
            public_url=reader.parse("VOD_PUBLIC_URL", "", _public_url),
            max_upload_bytes=reader.parse("VOD_MAX_UPLOAD_BYTES", str(20 * GIB), _positive_int),
            user_quota_bytes=reader.parse("VOD_USER_QUOTA_BYTES", "0", _non_negative_int),
            max_uploads_in_progress=reader.parse(
                "VOD_MAX_UPLOADS_IN_PROGRESS", "20", _positive_int
            ),
            max_json_bytes=reader.parse("VOD_MAX_JSON_BYTES", str(64 * 1024), _positive_int),
            stream_max_connections=reader.parse("VOD_STREAM_MAX_CONNECTIONS", "256", _positive_int),
            stream_max_per_client=reader.parse("VOD_STREAM_MAX_PER_CLIENT", "8", _positive_int),
            stream_stall_seconds=reader.parse("VOD_STREAM_STALL_SECONDS", "30", _positive_float),
            upstream_connect_timeout=reader.parse(
                "VOD_UPSTREAM_CONNECT_TIMEOUT", "5", _positive_float
            ),
            upstream_read_timeout=reader.parse("VOD_UPSTREAM_READ_TIMEOUT", "60", _positive_float),
            client_header_timeout=reader.parse("VOD_CLIENT_HEADER_TIMEOUT", "10", _positive_float),
            client_body_timeout=reader.parse("VOD_CLIENT_BODY_TIMEOUT", "30", _positive_float),
            client_min_body_rate=reader.parse(
                "VOD_CLIENT_MIN_BODY_RATE", "1024", _non_negative_int
            ),
            shutdown_drain_seconds=reader.parse(
                "VOD_SHUTDOWN_DRAIN_SECONDS", "0", _non_negative_float
            ),
            shutdown_timeout=reader.parse("VOD_SHUTDOWN_TIMEOUT", "30", _positive_float),
            log_level=reader.parse("VOD_LOG_LEVEL", "INFO", _log_level),
            log_format=reader.parse("VOD_LOG_FORMAT", "auto", _log_format),
            uvloop=reader.parse("VOD_UVLOOP", "1", _bool),
            argon2_time_cost=reader.parse("VOD_ARGON2_TIME_COST", "3", _positive_int),
            argon2_memory_kib=reader.parse("VOD_ARGON2_MEMORY_KIB", "65536", _positive_int),
            password_hash_concurrency=reader.parse(
                "VOD_PASSWORD_HASH_CONCURRENCY", "4", _positive_int
            ),
            login_max_failures=reader.parse("VOD_LOGIN_MAX_FAILURES", "10", _positive_int),
            login_window_seconds=reader.parse("VOD_LOGIN_WINDOW_SECONDS", "900", _positive_int),
            signup_rate=reader.parse("VOD_SIGNUP_RATE", "20/3600", _rate),
            access_token_seconds=reader.parse("VOD_ACCESS_TOKEN_SECONDS", "900", _positive_int),
            comment_rate=reader.parse("VOD_COMMENT_RATE", "10/60", _rate),
            danmaku_rate=reader.parse("VOD_DANMAKU_RATE", "10/10", _rate),
            blocked_words=tuple(
                w.strip().casefold()
                for w in source.get("VOD_BLOCKED_WORDS", "").split(",")
                if w.strip()
            ),
            live_viewer_interval=reader.parse("VOD_LIVE_VIEWER_INTERVAL", "5", _positive_float),
            var_dir=Path(source.get("VOD_VAR_DIR", "var")),
        )

    def require_private_key(self) -> str:
        """The signing key; services mode refuses to start the api without it."""
        if self.jwt_private_key is None:
            raise ConfigError("VOD_JWT_PRIVATE_KEY", "is required but not set")
        return self.jwt_private_key

    def require_public_key(self) -> str:
        """The verifying key; services mode refuses to start the gateway without it."""
        if self.jwt_public_key is None:
            raise ConfigError("VOD_JWT_PUBLIC_KEY", "is required but not set")
        return self.jwt_public_key

    def upstream_urls(self, service: str) -> tuple[str, ...]:
        """The comma-separated replica URLs of ``service`` ("api", "stream", "scheduler")."""
        raw = {"api": self.api_url, "stream": self.stream_url, "scheduler": self.scheduler_url}[
            service
        ]
        return tuple(u.strip().rstrip("/") for u in raw.split(",") if u.strip())


class _Reader:
    def __init__(self, source: Mapping[str, str]) -> None:
        self._source = source

    def required(self, name: str) -> str:
        value = self._source.get(name)
        if value is None:
            raise ConfigError(name, "is required but not set")
        return value

    def url(self, name: str, schemes: tuple[str, ...]) -> str:
        value = self.required(name)
        scheme = urlsplit(value).scheme
        if scheme not in schemes:
            raise ConfigError(
                name, f"scheme {scheme or '(none)'!r} is not one of {', '.join(schemes)}"
            )
        return value

    def upstreams(self, name: str) -> str:
        value = self.required(name)
        for part in value.split(","):
            parsed = urlsplit(part.strip())
            if parsed.scheme not in ("http", "https") or not parsed.netloc:
                raise ConfigError(name, f"{part.strip()!r} is not an http(s) URL")
        return value

    def key_material(self, name: str) -> str | None:
        """A PEM given inline or as the path of a file holding it."""
        value = self._source.get(name)
        if value is None or value.lstrip().startswith("-----BEGIN"):
            return value
        try:
            return Path(value).read_text()
        except OSError as exc:
            raise ConfigError(
                name, f"is neither a PEM nor a readable file ({exc.strerror})"
            ) from None

    def parse(self, name: str, default: str, convert: Callable[[str], T]) -> T:
        raw = self._source.get(name, default)
        try:
            return convert(raw)
        except ValueError as exc:
            raise ConfigError(name, f"{raw!r} is not valid: {exc}") from None


def _read_replica_url(reader: _Reader, source: Mapping[str, str]) -> str | None:
    """VOD_DB_READ_URL: optional, MySQL, and only beside a MySQL primary."""
    if "VOD_DB_READ_URL" not in source:
        return None
    url = reader.url("VOD_DB_READ_URL", ("mysql+aiomysql",))
    if urlsplit(source.get("VOD_DB_URL", "")).scheme != "mysql+aiomysql":
        raise ConfigError("VOD_DB_READ_URL", "needs a MySQL VOD_DB_URL (replicas are MySQL's)")
    return url


def _secret(name: str, value: str | None) -> str:
    if value is None:
        raise ConfigError(name, "is required but not set")
    if value.strip().lower() in PLACEHOLDER_SECRETS or len(value) < MIN_SECRET_LENGTH:
        raise ConfigError(name, "must be a real secret of at least 16 characters")
    return value


def _port(raw: str) -> int:
    port = int(raw)
    if not 0 < port <= MAX_PORT:
        raise ValueError("port must be 1..65535")
    return port


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value <= 0:
        raise ValueError("must be positive")
    return value


def _non_negative_int(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise ValueError("must be 0 or more")
    return value


def _non_negative_float(raw: str) -> float:
    value = float(raw)
    if not value >= 0:  # also refuses nan
        raise ValueError("must be 0 or more")
    return value


def _positive_float(raw: str) -> float:
    value = float(raw)
    if not value > 0:  # also refuses nan, which no clock or timeout can use
        raise ValueError("must be positive")
    return value


def _rate(raw: str) -> tuple[int, float]:
    count, slash, seconds = raw.partition("/")
    if not slash:
        raise ValueError("expected COUNT/SECONDS, e.g. 10/60")
    return _positive_int(count.strip()), _positive_float(seconds.strip())


def _bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected 1/0, true/false, yes/no or on/off")


def _namespace(raw: str) -> str:
    if not _NAMESPACE_RE.match(raw):
        raise ValueError("lower-case letters, digits and _, starting with a letter, ≤ 40")
    return raw


def _origins(raw: str) -> tuple[str, ...]:
    """Browser origins (``scheme://host[:port]``, or ``*`` for any), as browsers send them."""
    origins = []
    for part in (p.strip() for p in raw.split(",")):
        if not part:
            continue
        if part == "*":
            origins.append(part)
            continue
        parsed = urlsplit(part.rstrip("/"))
        # .port raises ValueError for a port that is not a number in range.
        if parsed.scheme not in ("http", "https") or not parsed.hostname or parsed.port == 0:
            raise ValueError(f"{part!r} is not an origin like https://example.com[:port] or *")
        if parsed.path or parsed.query or parsed.fragment or parsed.username:
            raise ValueError(f"{part!r} has more than scheme, host and port")
        # Browsers send the origin's scheme and host lower-cased (the port as written).
        origins.append(f"{parsed.scheme}://{parsed.netloc.lower()}")
    return tuple(origins)


def _log_format(raw: str) -> str:
    log_format = raw.lower()
    if log_format not in LOG_FORMATS:
        raise ValueError("expected auto, json or text")
    return log_format


def _public_url(raw: str) -> str | None:
    """``scheme://host[:port][/prefix]``; "" (unset) is None."""
    if not raw.strip():
        return None
    parsed = urlsplit(raw.strip())
    # .port raises ValueError for a port that is not a number in range.
    if parsed.scheme not in ("http", "https") or not parsed.hostname or parsed.port == 0:
        raise ValueError(f"{raw!r} is not a URL like https://vod.example.com[/prefix]")
    if parsed.query or parsed.fragment or parsed.username or parsed.password:
        raise ValueError(f"{raw!r} has a query, a fragment or credentials")
    return f"{parsed.scheme}://{parsed.netloc}{parsed.path.rstrip('/')}"


def _log_level(raw: str) -> str:
    level = raw.upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError("expected DEBUG, INFO, WARNING or ERROR")
    return level
