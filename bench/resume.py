"""Worker memory while clients resume from far back: a real gunicorn worker, a private
redis-server, one user with a full history of large events.

    .venv/bin/python -m bench.resume --clients 5 --events 1000 --event-kib 30

Publishes --events events of about --event-kib KiB each for one user, then opens
--clients WebSockets that resume from the first of them, all at once, and read nothing
for --hold seconds (a slow network) before they read everything. The worker's resident
memory is sampled every 20 ms throughout: the peak above what it used before the
clients came is what resuming cost it. Each client must receive every event once, in
order. Everything runs on loopback, is bounded in time, and stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys

import aiohttp

from bench.service import SECRET, running_service, stop_on_sigterm
from streamer.auth.tokens import issue_token
from streamer.events import completed_event
from streamer.publisher import Publisher
from tests.processes import ServerProcess, rss_kib, worker_pids

USER = "resuming-user"


async def resume(
    session: aiohttp.ClientSession, url: str, hold_s: float, expected: list[str]
) -> list[str]:
    """The ids a client resuming from `url` received, once it has all of `expected`."""
    received: list[str] = []
    async with session.ws_connect(url, max_msg_size=0) as ws:
        await asyncio.sleep(hold_s)  # a client that does not read yet
        async for message in ws:
            event = json.loads(message.data)
            if event["type"] == "active_tasks" and not event["recovered"]:
                raise RuntimeError("the resume was not recovered: is the history large enough?")
            if event["type"] != "active_tasks":
                received.append(event["id"])
            if len(received) >= len(expected):
                break
    return received


async def sample_peak(pid: int, stop: asyncio.Event) -> int:
    peak = 0
    while not stop.is_set():
        peak = max(peak, rss_kib(pid))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.02)
    return peak


async def run(args: argparse.Namespace, server: ServerProcess, redis_url: str) -> dict[str, object]:
    (worker,) = worker_pids(server.process.pid)
    result = {"x": "y" * (args.event_kib * 1024 - 200)}
    with Publisher(redis_url=redis_url) as publisher:
        first = publisher.completed(USER, "first")
        events = [completed_event(USER, f"t{n}", result_data=result) for n in range(args.events)]
        ids = [str(i) for i in publisher.publish_many(events)]
    token = issue_token(SECRET, USER, ttl_s=600)
    url = f"{server.base_url.replace('http', 'ws')}/ws/tasks/?token={token}&last_event_id={first}"
    before = rss_kib(worker)
    stop = asyncio.Event()
    sampler = asyncio.create_task(sample_peak(worker, stop))
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        clients = [resume(session, url, args.hold, ids) for _ in range(args.clients)]
        received = await asyncio.wait_for(asyncio.gather(*clients), args.timeout)
    stop.set()
    peak = await sampler
    complete = sum(1 for r in received if r == ids)
    return {
        "clients": args.clients,
        "events": args.events,
        "history_mib": round(args.events * args.event_kib / 1024, 1),
        "complete_clients": complete,
        "worker_rss_before_mib": round(before / 1024, 1),
        "worker_peak_growth_mib": round((peak - before) / 1024, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--events", type=int, default=1000)
    parser.add_argument("--event-kib", type=int, default=30)
    parser.add_argument("--hold", type=float, default=2.0, help="seconds before clients read")
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args()
    stop_on_sigterm()
    history_size = str(args.events + 10)
    os.environ["STREAMER_HISTORY_SIZE"] = history_size  # the publisher trims to it too
    settings = {"STREAMER_HISTORY_SIZE": history_size, "STREAMER_SEND_TIMEOUT_S": "60"}
    with running_service(workers=1, settings=settings) as (server, redis_url):
        outcome = asyncio.run(run(args, server, redis_url))
    print(json.dumps(outcome))
    return 0 if outcome["complete_clients"] == args.clients else 1


if __name__ == "__main__":
    sys.exit(main())
