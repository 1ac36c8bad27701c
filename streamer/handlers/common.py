"""What every HTTP handler shares: error bodies and the worker header."""

from __future__ import annotations

import json
import os

from aiohttp import web

from ..request_query import QueryError, query_value

# Which process serves a stream: useful behind a load balancer with several workers.
WORKER_HEADER = "X-Streamer-Worker"


def worker_header() -> dict[str, str]:
    return {WORKER_HEADER: str(os.getpid())}


def heartbeat_events(request: web.Request) -> bool:
    """`?heartbeat=event`: the stream's heartbeats come as messages a page can see (its
    EventSource shows no SSE comment, its WebSocket no ping), so that it can tell a dead
    connection from a quiet one. Raises HTTPBadRequest for another value."""
    try:
        value = query_value(request, "heartbeat")
    except QueryError:
        value = ""  # refused below, as any value but "event"
    if value not in (None, "event"):
        raise web.HTTPBadRequest(
            text=json.dumps(
                {
                    "type": "error",
                    "code": "invalid_heartbeat",
                    "message": 'heartbeat must be "event" (or left out)',
                }
            ),
            content_type="application/json",
        )
    return value == "event"


def json_error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"type": "error", "code": code, "message": message}, status=status)


def unavailable(message: str, code: str = "broker_unavailable") -> web.Response:
    """A 503 the client may retry in a second."""
    response = json_error(503, code, message)
    response.headers["Retry-After"] = "1"
    return response
