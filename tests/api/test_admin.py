"""The admin API through the gateway: who may use it, queues, parked messages, deletions."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

import pytest

from scheduler_service.app import BLOB_COLLECTOR_JOB, DELETION_RESUME_JOB, UPLOAD_SWEEPER_JOB
from scheduler_service.consumers.deletions import QUEUE
from scheduler_service.jobs.lease import Lease
from scheduler_service.services.deletions import STEPS
from shared.bus import Event
from shared.db.__main__ import main as db_main
from shared.events import VIDEO_DELETED
from shared.resources import BUS, KV
from tests.api.test_deletions import WAIT, Settled
from tests.clients import Publisher


async def _admin(stack: Any, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    user = await stack.sign_up()
    monkeypatch.setenv("VOD_DB_URL", stack.settings.db_url)
    assert await asyncio.to_thread(db_main, ["make-admin", user["username"].upper()]) == 0
    tokens = await stack.sign_in(user["username"])
    return {"Authorization": f"Bearer {tokens['access_token']}"}


ADMIN_REQUESTS = [
    ("GET", "/api/v1/admin/queues"),
    ("GET", "/api/v1/admin/jobs"),
    ("GET", f"/api/v1/admin/queues/{QUEUE}/parked"),
    ("POST", f"/api/v1/admin/queues/{QUEUE}/parked/requeue"),
    ("GET", "/api/v1/admin/deletions/01UNKNOWN"),
]


async def test_only_admins_get_in(stack: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    user = await stack.new_user()
    for method, path in ADMIN_REQUESTS:
        anonymous = await stack.gateway.request(method, path)
        assert anonymous.status == 401, path
        assert anonymous.content_type == "application/problem+json"
        refused = await stack.gateway.request(method, path, headers=user)
        assert refused.status == 403, path
        assert (await refused.json())["code"] == "admin_required"
    admin = await stack.gateway.get(
        "/api/v1/admin/queues", headers=await _admin(stack, monkeypatch)
    )
    assert admin.status == 200
    queues = {q["queue"]: q for q in (await admin.json())["items"]}
    empty = {"ready": 0, "unacked": 0, "retrying": 0, "parked": 0, "consumers": 1}
    assert queues[QUEUE] == {"queue": QUEUE} | empty
    assert set(queues) == {QUEUE, "media", "danmaku-persistence"}


async def test_revoking_admin_takes_effect_at_once(
    stack: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    admin = await _admin(stack, monkeypatch)
    me = await (await stack.gateway.get("/api/v1/users/me", headers=admin)).json()
    assert await asyncio.to_thread(db_main, ["make-admin", me["username"], "--revoke"]) == 0

    response = await stack.gateway.get("/api/v1/admin/queues", headers=admin)

    assert response.status == 403


async def test_make_admin_says_what_it_did(
    stack: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    user = await stack.sign_up()
    monkeypatch.setenv("VOD_DB_URL", stack.settings.db_url)

    assert await asyncio.to_thread(db_main, ["make-admin", user["username"]]) == 0
    assert f"{user['username']} is now an administrator" in capsys.readouterr().out
    assert await asyncio.to_thread(db_main, ["make-admin", user["username"], "--revoke"]) == 0
    assert f"{user['username']} is no longer an administrator" in capsys.readouterr().out


async def test_make_admin_names_an_unknown_user(
    stack: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VOD_DB_URL", stack.settings.db_url)
    assert await asyncio.to_thread(db_main, ["make-admin", "nobody_here"]) == 2


async def test_timers_and_the_relay_are_listed(stack: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    admin = await _admin(stack, monkeypatch)
    scheduler = stack.servers["scheduler"].app
    timers = {UPLOAD_SWEEPER_JOB, BLOB_COLLECTOR_JOB, DELETION_RESUME_JOB}

    async def jobs() -> dict[str, dict[str, Any]]:
        response = await stack.gateway.get("/api/v1/admin/jobs", headers=admin)
        assert response.status == 200
        return {job["name"]: job for job in (await response.json())["items"]}

    # Every timer runs once as the scheduler starts, in the background: poll until each
    # has recorded that run.
    async with asyncio.timeout(WAIT):
        while True:
            listed = await jobs()
            if all(listed[name]["last_run"] for name in timers):
                break
            await asyncio.sleep(0.02)
    assert set(listed) == timers | {"outbox-relay"}
    for name in timers:
        job = listed[name]
        assert job["kind"] == "timer"
        assert job["last_run"]["result"] == "ok", job
        finished = datetime.fromisoformat(job["last_run"]["finished_at"])
        next_run = datetime.fromisoformat(job["next_run_at"])
        # Due one interval after the run (to the second, for the time the run took).
        assert abs((next_run - finished).total_seconds() - job["interval_seconds"]) < 5
    relay = listed["outbox-relay"]
    assert relay["kind"] == "relay"
    assert relay["unsent_events"] >= 0

    # Whoever holds a timer's lease is named: here an operator's tool took it.
    lease = Lease(scheduler[KV], f"job:{BLOB_COLLECTOR_JOB}", ttl=30, owner="ops-console")
    async with asyncio.timeout(WAIT):
        while True:
            if await lease.acquire():  # a tick of the scheduler's own holds it briefly
                break
            await asyncio.sleep(0.02)
    try:
        assert (await jobs())[BLOB_COLLECTOR_JOB]["lease_holder"] == "ops-console"
    finally:
        await lease.release()


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
    [counted] = [q for q in queues["items"] if q["queue"] == QUEUE]
    assert (counted["ready"], counted["retrying"], counted["parked"]) == (0, 0, 1)
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
    assert record["steps_done"] == list(STEPS)
    assert record["finished_at"] is not None
