"""Redis faults injected for real: killed subscriber connection, Redis stopped and restarted."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import threading
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

import pytest
import redis
from aiohttp import ClientWebSocketResponse
from aiohttp.test_utils import TestClient

from streamer.app import create_app
from streamer.app_keys import BROKER, HUB
from streamer.broker import redis_publishing, redis_script_runners, redis_subscriber
from streamer.broker.redis import RedisBroker
from streamer.broker.redis_schema import history_key, task_key, user_channel
from streamer.config import Config
from streamer.events import progress_event
from streamer.handlers import admission
from streamer.publisher import AsyncPublisher, BrokerUnavailable, Publisher
from streamer.reasons import Reason
from streamer.wire import Delivery, EventId

from .certificates import self_signed_certificate
from .clients import SseReader, ws_close_code, ws_json, ws_messages
from .conftest import PUBLISH_KEY, SECRET
from .processes import RedisServer, free_port
from .waiting import WAIT_S, eventually

TokenFor = Callable[..., str]


@contextlib.asynccontextmanager
async def connected_pair(
    client: TestClient, token: str
) -> AsyncIterator[tuple[ClientWebSocketResponse, SseReader]]:
    """A WebSocket and an SSE stream of one user, both past their first snapshot."""
    async with client.ws_connect(f"/ws/tasks/?token={token}") as ws:
        response = await client.get(f"/sse/tasks/?token={token}")
        sse = SseReader(response)
        await ws_json(ws)
        await sse.next()
        try:
            yield ws, sse
        finally:
            response.close()


async def test_killed_subscriber_reconnects_and_catches_up(
    redis_client: TestClient, redis_url: str, token_for: TokenFor, user_id: str
) -> None:
    async with (
        connected_pair(redis_client, token_for(user_id)) as (ws, sse),
        AsyncPublisher(redis_url) as publisher,
    ):
        published = []
        with redis.Redis.from_url(redis_url) as admin:
            for step in range(60):
                published.append(await publisher.progress(user_id, "job", progress=step))
                if step in (10, 30, 45):
                    # The previous kill was recovered from.
                    await eventually(
                        lambda: len(admin.client_list(_type="pubsub")) == 1,
                        what="the subscriber connection to be back",
                    )
                    assert admin.client_kill_filter(_type="pubsub") == 1
        received_ws = [m["id"] for m in await ws_messages(ws, len(published))]
        received_sse = [(await sse.next()).id for _ in published]
        assert received_ws == published
        assert received_sse == published
        # Nothing more: no duplicate trailing behind.
        await ws.send_json({"type": "ping"})
        assert await ws_json(ws) == {"type": "pong"}


async def test_redis_down_keeps_connections_and_reports_unavailable(
    redis_client: TestClient,
    redis_server: RedisServer,
    redis_url: str,
    token_for: TokenFor,
    user_id: str,
) -> None:
    token = token_for(user_id)
    async with connected_pair(redis_client, token) as (ws, sse):
        redis_server.stop()
        try:

            async def not_ready() -> bool:
                return (await redis_client.get("/readyz")).status == 503

            await eventually(not_ready, what="/readyz to report Redis down")
            await ws.send_json({"type": "get_task_status", "task_id": "x"})
            error = await ws_json(ws)
            assert error["type"] == "error" and error["code"] == "broker_unavailable"
            refused = await redis_client.post(
                "/api/tasks/events",
                json={"user_id": user_id, "task_id": "t", "progress": 1},
                headers={"X-API-Key": PUBLISH_KEY},
            )
            assert refused.status == 503 and refused.headers["Retry-After"] == "1"
            with pytest.raises(BrokerUnavailable):
                await redis_client.app[BROKER].snapshot(user_id)
            new_sse = await redis_client.get(f"/sse/tasks/?token={token}")
            assert new_sse.status == 503
            new_poll = await redis_client.get(f"/poll/tasks/?token={token}")
            assert new_poll.status == 503 and "Retry-After" in new_poll.headers
            # Refused as their snapshot could not be read: counted as refusals.
            assert redis_client.app[HUB].refused[Reason.BROKER_UNAVAILABLE] == 2
            assert not ws.closed
        finally:
            redis_server.start()

        async def ready() -> bool:
            return (await redis_client.get("/readyz")).status == 200

        await eventually(ready, what="/readyz to report Redis back")
        # It came back empty (no persistence here): the clients are told so.
        for message in (await ws_json(ws), (await sse.next()).json):
            assert message["type"] == "active_tasks" and message["recovered"] is False
        async with AsyncPublisher(redis_url) as publisher:
            event_id = await publisher.progress(user_id, "after", progress=1)
        assert (await ws_json(ws))["id"] == event_id
        assert (await sse.next()).id == event_id  # the SSE stream survived the outage too


async def test_a_catch_up_past_the_history_makes_clients_resync(
    redis_client: TestClient,
    redis_url: str,
    token_for: TokenFor,
    user_id: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """More events than the history holds came while the subscription was down: the
    catch-up cannot give them all, so the clients get a fresh snapshot, not a gap."""
    monkeypatch.setenv("STREAMER_HISTORY_SIZE", "3")
    async with connected_pair(redis_client, token_for(user_id)) as (ws, sse):
        with Publisher(redis_url) as publisher, redis.Redis.from_url(redis_url) as admin:
            seen = publisher.progress(user_id, "a", progress=10)
            assert (await ws_json(ws))["id"] == seen
            assert (await sse.next()).id == seen
            # Blocking calls: the server's loop cannot resubscribe before they are done.
            assert admin.client_kill_filter(_type="pubsub") == 1
            publisher.completed(user_id, "a")
            for step in range(4):
                publisher.progress(user_id, "b", progress=step)
        for message in (await ws_json(ws), (await sse.next()).json):
            assert message["type"] == "active_tasks" and message["recovered"] is False
            assert [(t["task_id"], t["progress"]) for t in message["tasks"]] == [("b", 3)]
        with Publisher(redis_url) as publisher:
            later = publisher.progress(user_id, "b", progress=4)
        assert (await ws_json(ws))["id"] == later
        assert (await sse.next()).id == later


async def test_a_task_filtered_stream_behind_a_busy_history_is_caught_up_not_resynced(
    redis_client: TestClient,
    redis_url: str,
    token_for: TokenFor,
    user_id: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A stream of one task stands at that task's last event, which the user's other
    tasks pushed out of the history: it missed nothing, and a lost subscription's
    catch-up does not resync it (nor the user's other streams)."""
    monkeypatch.setenv("STREAMER_HISTORY_SIZE", "3")
    token = token_for(user_id)
    async with (
        redis_client.ws_connect(f"/ws/tasks/?token={token}") as everything,
        redis_client.ws_connect(f"/ws/tasks/?token={token}&task_id=x") as one_task,
    ):
        await ws_json(everything)
        await ws_json(one_task)
        with Publisher(redis_url) as publisher, redis.Redis.from_url(redis_url) as admin:
            ids = [publisher.progress(user_id, "x", progress=1)]
            ids += [publisher.progress(user_id, "y", progress=n) for n in range(5)]
            assert [m["id"] for m in await ws_messages(everything, 6)] == ids
            assert (await ws_json(one_task))["id"] == ids[0]
            assert admin.client_kill_filter(_type="pubsub") == 1
            await eventually(
                lambda: (
                    redis_client.app[BROKER].subscriber.ready.is_set()
                    and redis_client.app[BROKER].reconnects == 1
                ),
                what="the subscriber to be back and caught up",
            )
            later = publisher.progress(user_id, "x", progress=2)
        assert (await ws_json(everything))["id"] == later  # no active_tasks before it
        assert (await ws_json(one_task))["id"] == later


