"""Comments through the gateway: list oldest first, post, delete, counts, anti-spam."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import delete

from shared.db.schema import outbox
from shared.resources import DB
from shared.settings import Settings
from tests.clients import Publisher
from tests.stack import Stack, start_stack


async def problem(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status == status, await response.text()
    assert response.headers["Content-Type"].startswith("application/problem+json")
    body: dict[str, Any] = await response.json(content_type=None)
    assert body["code"] == code, body
    return body


@pytest.fixture(params=["embedded", pytest.param("real", marks=pytest.mark.integration)])
def any_stack(request: pytest.FixtureRequest) -> Stack:
    stack: Stack = request.getfixturevalue("stack" if request.param == "embedded" else "real_stack")
    return stack


async def publisher(stack: Stack, prefix: str) -> Publisher:
    name = f"{prefix}_{os.urandom(3).hex()}"
    return Publisher(stack, name, await stack.new_user(name))


def comments_url(video_id: str) -> str:
    return f"/api/v1/videos/{video_id}/comments"


async def post(stack: Stack, who: Publisher, video_id: str, content: Any) -> Any:
    return await stack.gateway.post(
        comments_url(video_id), json={"content": content}, headers=who.auth
    )


async def comment_count(stack: Stack, video_id: str) -> int:
    video = await (await stack.gateway.get(f"/api/v1/videos/{video_id}")).json()
    count: int = video["comment_count"]
    return count


async def test_post_list_delete_and_the_count_follows(any_stack: Stack) -> None:
    alice = await publisher(any_stack, "alice")
    bob = await publisher(any_stack, "bob")
    video = await alice.video()
    assert await comment_count(any_stack, video["id"]) == 0  # now cached

    posted = []
    for i in range(5):
        response = await post(any_stack, bob if i % 2 else alice, video["id"], f"  comment {i} ")
        assert response.status == 201, await response.text()
        body = await response.json()
        assert response.headers["Location"] == f"{comments_url(video['id'])}/{body['id']}"
        posted.append(body)
    assert posted[1]["author"]["username"] == bob.username
    assert posted[0]["content"] == "comment 0"
    assert await comment_count(any_stack, video["id"]) == 5

    seen: list[str] = []
    cursor = None
    while True:
        query = f"?limit=2&cursor={cursor}" if cursor else "?limit=2"
        page = await (await any_stack.gateway.get(comments_url(video["id"]) + query)).json()
        seen += [c["id"] for c in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [c["id"] for c in posted]  # oldest first, every one once

    # Bob deletes his own; Alice (the video's owner) deletes one of Bob's.
    url = f"{comments_url(video['id'])}/{posted[1]['id']}"
    assert (await any_stack.gateway.delete(url, headers=bob.auth)).status == 204
    url = f"{comments_url(video['id'])}/{posted[3]['id']}"
    assert (await any_stack.gateway.delete(url, headers=alice.auth)).status == 204
    # Bob cannot delete Alice's comment on Alice's video.
    url = f"{comments_url(video['id'])}/{posted[0]['id']}"
    await problem(await any_stack.gateway.delete(url, headers=bob.auth), 403, "comment_forbidden")
    # A repeated delete is a 404.
    url = f"{comments_url(video['id'])}/{posted[1]['id']}"
    await problem(await any_stack.gateway.delete(url, headers=bob.auth), 404, "comment_not_found")
    assert await comment_count(any_stack, video["id"]) == 3
    listed = await (await any_stack.gateway.get(comments_url(video["id"]))).json()
    assert [c["id"] for c in listed["items"]] == [posted[i]["id"] for i in (0, 2, 4)]


async def test_errors(any_stack: Stack) -> None:
    alice = await publisher(any_stack, "alice")
    video = await alice.video()
    other = await alice.video("Another")
    unknown = "01NOSUCHVIDEO000000000000"
    await problem(await any_stack.gateway.get(comments_url(unknown)), 404, "video_not_found")
    await problem(await post(any_stack, alice, unknown, "hi"), 404, "video_not_found")
    await problem(
        await any_stack.gateway.post(comments_url(video["id"]), json={"content": "hi"}),
        401,
        "unauthorized",
    )
    for content in ("", "   ", "x" * 2001, 5, None):
        await problem(await post(any_stack, alice, video["id"], content), 400, "validation_failed")
    assert (await post(any_stack, alice, video["id"], "x" * 2000)).status == 201
    for query in ("?cursor=garbage", "?limit=0", "?limit=101", "?limit=x"):
        response = await any_stack.gateway.get(comments_url(video["id"]) + query)
        assert response.status == 400, query
    posted = await (await post(any_stack, alice, video["id"], "mine")).json()
    # A comment is addressed under its own video only.
    url = f"{comments_url(other['id'])}/{posted['id']}"
    await problem(await any_stack.gateway.delete(url, headers=alice.auth), 404, "comment_not_found")
    url = f"{comments_url(video['id'])}/..%2Fx"
    await problem(await any_stack.gateway.delete(url, headers=alice.auth), 404, "comment_not_found")
    # A deleted video's comments are gone with it.
    assert (
        await any_stack.gateway.delete(f"/api/v1/videos/{video['id']}", headers=alice.auth)
    ).status == 202
    await problem(await any_stack.gateway.get(comments_url(video["id"])), 404, "video_not_found")
    await problem(await post(any_stack, alice, video["id"], "late"), 404, "video_not_found")
    # The run's MariaDB outbox is shared: leave no event behind for other tests to find.
    async with any_stack.servers["api"].app[DB].transaction() as conn:
        await conn.execute(delete(outbox).where(outbox.c.payload.contains(video["id"])))


@pytest.fixture
async def strict_stack(
    aiohttp_server: Any, aiohttp_client: Any, make_settings: Callable[..., Settings]
) -> Stack:
    settings = make_settings(VOD_COMMENT_RATE="3/3600", VOD_BLOCKED_WORDS="spam, Casino ")
    return await start_stack(settings, aiohttp_server, aiohttp_client)


async def test_rate_limit_and_blocked_words(strict_stack: Stack) -> None:
    alice = await publisher(strict_stack, "alice")
    bob = await publisher(strict_stack, "bob")
    video = await alice.video()
    body = await problem(
        await post(strict_stack, alice, video["id"], "Visit my CASINO now"), 400, "blocked_words"
    )
    assert "casino" not in body["detail"].lower()  # the filter's words stay private
    for i in range(3):
        assert (await post(strict_stack, alice, video["id"], f"fine {i}")).status == 201
    limited = await post(strict_stack, alice, video["id"], "one too many")
    body = await problem(limited, 429, "comments_rate_limited")
    assert 0 < int(limited.headers["Retry-After"]) <= 3600
    # Per user: Bob is not limited by Alice's comments.
    assert (await post(strict_stack, bob, video["id"], "hello")).status == 201
    assert await comment_count(strict_stack, video["id"]) == 4
