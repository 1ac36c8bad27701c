"""Findings 6, 9, 11 and 14: a client that stops reading, oversized snapshots, filters
that came after the limit, and snapshots ahead of the replay."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import aiohttp
import pytest

from streamer.broker.base import MAX_SNAPSHOT_BYTES, MAX_SNAPSHOT_TASKS
from streamer.publisher import AsyncPublisher, Publisher

from ..clients import TRANSPORTS, assert_strictly_increasing, open_stream
from ..processes import ServerProcess, rss_kib, worker_pids
from ..raw_ws import RawWebSocket
from ..waiting import eventually_sync
from .conftest import Serve

TokenFor = Callable[..., str]
Session = Callable[[ServerProcess], aiohttp.ClientSession]
BIG_STEP = "x" * 2000  # the longest text field an event may carry
EVENT_BYTES = 60 * 1024


def server_side_established(server_port: int, client_port: int) -> bool:
    """Whether the server still holds its end of our connection (loopback, IPv4)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, remote, state = line.split()[1:4]
        local_port, remote_port = int(local.split(":")[1], 16), int(remote.split(":")[1], 16)
        if (local_port, remote_port, state) == (server_port, client_port, "01"):
            return True
    return False


@contextmanager
def stalled_client(server: ServerProcess, transport: str, token: str) -> Iterator[int]:
    """A client that reads its first message, then never reads again (a tiny receive
    buffer, so the server's writes back up quickly); yields its local port."""
    if transport == "websocket":
        ws = RawWebSocket("127.0.0.1", server.port, f"/ws/tasks/?token={token}",
                          receive_buffer=4096)  # fmt: skip
        sock = ws.sock
        ws.receive()  # active_tasks
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(10)
        sock.connect(("127.0.0.1", server.port))
        sock.sendall(f"GET /sse/tasks/?token={token} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        head = b""
        while b"active_tasks" not in head:
            chunk = sock.recv(4096)
            assert chunk, "the stream ended before its snapshot"
            head += chunk
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


def publish_big_events(redis_url: str, user_id: str, count: int) -> None:
    with Publisher(redis_url) as publisher:
        for n in range(count):
            publisher.completed(user_id, f"t{n}", result_data={"blob": "y" * EVENT_BYTES})


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_client_whose_writes_do_not_drain_is_dropped(
    serve: Serve, redis_url: str, token_for: TokenFor, user_id: str, transport: str
) -> None:
    """Finding 6 (deadline): a client that stops reading while large events arrive,
    with plenty of room left in its buffer, used to be held forever (the WebSocket
    heartbeat closed nothing); its writes now have a deadline."""
    server = serve(
        1,
        STREAMER_SEND_TIMEOUT_S="2",
        STREAMER_CLIENT_BUFFER="1000000",
        STREAMER_CLIENT_BUFFER_BYTES=str(1 << 30),
    )
    with stalled_client(server, transport, token_for(user_id)) as client_port:
        # Far more than the kernel's socket buffers on both ends hold.
        publish_big_events(redis_url, user_id, 250)
        eventually_sync(
            lambda: not server_side_established(server.port, client_port),
            what="the server to drop the stalled client",
            timeout=20,
        )


def test_stalled_clients_hold_bounded_memory(
    serve: Serve, redis_url: str, token_for: TokenFor
) -> None:
    """Finding 6 (memory): 8 users each keep one WebSocket that stops reading while
    large events arrive; the worker used to buffer every event (51 -> 317 MiB, held).
    Buffers are now bounded in bytes and the stalled sockets are dropped."""
    server = serve(1, STREAMER_SEND_TIMEOUT_S="2")
    [worker] = worker_pids(server.process.pid)
    users = [f"stalled-{n}" for n in range(8)]
    with contextlib.ExitStack() as stack:
        ports = [stack.enter_context(stalled_client(server, "websocket", token_for(u)))
                 for u in users]  # fmt: skip
        before = rss_kib(worker)
        for user in users:
            publish_big_events(redis_url, user, 200)  # 12 MiB each, 96 MiB in all
        eventually_sync(
            lambda: not any(server_side_established(server.port, p) for p in ports),
            what="the server to drop every stalled client",
            timeout=30,
        )
        grown_mib = (rss_kib(worker) - before) / 1024
    assert grown_mib < 48, f"the worker grew by {grown_mib:.0f} MiB"


async def publish_many_tasks(redis_url: str, user_id: str, count: int) -> None:
    """`count` unfinished tasks with the longest text fields; task-0000 is the oldest."""
    async with AsyncPublisher(redis_url) as publisher:
        for n in range(count):
            await publisher.progress(
                user_id, f"task-{n:04d}", progress=1, current_step=BIG_STEP,
                task_name=BIG_STEP, category=BIG_STEP,
            )  # fmt: skip


async def test_snapshots_are_bounded_and_cost_their_size(
    serve: Serve, session: Session, redis_url: str, token_for: TokenFor, user_id: str
) -> None:
    """Finding 9: 510 active tasks with 2000-character fields made each 27-byte
    `get_active_tasks` cost a 3.17 MB reply, 20 of them per burst. A snapshot is now
    bounded in bytes, says it was truncated, and a costly reply counts as more than
    one command for the rate limit."""
    server = serve(1)
    await publish_many_tasks(redis_url, user_id, 510)
    async with session(server).ws_connect(
        f"/ws/tasks/?token={token_for(user_id)}", max_msg_size=0
    ) as ws:
        first = await ws.receive_str(timeout=10)
        for _ in range(40):
            await ws.send_json({"type": "get_active_tasks"})
        replies = [await ws.receive_str(timeout=10) for _ in range(40)]
    snapshots = [json.loads(r) for r in [first, *replies] if '"type":"active_tasks"' in r]
    refused = [json.loads(r) for r in replies if '"type":"active_tasks"' not in r]
    for text, snapshot in zip([first, *replies], snapshots, strict=False):
        assert len(text.encode()) < MAX_SNAPSHOT_BYTES + 64 * 1024
        assert snapshot["truncated"] is True and 0 < len(snapshot["tasks"]) < 510
    assert len(snapshots) - 1 <= 3, "a burst of costly replies must be cut short"
    assert refused and all(r["code"] == "rate_limited" for r in refused)


async def test_a_filter_applies_before_the_limit(
    serve: Serve, session: Session, redis_url: str, token_for: TokenFor, user_id: str
) -> None:
    """Finding 11: with 510 active tasks, `?task_id=task-0000` (the oldest) used to get
    an empty snapshot while `get_task_status` said PROGRESS, and `get_active_tasks`
    returned 500 of 510 without saying so."""
    server = serve(1)
    await publish_many_tasks(redis_url, user_id, MAX_SNAPSHOT_TASKS + 10)
    http = session(server)
    token = token_for(user_id)
    for transport in TRANSPORTS:
        async with open_stream(http, transport, token, task_id="task-0000") as narrowed:
            snapshot = (await narrowed.next()).message
        assert [t["task_id"] for t in snapshot["tasks"]] == ["task-0000"]
        assert snapshot["truncated"] is False
    async with http.ws_connect(f"/ws/tasks/?token={token}", max_msg_size=0) as ws:
        everything = await ws.receive_json(timeout=10)
    assert everything["truncated"] is True
    assert len(everything["tasks"]) < MAX_SNAPSHOT_TASKS + 10


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_resumed_snapshot_is_not_ahead_of_the_replay(
    serve: Serve, session: Session, redis_url: str, token_for: TokenFor, user_id: str,
    transport: str,
) -> None:  # fmt: skip
    """Finding 14: resuming from an older event, the snapshot carried the NEWEST id
    with the older events replayed behind it; a browser that dropped right after the
    snapshot resumed past them and lost a `task_completed` for good (finished tasks
    are not in snapshots)."""
    server = serve(1)
    http = session(server)
    token = token_for(user_id)
    with Publisher(redis_url) as publisher:
        seen = publisher.progress(user_id, "report", progress=10)
        progressed = publisher.progress(user_id, "report", progress=90)
        finished = publisher.completed(user_id, "report", result_data={"rows": 7})

    async with open_stream(http, transport, token, last_event_id=seen) as resumed:
        snapshot = await resumed.next()
    # The snapshot stands where the client stood, not ahead of what it has yet to get.
    assert snapshot.id == seen and snapshot.message["recovered"] is True

    async with open_stream(http, transport, token, last_event_id=snapshot.id) as again:
        assert (await again.next()).id == seen
        replayed = [await again.next(), await again.next()]
        assert [r.id for r in replayed] == [progressed, finished]
        assert replayed[1].type == "task_completed"
        assert replayed[1].message["result_data"] == {"rows": 7}
        with Publisher(redis_url) as publisher:
            later = publisher.progress(user_id, "next", progress=1)
        assert (await asyncio.wait_for(again.next(), 10)).id == later
    assert_strictly_increasing(again.ids)
