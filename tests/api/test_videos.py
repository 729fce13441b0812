"""Videos through the gateway: publish a finished upload, read, list, search, edit, delete."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import orjson
import pytest
from sqlalchemy import select

from shared.db import Database
from shared.db.schema import blobs, outbox
from shared.events import VIDEO_DELETED
from shared.layout import video_cache_key
from shared.resources import DB, KV
from tests.clients import Publisher
from tests.problems import problem
from tests.stack import Stack


@pytest.fixture(params=["embedded", pytest.param("real", marks=pytest.mark.integration)])
def any_stack(request: pytest.FixtureRequest) -> Stack:
    """Every test here runs on the embedded back ends and on MariaDB, Redis, RabbitMQ."""
    stack: Stack = request.getfixturevalue("stack" if request.param == "embedded" else "real_stack")
    return stack


@pytest.fixture
async def alice(any_stack: Stack) -> Publisher:
    # Unique names: the real database is shared by every test of the run.
    name = f"alice_{os.urandom(3).hex()}"
    return Publisher(any_stack, name, await any_stack.new_user(name))


@pytest.fixture
async def bob(any_stack: Stack) -> Publisher:
    name = f"bob_{os.urandom(3).hex()}"
    return Publisher(any_stack, name, await any_stack.new_user(name))


def database(stack: Stack) -> Database:
    return stack.servers["api"].app[DB]


async def test_publish_a_finished_upload(any_stack: Stack, alice: Publisher) -> None:
    video = await alice.video("Cats on a piano", "Two cats, one piano.")
    assert video["title"] == "Cats on a piano"
    assert video["author"]["username"] == alice.username
    assert video["status"] == "processing"
    assert video["stream_url"] == f"/api/v1/videos/{video['id']}/stream"
    assert video["thumbnail_url"] is None
    assert video["comment_count"] == 0
    fetched = await (await any_stack.gateway.get(f"/api/v1/videos/{video['id']}")).json()
    assert fetched == video
    # The blob is now referenced: the collector must leave it alone.
    async with database(any_stack).connect() as conn:
        row = (
            await conn.execute(select(blobs).where(blobs.c.content_hash == video["content_hash"]))
        ).one()
    assert row.ref_count == 1
    assert row.zero_since is None


async def test_publish_errors(any_stack: Stack, alice: Publisher, bob: Publisher) -> None:
    upload_id = await alice.upload()
    await problem(await bob.publish(upload_id=upload_id), 403, "upload_forbidden")
    await problem(
        await alice.publish(upload_id="01NOSUCHUPLOAD0000000000000"), 404, "upload_not_found"
    )
    await problem(await alice.publish(upload_id="../../etc"), 404, "upload_not_found")
    started = await alice.uploader.start(os.urandom(5000))
    await problem(await alice.publish(upload_id=started["upload_id"]), 409, "upload_incomplete")
    assert (await alice.publish(upload_id=upload_id)).status == 201
    await problem(await alice.publish(upload_id=upload_id), 409, "upload_already_used")
    anonymous = await any_stack.gateway.post(
        "/api/v1/videos", json={"title": "x", "upload_id": upload_id}
    )
    await problem(anonymous, 401, "unauthorized")


@pytest.mark.parametrize(
    "body",
    [
        {"title": "", "upload_id": "x"},
        {"title": "x" * 201, "upload_id": "x"},
        {"title": 5, "upload_id": "x"},
        {"title": "ok", "description": "d" * 5001, "upload_id": "x"},
        {"title": "ok"},
        {"title": "ok", "upload_id": "x", "owner": "me"},
        [],
    ],
)
async def test_invalid_video_bodies_are_400(alice: Publisher, body: Any) -> None:
    response = await alice.stack.gateway.post("/api/v1/videos", json=body, headers=alice.auth)
    await problem(response, 400, "validation_failed")


async def test_unknown_video_is_404(any_stack: Stack) -> None:
    await problem(
        await any_stack.gateway.get("/api/v1/videos/01NOSUCHVIDEO000000000000"),
        404,
        "video_not_found",
    )
    await problem(await any_stack.gateway.get("/api/v1/videos/bad%20id"), 404, "video_not_found")


async def test_list_newest_first_with_cursor_pages(any_stack: Stack, alice: Publisher) -> None:
    published = [(await alice.video(f"Film {i}"))["id"] for i in range(5)]
    seen: list[str] = []
    cursor = None
    while True:
        query = {"limit": "2", "author": alice.username} | ({"cursor": cursor} if cursor else {})
        page = await (await any_stack.gateway.get("/api/v1/videos", params=query)).json()
        seen += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
        # A video published mid-way does not shift or repeat later pages.
        if len(seen) == 2:
            await alice.video("Published while paging")
    assert seen == list(reversed(published))


@pytest.mark.parametrize(
    "query",
    [{"limit": "0"}, {"limit": "101"}, {"limit": "ten"}, {"cursor": "garbage!"}, {"q": "x" * 101}],
)
async def test_bad_list_parameters_are_400(any_stack: Stack, query: dict[str, str]) -> None:
    response = await any_stack.gateway.get("/api/v1/videos", params=query)
    assert response.status == 400
    assert (await response.json(content_type=None))["code"] in (
        "validation_failed",
        "invalid_cursor",
    )


async def test_author_filter_and_user_videos(
    any_stack: Stack, alice: Publisher, bob: Publisher
) -> None:
    mine = await alice.video("Alice's")
    await bob.video("Bob's")
    by_author = await (
        await any_stack.gateway.get("/api/v1/videos", params={"author": alice.username})
    ).json()
    assert [v["id"] for v in by_author["items"]] == [mine["id"]]
    listed = await (await any_stack.gateway.get(f"/api/v1/users/{alice.username}/videos")).json()
    assert [v["id"] for v in listed["items"]] == [mine["id"]]
    profile = await (await any_stack.gateway.get(f"/api/v1/users/{alice.username}")).json()
    assert profile["video_count"] == 1
    await problem(await any_stack.gateway.get("/api/v1/users/nobody/videos"), 404, "user_not_found")
    nobody = await (
        await any_stack.gateway.get("/api/v1/videos", params={"author": "nobody"})
    ).json()
    assert nobody == {"items": [], "next_cursor": None}


async def test_search_over_title_and_description(any_stack: Stack, alice: Publisher) -> None:
    piano = await alice.video("Cats on a piano", "a short film")
    await alice.video("Dogs in the park", "nothing musical")
    tokyo = await alice.video("東京の夜景", "night walk through Shinjuku")

    async def search(q: str) -> list[str]:
        params = {"q": q, "author": alice.username}
        page = await (await any_stack.gateway.get("/api/v1/videos", params=params)).json()
        return [v["id"] for v in page["items"]]

    assert await search("piano") == [piano["id"]]
    assert await search("PIANO cats") == [piano["id"]]
    assert await search("short") == [piano["id"]]
    assert await search("Shinjuku") == [tokyo["id"]]
    assert await search("東京") == [tokyo["id"]]
    assert await search("violin") == []
    assert await search('"); DROP TABLE videos; --') == []


async def test_owner_edits_others_cannot(
    any_stack: Stack, alice: Publisher, bob: Publisher
) -> None:
    video = await alice.video("Draft title")
    path = f"/api/v1/videos/{video['id']}"
    response = await any_stack.gateway.patch(
        path, json={"title": "Final title"}, headers=alice.auth
    )
    assert response.status == 200
    assert (await response.json())["title"] == "Final title"
    # The cached copy was invalidated: every reader sees the edit at once.
    assert (await (await any_stack.gateway.get(path)).json())["title"] == "Final title"
    await problem(
        await any_stack.gateway.patch(path, json={"title": "Mine"}, headers=bob.auth),
        403,
        "not_video_owner",
    )
    await problem(await any_stack.gateway.patch(path, json={"title": "Mine"}), 401, "unauthorized")
    await problem(
        await any_stack.gateway.patch(path, json={}, headers=alice.auth), 400, "validation_failed"
    )


async def test_delete_hides_at_once_and_queues_the_event(
    any_stack: Stack, alice: Publisher, bob: Publisher
) -> None:
    video = await alice.video("Soon gone")
    path = f"/api/v1/videos/{video['id']}"
    assert (await any_stack.gateway.get(path)).status == 200  # now cached
    await problem(await any_stack.gateway.delete(path, headers=bob.auth), 403, "not_video_owner")
    response = await any_stack.gateway.delete(path, headers=alice.auth)
    assert response.status == 202
    assert await response.json() == {"id": video["id"], "deletion": "scheduled"}
    await problem(await any_stack.gateway.get(path), 404, "video_not_found")
    params = {"author": alice.username}
    listed = await (await any_stack.gateway.get("/api/v1/videos", params=params)).json()
    assert video["id"] not in [v["id"] for v in listed["items"]]
    await problem(await any_stack.gateway.delete(path, headers=alice.auth), 404, "video_not_found")
    async with database(any_stack).connect() as conn:
        rows = (
            await conn.execute(select(outbox).where(outbox.c.routing_key == VIDEO_DELETED))
        ).all()
    payloads = [orjson.loads(row.payload)["data"] for row in rows]
    assert payloads == [
        {
            "video_id": video["id"],
            "owner_id": video["author"]["id"],
            "content_hash": video["content_hash"],
        }
    ]


async def test_missing_ids_are_cached_negatively(any_stack: Stack) -> None:
    kv = any_stack.servers["api"].app[KV]
    missing = "01NOSUCHVIDEO000000000000"
    await any_stack.gateway.get(f"/api/v1/videos/{missing}")
    assert await kv.get(video_cache_key(missing)) is not None


async def test_concurrent_readers_of_a_new_video_all_see_it(
    any_stack: Stack, alice: Publisher
) -> None:
    video = await alice.video("Hot")
    responses = await asyncio.gather(
        *(any_stack.gateway.get(f"/api/v1/videos/{video['id']}") for _ in range(20))
    )
    assert {r.status for r in responses} == {200}
