"""Both transports, both brokers: snapshot, live events, commands, filters, order."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp.test_utils import TestClient

from streamer.app import create_app
from streamer.app_keys import BROKER, HUB
from streamer.config import Config
from streamer.events import completed_event, progress_event
from streamer.wire import WS_PING

from .clients import SseReader, ws_json, ws_messages
from .conftest import SECRET
from .waiting import eventually

TokenFor = Callable[..., str]


async def publish_progress(client: TestClient, user: str, task: str, **fields: Any) -> str:
    fields.setdefault("progress", 10)
    return str(await client.app[BROKER].publish(progress_event(user, task, **fields)))


async def publish_done(client: TestClient, user: str, task: str, **fields: Any) -> str:
    return str(await client.app[BROKER].publish(completed_event(user, task, **fields)))


async def test_websocket_snapshot_then_live_events(
    client: TestClient, token_for: TokenFor, user_id: str
) -> None:
    await publish_progress(client, user_id, "old", progress=5, task_name="first")
    await publish_progress(client, user_id, "new", progress=7, task_name="second")
    await publish_progress(client, user_id, "finished", progress=50)
    await publish_done(client, user_id, "finished")

    async with client.ws_connect(f"/ws/tasks/?token={token_for(user_id)}") as ws:
        snapshot = await ws_json(ws)
        assert snapshot["type"] == "active_tasks"
        assert snapshot["recovered"] is True
        assert [t["task_id"] for t in snapshot["tasks"]] == ["new", "old"]  # newest first
        new = snapshot["tasks"][0]
        assert new["task_name"] == "second" and new["progress"] == 7
        assert new["status"] == "PROGRESS" and new["created_at"] and new["started_at"]
        assert set(new) >= {
            "task_id", "task_name", "category", "status", "progress", "current_step",
            "processed_items", "total_items", "created_at", "started_at", "completed_at",
            "estimated_completion", "result_data", "error_message",
        }  # fmt: skip

        progress_id = await publish_progress(
            client,
            user_id,
            "new",
            progress=60,
            current_step="resizing",
            processed_items=6,
            total_items=10,
            estimated_completion="2030-01-01T00:00:00Z",
            category="images",
        )
        event = await ws_json(ws)
        # The full state: what this event set, and what the task had before it.
        assert event == {
            "id": progress_id,
            "type": "task_progress",
            "task_id": "new",
            "task_name": "second",
            "category": "images",
            "status": "PROGRESS",
            "progress": 60,
            "current_step": "resizing",
            "processed_items": 6,
            "total_items": 10,
            "created_at": new["created_at"],
            "started_at": new["started_at"],
            "completed_at": None,
            "estimated_completion": "2030-01-01T00:00:00Z",
            "result_data": {},
            "error_message": None,
        }
        done_id = await publish_done(
            client, user_id, "new", status="FAILURE", error_message="disk full"
        )
        event = await ws_json(ws)
        assert event["completed_at"] is not None
        assert event == {
            "id": done_id,
            "type": "task_completed",
            "task_id": "new",
            "task_name": "second",
            "category": "images",
            "status": "FAILURE",
            "progress": 60,
            "current_step": "resizing",
            "processed_items": 6,
            "total_items": 10,
            "created_at": new["created_at"],
            "started_at": new["started_at"],
            "completed_at": event["completed_at"],
            "estimated_completion": "2030-01-01T00:00:00Z",
            "result_data": {},
            "error_message": "disk full",
        }

        await ws.send_json({"type": "get_active_tasks"})
        active = await ws_json(ws)
        assert active["type"] == "active_tasks"
        assert [t["task_id"] for t in active["tasks"]] == ["old"]


async def test_websocket_commands(client: TestClient, token_for: TokenFor, user_id: str) -> None:
    await publish_progress(client, user_id, "job", progress=30)
    async with client.ws_connect(f"/ws/tasks/?token={token_for(user_id)}") as ws:
        await ws_json(ws)
        await ws.send_json({"type": "ping"})
        assert await ws_json(ws) == {"type": "pong"}

        await ws.send_json({"type": "get_task_status", "task_id": "job"})
        status = await ws_json(ws)
        assert status["type"] == "task_status" and status["task_id"] == "job"
        assert status["status"]["progress"] == 30 and status["status"]["status"] == "PROGRESS"

        await ws.send_json({"type": "get_task_status", "task_id": "nope"})
        assert await ws_json(ws) == {"type": "task_status", "task_id": "nope", "status": None}

        await ws.send_json({"type": "cancel_task", "task_id": "job"})
        assert await ws_json(ws) == {"type": "task_cancelled", "task_id": "job", "success": True}
        assert await client.app[BROKER].is_cancelled(user_id, "job")

        await ws.send_json({"type": "cancel_task", "task_id": "nope"})
        assert await ws_json(ws) == {"type": "task_cancelled", "task_id": "nope", "success": False}
        assert not await client.app[BROKER].is_cancelled(user_id, "nope")

        await publish_done(client, user_id, "job", status="REVOKED")
        completed = await ws_json(ws)
        assert completed["type"] == "task_completed" and completed["status"] == "REVOKED"
        await ws.send_json({"type": "cancel_task", "task_id": "job"})
        reply = await ws_json(ws)
        assert reply == {"type": "task_cancelled", "task_id": "job", "success": False}

        await ws.send_json({"type": "get_task_status", "task_id": "job"})
        final = (await ws_json(ws))["status"]
        assert final["status"] == "REVOKED" and final["completed_at"] is not None


async def test_sse_stream_framing_and_headers(
    client: TestClient, token_for: TokenFor, user_id: str
) -> None:
    first_id = await publish_progress(client, user_id, "job", progress=1)
    response = await client.get(
        "/sse/tasks/", headers={"Authorization": f"Bearer {token_for(user_id)}"}
    )
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    assert response.headers["Cache-Control"] == "no-cache"
    assert response.headers["X-Accel-Buffering"] == "no"
    reader = SseReader(response)
    first = await reader.next()
    assert first.event == "active_tasks" and first.retry == 3000
    assert first.id == first_id  # the newest event the snapshot reflects
    assert [t["task_id"] for t in first.json["tasks"]] == ["job"]

    event_id = await publish_progress(client, user_id, "job", progress=2)
    second = await reader.next()
    assert second.event == "task_progress" and second.id == event_id
    assert len(second.data) == 1  # one line of JSON
    assert second.json["id"] == event_id and second.json["progress"] == 2

    heartbeat = await reader.wait_for_comment(timeout=5)  # heartbeat_s is 0.5 in tests
    assert heartbeat.startswith(":")
    response.close()


async def test_sse_heartbeat_as_an_event_for_pages_that_ask(
    client: TestClient,  # type: ignore[type-arg]
    token_for: TokenFor,
    user_id: str,
) -> None:
    """EventSource shows a page no comment: with `?heartbeat=event` the heartbeat is an
    event carrying its interval, without an id (the resume point stays)."""
    token = token_for(user_id)
    async with client.get(f"/sse/tasks/?token={token}&heartbeat=event") as response:
        assert response.status == 200
        reader = SseReader(response)
        snapshot = await reader.next()
        assert snapshot.event == "active_tasks"
        heartbeat = await reader.next(timeout=0.4)  # the first one at once
        assert heartbeat.event == "heartbeat" and heartbeat.id is None
        assert heartbeat.json == {"type": "heartbeat", "interval_s": 0.5}
        event_id = await publish_progress(client, user_id, "job", progress=3)
        event = await reader.next()
        while event.event == "heartbeat":
            event = await reader.next()
        assert event.id == event_id
        assert (await reader.next(timeout=5)).event == "heartbeat"  # every 0.5 s in tests
        assert reader.comments == []
    upgrade = {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version": "13",
    }
    for path, headers in (("/sse/tasks/", {}), ("/ws/tasks/", upgrade)):
        url = f"{path}?token={token}&heartbeat=events"
        async with client.get(url, headers=headers) as refused:
            assert refused.status == 400
            assert (await refused.json())["code"] == "invalid_heartbeat"


async def test_ws_heartbeat_as_a_message_for_pages_that_ask(
    aiohttp_client: Callable[..., Awaitable[TestClient]],  # type: ignore[type-arg]
    token_for: TokenFor,
    user_id: str,
) -> None:
    """A page sees no WebSocket ping: with `?heartbeat=event` each ping of the hub's
    round comes with a heartbeat message carrying the interval, the first one right
    after the opening."""
    config = Config(secret=SECRET, ws_heartbeat_s=0.5)
    client = await aiohttp_client(await create_app(config))
    token = token_for(user_id)
    async with client.ws_connect(f"/ws/tasks/?token={token}&heartbeat=event") as ws:
        assert (await ws_json(ws))["type"] == "active_tasks"
        started = asyncio.get_running_loop().time()
        assert await ws_json(ws) == {"type": "heartbeat", "interval_s": 0.5}
        assert asyncio.get_running_loop().time() - started < 0.4  # the first at once
        assert await ws_json(ws) == {"type": "heartbeat", "interval_s": 0.5}
        event_id = await publish_progress(client, user_id, "job", progress=1)
        message = await ws_json(ws)
        while message["type"] == "heartbeat":
            message = await ws_json(ws)
        assert message["id"] == event_id
    async with client.ws_connect(f"/ws/tasks/?token={token}") as plain:
        assert (await ws_json(plain))["type"] == "active_tasks"
        # Without asking: pings only (answered by aiohttp), no heartbeat message.
        assert [c.heartbeat for c in client.app[HUB].connections()] == [WS_PING]
        event_id = await publish_progress(client, user_id, "job", progress=2)
        assert (await ws_json(plain))["id"] == event_id


async def test_sse_over_http_1_0_is_unframed_and_ends_with_the_connection(
    client: TestClient, token_for: TokenFor, user_id: str
) -> None:
    """HTTP/1.0 has no chunked coding (and nginx speaks HTTP/1.0 to its upstreams unless
    told otherwise): the events go out as they are, and the stream ends by closing."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        token = token_for(user_id, ttl_s=4)  # the stream ends when the token expires
        writer.write(f"GET /sse/tasks/?token={token} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
        head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).lower()
        assert head.startswith(b"http/1.0 200 ok\r\n"), head
        assert b"\r\ncontent-type: text/event-stream\r\n" in head
        assert b"transfer-encoding" not in head and b"content-length" not in head

        snapshot = await asyncio.wait_for(reader.readuntil(b"\n\n"), 5)
        assert snapshot.startswith(b"id: ") and b"\nevent: active_tasks\nretry: 3000\n" in snapshot
        event_id = await publish_progress(client, user_id, "job", progress=2)
        block = b":"
        while block.startswith(b":"):  # heartbeat comments (every 0.5 s in tests)
            block = await asyncio.wait_for(reader.readuntil(b"\n\n"), 5)
        head_lines = f"id: {event_id}\nevent: task_progress\ndata: ".encode()
        assert block.startswith(head_lines), block
        assert json.loads(block[len(head_lines) :])["progress"] == 2

        rest = await asyncio.wait_for(reader.read(), 10)  # until the server closes
        assert b": ping\n\n" in rest  # a heartbeat went out while the token lasted
        assert b"\r\n" not in rest  # no chunk framing, no end-of-chunks marker
    finally:
        writer.close()


