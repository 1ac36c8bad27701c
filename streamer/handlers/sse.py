"""GET /sse/tasks/: the Server-Sent Events transport.

A chunked `text/event-stream` response. Events are written as pre-encoded chunks
(see `streamer.wire`), the same bytes for every client; the heartbeat comment comes
from one timer of the hub for every stream, so a stream costs no task of its own
beyond its request handler.
"""

from __future__ import annotations

import asyncio
import functools
import logging

from aiohttp import HttpVersion11, web

from .. import wire
from ..access_log import STREAMED_BYTES
from ..app_keys import BROKER, CONFIG, HUB
from ..auth.origin import cors_headers
from ..opening import send_opening
from ..reasons import Reason, Refused
from .admission import admit, connection_for, open_stream
from .common import heartbeat_events, json_error, worker_header

log = logging.getLogger(__name__)

# How each refusal reaches an SSE client: a status, and a Retry-After where retrying helps.
REFUSALS: dict[Reason, tuple[int, str | None]] = {
    Reason.ORIGIN_NOT_ALLOWED: (403, None),
    Reason.INVALID_TASK_ID: (400, None),
    Reason.UNAUTHORIZED: (401, None),
    Reason.TOO_MANY_CONNECTIONS: (429, "5"),
    Reason.TOO_MANY_OPENINGS: (429, None),  # its Retry-After comes with the refusal
    Reason.BROKER_UNAVAILABLE: (503, "1"),
    Reason.AUTH_UNAVAILABLE: (503, "1"),
    Reason.SHUTTING_DOWN: (503, "1"),
}
SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # nginx: pass each event on at once
}
END_TIMEOUT_S = 2.0


async def sse_handler(request: web.Request) -> web.StreamResponse:
    config = request.app[CONFIG]
    cors = cors_headers(request, config.allowed_origins)
    try:
        heartbeat_event = heartbeat_events(request)  # else comments, as SPEC says
    except web.HTTPBadRequest as refused:
        refused.headers.update(cors)
        raise
    try:
        admission = await admit(request, last_event_header=True)
    except Refused as refusal:
        return refusal_response(refusal, cors)
    if request.method == "HEAD":
        headers = SSE_HEADERS | worker_header() | cors
        return await answer_head(request, admission.identity.user_id, headers, cors)
    socket = request.transport
    if socket is None:  # the client is gone already
        return web.Response(status=400)
    # HTTP/1.0 has no chunked coding (nginx talks it to upstreams by default): the
    # stream is the body until the connection closes.
    chunked = request.version >= HttpVersion11
    out = socket if chunked else Unchunked(socket)
    connection = connection_for(request, admission, "sse", _close_transport, out=out)
    if heartbeat_event:
        connection.heartbeat = wire.sse_heartbeat_event(config.heartbeat_s)
    last_event_id = admission.last_event_id
    del admission  # nothing of it is needed for the length of the stream
    try:
        opening = await open_stream(
            request,
            connection,
            last_event_id=last_event_id,
            encode_snapshot=functools.partial(_snapshot_chunk, config.sse_retry_ms),
        )
    except Refused as refusal:
        return refusal_response(refusal, cors)
    hub = request.app[HUB]
    response = web.StreamResponse(headers=SSE_HEADERS | worker_header() | cors)
    try:
        if chunked:
            response.enable_chunked_encoding()
        await response.prepare(request)
        # Sent: kept for the stream's life they cost it about 0.7 KiB (the multidict
        # keeps what writing them made of each name).
        response.headers.clear()
        hub.replayed += await send_opening(request.app[BROKER], connection, opening)
        del opening  # written: not kept for the length of the stream
        if heartbeat_event:
            connection.write_idle(connection.heartbeat)  # the page learns the interval now
        reason = await connection.ended()
        await _end(request, response, reason)
        return response
    finally:
        hub.detach(connection, connection.close_reason or Reason.CLIENT_CLOSED)
        written = out.written if isinstance(out, Unchunked) else connection.bytes_out
        response[STREAMED_BYTES] = request.writer.output_size + written  # with the head


async def answer_head(
    request: web.Request, user_id: str, headers: dict[str, str], cors: dict[str, str]
) -> web.StreamResponse:
    """HEAD on a stream endpoint (SSE, long poll): what a GET would be answered now, as
    far as origin, credentials and connection limits go (`headers` when it would be
    served), without opening a stream: no turn is taken and nothing is read from the
    broker (a client checks with it why its stream failed)."""
    try:
        request.app[HUB].check_admissible(user_id)
    except Refused as refusal:
        return refusal_response(refusal, cors)
    response = web.StreamResponse(headers=headers)
    await response.prepare(request)
    return response


def _snapshot_chunk(retry_ms: int, message: str, position: wire.EventId) -> bytes:
    return wire.sse_chunk(
        message.encode(), event_id=str(position), event="active_tasks", retry_ms=retry_ms
    )


class Unchunked(asyncio.Transport):
    """An HTTP/1.0 client's socket: what the hub writes (the same chunks as for every
    stream) goes out without the chunk framing."""

    def __init__(self, socket: asyncio.Transport) -> None:
        super().__init__()
        self._socket = socket
        self.written = 0  # bytes, as they go out

    def write(self, data: bytes | bytearray | memoryview) -> None:
        unchunked = wire.unchunked(bytes(data))
        self._socket.write(unchunked)
        self.written += len(unchunked)

    def is_closing(self) -> bool:
        return self._socket.is_closing()

    def get_write_buffer_size(self) -> int:
        return self._socket.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._socket.get_write_buffer_limits()


def refusal_response(refusal: Refused, cors: dict[str, str]) -> web.Response:
    status, retry_after = REFUSALS[refusal.reason]
    if refusal.retry_after_s is not None:
        retry_after = str(refusal.retry_after_s)
    response = json_error(status, refusal.reason.value, refusal.message)
    response.headers.update(cors)
    if retry_after is not None:
        response.headers["Retry-After"] = retry_after
    if refusal.reason is Reason.UNAUTHORIZED:
        response.headers["WWW-Authenticate"] = 'Bearer realm="streamer"'
    return response


def _close_transport(reason: Reason, backed_up: bool) -> None:
    """The handler ends the stream (it is waiting on the connection for that)."""
    return None


async def _end(request: web.Request, response: web.StreamResponse, reason: Reason) -> None:
    """End the stream; a socket whose writes are backed up is aborted instead, since the
    end of the stream would never get through."""
    transport = request.transport
    response.force_close()  # the client reconnects (and resumes) on a new connection
    if transport is None:
        return
    if reason is Reason.STALLED or transport.get_write_buffer_size() > 0:
        transport.abort()
        return
    try:
        await asyncio.wait_for(response.write_eof(), END_TIMEOUT_S)
    except (TimeoutError, ConnectionError, RuntimeError):
        transport.abort()


async def sse_preflight(request: web.Request) -> web.Response:
    """CORS preflight for fetch-based SSE clients that send Authorization."""
    allowed = request.app[CONFIG].allowed_origins
    cors = cors_headers(request, allowed)
    if not cors:
        return json_error(403, "origin_not_allowed", "this origin may not read the stream")
    cors |= {
        "Access-Control-Allow-Methods": "GET",
        "Access-Control-Allow-Headers": "Authorization, Last-Event-ID, Cache-Control",
        "Access-Control-Max-Age": "600",
    }
    return web.Response(status=204, headers=cors)
