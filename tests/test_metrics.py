"""/metrics: what each process counts, the sum over gunicorn's workers, and the Grafana
dashboard built on those names."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import re
import signal
from collections.abc import Callable
from pathlib import Path

import redis
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from streamer.app_keys import BROKER

from .clients import open_stream
from .conftest import PUBLISH_KEY, StartGunicorn
from .processes import RedisServer, ServerProcess, gunicorn_args, pid_alive
from .streams import WsStream, close_all, streams_on_every_worker
from .waiting import eventually, eventually_sync

TokenFor = Callable[..., str]
DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana-dashboard.json"


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a /metrics answer: (name, sorted labels) -> value."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, tuple(sorted(labels.items()))), 0.0)


def exported_names(text: str) -> set[str]:
    return {name for name, _ in samples(text)}


def dashboard_metric_names() -> set[str]:
    """The metric names the dashboard's queries use."""
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert exprs, "the dashboard has no queries"
    return {name for expr in exprs for name in re.findall(r"\bstreamer_[a-z_]+\b", expr)}


async def publish(client: TestClient, user_id: str, task_id: str, **fields: object) -> str:  # type: ignore[type-arg]
    response = await client.post(
        "/api/tasks/events",
        json={"user_id": user_id, "task_id": task_id, **fields},
        headers={"X-API-Key": PUBLISH_KEY},
    )
    assert response.status == 202, await response.text()
    event_id: str = (await response.json())["id"]
    return event_id


async def test_one_process_counts_deliveries_replays_latency_and_refusals(
    client: TestClient,  # type: ignore[type-arg]
    token_for: TokenFor,
    user_id: str,
) -> None:
    token = token_for(user_id)
    async with (
        open_stream(client, "websocket", token) as ws,
        open_stream(client, "sse", token) as sse,
    ):
        assert (await ws.next()).type == "active_tasks"
        assert (await sse.next()).type == "active_tasks"
        first = await publish(client, user_id, "t", progress=10)
        for stream in (ws, sse):
            assert (await stream.next()).id == first
        exposed = await client.get("/metrics")
        assert exposed.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        text = await exposed.text()
        assert value(text, "streamer_connections", transport="websocket") == 1
        assert value(text, "streamer_connections", transport="sse") == 1
        # Latency: once per event in this process, not once per connection.
        assert value(text, "streamer_delivery_latency_seconds_count") == 1
        assert 0 <= value(text, "streamer_delivery_latency_seconds_sum") < 5
    missed = [await publish(client, user_id, "t", progress=n) for n in (20, 30)]
    async with open_stream(client, "sse", token, last_event_id=first) as resumed:
        assert (await resumed.next()).message["recovered"] is True
        assert [(await resumed.next()).id for _ in missed] == missed
    poll = await client.get("/poll/tasks/", params={"token": token, "last_event_id": first})
    assert [event["id"] for event in (await poll.json())["events"]] == missed
    refused = await client.get("/sse/tasks/", params={"token": "not-a-token"})
    assert refused.status == 401

    async def counted() -> str | None:
        text = await (await client.get("/metrics")).text()
        done = value(text, "streamer_connections", transport="sse") == 0
        return (
            text
            if done and value(text, "streamer_connections", transport="websocket") == 0
            else None
        )

    text = await eventually(counted, what="the streams to be counted out")
    assert value(text, "streamer_events_sent_total", transport="websocket") == 2  # snapshot, event
    assert value(text, "streamer_events_sent_total", transport="sse") == 5  # + snapshot, 2 replayed
    assert value(text, "streamer_events_replayed_total") == 4  # over SSE, then a poll
    assert value(text, "streamer_disconnects_total", reason="client_closed") == 3
    assert value(text, "streamer_disconnects_total", reason="answered") == 1  # the poll
    assert value(text, "streamer_refusals_total", reason="unauthorized") == 1
    assert value(text, "streamer_events_published_total") == 3
    assert value(text, "streamer_broker_reconnects_total") == 0
    assert dashboard_metric_names() <= exported_names(text)