async def test_both_transports_get_the_same_events_in_the_same_order(
    client: TestClient, token_for: TokenFor, user_id: str
) -> None:
    token = token_for(user_id)
    async with client.ws_connect(f"/ws/tasks/?token={token}") as ws:
        sse = await client.get(f"/sse/tasks/?token={token}")
        reader = SseReader(sse)
        ws_snapshot = await ws_json(ws)
        sse_snapshot = (await reader.next()).json
        assert ws_snapshot == sse_snapshot

        published = []
        for step in range(20):
            task = f"task-{step % 3}"
            if step in (10, 17):
                published.append(await publish_done(client, user_id, task))
            else:
                published.append(await publish_progress(client, user_id, task, progress=step))
        via_ws = await ws_messages(ws, len(published))
        via_sse = await reader.messages(len(published))
        assert [m["id"] for m in via_ws] == published
        assert via_ws == via_sse
        sse.close()


async def test_every_stream_answers_without_its_final_slash_too(
    client: TestClient, token_for: TokenFor, user_id: str
) -> None:
    """As people type them: `curl -N http://localhost:8080/sse/tasks` was a 404."""
    token = token_for(user_id)
    async with client.ws_connect(f"/ws/tasks?token={token}") as ws:
        assert (await ws_json(ws))["type"] == "active_tasks"
    sse = await client.get(f"/sse/tasks?token={token}")
    assert sse.status == 200 and sse.headers["Content-Type"].startswith("text/event-stream")
    assert (await SseReader(sse).next()).json["type"] == "active_tasks"
    sse.close()
    poll = await client.get(f"/poll/tasks?token={token}")
    assert poll.status == 200
    assert [event["type"] for event in (await poll.json())["events"]] == ["active_tasks"]
    for path in ("/sse/tasks", "/poll/tasks"):
        assert (await client.head(f"{path}?token={token}")).status == 200


