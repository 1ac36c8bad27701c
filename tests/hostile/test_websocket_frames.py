"""Malformed WebSocket frames on a raw socket against a live server."""

from __future__ import annotations

import asyncio
import json
import struct

import pytest
from aiohttp.test_utils import TestClient

from ..raw_ws import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_TEXT,
    RawWebSocket,
    frame,
)
from .conftest import THREAD_WAIT_S, ServerErrors, TokenFor, address, assert_still_serving

# --- Malformed WebSocket frames on a raw socket ----------------------------------------

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