async def test_gunicorn_metrics_are_the_sum_over_workers(
    start_gunicorn: StartGunicorn, token_for: TokenFor, user_id: str
) -> None:
    server, _ = start_gunicorn(2)
    token = token_for(user_id)
    refused = await asyncio.to_thread(server.get, "/sse/tasks/?token=bad")
    assert refused[0] == 401
    ws_streams, sse_streams = await streams_on_every_worker(server.base_url, token, 2)
    try:
        for ws in ws_streams:
            assert (await ws.next())["type"] == "active_tasks"
        for sse in sse_streams:
            assert (await sse.next_data())["type"] == "active_tasks"
        # One stream that ends, so that every metric of the dashboard has a value.
        gone = await WsStream.open(
            server.base_url.replace("http", "ws") + f"/ws/tasks/?token={token}"
        )
        assert (await gone.next())["type"] == "active_tasks"
        await gone.close()

        def counts() -> str | None:
            text = server.get("/metrics")[1].decode()
            ws = value(text, "streamer_connections", transport="websocket")
            sse = value(text, "streamer_connections", transport="sse")
            ended = value(text, "streamer_disconnects_total", reason="client_closed")
            counted = (ws, sse) == (len(ws_streams), len(sse_streams)) and ended >= 1
            return text if counted else None

        # Whichever worker answers, it reports both workers' connections.
        for _ in range(4):
            text = await asyncio.to_thread(
                eventually_sync, counts, what="both workers' connections in one answer", timeout=10
            )
        assert value(text, "streamer_refusals_total", reason="unauthorized") == 1
        sent_before = value(text, "streamer_events_sent_total", transport="websocket")
        assert sent_before >= len(ws_streams)
        assert dashboard_metric_names() <= exported_names(text)

        # A killed worker's connections leave the sum; what it counted stays.
        killed = ws_streams[0].worker
        os.kill(int(killed), signal.SIGKILL)
        left_ws = [s for s in ws_streams if s.worker != killed]
        left_sse = [s for s in sse_streams if s.headers["x-streamer-worker"] != killed]

        def after_kill() -> str | None:
            text = server.get("/metrics")[1].decode()
            ws = value(text, "streamer_connections", transport="websocket")
            sse = value(text, "streamer_connections", transport="sse")
            return text if (ws, sse) == (len(left_ws), len(left_sse)) else None

        text = await asyncio.to_thread(
            eventually_sync, after_kill, what="the killed worker's connections to go", timeout=15
        )
        assert value(text, "streamer_events_sent_total", transport="websocket") >= sent_before
    finally:
        await close_all(ws_streams, sse_streams)


def test_dashboard_queries_name_only_exported_metrics() -> None:
    """Checked against real answers above; here: the dashboard is there and well formed."""
    names = dashboard_metric_names()
    assert {"streamer_connections", "streamer_delivery_latency_seconds_bucket"} <= names
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))


async def test_a_lost_broker_subscription_counts_as_a_reconnect(
    redis_client: TestClient,  # type: ignore[type-arg]
    redis_url: str,
    token_for: TokenFor,
    user_id: str,
) -> None:
    async def metrics() -> str:
        return await (await redis_client.get("/metrics")).text()

    async with open_stream(redis_client, "sse", token_for(user_id)) as sse:
        assert (await sse.next()).type == "active_tasks"
        assert value(await metrics(), "streamer_broker_reconnects_total") == 0
        with redis.Redis.from_url(redis_url) as admin:
            assert admin.client_kill_filter(_type="pubsub") == 1

        async def reconnected() -> bool:
            return value(await metrics(), "streamer_broker_reconnects_total") == 1

        await eventually(reconnected, what="the reconnect to be counted")
        # The stream went on: an event published now still arrives.
        event_id = await publish(redis_client, user_id, "t", progress=50)
        assert (await sse.next()).id == event_id


async def test_an_outage_counts_as_one_reconnect_however_many_attempts_it_took(
    redis_client: TestClient,  # type: ignore[type-arg]
    redis_server: RedisServer,
) -> None:
    broker = redis_client.app[BROKER]

    async def reconnects() -> float:
        text = await (await redis_client.get("/metrics")).text()
        return value(text, "streamer_broker_reconnects_total")

    redis_server.stop()
    try:
        await eventually(
            lambda: broker.subscriber.restarts >= 3, what="attempts to fail while Redis is down"
        )
    finally:
        redis_server.start()
    await eventually(lambda: broker.subscriber.ready.is_set(), what="the subscription back")
    assert await reconnects() == 1