async def test_task_id_filter(client: TestClient, token_for: TokenFor, user_id: str) -> None:
    await publish_progress(client, user_id, "a", progress=1)
    await publish_progress(client, user_id, "b", progress=1)
    token = token_for(user_id)
    async with client.ws_connect(f"/ws/tasks/?token={token}&task_id=b") as ws:
        sse = await client.get(f"/sse/tasks/?token={token}&task_id=b")
        reader = SseReader(sse)
        for snapshot in (await ws_json(ws), (await reader.next()).json):
            assert [t["task_id"] for t in snapshot["tasks"]] == ["b"]
        await publish_progress(client, user_id, "a", progress=2)
        b_id = await publish_progress(client, user_id, "b", progress=3)
        assert (await ws_json(ws))["id"] == b_id
        assert (await reader.next()).id == b_id
        sse.close()
        # Asked for again, the tasks are those of the stream: the other task's
        # updates never come on it.
        await ws.send_json({"type": "get_active_tasks"})
        asked = await ws_json(ws)
        assert asked["type"] == "active_tasks" and asked["id"] == b_id
        assert [t["task_id"] for t in asked["tasks"]] == ["b"]

    for narrowed in ("x" * 300, "b&task_id=a", "%ff%fe"):
        bad = await client.get(f"/sse/tasks/?token={token}&task_id={narrowed}")
        assert bad.status == 400
        assert (await bad.json())["code"] == "invalid_task_id"
    twice = await client.get(f"/sse/tasks/?token={token}&token={token}")
    assert twice.status == 401
    assert "given more than once" in (await twice.json())["message"]
    twice = await client.get(f"/sse/tasks/?token={token}&heartbeat=event&heartbeat=event")
    assert twice.status == 400
    assert (await twice.json())["code"] == "invalid_heartbeat"


