"""A client that stops reading is cut off at its buffer limit; the others are not slowed;
the slow client resumes from its last id without losing anything."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
from aiohttp.test_utils import TestClient

from streamer.app import create_app
from streamer.app_keys import BROKER, HUB
from streamer.config import Config
from streamer.events import completed_event
from streamer.handlers import ws
from streamer.reasons import Reason

from .clients import SseReader, ws_json, ws_messages
from .conftest import SECRET
from .raw_ws import OP_CLOSE, OP_PING, OP_TEXT, RawWebSocket
from .waiting import eventually

TokenFor = Callable[..., str]
PAYLOAD = {"blob": "x" * 16 * 1024}
FAST_CLIENTS = 100
EVENTS_READ_BEFORE_STALLING = 3
MAX_EVENTS = 3000
WAIT_S = 10.0


async def fast_client_ids(
    session: aiohttp.ClientSession, url: str, transport: str, ready: asyncio.Event
) -> AsyncIterator[str]:
    """Yield the id of every event one fast client receives."""
    if transport == "websocket":
        async with session.ws_connect(url.replace("/sse/", "/ws/")) as ws:
            await ws_json(ws)
            ready.set()
            while True:
                yield (await ws_json(ws))["id"]
    else:
        async with session.get(url) as response:
            reader = SseReader(response)
            await reader.next()
            ready.set()
            while True:
                event = await reader.next()
                assert event.id is not None
                yield event.id


def remaining_ids(slow: RawWebSocket) -> list[str]:
    """Event ids that reached the slow client's socket before it was cut off.

    The server first tries to close with 4008; a peer that reads nothing cannot
    receive that frame in time, and then the connection is aborted.
    """
    ids = []
    try:
        while True:
            opcode, payload = slow.receive()
            if opcode == OP_CLOSE:
                assert struct.unpack("!H", payload[:2])[0] == 4008
                break
            if opcode == OP_TEXT and (event := json.loads(payload)).get("id"):
                ids.append(event["id"])
    except (EOFError, ConnectionError, TimeoutError):
        pass  # aborted: what arrived is what counts
    return ids


async def stalled_websocket(client: TestClient, token: str) -> RawWebSocket:  # type: ignore[type-arg]
    """A WebSocket with a tiny receive buffer, past its snapshot, that reads no more
    unless the test does."""
    assert client.host and client.port
    slow = await asyncio.to_thread(
        RawWebSocket, client.host, client.port, f"/ws/tasks/?token={token}", receive_buffer=4096
    )
    try:
        assert (await asyncio.to_thread(slow.receive))[0] == OP_TEXT  # its snapshot
    except BaseException:
        slow.close()
        raise
    return slow


def stalled_sse(host: str, port: int, token: str) -> socket.socket:
    """An SSE request whose response is never read past the headers."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(10)
    sock.connect((host, port))
    sock.sendall(f"GET /sse/tasks/?token={token} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        assert chunk, "closed before the headers"
        head += chunk
    assert head.startswith(b"HTTP/1.1 200"), head
    return sock


def read_to_end(sock: socket.socket) -> None:
    try:
        while sock.recv(65536):
            pass
    except ConnectionError:
        pass  # aborted rather than ended: the stream is over either way


async def test_stalled_sse_stream_is_ended_and_the_others_keep_up(
    client: TestClient, token_for: TokenFor, user_id: str
) -> None:
    token = token_for(user_id)
    hub, broker = client.app[HUB], client.app[BROKER]
    assert client.host and client.port
    async with client.ws_connect(f"/ws/tasks/?token={token}") as fast:
        await ws_json(fast)
        stalled = await asyncio.to_thread(stalled_sse, client.host, client.port, token)
        try:
            sent = 0
            while len(hub) == 2:
                assert sent < MAX_EVENTS, "the stalled stream was never ended"
                event = completed_event(user_id, f"t{sent}", result_data=PAYLOAD)
                event_id = str(await broker.publish(event))
                sent += 1
                assert (await ws_json(fast))["id"] == event_id
            metrics = await (await client.get("/metrics")).text()
            assert 'streamer_disconnects_total{reason="overflow"} 1.0' in metrics
            # Whatever was buffered arrives, then the stream ends (EOF or reset):
            # reading to the end finishes within the bound instead of hanging.
            await asyncio.wait_for(asyncio.to_thread(read_to_end, stalled), WAIT_S)
        finally:
            stalled.close()


async def test_slow_client_is_cut_off_others_keep_up_and_it_resumes(
    client: TestClient, token_for: TokenFor, user_id: str
) -> None:
    token = token_for(user_id)
    hub = client.app[HUB]
    broker = client.app[BROKER]
    assert client.host and client.port
    sse_url = str(client.make_url(f"/sse/tasks/?token={token}"))
    queues = [asyncio.Queue[str]() for _ in range(FAST_CLIENTS)]
    readies = [asyncio.Event() for _ in range(FAST_CLIENTS)]

    async def pump(n: int, session: aiohttp.ClientSession) -> None:
        transport = "websocket" if n % 2 == 0 else "sse"
        async for event_id in fast_client_ids(session, sse_url, transport, readies[n]):
            queues[n].put_nowait(event_id)

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        pumps = [asyncio.create_task(pump(n, session)) for n in range(FAST_CLIENTS)]
        slow = await asyncio.to_thread(
            RawWebSocket, client.host, client.port, f"/ws/tasks/?token={token}",
            receive_buffer=4096,
        )  # fmt: skip
        try:
            await asyncio.wait_for(asyncio.gather(*(r.wait() for r in readies)), WAIT_S)
            assert (await asyncio.to_thread(slow.receive))[0] == OP_TEXT  # its snapshot
            assert len(hub) == FAST_CLIENTS + 1

            published: list[str] = []
            slow_read: list[str] = []
            while len(hub) == FAST_CLIENTS + 1:
                assert len(published) < MAX_EVENTS, "the stalled client was never cut off"
                event = completed_event(user_id, f"t{len(published)}", result_data=PAYLOAD)
                published.append(str(await broker.publish(event)))
                # Every fast client gets each event before the next is published.
                received = await asyncio.wait_for(
                    asyncio.gather(*(q.get() for q in queues)), WAIT_S
                )
                assert received == [published[-1]] * FAST_CLIENTS
                if len(slow_read) < EVENTS_READ_BEFORE_STALLING:
                    opcode, payload = await asyncio.to_thread(slow.receive)
                    assert opcode == OP_TEXT
                    slow_read.append(json.loads(payload)["id"])
            # It was cut off, and the server said why where it could.
            metrics = await (await client.get("/metrics")).text()
            assert 'streamer_disconnects_total{reason="overflow"} 1.0' in metrics
            slow_read += await asyncio.to_thread(remaining_ids, slow)
        finally:
            slow.close()
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)

    assert slow_read == published[: len(slow_read)]
    missed = published[len(slow_read) :]
    assert missed, "the slow client should have missed events"
    async with client.ws_connect(
        f"/ws/tasks/?token={token}&last_event_id={slow_read[-1]}"
    ) as resumed:
        assert (await ws_json(resumed))["recovered"] is True
        assert [m["id"] for m in await ws_messages(resumed, len(missed))] == missed


