"""A minimal Server-Sent Events client as an asyncio.Protocol: one GET, the response
body de-chunked when it is chunked, and its `data:` lines handed over as they come."""

from __future__ import annotations

import asyncio
import time
from typing import cast

from bench.load.tally import Receiver


class ChunkedDecoder:
    """HTTP/1.1 chunked transfer coding, fed in pieces of any size."""

    def __init__(self) -> None:
        self.pending = b""
        self.left = 0  # bytes of the current chunk still to come
        self.finished = False

    def feed(self, data: bytes) -> bytes:
        data = self.pending + data if self.pending else data
        position, size, body = 0, len(data), []
        while position < size and not self.finished:
            if self.left == 0:
                end = data.find(b"\r\n", position)
                if end < 0:
                    break
                size_line = data[position:end]
                position = end + 2
                if not size_line:
                    continue  # the CRLF that ends a chunk's data
                self.left = int(size_line.split(b";")[0], 16)
                self.finished = self.left == 0
                continue
            taken = min(self.left, size - position)
            body.append(data[position : position + taken])
            position += taken
            self.left -= taken
        self.pending = data[position:]
        return b"".join(body)


class EventStreamClient(asyncio.Protocol):
    def __init__(self, receiver: Receiver, host: str, port: int, path: str) -> None:
        self.receiver = receiver
        self.request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            "Accept: text/event-stream\r\nCache-Control: no-cache\r\n\r\n"
        ).encode()
        self.transport: asyncio.Transport | None = None
        self.head = b""
        self.in_body = False
        self.chunks: ChunkedDecoder | None = None
        self.partial_line = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.receiver.transport = transport
        self.transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        self.receiver.ended(f"connection lost: {exc!r}" if exc else "connection closed")

    def data_received(self, data: bytes) -> None:
        now_ns = time.time_ns()
        if not self.in_body:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            head, data = self.head[:end], self.head[end + 4 :]
            status = head[: head.find(b"\r\n")]
            if b" 200 " not in status + b" ":
                self.receiver.ended(f"refused: {status.decode(errors='replace')}")
                if self.transport is not None:
                    self.transport.close()
                return
            self.in_body = True
            if b"transfer-encoding: chunked" in head.lower():
                self.chunks = ChunkedDecoder()
        if self.chunks is not None:
            data = self.chunks.feed(data)
        self._lines(data, now_ns)

    def _lines(self, data: bytes, now_ns: int) -> None:
        if self.partial_line:
            data = self.partial_line + data
        lines = data.split(b"\n")
        self.partial_line = lines.pop()
        for line in lines:
            if line.startswith(b"data:"):
                self.receiver.message(line, now_ns)
