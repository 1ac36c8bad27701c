"""Findings 1, 2 and 12: what producers store can hurt neither the subscriber nor other
users, and a new run of a task id starts clean."""

from __future__ import annotations

from collections.abc import Callable

import aiohttp
import pytest
import redis

from streamer.broker.redis_schema import EPOCH_KEY, history_key
from streamer.events import MAX_JSON_DEPTH, EventError
from streamer.publisher import AsyncPublisher, Publisher

from ..clients import open_stream
from ..conftest import PUBLISH_KEY
from ..processes import ServerProcess
from ..streams import close_all, run_cli, streams_on_every_worker
from ..waiting import eventually
from .conftest import Serve

TokenFor = Callable[..., str]
Session = Callable[[ServerProcess], aiohttp.ClientSession]


def nested_json(depth: int) -> str:
    """A JSON object `depth` levels deep: {"a":{"a":...{}}}."""
    return '{"a":' * (depth - 1) + "{}" + "}" * (depth - 1)


def nested_object(depth: int) -> dict[str, object]:
    """The same as a Python value, built without recursion."""
    value: dict[str, object] = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


def plant_history_entry(redis_url: str, user_id: str, result_json: str) -> str:
    """Append a completion event to the user's history the way an older publisher
    could, bypassing today's validation; returns its event id."""
    event = '{"type":"task_completed","task_id":"deep","status":"SUCCESS","result_data":'
    event += result_json + ',"error_message":null}'
    with redis.Redis.from_url(redis_url) as admin:
        epoch = admin.get(EPOCH_KEY)
        assert epoch is not None
        stream_id = admin.xadd(history_key(user_id), {"e": event})
    return f"{epoch.decode()}-{stream_id.decode()}"


async def test_every_publish_path_refuses_deep_nesting(
    serve: Serve, session: Session, redis_url: str, process_env: dict[str, str], user_id: str
) -> None:
    """Finding 1 (publish side): the library, the CLI and HTTP all refuse `result_data`
    nested beyond the limit with a clear error; only HTTP used to, and only past 966."""
    server = serve(1)
    with Publisher(redis_url) as publisher, pytest.raises(EventError, match="nest"):
        publisher.completed(user_id, "t", result_data=nested_object(975))
    async with AsyncPublisher(redis_url) as publisher:
        with pytest.raises(EventError, match="nest"):
            await publisher.completed(user_id, "t", result_data=nested_object(975))
        accepted = await publisher.completed(
            user_id, "t", result_data=nested_object(MAX_JSON_DEPTH)
        )
    assert accepted

    env = {**process_env, "STREAMER_REDIS_URL": redis_url}
    for depth in (MAX_JSON_DEPTH + 1, 975, 5000):
        with pytest.raises(AssertionError, match=f"nest deeper than {MAX_JSON_DEPTH}"):
            await run_cli(
                "publish", "--user", user_id, "--task", "t", "--status", "SUCCESS",
                "--result", nested_json(depth), env=env,
            )  # fmt: skip

    http = session(server)
    for depth in (MAX_JSON_DEPTH + 1, 966, 970, 975, 5000):
        fields = f'"user_id":"{user_id}","task_id":"t","status":"SUCCESS"'
        body = "{" + fields + ',"result_data":' + nested_json(depth) + "}"
        response = await http.post(
            "/api/tasks/events",
            data=body,
            headers={"X-API-Key": PUBLISH_KEY, "Content-Type": "application/json"},
        )
        assert response.status == 422, (depth, await response.text())
        answer = await response.json()
        assert answer["code"] == "invalid_event" and "nest" in answer["message"]
    assert "Traceback" not in server.log()