async def test_queued_events_leave_once_a_slow_client_catches_up(
    client: TestClient,  # type: ignore[type-arg]
    token_for: TokenFor,
    user_id: str,
) -> None:
    """A client that reads slowly gets every event once it catches up, the last one
    included, even when nothing is published after it and when a wait for the socket
    to drain was cancelled meanwhile (aiohttp shares one drain waiter per socket, and a
    cancelled wait leaves it cancelled)."""
    slow = await stalled_websocket(client, token_for(user_id))
    try:
        [connection] = client.app[HUB].connections()
        transport = connection._out  # the server's end of the slow client's socket
        broker = client.app[BROKER]
        published: list[str] = []
        big = {"blob": "x" * 60_000}
        while transport.get_write_buffer_size() < transport.get_write_buffer_limits()[1]:
            event = completed_event(user_id, f"t{len(published)}", result_data=big)
            published.append(str(await broker.publish(event)))
            await asyncio.sleep(0)  # the turn of the event loop at whose end it is written
            assert len(published) < 500, "the socket never backed up"
        protocol = transport.get_protocol()
        waiting = asyncio.ensure_future(protocol._drain_helper())  # type: ignore[attr-defined]
        await asyncio.sleep(0)
        waiting.cancel()  # someone else's wait for the socket to drain gives up
        await asyncio.gather(waiting, return_exceptions=True)
        last = completed_event(user_id, "last", result_data={"n": 1})
        published.append(str(await broker.publish(last)))  # queued; nothing follows it
        await asyncio.sleep(0)

        def read_all() -> list[str]:
            ids: list[str] = []
            while len(ids) < len(published):
                opcode, payload = slow.receive()
                if opcode == OP_PING:
                    continue  # the hub's ping round came by
                assert opcode == OP_TEXT, opcode
                ids.append(json.loads(payload)["id"])
            return ids

        received = await asyncio.wait_for(asyncio.to_thread(read_all), 20)
        assert received == published
    finally:
        slow.close()


