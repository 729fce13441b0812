"""The web front end's files from the gateway: types, caching, security headers, 404s, and
no way out of ``gateway/web`` whatever the path says."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import aiohttp
import pytest

from gateway.handlers.web import WEB_ROOT, web_files
from tests.api.conftest import GatewayFactory, Upstreams


async def assert_not_found(response: aiohttp.ClientResponse, code: str) -> None:
    assert response.status == 404
    assert response.content_type == "application/problem+json"
    body = await response.json(content_type="application/problem+json")
    assert body["status"] == 404
    assert body["code"] == code


@pytest.mark.parametrize(
    ("path", "content_type", "starts_with"),
    [
        ("/", "text/html", "<!doctype html>"),
        ("/static/app.css", "text/css", "/*"),
        ("/static/js/app.js", "text/javascript", "//"),
        ("/static/js/hash-worker.js", "text/javascript", "//"),
    ],
)
async def test_files_have_their_type_and_revalidate_by_etag(
    gateway: GatewayFactory, path: str, content_type: str, starts_with: str
) -> None:
    client = await gateway()
    response = await client.get(path)
    assert response.status == 200
    assert response.content_type == content_type
    assert response.charset == "utf-8"
    assert (await response.text()).startswith(starts_with)
    # Always revalidated, so a deploy reaches browsers at once; unchanged files cost a 304.
    assert response.headers["Cache-Control"] == "no-cache"
    etag = response.headers["ETag"]
    assert response.headers["Last-Modified"]
    again = await client.get(path, headers={"If-None-Match": etag})
    assert again.status == 304
    assert await again.read() == b""


async def test_every_file_of_the_front_end_is_served(gateway: GatewayFactory) -> None:
    client = await gateway()
    files = web_files()
    assert {"index.html", "app.css", "js/app.js", "js/hash-worker.js"} <= set(files)
    for relative, path in files.items():
        response = await client.get(f"/static/{relative}")
        assert response.status == 200, relative
        assert await response.read() == path.read_bytes()


async def test_security_headers_forbid_inline_code_and_other_origins(
    gateway: GatewayFactory,
) -> None:
    client = await gateway()
    for path in ("/", "/static/js/app.js"):
        headers = (await client.get(path)).headers
        policy = dict(
            directive.strip().split(" ", 1)
            for directive in headers["Content-Security-Policy"].split(";")
        )
        assert "unsafe-inline" not in headers["Content-Security-Policy"]
        assert "unsafe-eval" not in headers["Content-Security-Policy"]
        assert policy["default-src"] == "'self'"
        assert policy["script-src"] == "'self'"
        assert policy["object-src"] == "'none'"
        assert policy["frame-ancestors"] == "'none'"
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert headers["Referrer-Policy"] == "no-referrer"


def test_the_page_has_no_inline_script_or_style_the_policy_would_block() -> None:
    page = (WEB_ROOT / "index.html").read_text()
    assert "<script>" not in page
    assert "<style" not in page
    assert " style=" not in page
    assert not re.search(r"\son[a-z]+\s*=", page)  # no onclick= and friends


@pytest.mark.parametrize(
    "path",
    ["/static/nope.js", "/static/js/", "/static/js", "/static/index.htm", "/static/APP.CSS"],
)
async def test_unknown_asset_is_a_problem_document(
    gateway: GatewayFactory, upstreams: Upstreams, path: str
) -> None:
    client = await gateway()
    await assert_not_found(await client.get(path), "static_not_found")
    assert upstreams.api.seen == upstreams.stream.seen == []


async def raw_get(host: str, port: int, target: str) -> tuple[int, bytes]:
    """One GET with the request target exactly as given: clients tidy up "..", this
    does not, which is what an attacker would send."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        answer = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    status = int(answer.split(b" ", 2)[1])
    return status, answer


@pytest.mark.parametrize(
    "target",
    [
        "/static/../handlers/web.py",
        "/static/../../pyproject.toml",
        "/static/js/../../handlers/web.py",
        "/static/%2e%2e/handlers/web.py",
        "/static/%2E%2E%2Fhandlers%2Fweb.py",
        "/static/..%2f..%2fpyproject.toml",
        "/static/%252e%252e/handlers/web.py",
        "/static//etc/passwd",
        "/static/..\\handlers\\web.py",
        "/static/js/app.js%00.py",
    ],
)
async def test_no_path_leaves_the_front_end(gateway: GatewayFactory, target: str) -> None:
    client = await gateway()
    assert client.server.host is not None
    assert client.server.port is not None
    status, answer = await raw_get(client.server.host, client.server.port, target)
    assert status in (400, 404), answer[:200]
    secrets = [
        (WEB_ROOT.parent / "handlers" / "web.py").read_bytes()[:200],
        b"[project]",
        b"root:x:0:0",
    ]
    for secret in secrets:
        assert secret not in answer


def test_the_file_table_holds_only_front_end_files(tmp_path: Path) -> None:
    (tmp_path / "js").mkdir()
    (tmp_path / "index.html").write_text("<!doctype html>")
    (tmp_path / "js" / "app.js").write_text("//")
    (tmp_path / "notes.txt").write_text("not served")
    (tmp_path / "server.py").write_text("not served")
    outside = tmp_path.parent / f"{tmp_path.name}-secret.js"
    outside.write_text("secret")
    (tmp_path / "js" / "linked.js").symlink_to(outside)
    files = web_files(tmp_path)
    # Only the page's own types, and no symlink out of the tree.
    assert set(files) == {"index.html", "js/app.js"}
