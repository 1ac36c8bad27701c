"""GET /ws/tasks/: the WebSocket transport."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging

from aiohttp import WebSocketError, WSCloseCode, WSMsgType, web

from .. import wire
from ..access_log import STREAMED_BYTES
from ..app_keys import BROKER, CONFIG, HUB
from ..broker.base import BrokerUnavailable
from ..commands import BROKER_UNAVAILABLE, answer, read_command, reply_cost
from ..connection import Connection
from ..opening import send_opening
from ..rate_limit import TokenBucket, command_burst
from ..reasons import Reason, Refused
from .admission import admit, connection_for, open_stream
from .common import heartbeat_events, json_error, worker_header

log = logging.getLogger(__name__)

CLOSE_UNAUTHORIZED = 4401
CLOSE_TOO_SLOW = 4008
CLOSE_TOO_MANY = 4029

# How each reason reaches a WebSocket client: an HTTP status before the upgrade, or a
# close code after it (browsers can read the code, not the status of a failed upgrade).
REFUSED_BEFORE_UPGRADE = {Reason.ORIGIN_NOT_ALLOWED: 403, Reason.INVALID_TASK_ID: 400}
CLOSE_CODES: dict[Reason, tuple[int, bytes]] = {
    Reason.UNAUTHORIZED: (CLOSE_UNAUTHORIZED, b"unauthorized"),
    Reason.BROKER_UNAVAILABLE: (WSCloseCode.TRY_AGAIN_LATER, b"broker unavailable"),
    Reason.AUTH_UNAVAILABLE: (WSCloseCode.TRY_AGAIN_LATER, b"auth service unavailable"),
    Reason.TOO_MANY_CONNECTIONS: (CLOSE_TOO_MANY, b"too many connections"),
    Reason.TOO_MANY_OPENINGS: (CLOSE_TOO_MANY, b"streams opened too fast"),
    Reason.SHUTTING_DOWN: (WSCloseCode.GOING_AWAY, b"server shutting down"),
    Reason.OVERFLOW: (CLOSE_TOO_SLOW, b"too slow: resume from your last event id"),
    Reason.STALLED: (CLOSE_TOO_SLOW, b"too slow: resume from your last event id"),
    Reason.SHUTDOWN: (WSCloseCode.GOING_AWAY, b"server shutting down"),
    Reason.EXPIRED: (CLOSE_UNAUTHORIZED, b"token expired"),
    Reason.RATE_LIMIT: (CLOSE_TOO_MANY, b"too many commands"),
    Reason.UNRESPONSIVE: (WSCloseCode.ABNORMAL_CLOSURE, b"no answer to ping"),
}
# A client that keeps sending past its rate after this many refusals in a row is
# dropped; before that each refused command gets an error reply.
MAX_REFUSED_COMMANDS = 50
UNSUPPORTED_FRAME = wire.error("unsupported_frame", "send commands as JSON text frames")


async def websocket_handler(request: web.Request) -> web.StreamResponse:
    config = request.app[CONFIG]
    # No permessage-deflate: every client gets the same pre-encoded frame bytes. Pings
    # come from the hub's clock for every client at once (no timer per connection), so
    # pings and pongs are handled here rather than by aiohttp.
    # + 1: aiohttp refuses a message of max_msg_size bytes; our limit is the largest
    # message a client may send.
    ws = web.WebSocketResponse(
        max_msg_size=config.ws_max_message_bytes + 1, compress=False, autoping=False
    )
    ws.headers.update(worker_header())
    if not ws.can_prepare(request).ok:
        raise web.HTTPBadRequest(text="expected a WebSocket upgrade\n")
    heartbeat_event = heartbeat_events(request)  # else pings only
    try:
        admission = await admit(request, last_event_header=False)
    except Refused as refusal:
        status = REFUSED_BEFORE_UPGRADE.get(refusal.reason)
        if refusal.reason is Reason.UNAUTHORIZED and config.ws_refuse_at_handshake:
            status = 403  # what Channels clients expect; browsers cannot read it
        if status is not None:
            return json_error(status, refusal.reason.value, refusal.message)
        log.info("websocket refused: %s", refusal.message)
        return await _refuse(request, ws, refusal.reason)
    if not await _upgrade(request, ws):
        return web.Response(status=400)  # the client is gone: never sent
    _shed_http_state(request, ws)
    transport = request.transport
    assert transport is not None
    connection = connection_for(
        request,
        admission,
        "websocket",
        functools.partial(_close, ws, transport, cut_off_after_s=config.send_timeout_s),
    )
    if heartbeat_event:
        connection.heartbeat = wire.ws_heartbeat_frames(config.ws_heartbeat_s)
    last_event_id = admission.last_event_id
    del admission  # nothing of it is needed for the length of the stream
    try:
        opening = await open_stream(
            request, connection, last_event_id=last_event_id, encode_snapshot=_snapshot_frame
        )
    except Refused as refusal:
        if connection.closing is None:
            code, text = CLOSE_CODES[refusal.reason]
            await ws.close(code=code, message=text)
        else:  # ended by the server while it opened (shutdown): that close is under way
            with contextlib.suppress(Exception):
                await connection.closing
        return ws
    hub = request.app[HUB]
    ended_by: Reason | None = None
    try:
        hub.replayed += await send_opening(request.app[BROKER], connection, opening)
        del opening  # written: not kept for the length of the stream
        if heartbeat_event:
            connection.write_idle(connection.heartbeat)  # the page learns the interval now
        ended_by = await _answer_commands(request, ws, connection)
    finally:
        hub.detach(connection, connection.close_reason or ended_by or Reason.CLIENT_CLOSED)
        ws[STREAMED_BYTES] = request.writer.output_size + connection.bytes_out  # with the head
    if connection.closing is not None:
        with contextlib.suppress(Exception):
            await connection.closing
    return ws


def _shed_http_state(request: web.Request, ws: web.WebSocketResponse) -> None:
    """What aiohttp keeps of the HTTP exchange for the length of the connection and never
    uses after the upgrade: the parser for a next request (only the WebSocket reader
    parses what the client sends now) and the response headers, sent already. About
    2 KiB of each idle connection's memory (bench S3)."""
    protocol = request.protocol
    # Only where aiohttp names them so (3.14 does), once the WebSocket reader is in place.
    if None not in (getattr(protocol, "_parser", None), getattr(protocol, "_payload_parser", None)):
        protocol._parser = None
    ws.headers.clear()


