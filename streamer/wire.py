"""Everything that goes on the wire: event ids, deliveries with their pre-encoded frames,
and every server-to-client message.

An event is encoded once, when it arrives: its WebSocket text frame (server frames are
unmasked, so without compression the bytes are the same for every client) and its SSE
block (`id:`, `event:`, `data:`, framed as one HTTP/1.1 chunk), and its long-poll item
(the id and the event JSON on one line, see `poll_item`), each built on first use and
shared by every connection that gets it.
"""

from __future__ import annotations

import functools
import json
import re
import struct
from typing import Any, Literal

from .events import dumps

Transport = Literal["websocket", "sse", "poll"]

_MAX_STREAM_PART = 2**64 - 1
_EVENT_ID = re.compile(r"^([0-9a-f]{8,32})-([0-9]{1,20})-([0-9]{1,20})$")


class EventId:
    """`<epoch>-<ms>-<seq>`: a position in one user's history. The epoch changes when
    the broker lost its data; ids compare by position only."""

    __slots__ = ("epoch", "key", "ms", "seq")

    def __init__(self, epoch: str, ms: int, seq: int) -> None:
        self.epoch = epoch
        self.ms = ms
        self.seq = seq
        self.key = (ms << 64) | seq  # one int: cheap to compare per connection per event

    @classmethod
    def parse(cls, raw: str) -> EventId | None:
        match = _EVENT_ID.match(raw.strip()) if len(raw) <= 80 else None
        if match is None:
            return None
        ms, seq = int(match.group(2)), int(match.group(3))
        if ms > _MAX_STREAM_PART or seq > _MAX_STREAM_PART:
            return None  # not a Redis stream id: unknown
        return cls(match.group(1), ms, seq)

    @property
    def stream_id(self) -> str:
        return f"{self.ms}-{self.seq}"

    def __str__(self) -> str:
        return f"{self.epoch}-{self.ms}-{self.seq}"

    def __repr__(self) -> str:
        return f"EventId({self})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, EventId) and self.key == other.key

    def __hash__(self) -> int:
        return hash(self.key)

    def __lt__(self, other: EventId) -> bool:
        return self.key < other.key

    def __le__(self, other: EventId) -> bool:
        return self.key <= other.key

    def __gt__(self, other: EventId) -> bool:
        return self.key > other.key

    def __ge__(self, other: EventId) -> bool:
        return self.key >= other.key


# --- frames ------------------------------------------------------------------------------


def ws_text_frame(payload: bytes) -> bytes:
    """One unmasked, uncompressed, final RFC 6455 text frame."""
    length = len(payload)
    if length < 126:
        return bytes((0x81, length)) + payload
    if length < 1 << 16:
        return struct.pack("!BBH", 0x81, 126, length) + payload
    return struct.pack("!BBQ", 0x81, 127, length) + payload


WS_PING = b"\x89\x00"  # a final ping frame, no payload


def ws_pong_frame(payload: bytes) -> bytes:
    return bytes((0x8A, len(payload))) + payload[:125]


def ws_close_frame(code: int, reason: bytes) -> bytes:
    payload = struct.pack("!H", code) + reason[:123]
    return bytes((0x88, len(payload))) + payload


def sse_chunk(
    data: bytes,
    *,
    event_id: str | None = None,
    event: str | None = None,
    retry_ms: int | None = None,
) -> bytes:
    """One SSE event as one HTTP/1.1 chunk. `data` is one line (our JSON escapes line
    breaks), `event_id` and `event` are ids and type names: no line breaks either."""
    block = b""
    if event_id is not None:
        block += b"id: " + event_id.encode() + b"\n"
    if event is not None:
        block += b"event: " + event.encode() + b"\n"
    if retry_ms is not None:
        block += b"retry: %d\n" % retry_ms
    block += b"data: " + data + b"\n\n"
    return chunk(block)


def chunk(body: bytes) -> bytes:
    """HTTP/1.1 chunked transfer coding of one piece of a response body."""
    return b"%x\r\n%b\r\n" % (len(body), body)


def unchunked(data: bytes) -> bytes:
    """The body pieces of well-formed chunks (ours), without their framing: for an
    HTTP/1.0 client, whose response body runs until the connection closes."""
    pieces = []
    at = 0
    while at < len(data):
        size_end = data.index(b"\r\n", at)
        size = int(data[at:size_end], 16)
        start = size_end + 2
        pieces.append(data[start : start + size])
        at = start + size + 2
    return b"".join(pieces)


SSE_HEARTBEAT = chunk(b": ping\n\n")


def _heartbeat_message(interval_s: float) -> bytes:
    return json.dumps(
        {"type": "heartbeat", "interval_s": interval_s}, separators=(",", ":")
    ).encode()


@functools.lru_cache(maxsize=4)
def sse_heartbeat_event(interval_s: float) -> bytes:
    """The heartbeat as an event, for streams that ask for it (`?heartbeat=event`):
    EventSource shows a page no comment, so only an event lets it tell a dead stream
    from a quiet one, and the interval how long a silence may last. No `id:`, so the
    resume point stays where it is."""
    return sse_chunk(_heartbeat_message(interval_s), event="heartbeat")


