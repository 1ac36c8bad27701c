"""Publishing throughput: events per second through the Python publishers.

    python -m bench.publish [--seconds 2] [--users 100] [--only NAME ...] [--uvloop]
                            [--empty-histories]

Starts a private redis-server (pinned to CPU 1; this process then runs on CPU 0) and
runs each scenario for about --seconds: `AsyncPublisher.progress` from 1 and 8
concurrent tasks (each awaiting its calls one after the other), `Publisher.progress`
one after the other, and `publish_many` (sync and async) with batches of 100, 1000
and 10000 events spread over --users users. Batches are made of events built
beforehand, except in the `+build` scenarios, which count building them
(`progress_event`) too. Every user's history is filled first (unless
--empty-histories; as many events per user as STREAMER_HISTORY_SIZE, default 1000), so
that each publish also trims it, as in a service that has run a while. Besides events/s
it prints, per event, the CPU time of this process and of Redis (INFO cpu: steadier
than events/s on a shared machine), the time Redis spent in the publish script (INFO
commandstats), and the events per script call.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
import uvloop

from bench.servers import SERVER_CPU, private_redis
from bench.service import stop_on_sigterm
from streamer.events import TaskEvent, progress_event
from streamer.publisher import AsyncPublisher, Publisher

BATCHES = (100, 1000, 10000)
DEFAULT_HISTORY_SIZE = 1000  # the service's default


@dataclass(frozen=True)
class Sample:
    """Counters read before and after a scenario."""

    wall: float
    cpu: float  # this process
    redis_cpu: float
    script_usec: float
    script_calls: int

    @classmethod
    def take(cls, admin: redis.Redis) -> Sample:
        cpu = admin.info("cpu")
        stats = admin.info("commandstats").get("cmdstat_evalsha", {"usec": 0, "calls": 0})
        return cls(
            time.perf_counter(),
            time.process_time(),
            float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]),
            float(stats["usec"]),
            int(stats["calls"]),
        )


@dataclass(frozen=True)
class Result:
    name: str
    events: int
    before: Sample
    after: Sample

    HEADER = (
        f"{'scenario':<24}{'events/s':>10}{'py cpu us/ev':>14}{'redis cpu us/ev':>17}"
        f"{'script us/ev':>14}{'events/call':>13}"
    )

    def row(self) -> str:
        a, b, n = self.after, self.before, max(self.events, 1)
        rate = self.events / (a.wall - b.wall)
        calls = max(a.script_calls - b.script_calls, 1)
        return (
            f"{self.name:<24}{rate:>10,.0f}{(a.cpu - b.cpu) * 1e6 / n:>14.1f}"
            f"{(a.redis_cpu - b.redis_cpu) * 1e6 / n:>17.1f}"
            f"{(a.script_usec - b.script_usec) / n:>14.1f}{self.events / calls:>13,.0f}"
        )


class Scenario:
    def __init__(self, users: int, seconds: float) -> None:
        self.users = users
        self.seconds = seconds
        self.counter = itertools.count()

    def user_and_task(self, worker: int) -> tuple[str, str]:
        """A concurrent publisher's own user and task."""
        return f"user-{worker % self.users}", f"task-{worker}"

    def event(self) -> TaskEvent:
        """The next event of a batch: batches spread over every user, one task each."""
        n = next(self.counter)
        user = n % self.users
        return progress_event(
            f"user-{user}", f"task-{user}", progress=n % 101, current_step=f"step {n}",
            processed_items=n, total_items=10**9,
        )  # fmt: skip

    def events(self, count: int) -> list[TaskEvent]:
        return [self.event() for _ in range(count)]


def measured(name: str, admin: redis.Redis, run: Callable[[], int]) -> Result:
    before = Sample.take(admin)
    events = run()
    return Result(name, events, before, Sample.take(admin))


async def measured_async(
    name: str, admin: redis.Redis, run: Callable[[], Awaitable[int]]
) -> Result:
    before = Sample.take(admin)
    events = await run()
    return Result(name, events, before, Sample.take(admin))


def running(seconds: float) -> Callable[[], bool]:
    deadline = time.perf_counter() + seconds
    return lambda: time.perf_counter() < deadline


def sync_progress(url: str, scenario: Scenario, admin: redis.Redis) -> Result:
    with Publisher(url) as publisher:
        publisher.publish(scenario.event())  # loads the script
        user, task = scenario.user_and_task(0)

        def run() -> int:
            more, count = running(scenario.seconds), 0
            while more():
                n = next(scenario.counter)
                publisher.progress(
                    user, task, progress=n % 101, current_step=f"step {n}",
                    processed_items=n, total_items=10**9,
                )  # fmt: skip
                count += 1
            return count

        return measured("sync progress", admin, run)


