"""The one error hierarchy of vod.

Every error a client can cause is an ``AppError``; ``shared.web`` renders it as an
RFC 9457 problem document with a stable machine-readable ``code``. Services and
repositories raise these, never ``aiohttp.web.HTTP*``.

    AppError
    ├── BadRequestError            400  (ValidationError: a field failed its rule)
    ├── UnauthorizedError          401
    ├── ForbiddenError             403
    ├── NotFoundError              404
    ├── MethodNotAllowedError      405
    ├── ConflictError              409
    ├── GoneError                  410  (it existed, and is gone for good)
    ├── PayloadTooLargeError       413
    ├── UnsupportedMediaTypeError  415
    ├── UnprocessableError         422
    ├── RateLimitedError           429  (carries retry_after)
    ├── BadGatewayError            502
    ├── ServiceUnavailableError    503  (a back end is down)
    └── GatewayTimeoutError        504

``ConfigError`` is separate: it stops start-up and never reaches a client.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar


class AppError(Exception):
    """An error with an HTTP status, a stable ``code`` and a human ``detail``."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"
    title: ClassVar[str] = "Internal Server Error"

    def __init__(
        self,
        detail: str | None = None,
        *,
        code: str | None = None,
        extra: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(detail or self.title)
        self.detail = detail or self.title
        # Instance override of the class code: one status can carry many stable codes
        # ("video_not_found", "upload_not_found", ...).
        self.instance_code = code or self.code
        self.extra: dict[str, Any] = dict(extra or {})
        self.headers: dict[str, str] = dict(headers or {})


class BadRequestError(AppError):
    status = 400
    code = "bad_request"
    title = "Bad Request"


class ValidationError(BadRequestError):
    """One or more fields broke their rule; ``errors`` lists them for the client."""

    code = "validation_failed"

    def __init__(self, detail: str, *, errors: list[dict[str, str]] | None = None) -> None:
        super().__init__(detail, extra={"errors": errors} if errors else None)


class UnauthorizedError(AppError):
    status = 401
    code = "unauthorized"
    title = "Unauthorized"

    def __init__(self, detail: str | None = None, *, code: str | None = None) -> None:
        super().__init__(detail, code=code, headers={"WWW-Authenticate": 'Bearer realm="vod"'})


class ForbiddenError(AppError):
    status = 403
    code = "forbidden"
    title = "Forbidden"


class NotFoundError(AppError):
    status = 404
    code = "not_found"
    title = "Not Found"


class MethodNotAllowedError(AppError):
    status = 405
    code = "method_not_allowed"
    title = "Method Not Allowed"


class ConflictError(AppError):
    status = 409
    code = "conflict"
    title = "Conflict"


class GoneError(AppError):
    status = 410
    code = "gone"
    title = "Gone"


class PayloadTooLargeError(AppError):
    status = 413
    code = "payload_too_large"
    title = "Content Too Large"


class UnsupportedMediaTypeError(AppError):
    status = 415
    code = "unsupported_media_type"
    title = "Unsupported Media Type"


class UnprocessableError(AppError):
    status = 422
    code = "unprocessable"
    title = "Unprocessable Content"


class RateLimitedError(AppError):
    status = 429
    code = "rate_limited"
    title = "Too Many Requests"

    def __init__(
        self,
        detail: str | None = None,
        *,
        retry_after: int = 1,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(
            detail,
            code=code,
            extra={"retry_after": retry_after},
            headers={**(headers or {}), "Retry-After": str(retry_after)},
        )


class BadGatewayError(AppError):
    status = 502
    code = "bad_gateway"
    title = "Bad Gateway"


class ServiceUnavailableError(AppError):
    status = 503
    code = "service_unavailable"
    title = "Service Unavailable"


class GatewayTimeoutError(AppError):
    status = 504
    code = "gateway_timeout"
    title = "Gateway Timeout"


class ConfigError(Exception):
    """Bad or missing configuration: start-up stops with one line naming the variable."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable}: {problem}")
        self.variable = variable
        self.problem = problem
