"""A client that stops reading is cut off at its buffer limit; the others are not slowed."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

from aiohttp.test_utils import TestClient

from streamer.app_keys import BROKER, HUB
from streamer.events import completed_event

from .clients import SseReader, ws_json

TokenFor = Callable[..., str]
PAYLOAD = {"blob": "x" * 32 * 1024}
MAX_EVENTS = 2000


def stalled_websocket(host: str, port: int, token: str) -> socket.socket:
    """Complete a WebSocket handshake, then never read again (tiny receive buffer)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(10)
    sock.connect((host, port))
    sock.sendall(
        (
            f"GET /ws/tasks/?token={token} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        assert chunk, "server closed during the handshake"
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


async def test_slow_client_is_cut_off_and_others_keep_up(
    client: TestClient, token_for: TokenFor, user_id: str
) -> None:
    token = token_for(user_id)
    hub = client.app[HUB]
    broker = client.app[BROKER]
    assert client.host and client.port
    async with client.ws_connect(f"/ws/tasks/?token={token}") as fast_ws:
        fast_sse = SseReader(await client.get(f"/sse/tasks/?token={token}"))
        await ws_json(fast_ws)
        await fast_sse.next()
        stalled = await asyncio.to_thread(stalled_websocket, client.host, client.port, token)
        try:
            assert len(hub) == 3
            sent = 0
            # Publish until the stalled client is gone; each event is read by the
            # fast clients before the next is published.
            while len(hub) == 3:
                assert sent < MAX_EVENTS, "the stalled client was never cut off"
                event_id = str(
                    await broker.publish(completed_event(user_id, f"t{sent}", result_data=PAYLOAD))
                )
                sent += 1
                assert (await ws_json(fast_ws))["id"] == event_id
                assert (await fast_sse.next()).id == event_id
            assert len(hub) == 2
            metrics = await (await client.get("/metrics")).text()
            assert 'streamer_server_disconnects_total{reason="overflow"} 1.0' in metrics
            # The fast clients are still served.
            last = str(await broker.publish(completed_event(user_id, "after")))
            assert (await ws_json(fast_ws))["id"] == last
            assert (await fast_sse.next()).id == last
        finally:
            stalled.close()
