"""The publisher: a process of its own beside the load generator, so that its cost is
not counted against the clients. It reads commands on stdin, one a line, and answers
each with one JSON line on stdout:

    probe ROUND          one probe event to every user
    run EVENTS RATE      the measured events (RATE 0: as fast as it can)

    python -m bench.load.publisher --server streamer --redis-url URL --users 100

streamer is published to through its own AsyncPublisher (the path a producer takes),
the reference with a plain Redis PUBLISH of an equivalent JSON message.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from typing import Protocol

import redis.asyncio as aioredis
import uvloop

from streamer.publisher import AsyncPublisher

REFERENCE_CHANNEL = "bench:user:{user}"
# Calls in flight at once, as a producer's several workers make them (and as the
# team's yardstick publishes): streamer's AsyncPublisher sends those that wait together.
IN_FLIGHT = 8


class Sink(Protocol):
    async def send(self, user: str, task_id: str, seq: int, total: int) -> None: ...

    async def close(self) -> None: ...


class StreamerSink:
    def __init__(self, redis_url: str) -> None:
        self.publisher = AsyncPublisher(redis_url)

    async def send(self, user: str, task_id: str, seq: int, total: int) -> None:
        await self.publisher.progress(
            user,
            task_id,
            progress=seq * 100 // max(total, 1),
            current_step=f"step {seq}",
            processed_items=seq,
            total_items=total,
        )

    async def close(self) -> None:
        await self.publisher.close()


class ReferenceSink:
    """The message streamer would send for the same call, with an id of the same size."""

    def __init__(self, redis_url: str) -> None:
        self.client = aioredis.from_url(redis_url)

    async def send(self, user: str, task_id: str, seq: int, total: int) -> None:
        message = {
            "id": f"{os.getpid():08x}-{time.time_ns() // 1_000_000}-{seq}",
            "type": "task_progress",
            "task_id": task_id,
            "status": "PROGRESS",
            "progress": seq * 100 // max(total, 1),
            "current_step": f"step {seq}",
            "processed_items": seq,
            "total_items": total,
        }
        channel = REFERENCE_CHANNEL.format(user=user)
        await self.client.publish(channel, json.dumps(message, separators=(",", ":")))

    async def close(self) -> None:
        await self.client.aclose()


async def probe(sink: Sink, users: int, round_: int) -> dict[str, object]:
    for user in range(users):
        await sink.send(str(user), f"probe.{round_}.{time.time_ns()}", 0, 1)
    return {"probed_users": users}


async def publish(sink: Sink, users: int, events: int, rate: float) -> dict[str, object]:
    """`events` sends, at most IN_FLIGHT of them at once (RATE 0: as fast as that goes);
    each event's send time is taken when its call starts."""
    cpu_before, started = os.times(), time.perf_counter()
    slots = asyncio.Semaphore(IN_FLIGHT)
    calls: list[asyncio.Task[None]] = []

    async def send(seq: int) -> None:
        try:
            await sink.send(str(seq % users), f"bench.{seq}.{time.time_ns()}", seq, events)
        finally:
            slots.release()

    for seq in range(events):
        if rate > 0:
            delay = started + seq / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
        await slots.acquire()
        calls.append(asyncio.ensure_future(send(seq)))
    await asyncio.gather(*calls)  # the first failure, if any, is the command's error
    seconds = time.perf_counter() - started
    cpu_after = os.times()
    cpu = (cpu_after.user + cpu_after.system) - (cpu_before.user + cpu_before.system)
    return {"published": events, "publish_s": seconds, "publisher_cpu_s": cpu}


async def serve(sink: Sink, users: int) -> None:
    loop = asyncio.get_running_loop()
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        command, *values = line.split()
        if command == "probe":
            answer = await probe(sink, users, int(values[0]))
        elif command == "run":
            answer = await publish(sink, users, int(values[0]), float(values[1]))
        else:
            answer = {"error": f"unknown command {command!r}"}
        print(json.dumps(answer), flush=True)


async def main_async(args: argparse.Namespace) -> None:
    sink: Sink = (
        StreamerSink(args.redis_url) if args.server == "streamer" else ReferenceSink(args.redis_url)
    )
    try:
        print(json.dumps({"ready": True}), flush=True)
        await serve(sink, args.users)
    finally:
        await sink.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", choices=["streamer", "reference"], required=True)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--users", type=int, required=True)
    args = parser.parse_args()
    uvloop.run(main_async(args))


if __name__ == "__main__":
    main()
