"""A minimal RFC 6455 client as an asyncio.Protocol: the upgrade, unmasked server text
frames parsed in place, pings answered; no extensions, nothing else."""

from __future__ import annotations

import asyncio
import base64
import os
import time
from typing import cast

from bench.load.tally import Receiver

OP_TEXT, OP_CLOSE, OP_PING, OP_PONG = 0x1, 0x8, 0x9, 0xA


def masked_frame(opcode: int, payload: bytes) -> bytes:
    """A client frame (clients must mask); only short control frames are sent."""
    key = os.urandom(4)
    body = bytes(b ^ key[i % 4] for i, b in enumerate(payload[:125]))
    return bytes([0x80 | opcode, 0x80 | len(body)]) + key + body


class WebSocketClient(asyncio.Protocol):
    def __init__(self, receiver: Receiver, host: str, port: int, path: str) -> None:
        self.receiver = receiver
        self.request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
        self.transport: asyncio.Transport | None = None
        self.upgraded = False
        self.buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.receiver.transport = transport
        self.transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        self.receiver.ended(f"connection lost: {exc!r}" if exc else "connection closed")

    def data_received(self, data: bytes) -> None:
        now_ns = time.time_ns()
        if self.buffer:
            data = self.buffer + data
        if not self.upgraded:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                self.buffer = data
                return
            status = data[: data.find(b"\r\n")]
            if not status.startswith(b"HTTP/1.1 101"):
                self.receiver.ended(f"upgrade refused: {status.decode(errors='replace')}")
                self._close()
                return
            self.upgraded = True
            data = data[end + 4 :]
        self.buffer = self._frames(data, now_ns)

    def _frames(self, data: bytes, now_ns: int) -> bytes:
        """Handle every whole frame in `data`; return the incomplete rest."""
        position, size = 0, len(data)
        while size - position >= 2:
            opcode = data[position] & 0x0F
            length = data[position + 1] & 0x7F
            start = position + 2
            if length == 126:
                length = int.from_bytes(data[start : start + 2])
                start += 2
            elif length == 127:
                length = int.from_bytes(data[start : start + 8])
                start += 8
            end = start + length
            if end > size:
                break
            # Server messages here are small: never fragmented, so text frames are whole.
            if opcode == OP_TEXT:
                self.receiver.message(data[start:end], now_ns)
            elif opcode == OP_PING:
                self._send(masked_frame(OP_PONG, data[start:end]))
            elif opcode == OP_CLOSE:
                self.receiver.ended(f"closed by the server: {data[start:end]!r}")
                self._close()
                return b""
            position = end
        return data[position:]

    def _send(self, frame: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame)

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()
