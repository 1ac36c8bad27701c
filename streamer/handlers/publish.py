"""POST /api/tasks/events: publishing over HTTP for producers in other languages."""

from __future__ import annotations

import hmac

from aiohttp import web

from .. import json_input
from ..app_keys import BROKER, CONFIG, METRICS
from ..broker.base import BrokerUnavailable
from ..events import MAX_JSON_DEPTH, EventError, event_from_payload
from ..request_body import check_declared_size, continue_expected, read_body
from .common import json_error, unavailable

MAX_BODY_BYTES = 128 * 1024


def _refusal(request: web.Request) -> web.Response | None:
    """Why the request may not publish (no publish key set, or not its key), if so."""
    publish_key = request.app[CONFIG].publish_key
    if publish_key is None:
        return json_error(
            403, "publishing_disabled", "set STREAMER_PUBLISH_KEY to publish over HTTP"
        )
    # Header values may hold undecodable bytes (kept as surrogate escapes).
    given = request.headers.get("X-API-Key", "").encode("utf-8", "surrogateescape")
    if not hmac.compare_digest(given, publish_key.encode()):
        return json_error(401, "unauthorized", "missing or wrong X-API-Key")
    return None


async def expect_publish(request: web.Request) -> web.Response | None:
    """`Expect: 100-continue` (curl sends it with bodies over 1 KiB): a wrong key or a
    body declared over the limit is answered before the client sends the body."""
    refusal = _refusal(request)
    if refusal is not None:
        refusal.force_close()  # the body that may follow is not read
        return refusal
    check_declared_size(request, MAX_BODY_BYTES)
    await continue_expected(request)
    return None


async def publish_handler(request: web.Request) -> web.Response:
    config = request.app[CONFIG]
    refusal = _refusal(request)
    if refusal is not None:
        return refusal
    body = await read_body(request, limit=MAX_BODY_BYTES, timeout_s=config.body_timeout_s)
    try:
        payload = json_input.loads(body)
    except RecursionError:
        too_deep = f"JSON values must not nest deeper than {MAX_JSON_DEPTH} levels"
        return json_error(422, "invalid_event", too_deep)
    except json_input.RefusedValue as exc:
        return json_error(422, "invalid_event", str(exc))
    except ValueError:
        return json_error(400, "invalid_json", "the body must be one JSON object")
    try:
        event = event_from_payload(payload)
    except EventError as exc:
        return json_error(422, "invalid_event", str(exc))
    try:
        event_id = await request.app[BROKER].publish(event)
    except BrokerUnavailable as exc:
        return unavailable(f"{exc}; try again")
    request.app[METRICS].events_published.inc()
    return web.json_response({"id": str(event_id)}, status=202)