async def test_a_client_that_reads_nothing_but_asks_for_its_tasks_is_cut_off_all_the_same(
    aiohttp_client: Callable[..., Awaitable[TestClient]],  # type: ignore[type-arg]
    token_for: TokenFor,
    user_id: str,
) -> None:
    """Asking for its tasks holds a client's events while the snapshot is read; it
    must not give a client that stopped reading a fresh send timeout each time."""
    config = Config(
        secret=SECRET,
        send_timeout_s=1.0,
        commands_per_s=100,
        client_buffer=10_000,
        client_buffer_bytes=64 << 20,
    )
    client = await aiohttp_client(await create_app(config))
    hub, broker = client.app[HUB], client.app[BROKER]
    slow = await stalled_websocket(client, token_for(user_id))
    try:
        # 8 MiB: more than the kernel holds for the socket (4 MiB at most here), less
        # than the connection may buffer.
        for n in range(512):
            await broker.publish(completed_event(user_id, f"t{n}", result_data=PAYLOAD))
        asked_at = asyncio.get_running_loop().time()
        while hub.ended[Reason.STALLED] == 0:
            assert asyncio.get_running_loop().time() - asked_at < 5, "never cut off"
            await asyncio.to_thread(slow.send_text, '{"type": "get_active_tasks"}')
            await asyncio.sleep(0.1)
        assert len(hub) == 0
    finally:
        slow.close()


async def test_a_slow_client_still_reading_is_told_why_it_was_cut_off(
    client: TestClient,  # type: ignore[type-arg]
    token_for: TokenFor,
    user_id: str,
) -> None:
    """A client whose buffer overflowed while its socket was backed up gets what the
    socket held, then the close code 4008 (SPEC: it knows to resume from its last id),
    when it goes on reading within the send timeout."""
    slow = await stalled_websocket(client, token_for(user_id))
    try:
        hub, broker = client.app[HUB], client.app[BROKER]
        [connection] = hub.connections()
        transport = connection._out  # the server's end of the slow client's socket
        published: list[str] = []
        backed_up = False
        while connection.close_reason is None:
            assert len(published) < MAX_EVENTS, "the slow client was never cut off"
            backed_up = transport.get_write_buffer_size() > 0
            event = completed_event(user_id, f"t{len(published)}", result_data=PAYLOAD)
            published.append(str(await broker.publish(event)))
            await asyncio.sleep(0)  # the turn of the event loop at whose end it is written
        assert connection.close_reason is Reason.OVERFLOW
        assert backed_up, "the socket was not backed up when the client was cut off"

        def read_to_close() -> tuple[list[str], int]:
            ids: list[str] = []
            while True:
                opcode, payload = slow.receive()
                if opcode == OP_CLOSE:
                    return ids, struct.unpack("!H", payload[:2])[0]
                if opcode == OP_TEXT:
                    ids.append(json.loads(payload)["id"])

        received, code = await asyncio.wait_for(asyncio.to_thread(read_to_close), WAIT_S)
        assert code == 4008
        assert received and received == published[: len(received)]
        slow.close()
        # Once the connection ended, the cut-off due after the send timeout does nothing
        # (asyncio's transport raised in `abort()`, logged as an error in the loop).
        await eventually(lambda: transport.get_protocol() is None, what="the connection lost")
        ws.cut_off(transport)
    finally:
        slow.close()