def _snapshot_frame(message: str, position: wire.EventId) -> bytes:
    return wire.ws_text_frame(message.encode())


async def _refuse(
    request: web.Request, ws: web.WebSocketResponse, reason: Reason
) -> web.StreamResponse:
    if not await _upgrade(request, ws):
        return web.Response(status=400)  # the client is gone: never sent
    code, text = CLOSE_CODES[reason]
    await ws.close(code=code, message=text)
    return ws


async def _upgrade(request: web.Request, ws: web.WebSocketResponse) -> bool:
    """Send the 101; False when the client is gone already: the handler then returns a
    plain response, which aiohttp quietly fails to send (a half-started WebSocket
    response would fail again, loudly, when aiohttp finishes it)."""
    try:
        await ws.prepare(request)
    except ConnectionResetError:
        return False
    return True


def _close(
    ws: web.WebSocketResponse,
    transport: asyncio.Transport,
    reason: Reason,
    backed_up: bool,
    *,
    cut_off_after_s: float,
) -> asyncio.Future[object] | None:
    """Close with the reason's code (the closing handshake runs beside the handler, which
    sees the close in its receive loop). A socket whose writes are backed up is aborted
    when its client stopped reading (no close frame would get through); after an
    overflow, the close frame goes out behind what the socket holds, for a client that
    still reads, and the socket is aborted if that has not ended it in
    `cut_off_after_s`."""
    if backed_up and reason is not Reason.OVERFLOW:
        transport.abort()
        return None
    code, text = CLOSE_CODES[reason]
    if backed_up:
        # The transport's own close would wait for its buffer to be read as long as the
        # client lets it.
        asyncio.get_running_loop().call_later(cut_off_after_s, cut_off, transport)
    # Not waiting for a backed-up socket to drain: the handler sees the close at once
    # and the stream is over for the hub.
    return asyncio.ensure_future(ws.close(code=code, message=text, drain=not backed_up))


def cut_off(transport: asyncio.Transport) -> None:
    """Abort a connection whose client has not read its close in time. One that ended
    meanwhile has no protocol left: asyncio's transport (Python 3.11) would fail in
    `abort()` once its buffer was read and it closed, where uvloop's does nothing."""
    if transport.get_protocol() is not None:
        transport.abort()


_ENDS = frozenset({WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED})


async def _answer_commands(
    request: web.Request, ws: web.WebSocketResponse, connection: Connection
) -> Reason | None:
    """Until the socket closes; returns why, where the client's close was not it."""
    config = request.app[CONFIG]
    broker = request.app[BROKER]
    bucket: TokenBucket | None = None  # made on the first command: idle clients cost nothing
    refused_in_a_row = 0
    while True:
        # receive() rather than `async for`: one coroutine frame less per idle client.
        message = await ws.receive()
        if message.type in _ENDS:
            return None
        connection.heard = True
        if message.type is WSMsgType.PING:
            connection.send(wire.ws_pong_frame(message.data))
            continue
        if message.type is WSMsgType.ERROR and isinstance(message.data, WebSocketError):
            return Reason.PROTOCOL_ERROR  # closed by aiohttp with the matching code
        if message.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
            continue  # a pong or a failed read (the next receive() says closed)
        if bucket is None:
            bucket = TokenBucket(config.commands_per_s, burst=command_burst(config.commands_per_s))
        if not bucket.take():
            refused_in_a_row += 1
            if refused_in_a_row > MAX_REFUSED_COMMANDS:
                connection.close(Reason.RATE_LIMIT)
                return None
            limit = f"at most {config.commands_per_s:g} commands per second"
            connection.send(_frame(wire.error("rate_limited", limit)))
            continue
        refused_in_a_row = 0
        if message.type == WSMsgType.BINARY:
            connection.send(_frame(UNSUPPORTED_FRAME))
            continue
        command = read_command(message.data)
        if isinstance(command, str):
            connection.send(_frame(command))  # what was wrong with it
            continue
        connection.answering = True  # its pongs are read once this is answered
        try:
            if command.type == "get_active_tasks":
                try:
                    bucket.charge(reply_cost(await connection.refresh()))
                except BrokerUnavailable:
                    connection.send(_frame(BROKER_UNAVAILABLE))
            else:
                connection.send(_frame(await answer(broker, connection.user_id, command)))
        finally:
            connection.answering = False


def _frame(message: str) -> bytes:
    return wire.ws_text_frame(message.encode())
