"""GET /sse/tasks/: the Server-Sent Events transport (aiohttp-sse)."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiohttp import web
from aiohttp_sse import EventSourceResponse

from ..app_keys import BROKER, CONFIG, HUB, METRICS
from ..auth.credentials import authenticate, uses_session_cookie
from ..auth.origin import cors_headers, origin_allowed
from ..auth.tokens import InvalidToken
from ..broker import BrokerUnavailable
from ..connection import (
    ClientStream,
    open_client_stream,
    outgoing_messages,
    run_until_first_done,
)
from ..hub import CloseReason, ConnectionLimitReached, HubClosed
from .common import json_error, stream_params, worker_header

log = logging.getLogger(__name__)


async def sse_handler(request: web.Request) -> web.StreamResponse:
    config = request.app[CONFIG]
    cookie = uses_session_cookie(request)
    if not origin_allowed(request, config.allowed_origins, wildcard=not cookie):
        return json_error(403, "origin_not_allowed", "this origin may not read the stream")
    cors = cors_headers(request, config.allowed_origins)
    try:
        identity = await authenticate(request, config.secret)
    except InvalidToken as exc:
        refusal = json_error(401, "unauthorized", str(exc))
        refusal.headers["WWW-Authenticate"] = 'Bearer realm="streamer"'
        refusal.headers.update(cors)
        return refusal
    except BrokerUnavailable as exc:
        return json_error(503, "broker_unavailable", f"{exc}; try again")
    params = stream_params(request, last_event_header=True)

    metrics = request.app[METRICS]
    response = EventSourceResponse(
        ping_interval=config.heartbeat_s,
        send_timeout=config.send_timeout_s,
        headers=worker_header() | cors,
    )
    metrics.connections.labels("sse").inc()
    try:
        async with open_client_stream(
            request.app[HUB],
            request.app[BROKER],
            user_id=identity.user_id,
            task_id=params.task_id,
            last_event_id=params.last_event_id,
            expires_at=identity.expires_at,
        ) as stream:
            await response.prepare(request)
            await _serve(response, stream, config.sse_retry_ms, request)
    except ConnectionLimitReached as exc:
        metrics.disconnects.labels("connection_limit").inc()
        refusal = json_error(429, "too_many_connections", str(exc))
        refusal.headers.update(cors | {"Retry-After": "5"})
        return refusal
    except HubClosed as exc:
        refusal = json_error(503, "shutting_down", str(exc))
        refusal.headers.update(cors | {"Retry-After": "1"})
        return refusal
    except BrokerUnavailable as exc:
        if not response.prepared:
            return json_error(503, "broker_unavailable", f"{exc}; try again")
        log.warning("sse stream ended: %s", exc)  # the client reconnects and resumes
    finally:
        metrics.connections.labels("sse").dec()
    return response


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


async def _serve(
    response: EventSourceResponse, stream: ClientStream, retry_ms: int, request: web.Request
) -> None:
    metrics = request.app[METRICS]
    subscription = stream.subscription

    async def send_events() -> None:
        retry: int | None = retry_ms
        async for message in outgoing_messages(request.app[BROKER], stream):
            try:
                await response.send(
                    message.json, id=str(message.event_id), event=message.type, retry=retry
                )
            except TimeoutError:  # aiohttp-sse's send timeout: the peer stopped reading
                subscription.close(CloseReason.STALLED)
                raise
            retry = None
            metrics.events_sent.labels("sse").inc()

    # response.wait() ends when the client goes away (a heartbeat write fails).
    await run_until_first_done(send_events(), response.wait(), subscription.wait_closed())
    reason = subscription.close_reason
    if reason is not None:
        metrics.disconnects.labels(reason.value).inc()
    with contextlib.suppress(Exception):
        response.stop_streaming()
    transport = request.transport
    if transport is not None and (
        reason is CloseReason.STALLED or transport.get_write_buffer_size() > 0
    ):
        transport.abort()  # backed up: the end of the stream would never get through
        return
    try:
        await asyncio.wait_for(response.write_eof(), timeout=2)
    except (TimeoutError, ConnectionError, RuntimeError):
        if transport is not None:
            transport.abort()
