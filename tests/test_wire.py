"""What goes on the wire, byte for byte, and that it is built once per event."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
from aiohttp.test_utils import TestClient

from streamer import wire
from streamer.app_keys import BROKER
from streamer.broker.redis_schema import decode_message
from streamer.events import progress_event
from streamer.wire import Delivery, EventId

from .clients import SseReader, ws_json

TokenFor = Callable[..., str]

EVENT_JSON = (
    b'{"id":"abcdef01-1700000000000-3","type":"task_progress","task_id":"t","status":"PROGRESS"}'
)


def golden_delivery() -> Delivery:
    event_id = EventId("abcdef01", 1700000000000, 3)
    return Delivery("u", "t", event_id, "task_progress", EVENT_JSON)


def test_websocket_frame_bytes() -> None:
    """One final, unmasked text frame (FIN + opcode 1 = 0x81), 7-bit length."""
    assert golden_delivery().ws_frame == bytes([0x81, len(EVENT_JSON)]) + EVENT_JSON
    assert len(EVENT_JSON) < 126
    # 16-bit and 64-bit lengths
    medium, large = b"x" * 300, b"y" * 70_000
    assert wire.ws_text_frame(medium) == b"\x81\x7e\x01\x2c" + medium
    assert wire.ws_text_frame(large) == b"\x81\x7f" + (70_000).to_bytes(8, "big") + large


def test_sse_event_bytes() -> None:
    """One SSE event (`id:`, `event:`, one `data:` line, blank line) as one HTTP chunk."""
    block = b"id: abcdef01-1700000000000-3\nevent: task_progress\ndata: " + EVENT_JSON + b"\n\n"
    assert golden_delivery().sse_chunk == b"%x\r\n" % len(block) + block + b"\r\n"
    assert wire.SSE_HEARTBEAT == b"8\r\n: ping\n\n\r\n"
    # An HTTP/1.0 stream has no chunks: the same bytes, without their framing.
    both = golden_delivery().sse_chunk + wire.SSE_HEARTBEAT
    assert wire.unchunked(both) == block + b": ping\n\n"
    assert wire.unchunked(wire.chunk(b"x" * 300)) == b"x" * 300  # a length of 3 digits


def test_a_channel_message_gets_its_id_put_first_in_its_stored_json() -> None:
    stored = EVENT_JSON.replace(b'"id":"abcdef01-1700000000000-3",', b"")
    header = b"u\nt\nabcdef01-1700000000000-3\ntask_progress\n"
    delivery = decode_message(header + stored)
    assert delivery is not None and delivery.json == EVENT_JSON
    assert (delivery.user_id, delivery.task_id, delivery.type) == ("u", "t", "task_progress")
    assert delivery.event_id == golden_delivery().event_id
    # Publishers of earlier versions sent the JSON with its id already in.
    earlier = decode_message(header + EVENT_JSON)
    assert earlier is not None and earlier.json == EVENT_JSON
    for malformed in (header + b"[]", header, b"u\nt\nnot-an-id\ntask_progress\n" + stored):
        assert decode_message(malformed) is None, malformed


def test_a_stored_event_laid_out_over_lines_becomes_one_line() -> None:
    """An entry written by other means than the publishers (pretty-printed JSON) would
    break SSE framing and the long-poll body: it is put on one line."""
    event_id = golden_delivery().event_id
    compact = EVENT_JSON.replace(b'"id":"abcdef01-1700000000000-3",', b"").decode()
    laid_out = json.dumps(json.loads(compact), indent=2)
    for text in (compact, laid_out, "  " + compact, compact.replace(",", ",\r")):
        assert wire.stored_event("u", event_id, text).json == EVENT_JSON, text


def test_ids_compare_by_position_and_round_trip() -> None:
    a, b = EventId("abcdef01", 5, 0), EventId("abcdef01", 5, 1)
    assert a < b and b > a and a <= a and a == EventId("abcdef01", 5, 0)
    assert EventId.parse(str(b)) == b and str(EventId.parse(str(b))) == str(b)
    for bad in ("", "x-1-2", "abcdef01-1", "abcdef01-1-" + "9" * 21, "ABCDEF01-1-2"):
        assert EventId.parse(bad) is None


@pytest.mark.parametrize("transport", ["websocket", "sse"])
async def test_an_event_is_encoded_once_for_a_hundred_connections(
    client: TestClient,  # type: ignore[type-arg]
    token_for: TokenFor,
    user_id: str,
    transport: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    builds: list[bytes] = []
    encoder = "ws_text_frame" if transport == "websocket" else "sse_chunk"
    real = getattr(wire, encoder)

    def counting(data: bytes, **kwargs: object) -> bytes:
        builds.append(data)
        return real(data, **kwargs)  # type: ignore[no-any-return]

    monkeypatch.setattr(wire, encoder, counting)
    token = token_for(user_id)
    sockets, readers = [], []
    try:
        for _ in range(100):
            if transport == "websocket":
                ws = await client.ws_connect(f"/ws/tasks/?token={token}")
                await ws_json(ws)
                sockets.append(ws)
            else:
                reader = SseReader(await client.get(f"/sse/tasks/?token={token}"))
                await reader.next()
                readers.append(reader)
        event_id = str(await client.app[BROKER].publish(progress_event(user_id, "t", progress=7)))
        received = [(await ws_json(ws))["id"] for ws in sockets]
        received += [(await reader.next()).json["id"] for reader in readers]
    finally:
        for ws in sockets:
            await ws.close()
        for reader in readers:
            reader.response.close()
    assert received == [event_id] * 100
    for_the_event = [b for b in builds if event_id.encode() in b and b'"task_progress"' in b]
    assert len(for_the_event) == 1, f"encoded {len(for_the_event)} times"
    assert json.loads(for_the_event[0])["progress"] == 7
