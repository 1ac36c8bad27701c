"""Every snapshot is a resume point, and ids on a connection only go up.

A client that drops before its first task event (flaky mobile networks do this all day)
must resume from its snapshot's id without losing what was published in between: the
snapshot carries an id on both transports, also for a user with no history yet. (A
resumed snapshot that stood ahead of its replay is finding 14: tests/attacks.)
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis
from aiohttp.test_utils import TestClient

from streamer.app import create_app
from streamer.app_keys import BROKER
from streamer.auth.tokens import verify_token
from streamer.broker.redis_schema import history_key
from streamer.config import Config
from streamer.events import completed_event, progress_event
from streamer.opening import REPLAY_PAGE

from .clients import TRANSPORTS, assert_strictly_increasing, open_stream, order, ws_json
from .conftest import SECRET
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


async def resume_receives(
    client: TestClient,  # type: ignore[type-arg]
    transport: str,
    token: str,
    resume_point: str,
    missed: list[str],
) -> None:
    """Resumed from `resume_point`, the client gets `missed` once, in order, then what
    comes live (its user's token)."""
    async with open_stream(client, transport, token, last_event_id=resume_point) as resumed:
        assert (await resumed.next()).message["recovered"] is True
        received = [(await resumed.next()).id for _ in missed]
        user_id = verify_token(SECRET, token).user_id
        live = await publish_progress(client, user_id, "job", progress=1)
        assert (await resumed.next()).id == live
    assert received == missed
    assert_strictly_increasing(resumed.ids)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_resume_from_far_back_arrives_whole_read_a_page_at_a_time(
    config: Config,
    aiohttp_client: Callable[..., Awaitable[TestClient]],  # type: ignore[type-arg]
    token_for: TokenFor,
    user_id: str,
    transport: str,
) -> None:
    """Two and a half pages of history missed, more than the client's buffer: the client
    gets all of it once, in order, then what comes live; the worker read it a page at a
    time."""
    client = await aiohttp_client(await create_app(config.replace(history_size=1000)))
    broker = client.app[BROKER]
    resume_point = await publish_progress(client, user_id, "job", progress=0)
    events = [progress_event(user_id, f"job{n % 3}", progress=n % 100) for n in range(250)]
    missed = [str(i) for i in await broker.publish_many(events)]
    assert len(missed) > config.client_buffer
    limits: list[int | None] = []
    replay = broker.replay

    async def counted(user: str, after: str, limit: int | None = None) -> Any:
        limits.append(limit)
        return await replay(user, after, limit)

    broker.replay = counted  # type: ignore[method-assign]
    await resume_receives(client, transport, token_for(user_id), resume_point, missed)
    assert limits == [REPLAY_PAGE] * (len(missed) // REPLAY_PAGE + 1)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_undecodable_history_entries_do_not_cut_a_paged_resume_short(
    redis_client: TestClient,  # type: ignore[type-arg]
    redis_url: str,
    token_for: TokenFor,
    user_id: str,
    transport: str,
) -> None:
    """Entries that cannot be read (from an older publisher) are skipped, and a page
    that held some is still a full page: the rest of the replay follows. Here the
    first page holds two of them, the last of them its hundredth entry."""
    broker = redis_client.app[BROKER]
    resume_point = await publish_progress(redis_client, user_id, "job", progress=0)
    missed: list[str] = []
    with redis.Redis.from_url(redis_url) as admin:
        for good in (20, REPLAY_PAGE - 22, 150):
            batch = [progress_event(user_id, "job", progress=n % 100) for n in range(good)]
            missed += (str(i) for i in await broker.publish_many(batch))
            admin.xadd(history_key(user_id), {"e": "not json"})
    await resume_receives(redis_client, transport, token_for(user_id), resume_point, missed)


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


async def test_a_requested_snapshot_never_takes_back_events_already_sent(
    redis_url: str,
    aiohttp_client: Callable[..., Awaitable[TestClient]],  # type: ignore[type-arg]
    token_for: TokenFor,
    user_id: str,
) -> None:
    """Events keep coming while `get_active_tasks` snapshots are read: none of them may
    reach the client ahead of a snapshot that does not hold it, or the client would
    show older progress, or a finished task as running, for good. None is skipped
    either, though a snapshot may hold it already (a `task_completed` carries the
    task's result, which no snapshot shows)."""
    config = Config(secret=SECRET, redis_url=redis_url, commands_per_s=100_000)
    client = await aiohttp_client(await create_app(config))
    broker = client.app[BROKER]
    async with client.ws_connect(f"/ws/tasks/?token={token_for(user_id)}") as ws:
        ids = [(await ws_json(ws))["id"]]

        async def publish() -> None:
            for n in range(1, 1001):
                await broker.publish(progress_event(user_id, "job", processed_items=n))
            await broker.publish(completed_event(user_id, "job"))

        publishing = asyncio.ensure_future(publish())
        try:
            steps = 0  # step events received, each once and in order
            finished = False
            snapshots = 0
            while not finished:
                await ws.send_json({"type": "get_active_tasks"})
                while (message := await ws_json(ws))["type"] != "active_tasks":
                    ids.append(message["id"])
                    finished = message["type"] == "task_completed"
                    if not finished:
                        assert message["processed_items"] == steps + 1
                        steps += 1
                ids.append(message["id"])
                snapshots += 1
                job = [t for t in message["tasks"] if t["task_id"] == "job"]
                if finished:
                    assert job == [], "a snapshot after task_completed still holds the task"
                elif job:  # it holds at least every event received before it
                    assert job[0]["processed_items"] >= steps, (steps, job)
            await publishing
        finally:
            publishing.cancel()
    assert snapshots > 10  # snapshots were read while events came
    assert ids == sorted(ids, key=order)  # and ids never went back