def test_gunicorn_removes_the_metrics_directory_it_made(
    process_env: dict[str, str], start_process: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    """Whether it served and stopped, or refused to start; and those of masters that
    were killed before they could."""
    held: list[int] = []
    try:
        remove_them_all(process_env, start_process, tmp_path, held)
    finally:
        for lock in held:
            os.close(lock)


def remove_them_all(
    process_env: dict[str, str],
    start_process: Callable[..., ServerProcess],
    tmp_path: Path,
    held: list[int],
) -> None:
    for refused in (False, True):
        tmpdir = tmp_path / f"tmp-{refused}"
        tmpdir.mkdir()
        env = {**process_env, "TMPDIR": str(tmpdir)}
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        # Of masters that were killed: one of an earlier version (no lock) whose pid is
        # free, one whose lock nobody holds although its pid is in use (a container's
        # master is always pid 1), and beside them that of a master still running (in
        # another container, say), whose lock this process holds.
        killed = tmpdir / "streamer-metrics-999999999-abc"
        abandoned = tmpdir / f"streamer-metrics-{os.getpid()}-abc"
        running = tmpdir / "streamer-metrics-1-abc"
        for stale in (killed, abandoned, running):
            stale.mkdir()
            (stale / "counter_1.db").write_bytes(b"")
        (abandoned / "owner.lock").write_bytes(b"")
        lock = os.open(running / "owner.lock", os.O_CREAT | os.O_RDWR)
        held.append(lock)
        fcntl.flock(lock, fcntl.LOCK_EX)
        # Two workers without Redis: refused before any worker starts.
        server = start_process(gunicorn_args(2 if refused else 1), env)
        if refused:
            assert server.wait_exit(30) != 0
        else:
            server.wait_healthy()
            made = [p for p in tmpdir.iterdir() if p != running]
            assert [p.name[: len("streamer-metrics-")] for p in made] == ["streamer-metrics-"]
            server.stop()
        assert list(tmpdir.iterdir()) == [running]


def test_a_metrics_directory_given_to_a_running_gunicorn_is_refused_to_another(
    process_env: dict[str, str],
    redis_url: str,
    start_process: Callable[..., ServerProcess],
    tmp_path: Path,
) -> None:
    """Each gunicorn clears the directory's files at start, and its workers write theirs
    there: a second one on it wiped the first's numbers (its open connections read 0)
    and summed its own in. It refuses to start; once the first has stopped, it starts."""
    shared = tmp_path / "metrics"
    env = {**process_env, "STREAMER_REDIS_URL": redis_url, "PROMETHEUS_MULTIPROC_DIR": str(shared)}
    first = start_process(gunicorn_args(1), env)
    first.wait_healthy()
    second = start_process(gunicorn_args(1), env)
    assert second.wait_exit(30) != 0
    assert f"PROMETHEUS_MULTIPROC_DIR={shared} is in use by another gunicorn" in second.log()
    assert list(shared.glob("*.db")), "the first one's files are still there"
    assert first.get("/metrics")[0] == 200
    first.stop()
    third = start_process(gunicorn_args(1), env)
    third.wait_healthy()
    assert third.get("/metrics")[0] == 200
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    refused = start_process(
        gunicorn_args(1), {**env, "PROMETHEUS_MULTIPROC_DIR": str(not_a_directory)}
    )
    assert refused.wait_exit(30) != 0
    assert "configuration error: PROMETHEUS_MULTIPROC_DIR:" in refused.log()
    assert "Traceback" not in refused.log()


def test_the_lock_of_a_given_metrics_directory_holds_through_an_upgrade_and_with_e(
    process_env: dict[str, str],
    redis_url: str,
    start_process: Callable[..., ServerProcess],
    tmp_path: Path,
) -> None:
    """The directory given with gunicorn's -e (applied after its config file runs) is
    locked as one given in the environment; after a binary upgrade (SIGUSR2, then the
    old master stopped) the new master holds the lock: another gunicorn is refused."""
    shared = tmp_path / "metrics"
    env = {**process_env, "STREAMER_REDIS_URL": redis_url, "TMPDIR": str(tmp_path)}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    pid_file = tmp_path / "gunicorn.pid"
    with_e = [*gunicorn_args(1), "-e", f"PROMETHEUS_MULTIPROC_DIR={shared}"]
    first = start_process([*with_e, "--pid", str(pid_file)], env)
    first.wait_healthy()
    refused = start_process(with_e, env)
    assert refused.wait_exit(30) != 0
    assert f"PROMETHEUS_MULTIPROC_DIR={shared} is in use by another gunicorn" in refused.log()

    first.signal(signal.SIGUSR2)
    new_pid_file = tmp_path / "gunicorn.pid.2"
    eventually_sync(new_pid_file.exists, what="the new master")
    new_master = int(new_pid_file.read_text())
    try:
        first.signal(signal.SIGTERM)
        assert first.wait_exit(30) == 0
        eventually_sync(lambda: first.get("/readyz")[0] == 200, what="the new generation")
        again = start_process(with_e, env)
        assert again.wait_exit(30) != 0
        assert "is in use by another gunicorn" in again.log()
        assert first.get("/metrics")[0] == 200
    finally:
        os.kill(new_master, signal.SIGTERM)
        eventually_sync(lambda: not pid_alive(new_master), what="the new master to stop")