async def test_an_undecodable_history_entry_stalls_nobody(
    serve: Serve, redis_url: str, token_for: TokenFor
) -> None:
    """Finding 1 (subscriber side): an entry too deep to decode sits in one user's
    history when the subscriber reconnects (`CLIENT KILL TYPE pubsub`); its catch-up
    used to fail on it and retry forever, so every user on every worker stopped
    receiving and /readyz stayed 503."""
    server = serve(2)
    victim, bystander = "victim", "bystander"
    victim_ws, victim_sse = await streams_on_every_worker(server.base_url, token_for(victim), 2)
    other_ws, other_sse = await streams_on_every_worker(server.base_url, token_for(bystander), 2)
    try:
        for stream in [*victim_ws, *other_ws]:
            assert (await stream.next())["type"] == "active_tasks"
        for sse in [*victim_sse, *other_sse]:
            assert (await sse.next_data())["type"] == "active_tasks"

        plant_history_entry(redis_url, victim, nested_json(5000))
        with redis.Redis.from_url(redis_url) as admin:
            assert admin.client_kill_filter(_type="pubsub") == 2  # one per worker

        with Publisher(redis_url) as publisher:
            for_bystander = publisher.progress(bystander, "b", progress=50)
            for_victim = publisher.progress(victim, "v", progress=60)
        for ws in other_ws:
            assert (await ws.next())["id"] == for_bystander
        for sse in other_sse:
            assert (await sse.next_data())["id"] == for_bystander
        for ws in victim_ws:
            assert (await ws.next())["id"] == for_victim
        for sse in victim_sse:
            assert (await sse.next_data())["id"] == for_victim
    finally:
        await close_all(victim_ws + other_ws, victim_sse + other_sse)
    await eventually(
        lambda: server.log().count("skipping an undecodable history entry") >= 2,
        what="both workers to log the skipped entry",
        timeout=10,
    )
    assert all(server.get("/readyz")[0] == 200 for _ in range(6))
    # Counted, on whichever worker answers (each skipped it once).
    for _ in range(4):
        metrics = server.get("/metrics")[1].decode()
        [line] = [
            x for x in metrics.splitlines() if x.startswith("streamer_undecodable_entries_total")
        ]
        assert float(line.split()[1]) >= 1


@pytest.mark.parametrize("transport", ["websocket", "sse"])
async def test_resuming_across_an_undecodable_entry(
    serve: Serve, session: Session, redis_url: str, token_for: TokenFor, user_id: str,
    transport: str,
) -> None:  # fmt: skip
    """Finding 2: a resume from before a deeply nested entry answered SSE 500 and
    closed the WebSocket with 1006; the entry is now skipped and the rest replayed."""
    server = serve(1)
    http = session(server)
    token = token_for(user_id)
    async with open_stream(http, transport, token) as first:
        snapshot = await first.next()
    plant_history_entry(redis_url, user_id, nested_json(980))
    with Publisher(redis_url) as publisher:
        after = publisher.progress(user_id, "later", progress=10)
    async with open_stream(http, transport, token, last_event_id=snapshot.id) as resumed:
        again = await resumed.next()
        assert again.type == "active_tasks" and again.message["recovered"] is True
        assert (await resumed.next()).id == after
    assert "Error handling request" not in server.log()


async def test_a_new_run_of_a_finished_task_starts_clean(
    serve: Serve, session: Session, redis_url: str, token_for: TokenFor, user_id: str
) -> None:
    """Finding 12: SUCCESS with a result, then STARTED again for the same task id used
    to show the new run at 100% with the old run's `completed_at` and `result_data`."""
    server = serve(1)
    with Publisher(redis_url) as publisher:
        publisher.progress(user_id, "nightly", progress=40, current_step="old run")
        publisher.completed(user_id, "nightly", result_data={"rows": 3})
        publisher.progress(user_id, "nightly", status="STARTED", current_step="new run")
    async with session(server).ws_connect(f"/ws/tasks/?token={token_for(user_id)}") as ws:
        snapshot = await ws.receive_json(timeout=10)
        [task] = snapshot["tasks"]
        await ws.send_json({"type": "get_task_status", "task_id": "nightly"})
        status = (await ws.receive_json(timeout=10))["status"]
    for state in (task, status):
        assert state["status"] == "STARTED" and state["current_step"] == "new run"
        assert state["progress"] is None
        assert state["completed_at"] is None and state["result_data"] == {}
        assert state["started_at"] is not None and state["created_at"] is not None
