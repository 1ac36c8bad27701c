"""Hostile input never crashes a connection handler or the worker; the server keeps
serving the next client.

Covers: property-based fuzzing of the WebSocket command parser and of the SSE framing,
malformed WebSocket frames and malformed HTTP on raw sockets against a live server,
line-break injection into every string field of an event, end to end, and lone UTF-16
surrogates (valid JSON, not encodable as UTF-8) in commands and published events.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import struct
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.test_utils import TestClient
from hypothesis import example, given, settings
from hypothesis import strategies as st

from streamer.app_keys import BROKER
from streamer.commands import Command, CommandError, parse_command
from streamer.events import (
    MAX_ID_LENGTH,
    MAX_TEXT_LENGTH,
    EventError,
    TaskEvent,
    completed_event,
    progress_event,
)
from streamer.wire import Delivery, EventId, with_id

from .clients import WAIT_S, SseReader, ws_json
from .conftest import PUBLISH_KEY
from .raw_ws import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_TEXT,
    RawWebSocket,
    frame,
)

TokenFor = Callable[..., str]
ServerErrors = Callable[[], list[logging.LogRecord]]

# A blocking raw-socket exchange: the sockets time out after 10 s, this bounds the whole.
THREAD_WAIT_S = 3 * WAIT_S


@pytest.fixture
def server_errors(caplog: pytest.LogCaptureFixture) -> ServerErrors:
    """ERROR records logged so far (the test server runs in this process): a handler
    that crashed shows up here as aiohttp's "Error handling request" with a traceback."""

    def errors() -> list[logging.LogRecord]:
        return [record for record in caplog.records if record.levelno >= logging.ERROR]

    return errors


def address(client: TestClient) -> tuple[str, int]:  # type: ignore[type-arg]
    assert client.host and client.port
    return client.host, client.port


async def assert_still_serving(client: TestClient, token: str) -> None:  # type: ignore[type-arg]
    """A brand-new, well-behaved WebSocket client gets its snapshot and a pong."""
    async with client.ws_connect(f"/ws/tasks/?token={token}") as ws:
        first = await ws_json(ws)
        assert first["type"] == "active_tasks"
        await ws.send_json({"type": "ping"})
        assert await ws_json(ws) == {"type": "pong"}


# --- 1. parse_command never raises anything but CommandError ---------------------------

COMMAND_TYPES = ("get_task_status", "get_active_tasks", "cancel_task", "ping")
NEEDS_TASK_ID = frozenset({"get_task_status", "cancel_task"})
ERROR_CODES = frozenset(
    {"invalid_json", "invalid_message", "unknown_type", "missing_task_id", "invalid_task_id"}
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=25,
)

task_id_values = st.one_of(
    json_values,
    st.text(),
    st.integers(),
    st.text(min_size=MAX_ID_LENGTH - 2, max_size=MAX_ID_LENGTH + 2),
    st.sampled_from(["", " ", "a\nb", "a\rb", "\x00", "\x1f", "\x7f", "\x85", "\u2028", "é"]),
    # Lone UTF-16 surrogates: valid in JSON ("\ud800"), not encodable as UTF-8.
    st.lists(st.characters(categories=["Cs"]) | st.characters(), min_size=1, max_size=8).map(
        "".join
    ),
)


def is_control(ch: str) -> bool:
    return ord(ch) < 32 or ord(ch) == 127


def check_command(text: str) -> Command | CommandError:
    """Run the parser and check the invariants; any other exception fails the test."""
    try:
        command = parse_command(text)
    except CommandError as exc:
        assert isinstance(exc.code, str) and exc.code in ERROR_CODES
        assert isinstance(exc.message, str) and exc.message
        return exc
    assert isinstance(command, Command)
    assert command.type in COMMAND_TYPES
    if command.type in NEEDS_TASK_ID:
        assert isinstance(command.task_id, str)
        assert 1 <= len(command.task_id) <= MAX_ID_LENGTH
        assert not any(is_control(ch) for ch in command.task_id)
        command.task_id.encode("utf-8")  # the reply echoes it: it must be sendable
    else:
        assert command.task_id is None
    return command