async def test_a_loss_of_data_first_seen_by_a_snapshot_makes_clients_resync(
    redis_client: TestClient, redis_url: str, token_for: TokenFor, user_id: str
) -> None:
    """The server started on an empty Redis and has read nothing of the data but its
    clients' snapshots when Redis loses it: they resync all the same."""
    with Publisher(redis_url) as publisher:
        publisher.progress(user_id, "old", progress=40)  # no client here: not routed
        async with connected_pair(redis_client, token_for(user_id)) as (ws, sse):
            with redis.Redis.from_url(redis_url) as admin:
                admin.flushall()
            publisher.progress(user_id, "new", progress=2)
            for message in (await ws_json(ws), (await sse.next()).json):
                assert message["type"] == "active_tasks" and message["recovered"] is False
                assert [(t["task_id"], t["progress"]) for t in message["tasks"]] == [("new", 2)]


async def test_flushed_redis_makes_clients_resync(
    redis_client: TestClient, redis_url: str, token_for: TokenFor, user_id: str
) -> None:
    async with (
        connected_pair(redis_client, token_for(user_id)) as (ws, sse),
        AsyncPublisher(redis_url) as publisher,
    ):
        before = await publisher.progress(user_id, "old", progress=1)
        assert (await ws_json(ws))["id"] == before
        assert (await sse.next()).id == before
        with redis.Redis.from_url(redis_url) as admin:
            admin.flushall()
        await publisher.progress(user_id, "new", progress=2)
        for message in (await ws_json(ws), (await sse.next()).json):
            assert message["type"] == "active_tasks" and message["recovered"] is False
            # The snapshot already holds the event that revealed the loss.
            assert [(t["task_id"], t["progress"]) for t in message["tasks"]] == [("new", 2)]
        later = await publisher.progress(user_id, "new", progress=3)
        assert (await ws_json(ws))["id"] == later
        assert (await sse.next()).id == later
        # Resuming from an id of the lost dataset is honest about it too.
        async with redis_client.ws_connect(
            f"/ws/tasks/?token={token_for(user_id)}&last_event_id={before}"
        ) as late:
            assert (await ws_json(late))["recovered"] is False


# What a client sends to open a stream, on a raw socket that the test can close at once.
OPENING_REQUESTS = {
    "websocket": "GET /ws/tasks/?token={token} HTTP/1.1\r\nHost: streamer\r\n"
    "Upgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    "sse": "GET /sse/tasks/?token={token} HTTP/1.1\r\nHost: streamer\r\n\r\n",
    "poll": "GET /poll/tasks/?token={token} HTTP/1.1\r\nHost: streamer\r\n\r\n",
}


@pytest.mark.parametrize("transport", list(OPENING_REQUESTS))
@pytest.mark.parametrize("waiting_for", ["subscription", "snapshot"])
async def test_a_client_that_leaves_while_its_stream_opens_is_not_counted(
    redis_client: TestClient,
    redis_server: RedisServer,
    token_for: TokenFor,
    user_id: str,
    transport: str,
    waiting_for: str,
) -> None:
    """A client that gives up while its stream waits for Redis (its user's subscription,
    or its snapshot) is gone from the hub at once: it holds none of the user's
    connections, nor the user's subscription, until the worker restarts."""
    hub = redis_client.app[HUB]
    broker = redis_client.app[BROKER]
    assert isinstance(broker, RedisBroker)
    token = token_for(user_id)
    async with contextlib.AsyncExitStack() as stack:
        if waiting_for == "snapshot":  # the user's events are routed here already
            url = f"/ws/tasks/?token={token}"
            first = await stack.enter_async_context(redis_client.ws_connect(url))
            await ws_json(first)
        before = len(hub)
        with redis_server.paused():
            _, writer = await asyncio.open_connection(redis_client.host, redis_client.port)
            writer.write(OPENING_REQUESTS[transport].format(token=token).encode())
            await eventually(lambda: len(hub) == before + 1, what="the stream to wait on Redis")
            writer.close()
            await eventually(lambda: len(hub) == before, what="the stream to be gone")
            routed = waiting_for == "snapshot"
            assert (user_id in hub.users()) is routed
            assert (user_channel(user_id) in broker.subscriber.wanted) is routed