async def test_a_resume_point_given_twice_is_none_the_client_can_rely_on(
    client: TestClient, token_for: TokenFor, user_id: str
) -> None:
    """Which of two ids would count is up to each reader of the URL: the client is told
    that what it missed is not known (`recovered: false`) and gets a snapshot."""
    ids = [await publish_progress(client, user_id, "job", progress=p) for p in range(3)]
    query = f"token={token_for(user_id)}&last_event_id={ids[0]}&last_event_id={ids[1]}"
    async with client.ws_connect(f"/ws/tasks/?{query}") as ws:
        snapshot = await ws_json(ws)
        assert snapshot["type"] == "active_tasks" and snapshot["recovered"] is False
        assert [t["progress"] for t in snapshot["tasks"]] == [2]


async def test_resume_from_last_event_id_on_both_transports(
    client: TestClient, token_for: TokenFor, user_id: str
) -> None:
    token = token_for(user_id)
    ids = [await publish_progress(client, user_id, "job", progress=p) for p in range(5)]

    async with client.ws_connect(f"/ws/tasks/?token={token}&last_event_id={ids[1]}") as ws:
        snapshot = await ws_json(ws)
        assert snapshot["type"] == "active_tasks" and snapshot["recovered"] is True
        replayed = await ws_messages(ws, 3)
        assert [m["id"] for m in replayed] == ids[2:]
        live = await publish_progress(client, user_id, "job", progress=99)
        assert (await ws_json(ws))["id"] == live  # no duplicate at the seam

    sse = await client.get(
        "/sse/tasks/", headers={"Authorization": f"Bearer {token}", "Last-Event-ID": ids[3]}
    )
    reader = SseReader(sse)
    assert (await reader.next()).json["recovered"] is True
    assert [(await reader.next()).id for _ in range(2)] == [ids[4], live]
    sse.close()
    # An empty header is no id: the query's is used.
    sse = await client.get(
        f"/sse/tasks/?last_event_id={ids[3]}",
        headers={"Authorization": f"Bearer {token}", "Last-Event-ID": ""},
    )
    reader = SseReader(sse)
    assert (await reader.next()).json["recovered"] is True
    assert [(await reader.next()).id for _ in range(2)] == [ids[4], live]
    sse.close()

    async with client.ws_connect(f"/ws/tasks/?token={token}&last_event_id=garbage") as ws:
        snapshot = await ws_json(ws)
        assert snapshot["recovered"] is False
        assert [t["progress"] for t in snapshot["tasks"]] == [99]


