"""The admin API through the gateway: who may use it, queues, parked messages, deletions."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from scheduler_service.consumers.deletions import QUEUE
from shared.bus import Event
from shared.db.__main__ import main as db_main
from shared.events import VIDEO_DELETED
from shared.resources import BUS
from tests.api.test_deletions import Settled
from tests.clients import Publisher


async def _admin(stack: Any, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    user = await stack.sign_up()
    monkeypatch.setenv("VOD_DB_URL", stack.settings.db_url)
    assert await asyncio.to_thread(db_main, ["make-admin", user["username"].upper()]) == 0
    tokens = await stack.sign_in(user["username"])
    return {"Authorization": f"Bearer {tokens['access_token']}"}


async def test_only_admins_get_in(stack: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    anonymous = await stack.gateway.get("/api/v1/admin/queues")
    assert anonymous.status == 401
    user = await stack.gateway.get("/api/v1/admin/queues", headers=await stack.new_user())
    assert user.status == 403
    assert (await user.json())["code"] == "admin_required"
    admin = await stack.gateway.get(
        "/api/v1/admin/queues", headers=await _admin(stack, monkeypatch)
    )
    assert admin.status == 200
    queues = {q["queue"]: q for q in (await admin.json())["items"]}
    assert queues[QUEUE] == {"queue": QUEUE, "ready": 0, "parked": 0}
    assert "media" in queues


async def test_make_admin_names_an_unknown_user(
    stack: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VOD_DB_URL", stack.settings.db_url)
    assert await asyncio.to_thread(db_main, ["make-admin", "nobody_here"]) == 2


async def test_a_parked_message_is_listed_and_requeued(
    stack: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    admin = await _admin(stack, monkeypatch)
    scheduler = stack.servers["scheduler"].app
    settled = Settled(scheduler, QUEUE)
    poison = Event.new(VIDEO_DELETED, {"video_id": "not a video id"})
    await scheduler[BUS].publish(poison)
    await settled.until(lambda r: [o.result for o in r] == ["parked"])

    queues = await (await stack.gateway.get("/api/v1/admin/queues", headers=admin)).json()
    assert {"queue": QUEUE, "ready": 0, "parked": 1} in queues["items"]
    parked = await stack.gateway.get(f"/api/v1/admin/queues/{QUEUE}/parked", headers=admin)
    assert parked.status == 200
    [item] = (await parked.json())["items"]
    assert (item["id"], item["type"]) == (poison.id, VIDEO_DELETED)
    assert "valid video_id" in item["error"]

    requeued = await stack.gateway.post(
        f"/api/v1/admin/queues/{QUEUE}/parked/requeue", headers=admin
    )
    assert requeued.status == 200
    assert await requeued.json() == {"queue": QUEUE, "requeued": 1}
    # Still poison: handled once more, from a fresh start, and parked again.
    await settled.until(lambda r: [o.result for o in r] == ["parked", "parked"])
    assert settled.results[1].attempt == 1


async def test_bad_admin_requests_are_problems(stack: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    admin = await _admin(stack, monkeypatch)
    for path, status, code in [
        ("/api/v1/admin/queues/nope/parked", 404, "queue_not_found"),
        (f"/api/v1/admin/queues/{QUEUE}/parked?limit=0", 400, "invalid_limit"),
        (f"/api/v1/admin/queues/{QUEUE}/parked?limit=x", 400, "invalid_limit"),
        ("/api/v1/admin/deletions/01UNKNOWN", 404, "deletion_not_found"),
        ("/api/v1/admin/deletions/%20", 404, "deletion_not_found"),
    ]:
        response = await stack.gateway.get(path, headers=admin)
        assert response.status == status, path
        assert (await response.json())["code"] == code


async def test_the_deletion_record_of_a_video(stack: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    admin = await _admin(stack, monkeypatch)
    scheduler = stack.servers["scheduler"].app
    settled = Settled(scheduler, QUEUE)
    owner = Publisher(stack, "owner", await stack.new_user())
    video = await owner.video()
    await stack.gateway.delete(f"/api/v1/videos/{video['id']}", headers=owner.auth)
    await settled.until(lambda r: any(o.result == "acked" for o in r))

    response = await stack.gateway.get(f"/api/v1/admin/deletions/{video['id']}", headers=admin)

    assert response.status == 200
    record = await response.json()
    assert record["video_id"] == video["id"]
    assert record["state"] == "done"
    assert record["steps_done"] == ["comments", "danmaku", "video", "blob", "cache"]
    assert record["finished_at"] is not None
