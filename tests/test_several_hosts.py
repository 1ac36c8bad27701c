"""Several hosts: two independent gunicorn instances (separate processes and ports, as on
two machines) behind one nginx upstream, one Redis. Clients of every transport land on
both; every event reaches every client; when one instance is SIGKILLed or stopped with
SIGTERM mid-stream, its clients reconnect through nginx to the other and resume with
nothing lost, duplicated or reordered (counted as bench/soak.py counts). Per-user
connection limits are per process, as the README says.

The nginx site is deploy/nginx.conf.template with its upstream block replaced by the
README's "Several hosts" snippet, so the README shows what runs here."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from bench.soak import Client, evaluate, order_key
from streamer.handlers.common import WORKER_HEADER
from streamer.publisher import AsyncPublisher

from .clients import ws_close_code, ws_json
from .nginx import TEMPLATE, Nginx
from .processes import ServerProcess, gunicorn_args, worker_pids
from .test_readme import code_blocks, section
from .waiting import eventually

TokenFor = Callable[..., str]
StartProcess = Callable[..., ServerProcess]
README_HOSTS = ("10.0.0.1:8080", "10.0.0.2:8080")
TRANSPORTS = ("websocket", "sse", "poll")


def site_for(ports: tuple[int, int]) -> str:
    """The shipped site with the README's upstream of several hosts, on loopback ports."""
    (upstream,) = code_blocks(section("### Several hosts"), "nginx")
    for host, port in zip(README_HOSTS, ports, strict=True):
        assert host in upstream
        upstream = upstream.replace(host, f"127.0.0.1:{port}")
    shipped = TEMPLATE.read_text()
    site, replaced = re.subn(r"upstream streamer \{.*?\n\}", upstream, shipped, flags=re.S)
    assert replaced == 1
    return site


@dataclass
class Hosts:
    instances: list[ServerProcess]
    nginx: Nginx
    redis_url: str

    def instance_of(self, worker_pid: str) -> int:
        for index, instance in enumerate(self.instances):
            if int(worker_pid) in worker_pids(instance.process.pid):
                return index
        raise AssertionError(f"worker {worker_pid} belongs to no instance")


def start_hosts(
    start_process: StartProcess,
    process_env: dict[str, str],
    redis_url: str,
    directory: Path,
    settings: dict[str, str] | None = None,
) -> Iterator[Hosts]:
    env = {**process_env, "STREAMER_REDIS_URL": redis_url, **(settings or {})}
    args = [*gunicorn_args(1), "--graceful-timeout", "5"]
    instances = [start_process(args, env) for _ in range(2)]
    for instance in instances:
        instance.wait_healthy()
    nginx = Nginx(
        directory / "nginx",
        instances[0].port,
        template=site_for((instances[0].port, instances[1].port)),
    )
    nginx.directory.mkdir()
    try:
        nginx.start()
        yield Hosts(instances, nginx, redis_url)
    finally:
        nginx.stop()


@pytest.fixture
def hosts(
    start_process: StartProcess, process_env: dict[str, str], redis_url: str, tmp_path: Path
) -> Iterator[Hosts]:
    yield from start_hosts(start_process, process_env, redis_url, tmp_path)


async def open_streams(instance: ServerProcess) -> int:
    """WebSocket and SSE connections the instance holds (from its own /metrics)."""
    status, body = await asyncio.to_thread(instance.get, "/metrics")
    assert status == 200
    pattern = r'^streamer_connections\{transport="(websocket|sse)"\} (\S+)$'
    return sum(int(float(v)) for _, v in re.findall(pattern, body.decode(), re.M))


async def test_requests_through_nginx_reach_both_instances(
    hosts: Hosts, token_for: TokenFor
) -> None:
    """Round robin: consecutive SSE streams and polls land on one instance, then the
    other (the header names the worker process that answered)."""
    landed: dict[str, list[int]] = {"sse": [], "poll": []}
    async with aiohttp.ClientSession() as session:
        for transport, answers in landed.items():
            for n in range(2):
                params = {"token": token_for(f"landing-{n}")}
                url = f"{hosts.nginx.base_url}/{transport}/tasks/"
                async with session.get(url, params=params) as response:
                    assert response.status == 200
                    answers.append(hosts.instance_of(response.headers[WORKER_HEADER]))
    assert {k: sorted(v) for k, v in landed.items()} == {"sse": [0, 1], "poll": [0, 1]}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fault", ["none", "SIGKILL", "SIGTERM"])
