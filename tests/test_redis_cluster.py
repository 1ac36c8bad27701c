"""Redis Cluster for real: 3 masters and 3 replicas (tests/redis_cluster.py); the
service under gunicorn, the publishers and the CLI on a `redis+cluster://` URL. Events
of users spread over every shard reach every client, with one subscriber connection per
shard per process; a master killed mid-stream and a slot moved mid-stream lose no
acknowledged event silently."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
import redis

from streamer.auth.session_index import INDEX_PREFIX as SESSION_INDEX_PREFIX
from streamer.auth.sessions import SESSION_COOKIE, SESSION_KEY_PREFIX
from streamer.broker import redis_cluster_subscriber, redis_subscriber
from streamer.broker.redis_cluster_subscriber import ClusterSubscriber
from streamer.broker.redis_schema import (
    history_key,
    user_channel,
    user_epoch_key,
    user_epoch_ttl,
    user_fence_key,
)
from streamer.config import Config, ConfigError
from streamer.events import TaskEvent, completed_event, progress_event
from streamer.publisher import AsyncPublisher, BrokerUnavailable, Publisher
from streamer.wire import EventId

from .clients import SseReader, ws_json
from .conftest import SECRET
from .processes import BIN, ServerProcess, free_port, gunicorn_args
from .redis_cluster import RedisCluster, redis_cluster
from .waiting import eventually, eventually_sync

__all__ = ["redis_cluster"]  # the fixture, used by name

TokenFor = Callable[..., str]
StartProcess = Callable[..., ServerProcess]
WORKERS = 2
SESSION_INDEX_TAG_OPEN = "{"
READ_S = 60.0  # a reader waits this long for the next message before it gives up

# --- the URL ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "redis+cluster://127.0.0.1:7000",
        "redis+cluster://127.0.0.1:7000,127.0.0.1:7001",
        "redis+cluster://:s3cret@a:1,b:2",
        "redis+cluster://user:s3cret@a:1,b:2,c:3",
        "redis+cluster://[::1]:7000,127.0.0.1:7001",
    ],
)
def test_cluster_urls_accepted(url: str) -> None:
    config = Config.from_env({"STREAMER_SECRET": SECRET, "STREAMER_REDIS_URL": url})
    assert config.redis_url == url


@pytest.mark.parametrize(
    "url",
    [
        "redis+cluster://",  # no host
        "redis+cluster://:hunter2@",  # no host, a password
        "redis+cluster://127.0.0.1:99999",  # bad port
        "redis+cluster://127.0.0.1:port",
        "redis+cluster://127.0.0.1:\u00b2",  # a digit to str.isdigit, not in a URL
        "redis+cluster://127.0.0.1:" + "7" * 5000,
        "redis+cluster://:hunter2@127.0.0.1:99999",
        "redis+cluster://a:1,,b:2",  # an empty address
        "redis+cluster://a:1,b:2/1",  # a database: a cluster has only db 0
        "redis+cluster://a:1/mymaster",  # a path
        "redis+cluster://user:hunter2@a:1/2",
        "redis+cluster://a:1?db=1",  # a query
        "redis+cluster://a:1,b:2/?timeout=5",
        "redis+cluster://:hunter2@a:1?ssl=true",
    ],
)
def test_bad_cluster_urls_name_the_variable(url: str) -> None:
    with pytest.raises(ConfigError) as error:
        Config.from_env({"STREAMER_SECRET": SECRET, "STREAMER_REDIS_URL": url})
    message = str(error.value)
    assert "STREAMER_REDIS_URL" in message
    assert "\n" not in message, "a config error is one line"
    assert "hunter2" not in message, "a config error never shows the password"


@pytest.mark.parametrize("server", ["streamer-serve", "gunicorn"])
def test_a_bad_cluster_url_stops_the_server_at_startup(
    server: str, process_env: dict[str, str]
) -> None:
    env = {**process_env, "STREAMER_REDIS_URL": "redis+cluster://:hunter2@127.0.0.1:99999"}
    args = (
        ["streamer", "serve", "--port", str(free_port())]
        if server == "streamer-serve"
        else gunicorn_args(WORKERS, free_port())
    )
    done = subprocess.run(
        [str(BIN / args[0]), *args[1:]],
        env=env, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert "hunter2" not in output
    assert "Traceback" not in output
    assert "Booting worker" not in output
    assert [line for line in output.splitlines() if "STREAMER_REDIS_URL" in line], output


# --- the helper itself -------------------------------------------------------------------


def test_the_cluster_helper(redis_cluster: RedisCluster) -> None:
    """3 masters with a replica each; a moved slot is served by its new master (the old
    one answers MOVED); a killed master's replica takes over with the data."""
    cluster = redis_cluster
    masters = cluster.masters()
    assert len(masters) == 3
    assert cluster.url.startswith("redis+cluster://127.0.0.1:")
    assert len(cluster.url.removeprefix("redis+cluster://").split(",")) == 2
    for address in masters:
        assert cluster.node(address).command("PING")
        assert len(cluster.replicas_of(address)) == 1
    assert len(cluster.live_nodes()) == 6

    key = history_key("user-7")
    assert key == "streamer:history:{user-7}"
    slot = cluster.slot_of(key)
    assert cluster.node(masters[0]).command("CLUSTER", "KEYSLOT", key) == slot
    with cluster.client() as client:
        client.set(key, "kept")
        for n in range(250):  # more than one MIGRATE batch
            client.set(f"streamer:other:{{user-7}}:{n}", n)

    # Shard subscribers are counted; Redis drops them when their slot moves away.
    source = cluster.master_of(key)
    subscriber = cluster.node(source).client()
    pubsub = subscriber.pubsub()
    try:
        pubsub.ssubscribe(user_channel("user-7"))
        eventually_sync(
            lambda: len(cluster.pubsub_clients(source)) == 1, what="the subscriber to be listed"
        )
        target = next(a for a in masters if a != source)
        assert cluster.move_slot_of(key, to=target) == target
        assert cluster.master_of(key) == target
        eventually_sync(
            lambda: not cluster.pubsub_clients(source), what="the move to end the subscription"
        )
    finally:
        pubsub.close()
        subscriber.close()
    with pytest.raises(redis.exceptions.MovedError, match=f"^{slot} 127.0.0.1:{target[1]}$"):
        cluster.node(source).command("GET", key)
    assert cluster.node(target).command("GET", key) == b"kept"
    assert cluster.node(target).command("CLUSTER", "COUNTKEYSINSLOT", slot) == 251
    assert cluster.node(source).command("CLUSTER", "COUNTKEYSINSLOT", slot) == 0

    # The target's replica has the moved keys before its master dies.
    (replica,) = cluster.replicas_of(target)

    def replicated() -> bool:
        with cluster.node(replica).client() as client:
            client.execute_command("READONLY")
            return bool(client.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) == 251)

    eventually_sync(replicated, what="the replica to have the moved keys")
    promoted = cluster.kill_master_of(key)
    assert promoted == replica
    assert cluster.master_of(key) == promoted
    assert target not in cluster.masters()
    assert len(cluster.masters()) == 3
    assert cluster.node(promoted).command("GET", key) == b"kept"
    with cluster.client() as client:
        assert client.get(key) == b"kept"


