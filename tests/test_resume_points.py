"""Every snapshot is a resume point, and ids on a connection only go up.

A client that drops before its first task event (flaky mobile networks do this all day)
must resume from its snapshot's id without losing what was published in between: the
snapshot carries an id on both transports, also for a user with no history yet. (A
resumed snapshot that stood ahead of its replay is finding 14: tests/attacks.)
"""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
import redis
from aiohttp.test_utils import TestClient

from .clients import TRANSPORTS, assert_strictly_increasing, open_stream, ws_json
from .test_transports import publish_progress

TokenFor = Callable[..., str]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_fresh_users_snapshot_is_a_resume_point(
    client: TestClient,  # type: ignore[type-arg]
    token_for: TokenFor,
    user_id: str,
    transport: str,
) -> None:
    token = token_for(user_id)
    async with open_stream(client, transport, token) as first:
        snapshot = await first.next()
    assert snapshot.type == "active_tasks" and snapshot.message["tasks"] == []
    published = [await publish_progress(client, user_id, "job", progress=p) for p in (1, 2, 3)]

    async with open_stream(client, transport, token, last_event_id=snapshot.id) as resumed:
        again = await resumed.next()
        assert again.type == "active_tasks" and again.message["recovered"] is True
        events = [await resumed.next() for _ in published]
    assert [e.id for e in events] == published
    assert [e.message["progress"] for e in events] == [1, 2, 3]
    assert_strictly_increasing(resumed.ids)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_first_connection_dropped_at_random_points_loses_nothing(
    client: TestClient,  # type: ignore[type-arg]
    token_for: TokenFor,
    transport: str,
) -> None:
    """100 users, each new: the first connection reads a random number of messages
    (often only the snapshot) and drops while events keep coming; the client resumes
    from the last id it saw, snapshot included."""
    rng = random.Random(12)
    lost = duplicated = 0
    for n in range(100):
        user = f"fresh-{transport}-{n}-{rng.randrange(10**9)}"
        token = token_for(user)
        published: list[str] = []
        seen: list[str] = []
        last_id: str | None = None
        async with open_stream(client, transport, token) as first:
            snapshot = await first.next()
            last_id = snapshot.id
            for _ in range(rng.randrange(3)):
                published.append(await publish_progress(client, user, "job", progress=n % 100))
            for _ in range(rng.randrange(len(published) + 1)):
                event = await first.next()
                seen.append(event.id)
                last_id = event.id
        for _ in range(rng.randrange(1, 4)):  # published while the client was away
            published.append(await publish_progress(client, user, "job", progress=n % 100))
        async with open_stream(client, transport, token, last_event_id=last_id) as resumed:
            assert (await resumed.next()).message["recovered"] is True
            while not set(published) <= set(seen):
                seen.append((await resumed.next()).id)
            assert_strictly_increasing(resumed.ids)
        lost += len(set(published) - set(seen))
        duplicated += len(seen) - len(set(seen))
    assert (lost, duplicated) == (0, 0)


async def test_get_active_tasks_reply_stands_where_the_client_stands(
    client: TestClient,  # type: ignore[type-arg]
    token_for: TokenFor,
    user_id: str,
) -> None:
    token = token_for(user_id)
    async with client.ws_connect(f"/ws/tasks/?token={token}") as ws:
        first = await ws_json(ws)
        await ws.send_json({"type": "get_active_tasks"})
        reply = await ws_json(ws)
        assert reply["type"] == "active_tasks" and reply["id"] == first["id"]
        event_id = await publish_progress(client, user_id, "job", progress=5)
        assert (await ws_json(ws))["id"] == event_id
        await ws.send_json({"type": "get_active_tasks"})
        reply = await ws_json(ws)
        assert reply["id"] == event_id
        assert [t["task_id"] for t in reply["tasks"]] == ["job"]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_fresh_snapshot_whose_history_was_lost_says_so(
    redis_client: TestClient,  # type: ignore[type-arg]
    redis_url: str,
    token_for: TokenFor,
    user_id: str,
    transport: str,
) -> None:
    """The snapshot's resume point is valid with its epoch: if Redis loses its data
    before the client comes back, the client hears `recovered: false`."""
    token = token_for(user_id)
    async with open_stream(redis_client, transport, token) as first:
        snapshot = await first.next()
    with redis.Redis.from_url(redis_url) as admin:
        admin.flushall()
    await publish_progress(redis_client, user_id, "job", progress=1)
    async with open_stream(redis_client, transport, token, last_event_id=snapshot.id) as resumed:
        again = await resumed.next()
    assert again.type == "active_tasks" and again.message["recovered"] is False