async def test_every_event_reaches_every_client_when_an_instance_goes(
    hosts: Hosts, token_for: TokenFor, fault: str
) -> None:
    users = [f"host-user-{n}" for n in range(4)]
    clients = [
        Client(user, transport, hosts.nginx.base_url, token_for(user))
        for user in users
        for transport in TRANSPORTS
        for _ in range(2)
    ]
    published: dict[str, list[str]] = {user: [] for user in users}
    stop_churn, done, stop_publishing = asyncio.Event(), asyncio.Event(), asyncio.Event()
    stop_churn.set()  # no random drops: only the instance going away ends connections
    runs = [asyncio.create_task(c.run(stop_churn, done, n)) for n, c in enumerate(clients)]

    async def produce() -> None:
        async with AsyncPublisher(hosts.redis_url) as publisher:
            count = 0
            while not stop_publishing.is_set():
                user = users[count % len(users)]
                event_id = await publisher.progress(user, f"task-{count % 3}", progress=count % 101)
                published[user].append(event_id)
                count += 1
                await asyncio.sleep(0.01)

    try:
        await asyncio.wait_for(asyncio.gather(*(c.connected_once.wait() for c in clients)), 30)
        streaming = sum(c.transport != "poll" for c in clients)

        # Round robin put WebSocket and SSE clients on both instances.
        async def per_instance() -> list[int]:
            return [await open_streams(i) for i in hosts.instances]

        async def all_open() -> bool:
            return sum(await per_instance()) == streaming

        await eventually(all_open, what="every stream open")
        assert all(count > 0 for count in await per_instance())

        def published_count() -> int:
            return sum(len(ids) for ids in published.values())

        # Counted, not timed: a loaded machine publishes more slowly.
        producer = asyncio.create_task(produce())
        await eventually(
            lambda: published_count() >= 60, what="events published before it", timeout=30
        )
        gone, survivor = hosts.instances
        if fault == "SIGKILL":  # the host dies: master and worker at once
            os.killpg(gone.process.pid, signal.SIGKILL)
        elif fault == "SIGTERM":  # graceful stop: streams are closed, clients move on
            gone.signal(signal.SIGTERM)
        if fault != "none":
            await asyncio.to_thread(gone.wait_exit, 15)

            async def all_on_survivor() -> bool:
                return await open_streams(survivor) == streaming

            await eventually(
                all_on_survivor,
                what="every stream on the surviving instance",
                timeout=20,
            )
        before = published_count()
        await eventually(
            lambda: published_count() >= before + 60, what="events published after it", timeout=30
        )
        stop_publishing.set()
        await producer

        newest = {user: max(ids, key=order_key) for user, ids in published.items()}
        await eventually(
            lambda: all(c.last_id == newest[c.user] for c in clients),
            what="every client caught up",
            timeout=30,
        )
    finally:
        done.set()
        for run in runs:
            run.cancel()
        await asyncio.gather(*runs, return_exceptions=True)

    totals = evaluate(clients, published)
    print(fault, totals)  # shown with -s
    assert totals["published"] > 100
    assert totals["delivered"] == totals["expected_deliveries"] == totals["published"] * 6
    for key in ("lost", "duplicated", "reordered", "unexpected", "backward_ids", "resyncs"):
        assert totals[key] == 0, totals
    if fault != "none":
        # The clients of the instance that went reconnected (resumed) elsewhere.
        assert totals["reconnects"] > 0


@pytest.mark.timeout(60)
async def test_the_per_user_limit_is_per_process(
    start_process: StartProcess,
    process_env: dict[str, str],
    redis_url: str,
    tmp_path: Path,
    token_for: TokenFor,
) -> None:
    """With a limit of 2 and two instances, one user holds 2 streams on each; a third on
    one instance is refused there (4029), and does not count on the other."""
    hosts_run = start_hosts(
        start_process,
        process_env,
        redis_url,
        tmp_path,
        {"STREAMER_MAX_CONNECTIONS_PER_USER": "2"},
    )
    hosts = next(hosts_run)
    try:
        token = token_for("limited-user")
        async with contextlib.AsyncExitStack() as stack:
            session = await stack.enter_async_context(aiohttp.ClientSession())
            for instance in hosts.instances:
                url = instance.base_url.replace("http", "ws") + "/ws/tasks/"
                for _ in range(2):
                    ws = await stack.enter_async_context(
                        session.ws_connect(url, params={"token": token})
                    )
                    assert (await ws_json(ws))["type"] == "active_tasks"
            for instance in hosts.instances:
                url = instance.base_url.replace("http", "ws") + "/ws/tasks/"
                async with session.ws_connect(url, params={"token": token}) as third:
                    assert await ws_close_code(third) == 4029
                async with session.get(
                    f"{instance.base_url}/sse/tasks/", params={"token": token}
                ) as sse:
                    assert sse.status == 429
    finally:
        with contextlib.suppress(StopIteration):
            next(hosts_run)
