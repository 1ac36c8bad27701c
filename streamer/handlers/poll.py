"""GET /poll/tasks/: the long-polling transport, for proxies that buffer even SSE.

A poll is a short-lived stream: its connection is attached to the hub like any other
(limits, routing by user, the subscription confirmed before the snapshot or the
history is read), gets the snapshot or the replay after `?last_event_id=` first, then
waits for the first live events (a replay longer than a page is answered a page at a
time: the answer's `last_event_id` is where the page ends). What arrived by the end of
that turn of the event loop is answered in one `application/json` body, `{"events":
[...], "last_event_id": ...}`, and the connection is detached. Nothing is lost between
two polls: the next one resumes from `last_event_id` through the history, exactly like
a reconnecting stream.

The connection writes into a `Collector` instead of the socket: each message as a
`<id> <json>` line (`wire.poll_item`), built once per event and shared by every poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import TypeVar

from aiohttp import web

from .. import wire
from ..app_keys import CONFIG, HUB
from ..auth.origin import cors_headers
from ..connection import Connection
from ..reasons import Reason, Refused
from .admission import admit, connection_for, open_stream
from .common import worker_header
from .sse import answer_head, refusal_response, sse_preflight

POLL_HEADERS = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
# After the first events arrived, how many more turns of the event loop the answer
# waits for those that come with them (a burst read from Redis at once).
GATHER_TURNS = 2
R = TypeVar("R", bound=web.StreamResponse)


class Collector(asyncio.Transport):
    """What a poll's connection writes to: the collected lines, in order. Never backed
    up; closing when the client's socket is."""

    def __init__(self, socket: asyncio.BaseTransport) -> None:
        super().__init__()
        self._socket = socket
        self.data = bytearray()
        self.arrived = asyncio.get_running_loop().create_future()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        self.data += data
        if not self.arrived.done():
            self.arrived.set_result(None)

    def is_closing(self) -> bool:
        return self._socket.is_closing()

    def get_write_buffer_size(self) -> int:
        return 0

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (0, 64 * 1024)


async def poll_handler(request: web.Request) -> web.StreamResponse:
    config = request.app[CONFIG]
    hub = request.app[HUB]
    cors = cors_headers(request, config.allowed_origins)
    try:
        admission = await admit(request, last_event_header=False)
    except Refused as refusal:
        return _no_store(refusal_response(refusal, cors))
    if request.method == "HEAD":  # no poll is held, nothing is read
        headers = POLL_HEADERS | {"Content-Type": "application/json"} | worker_header() | cors
        head = await answer_head(request, admission.identity.user_id, headers, cors)
        return head if head.prepared else _no_store(head)  # a refusal
    socket = request.transport
    if socket is None:  # the client is gone already
        return web.Response(status=400)
    collector = Collector(socket)
    connection = connection_for(request, admission, "poll", _close_transport, out=collector)
    resume_point = admission.last_event_id
    recovered: list[bool] = []

    def encode_snapshot(message: str, position: wire.EventId) -> bytes:
        recovered.append(bool(json.loads(message)["recovered"]))
        return wire.poll_item(message.encode(), str(position))

    try:
        opening = await open_stream(
            request, connection, last_event_id=resume_point, encode_snapshot=encode_snapshot
        )
    except Refused as refusal:
        if connection.close_reason is not Reason.SHUTDOWN:
            return _no_store(refusal_response(refusal, cors))
        # Shut down while it opened: answered as held polls are, with nothing, the
        # client where it stood.
        body, _ = wire.poll_body(b"", resume_point, at_least=None)
        return _answer(body, cors)
    position: wire.EventId | None = opening.position
    try:
        frames, more, replayed = opening.frames, opening.more, opening.replayed
        del opening
        if resume_point is not None and recovered == [True]:
            # A resume that is served: only the events after it, not the snapshot.
            frames = frames[1:]
        else:
            resume_point = None  # the snapshot's id is where the client stands now
        if (more or connection.dropped) and not connection.stale:
            # A page of a long replay is the answer (or what the opening has, when
            # more events came meanwhile than wait for it): the next poll goes on.
            if await connection.send_opening_part(frames):
                hub.replayed += replayed
            else:
                position = None  # the client went away
        else:
            sent = connection.go_live(frames)
            if sent:
                hub.replayed += replayed
            if sent or connection.stale:  # stale: a fresh snapshot replaces `frames`
                await _wait(collector, connection, config.poll_timeout_s)
                connection.write_batch()  # what was offered this turn, if anything
            if not sent:
                position = None  # nothing of the opening went out
            elif (passed := connection.passed_through()) is not None:
                # Under a task filter, other tasks' events went by: the next poll starts
                # after them, not where the history may have dropped them meanwhile.
                position = passed if position is None or passed > position else position
    finally:
        hub.detach(connection, connection.close_reason or _how_it_ended(socket))
    # Built after the detach: no event is added to the collector from here on, and
    # `last_event_id` is the id of the last message in the body, or where the opening
    # stands when that is further (a task filter left out the replay's last events).
    body, _ = wire.poll_body(bytes(collector.data), resume_point, at_least=position)
    return _answer(body, cors)


def _answer(body: bytes, cors: dict[str, str]) -> web.Response:
    return web.Response(
        body=body,
        content_type="application/json",
        headers=POLL_HEADERS | worker_header() | cors,
    )


async def _wait(collector: Collector, connection: Connection, timeout_s: float) -> None:
    """Until something was collected (and what comes with it), the connection ended,
    or the timeout."""
    ended = asyncio.ensure_future(connection.ended())
    try:
        await asyncio.wait(
            {collector.arrived, ended}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
        )
        if collector.arrived.done():
            for _ in range(GATHER_TURNS):
                await asyncio.sleep(0)
    finally:
        ended.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ended


def _how_it_ended(socket: asyncio.BaseTransport) -> Reason:
    """A poll is answered, unless its client left first."""
    return Reason.CLIENT_CLOSED if socket.is_closing() else Reason.ANSWERED


def _close_transport(reason: Reason, backed_up: bool) -> None:
    """The handler answers (it is waiting on the connection for that)."""
    return None


def _no_store(response: R) -> R:
    response.headers["Cache-Control"] = "no-store"
    return response


# CORS preflight for pages that send Authorization with their polls: the same as SSE's.
poll_preflight = sse_preflight
