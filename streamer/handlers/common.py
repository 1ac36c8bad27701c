"""Request parsing shared by the streaming transports."""

from __future__ import annotations

import os
from dataclasses import dataclass

from aiohttp import web

from ..events import EventError, dumps, validate_identifier

MAX_EVENT_ID_LENGTH = 200
# Which process serves a stream: useful behind a load balancer with several workers.
WORKER_HEADER = "X-Streamer-Worker"


def worker_header() -> dict[str, str]:
    return {WORKER_HEADER: str(os.getpid())}


@dataclass(frozen=True)
class StreamParams:
    task_id: str | None
    last_event_id: str | None


def json_error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"type": "error", "code": code, "message": message}, status=status)


def stream_params(request: web.Request, *, last_event_header: bool) -> StreamParams:
    """`?task_id=` narrows to one task; `?last_event_id=` (or the SSE header) resumes."""
    task_id = request.query.get("task_id")
    if task_id is not None:
        try:
            task_id = validate_identifier("task_id", task_id)
        except EventError as exc:
            error = {"type": "error", "code": "invalid_task_id", "message": str(exc)}
            raise web.HTTPBadRequest(text=dumps(error), content_type="application/json") from None
    last_event_id = None
    if last_event_header:
        last_event_id = request.headers.get("Last-Event-ID")
    if last_event_id is None:
        last_event_id = request.query.get("last_event_id")
    if last_event_id is not None:
        # An unusable id is not an error: the client gets recovered=false and a snapshot.
        last_event_id = last_event_id.strip()[:MAX_EVENT_ID_LENGTH] or None
    return StreamParams(task_id=task_id, last_event_id=last_event_id)