def sync_many(url: str, scenario: Scenario, admin: redis.Redis, batch: int, build: bool) -> Result:
    pool = [] if build else scenario.events(max(batch, 2000))
    with Publisher(url) as publisher:
        publisher.publish_many(scenario.events(10))

        def run() -> int:
            more, count = running(scenario.seconds), 0
            while more():
                events = scenario.events(batch) if build else _slice(pool, count, batch)
                publisher.publish_many(events)
                count += batch
            return count

        return measured(f"sync many {batch}{'+build' if build else ''}", admin, run)


def _slice(pool: list[TaskEvent], start: int, size: int) -> list[TaskEvent]:
    start %= len(pool)
    events = pool[start : start + size]
    return events + pool[: size - len(events)]


async def async_progress(url: str, scenario: Scenario, admin: redis.Redis, tasks: int) -> Result:
    async with AsyncPublisher(url) as publisher:
        await publisher.publish(scenario.event())
        more = running(0)
        count = 0

        async def worker(number: int) -> None:
            nonlocal count
            user, task = scenario.user_and_task(number)
            while more():
                n = next(scenario.counter)
                await publisher.progress(
                    user, task, progress=n % 101, current_step=f"step {n}",
                    processed_items=n, total_items=10**9,
                )  # fmt: skip
                count += 1

        async def run() -> int:
            nonlocal more
            more = running(scenario.seconds)
            await asyncio.gather(*(worker(n) for n in range(tasks)))
            return count

        return await measured_async(f"async progress x{tasks}", admin, run)


async def async_many(
    url: str, scenario: Scenario, admin: redis.Redis, batch: int, build: bool
) -> Result:
    pool = [] if build else scenario.events(max(batch, 2000))
    async with AsyncPublisher(url) as publisher:
        await publisher.publish_many(scenario.events(10))

        async def run() -> int:
            more, count = running(scenario.seconds), 0
            while more():
                events = scenario.events(batch) if build else _slice(pool, count, batch)
                await publisher.publish_many(events)
                count += batch
            return count

        return await measured_async(f"async many {batch}{'+build' if build else ''}", admin, run)


def fill_histories(url: str, scenario: Scenario) -> int:
    """Publish as many events per user as the history keeps."""
    size = int(os.environ.get("STREAMER_HISTORY_SIZE", DEFAULT_HISTORY_SIZE))
    total = size * scenario.users
    with Publisher(url) as publisher:
        for start in range(0, total, 10_000):
            publisher.publish_many(scenario.events(min(10_000, total - start)))
    return total


def round_trips(admin: redis.Redis, count: int = 500) -> str:
    """The machine's floor: a PING and a script that does nothing, one after the other."""
    noop = admin.register_script("return 1")
    noop()
    timings = []
    for call in (admin.ping, noop):
        started = time.perf_counter()
        for _ in range(count):
            call()
        timings.append((time.perf_counter() - started) / count * 1e6)
    return f"round trips (sync client): PING {timings[0]:.0f} us, empty script {timings[1]:.0f} us"


def scenarios(
    url: str, scenario: Scenario, admin: redis.Redis, run_async: Callable[[Any], Result]
) -> dict[str, Callable[[], Result]]:
    runs: dict[str, Callable[[], Result]] = {
        "async-1": lambda: run_async(async_progress(url, scenario, admin, 1)),
        "async-8": lambda: run_async(async_progress(url, scenario, admin, 8)),
        "sync": lambda: sync_progress(url, scenario, admin),
    }
    for batch in BATCHES:
        runs[f"many-sync-{batch}"] = lambda b=batch: sync_many(url, scenario, admin, b, False)
        runs[f"many-async-{batch}"] = lambda b=batch: run_async(
            async_many(url, scenario, admin, b, False)
        )
    runs["many-sync-1000+build"] = lambda: sync_many(url, scenario, admin, 1000, True)
    runs["many-async-1000+build"] = lambda: run_async(async_many(url, scenario, admin, 1000, True))
    return runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="per scenario")
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--only", nargs="*", help="scenario names (default: all)")
    parser.add_argument("--uvloop", action="store_true", help="run the asyncio ones on uvloop")
    parser.add_argument(
        "--empty-histories", action="store_true", help="do not fill the histories first"
    )
    args = parser.parse_args()
    stop_on_sigterm()
    run_async: Callable[[Any], Result] = uvloop.run if args.uvloop else asyncio.run
    with tempfile.TemporaryDirectory() as directory, private_redis(Path(directory)) as url:
        os.sched_setaffinity(0, {SERVER_CPU})
        scenario = Scenario(args.users, args.seconds)
        with redis.Redis.from_url(url) as admin:
            runs = scenarios(url, scenario, admin, run_async)
            unknown = set(args.only or ()) - set(runs)
            if unknown:
                parser.error(f"unknown scenario(s) {sorted(unknown)}; known: {list(runs)}")
            print(round_trips(admin))
            if not args.empty_histories:
                print(f"histories filled first: {fill_histories(url, scenario):,} events")
            print(Result.HEADER)
            for name, run in runs.items():
                if args.only and name not in args.only:
                    continue
                print(run().row(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
