"""Fan-out benchmark: real gunicorn workers, a private redis-server, many clients.

    .venv/bin/python -m bench.fanout --clients 1000 --events 100 --workers 2

Opens --clients connections (half WebSocket, half SSE) for one user each, publishes
--events events (through one Redis publisher, paced by --interval), and measures for
every delivery the latency from publish to receipt, plus connection set-up time,
memory per connection of the workers, and Redis commands per publish. Everything runs
on loopback, is bounded in count and time, and stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import time

import aiohttp
import redis

from bench.service import SECRET, running_service, stop_on_sigterm
from streamer.auth.tokens import issue_token
from streamer.publisher import AsyncPublisher
from tests.processes import ServerProcess, rss_kib, worker_pids


class Receiver:
    """Collects (event id -> receive time) for one client."""

    def __init__(self) -> None:
        self.received: dict[str, float] = {}


async def ws_client(
    session: aiohttp.ClientSession, url: str, receiver: Receiver, ready: asyncio.Event
) -> None:
    async with session.ws_connect(url, max_msg_size=0) as ws:
        await ws.receive()  # active_tasks
        ready.set()
        async for message in ws:
            event = json.loads(message.data)
            if event["type"] != "active_tasks":
                receiver.received[event["id"]] = time.perf_counter()


async def sse_client(
    session: aiohttp.ClientSession, url: str, receiver: Receiver, ready: asyncio.Event
) -> None:
    async with session.get(url) as response:
        async for raw in response.content:
            line = raw.decode()
            if line.startswith("data: "):
                event = json.loads(line[6:])
                if event["type"] == "active_tasks":
                    ready.set()
                else:
                    receiver.received[event["id"]] = time.perf_counter()


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def run(args: argparse.Namespace, server: ServerProcess, redis_url: str) -> dict[str, object]:
    token = issue_token(SECRET, "bench-user", ttl_s=3600)
    base = server.base_url
    workers = worker_pids(server.process.pid)
    rss_before = sum(rss_kib(pid) for pid in workers)

    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        receivers = [Receiver() for _ in range(args.clients)]
        readies = [asyncio.Event() for _ in range(args.clients)]
        started = time.perf_counter()
        tasks = []
        for n, (receiver, ready) in enumerate(zip(receivers, readies, strict=True)):
            if n % 2 == 0:
                url = base.replace("http", "ws") + f"/ws/tasks/?token={token}"
                tasks.append(asyncio.create_task(ws_client(session, url, receiver, ready)))
            else:
                url = f"{base}/sse/tasks/?token={token}"
                tasks.append(asyncio.create_task(sse_client(session, url, receiver, ready)))
        all_ready = asyncio.ensure_future(asyncio.gather(*(r.wait() for r in readies)))
        done, _ = await asyncio.wait(
            [all_ready, *tasks], timeout=args.timeout, return_when=asyncio.FIRST_COMPLETED
        )
        if all_ready not in done:
            for task in done:
                task.result()  # a client failed: show why
            ready_ws = sum(r.is_set() for r in readies[0::2])
            ready_sse = sum(r.is_set() for r in readies[1::2])
            raise TimeoutError(
                f"clients not connected within {args.timeout}s: "
                f"{ready_ws} WebSocket and {ready_sse} SSE of {args.clients} ready"
            )
        connect_s = time.perf_counter() - started
        rss_after = sum(rss_kib(pid) for pid in workers)

        admin = redis.Redis.from_url(redis_url)
        published: dict[str, float] = {}
        async with AsyncPublisher(redis_url) as publisher:
            await publisher.progress("warm-up", "warm-up", progress=0)  # loads the script
            evalsha_before = admin.info("commandstats")["cmdstat_evalsha"]["calls"]
            publish_started = time.perf_counter()
            for step in range(args.events):
                sent_at = time.perf_counter()
                event_id = await publisher.progress(
                    "bench-user", f"task-{step % 10}", progress=step % 101
                )
                published[event_id] = sent_at
                await asyncio.sleep(args.interval)
            publish_s = time.perf_counter() - publish_started
        evalsha_after = admin.info("commandstats")["cmdstat_evalsha"]["calls"]
        admin.close()

        expected = args.clients * args.events

        async def all_delivered() -> None:
            while sum(len(r.received) for r in receivers) < expected:
                await asyncio.sleep(0.05)

        with contextlib.suppress(TimeoutError):  # what is missing is reported as lost
            await asyncio.wait_for(all_delivered(), args.timeout)
        drained_s = time.perf_counter() - publish_started
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    latencies_ms = [
        (received_at - published[event_id]) * 1000
        for receiver in receivers
        for event_id, received_at in receiver.received.items()
        if event_id in published
    ]
    delivered = len(latencies_ms)
    return {
        "clients": args.clients,
        "workers": len(workers),
        "events": args.events,
        "deliveries_expected": expected,
        "deliveries": delivered,
        "lost": expected - delivered,
        "connect_all_s": round(connect_s, 2),
        "publish_rate_per_s": round(args.events / publish_s, 1),
        "deliveries_per_s": round(delivered / drained_s, 1),
        "latency_ms_p50": round(statistics.median(latencies_ms), 2) if latencies_ms else None,
        "latency_ms_p95": round(percentile(latencies_ms, 0.95), 2) if latencies_ms else None,
        "latency_ms_p99": round(percentile(latencies_ms, 0.99), 2) if latencies_ms else None,
        "latency_ms_max": round(max(latencies_ms), 2) if latencies_ms else None,
        "worker_rss_kib_per_connection": round((rss_after - rss_before) / args.clients, 1),
        "redis_round_trips_per_publish": (evalsha_after - evalsha_before) / args.events,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--events", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--interval", type=float, default=0.02, help="seconds between events")
    parser.add_argument("--timeout", type=float, default=60, help="bound for each phase")
    args = parser.parse_args()
    stop_on_sigterm()
    if not 1 <= args.clients <= 20_000 or not 1 <= args.events <= 100_000:
        parser.error("--clients must be 1..20000 and --events 1..100000")

    settings = {"STREAMER_CLIENT_BUFFER": "10000", "STREAMER_MAX_CONNECTIONS_PER_USER": "100000"}
    with running_service(workers=args.workers, settings=settings) as (server, redis_url):
        result = asyncio.run(run(args, server, redis_url))
    width = max(len(key) for key in result)
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")
    print(json.dumps(result))
    return 0 if result["lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