# --- producers and the CLI ---------------------------------------------------------------


async def test_cli_and_publishers_publish_through_the_cluster(
    redis_cluster: RedisCluster, process_env: dict[str, str]
) -> None:
    user = "cli-user"
    done = await asyncio.to_thread(
        subprocess.run,
        [
            str(BIN / "streamer"), "publish", "--redis-url", redis_cluster.url,
            "--user", user, "--task", "job", "--progress", "40",
        ],
        env=process_env, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    ids = [done.stdout.strip()]
    with Publisher(redis_url=redis_cluster.url) as publisher:
        ids.append(publisher.progress(user, "job", progress=50))
        ids += publisher.publish_many([progress_event(user, "job", progress=p) for p in (60, 70)])
    async with AsyncPublisher(redis_url=redis_cluster.url) as async_publisher:
        ids.append(await async_publisher.completed(user, "job"))
    master = redis_cluster.node(redis_cluster.master_of(history_key(user)))
    with master.client() as client:
        stored = [i.decode() for i, _ in client.xrange(history_key(user))]
        # Each user's epoch lives in their slot, and expires like the rest of their keys.
        epoch_ttl = client.ttl(user_epoch_key(user))
    assert [stream_id(i) for i in ids] == stored
    assert {i.split("-")[0] for i in ids} == {ids[0].split("-")[0]}, "one epoch for the user"
    assert 0 < epoch_ttl <= user_epoch_ttl(3600)


# --- clients of the real service ---------------------------------------------------------


def parse_id(event_id: str) -> EventId:
    parsed = EventId.parse(event_id)
    assert parsed is not None, event_id
    return parsed


def stream_id(event_id: str) -> str:
    return parse_id(event_id).stream_id


@dataclass
class Client:
    """Everything one stream received, read by a task of its own."""

    name: str
    user: str
    messages: list[dict[str, Any]] = field(default_factory=list)
    error: BaseException | None = None

    @property
    def events(self) -> list[dict[str, Any]]:
        return [m for m in self.messages if m["type"] != "active_tasks"]

    @property
    def event_ids(self) -> list[str]:
        return [m["id"] for m in self.events]

    @property
    def snapshots(self) -> list[dict[str, Any]]:
        return [m for m in self.messages if m["type"] == "active_tasks"]

    @property
    def resyncs(self) -> list[int]:
        """Positions (in `messages`) of the snapshots that said `recovered: false`."""
        return [
            n
            for n, m in enumerate(self.messages)
            if n > 0 and m["type"] == "active_tasks" and m["recovered"] is False
        ]

    def has(self, event_id: str) -> bool:
        self.check()
        return event_id in self.event_ids

    def check(self) -> None:
        if self.error is not None:
            raise AssertionError(f"{self.name}: the stream failed: {self.error!r}")


@contextlib.asynccontextmanager
async def reading(
    session: aiohttp.ClientSession, token_for: TokenFor, streams: list[tuple[str, str]]
) -> AsyncIterator[list[Client]]:
    """Open a stream per (transport, user) and read each into a Client until the end."""
    clients: list[Client] = []
    tasks: list[asyncio.Task[None]] = []

    async def read(client: Client, next_message: NextMessage) -> None:
        try:
            while True:
                client.messages.append(await next_message())
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # a closed or silent stream: the test says so
            client.error = exc

    async with contextlib.AsyncExitStack() as stack:
        try:
            for transport, user in streams:
                params = {"token": token_for(user)}
                if transport == "websocket":
                    ws = await stack.enter_async_context(
                        session.ws_connect("/ws/tasks/", params=params)
                    )
                    next_message = ws_reader(ws)
                else:
                    response = await session.get("/sse/tasks/", params=params)
                    stack.callback(response.close)
                    assert response.status == 200, await response.text()
                    next_message = sse_reader(SseReader(response))
                client = Client(f"{transport} of {user}", user)
                clients.append(client)
                tasks.append(asyncio.create_task(read(client, next_message)))
            yield clients
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task


NextMessage = Callable[[], Awaitable[dict[str, Any]]]


def ws_reader(ws: aiohttp.ClientWebSocketResponse) -> NextMessage:
    async def next_message() -> dict[str, Any]:
        return await ws_json(ws, timeout=READ_S)

    return next_message


def sse_reader(sse: SseReader) -> NextMessage:
    async def next_message() -> dict[str, Any]:
        return (await sse.next(timeout=READ_S)).json

    return next_message


async def start_service(
    cluster: RedisCluster,
    process_env: dict[str, str],
    start_process: StartProcess,
    **settings: str,
) -> ServerProcess:
    env = {**process_env, "STREAMER_REDIS_URL": cluster.url, **settings}
    server = start_process(gunicorn_args(WORKERS), env)
    await asyncio.to_thread(server.wait_healthy, 30)
    return server


def session_for(server: ServerProcess) -> aiohttp.ClientSession:
    # No connection limit: every stream holds one.
    return aiohttp.ClientSession(base_url=server.base_url, connector=aiohttp.TCPConnector(limit=0))


async def first_snapshots(clients: list[Client]) -> None:
    def arrived() -> bool:
        for client in clients:
            client.check()
        return all(client.snapshots for client in clients)

    await eventually(arrived, what="every stream's first snapshot", timeout=30)


def users_by_master(cluster: RedisCluster, users: list[str]) -> dict[tuple[str, int], list[str]]:
    spread: dict[tuple[str, int], list[str]] = {}
    for user in users:
        spread.setdefault(cluster.master_of(history_key(user)), []).append(user)
    return spread


# --- A: every shard ----------------------------------------------------------------------


@pytest.mark.timeout(90)
async def test_events_of_users_on_every_shard_reach_every_client(
    redis_cluster: RedisCluster,
    process_env: dict[str, str],
    start_process: StartProcess,
    token_for: TokenFor,
) -> None:
    """100 users spread over the 3 masters, a WebSocket or an SSE stream each, on 2
    workers: each stream receives exactly its user's events, in order, once; each
    process holds at most one subscriber connection per master."""
    cluster = redis_cluster
    users = [f"spread-{n}" for n in range(100)]
    spread = users_by_master(cluster, users)
    assert sorted(spread) == sorted(cluster.masters()), "the users must hit all 3 masters"
    server = await start_service(cluster, process_env, start_process)
    streams = [("websocket", u) for u in users[:50]] + [("sse", u) for u in users[50:]]

    # Per user, what each stream must show, in order: (id, type, step or marker).
    expected: dict[str, list[tuple[str, str, str]]] = {user: [] for user in users}
    async with session_for(server) as session, reading(session, token_for, streams) as clients:
        await first_snapshots(clients)

        steps = [(user, f"{user} {n}", n) for n in range(5) for user in users]
        events: list[TaskEvent] = [
            progress_event(user, f"job-{n % 2}", progress=20 * n, current_step=step)
            for user, step, n in steps
        ]
        with Publisher(redis_url=cluster.url) as publisher:
            ids = await asyncio.to_thread(publisher.publish_many, events)
        assert len(ids) == len(events) == 500
        for (user, step, _), event_id in zip(steps, ids, strict=True):
            expected[user].append((event_id, "task_progress", step))
        async with AsyncPublisher(redis_url=cluster.url) as async_publisher:
            for user in users[::10]:  # 5 on each transport, on every master
                step = f"{user} async"
                event_id = await async_publisher.progress(
                    user, "job-0", progress=99, current_step=step
                )
                expected[user].append((event_id, "task_progress", step))
            # Last, one marker per user: once it arrived, everything before it has.
            markers = await async_publisher.publish_many(
                [completed_event(user, "job-1", result_data={"user": user}) for user in users]
            )
        for user, marker in zip(users, markers, strict=True):
            expected[user].append((marker, "task_completed", user))

        await eventually(
            lambda: all(c.has(expected[c.user][-1][0]) for c in clients),
            what="every stream to receive its user's last event",
            timeout=30,
        )
        for client in clients:
            got = [
                (
                    m["id"],
                    m["type"],
                    m["current_step"] if m["type"] == "task_progress" else m["result_data"]["user"],
                )
                for m in client.events
            ]
            assert got == expected[client.user], client.name
            assert len(client.snapshots) == 1, f"{client.name}: a resync without a fault"

        # Every streamed user's epoch and failover fence expire with their other keys.
        with cluster.client() as reader:
            for user in expected:
                assert reader.ttl(user_epoch_key(user)) > 0, user
                assert reader.ttl(user_fence_key(user)) > 0, user

        # One subscriber connection per shard per process, not per client.
        live = {
            node.address: len(cluster.pubsub_clients(node.address)) for node in cluster.live_nodes()
        }
        for master in cluster.masters():
            assert live[master] <= WORKERS, f"{live[master]} subscriber connections on {master}"
        assert 1 <= sum(live.values()) <= WORKERS * len(spread), live
        print(f"users per master: { {m[1]: len(u) for m, u in spread.items()} }; pubsub: {live}")


# --- B and C: a failover and a slot move mid-stream --------------------------------------


@dataclass
class Producer:
    """Publishes progress events for its users in turn, in a thread, until stopped;
    retries what fails (the Publisher does not: a failed call may have run).
    Acknowledged ids are kept per user, in order."""

    url: str
    users: list[str]
    acked: dict[str, list[str]] = field(default_factory=dict)
    failures: int = 0
    stop: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None

    def __post_init__(self) -> None:
        self.acked = {user: [] for user in self.users}

    @property
    def total(self) -> int:
        return sum(len(ids) for ids in self.acked.values())

    def run(self) -> None:
        step = 0
        try:
            with Publisher(redis_url=self.url) as publisher:
                while not self.stop.is_set():
                    user = self.users[step % len(self.users)]
                    try:
                        event_id = publisher.progress(
                            user, "job", progress=step % 100, current_step=f"step {step}"
                        )
                        self.acked[user].append(event_id)
                        step += 1
                    except (BrokerUnavailable, redis.RedisError, OSError):
                        self.failures += 1
                    self.stop.wait(0.02)  # pacing, about 50 events a second
        except BaseException as exc:
            self.error = exc


@contextlib.asynccontextmanager
async def producing(producer: Producer) -> AsyncIterator[Producer]:
    thread = threading.Thread(target=producer.run, name="producer")
    thread.start()
    try:
        yield producer
    finally:
        producer.stop.set()
        await asyncio.to_thread(thread.join, 30)
        assert not thread.is_alive(), "the producer did not stop"
    if producer.error is not None:
        raise AssertionError(f"the producer failed: {producer.error!r}")


async def published_for(producer: Producer, seconds: float, at_least: int, what: str) -> None:
    """Let the producer run `seconds` more, and publish at least `at_least` events."""
    start, until = producer.total, time.monotonic() + seconds
    await eventually(
        lambda: time.monotonic() >= until and producer.total >= start + at_least,
        what=what,
        timeout=seconds + 30,
    )


async def all_delivered(producer: Producer, clients: list[Client]) -> None:
    last = {user: ids[-1] for user, ids in producer.acked.items() if ids}
    await eventually(
        lambda: all(c.has(last[c.user]) for c in clients if c.user in last),
        what="every stream to receive its user's last acknowledged event",
        timeout=30,
    )


def assert_in_order_without_duplicates(client: Client, acked: list[str]) -> None:
    delivered = client.event_ids
    assert len(delivered) == len(set(delivered)), f"{client.name}: an event came twice"
    acked_set, delivered_set = set(acked), set(delivered)
    assert set(delivered) <= acked_set, f"{client.name}: an event nobody acknowledged"
    assert [i for i in delivered if i in acked_set] == [i for i in acked if i in delivered_set], (
        f"{client.name}: events out of order"
    )


@dataclass
class MidStream:
    server: ServerProcess
    producer: Producer
    clients: list[Client]


async def disturbed_mid_stream(
    cluster: RedisCluster,
    process_env: dict[str, str],
    start_process: StartProcess,
    token_for: TokenFor,
    users: list[str],
    disturbance: str,
    disturb: Callable[[Producer], Awaitable[None]],
    carry_on_s: float,
) -> MidStream:
    """A WebSocket and an SSE stream per user and a producer publishing for them; once
    every stream has 10 events, `disturb` runs; the producer carries on for `carry_on_s`
    (and 50 events more), then every stream receives its user's last acknowledged
    event. The history is not trimmed: the counts are exact."""
    server = await start_service(
        cluster, process_env, start_process, STREAMER_HISTORY_SIZE="100000"
    )
    streams = [(transport, user) for user in users for transport in ("websocket", "sse")]
    producer = Producer(cluster.url, users)
    async with session_for(server) as session, reading(session, token_for, streams) as clients:
        await first_snapshots(clients)
        async with producing(producer):
            await eventually(
                lambda: all(len(c.event_ids) >= 10 for c in clients) and not producer.error,
                what=f"events before the {disturbance}",
            )
            await disturb(producer)
            await published_for(
                producer, carry_on_s, 50, f"the producer to carry on after the {disturbance}"
            )
        await all_delivered(producer, clients)
        for client in clients:
            client.check()
    return MidStream(server, producer, clients)


@pytest.mark.timeout(90)
async def test_master_killed_mid_stream(
    redis_cluster: RedisCluster,
    process_env: dict[str, str],
    start_process: StartProcess,
    token_for: TokenFor,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The master of two users' slots is SIGKILLed; its replica takes over. Every
    acknowledged event reaches each of their streams, or the stream is told it missed
    some (`recovered: false`) after the gap began; nothing published after the
    promotion is missed. A user on another master is served throughout."""
    cluster = redis_cluster
    monkeypatch.setenv("STREAMER_HISTORY_SIZE", "100000")  # no trim: the count is exact
    spread = users_by_master(cluster, [f"failover-{n}" for n in range(40)])
    victim = max(spread, key=lambda master: len(spread[master]))
    doomed = spread[victim][:2]
    bystander = next(users[0] for master, users in spread.items() if master != victim)
    users = [*doomed, bystander]
    promoted: tuple[str, int] | None = None
    after: dict[str, int] = {}

    async def failover(producer: Producer) -> None:
        nonlocal promoted
        promoted = await asyncio.to_thread(cluster.kill_master_of, history_key(doomed[0]))
        after.update((user, len(ids)) for user, ids in producer.acked.items())

    run = await disturbed_mid_stream(
        cluster, process_env, start_process, token_for, users, "failover", failover, 5
    )
    server, producer, clients = run.server, run.producer, run.clients
    assert promoted is not None
    assert (await asyncio.to_thread(server.get, "/readyz"))[0] == 200

    with cluster.client() as reader:
        kept = {user: {i.decode() for i, _ in reader.xrange(history_key(user))} for user in users}
    for client in clients:
        acked = producer.acked[client.user]
        assert_in_order_without_duplicates(client, acked)
        delivered = set(client.event_ids)
        # What was published once the replica had taken over arrived in full (unless
        # a later resync snapshot already covers it).
        resync_ids = [EventId.parse(client.messages[n]["id"]) for n in client.resyncs]
        last_resync = max((i for i in resync_ids if i is not None), default=None)
        required = [
            i
            for i in acked[after[client.user] :]
            if last_resync is None or parse_id(i) > last_resync
        ]
        assert required, f"{client.name}: nothing published after the promotion"
        assert set(required) <= delivered, f"{client.name}: missed after the promotion"
        # A gap is always reported: after the last event delivered before it, the
        # stream received a snapshot with `recovered: false`.
        positions = {
            m["id"]: n for n, m in enumerate(client.messages) if m["type"] != "active_tasks"
        }
        for index, event_id in enumerate(acked):
            if event_id in delivered:
                continue
            before = [positions[i] for i in acked[:index] if i in positions]
            gap_began = max(before, default=0)
            assert any(n > gap_began for n in client.resyncs), (
                f"{client.name}: {event_id} (acknowledged) missed without recovered: false"
            )
        if client.user == bystander:
            # Another shard's failover is not this user's: no resync, nothing missed.
            assert not client.resyncs and set(acked) == delivered, client.name
        lost_by_redis = [i for i in acked if stream_id(i) not in kept[client.user]]
        print(
            f"{client.name} ({'on' if client.user in doomed else 'not on'} the master "
            f"{victim[1]} -> {promoted[1]}): {len(acked)} acknowledged, "
            f"{len(lost_by_redis)} lost by Redis, {len(delivered)} delivered, "
            f"{len(set(acked) - delivered)} not delivered, {len(client.resyncs)} resync(s), "
            f"{producer.failures} publish failures"
        )


@pytest.mark.timeout(90)
async def test_slot_moved_mid_stream(
    redis_cluster: RedisCluster,
    process_env: dict[str, str],
    start_process: StartProcess,
    token_for: TokenFor,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A connected user's slot moves, with its keys, to another master while events
    are published: every acknowledged event arrives, in order, once; so do those
    published after the move. Another user on the old master is not disturbed."""
    cluster = redis_cluster
    monkeypatch.setenv("STREAMER_HISTORY_SIZE", "100000")
    spread = users_by_master(cluster, [f"moving-{n}" for n in range(40)])
    source = max(spread, key=lambda master: len(spread[master]))
    mover, neighbour = spread[source][:2]
    assert cluster.slot_of(history_key(mover)) != cluster.slot_of(history_key(neighbour))
    target = next(master for master in cluster.masters() if master != source)
    users = [mover, neighbour]
    with cluster.client() as client:  # keys of the mover's slot, to make the move last
        for n in range(300):
            client.set(f"filler:{{{quote(mover, safe='')}}}:{n}", n)
    during = 0

    async def move(producer: Producer) -> None:
        nonlocal during
        # About 0.6 s with the slot half moved: 30 batches of 10 keys, 20 ms apart.
        before = producer.total
        await asyncio.to_thread(
            cluster.move_slot_of, history_key(mover), to=target, batch=10, pause_s=0.02
        )
        during = producer.total - before
        assert cluster.master_of(history_key(mover)) == target

    run = await disturbed_mid_stream(
        cluster, process_env, start_process, token_for, users, "move", move, 3
    )
    producer, clients = run.producer, run.clients

    # The move lost nothing: the new master holds every acknowledged event.
    with cluster.node(target).client() as new_master:
        kept = {i.decode() for i, _ in new_master.xrange(history_key(mover))}
    assert {stream_id(i) for i in producer.acked[mover]} <= kept
    for client in clients:
        acked = producer.acked[client.user]
        assert_in_order_without_duplicates(client, acked)
        assert set(acked) == set(client.event_ids), f"{client.name}: an event was missed"
        print(
            f"{client.name}: {len(acked)} acknowledged and delivered ({during} of both users "
            f"during the move), "
            f"{len(client.resyncs)} resync(s), {producer.failures} publish failures"
        )


def test_a_users_keys_and_channel_share_a_slot() -> None:
    """What the tests pick users by: the slot of a user's history is the slot of all of
    that user's keys and of their channel (hash tag `{<quoted user id>}`)."""
    user = "a b/{c}"
    slot = RedisCluster.slot_of(history_key(user))
    assert RedisCluster.slot_of(user_channel(user)) == slot
    assert RedisCluster.slot_of(history_key("other")) != slot


@pytest.mark.timeout(120)
async def test_a_subscription_withdrawn_while_its_master_fails_over_is_not_made_again(
    redis_cluster: RedisCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A user's only client leaves while the master of their slot hangs (so Redis has
    not confirmed the subscription); the cluster fails the hanging master over to its
    replica. The subscription is not made on the new master: nobody here wants that
    user's events."""
    cluster = redis_cluster
    user = "withdrawn-during-failover"
    channel = user_channel(user)
    # Room for the failover and for noticing it: the subscription is still awaited then.
    for module in (redis_subscriber, redis_cluster_subscriber):
        monkeypatch.setattr(module, "SUBSCRIBE_TIMEOUT_S", 40.0)

    async def nothing_to_catch_up(channels: object) -> None:
        return None

    subscriber = ClusterSubscriber(
        cluster.url,
        on_messages=lambda messages: None,
        on_restored=nothing_to_catch_up,
        idle_ping_s=1.0,
        pong_timeout_s=1.0,
    )
    running = asyncio.create_task(subscriber.run())
    hanging = cluster.node(cluster.master_of(history_key(user)))
    assert hanging.process is not None
    subscribing: asyncio.Task[None] | None = None
    try:
        await eventually(subscriber.ready.is_set, what="the subscriber on every master")
        hanging.process.send_signal(signal.SIGSTOP)
        subscribing = asyncio.create_task(subscriber.subscribe(channel))
        await eventually(lambda: channel in subscriber.wanted, what="the subscription asked")
        subscriber.unsubscribe(channel)  # the client left
        assert not subscribing.done()

        def promoted() -> tuple[str, int] | None:
            try:
                master = cluster.master_of(history_key(user))
            except AssertionError:  # no live master claims the slot yet
                return None
            return master if master != hanging.address else None

        new_master = await eventually(
            lambda: asyncio.to_thread(promoted), what="the replica to take over", timeout=30
        )
        with pytest.raises(BrokerUnavailable, match="withdrawn"):
            await asyncio.wait_for(subscribing, 45)
        await eventually(subscriber.ready.is_set, what="the subscriber on the new layout")
        assert subscriber.shard_for(channel) is not None
        with cluster.node(new_master).client() as client:
            counts = client.execute_command("PUBSUB", "SHARDNUMSUB", channel)
        assert counts == [channel.encode(), 0], counts
    finally:
        hanging.process.send_signal(signal.SIGCONT)
        for task in (running, subscribing):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, BrokerUnavailable):
                    await task


# --- sessions ----------------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_sessions_and_their_cap_under_the_cluster(
    redis_cluster: RedisCluster,
    process_env: dict[str, str],
    start_process: StartProcess,
    token_for: TokenFor,
) -> None:
    """Server-side sessions work on the cluster: a session id shares its user's index
    slot, so the cap (here 2) evicts the oldest in one script call; logging out ends it."""
    server = await start_service(
        redis_cluster,
        process_env,
        start_process,
        STREAMER_MAX_SESSIONS_PER_USER="2",
        STREAMER_COOKIE_SECURE="false",
    )
    user = "session-user"
    cookies: list[str] = []
    async with session_for(server) as http:
        for _ in range(3):
            async with http.post("/auth/session", json={"token": token_for(user)}) as login:
                assert login.status == 200, (await login.text()) + server.log()[-3000:]
                cookies.append(login.cookies[SESSION_COOKIE].value)
            http.cookie_jar.clear()
        assert len(set(cookies)) == 3
        assert all(c.startswith(SESSION_INDEX_TAG_OPEN) for c in cookies), cookies
        assert user not in "".join(cookies), "the user id does not travel in the cookie"
        index = SESSION_INDEX_PREFIX + cookies[0][: cookies[0].index("}") + 1]
        slots = {redis_cluster.slot_of(index)}
        slots |= {redis_cluster.slot_of(SESSION_KEY_PREFIX + c) for c in cookies}
        assert len(slots) == 1, "the sessions and their index share a slot"

        async def stream_status(cookie: str) -> int:
            async with http.get("/sse/tasks/", cookies={SESSION_COOKIE: cookie}) as response:
                return response.status

        assert await stream_status(cookies[0]) == 401, "the oldest session was evicted"
        assert await stream_status(cookies[1]) == 200
        assert await stream_status(cookies[2]) == 200
        async with http.delete("/auth/session", cookies={SESSION_COOKIE: cookies[2]}) as out:
            assert out.status in (200, 204)
        assert await stream_status(cookies[2]) == 401, "logging out ended the session"
        assert await stream_status(cookies[1]) == 200


