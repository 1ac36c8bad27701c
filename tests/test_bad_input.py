"""Malformed client input never crashes a connection or the worker."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestClient
from aiohttp.typedefs import Handler

from streamer.app import create_app
from streamer.app_keys import BROKER, CONFIG, HUB
from streamer.auth.sessions import SESSION_COOKIE
from streamer.auth.tokens import InvalidToken, issue_token, verify_token
from streamer.config import Config
from streamer.events import EventError, progress_event, validate_identifier

from .clients import SseReader, ws_close_code, ws_json
from .raw_ws import OP_CLOSE, OP_CONTINUATION, OP_TEXT, RawWebSocket
from .raw_ws import frame as raw_frame
from .waiting import eventually

TokenFor = Callable[..., str]


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("not json", "invalid_json"),
        ("", "invalid_json"),
        ("[1, 2]", "invalid_message"),
        ('"ping"', "invalid_message"),
        ("null", "invalid_message"),
        ("{}", "invalid_message"),
        ('{"type": 5}', "invalid_message"),
        ('{"type": "drop_tables"}', "unknown_type"),
        ('{"type": "get_task_status"}', "missing_task_id"),
        ('{"type": "cancel_task"}', "missing_task_id"),
        ('{"type": "get_task_status", "task_id": ["x"]}', "invalid_task_id"),
        ('{"type": "get_task_status", "task_id": ""}', "invalid_task_id"),
        ('{"type": "cancel_task", "task_id": "a\\nb"}', "invalid_task_id"),
        ('{"type": "cancel_task", "task_id": ".."}', "invalid_task_id"),  # no URL names it
        ("[" * 50_000, "invalid_json"),  # deep nesting, under the size limit
        ('{"type": "cancel_task", "task_id": "a", "task_id": "b"}', "invalid_message"),
        ('{"type": "ping", "type": "cancel_task"}', "invalid_message"),
    ],
)
async def test_bad_commands_get_an_error_and_the_connection_stays_open(
    client: TestClient, token_for: TokenFor, user_id: str, frame: str, code: str
) -> None:
    async with client.ws_connect(f"/ws/tasks/?token={token_for(user_id)}") as ws:
        await ws_json(ws)
        await ws.send_str(frame)
        error = await ws_json(ws)
        assert error["type"] == "error" and error["code"] == code and error["message"]
        await ws.send_json({"type": "ping"})
        assert await ws_json(ws) == {"type": "pong"}


async def test_binary_frame_gets_an_error(
    client: TestClient, token_for: TokenFor, user_id: str
) -> None:
    async with client.ws_connect(f"/ws/tasks/?token={token_for(user_id)}") as ws:
        await ws_json(ws)
        await ws.send_bytes(b"\x00\xff" * 10)
        assert (await ws_json(ws))["code"] == "unsupported_frame"
        await ws.send_json({"type": "ping"})
        assert await ws_json(ws) == {"type": "pong"}


async def test_one_mebibyte_frame_closes_cleanly_and_the_server_keeps_serving(
    client: TestClient, token_for: TokenFor, user_id: str
) -> None:
    token = token_for(user_id)
    async with client.ws_connect(f"/ws/tasks/?token={token}") as ws:
        await ws_json(ws)
        await ws.send_str('{"type": "ping", "pad": "' + "x" * (1024 * 1024) + '"}')
        assert await ws_close_code(ws) == 1009  # message too big
    async with client.ws_connect(f"/ws/tasks/?token={token}") as ws:
        await ws_json(ws)
        await ws.send_json({"type": "ping"})
        assert await ws_json(ws) == {"type": "pong"}


def send_in_fragments(ws: RawWebSocket, message: bytes, fragments: int) -> tuple[int, bytes]:
    """The server's first frame after `message`, sent as one text message in `fragments`."""
    ws.receive()  # the snapshot
    step = -(-len(message) // fragments)
    pieces = [message[at : at + step] for at in range(0, len(message), step)]
    for n, piece in enumerate(pieces):
        opcode = OP_TEXT if n == 0 else OP_CONTINUATION
        ws.send(raw_frame(opcode, piece, fin=n == len(pieces) - 1))
    return ws.receive()


@pytest.mark.parametrize("fragments", [1, 3])
async def test_a_message_of_the_largest_size_is_read_and_one_byte_more_is_not(
    client: TestClient, token_for: TokenFor, user_id: str, fragments: int
) -> None:
    """STREAMER_WS_MAX_MESSAGE_BYTES is the largest message a client may send, whole or
    in fragments."""
    assert client.host and client.port
    largest = client.app[CONFIG].ws_max_message_bytes
    head, tail = '{"type": "ping", "pad": "', '"}'
    for size in (largest, largest + 1):
        message = (head + "x" * (size - len(head) - len(tail)) + tail).encode()
        assert len(message) == size
        path = f"/ws/tasks/?token={token_for(user_id)}"
        ws = await asyncio.to_thread(RawWebSocket, client.host, client.port, path)
        try:
            answer = await asyncio.to_thread(send_in_fragments, ws, message, fragments)
        finally:
            ws.close()
        if size == largest:
            assert answer == (OP_TEXT, b'{"type":"pong"}')
        else:
            assert answer[0] == OP_CLOSE and int.from_bytes(answer[1][:2], "big") == 1009

    async def counted() -> bool:  # the stream's end, as the server saw it
        metrics = await (await client.get("/metrics")).text()
        return 'streamer_disconnects_total{reason="protocol_error"} 1.0' in metrics

    await eventually(counted, what="the protocol error to be counted")


async def raw_answer(client: TestClient, request: bytes, then: int = 0) -> bytes:
    """The status line and headers of the answer to `request`, sent as these bytes,
    and `then` bytes more."""
    assert client.host and client.port
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(request)
        answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        return answer + await asyncio.wait_for(reader.readexactly(then), 10)
    finally:
        writer.close()


UPGRADE = b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
UPGRADE += b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"


@pytest.mark.parametrize(
    "credential",
    [b"Authorization: Bearer \xff\xfe", b"Cookie: " + SESSION_COOKIE.encode() + b"=\xff\xfe"],
    ids=["bearer", "cookie"],
)
async def test_undecodable_bytes_in_credentials_are_no_credentials(
    client: TestClient, credential: bytes
) -> None:
    """Header bytes that are not UTF-8 (aiohttp keeps them as surrogates) are refused
    like any bad credential, on every route that reads one: never a 500."""
    expected = {
        b"GET /sse/tasks/": b"401",
        b"HEAD /sse/tasks/": b"401",
        b"GET /poll/tasks/": b"401",
        b"GET /api/tasks/t": b"401",
        b"GET /ws/tasks/": b"101",  # then closed with 4401
        b"DELETE /auth/session": b"204",  # nothing to end
    }
    if credential.startswith(b"Authorization"):
        expected[b"POST /api/tasks/t/cancel"] = b"401"
        expected[b"POST /auth/session"] = b"401"
    else:  # a command riding on a cookie needs a page of a listed origin first
        expected[b"POST /api/tasks/t/cancel"] = b"403"
    for request_line, status in expected.items():
        websocket = b"/ws/" in request_line
        request = request_line + b" HTTP/1.1\r\nHost: x\r\n" + credential + b"\r\n"
        if websocket:
            request += UPGRADE + b"\r\n"
        else:
            request += b"Connection: close\r\n\r\n"
        answer = await raw_answer(client, request, then=4 if websocket else 0)
        assert answer.startswith(b"HTTP/1.1 " + status + b" "), (request_line, answer)
        if websocket:  # a close frame (0x88) whose code is 4401
            close = answer[-4:]
            assert close[0] == 0x88 and int.from_bytes(close[2:], "big") == 4401, answer


async def test_websocket_endpoint_without_upgrade(client: TestClient) -> None:
    response = await client.get("/ws/tasks/")
    assert response.status == 400


@pytest.mark.parametrize("token", [True, False], ids=["token", "no-token"])
async def test_a_client_that_leaves_during_the_upgrade_is_no_error(
    config: Config,
    aiohttp_client: Callable[..., Awaitable[TestClient]],
    token_for: TokenFor,
    caplog: pytest.LogCaptureFixture,
    token: bool,
) -> None:
    """Gone before the 101 went out (admitted, or refused and about to get its close
    code): nothing to answer, and nothing for the error log. The connection is closed
    before the handler runs, and the handler is not cancelled by it (aiohttp's default,
    which its own gunicorn worker keeps)."""
    finished: list[str] = []

    @web.middleware
    async def leave_first(request: web.Request, handler: Handler) -> web.StreamResponse:
        assert request.transport is not None
        request.transport.close()
        try:
            return await handler(request)
        finally:
            finished.append(request.path)

    app = await create_app(config)
    app.middlewares.append(leave_first)
    client = await aiohttp_client(app, server_kwargs={"handler_cancellation": False})
    assert client.host and client.port
    credential = f"Authorization: Bearer {token_for('u')}\r\n".encode() if token else b""
    for _ in range(3):
        reader, writer = await asyncio.open_connection(client.host, client.port)
        writer.write(b"GET /ws/tasks/ HTTP/1.1\r\nHost: x\r\n" + credential + UPGRADE + b"\r\n")
        assert await asyncio.wait_for(reader.read(), 10) == b""  # closed, nothing sent
        writer.close()
    await eventually(lambda: len(finished) == 3, what="the three handlers to finish")
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []
    assert len(client.app[HUB]) == 0


EVIL = 'x\r\nevent: task_completed\r\ndata: {"type":"forged"}\n\nid: 1\rretry: 1'


@pytest.mark.parametrize("field", ["current_step", "task_name", "category"])
async def test_newlines_in_event_fields_cannot_inject_sse_fields(
    client: TestClient, token_for: TokenFor, user_id: str, field: str
) -> None:
    fields: dict[str, object] = {"progress": 10, "current_step": "ok", "task_name": "ok"}
    fields[field] = EVIL
    response = await client.get(f"/sse/tasks/?token={token_for(user_id)}")
    reader = SseReader(response)
    await reader.next()
    broker = client.app[BROKER]
    await broker.publish(progress_event(user_id, "task", **fields))
    await broker.publish(progress_event(user_id, "sentinel", progress=1))
    events = [await reader.next(), await reader.next()]
    # Exactly the two published events, each a single data line of JSON; SseReader
    # fails on any field other than id, event, data and retry.
    assert [e.event for e in events] == ["task_progress", "task_progress"]
    assert [e.json["task_id"] for e in events] == ["task", "sentinel"]
    assert all(len(e.data) == 1 for e in events)
    assert events[0].json[field] == EVIL
    response.close()


def test_control_characters_are_refused_in_ids() -> None:
    for bad in (EVIL, "a\nb", "a\rb", "a\x00b", "a\x7fb"):
        with pytest.raises(EventError):
            progress_event("user", bad, progress=1)
        with pytest.raises(EventError):
            progress_event(bad, "task", progress=1)


@pytest.mark.parametrize(
    "user_id",
    ["42", "é", "a b", "ünïcode ✓", "a\u00a0b", "\u202eevil", "a\x85b", "a\u2028b", "a\u200bb"],
)
def test_an_id_is_valid_where_a_token_can_carry_it(user_id: str) -> None:
    """A publisher must not accept a user id that no token can name: its events would be
    stored for nobody (a no-break space, a right-to-left override, C1 controls...)."""
    secret = "s" * 40
    try:
        validate_identifier("user_id", user_id)
    except EventError:
        accepted = False
    else:
        accepted = True
    try:
        verify_token(secret, issue_token(secret, user_id))
    except InvalidToken:
        verifiable = False
    else:
        verifiable = True
    assert accepted == verifiable
    assert accepted == (user_id in ("42", "é", "a b", "ünïcode ✓"))


async def test_bad_last_event_ids_are_answered_with_a_fresh_snapshot(
    client: TestClient, token_for: TokenFor, user_id: str
) -> None:
    too_big = "deadbeef-99999999999999999999-0"  # not a Redis stream id (over 2**64)
    for bad in ("0", "zzzz-1-1", "deadbeef-99999999999999999-0", too_big, "x" * 5000, "\u00e9"):
        async with client.ws_connect(
            "/ws/tasks/", params={"token": token_for(user_id), "last_event_id": bad}
        ) as ws:
            snapshot = await ws_json(ws)
            assert snapshot["type"] == "active_tasks" and snapshot["recovered"] is False
    message = await client.ws_connect(f"/ws/tasks/?token={token_for(user_id)}")
    assert (await message.receive()).type == WSMsgType.TEXT
    await message.close()