async def test_events_of_one_task_keep_publish_order_under_concurrency(
    client: TestClient, token_for: TokenFor, user_id: str
) -> None:
    async with client.ws_connect(f"/ws/tasks/?token={token_for(user_id)}") as ws:
        await ws_json(ws)

        async def producer(task: str) -> list[str]:
            return [await publish_progress(client, user_id, task, progress=p) for p in range(10)]

        # 40 events stay within the test client buffer of 50 even if none is sent yet.
        published = await asyncio.gather(*(producer(f"t{n}") for n in range(4)))
        received = await ws_messages(ws, 40)
        for n, ids in enumerate(published):
            of_task = [m for m in received if m["task_id"] == f"t{n}"]
            assert [m["id"] for m in of_task] == ids
            assert [m["progress"] for m in of_task] == list(range(10))
        assert len({m["id"] for m in received}) == 40


async def test_health_ready_metrics_and_demo_page(client: TestClient) -> None:
    assert (await client.get("/healthz")).status == 200
    ready = await client.get("/readyz")
    assert ready.status == 200 and (await ready.json())["status"] == "ready"
    metrics = await (await client.get("/metrics")).text()
    assert "streamer_connections" in metrics and "streamer_events_sent_total" in metrics
    page = await client.get("/")
    assert page.status == 200 and "streamer.js" in await page.text()
    script = await client.get("/static/streamer.js")
    assert script.status == 200


async def test_a_burst_of_connections_is_served(
    client: TestClient, token_for: TokenFor, user_id: str
) -> None:
    """More simultaneous connections than the Redis pool has connections: they queue."""
    await publish_progress(client, user_id, "job", progress=3)
    url = client.make_url(f"/ws/tasks/?token={token_for(user_id)}")
    clients = 300
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def connect_and_read_snapshot() -> list[str]:
            async with session.ws_connect(url) as ws:
                return [task["task_id"] for task in (await ws_json(ws))["tasks"]]

        snapshots = await asyncio.gather(*(connect_and_read_snapshot() for _ in range(clients)))
    assert snapshots == [["job"]] * clients


async def test_resume_from_beyond_the_retained_history_is_reported(
    client: TestClient, token_for: TokenFor, user_id: str
) -> None:
    """history_size is 100 in the tests: a gap of more than 100 events cannot be replayed."""
    first = await publish_progress(client, user_id, "job", progress=0)
    second = await publish_progress(client, user_id, "job", progress=1)
    for step in range(100):
        await publish_progress(client, user_id, "job", progress=step % 100)
    token = token_for(user_id)
    async with client.ws_connect(f"/ws/tasks/?token={token}&last_event_id={first}") as ws:
        snapshot = await ws_json(ws)
        assert snapshot["recovered"] is False and snapshot["tasks"][0]["task_id"] == "job"
        await ws.send_json({"type": "ping"})
        assert await ws_json(ws) == {"type": "pong"}  # no partial replay came first
    # The oldest retained event is `second`'s successor: resuming from `second` is complete.
    async with client.ws_connect(f"/ws/tasks/?token={token}&last_event_id={second}") as ws:
        assert (await ws_json(ws))["recovered"] is True
        replayed = await ws_messages(ws, 100)
        assert len({m["id"] for m in replayed}) == 100
    # The same over SSE, resuming with ?last_event_id= (no header).
    too_old = SseReader(await client.get(f"/sse/tasks/?token={token}&last_event_id={first}"))
    assert (await too_old.next()).json["recovered"] is False
    too_old.response.close()
    in_range = SseReader(await client.get(f"/sse/tasks/?token={token}&last_event_id={second}"))
    assert (await in_range.next()).json["recovered"] is True
    assert len({(await in_range.next()).id for _ in range(100)}) == 100
    in_range.response.close()


async def test_history_expires_after_its_ttl(
    config: Config, aiohttp_client: Callable[..., Any], token_for: TokenFor, user_id: str
) -> None:
    client: TestClient = await aiohttp_client(await create_app(config.replace(history_ttl=1)))
    seen = await publish_progress(client, user_id, "job", progress=1)
    await publish_progress(client, user_id, "job", progress=2)
    broker = client.app[BROKER]
    assert (await broker.replay(user_id, seen)).complete

    async def expired() -> bool:
        return not (await broker.replay(user_id, seen)).complete

    # One second after the user's last event.
    await eventually(expired, what="the user's history to expire", timeout=10)
    async with client.ws_connect(
        f"/ws/tasks/?token={token_for(user_id)}&last_event_id={seen}"
    ) as ws:
        snapshot = await ws_json(ws)
        assert snapshot["recovered"] is False
        assert [t["progress"] for t in snapshot["tasks"]] == [2]  # task state outlives history
    # A new event starts a new history: resuming from before it is still a gap.
    await publish_progress(client, user_id, "job", progress=3)
    assert not (await broker.replay(user_id, seen)).complete


