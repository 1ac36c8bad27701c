"""Redis Sentinel for real: a master, a replica and three sentinels; the service, a
producer and the CLI on a `redis+sentinel://` URL, through a failover mid-stream."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis

from streamer.auth.tokens import issue_token
from streamer.broker.redis_connect import (
    FENCE_KEY,
    fence_failover,
    parse_sentinel_url,
    redis_client,
    redis_client_sync,
    redis_failure,
)
from streamer.broker.redis_schema import EPOCH_KEY, history_key
from streamer.config import Config, ConfigError
from streamer.publisher import AsyncPublisher, BrokerUnavailable, Publisher

from .clients import SseReader, ws_json
from .conftest import SECRET
from .processes import BIN, SentinelGroup, ServerProcess, free_port
from .waiting import eventually, eventually_sync


@pytest.fixture
def sentinel_group(tmp_path: Path) -> Iterator[SentinelGroup]:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed: .ci/run installs it (apt redis-server)")
    group = SentinelGroup(tmp_path)
    try:
        group.start()
        yield group
    finally:
        group.stop()


# --- the URL ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "redis+sentinel://127.0.0.1:26379/mymaster",
        "redis+sentinel://a:1,b:2,c:3/mymaster",
        "redis+sentinel://:s3cret@a:1,b:2/mymaster/2",
        "redis+sentinel://sentinel.internal/mymaster",
        "redis+sentinel://[::1]:26379,127.0.0.1:26380/mymaster",
    ],
)
def test_sentinel_urls_accepted(url: str) -> None:
    config = Config.from_env({"STREAMER_SECRET": SECRET, "STREAMER_REDIS_URL": url})
    assert config.redis_url == url


def test_sentinel_url_parts() -> None:
    target = parse_sentinel_url("redis+sentinel://:p%40ss@a:1,[::1]:2,c/svc/3")
    assert target.sentinels == (("a", 1), ("::1", 2), ("c", 26379))
    assert (target.service, target.password, target.db) == ("svc", "p@ss", 3)


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis+sentinel://127.0.0.1:26379", "no service name"),
        ("redis+sentinel://127.0.0.1:26379/", "no service name"),
        ("redis+sentinel://127.0.0.1:26379/mymaster/x", "/<service>/<db number>"),
        ("redis+sentinel://127.0.0.1:26379/mymaster/\u00b2", "/<service>/<db number>"),
        ("redis+sentinel://127.0.0.1:26379/mymaster/" + "1" * 5000, "/<service>/<db number>"),
        ("redis+sentinel://127.0.0.1:\u00b2/mymaster", "a bad sentinel port"),
        ("redis+sentinel://127.0.0.1:26379/a/1/2", "/<service>/<db number>"),
        ("redis+sentinel://127.0.0.1:99999/mymaster", "bad sentinel port"),
        ("redis+sentinel://127.0.0.1:port/mymaster", "bad sentinel port"),
        ("redis+sentinel://a:1,,b:2/mymaster", "empty sentinel address"),
        ("redis+sentinel:///mymaster", "empty sentinel address"),
        ("redis+sentinel://a:1/mymaster?db=1", "no query"),
        ("sentinel://a:1/mymaster", "redis+sentinel://"),
    ],
)
def test_bad_sentinel_urls_name_the_variable(url: str, says: str) -> None:
    with pytest.raises(ConfigError) as error:
        Config.from_env({"STREAMER_SECRET": SECRET, "STREAMER_REDIS_URL": url})
    assert "STREAMER_REDIS_URL" in str(error.value)
    assert says in str(error.value)


def test_bad_sentinel_url_never_shows_the_password() -> None:
    with pytest.raises(ConfigError) as error:
        Config.from_env(
            {"STREAMER_SECRET": SECRET, "STREAMER_REDIS_URL": "redis+sentinel://:hunter2@a:1"}
        )
    assert "hunter2" not in str(error.value)


async def test_with_no_sentinel_to_ask_commands_fail_at_once_in_a_short_line() -> None:
    """redis-py asks a sentinel three times with backoff by default: every command
    took about 8 s to fail (a stream's opening, an HTTP command, a publish), and its
    message held the repr of every sentinel's client (over a kilobyte a log line)."""
    url = f"redis+sentinel://127.0.0.1:{free_port()}/mymaster"
    client = redis_client(url)
    try:
        with pytest.raises(redis.ConnectionError) as failed:
            await asyncio.wait_for(client.get("x"), 2)
    finally:
        await client.aclose()
    said = redis_failure(failed.value)
    assert said == "No master found for 'mymaster'", said
    sync_client = redis_client_sync(url)
    try:
        failure = await asyncio.wait_for(asyncio.to_thread(_fails, sync_client), 2)
    finally:
        sync_client.close()
    assert redis_failure(failure) == "No master found for 'mymaster'"


def _fails(client: redis.Redis) -> BaseException:
    try:
        client.get("x")
    except redis.ConnectionError as exc:
        return exc
    raise AssertionError("a command succeeded with no sentinel to ask")


async def test_fence_starts_a_new_epoch_only_on_another_master(redis_url: str) -> None:
    """The failover check, on a plain Redis: the first check records the master; the
    same master again changes nothing; a recorded master that is not this one (what
    a promoted replica finds, its data copied from the old master) starts a new epoch."""
    client = redis_client(redis_url)
    try:
        await client.set(EPOCH_KEY, "e1")
        assert await fence_failover(client, EPOCH_KEY)  # an epoch of unknown origin
        first = await client.get(EPOCH_KEY)
        assert first != b"e1"
        assert not await fence_failover(client, EPOCH_KEY)
        assert await client.get(EPOCH_KEY) == first
        await client.set(FENCE_KEY, "the-old-masters-replication-id")
        assert await fence_failover(client, EPOCH_KEY)
        assert await client.get(EPOCH_KEY) not in (first, b"e1")
        await client.flushall()
        assert not await fence_failover(client, EPOCH_KEY)  # nothing to protect yet
        assert await client.get(EPOCH_KEY) is None
    finally:
        await client.aclose()


# --- real processes --------------------------------------------------------------------


def test_cli_and_publisher_publish_through_sentinel(
    sentinel_group: SentinelGroup, process_env: dict[str, str]
) -> None:
    done = subprocess.run(
        [
            str(BIN / "streamer"), "publish", "--redis-url", sentinel_group.url,
            "--user", "cli-user", "--task", "job", "--progress", "40",
        ],
        env=process_env, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    event_id = done.stdout.strip()
    with Publisher(sentinel_group.url) as publisher:
        second = publisher.progress("cli-user", "job", progress=50)

    async def publish_async() -> str:
        # Its connection, held for its calls, is to the master the sentinels name too
        # (the server publishes the same way), not to redis-py's default localhost:6379.
        async with AsyncPublisher(sentinel_group.url) as publisher:
            return await publisher.progress("cli-user", "job", progress=60)

    third = asyncio.run(publish_async())
    with redis.Redis(port=sentinel_group.master.port) as master:
        stored = [i.decode() for i, _ in master.xrange(history_key("cli-user"))]
    assert [published.split("-", 1)[1] for published in (event_id, second, third)] == stored


@dataclass
class Producer:
    """Publishes progress events in a thread until stopped; retries what fails (the
    Publisher does not: a failed call may have run). Acknowledged ids are kept."""

    url: str
    user_id: str
    acked: list[str] = field(default_factory=list)
    failures: int = 0
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        step = 0
        with Publisher(self.url) as publisher:
            while not self.stop.is_set():
                try:
                    self.acked.append(publisher.progress(self.user_id, "job", progress=step % 100))
                    step += 1
                except (BrokerUnavailable, redis.RedisError, OSError):
                    self.failures += 1
                self.stop.wait(0.02)  # pacing, about 50 events a second


@dataclass
class Client:
    """Everything one stream received, read by a task of its own."""

    name: str
    messages: list[dict[str, Any]] = field(default_factory=list)

    @property
    def event_ids(self) -> list[str]:
        return [m["id"] for m in self.messages if m["type"] == "task_progress"]

    @property
    def snapshots(self) -> list[dict[str, Any]]:
        return [m for m in self.messages if m["type"] == "active_tasks"]

    def has(self, event_id: str) -> bool:
        return event_id in self.event_ids


@contextlib.asynccontextmanager
async def reading(
    session: aiohttp.ClientSession, token: str
) -> AsyncIterator[tuple[Client, Client]]:
    ws_client, sse_client = Client("websocket"), Client("sse")
    async with session.ws_connect("/ws/tasks/", params={"token": token}) as ws:
        response = await session.get("/sse/tasks/", params={"token": token})
        assert response.status == 200
        sse = SseReader(response)

        async def read(client: Client, next_message: Callable[[], Any]) -> None:
            while True:
                client.messages.append(await next_message())

        async def next_sse() -> dict[str, Any]:
            return (await sse.next(timeout=120)).json

        tasks = [
            asyncio.create_task(read(ws_client, lambda: ws_json(ws, timeout=120))),
            asyncio.create_task(read(sse_client, next_sse)),
        ]
        try:
            yield ws_client, sse_client
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            response.close()


def stream_ids(event_ids: list[str]) -> list[str]:
    return [event_id.split("-", 1)[1] for event_id in event_ids]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("how", ["sentinel-failover", "master-paused"])
async def test_failover_mid_stream(
    how: str,
    sentinel_group: SentinelGroup,
    process_env: dict[str, str],
    start_process: Callable[..., ServerProcess],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`sentinel-failover`: SENTINEL FAILOVER, the orderly switch. `master-paused`: the
    master stops answering until its replica is promoted, then comes back believing it
    is still master, and acknowledges writes (of the connections it still holds) until
    the sentinels make it a replica: those events are lost, and must be reported."""
    monkeypatch.setenv("STREAMER_HISTORY_SIZE", "100000")  # no trim: the count is exact
    env = {
        **process_env,
        "STREAMER_REDIS_URL": sentinel_group.url,
        "STREAMER_HISTORY_SIZE": "100000",
    }
    server = start_process(["streamer", "serve", "--port", "{port}"], env)
    await asyncio.to_thread(server.wait_healthy)
    user_id = "failover-user"
    token = issue_token(SECRET, user_id, ttl_s=3600)
    producer = Producer(sentinel_group.url, user_id)
    thread = threading.Thread(target=producer.run, name="producer")
    async with (
        aiohttp.ClientSession(base_url=server.base_url) as session,
        reading(session, token) as (ws_client, sse_client),
    ):
        clients = (ws_client, sse_client)
        await eventually(lambda: all(c.snapshots for c in clients), what="first snapshots")
        thread.start()
        try:
            await eventually(
                lambda: all(len(c.event_ids) >= 20 for c in clients),
                what="events before the failover",
            )
            if how == "sentinel-failover":
                await asyncio.to_thread(sentinel_group.failover)
            else:
                await asyncio.to_thread(sentinel_group.pause_master_until_replaced)
            await asyncio.to_thread(
                eventually_sync,
                sentinel_group.failed_over,
                what="the replica to be master (and the old master its replica)",
                timeout=90,
            )
            after = len(producer.acked)
            await eventually(
                lambda: len(producer.acked) >= after + 50,
                what="the producer to carry on after the failover",
                timeout=30,
            )
        finally:
            producer.stop.set()
            await asyncio.to_thread(thread.join, 30)
        last = producer.acked[-1]
        await eventually(
            lambda: all(c.has(last) for c in clients),
            what="the clients to receive the last event",
            timeout=30,
        )
    assert (await asyncio.to_thread(server.get, "/readyz"))[0] == 200

    with redis.Redis(port=sentinel_group.replica.port) as new_master:
        kept = {i.decode() for i, _ in new_master.xrange(history_key(user_id))}
    # Acknowledged, yet not in the new master's history: lost in the failover.
    lost_by_redis = [i for i in stream_ids(producer.acked) if i not in kept]
    if how == "master-paused":
        assert lost_by_redis, "the paused master was expected to acknowledge lost writes"
    for client in clients:
        delivered = client.event_ids
        assert len(delivered) == len(set(delivered)), f"{client.name}: an event came twice"
        missed = set(producer.acked) - set(delivered)
        told = [s for s in client.snapshots[1:] if s["recovered"] is False]
        if missed or lost_by_redis:
            assert told, f"{client.name}: {len(missed)} events missed without recovered: false"
        # What came after the failover settled arrived in full.
        assert set(producer.acked[after:]) <= set(delivered), client.name
        print(
            f"{how} {client.name}: {len(producer.acked)} acknowledged, {len(lost_by_redis)} "
            f"lost by Redis, {len(delivered)} delivered, {len(missed)} not delivered, "
            f"{len(told)} resync(s), {producer.failures} publish failures"
        )