@settings(max_examples=300, deadline=None)
@given(text=st.text())
@example(text="")
@example(text="[" * 100_000)  # deeper than the recursion limit
@example(text='{"type": "ping"}')
@example(text='{"type": "cancel_task", "task_id": "\\u0000"}')
@example(text="NaN")
def test_parse_command_on_arbitrary_text(text: str) -> None:
    check_command(text)


@settings(max_examples=300, deadline=None)
@given(value=json_values)
def test_parse_command_on_arbitrary_json(value: object) -> None:
    outcome = check_command(json.dumps(value))
    if not isinstance(value, dict):
        assert isinstance(outcome, CommandError) and outcome.code == "invalid_message"


def expected_task_id(value: object) -> str | None:
    """The contract for ids: non-empty strings without control characters or lone
    surrogates (numbers become their decimal string); None when the value must be refused."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        value = str(value)
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_ID_LENGTH:
        return None
    if any(is_control(ch) or 0xD800 <= ord(ch) <= 0xDFFF for ch in value):
        return None
    return value


@settings(max_examples=300, deadline=None)
@given(
    kind=st.sampled_from(COMMAND_TYPES),
    task_id=task_id_values,
    extra=st.dictionaries(st.text(max_size=8), json_values, max_size=3),
)
def test_parse_command_on_known_types_with_random_task_ids(
    kind: str, task_id: object, extra: dict[str, Any]
) -> None:
    message = {**extra, "type": kind, "task_id": task_id}
    outcome = check_command(json.dumps(message))
    if kind not in NEEDS_TASK_ID:
        assert outcome == Command(type=kind)  # type: ignore[arg-type]
        return
    # What the server sees is the value after the JSON round trip, where an escaped
    # surrogate *pair* ("\ud800\udc00") becomes one valid character.
    expected = expected_task_id(json.loads(json.dumps(task_id)))
    if expected is None:
        assert isinstance(outcome, CommandError) and outcome.code == "invalid_task_id"
    else:
        assert outcome == Command(type=kind, task_id=expected)  # type: ignore[arg-type]


# --- 2. SSE framing of hostile text, parsed per the HTML rules -------------------------

EVENT_ID = "deadbeef-1-0"
SSE_LINE_END = re.compile(r"\r\n|\r|\n")
FRAGMENTS = [
    "\r",
    "\n",
    "\r\n",
    "\n\n",
    "\r\r",
    "\x00",
    "\u2028",
    "\u2029",
    "\x85",
    "\ufeff",
    "data: x",
    "event: y",
    "id: 1",
    "retry: 1",
    ": comment",
    ":",
    "\\",
    '"',
    "\\r\\n",
]
hostile_text = st.one_of(
    st.text(max_size=MAX_TEXT_LENGTH),
    st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=4)), max_size=40).map("".join),
)


def sse_bytes(event: TaskEvent) -> tuple[bytes, str]:
    """The body bytes the server writes for one event on every SSE stream (its
    pre-encoded chunk, with the HTTP/1.1 chunk framing taken off), and its JSON."""
    event_id = EventId.parse(EVENT_ID)
    assert event_id is not None
    delivery = Delivery(
        "user-1", event.task_id, event_id, event.type, with_id(event.to_json(), event_id)
    )
    size, _, rest = delivery.sse_chunk.partition(b"\r\n")
    assert rest.endswith(b"\r\n") and len(rest) == int(size, 16) + 2
    return rest[:-2], delivery.json.decode()


def parse_sse(raw: bytes) -> list[list[tuple[str, str]]]:
    """The fields of each dispatched block, per the HTML "interpreting an event stream"
    rules: lines end at CRLF, CR or LF; `name: value` (one leading space dropped); a line
    without a colon is a field with an empty value; comments are kept as (":", text)."""
    lines = SSE_LINE_END.split(raw.decode("utf-8"))
    assert lines.pop() == "", "the stream ends in the middle of a line"
    blocks: list[list[tuple[str, str]]] = []
    fields: list[tuple[str, str]] = []
    for line in lines:
        if line == "":
            blocks.append(fields)
            fields = []
        elif line.startswith(":"):
            fields.append((":", line[1:]))
        else:
            name, _, value = line.partition(":")
            fields.append((name, value.removeprefix(" ")))
    assert fields == [], f"fields after the last blank line: {fields!r}"
    return blocks


async def assert_one_clean_sse_block(event: TaskEvent) -> dict[str, Any]:
    body, wire = sse_bytes(event)
    blocks = parse_sse(body)
    assert len(blocks) == 1
    assert blocks[0] == [("id", EVENT_ID), ("event", event.type), ("data", wire)]
    decoded: dict[str, Any] = json.loads(blocks[0][2][1])
    assert decoded == {"id": EVENT_ID, "type": event.type, "task_id": event.task_id, **event.fields}
    return decoded


@settings(max_examples=300, deadline=None)
@given(
    current_step=hostile_text,
    task_name=hostile_text,
    category=hostile_text,
    error_message=hostile_text,
    result_text=hostile_text,
)
@example(
    current_step='x\r\nevent: task_completed\r\ndata: {"type":"forged"}\n\nid: 1\rretry: 1',
    task_name="\u2028\x85\x00",
    category="\r",
    error_message="\n\ndata: x",
    result_text="a\r\nevent: forged",
)
@example(
    current_step="\r\n" * (MAX_TEXT_LENGTH // 2),
    task_name="\n" * MAX_TEXT_LENGTH,
    category="\r" * MAX_TEXT_LENGTH,
    error_message="\u2028" * MAX_TEXT_LENGTH,
    result_text="\x85" * MAX_TEXT_LENGTH,
)
async def test_sse_framing_of_hostile_text_is_one_event_with_one_data_line(
    current_step: str, task_name: str, category: str, error_message: str, result_text: str
) -> None:
    progress = progress_event(
        "user-1",
        "task-1",
        progress=50,
        current_step=current_step,
        task_name=task_name,
        category=category,
    )
    decoded = await assert_one_clean_sse_block(progress)
    assert (decoded["current_step"], decoded["task_name"], decoded["category"]) == (
        current_step,
        task_name,
        category,
    )

    result_data = {"k": result_text, result_text: [result_text, {"nested": result_text}]}
    completed = completed_event(
        "user-1",
        "task-1",
        status="FAILURE",
        result_data=result_data,
        error_message=error_message,
    )
    decoded = await assert_one_clean_sse_block(completed)
    assert decoded["error_message"] == error_message
    assert decoded["result_data"] == result_data


# --- 3. Malformed WebSocket frames on a raw socket -------------------------------------

PROTOCOL_ERROR, INVALID_DATA, MESSAGE_TOO_BIG = 1002, 1007, 1009


def with_rsv(data: bytes, bits: int) -> bytes:
    """Set reserved bits (RSV1 0x40, RSV2 0x20, RSV3 0x10); no extension was negotiated."""
    return bytes([data[0] | bits]) + data[1:]


def close_frame(code: int, reason: bytes = b"") -> bytes:
    return frame(OP_CLOSE, struct.pack("!H", code) + reason)


MALFORMED_FRAMES = [
    pytest.param(frame(0x3, b"x"), PROTOCOL_ERROR, id="reserved-data-opcode-0x3"),
    pytest.param(frame(0xB, b"x"), PROTOCOL_ERROR, id="reserved-control-opcode-0xB"),
    pytest.param(
        frame(OP_TEXT, b"", declared_length=2**40), MESSAGE_TOO_BIG, id="declared-length-2**40"
    ),
    pytest.param(
        frame(OP_TEXT, b"", declared_length=2**63), MESSAGE_TOO_BIG, id="declared-length-2**63"
    ),
    pytest.param(
        frame(OP_TEXT, b"a" * 40_000, fin=False) + frame(OP_CONTINUATION, b"a" * 40_000),
        MESSAGE_TOO_BIG,
        id="fragments-over-the-size-limit",
    ),
    pytest.param(frame(OP_PING, b"x", fin=False), PROTOCOL_ERROR, id="fragmented-ping"),
    pytest.param(frame(OP_PING, b"x" * 126), PROTOCOL_ERROR, id="ping-payload-over-125"),
    pytest.param(close_frame(999), PROTOCOL_ERROR, id="close-code-999"),
    pytest.param(close_frame(1005), PROTOCOL_ERROR, id="close-code-1005-on-the-wire"),
    pytest.param(frame(OP_CLOSE, b"\x03"), PROTOCOL_ERROR, id="close-payload-1-byte"),
    pytest.param(close_frame(1000, b"\xff"), INVALID_DATA, id="close-reason-bad-utf8"),
    pytest.param(frame(OP_CONTINUATION, b"x"), PROTOCOL_ERROR, id="continuation-without-start"),
    pytest.param(
        frame(OP_TEXT, b"a", fin=False) + frame(OP_TEXT, b"b"),
        PROTOCOL_ERROR,
        id="new-message-inside-a-fragmented-one",
    ),
    pytest.param(frame(OP_TEXT, b"\xff\xfe"), INVALID_DATA, id="text-bad-utf8"),
    pytest.param(frame(OP_TEXT, b"\xed\xa0\x80"), INVALID_DATA, id="text-utf8-surrogate"),
    pytest.param(frame(OP_TEXT, b"\xc0\xaf"), INVALID_DATA, id="text-overlong-utf8"),
    pytest.param(frame(OP_TEXT, b"\xe2\x82"), INVALID_DATA, id="text-truncated-utf8"),
    pytest.param(
        frame(OP_TEXT, b"\xe2\x82", fin=False) + frame(OP_CONTINUATION, b"\xff"),
        INVALID_DATA,
        id="text-bad-utf8-across-fragments",
    ),
    pytest.param(with_rsv(frame(OP_TEXT, b"{}"), 0x40), PROTOCOL_ERROR, id="rsv1"),
    pytest.param(with_rsv(frame(OP_TEXT, b"{}"), 0x20), PROTOCOL_ERROR, id="rsv2"),
    pytest.param(with_rsv(frame(OP_TEXT, b"{}"), 0x10), PROTOCOL_ERROR, id="rsv3"),
]


def read_snapshot(ws: RawWebSocket) -> None:
    opcode, payload = ws.receive()
    assert opcode == OP_TEXT
    assert json.loads(payload)["type"] == "active_tasks"


def read_until_closed(ws: RawWebSocket) -> str:
    """After the server's close frame the TCP connection must end: "eof", or "reset"
    when the server closed with our unread bytes still in its receive buffer."""
    try:
        extra = ws.receive()
    except EOFError:
        return "eof"
    except ConnectionResetError:
        return "reset"
    raise AssertionError(f"frame after the close frame: {extra!r}")


@pytest.mark.parametrize(("hostile", "expected_code"), MALFORMED_FRAMES)
async def test_malformed_frame_closes_the_connection_and_the_server_keeps_serving(
    client: TestClient,  # type: ignore[type-arg]
    token_for: TokenFor,
    user_id: str,
    server_errors: ServerErrors,
    hostile: bytes,
    expected_code: int,
) -> None:
    token = token_for(user_id)
    host, port = address(client)

    def attack() -> tuple[int, str]:
        ws = RawWebSocket(host, port, f"/ws/tasks/?token={token}")
        try:
            read_snapshot(ws)
            ws.send(hostile)
            # The very next frame is the close frame, with aiohttp's exact code.
            opcode, payload = ws.receive()
            assert opcode == OP_CLOSE, (opcode, payload)
            code: int = struct.unpack("!H", payload[:2])[0]
            return code, read_until_closed(ws)
        finally:
            ws.close()

    code, ended = await asyncio.wait_for(asyncio.to_thread(attack), THREAD_WAIT_S)
    assert code == expected_code
    assert ended in ("eof", "reset")
    await assert_still_serving(client, token)
    assert server_errors() == []


async def test_unmasked_client_frame_is_accepted_like_a_masked_one(
    client: TestClient,  # type: ignore[type-arg]
    token_for: TokenFor,
    user_id: str,
    server_errors: ServerErrors,
) -> None:
    """RFC 6455 5.1 says a server MUST close on an unmasked client frame; aiohttp's reader
    does not check the mask bit and processes the frame. Pinned so a change is noticed."""
    token = token_for(user_id)
    host, port = address(client)

    def exchange() -> list[tuple[int, bytes]]:
        ws = RawWebSocket(host, port, f"/ws/tasks/?token={token}")
        try:
            read_snapshot(ws)
            ws.send(frame(OP_TEXT, b'{"type":"ping"}', masked=False))
            replies = [ws.receive()]
            ws.send(frame(OP_BINARY, b"\x00", masked=False))
            replies.append(ws.receive())
            ws.send(close_frame(1000))
            replies.append(ws.receive())
            return replies
        finally:
            ws.close()

    pong, binary_error, close = await asyncio.wait_for(asyncio.to_thread(exchange), THREAD_WAIT_S)
    assert pong == (OP_TEXT, b'{"type":"pong"}')
    assert binary_error[0] == OP_TEXT
    assert json.loads(binary_error[1])["code"] == "unsupported_frame"
    assert close[0] == OP_CLOSE and struct.unpack("!H", close[1][:2])[0] == 1000
    await assert_still_serving(client, token)
    assert server_errors() == []


# --- 4. Malformed HTTP on a raw TCP socket ---------------------------------------------


def post_events(headers: str, body: bytes) -> bytes:
    return (
        f"POST /api/tasks/events HTTP/1.1\r\nHost: test\r\nX-API-Key: {PUBLISH_KEY}\r\n"
        f"Content-Type: application/json\r\n{headers}\r\n"
    ).encode() + body


MALFORMED_REQUESTS = [
    pytest.param(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", id="tls-hello"),
    pytest.param(b"HELLO\r\n\r\n", id="garbage-request-line"),
    pytest.param(b"GET\r\n\r\n", id="request-line-without-target"),
    pytest.param(b"GET /healthz HTTP/9.9\r\nHost: test\r\n\r\n", id="unknown-http-version"),
    pytest.param(
        b"GET /healthz HTTP/1.1\r\nHost: test\r\nNoColonHere\r\n\r\n", id="header-without-colon"
    ),
    pytest.param(
        b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: test\r\n\r\n",
        id="request-line-over-100KB",
    ),
    pytest.param(
        b"GET /healthz HTTP/1.1\r\nHost: test\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n",
        id="header-value-over-100KB",
    ),
    pytest.param(post_events("Content-Length: abc\r\n", b"{}"), id="content-length-abc"),
    pytest.param(post_events("Content-Length: -1\r\n", b"{}"), id="content-length-negative"),
    pytest.param(
        post_events("Content-Length: 2\r\nContent-Length: 3\r\n", b"{}"),
        id="content-length-twice",
    ),
    pytest.param(
        post_events("Content-Length: 2\r\nTransfer-Encoding: chunked\r\n", b"{}"),
        id="content-length-and-chunked",
    ),
    pytest.param(
        post_events("Transfer-Encoding: chunked\r\n", b"zz\r\n{}\r\n0\r\n\r\n"),
        id="bad-chunk-size",
    ),
    pytest.param(b"GET /heal\x00thz HTTP/1.1\r\nHost: test\r\n\r\n", id="nul-in-path"),
]


def raw_http(host: str, port: int, request: bytes) -> tuple[bytes, str]:
    """Send raw bytes; read until the server ends the connection ("eof", or "reset" when it
    closed with unread bytes of ours)."""
    with socket.create_connection((host, port), timeout=WAIT_S) as sock:
        sock.sendall(request)
        received = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                return received, "reset"
            if not chunk:
                return received, "eof"
            received += chunk


def status_line(response: bytes) -> bytes:
    return response.partition(b"\r\n")[0]


@pytest.mark.parametrize("request_bytes", MALFORMED_REQUESTS)
async def test_malformed_http_gets_400_and_the_server_keeps_serving(
    client: TestClient,  # type: ignore[type-arg]
    server_errors: ServerErrors,
    request_bytes: bytes,
) -> None:
    host, port = address(client)
    response, ended = await asyncio.wait_for(
        asyncio.to_thread(raw_http, host, port, request_bytes), THREAD_WAIT_S
    )
    # aiohttp's parser answers 400 (as HTTP/1.0: the request never parsed) and closes.
    assert status_line(response) == b"HTTP/1.0 400 Bad Request"
    assert b"\r\nConnection: keep-alive" not in response
    assert ended in ("eof", "reset")

    healthz, _ = await asyncio.wait_for(
        asyncio.to_thread(
            raw_http,
            host,
            port,
            b"GET /healthz HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n",
        ),
        THREAD_WAIT_S,
    )
    assert status_line(healthz) == b"HTTP/1.1 200 OK"
    # aiohttp logs parse errors itself (ERROR with the parser's exception, or DEBUG for
    # non-HTTP bytes); no handler of ours may have raised.
    for record in server_errors():
        assert record.name == "aiohttp.server", record.getMessage()
        assert record.exc_info is not None
        assert isinstance(record.exc_info[1], HttpProcessingError), record.exc_info
        assert record.exc_info[1].code == 400


# --- 5. Line-break injection into every string field, end to end -----------------------

INJECTIONS = [
    'x\r\nevent: task_completed\r\ndata: {"type":"forged"}\r\n\r\n',
    "a\rid: 1\rretry: 1\r\r",
    "\n\ndata: x\n: comment\n",
    "\x00\u2028\u2029\x85\ufeff",
    "tail\r",
]


async def read_until_sentinel(reader: SseReader) -> list[Any]:
    events = [await reader.next()]
    while events[-1].json["task_id"] != "sentinel":
        events.append(await reader.next())
    return events


async def test_injection_into_every_string_field_round_trips_over_sse_and_websocket(
    client: TestClient,  # type: ignore[type-arg]
    token_for: TokenFor,
    user_id: str,
    server_errors: ServerErrors,
) -> None:
    """tests/test_bad_input.py checks one progress field at a time over SSE; this covers
    error_message, the strings (keys, values, nested) of result_data, all progress text
    fields at once with every kind of line end, and the WebSocket side too."""
    token = token_for(user_id)
    result_data = {
        "k": "a\r\nevent: forged",
        "key\r\nid: 9": "v\rdata: x",
        "nested": {"list": INJECTIONS, "deep": [{"s": "\n\n"}]},
        "\u2028": "\x85",
    }
    events = [
        progress_event(
            user_id,
            "task-a",
            progress=10,
            current_step=INJECTIONS[0],
            task_name=INJECTIONS[1],
            category=INJECTIONS[2],
            estimated_completion="2030-01-01T00:00:00Z",
        ),
        progress_event(
            user_id,
            "task-a",
            progress=20,
            current_step=INJECTIONS[3],
            task_name=INJECTIONS[4],
            category="\r\n" * 1000,
        ),
        *(
            completed_event(user_id, f"task-{n}", status="FAILURE", error_message=text)
            for n, text in enumerate(INJECTIONS)
        ),
        completed_event(user_id, "task-result", status="SUCCESS", result_data=result_data),
        completed_event(
            user_id,
            "task-both",
            status="REVOKED",
            result_data={"why": INJECTIONS[0]},
            error_message=INJECTIONS[2],
        ),
    ]
    response = await client.get(f"/sse/tasks/?token={token}")
    try:
        assert response.status == 200
        reader = SseReader(response)
        assert (await reader.next()).json["type"] == "active_tasks"
        async with client.ws_connect(f"/ws/tasks/?token={token}") as ws:
            assert (await ws_json(ws))["type"] == "active_tasks"
            broker = client.app[BROKER]
            expected = []
            for event in events:
                event_id = await broker.publish(event)
                expected.append(
                    {"id": str(event_id), "type": event.type, "task_id": event.task_id}
                    | dict(event.fields)
                )
            sentinel_id = await broker.publish(progress_event(user_id, "sentinel", progress=1))

            received = await read_until_sentinel(reader)
            assert [e.json for e in received[:-1]] == expected
            assert [e.id for e in received] == [m["id"] for m in expected] + [str(sentinel_id)]
            assert [e.event for e in received[:-1]] == [m["type"] for m in expected]
            assert all(len(e.data) == 1 for e in received)
            # SseReader splits at LF only; a bare CR would also end a line for a browser.
            assert not any("\r" in line for line in reader.raw_lines)

            over_ws = [await ws_json(ws) for _ in range(len(expected) + 1)]
            assert over_ws[:-1] == expected
            assert over_ws[-1]["task_id"] == "sentinel"
    finally:
        response.close()
    assert expected[-2]["result_data"] == result_data
    assert [m.get("error_message") for m in expected[2:7]] == INJECTIONS
    assert server_errors() == []


REFUSED_TIMESTAMPS = [
    "2026-01-01T00:00:00Z\r\nevent: forged",
    "2026-01-01T00:00:00Z\n",
    "2026-01-01T00:00:00\r",
    "\n2026-01-01T00:00:00Z",
    "2026-01-01T00:00:00\x00\r\nevent: forged",
    "2026-01-01T00:00:00Z\u2028data: x",
    "data: {}\r\n\r\n",
    # datetime.fromisoformat alone accepts these (any character between date and time,
    # a trailing NUL after an offset): the service must not.
    "2026-01-01\n12:00:00",
    "2026-01-01\r12:00:00Z",
    "2026-01-01\x0012:00",
    "2026-01-01\u202812:00",
    "2026-01-01T00:00:00Z\x00",
]


@pytest.mark.parametrize("timestamp", REFUSED_TIMESTAMPS)
async def test_line_breaks_in_estimated_completion_are_refused(
    client: TestClient,  # type: ignore[type-arg]
    token_for: TokenFor,
    user_id: str,
    timestamp: str,
) -> None:
    with pytest.raises(EventError, match="estimated_completion"):
        progress_event(user_id, "task", progress=1, estimated_completion=timestamp)
    response = await client.post(
        "/api/tasks/events",
        json={"user_id": user_id, "task_id": "task", "estimated_completion": timestamp},
        headers={"X-API-Key": PUBLISH_KEY},
    )
    assert response.status == 422
    assert (await response.json())["code"] == "invalid_event"
    # Nothing was stored: the user has no tasks.
    assert (await client.app[BROKER].snapshot(user_id)).tasks == []


# --- Lone UTF-16 surrogates ------------------------------------------------------------
# JSON can carry "\ud800"; no UTF-8 output can encode it. Accepted, it used to raise
# UnicodeEncodeError inside the handlers (connection dropped with 1006, traceback), and a
# stored task state with one broke every later connection of that user at the snapshot.


@pytest.mark.parametrize("kind", ["get_task_status", "cancel_task"])
async def test_lone_surrogate_task_id_in_a_command_gets_an_error(
    client: TestClient,  # type: ignore[type-arg]
    token_for: TokenFor,
    user_id: str,
    server_errors: ServerErrors,
    kind: str,
) -> None:
    async with client.ws_connect(f"/ws/tasks/?token={token_for(user_id)}") as ws:
        await ws_json(ws)
        await ws.send_str('{"type": "' + kind + '", "task_id": "\\ud800"}')
        error = await ws_json(ws)
        assert error["type"] == "error" and error["code"] == "invalid_task_id"
        await ws.send_json({"type": "ping"})
        assert await ws_json(ws) == {"type": "pong"}
    assert server_errors() == []


SURROGATE_FIELDS = ["user_id", "task_id", "current_step", "task_name", "category"]


def build_event(field: str, value: Any) -> TaskEvent:
    """An event with `value` in `field` (an id, a progress text, or a completion field)."""
    ids = {"user_id": "user-1", "task_id": "task-1"}
    if field in ids:
        return progress_event(**(ids | {field: value}), progress=1)
    if field == "error_message":
        return completed_event(**ids, status="FAILURE", error_message=value)
    if field == "result_data":
        return completed_event(**ids, result_data=value)
    return progress_event(**ids, progress=1, **{field: value})


@settings(max_examples=300, deadline=None)
@given(
    field=st.sampled_from([*SURROGATE_FIELDS, "error_message", "result_data"]),
    prefix=st.text(max_size=5),
    surrogate=st.characters(categories=["Cs"]),
    suffix=st.text(max_size=5),
    where=st.sampled_from(["key", "value", "nested"]),
)
def test_lone_surrogates_are_refused_in_every_event_field(
    field: str, prefix: str, surrogate: str, suffix: str, where: str
) -> None:
    text = prefix + surrogate + suffix
    value: Any = text
    if field == "result_data":
        value = {"key": {text: 1}, "value": {"k": text}, "nested": {"a": [{"b": text}]}}[where]
    with pytest.raises(EventError):
        build_event(field, value)


@pytest.mark.parametrize(
    "override",
    [
        *({field: "x\ud800"} for field in SURROGATE_FIELDS),
        {"status": "FAILURE", "error_message": "\udfff"},
        {"status": "SUCCESS", "result_data": {"k": "\ud800"}},
        {"status": "SUCCESS", "result_data": {"\ud800": 1}},
        {"status": "SUCCESS", "result_data": {"a": [{"b": "\udc00x"}]}},
    ],
    ids=[*SURROGATE_FIELDS, "error_message", "result_data-value", "result_data-key", "nested"],
)
async def test_lone_surrogate_in_a_published_event_is_refused(
    client: TestClient,  # type: ignore[type-arg]
    token_for: TokenFor,
    user_id: str,
    server_errors: ServerErrors,
    override: dict[str, Any],
) -> None:
    body = json.dumps({"user_id": user_id, "task_id": "t"} | override)
    assert "\\ud" in body  # sent as a JSON escape, as any client can
    token = token_for(user_id)
    async with client.ws_connect(f"/ws/tasks/?token={token}") as live:
        await ws_json(live)
        response = await client.post(
            "/api/tasks/events",
            data=body,
            headers={"X-API-Key": PUBLISH_KEY, "Content-Type": "application/json"},
        )
        assert response.status == 422
        assert (await response.json())["code"] == "invalid_event"
        # The live connection got nothing and still answers.
        await live.send_json({"type": "ping"})
        assert await ws_json(live) == {"type": "pong"}
    assert (await client.app[BROKER].snapshot(user_id)).tasks == []
    await assert_still_serving(client, token)
    assert server_errors() == []
