"""Fixtures shared by the contract and integration suites."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from shared.kv import KeyValueStore, open_kv

# open_store(suffix, **open_kv_options)
OpenStore = Callable[..., Awaitable[KeyValueStore]]


@pytest.fixture(params=["memory", "redis"])
async def open_store(request: pytest.FixtureRequest, namespace: str) -> AsyncIterator[OpenStore]:
    """Opens stores on one server (this adapter's), each under ``namespace:<suffix>``."""
    if request.param == "redis":
        url = request.getfixturevalue("redis_server_url")
    else:
        url = f"memory://{namespace}-{secrets.token_hex(4)}"
    test_namespace = f"{namespace}:{secrets.token_hex(4)}"
    opened: list[KeyValueStore] = []

    async def open_store(suffix: str, **options: Any) -> KeyValueStore:
        store = await open_kv(url, f"{test_namespace}:{suffix}", **options)
        opened.append(store)
        return store

    yield open_store
    for store in opened:
        await store.delete_namespace()
        await store.close()


@pytest.fixture
async def kv(open_store: OpenStore) -> KeyValueStore:
    return await open_store("main")