async def test_a_subscription_redis_did_not_confirm_in_time_is_given_up(
    redis_client: TestClient,
    redis_server: RedisServer,
    redis_url: str,
    token_for: TokenFor,
    user_id: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The client is told to come back later (1013), and the process does not stay
    subscribed to a user it has no client of."""
    monkeypatch.setattr(redis_subscriber, "SUBSCRIBE_TIMEOUT_S", 0.5)
    broker = redis_client.app[BROKER]
    assert isinstance(broker, RedisBroker)
    channel = user_channel(user_id)
    with redis_server.paused():
        async with redis_client.ws_connect(f"/ws/tasks/?token={token_for(user_id)}") as ws:
            assert await ws_close_code(ws) == 1013
        assert channel not in broker.subscriber.wanted
    with redis.Redis.from_url(redis_url) as admin:
        await eventually(
            lambda: admin.pubsub_numsub(channel) == [(channel.encode(), 0)],
            what="Redis to list no subscriber of the user's channel",
        )
        assert admin.pubsub_numsub("streamer:control") == [(b"streamer:control", 1)]


@pytest.mark.parametrize("persistent", [False, True])
async def test_redis_restart(
    aiohttp_client: Callable[..., object],
    tmp_path_factory: pytest.TempPathFactory,
    token_for: TokenFor,
    user_id: str,
    persistent: bool,
) -> None:
    """Without persistence the data is gone: clients are told (`recovered: false`).
    With it nothing is lost: events published while the subscriber was away arrive."""
    server = RedisServer(tmp_path_factory.mktemp("redis-restart"), persistent=persistent)
    server.start()
    try:
        config = Config(secret=SECRET, redis_url=server.url)
        client: TestClient = await aiohttp_client(await create_app(config))  # type: ignore[misc]
        token = token_for(user_id)
        async with client.ws_connect(f"/ws/tasks/?token={token}") as ws:
            await ws_json(ws)
            async with AsyncPublisher(server.url) as publisher:
                seen = await publisher.progress(user_id, "job", progress=1)
            assert (await ws_json(ws))["id"] == seen
            server.stop()
            server.start()
            async with AsyncPublisher(server.url) as publisher:
                published = await publisher.progress(user_id, "job", progress=2)
            if persistent:
                assert (await ws_json(ws))["id"] == published
            else:
                resync = await ws_json(ws)
                assert resync["type"] == "active_tasks" and resync["recovered"] is False
                assert [t["progress"] for t in resync["tasks"]] in ([2], [])
                if resync["tasks"] == []:  # the snapshot was read before the publish
                    assert (await ws_json(ws))["id"] == published
        async with client.ws_connect(f"/ws/tasks/?token={token}&last_event_id={seen}") as late:
            resumed = await ws_json(late)
            assert resumed["recovered"] is persistent
            if persistent:
                assert (await ws_json(late))["id"] == published
    finally:
        server.stop()


@pytest.fixture
async def saved_redis(
    aiohttp_client: Callable[..., object],
    tmp_path_factory: pytest.TempPathFactory,
    user_id: str,
) -> AsyncIterator[tuple[RedisServer, TestClient]]:  # type: ignore[type-arg]
    """A private Redis that saved (RDB) the user's job at 10 %, and the app on it."""
    server = RedisServer(tmp_path_factory.mktemp("redis-saved"))
    server.start()
    try:
        config = Config(secret=SECRET, redis_url=server.url)
        client: TestClient = await aiohttp_client(await create_app(config))  # type: ignore[misc]
        async with AsyncPublisher(server.url) as publisher:
            await publisher.progress(user_id, "job", progress=10)
        with redis.Redis.from_url(server.url) as admin:
            assert admin.save()
        yield server, client
    finally:
        server.stop()


async def test_redis_back_from_an_older_save_makes_clients_resync(
    saved_redis: tuple[RedisServer, TestClient],  # type: ignore[type-arg]
    token_for: TokenFor,
    user_id: str,
) -> None:
    """Redis restarted from its last save (RDB), older than the last events: they are
    gone, though the epoch came back with the save and later events follow them. A
    client resuming from one of them is told (`recovered: false`), as is one that
    stayed connected, instead of silently missing them."""
    server, client = saved_redis
    token = token_for(user_id)
    async with client.ws_connect(f"/ws/tasks/?token={token}") as ws:
        await ws_json(ws)
        async with AsyncPublisher(server.url) as publisher:
            lost = await publisher.progress(user_id, "job", progress=40)
            assert (await ws_json(ws))["id"] == lost
            done = await publisher.completed(user_id, "job")
            assert (await ws_json(ws))["id"] == done
        server.stop()
        server.start()  # from the save: the job at 10%, running
        async with AsyncPublisher(server.url) as publisher:
            after = await publisher.progress(user_id, "other", progress=1)
        resync = await ws_json(ws)
        if resync["type"] != "active_tasks":  # live, as the subscriber caught up
            assert resync["id"] == after
            resync = await ws_json(ws)
        assert resync["type"] == "active_tasks" and resync["recovered"] is False
        assert "job" in [task["task_id"] for task in resync["tasks"]]
    async with client.ws_connect(f"/ws/tasks/?token={token}&last_event_id={lost}") as late:
        resumed = await ws_json(late)
        assert resumed["type"] == "active_tasks" and resumed["recovered"] is False
        progress = {task["task_id"]: task["progress"] for task in resumed["tasks"]}
        assert progress == {"job": 10, "other": 1}
        assert resumed["id"] == after


async def test_ids_on_a_connection_never_go_down_when_redis_comes_back_older(
    saved_redis: tuple[RedisServer, TestClient],  # type: ignore[type-arg]
    token_for: TokenFor,
    user_id: str,
) -> None:
    """Redis restarted from a save older than what a live client was sent, and nothing
    published since: the resync's snapshot stands where the client stood, not at the
    save's last event (ids on a connection only go up), and it is a resume point; a
    resume from before it is told what was lost."""
    server, client = saved_redis
    token = token_for(user_id)
    async with client.ws_connect(f"/ws/tasks/?token={token}") as ws:
        await ws_json(ws)
        async with AsyncPublisher(server.url) as publisher:
            lost = await publisher.progress(user_id, "job", progress=20)
            newest = await publisher.progress(user_id, "job", progress=30)
        assert [m["id"] for m in await ws_messages(ws, 2)] == [lost, newest]
        server.stop()
        server.start()  # from the save: the job at 10 %
        resync = await ws_json(ws)
        assert resync["type"] == "active_tasks" and resync["recovered"] is False
        assert [task["progress"] for task in resync["tasks"]] == [10]
        position = EventId.parse(resync["id"])
        assert position is not None and position >= EventId.parse(newest)  # type: ignore[operator]
        async with client.ws_connect(f"/ws/tasks/?token={token}") as fresh:
            assert (await ws_json(fresh))["id"] == resync["id"]  # where the history stands
        async with AsyncPublisher(server.url) as publisher:
            after = await publisher.progress(user_id, "job", progress=50)
        assert (await ws_json(ws))["id"] == after
    url = f"/ws/tasks/?token={token}&last_event_id={resync['id']}"
    async with client.ws_connect(url) as resumed:
        assert (await ws_json(resumed))["recovered"] is True
        assert (await ws_json(resumed))["id"] == after
    async with client.ws_connect(f"/ws/tasks/?token={token}&last_event_id={lost}") as late:
        assert (await ws_json(late))["recovered"] is False


class _Recorder:
    """A listener that keeps what the broker hands it."""

    def __init__(self) -> None:
        self.deliveries: list[str] = []
        self.resets = 0

    def deliver(self, delivery: Delivery) -> None:
        self.deliveries.append(str(delivery.event_id))

    def deliver_all(self, deliveries: Sequence[Delivery]) -> None:
        self.deliveries += (str(delivery.event_id) for delivery in deliveries)

    def reset(self) -> None:
        self.resets += 1

    def resume_points(self) -> dict[str, EventId | None]:
        return {}


@contextlib.asynccontextmanager
async def replies_held_back(redis_url: str, delay_s: float) -> AsyncIterator[str]:
    """A proxy to Redis that holds each of Redis's replies back for `delay_s`, as a slow
    network would; yields the URL to reach Redis through it."""
    target = urllib.parse.urlsplit(redis_url)

    async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter, delay: float) -> None:
        try:
            while data := await source.read(65536):
                await asyncio.sleep(delay)
                sink.write(data)
                await sink.drain()
        finally:
            sink.close()

    async def serve(
        client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        redis_reader, redis_writer = await asyncio.open_connection(target.hostname, target.port)
        await asyncio.gather(
            pipe(client_reader, redis_writer, 0),
            pipe(redis_reader, client_writer, delay_s),
            return_exceptions=True,
        )

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"redis://127.0.0.1:{port}{target.path}"
    finally:
        server.close()


async def test_the_subscriber_is_ready_when_redis_confirms_not_when_its_time_is_up(
    redis_url: str,
) -> None:
    """`start` waits for the subscriber (at most 5 s). With every reply of Redis late by
    0.2 s, the confirmation of its subscriptions comes while it is awaited: that makes
    it ready, long before the 30 s it would be given to come."""
    async with replies_held_back(redis_url, 0.2) as slow_url:
        broker = RedisBroker(slow_url, history_size=10, history_ttl=60, pong_timeout_s=30)
        await broker.start(_Recorder())
        try:
            assert broker.subscriber.ready.is_set()
            assert await broker.ready()
        finally:
            await broker.close()


async def test_a_start_while_redis_stalls_waits_for_it_a_few_seconds_only(
    redis_server: RedisServer, redis_url: str
) -> None:
    """A worker started (or reloaded) while Redis takes connections and answers
    nothing serves after a few seconds, not ready (its health check answers), instead
    of waiting for the epoch and the subscriber each for as long as a command may."""
    broker = RedisBroker(redis_url, history_size=10, history_ttl=60)
    with redis_server.paused():
        started = time.monotonic()
        await broker.start(_Recorder())
        try:
            took = time.monotonic() - started
            assert not await broker.ready()
            assert took < 5, took
        finally:
            await broker.close()


async def test_the_subscriber_logs_the_delay_it_retries_after(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """While Redis cannot be reached, attempts come at most a second apart: the log
    says so, not the longer backoff of a subscription lost while Redis answers. Only
    the first attempt is a warning: the others are at DEBUG, until the outage has lasted
    long enough for a reminder."""
    caplog.set_level(logging.DEBUG, logger="streamer.broker.redis_subscriber")
    broker = RedisBroker(f"redis://127.0.0.1:{free_port()}/0", history_size=10, history_ttl=60)
    await broker.start(_Recorder())
    try:

        def attempts() -> list[logging.LogRecord]:
            return [r for r in caplog.records if "redis subscription lost" in r.getMessage()]

        await eventually(lambda: len(attempts()) >= 6, what="six attempts", timeout=20)
        found = (re.search(r"in ([0-9.]+)s$", r.getMessage()) for r in attempts())
        delays = [float(match.group(1)) for match in found if match]
        assert len(delays) == len(attempts())
        assert max(delays) == redis_subscriber.UNREACHABLE_RETRY_S, delays
        levels = [r.levelname for r in attempts()]
        assert levels[0] == "WARNING" and set(levels[1:]) == {"DEBUG"}, levels
    finally:
        await broker.close()


async def test_the_end_of_an_outage_says_how_long_it_lasted(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="streamer.broker.redis_subscriber")
    broker = RedisBroker(redis_server.url, history_size=10, history_ttl=60)
    await broker.start(_Recorder())
    subscriber = broker.subscriber
    try:
        await eventually(lambda: subscriber.ready.is_set(), what="the subscription")
        redis_server.stop()
        try:
            await eventually(lambda: subscriber.restarts >= 3, what="three attempts")
        finally:
            redis_server.start()
        await eventually(lambda: subscriber.ready.is_set(), what="the subscription restored")
    finally:
        await broker.close()
    said = [record.getMessage() for record in caplog.records]
    lost = [text for text in said if "redis subscription lost" in text]
    assert len(lost) == 1, said  # the other attempts were at DEBUG
    (restored,) = [text for text in said if "subscription restored" in text]
    failed = re.fullmatch(
        r"redis subscription restored after (\d+) failed attempts over [0-9.]+s; catching up",
        restored,
    )
    assert failed is not None, restored
    assert int(failed.group(1)) == subscriber.restarts  # one successful attempt: the first


async def test_a_silent_subscriber_connection_is_replaced(
    redis_url: str, caplog: pytest.LogCaptureFixture, user_id: str
) -> None:
    """A connection that stops answering (half-open) is detected by an unanswered PING."""
    broker = RedisBroker(
        redis_url, history_size=10, history_ttl=60, idle_ping_s=0.3, pong_timeout_s=0.5
    )
    recorder = _Recorder()
    await broker.start(recorder)
    try:
        assert await broker.ready()
        await broker.subscribe(user_id)
        with redis.Redis.from_url(redis_url) as admin:
            admin.execute_command("CLIENT", "PAUSE", "3000", "ALL")  # nobody gets answers
            try:

                async def reconnected() -> bool:
                    return "no answer to PING" in caplog.text and await broker.ready()

                await eventually(
                    reconnected, what="the silent connection to be replaced", timeout=15
                )
            finally:
                admin.execute_command("CLIENT", "UNPAUSE")  # for the next tests, whatever happened
        async with AsyncPublisher(redis_url) as publisher:
            event_id = await publisher.progress(user_id, "t", progress=1)

        await eventually(
            lambda: event_id in recorder.deliveries, what="the event after the reconnect"
        )
        assert recorder.resets == 0  # a replaced connection is not a data loss
    finally:
        await broker.close()


async def test_session_cookie_while_redis_is_down_gets_503(
    redis_server: RedisServer,
    redis_url: str,
    aiohttp_client: Callable[..., object],
    token_for: TokenFor,
) -> None:
    config = Config(secret=SECRET, redis_url=redis_url, cookie_secure=False)
    client: TestClient = await aiohttp_client(await create_app(config))  # type: ignore[misc]
    assert (await client.post("/auth/session", json={"token": token_for("u")})).status == 200
    redis_server.stop()
    try:
        # Told that the broker is unavailable, not which host and port it is on.
        for answer in (await client.get("/sse/tasks/"), await client.get("/api/tasks/")):
            assert answer.status == 503
            text = await answer.text()
            assert "the broker is unavailable" in text and str(redis_server.port) not in text
        async with client.ws_connect("/ws/tasks/") as ws:
            assert await ws_close_code(ws) == 1013
        login = await client.post("/auth/session", json={"token": token_for("u")})
        assert login.status == 503
        assert (await login.json())["code"] == "broker_unavailable"
    finally:
        redis_server.start()


async def test_an_opening_waits_for_redis_no_longer_than_its_deadline(
    redis_server: RedisServer,
    redis_client: TestClient,  # type: ignore[type-arg]
    token_for: TokenFor,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A stream opened while Redis stalls waits for its subscription, then its snapshot:
    refused as unavailable at the opening's deadline in all (10 s; here 1 s), not after
    each part's own wait, and counted out of the hub."""
    monkeypatch.setattr(admission, "OPENING_DEADLINE_S", 1.0)
    hub = redis_client.app[HUB]
    with redis_server.paused():
        started = time.monotonic()
        answer = await redis_client.get(f"/sse/tasks/?token={token_for('stalled-user')}")
        waited = time.monotonic() - started
    assert answer.status == 503 and answer.headers["Retry-After"] == "1"
    assert 0.9 <= waited < 5, waited  # the subscription alone waits 10 s
    assert hub.refused[Reason.BROKER_UNAVAILABLE] == 1
    assert len(hub) == 0


async def test_streams_still_opening_at_shutdown_are_refused_at_once(
    redis_server: RedisServer,
    redis_client: TestClient,  # type: ignore[type-arg]
    token_for: TokenFor,
) -> None:
    """Streams waiting for a stalled Redis when the process shuts down are refused as
    shutting down then (503 / 1001) and counted as such, not after the opening's
    deadline as unavailable; a poll is answered as held ones are (nothing, the client
    where it stood)."""
    hub = redis_client.app[HUB]
    token = token_for("opening-user")
    with redis_server.paused():
        sse = asyncio.ensure_future(redis_client.get(f"/sse/tasks/?token={token}"))
        poll = asyncio.ensure_future(redis_client.get(f"/poll/tasks/?token={token}"))
        ws = await redis_client.ws_connect(f"/ws/tasks/?token={token}")
        await eventually(lambda: len(hub) == 3, what="three streams opening")
        started = time.monotonic()
        hub.close_all(Reason.SHUTDOWN)
        refused, answered = await asyncio.wait_for(asyncio.gather(sse, poll), 20)
        code = await ws_close_code(ws)
        waited = time.monotonic() - started
    assert refused.status == 503 and refused.headers["Retry-After"] == "1"
    assert (await refused.json())["code"] == "shutting_down"
    assert answered.status == 200
    assert await answered.json() == {"events": [], "last_event_id": None}
    assert code == 1001
    assert waited < 5, waited  # the opening's deadline is 10 s
    assert hub.refused == {Reason.SHUTTING_DOWN: 3}
    assert hub.ended == {}  # none of them started
    assert len(hub) == 0


def test_a_publisher_gives_up_on_a_stalled_redis_in_time(
    redis_server: RedisServer, redis_url: str
) -> None:
    """Redis takes the call and never answers: the publisher says so in seconds instead
    of holding its caller (a web request sending a task) for ever."""
    publisher = Publisher(redis_url)
    try:
        publisher.progress("u", "t", progress=1)  # a connection in the pool
        with redis_server.paused():
            started = time.monotonic()
            with pytest.raises(BrokerUnavailable, match=r"(?i)timeout|timed out"):
                publisher.progress("u", "t", progress=2)
            assert time.monotonic() - started < 20
    finally:
        publisher.close()


@pytest.mark.parametrize("fresh", [False, True], ids=["held connection", "new connection"])
async def test_an_async_publisher_gives_up_on_a_stalled_redis_in_time(
    redis_server: RedisServer, redis_url: str, fresh: bool
) -> None:
    """The same for AsyncPublisher: its publish, with the connection it holds or with
    one it opens while Redis stalls, and its other calls."""
    async with AsyncPublisher(redis_url) as publisher:
        if not fresh:
            await publisher.progress("u", "t", progress=1)
        with redis_server.paused():
            for call in (
                lambda: publisher.progress("u", "t", progress=2),
                lambda: publisher.publish_many([progress_event("u", "t", progress=3)]),
                lambda: publisher.is_cancelled("u", "t"),
            ):
                started = time.monotonic()
                with pytest.raises(BrokerUnavailable, match=r"(?i)timeout|timed out"):
                    await asyncio.wait_for(call(), 40)
                assert time.monotonic() - started < 20


async def test_session_cookie_while_redis_stalls_gets_503_in_time(
    redis_server: RedisServer,
    redis_url: str,
    aiohttp_client: Callable[..., object],
    token_for: TokenFor,
) -> None:
    """Redis takes the session read and never answers (a stalled host): the request is
    refused once the read times out, instead of waiting for ever."""
    config = Config(secret=SECRET, redis_url=redis_url, cookie_secure=False)
    client: TestClient = await aiohttp_client(await create_app(config))  # type: ignore[misc]
    assert (await client.post("/auth/session", json={"token": token_for("u")})).status == 200
    with redis_server.paused():
        started = time.monotonic()
        answer = await asyncio.wait_for(client.get("/api/tasks/"), 40)
        assert answer.status == 503
        assert (await answer.json())["code"] == "broker_unavailable"
        assert time.monotonic() - started < 20


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """A private redis-server that also listens with TLS: (its rediss:// URL, verifying
    its certificate, and its plain URL, for the test's own checks)."""
    directory = tmp_path_factory.mktemp("redis-tls")
    certificate, key = self_signed_certificate(directory)
    tls_port = free_port()
    server = RedisServer(
        directory,
        extra_args=[
            *("--tls-port", str(tls_port), "--tls-auth-clients", "no"),
            *("--tls-cert-file", str(certificate), "--tls-key-file", str(key)),
            *("--tls-ca-cert-file", str(certificate)),
        ],
    )
    server.start()
    try:
        yield f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={certificate}", server.url
    finally:
        server.stop()


@pytest.mark.parametrize("transport", ["tls", "unix"])
async def test_the_subscriber_reads_through_tls_or_a_unix_socket_and_comes_back_when_killed(
    request: pytest.FixtureRequest, transport: str, user_id: str
) -> None:
    """The subscriber's reads are taken over on a TLS transport too: events arrive in
    order, and a killed connection (its end of stream comes through TLS) is replaced.
    A Unix socket's connection is not given settings only TCP has (keepalive), which
    redis-py would refuse: every subscription would fail."""
    url, plain_url = request.getfixturevalue(f"{transport}_redis")
    broker = RedisBroker(url, history_size=100, history_ttl=60)
    recorder = _Recorder()
    await broker.start(recorder)
    try:
        assert await broker.ready()
        await broker.subscribe(user_id)
        with Publisher(url) as sync_publisher:
            published = [sync_publisher.progress(user_id, "t", progress=1)]
        async with AsyncPublisher(url) as publisher:
            published += [await publisher.progress(user_id, "t", progress=n) for n in range(5)]
            await eventually(lambda: recorder.deliveries == published, what="the first events")
            with redis.Redis.from_url(plain_url) as admin:
                assert admin.client_kill_filter(_type="pubsub") == 1
            await eventually(
                lambda: broker.subscriber.restarts == 1 and broker.subscriber.ready.is_set(),
                what="the subscriber to be back",
            )
            published += [await publisher.progress(user_id, "t", progress=n) for n in range(5)]
            await eventually(lambda: recorder.deliveries == published, what="the later events")
    finally:
        await broker.close()


async def test_a_subscription_asked_of_a_shard_just_replaced_is_asked_again_at_once() -> None:
    """Under Redis Cluster a shard's subscriber is replaced when the layout changes; a
    call made just before that (started after it, as `wait_for` starts it on the next
    turn on Python 3.11) is told to ask again, not left waiting for its timeout."""
    shard = redis_subscriber.Subscriber(
        "redis://127.0.0.1:1/0",
        on_messages=lambda messages: None,
        on_restored=lambda channels: asyncio.sleep(0),
        idle_ping_s=15,
        pong_timeout_s=10,
        sharded=True,
    )
    asked = asyncio.ensure_future(asyncio.wait_for(shard.subscribe("streamer:u:{u}"), 5))
    shard.abandon()  # before `asked` has started
    with pytest.raises(redis_subscriber.Rerouted):
        await asyncio.wait_for(asked, 1)


async def test_a_catch_up_that_fails_does_not_make_redis_unreachable(redis_url: str) -> None:
    """Only a failed connect does: a catch-up that failed after the connect succeeded
    (a slow history read, say) would have refused every new stream at once while Redis
    answered."""
    catch_ups = 0

    async def failing_catch_up(channels: object) -> None:
        nonlocal catch_ups
        catch_ups += 1
        raise ConnectionError("the history could not be read")

    subscriber = redis_subscriber.Subscriber(
        redis_url,
        on_messages=lambda messages: None,
        on_restored=failing_catch_up,
        idle_ping_s=15,
        pong_timeout_s=10,
        catch_up_first=True,
    )
    running = asyncio.create_task(subscriber.run())
    try:
        await eventually(lambda: catch_ups >= 2, what="two catch-ups tried")
        assert subscriber.unreachable is False
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running


@pytest.fixture(scope="module")
def unix_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """A private redis-server that also listens on a Unix socket: (its unix:// URL, and
    its plain URL, for the test's own checks)."""
    directory = tmp_path_factory.mktemp("redis-unix")
    socket_path = directory / "redis.sock"
    server = RedisServer(
        directory, extra_args=["--unixsocket", str(socket_path), "--unixsocketperm", "700"]
    )
    server.start()
    try:
        yield f"unix://{socket_path}?db=0", server.url
    finally:
        server.stop()


@pytest.mark.parametrize("loop", ["serving", "blocked"])
async def test_a_publisher_used_just_before_a_restart_publishes_right_after_it(
    redis_server: RedisServer, loop: str
) -> None:
    """The held connection was checked only after a second unused: the first call
    less than a second after a restart failed ("Connection closed by server"), whether
    the event loop ran meanwhile (and saw the connection close) or was blocked."""
    async with AsyncPublisher(redis_server.url) as publisher:
        await publisher.progress("u", "t", progress=1)
        if loop == "serving":
            await asyncio.to_thread(redis_server.stop)
            await asyncio.to_thread(redis_server.start)
        else:
            redis_server.stop()
            redis_server.start()
        await publisher.progress("u", "t", progress=2)
    with redis.Redis.from_url(redis_server.url) as admin:
        assert admin.hget(task_key("u", "t"), "progress") == b"2"


@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_a_publish_redis_does_not_answer_in_time_says_it_timed_out(
    redis_server: RedisServer, redis_url: str, user_id: str, kind: str
) -> None:
    """A timeout carries no text of its own: the message still says what happened
    (it read "could not publish to Redis: ; try again")."""
    url = f"{redis_url}?socket_timeout=0.5"
    if kind == "async":
        async with AsyncPublisher(url) as async_publisher:
            await async_publisher.progress(user_id, "t", progress=1)  # connected, script loaded
            with redis_server.paused(), pytest.raises(BrokerUnavailable) as failure:
                await async_publisher.progress(user_id, "t", progress=2)
    else:
        with Publisher(url) as publisher:
            publisher.progress(user_id, "t", progress=1)
            with redis_server.paused(), pytest.raises(BrokerUnavailable) as failure:
                publisher.progress(user_id, "t", progress=2)
    message = str(failure.value)
    assert message.startswith("could not publish to Redis: ")
    assert "timed out" in message or "Timeout reading" in message  # ours, redis-py's
    # Redis ran it once it was resumed: the caller is told that it may have.
    assert "(the event may have been published)" in message


async def test_threads_sharing_a_publisher_are_each_told_of_their_own_call(
    redis_server: RedisServer, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A's call is sent and not answered; B's, begun meanwhile, fails to connect: A is
    still told that its event may have been published (B's call answered for it)."""
    sent = threading.Event()
    send = redis_script_runners.PooledScript._send

    def noted(self: Any, connection: Any, call: Any) -> None:
        send(self, connection, call)
        sent.set()

    monkeypatch.setattr(redis_script_runners.PooledScript, "_send", noted)
    loop = asyncio.get_running_loop()
    with Publisher(f"{redis_url}?socket_timeout=0.5") as publisher:
        publisher.progress("u", "t", progress=1)  # a connection in the pool, script loaded
        sent.clear()
        with redis_server.paused():
            first = loop.run_in_executor(None, lambda: publisher.progress("u", "t", progress=2))
            assert await loop.run_in_executor(None, sent.wait, WAIT_S)
            second = loop.run_in_executor(None, lambda: publisher.progress("v", "t", progress=3))
            outcomes = await asyncio.wait_for(
                asyncio.gather(first, second, return_exceptions=True), WAIT_S
            )
    said_first, said_second = map(str, outcomes)
    assert all(isinstance(outcome, BrokerUnavailable) for outcome in outcomes), outcomes
    assert "(the event may have been published)" in said_first, said_first
    assert "may have been published" not in said_second, said_second


@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_a_publish_that_never_reached_redis_says_that_nothing_was_published(
    kind: str,
) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    events = [progress_event("u", f"t{n}") for n in range(3)]
    failures: list[BrokerUnavailable] = []
    if kind == "async":
        async with AsyncPublisher(url) as async_publisher:
            for call in (async_publisher.publish(events[0]), async_publisher.publish_many(events)):
                with pytest.raises(BrokerUnavailable) as failure:
                    await call
                failures.append(failure.value)
    else:
        with Publisher(url) as publisher:
            for call in (
                lambda: publisher.publish(events[0]),
                lambda: publisher.publish_many(events),
            ):
                with pytest.raises(BrokerUnavailable) as failure:
                    call()
                failures.append(failure.value)
    single, batch = map(str, failures)
    assert single.startswith("could not publish to Redis: ")
    assert "may have been published" not in single
    assert batch.endswith("(0 of 3 events were published; none after them)"), batch


@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_a_batch_redis_stops_answering_in_says_how_far_it_got(
    redis_server: RedisServer,
    redis_url: str,
    user_id: str,
    kind: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`publish_many` cut by Redis said only why ("Timeout reading from socket"): the
    caller could not tell which events to publish again."""
    monkeypatch.setattr(redis_publishing, "MAX_CHUNK_EVENTS", 7)
    monkeypatch.setenv("STREAMER_HISTORY_SIZE", "100000")
    url = f"{redis_url}?socket_timeout=0.5"
    events = [progress_event(user_id, f"t{n}") for n in range(20_000)]
    admin = redis.Redis.from_url(redis_url)
    loop = asyncio.get_running_loop()
    with contextlib.closing(admin), Publisher(url) as publisher:
        async with AsyncPublisher(url) as async_publisher:
            if kind == "async":
                batch = asyncio.ensure_future(async_publisher.publish_many(events))
            else:
                batch = loop.run_in_executor(None, publisher.publish_many, events)
            await eventually(lambda: admin.xlen(history_key(user_id)) >= 7, what="a chunk")
            with redis_server.paused(), pytest.raises(BrokerUnavailable) as failure:
                await asyncio.wait_for(batch, WAIT_S)
        said = re.fullmatch(
            r"could not publish to Redis: .+ \((\d+) of 20000 events were published"
            r"(?:, perhaps (\d+) more after them)?; none after (?:them|those)\)",
            str(failure.value),
        )
        assert said is not None, str(failure.value)
        published, perhaps = int(said.group(1)), int(said.group(2) or 0)
        assert 7 <= published < 20_000 and published % 7 == 0 and perhaps <= 7
        # The call in flight ran once Redis was back, or never reached it.
        assert admin.xlen(history_key(user_id)) in {published, published + perhaps}


async def test_calls_sent_together_that_redis_stops_answering_each_say_how_far_they_got(
    redis_server: RedisServer, redis_url: str, user_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Concurrent calls leave in the same script calls: each one not answered is told
    its own count, not only the one whose events were in flight."""
    monkeypatch.setattr(redis_publishing, "MAX_CHUNK_EVENTS", 7)
    monkeypatch.setattr(redis_publishing, "LANES", 1)
    monkeypatch.setenv("STREAMER_HISTORY_SIZE", "100000")
    admin = redis.Redis.from_url(redis_url)
    with contextlib.closing(admin):
        async with AsyncPublisher(f"{redis_url}?socket_timeout=0.5") as publisher:
            calls = [
                asyncio.ensure_future(
                    publisher.publish_many([progress_event(user_id, f"t{n}") for n in range(size)])
                )
                for size in (10_000, 3, 10_000)
            ]
            await eventually(lambda: admin.xlen(history_key(user_id)) >= 7, what="a chunk")
            with redis_server.paused():
                failures = await asyncio.wait_for(
                    asyncio.gather(*calls, return_exceptions=True), WAIT_S
                )
        counts = []
        for failure, size in zip(failures, (10_000, 3, 10_000), strict=True):
            assert isinstance(failure, BrokerUnavailable), failure
            said = re.search(
                rf"\((\d+) of {size} events were published(?:, perhaps (\d+) more after them)?;",
                str(failure),
            )
            assert said is not None, str(failure)
            counts.append((int(said.group(1)), int(said.group(2) or 0)))
        published = sum(sent for sent, _ in counts)
        perhaps = sum(more for _, more in counts)
        assert 7 <= published < 20_003 and perhaps <= 7
        assert admin.xlen(history_key(user_id)) in {published, published + perhaps}


async def test_a_subscription_update_cut_by_the_lost_connection_is_no_error(
    redis_client: TestClient,
    redis_url: str,
    token_for: TokenFor,
    user_id: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The subscriber connection closed while a SUBSCRIBE was on its way: redis-py then
    failed with an AttributeError (its writer gone), logged as an ERROR with its
    traceback for a routine reconnection. Here the SUBSCRIBE waits until the connection
    is killed, and then fails as redis-py 8.1 did."""
    subscriber = redis_client.app[BROKER].subscriber  # type: ignore[attr-defined]
    channel = user_channel(user_id, 0)
    waiting = asyncio.Event()
    sender = redis_subscriber._sender
    cut = False

    def cut_once(pubsub: Any) -> Callable[..., Any]:
        send = sender(pubsub)

        async def sent(*args: str) -> None:
            nonlocal cut
            if args[0] == "SUBSCRIBE" and channel in args and not cut:
                cut = True
                waiting.set()
                try:
                    await asyncio.sleep(3600)
                except asyncio.CancelledError:
                    raise AttributeError("'NoneType' object has no attribute 'writelines'")  # noqa: B904
            await send(*args)

        return sent

    monkeypatch.setattr(redis_subscriber, "_sender", cut_once)
    caplog.set_level("DEBUG", logger="streamer.broker.redis_subscriber")
    opening = asyncio.ensure_future(
        redis_client.ws_connect(f"/ws/tasks/?token={token_for(user_id)}")
    )
    try:
        await asyncio.wait_for(waiting.wait(), WAIT_S)
        with redis.Redis.from_url(redis_url) as admin:
            assert admin.client_kill_filter(_type="pubsub") == 1
        ws = await asyncio.wait_for(opening, WAIT_S)  # subscribed on the next connection
        async with ws:
            assert (await ws_json(ws))["type"] == "active_tasks"
    finally:
        opening.cancel()
    await eventually(lambda: subscriber.ready.is_set(), what="the subscription restored")
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []
    assert any("subscribing stopped" in r.getMessage() for r in caplog.records)


async def test_a_lost_subscription_leaves_the_connections_of_commands_open(
    redis_client: TestClient, redis_url: str, token_for: TokenFor, user_id: str
) -> None:
    """Only the subscriber connection went (Redis is up): the catch-up closed every idle
    pooled connection, under the snapshots and commands that took them meanwhile (they
    failed with 503 / 1013 on each reconnection of the subscriber)."""
    subscriber = redis_client.app[BROKER].subscriber  # type: ignore[attr-defined]
    headers = {"Authorization": f"Bearer {token_for(user_id)}"}
    with redis.Redis.from_url(redis_url) as admin:
        own = admin.client_id()
        answers = await asyncio.gather(
            *(redis_client.get("/api/tasks/", headers=headers) for _ in range(4))
        )
        assert [answer.status for answer in answers] == [200] * 4
        pooled = {c["id"] for c in admin.client_list(_type="normal")} - {own}
        assert pooled
        assert admin.client_kill_filter(_type="pubsub") == 1
        await eventually(lambda: not subscriber.ready.is_set(), what="the subscription lost")
        await eventually(lambda: subscriber.ready.is_set(), what="the subscription restored")
        left = {c["id"] for c in admin.client_list(_type="normal")}
        assert pooled <= left, f"closed: {pooled - left}"
        answer = await redis_client.get("/api/tasks/", headers=headers)
        assert answer.status == 200


async def test_back_from_a_restart_the_first_reconnection_holds(
    redis_client: TestClient,
    redis_server: RedisServer,
    token_for: TokenFor,
    user_id: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The catch-up after a reconnection does not go out on pooled connections to the
    server that went away: on the first of them it failed, and the subscription was
    given up once more and reopened only after the next, longer, backoff."""
    subscriber = redis_client.app[BROKER].subscriber  # type: ignore[attr-defined]
    caplog.set_level("INFO", logger="streamer.broker.redis_subscriber")
    async with redis_client.ws_connect(f"/ws/tasks/?token={token_for(user_id)}") as ws:
        await ws_json(ws)  # its snapshot was read on a pooled connection, left there
        redis_server.stop()
        await eventually(lambda: not subscriber.ready.is_set(), what="the subscription lost")
        redis_server.start()
        await eventually(lambda: subscriber.ready.is_set(), what="the subscription restored")
        resync = await ws_json(ws)
        assert resync["type"] == "active_tasks" and resync["recovered"] is False
    said = [record.getMessage() for record in caplog.records]
    restored = [n for n, text in enumerate(said) if "subscription restored" in text]
    assert len(restored) == 1, said
    assert not any("subscription lost" in text for text in said[restored[0] :]), said


@pytest.mark.parametrize("transport", ["ws", "sse"])
async def test_while_redis_is_unreachable_streams_are_refused_at_once(
    redis_client: TestClient,
    redis_server: RedisServer,
    token_for: TokenFor,
    user_id: str,
    transport: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Not after the subscription's timeout, which held every opening stream for 10 s
    of an outage; they open again once Redis is back."""
    monkeypatch.setattr(redis_subscriber, "SUBSCRIBE_TIMEOUT_S", 3600.0)
    subscriber = redis_client.app[BROKER].subscriber  # type: ignore[attr-defined]
    token = token_for(user_id)

    async def refused() -> None:
        if transport == "ws":
            async with redis_client.ws_connect(f"/ws/tasks/?token={token}") as ws:
                assert await ws_close_code(ws) == 1013
        else:
            headers = {"Authorization": f"Bearer {token}"}
            async with redis_client.get("/sse/tasks/", headers=headers) as answer:
                assert answer.status == 503 and answer.headers["Retry-After"] == "1"
                text = await answer.text()
                assert "the broker is unavailable" in text and str(redis_server.port) not in text

    redis_server.stop()
    try:
        await eventually(lambda: subscriber.unreachable, what="a failed attempt to connect")
        async with asyncio.timeout(10):  # far below the subscription's timeout
            await refused()
    finally:
        redis_server.start()
    await eventually(lambda: subscriber.ready.is_set(), what="the subscription restored")
    async with redis_client.ws_connect(f"/ws/tasks/?token={token}") as ws:
        assert (await ws_json(ws))["type"] == "active_tasks"
