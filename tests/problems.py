"""The one check of an RFC 9457 problem document that every API test shares."""

from __future__ import annotations

from typing import Any


async def problem(response: Any, status: int, code: str) -> dict[str, Any]:
    """Asserts ``response`` is the problem document ``code`` with ``status``; returns it.

    ``response`` is an aiohttp client response (real or from the test client).
    """
    assert response.status == status, await response.text()
    assert response.headers["Content-Type"].startswith("application/problem+json")
    body: dict[str, Any] = await response.json(content_type=None)
    assert body["code"] == code, body
    assert body["status"] == status, body
    assert body["type"] == f"urn:vod:problem:{code}", body
    assert body["title"], body
    return body
