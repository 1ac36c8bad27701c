"""GET /ws/tasks/: the WebSocket transport."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import WSCloseCode, WSMsgType, web

from ..app_keys import BROKER, CONFIG, HUB, METRICS
from ..auth.credentials import authenticate, uses_session_cookie
from ..auth.origin import origin_allowed
from ..auth.tokens import Identity, InvalidToken
from ..broker import Broker, BrokerUnavailable, Snapshot
from ..commands import Command, CommandError, parse_command
from ..connection import (
    ClientStream,
    active_tasks_message,
    open_client_stream,
    outgoing_messages,
    run_until_first_done,
)
from ..events import EventId, dumps
from ..hub import CloseReason, ConnectionLimitReached, HubClosed
from ..rate_limit import TokenBucket
from .common import stream_params, worker_header

log = logging.getLogger(__name__)

CLOSE_UNAUTHORIZED = 4401
CLOSE_TOO_SLOW = 4008
CLOSE_TOO_MANY = 4029
CLOSE_CODES = {
    CloseReason.OVERFLOW: (CLOSE_TOO_SLOW, b"too slow: resume from your last event id"),
    CloseReason.STALLED: (CLOSE_TOO_SLOW, b"too slow: resume from your last event id"),
    CloseReason.SHUTDOWN: (WSCloseCode.GOING_AWAY, b"server shutting down"),
    CloseReason.EXPIRED: (CLOSE_UNAUTHORIZED, b"token expired"),
}
CLOSE_TIMEOUT_S = 2.0
# A client that keeps sending past its rate after this many refusals in a row is
# dropped; before that each refused command gets an error reply.
MAX_REFUSED_COMMANDS = 50
# A reply costs one command, plus one more per this many bytes (a large snapshot).
REPLY_BYTES_PER_COMMAND = 16 * 1024


class _Socket:
    """Serialises sends (events and command replies come from two tasks) and knows
    where the client stands: the id of the last event or snapshot sent."""

    def __init__(self, ws: web.WebSocketResponse, stream: ClientStream, timeout_s: float) -> None:
        self.ws = ws
        self.position: EventId = stream.snapshot_id
        self._subscription = stream.subscription
        self._timeout_s = timeout_s
        self._lock = asyncio.Lock()

    async def send(self, text: str, position: EventId | None = None) -> None:
        async with self._lock:
            await self._send(text)
            if position is not None:
                self.position = position

    async def send_snapshot(self, snapshot: Snapshot) -> int:
        """`active_tasks` at the position the client stands at; returns its size."""
        async with self._lock:
            text = active_tasks_message(snapshot, recovered=True, position=self.position)
            await self._send(text)
            return len(text)

    async def _send(self, text: str) -> None:
        try:
            async with asyncio.timeout(self._timeout_s):
                await self.ws.send_str(text)
        except TimeoutError:
            # The peer stopped reading and the socket's buffers are full.
            self._subscription.close(CloseReason.STALLED)
            raise


def error_message(code: str, message: str) -> str:
    return dumps({"type": "error", "code": code, "message": message})


async def websocket_handler(request: web.Request) -> web.StreamResponse:
    config = request.app[CONFIG]
    cookie = uses_session_cookie(request)
    if not origin_allowed(request, config.allowed_origins, wildcard=not cookie):
        raise web.HTTPForbidden(text="origin not allowed\n")
    # aiohttp pings every ws_heartbeat_s and drops a peer whose pong does not come.
    ws = web.WebSocketResponse(
        max_msg_size=config.ws_max_message_bytes, heartbeat=config.ws_heartbeat_s
    )
    ws.headers.update(worker_header())
    if not ws.can_prepare(request).ok:
        raise web.HTTPBadRequest(text="expected a WebSocket upgrade\n")
    params = stream_params(request, last_event_header=False)
    identity: Identity | None = None
    refusal = (CLOSE_UNAUTHORIZED, b"unauthorized")
    try:
        identity = await authenticate(request, config.secret)
    except InvalidToken as exc:
        log.info("websocket refused: %s", exc)
    except BrokerUnavailable as exc:
        log.warning("websocket refused: %s", exc)
        refusal = (WSCloseCode.TRY_AGAIN_LATER, b"broker unavailable")
    await ws.prepare(request)
    if identity is None:
        await ws.close(code=refusal[0], message=refusal[1])
        return ws

    metrics = request.app[METRICS]
    metrics.connections.labels("websocket").inc()
    try:
        async with open_client_stream(
            request.app[HUB],
            request.app[BROKER],
            user_id=identity.user_id,
            task_id=params.task_id,
            last_event_id=params.last_event_id,
            expires_at=identity.expires_at,
        ) as stream:
            socket = _Socket(ws, stream, config.send_timeout_s)
            await _serve(request, socket, stream, identity.user_id)
    except ConnectionLimitReached as exc:
        metrics.disconnects.labels("connection_limit").inc()
        await ws.close(code=CLOSE_TOO_MANY, message=str(exc).encode()[:120])
    except HubClosed:
        await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutting down")
    except BrokerUnavailable as exc:
        log.warning("websocket closed: %s", exc)
        await ws.close(code=WSCloseCode.TRY_AGAIN_LATER, message=b"broker unavailable")
    finally:
        metrics.connections.labels("websocket").dec()
    return ws


async def _serve(request: web.Request, socket: _Socket, stream: ClientStream, user_id: str) -> None:
    broker = request.app[BROKER]
    metrics = request.app[METRICS]
    subscription = stream.subscription

    async def send_events() -> None:
        async for message in outgoing_messages(broker, stream):
            await socket.send(message.json, message.event_id)
            metrics.events_sent.labels("websocket").inc()

    config = request.app[CONFIG]
    bucket = TokenBucket(config.commands_per_s, burst=max(2 * config.commands_per_s, 1))

    async def answer_commands() -> None:
        refused_in_a_row = 0
        async for message in socket.ws:
            if message.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                continue  # CLOSE / ERROR end the iteration; aiohttp answers pings itself.
            if not bucket.take():
                refused_in_a_row += 1
                if refused_in_a_row > MAX_REFUSED_COMMANDS:
                    metrics.disconnects.labels("rate_limit").inc()
                    await socket.ws.close(code=CLOSE_TOO_MANY, message=b"too many commands")
                    return
                limit = f"at most {config.commands_per_s:g} commands per second"
                await socket.send(error_message("rate_limited", limit))
                continue
            refused_in_a_row = 0
            if message.type == WSMsgType.TEXT:
                reply = await _answer(broker, user_id, message.data)
                if isinstance(reply, Snapshot):
                    size = await socket.send_snapshot(reply)
                    bucket.charge(size // REPLY_BYTES_PER_COMMAND)
                else:
                    await socket.send(reply)
            else:
                await socket.send(
                    error_message("unsupported_frame", "send commands as JSON text frames")
                )

    await run_until_first_done(send_events(), answer_commands(), subscription.wait_closed())
    reason = subscription.close_reason
    if reason is not None:
        metrics.disconnects.labels(reason.value).inc()
        await _close(request, socket.ws, reason)
    elif not socket.ws.closed:
        await socket.ws.close()


async def _close(request: web.Request, ws: web.WebSocketResponse, reason: CloseReason) -> None:
    """Close with the reason's code. A peer whose writes are backed up gets its
    connection aborted instead: no close frame, and no graceful close, would ever get
    through (and aiohttp's drain waiter, shared by all writes, may already be cancelled)."""
    transport = request.transport
    if transport is not None and (
        reason is CloseReason.STALLED or transport.get_write_buffer_size() > 0
    ):
        transport.abort()
        return
    if not ws.closed:
        code, text = CLOSE_CODES[reason]
        try:
            await asyncio.wait_for(ws.close(code=code, message=text), CLOSE_TIMEOUT_S)
        except (TimeoutError, ConnectionError):
            if transport is not None:
                transport.abort()


async def _answer(broker: Broker, user_id: str, text: str) -> str | Snapshot:
    try:
        command = parse_command(text)
    except CommandError as exc:
        return error_message(exc.code, exc.message)
    try:
        return await _run(broker, user_id, command)
    except BrokerUnavailable:
        return error_message("broker_unavailable", "the broker is unavailable; try again")


async def _run(broker: Broker, user_id: str, command: Command) -> str | Snapshot:
    if command.type == "ping":
        return dumps({"type": "pong"})
    if command.type == "get_active_tasks":
        return await broker.snapshot(user_id)
    assert command.task_id is not None
    if command.type == "get_task_status":
        state = await broker.task_state(user_id, command.task_id)
        return dumps({"type": "task_status", "task_id": command.task_id, "status": state})
    success = await broker.request_cancel(user_id, command.task_id)
    return dumps({"type": "task_cancelled", "task_id": command.task_id, "success": success})
