"""Every snapshot is a resume point, and ids on a connection only go up.

A client that drops before its first task event (flaky mobile networks do this all day)
must resume from its snapshot's id without losing what was published in between: the
snapshot carries an id on both transports, also for a user with no history yet. And a
snapshot never carries an id newer than the events sent after it (the resume case,
where replayed older events follow the snapshot).
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import redis
from aiohttp.test_utils import TestClient

from streamer.events import EventId

from .clients import SseReader, ws_json
from .test_transports import publish_done, publish_progress

TokenFor = Callable[..., str]
TRANSPORTS = ["websocket", "sse"]


@dataclass
class Received:
    type: str
    id: str
    message: dict[str, Any]


class Stream:
    """One connection of either transport; every message comes with the id it carries
    (on SSE the `id:` field, which must equal the JSON's `id`)."""

    def __init__(self, next_message: Callable[[], Any]) -> None:
        self._next = next_message
        self.ids: list[str] = []

    async def next(self) -> Received:
        received: Received = await self._next()
        assert received.id, f"{received.type} carries no id: {received.message}"
        self.ids.append(received.id)
        return received


@asynccontextmanager
async def open_stream(
    client: TestClient,  # type: ignore[type-arg]
    transport: str,
    token: str,
    last_event_id: str | None = None,
) -> AsyncIterator[Stream]:
    params = {"token": token}
    if last_event_id is not None:
        params["last_event_id"] = last_event_id
    if transport == "websocket":
        async with client.ws_connect("/ws/tasks/", params=params) as ws:

            async def next_ws() -> Received:
                message = await ws_json(ws)
                return Received(message["type"], message.get("id", ""), message)

            yield Stream(next_ws)
        return
    response = await client.get("/sse/tasks/", params=params)
    assert response.status == 200
    reader = SseReader(response)

    async def next_sse() -> Received:
        event = await reader.next()
        message = event.json
        assert event.event == message["type"]
        assert event.id == message.get("id"), "the SSE id: field and the JSON id differ"
        return Received(message["type"], event.id or "", message)

    try:
        yield Stream(next_sse)
    finally:
        response.close()


def order(event_id: str) -> tuple[int, int]:
    parsed = EventId.parse(event_id)
    assert parsed is not None, event_id
    return parsed.ms, parsed.seq


def assert_strictly_increasing(ids: list[str]) -> None:
    keys = [order(i) for i in ids]
    assert keys == sorted(set(keys)), f"ids on one connection must strictly increase: {ids}"


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


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_resumed_snapshot_is_not_ahead_of_the_replay(
    client: TestClient,  # type: ignore[type-arg]
    token_for: TokenFor,
    user_id: str,
    transport: str,
) -> None:
    """Finding 14: resuming from an older event, the snapshot used to carry the NEWEST
    id with the older events replayed behind it; a client dropping right after the
    snapshot then resumed past them and lost a completion for good (finished tasks
    are not in snapshots)."""
    token = token_for(user_id)
    seen = await publish_progress(client, user_id, "report", progress=10)
    progressed = await publish_progress(client, user_id, "report", progress=90)
    finished = await publish_done(client, user_id, "report", result_data={"rows": 7})

    async with open_stream(client, transport, token, last_event_id=seen) as resumed:
        snapshot = await resumed.next()
    # The snapshot stands where the client stood: not ahead of what it has not yet got.
    assert snapshot.id == seen
    assert snapshot.message["recovered"] is True

    async with open_stream(client, transport, token, last_event_id=snapshot.id) as again:
        assert (await again.next()).id == seen
        replayed = [await again.next(), await again.next()]
        assert [r.id for r in replayed] == [progressed, finished]
        assert replayed[1].type == "task_completed"
        assert replayed[1].message["result_data"] == {"rows": 7}
        later = await publish_progress(client, user_id, "next", progress=1)
        assert (await again.next()).id == later
    assert_strictly_increasing(again.ids)


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
