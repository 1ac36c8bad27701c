"""Small test clients: read SSE streams and WebSocket messages with bounded waits."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp.test_utils import TestClient

from streamer.wire import EventId

WAIT_S = 10.0


@dataclass
class SseEvent:
    event: str | None = None
    id: str | None = None
    data: list[str] = field(default_factory=list)
    retry: int | None = None

    @property
    def json(self) -> dict[str, Any]:
        decoded: dict[str, Any] = json.loads("\n".join(self.data))
        return decoded


class SseReader:
    """Parses a text/event-stream body per the HTML spec; comments are counted."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self.comments: list[str] = []
        self.raw_lines: list[str] = []

    async def next(self, timeout: float = WAIT_S) -> SseEvent:
        """The next event; comment-only blocks (heartbeats) are recorded and skipped."""

        async def read() -> SseEvent:
            while (event := await self._block()) is None:
                pass
            return event

        return await asyncio.wait_for(read(), timeout)

    async def _block(self) -> SseEvent | None:
        """Read up to the next blank line; None when the block held only comments."""
        event = SseEvent()
        while True:
            raw = await self.response.content.readline()
            if not raw:
                raise EOFError("SSE stream ended")
            line = raw.decode().rstrip("\r\n")
            self.raw_lines.append(line)
            if line == "":
                if event.data or event.event or event.id or event.retry is not None:
                    return event
                return None
            if line.startswith(":"):
                self.comments.append(line)
                continue
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "data":
                event.data.append(value)
            elif name == "event":
                event.event = value
            elif name == "id":
                event.id = value
            elif name == "retry":
                event.retry = int(value)
            else:
                raise AssertionError(f"unexpected SSE field {name!r} in line {line!r}")

    async def messages(self, count: int, timeout: float = WAIT_S) -> list[dict[str, Any]]:
        return [(await self.next(timeout)).json for _ in range(count)]

    async def wait_for_comment(self, timeout: float = WAIT_S) -> str:
        async def read() -> str:
            before = len(self.comments)
            while len(self.comments) == before:
                if await self._block() is not None:
                    raise AssertionError("expected a heartbeat comment, got an event")
            return self.comments[-1]

        return await asyncio.wait_for(read(), timeout)


async def ws_json(ws: aiohttp.ClientWebSocketResponse, timeout: float = WAIT_S) -> dict[str, Any]:
    message = await ws.receive(timeout=timeout)
    if message.type != aiohttp.WSMsgType.TEXT:
        raise AssertionError(f"expected a text frame, got {message.type!r} {message.data!r}")
    decoded: dict[str, Any] = json.loads(message.data)
    return decoded


async def ws_messages(
    ws: aiohttp.ClientWebSocketResponse, count: int, timeout: float = WAIT_S
) -> list[dict[str, Any]]:
    return [await ws_json(ws, timeout) for _ in range(count)]


async def ws_close_code(ws: aiohttp.ClientWebSocketResponse, timeout: float = WAIT_S) -> int:
    """Read until the server closes; return its close code."""

    async def read() -> int:
        while True:
            message = await ws.receive()
            if message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
                code = ws.close_code
                assert code is not None
                return code
            if message.type == aiohttp.WSMsgType.ERROR:
                raise AssertionError(f"websocket error: {message.data!r}")

    return await asyncio.wait_for(read(), timeout)


# --- Either transport ------------------------------------------------------------------

TRANSPORTS = ["websocket", "sse"]


@dataclass
class Received:
    type: str
    id: str
    message: dict[str, Any]


class Stream:
    """One connection of either transport; every message comes with the id it carries
    (on SSE the `id:` field, which must equal the JSON's `id`)."""

    def __init__(self, next_message: Callable[[], Any]) -> None:
        self._next = next_message
        self.ids: list[str] = []

    async def next(self) -> Received:
        received: Received = await self._next()
        assert received.id, f"{received.type} carries no id: {received.message}"
        self.ids.append(received.id)
        return received


@asynccontextmanager
async def open_stream(
    client: TestClient | aiohttp.ClientSession,  # type: ignore[type-arg]
    transport: str,
    token: str,
    last_event_id: str | None = None,
    task_id: str | None = None,
) -> AsyncIterator[Stream]:
    """A stream of the in-process test app, or of a real server through a session
    made with `base_url`."""
    params = {"token": token}
    if task_id is not None:
        params["task_id"] = task_id
    if last_event_id is not None:
        params["last_event_id"] = last_event_id
    if transport == "websocket":
        async with client.ws_connect("/ws/tasks/", params=params) as ws:

            async def next_ws() -> Received:
                message = await ws_json(ws)
                return Received(message["type"], message.get("id", ""), message)

            yield Stream(next_ws)
        return
    response = await client.get("/sse/tasks/", params=params)
    assert response.status == 200
    reader = SseReader(response)

    async def next_sse() -> Received:
        event = await reader.next()
        message = event.json
        assert event.event == message["type"]
        assert event.id == message.get("id"), "the SSE id: field and the JSON id differ"
        return Received(message["type"], event.id or "", message)

    try:
        yield Stream(next_sse)
    finally:
        response.close()


def order(event_id: str) -> tuple[int, int]:
    parsed = EventId.parse(event_id)
    assert parsed is not None, event_id
    return parsed.ms, parsed.seq


def assert_strictly_increasing(ids: list[str]) -> None:
    keys = [order(i) for i in ids]
    assert keys == sorted(set(keys)), f"ids on one connection must strictly increase: {ids}"
