"""Faults against the real RabbitMQ: a broker outage while a user deletes a video.

The outage is a TCP relay in front of the machine's RabbitMQ that the test cuts and
restores (the broker itself is shared with other runs and never restarted).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import pytest
from sqlalchemy import delete, select

from scheduler_service.consumers.deletions import QUEUE
from scheduler_service.keys import CONSUMER_GROUP
from shared.bus import open_bus
from shared.db.schema import outbox, video_deletions, videos
from shared.events import VIDEO_DELETED
from shared.kv import open_kv
from shared.resources import DB
from shared.settings import Settings
from tests.api.test_deletions import Settled
from tests.clients import Publisher
from tests.integration.test_bus_contract import TcpProxy
from tests.media_files import NOT_MEDIA
from tests.stack import start_stack

pytestmark = pytest.mark.integration


async def test_a_video_deleted_while_the_broker_is_down_is_deleted_when_it_returns(
    aiohttp_server: Any,
    aiohttp_client: Any,
    make_settings: Callable[..., Settings],
    real_backends_env: dict[str, str],
) -> None:
    target = urlsplit(real_backends_env["VOD_AMQP_URL"])
    proxy = TcpProxy(target.hostname or "127.0.0.1", target.port or 5672)
    await proxy.start()
    through_proxy = target._replace(
        netloc=f"{target.username}:{target.password}@127.0.0.1:{proxy.port}",
        query="reconnect_interval=0.1",
    ).geturl()
    settings = make_settings(**real_backends_env | {"VOD_AMQP_URL": through_proxy})
    stack = await start_stack(settings, aiohttp_server, aiohttp_client)
    scheduler = stack.servers["scheduler"].app
    queues = scheduler[CONSUMER_GROUP].queues
    video: dict[str, Any] = {"id": "none yet"}
    try:
        settled = Settled(scheduler, QUEUE)
        owner = Publisher(stack, "owner", await stack.new_user())
        video = await (await owner.publish(upload_id=await owner.upload(NOT_MEDIA))).json()

        await proxy.cut()
        response = await stack.gateway.delete(f"/api/v1/videos/{video['id']}", headers=owner.auth)

        # The user is told it is scheduled, and the video is gone for them at once...
        assert response.status == 202
        assert (await stack.gateway.get(f"/api/v1/videos/{video['id']}")).status == 404
        # ...while the row waits: the event cannot reach the scheduler.
        async with scheduler[DB].connect() as conn:
            row = (await conn.execute(select(videos).where(videos.c.id == video["id"]))).first()
        assert row is not None

        await proxy.start()
        await settled.until(lambda r: any(o.result == "acked" for o in r))

        async with scheduler[DB].connect() as conn:
            row = (await conn.execute(select(videos).where(videos.c.id == video["id"]))).first()
            record = (
                await conn.execute(
                    select(video_deletions).where(video_deletions.c.video_id == video["id"])
                )
            ).first()
        assert row is None
        assert record is not None
        assert record.state == "done"
        assert [o.result for o in settled.results] == ["acked"]
    finally:
        # The database is shared by the run: leave no event of ours for other tests to read.
        async with scheduler[DB].transaction() as conn:
            await conn.execute(
                delete(outbox).where(
                    outbox.c.routing_key == VIDEO_DELETED, outbox.c.payload.contains(video["id"])
                )
            )
        for server in stack.servers.values():
            await server.close()
        await proxy.cut()
        janitor = await open_bus(real_backends_env["VOD_AMQP_URL"], settings.namespace)
        await janitor.delete_namespace(queues)
        await janitor.close()
        kv = await open_kv(settings.redis_url, settings.namespace)
        await kv.delete_namespace()
        await kv.close()