# --- a cluster out of reach ----------------------------------------------------------------


async def test_an_unreachable_cluster_is_broker_unavailable(
    process_env: dict[str, str], start_process: StartProcess, token_for: TokenFor
) -> None:
    """No node answers: producers get BrokerUnavailable (never the cluster client's own
    exception), and the service starts, says it is not ready and refuses streams with
    503 until the cluster is back."""
    url = f"redis+cluster://127.0.0.1:{free_port()}"
    with pytest.raises(BrokerUnavailable):
        Publisher(redis_url=url)
    async with AsyncPublisher(redis_url=url) as publisher:
        with pytest.raises(BrokerUnavailable):
            await publisher.progress("u", "t", progress=1)
        with pytest.raises(BrokerUnavailable):
            await publisher.is_cancelled("u", "t")
    server = start_process(gunicorn_args(1), {**process_env, "STREAMER_REDIS_URL": url})

    def alive() -> bool:
        try:
            return server.get("/healthz")[0] == 200
        except OSError:
            return False

    await asyncio.to_thread(eventually_sync, alive, what="the service to start", timeout=30)
    assert (await asyncio.to_thread(server.get, "/readyz"))[0] == 503
    async with (
        session_for(server) as http,
        http.get("/sse/tasks/", params={"token": token_for("u")}) as response,
    ):
        assert response.status == 503, await response.text()
    assert "Traceback" not in server.log(), server.log()[-3000:]