@functools.lru_cache(maxsize=4)
def ws_heartbeat_frames(interval_s: float) -> bytes:
    """The ping round's ping, and for WebSockets that ask for it (`?heartbeat=event`) a
    heartbeat message after it: a page sees no ping, and sends none of its own."""
    return WS_PING + ws_text_frame(_heartbeat_message(interval_s))


END_OF_CHUNKED_BODY = b"0\r\n\r\n"


def poll_item(data: bytes, event_id: str) -> bytes:
    """A message as a long-poll connection collects it: `<id> <json>\n`. Ids and our
    JSON have no spaces or line breaks in the way: the answer's body is assembled from
    such lines (`poll_body`) without decoding any event."""
    return event_id.encode() + b" " + data + b"\n"


def poll_body(
    collected: bytes, last_event_id: str | None, *, at_least: EventId | None = None
) -> tuple[bytes, str | None]:
    """The JSON answer of a long poll from collected `poll_item` lines, and its
    `last_event_id`: the id of the last message in it, or `last_event_id` if none; at
    least `at_least` (where a replay ended, its last messages left out by a task filter)."""
    items: list[bytes] = []
    for line in collected.split(b"\n"):
        if line:
            event_id, _, data = line.partition(b" ")
            items.append(data)
            last_event_id = event_id.decode()
    if at_least is not None:
        last = None if last_event_id is None else EventId.parse(last_event_id)
        if last is None or last < at_least:
            last_event_id = str(at_least)
    body = (
        b'{"events":['
        + b",".join(items)
        + b'],"last_event_id":'
        + json.dumps(last_event_id).encode()
        + b"}"
    )
    return body, last_event_id


def encode(message: str, transport: Transport, event_id: EventId, event: str) -> bytes:
    """A message with an id (a snapshot) for one transport."""
    data = message.encode()
    if transport == "websocket":
        return ws_text_frame(data)
    if transport == "poll":
        return poll_item(data, str(event_id))
    return sse_chunk(data, event_id=str(event_id), event=event)


# --- deliveries --------------------------------------------------------------------------


class Delivery:
    """An event ready to send: its JSON (with `id`) once, and each transport's frame
    built on first use, shared by every connection that gets it."""

    __slots__ = ("_poll", "_sse", "_ws", "event_id", "json", "task_id", "type", "user_id")

    def __init__(
        self, user_id: str, task_id: str, event_id: EventId, type: str, json: bytes
    ) -> None:
        self.user_id = user_id
        self.task_id = task_id
        self.event_id = event_id
        self.type = type
        self.json = json
        self._ws: bytes | None = None
        self._sse: bytes | None = None
        self._poll: bytes | None = None

    @property
    def ws_frame(self) -> bytes:
        if self._ws is None:
            self._ws = ws_text_frame(self.json)
        return self._ws

    @property
    def sse_chunk(self) -> bytes:
        if self._sse is None:
            self._sse = sse_chunk(self.json, event_id=str(self.event_id), event=self.type)
        return self._sse

    @property
    def poll_item(self) -> bytes:
        if self._poll is None:
            self._poll = poll_item(self.json, str(self.event_id))
        return self._poll

    def frame(self, transport: Transport) -> bytes:
        if transport == "websocket":
            return self.ws_frame
        return self.sse_chunk if transport == "sse" else self.poll_item


def with_id(event_json: str | bytes, event_id: EventId) -> bytes:
    """The stored event JSON (without id) with `"id"` first, without decoding it."""
    if isinstance(event_json, str):
        event_json = event_json.encode()
    return b'{"id":"' + str(event_id).encode() + b'",' + event_json[1:]


class UndecodableEvent(ValueError):
    """A stored event that cannot be read back; it is skipped, never retried."""


def stored_event(user_id: str, event_id: EventId, event_json: str) -> Delivery:
    """A Delivery from the stored event (without id) of a history entry."""
    try:
        decoded = json.loads(event_json)
        task_id, event_type = decoded["task_id"], decoded["type"]
    except (ValueError, RecursionError, KeyError, TypeError) as exc:
        raise UndecodableEvent(f"event {event_id} of user {user_id!r}: {exc!r:.200}") from None
    if not isinstance(task_id, str) or not isinstance(event_type, str):
        raise UndecodableEvent(f"event {event_id} of user {user_id!r}: no task_id or type")
    if not event_json.startswith("{") or "\n" in event_json or "\r" in event_json:
        event_json = dumps(decoded)  # laid out over lines: one line, as SSE needs
    return Delivery(user_id, task_id, event_id, event_type, with_id(event_json, event_id))


# --- server-to-client messages -----------------------------------------------------------


def active_tasks(
    tasks: list[dict[str, Any]], *, position: EventId, recovered: bool, truncated: bool
) -> str:
    """`active_tasks`, whose `id` is where the client stands once it has it: resuming
    from there misses nothing and repeats nothing."""
    return dumps(
        {
            "type": "active_tasks",
            "id": str(position),
            "tasks": tasks,
            "recovered": recovered,
            "truncated": truncated,
        }
    )


def task_status(task_id: str, state: dict[str, Any] | None) -> str:
    return dumps({"type": "task_status", "task_id": task_id, "status": state})


def task_cancelled(task_id: str, success: bool) -> str:
    return dumps({"type": "task_cancelled", "task_id": task_id, "success": success})


def error(code: str, message: str) -> str:
    return dumps({"type": "error", "code": code, "message": message})


PONG = dumps({"type": "pong"})
