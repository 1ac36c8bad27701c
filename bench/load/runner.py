"""One scenario against one running server: connect every client, make sure every
subscription is live, publish the measured events from the publisher process, and
measure what arrives, what the server spent and what the load generator spent."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from bench.load.paths import stream_path
from bench.load.procstat import (
    own_cpu_seconds,
    total_cpu_seconds,
    total_cpu_split_seconds,
    total_rss_kib,
)
from bench.load.publisher_process import PublisherProcess
from bench.load.scenarios import Scenario
from bench.load.sse_client import EventStreamClient
from bench.load.tally import Receiver, Tally
from bench.load.ws_client import WebSocketClient

CONNECT_PARALLEL = 100
PROBE_WAIT_S = 2.0
# The measured phase ends when every delivery is in, or when none came for this long.
IDLE_S = 5.0


@dataclass(frozen=True)
class Target:
    server: str  # "streamer" or "reference": how clients subscribe, how to publish
    host: str
    port: int
    pids: list[int]  # the serving processes, whose CPU and memory are measured
    redis_url: str
    secret: str


async def connect_all(
    scenario: Scenario, target: Target, receivers: list[Receiver], deadline: float
) -> None:
    """Connect in bounded parallel: at most CONNECT_PARALLEL handshakes at a time."""
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(CONNECT_PARALLEL)
    protocol = WebSocketClient if scenario.transport == "ws" else EventStreamClient

    async def connect(receiver: Receiver) -> None:
        path = stream_path(target.server, scenario.transport, receiver.user, target.secret)
        async with gate:
            try:
                async with asyncio.timeout_at(deadline):
                    await loop.create_connection(
                        lambda: protocol(receiver, target.host, target.port, path),
                        target.host,
                        target.port,
                    )
                    await asyncio.shield(receiver.hello)
            except (OSError, TimeoutError) as exc:
                receiver.ended(f"connect failed: {exc!r}")

    await asyncio.gather(*(connect(receiver) for receiver in receivers))


def subscribed(receiver: Receiver) -> bool:
    hello = receiver.hello
    return hello.done() and not hello.cancelled() and hello.exception() is None


async def probe_until_live(
    publisher: PublisherProcess, tally: Tally, clients: int, deadline: float
) -> int:
    """Probe rounds until every connected client has received one; returns the rounds."""
    tally.wait_for_probes(clients)
    round_ = 0
    while not tally.all_probed.is_set() and time.monotonic() < deadline:
        round_ += 1
        await publisher.probe(round_, timeout=max(deadline - time.monotonic(), 1))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(tally.all_probed.wait(), PROBE_WAIT_S)
    return round_


async def wait_for_deliveries(tally: Tally, deadline: float) -> None:
    while not tally.all_delivered.is_set() and time.monotonic() < deadline:
        before = tally.delivered
        try:
            await asyncio.wait_for(tally.all_delivered.wait(), IDLE_S)
        except TimeoutError:
            if tally.delivered == before:
                return


def percentile_ms(sorted_ns: list[int], fraction: float) -> float | None:
    if not sorted_ns:
        return None
    return round(sorted_ns[min(len(sorted_ns) - 1, int(fraction * len(sorted_ns)))] / 1e6, 3)


async def measured_phase(
    scenario: Scenario, target: Target, publisher: PublisherProcess, tally: Tally, deadline: float
) -> dict[str, Any]:
    if tally.expected == 0:
        tally.all_delivered.set()
    server_cpu_before, own_cpu_before = total_cpu_seconds(target.pids), own_cpu_seconds()
    user_before, kernel_before = total_cpu_split_seconds(target.pids)
    started_ns = time.time_ns()
    published = await publisher.run(
        scenario.events, scenario.rate, timeout=max(deadline - time.monotonic(), 1)
    )
    await wait_for_deliveries(tally, deadline)
    ended_ns = max(tally.last_delivery_ns, started_ns + 1)
    server_cpu = total_cpu_seconds(target.pids) - server_cpu_before
    own_cpu = own_cpu_seconds() - own_cpu_before
    user_after, kernel_after = total_cpu_split_seconds(target.pids)
    user_s, kernel_s = user_after - user_before, kernel_after - kernel_before
    wall_s = (ended_ns - started_ns) / 1e9
    latencies = sorted(tally.latencies_ns)
    return {
        "phase_s": round(wall_s, 3),
        "publish_s": round(published["publish_s"], 3),
        "publish_rate": round(scenario.events / published["publish_s"], 1),
        "deliveries_per_s": round(tally.delivered / wall_s, 1),
        "server_cpu_s": round(server_cpu, 2),
        "deliveries_per_cpu_s": round(tally.delivered / server_cpu, 1) if server_cpu else None,
        # Of the server's CPU time, the share in the kernel (its system calls: the
        # writes to the clients' sockets above all); clock ticks, so None when too few.
        "server_kernel_pct": (
            round(100 * kernel_s / (user_s + kernel_s), 1) if user_s + kernel_s >= 0.05 else None
        ),
        "p50_ms": percentile_ms(latencies, 0.50),
        "p99_ms": percentile_ms(latencies, 0.99),
        "max_ms": percentile_ms(latencies, 1.0),
        "load_cpu_s": round(own_cpu, 2),
        "load_cpu_pct": round(100 * own_cpu / wall_s, 1),
        "publisher_cpu_s": round(published["publisher_cpu_s"], 2),
    }


async def run_scenario(scenario: Scenario, target: Target, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    loop_deadline = asyncio.get_running_loop().time() + timeout
    tally = Tally(scenario.events, scenario.users)
    receivers = [Receiver(tally, scenario.user_of_client(c)) for c in range(scenario.clients)]
    publisher = await PublisherProcess.spawn(target.server, target.redis_url, scenario.users)
    try:
        rss_before = total_rss_kib(target.pids)
        connect_started = time.perf_counter()
        await connect_all(scenario, target, receivers, loop_deadline)
        connect_s = time.perf_counter() - connect_started
        connected = [receiver for receiver in receivers if subscribed(receiver)]
        probe_rounds = await probe_until_live(publisher, tally, len(connected), deadline)
        rss_after = total_rss_kib(target.pids)
        tally.expected = sum(scenario.events_for_user(r.user) for r in connected)
        phase = (
            await measured_phase(scenario, target, publisher, tally, deadline)
            if scenario.events
            else {}
        )
        failures = Counter(r.failure for r in receivers if r.failure is not None)
    finally:
        for receiver in receivers:
            if receiver.transport is not None:
                receiver.transport.close()
        await publisher.close()
    lost = sum(scenario.events_for_user(r.user) - r.received for r in connected)
    return {
        "scenario": scenario.name,
        "server": target.server,
        "clients": scenario.clients,
        "connected": len(connected),
        "probed": tally.probed,
        "probe_rounds": probe_rounds,
        "connect_s": round(connect_s, 2),
        "rss_kib_per_conn": round((rss_after - rss_before) / max(len(connected), 1), 1),
        "events": scenario.events,
        "expected": tally.expected,
        "delivered": tally.delivered,
        "lost": lost,
        "duplicates": tally.duplicates,
        "misrouted": tally.misrouted,
        **phase,
        "failures": dict(failures.most_common(5)),
    }