async def test_cancellation_applies_to_one_run_of_a_task(
    client: TestClient, token_for: TokenFor, user_id: str
) -> None:
    broker = client.app[BROKER]
    await publish_progress(client, user_id, "nightly", progress=1)
    assert await broker.request_cancel(user_id, "nightly")
    assert await broker.is_cancelled(user_id, "nightly")
    await publish_done(client, user_id, "nightly", status="REVOKED")
    assert not await broker.is_cancelled(user_id, "nightly")  # that run is over
    await publish_progress(client, user_id, "nightly", progress=1)  # the next run
    assert not await broker.is_cancelled(user_id, "nightly")


async def test_ids_cannot_be_combined_into_another_users_task(
    client: TestClient, token_for: TokenFor
) -> None:
    """("x", "y}:z") and ("x}:y", "z") must be two different tasks of two users."""
    await publish_progress(client, "x}:y", "z", progress=11)
    await publish_progress(client, "x", "y}:z", progress=22)
    broker = client.app[BROKER]
    mine = await broker.task_state("x", "y}:z")
    theirs = await broker.task_state("x}:y", "z")
    assert mine is not None and theirs is not None
    assert (mine["progress"], theirs["progress"]) == (22, 11)
    assert await broker.task_state("x", "z") is None
    assert [t["task_id"] for t in (await broker.snapshot("x")).tasks] == ["y}:z"]


async def test_sse_snapshot_id_is_an_exact_resume_point(
    client: TestClient, token_for: TokenFor, user_id: str
) -> None:
    token = token_for(user_id)
    fresh = SseReader(await client.get(f"/sse/tasks/?token={token}"))
    first_snapshot = await fresh.next()
    fresh.response.close()
    # No history yet, and still a resume point: what is published next is replayed.
    assert first_snapshot.id is not None and first_snapshot.json["id"] == first_snapshot.id
    first = await publish_progress(client, user_id, "job", progress=1)
    from_first = SseReader(
        await client.get(f"/sse/tasks/?token={token}&last_event_id={first_snapshot.id}")
    )
    assert (await from_first.next()).json["recovered"] is True
    assert (await from_first.next()).id == first
    from_first.response.close()
    reader = SseReader(await client.get(f"/sse/tasks/?token={token}"))
    snapshot = await reader.next()
    reader.response.close()
    missed = await publish_progress(client, user_id, "job", progress=2)
    # A browser reconnecting right after the snapshot sends its id as Last-Event-ID.
    resumed = SseReader(
        await client.get(
            "/sse/tasks/",
            headers={"Authorization": f"Bearer {token}", "Last-Event-ID": str(snapshot.id)},
        )
    )
    assert (await resumed.next()).json["recovered"] is True
    assert (await resumed.next()).id == missed
    resumed.response.close()


async def test_every_event_carries_the_full_task_state(
    client: TestClient, token_for: TokenFor, user_id: str
) -> None:
    """A producer that publishes only `current_step` does not make clients show
    `progress: null`: each event carries the task's full state, on both transports and
    in a replay."""
    token = token_for(user_id)
    first = await publish_progress(client, user_id, "job", progress=40, current_step="a")
    async with client.ws_connect(f"/ws/tasks/?token={token}&last_event_id={first}") as ws:
        assert (await ws_json(ws))["type"] == "active_tasks"
        reader = SseReader(await client.get(f"/sse/tasks/?token={token}&last_event_id={first}"))
        assert (await reader.next()).json["type"] == "active_tasks"
        second = str(
            await client.app[BROKER].publish(progress_event(user_id, "job", current_step="b"))
        )
        for event in (await ws_json(ws), (await reader.next()).json):
            assert event["id"] == second
            assert (event["progress"], event["current_step"]) == (40, "b")
        reader.response.close()
    replay = SseReader(await client.get(f"/sse/tasks/?token={token}&last_event_id={first}"))
    assert (await replay.next()).json["recovered"] is True
    replayed = (await replay.next()).json
    assert (replayed["id"], replayed["progress"], replayed["current_step"]) == (second, 40, "b")
    replay.response.close()
