"""Soak test: resume under faults, counted event by event.

    .venv/bin/python -m bench.soak --duration 60

Runs real gunicorn workers on a private redis-server, clients (a third each on
WebSocket, SSE and long polling) that disconnect at random moments and resume from
their last id, producers
publishing all along, and faults: the Redis subscriber connections are killed
(`CLIENT KILL TYPE pubsub`) and gunicorn workers are SIGKILLed. At the end every
client's received ids are compared with what was published for its user, and it
prints published, delivered, lost, duplicated and reordered. Exit status 0 only
when nothing was lost, duplicated or reordered. Loopback only, bounded in time.
With --cluster it runs on a private Redis Cluster (3 masters, 3 replicas) and kills the
subscriber connections on every master.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import redis

from bench.service import SECRET, running_service, stop_on_sigterm
from streamer.auth.tokens import issue_token
from streamer.broker.redis_cluster import cluster_client_sync, is_cluster_url
from streamer.publisher import AsyncPublisher
from streamer.wire import EventId
from tests.processes import ServerProcess, worker_pids

RECONNECT_PAUSE_S = 0.05
# How often a connection ends right after its snapshot, before any task event: the
# client must then resume from the snapshot's id.
DROP_AFTER_SNAPSHOT = 0.25


TRANSPORTS = ("websocket", "sse", "poll")


class DropNow(Exception):
    """The client hangs up here, as a flaky network would."""


def order_key(event_id: str) -> tuple[int, int]:
    parsed = EventId.parse(event_id)
    assert parsed is not None, event_id
    return parsed.ms, parsed.seq


@dataclass
class Client:
    user: str
    transport: str
    base_url: str
    token: str
    received: list[str] = field(default_factory=list)
    # The last id seen, snapshots included: where the next connection resumes from.
    resume_point: str | None = None
    connections: int = 0
    resyncs: int = 0
    drops_after_snapshot: int = 0
    # Connections on which an id did not go up (a snapshot ahead of an event after it).
    backward_ids: int = 0
    connected_once: asyncio.Event = field(default_factory=asyncio.Event)
    drop_after_snapshot: bool = False
    _connection_ids: list[str] = field(default_factory=list)

    @property
    def last_id(self) -> str | None:
        return self.received[-1] if self.received else None

    def _on_message(self, message: dict[str, Any]) -> None:
        event_id = message["id"]
        ids = self._connection_ids
        resync = message.get("recovered") is False
        if ids and order_key(event_id) <= order_key(ids[-1]) and not resync:
            self.backward_ids += 1
        ids.append(event_id)
        self.resume_point = event_id
        if message["type"] == "active_tasks":
            self.connections += 1
            if not message["recovered"]:
                self.resyncs += 1
            self.connected_once.set()
            if self.drop_after_snapshot:
                self.drops_after_snapshot += 1
                raise DropNow
        else:
            self.received.append(event_id)

    async def _stream_once(self, session: aiohttp.ClientSession) -> None:
        params = {"token": self.token}
        self._connection_ids = []
        if self.resume_point is not None:
            params["last_event_id"] = self.resume_point
        if self.transport == "websocket":
            url = self.base_url.replace("http", "ws") + "/ws/tasks/"
            async with session.ws_connect(url, params=params) as ws:
                async for frame in ws:
                    if frame.type == aiohttp.WSMsgType.TEXT:
                        self._on_message(json.loads(frame.data))
        elif self.transport == "poll":
            while True:  # one "connection": polls, each resuming from the last id
                async with session.get(f"{self.base_url}/poll/tasks/", params=params) as answer:
                    if answer.status != 200:
                        raise ConnectionError(f"poll answered {answer.status}")
                    body = await answer.json()
                for message in body["events"]:
                    self._on_message(message)
                if body["last_event_id"]:
                    params["last_event_id"] = body["last_event_id"]
        else:
            async with session.get(f"{self.base_url}/sse/tasks/", params=params) as response:
                if response.status != 200:
                    raise ConnectionError(f"SSE answered {response.status}")
                async for raw in response.content:
                    line = raw.decode()
                    if line.startswith("data: "):
                        self._on_message(json.loads(line[6:]))

    async def run(self, stop_churn: asyncio.Event, done: asyncio.Event, seed: int) -> None:
        """Stream, dropping the connection at random moments until `stop_churn`,
        then stay connected until `done`."""
        rng = random.Random(seed)
        async with aiohttp.ClientSession() as session:
            while not done.is_set():
                churn = not stop_churn.is_set()
                self.drop_after_snapshot = churn and rng.random() < DROP_AFTER_SNAPSHOT
                # Short lives too: many end before the first task event arrives.
                lifetime = rng.choice((rng.uniform(0.01, 0.3), rng.uniform(0.3, 3.0)))
                with contextlib.suppress(
                    TimeoutError,
                    aiohttp.ClientError,
                    ConnectionError,
                    asyncio.IncompleteReadError,
                    DropNow,
                ):
                    async with asyncio.timeout(lifetime if churn else None):
                        await self._stream_once(session)
                await asyncio.sleep(RECONNECT_PAUSE_S)


async def produce(
    redis_url: str, users: list[str], published: dict[str, list[str]], stop: asyncio.Event,
    interval: float, seed: int,
) -> int:  # fmt: skip
    rng = random.Random(seed)
    count = 0
    async with AsyncPublisher(redis_url) as publisher:
        while not stop.is_set():
            user = rng.choice(users)
            task = f"task-{rng.randrange(3)}"
            event_id = await publisher.progress(user, task, progress=count % 101)
            published[user].append(event_id)
            count += 1
            await asyncio.sleep(interval)
    return count


async def inject_faults(
    server: ServerProcess, redis_url: str, stop: asyncio.Event, args: argparse.Namespace,
    counts: dict[str, int],
) -> None:  # fmt: skip
    rng = random.Random(args.seed)
    next_kill = time.monotonic() + args.redis_kill_every
    next_worker_kill = time.monotonic() + args.worker_kill_every
    while not stop.is_set():
        await asyncio.sleep(0.1)
        now = time.monotonic()
        if now >= next_kill:
            counts["redis_subscriber_kills"] += kill_subscribers(redis_url)
            next_kill = now + args.redis_kill_every
        if now >= next_worker_kill:
            workers = worker_pids(server.process.pid)
            if workers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(rng.choice(workers), signal.SIGKILL)
                    counts["worker_kills"] += 1
            next_worker_kill = now + args.worker_kill_every


def kill_subscribers(redis_url: str) -> int:
    """Kill the subscriber connections of every worker (on every master of a cluster)."""
    if is_cluster_url(redis_url):
        cluster = cluster_client_sync(redis_url)
        try:
            return sum(
                int(cluster.client_kill_filter(_type="pubsub", target_nodes=node))
                for node in cluster.get_primaries()
            )
        finally:
            cluster.close()
    admin = redis.Redis.from_url(redis_url)
    try:
        return int(admin.client_kill_filter(_type="pubsub"))
    finally:
        admin.close()


# What inject_faults counts; printed after evaluate()'s figures.
FAULT_COUNTS = ("redis_subscriber_kills", "worker_kills")


def evaluate(clients: list[Client], published: dict[str, list[str]]) -> dict[str, int]:
    totals = dict(published=0, expected_deliveries=0, delivered=0, lost=0, duplicated=0,
                  reordered=0, unexpected=0, resyncs=0, reconnects=0, drops_after_snapshot=0,
                  backward_ids=0)  # fmt: skip
    totals["published"] = sum(len(ids) for ids in published.values())
    for client in clients:
        expected = published[client.user]
        received = client.received
        seen = set(received)
        totals["expected_deliveries"] += len(expected)
        totals["delivered"] += len(seen & set(expected))
        totals["lost"] += len(set(expected) - seen)
        totals["duplicated"] += len(received) - len(seen)
        totals["unexpected"] += len(seen - set(expected))
        totals["reordered"] += sum(
            1 for a, b in itertools.pairwise(received) if order_key(b) <= order_key(a)
        )
        totals["resyncs"] += client.resyncs
        totals["drops_after_snapshot"] += client.drops_after_snapshot
        totals["backward_ids"] += client.backward_ids
        totals["reconnects"] += max(client.connections - 1, 0)
    return totals


async def soak(args: argparse.Namespace, server: ServerProcess, redis_url: str) -> dict[str, int]:
    users = [f"soak-user-{n}" for n in range(args.users)]
    published: dict[str, list[str]] = {user: [] for user in users}
    clients = [
        Client(
            user=users[n % len(users)],
            transport=TRANSPORTS[n % len(TRANSPORTS)],
            base_url=server.base_url,
            token=issue_token(SECRET, users[n % len(users)], ttl_s=3600),
        )
        for n in range(args.clients)
    ]
    stop_publishing, stop_churn, done = asyncio.Event(), asyncio.Event(), asyncio.Event()
    client_tasks = [
        asyncio.create_task(c.run(stop_churn, done, args.seed + n)) for n, c in enumerate(clients)
    ]
    counts = dict.fromkeys(FAULT_COUNTS, 0)
    try:
        # Every client holds a connection before the first event, so it must get them all.
        await asyncio.wait_for(
            asyncio.gather(*(c.connected_once.wait() for c in clients)), args.timeout
        )
        producers = [
            asyncio.create_task(
                produce(redis_url, users, published, stop_publishing, args.interval, args.seed + p)
            )
            for p in range(args.producers)
        ]
        faults = asyncio.create_task(
            inject_faults(server, redis_url, stop_publishing, args, counts)
        )
        await asyncio.sleep(args.duration)
        stop_publishing.set()
        await asyncio.gather(*producers, faults)
        stop_churn.set()

        # Producers append concurrently: the newest id is the largest, not the last.
        newest = {user: max(ids, key=order_key) for user, ids in published.items() if ids}

        async def caught_up() -> None:
            while any(c.user in newest and c.last_id != newest[c.user] for c in clients):
                await asyncio.sleep(0.1)

        with contextlib.suppress(TimeoutError):  # what is missing then is counted as lost
            await asyncio.wait_for(caught_up(), args.timeout)
    finally:
        done.set()
        for task in client_tasks:
            task.cancel()
        await asyncio.gather(*client_tasks, return_exceptions=True)
    return {**evaluate(clients, published), **counts}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=60, help="seconds of publishing")
    parser.add_argument("--clients", type=int, default=40)
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--producers", type=int, default=4)
    parser.add_argument("--interval", type=float, default=0.02, help="per producer, seconds")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--redis-kill-every", type=float, default=5.0)
    parser.add_argument("--worker-kill-every", type=float, default=15.0)
    parser.add_argument("--timeout", type=float, default=60, help="bound for set-up and drain")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--cluster", action="store_true", help="on a Redis Cluster of 3 masters and 3 replicas"
    )
    args = parser.parse_args()
    stop_on_sigterm()
    if not 1 <= args.duration <= 3600 or not 1 <= args.clients <= 2000:
        parser.error("--duration must be 1..3600 s and --clients 1..2000")

    settings = {"STREAMER_HISTORY_SIZE": "100000"}
    flags = ("--graceful-timeout", "5")
    with running_service(
        workers=args.workers, settings=settings, gunicorn_flags=flags, cluster=args.cluster
    ) as (server, redis_url):
        result = asyncio.run(soak(args, server, redis_url))
    on = ", Redis Cluster" if args.cluster else ""
    print(f"soak {args.duration:g}s, {args.clients} clients, {args.workers} workers{on}:")
    for key, value in result.items():
        print(f"  {key:<24} {value}")
    print(json.dumps(result))
    bad = sum(result[k] for k in ("lost", "duplicated", "reordered", "unexpected", "backward_ids"))
    return 0 if bad == 0 and result["published"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
