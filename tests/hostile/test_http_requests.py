"""Malformed HTTP on a raw TCP socket against a live server."""

from __future__ import annotations

import asyncio
import socket

import pytest
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.test_utils import TestClient

from ..clients import WAIT_S
from ..conftest import PUBLISH_KEY
from .conftest import THREAD_WAIT_S, ServerErrors, address

# --- Malformed HTTP on a raw TCP socket ------------------------------------------------


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
