"""The WebSocket commands over plain HTTP, for SSE and long-poll clients:

    GET  /api/tasks/                      get_active_tasks  -> active_tasks
    GET  /api/tasks/{task_id}             get_task_status   -> task_status (404 when unknown)
    POST /api/tasks/{task_id}/cancel      cancel_task       -> task_cancelled

Same credentials as the streams, same validation and replies as the WebSocket commands
(`streamer.commands`), the same command rate per user (one token bucket per user and
process). Requests that ride on the session cookie must come from the service's own or
a listed origin, and a cookie POST must say where it comes from (`Origin`): another
site's page cannot cancel a user's task.
"""

from __future__ import annotations

import logging

from aiohttp import web

from .. import wire
from ..app_keys import BROKER, COMMAND_BUCKETS, CONFIG, DELEGATED_AUTH
from ..auth.credentials import authenticate, uses_cookie_credentials
from ..auth.delegated import AuthUnavailable
from ..auth.origin import cors_headers
from ..auth.sessions import SessionStoreUnavailable
from ..auth.tokens import InvalidToken
from ..broker.base import BrokerUnavailable, Snapshot
from ..commands import (
    CommandError,
    CommandType,
    make_command,
    reply_cost,
    run,
)
from ..config import Config
from ..rate_limit import BucketsByKey, command_burst
from ..reasons import BROKER_UNAVAILABLE_MESSAGE, Refused
from ..request_query import path_is_text
from .admission import check_origin, cookie_usable
from .common import json_error, unavailable

log = logging.getLogger(__name__)

ACTIVE_TASKS_PATH = "/api/tasks/"
TASK_PATH = "/api/tasks/{task_id}"
CANCEL_PATH = "/api/tasks/{task_id}/cancel"
# Every answer is one user's data: never stored by a cache on the way.
NO_STORE = {"Cache-Control": "no-store"}
TASK_NOT_FOUND = "no such task"
# Most buckets kept per process; idle (refilled) ones are dropped long before that.
MAX_BUCKETS = 10_000


def setup(app: web.Application, config: Config) -> None:
    """Add the routes, and the per-user command buckets, to the application."""
    app[COMMAND_BUCKETS] = BucketsByKey(
        config.commands_per_s, burst=command_burst(config.commands_per_s), max_size=MAX_BUCKETS
    )
    app.router.add_get(ACTIVE_TASKS_PATH, active_tasks)
    app.router.add_get(TASK_PATH, task_status)
    app.router.add_post(CANCEL_PATH, cancel_task)
    for path in (ACTIVE_TASKS_PATH, TASK_PATH, CANCEL_PATH):
        app.router.add_route("OPTIONS", path, preflight)
    app.router.add_route("*", "/api/{rest:.*}", elsewhere)  # after every /api/ route


async def elsewhere(request: web.Request) -> web.Response:
    """Anything else under /api/ is answered in JSON too: 405 with `Allow` where the
    path takes other methods, else 404."""
    allowed: set[str] = set()
    this = request.match_info.route.resource
    for resource in request.app.router.resources():
        if resource is not this:
            _, methods = await resource.resolve(request)
            allowed |= methods
    if allowed:
        refused = json_error(405, "method_not_allowed", f"{request.method} is not allowed here")
        refused.headers["Allow"] = ", ".join(sorted(allowed))
    else:
        refused = json_error(404, "not_found", "no such endpoint")
    # A listed origin's page reads why (the browser hides an answer without them).
    refused.headers.update(cors_headers(request, request.app[CONFIG].allowed_origins))
    return refused


async def active_tasks(request: web.Request) -> web.Response:
    return await _command(request, "get_active_tasks")


async def task_status(request: web.Request) -> web.Response:
    return await _command(request, "get_task_status")


async def cancel_task(request: web.Request) -> web.Response:
    return await _command(request, "cancel_task")


async def _command(request: web.Request, kind: CommandType) -> web.Response:
    response = await _answer(request, kind)
    response.headers.update(NO_STORE | cors_headers(request, request.app[CONFIG].allowed_origins))
    return response


async def _answer(request: web.Request, kind: CommandType) -> web.Response:
    config = request.app[CONFIG]
    refusal = _origin_refusal(request)
    if refusal is not None:
        return json_error(403, "origin_not_allowed", refusal)
    try:
        identity = await authenticate(
            request,
            config.secret,
            request.app.get(DELEGATED_AUTH),
            cookie_usable=cookie_usable(request),
        )
    except InvalidToken as exc:
        response = json_error(401, "unauthorized", str(exc))
        response.headers["WWW-Authenticate"] = 'Bearer realm="streamer"'
        return response
    except SessionStoreUnavailable as exc:
        log.warning("%s %s: %s", request.method, request.path, exc)
        return unavailable(BROKER_UNAVAILABLE_MESSAGE)
    except AuthUnavailable as exc:
        return unavailable(f"{exc}; try again", code="auth_unavailable")
    bucket = request.app[COMMAND_BUCKETS].get(identity.user_id)
    if not bucket.take():
        response = json_error(
            429, "rate_limited", f"at most {config.commands_per_s:g} commands per second"
        )
        response.headers["Retry-After"] = str(bucket.retry_after_s())
        return response
    task_id = request.match_info.get("task_id")
    if task_id is not None and not path_is_text(request):
        return json_error(
            400, "invalid_task_id", "the task id is not UTF-8 text once its escapes are decoded"
        )
    try:
        command = make_command(kind, task_id)
    except CommandError as exc:
        return json_error(400, exc.code, exc.message)
    try:
        outcome = await run(request.app[BROKER], identity.user_id, command)
    except BrokerUnavailable as exc:
        log.warning("%s %s: %s", request.method, request.path, exc)
        return unavailable(BROKER_UNAVAILABLE_MESSAGE)
    if not outcome.found:
        # Unknown and another user's task answer alike, to the byte.
        return json_error(404, "task_not_found", TASK_NOT_FOUND)
    reply = outcome.reply
    if isinstance(reply, Snapshot):
        # The snapshot's own position: resuming a stream from it misses nothing of
        # what the snapshot does not already show.
        reply = wire.active_tasks(
            reply.tasks, position=reply.position, recovered=True, truncated=reply.truncated
        )
        bucket.charge(reply_cost(len(reply)))
    return web.Response(text=reply, content_type="application/json")


def _origin_refusal(request: web.Request) -> str | None:
    """Why the request's origin may not use the API, or None. Cookie-authenticated
    POSTs must carry an allowed Origin: browsers send one on every POST, so a request
    without it did not come from a page that may use the user's cookie."""
    try:
        check_origin(request, "use the task API")
    except Refused as refusal:
        return refusal.message
    cookie = uses_cookie_credentials(request, delegated=DELEGATED_AUTH in request.app)
    if request.method == "POST" and cookie and "Origin" not in request.headers:
        return "a POST with a cookie as credentials must carry an Origin header"
    return None


async def preflight(request: web.Request) -> web.Response:
    """CORS preflight for pages of listed origins that send Authorization (or POST)."""
    cors = cors_headers(request, request.app[CONFIG].allowed_origins)
    if not cors:
        return json_error(403, "origin_not_allowed", "this origin may not use the task API")
    route = request.match_info.route.resource
    method = "POST" if route is not None and route.canonical == CANCEL_PATH else "GET"
    cors |= {
        "Access-Control-Allow-Methods": method,
        "Access-Control-Allow-Headers": "Authorization, Content-Type",
        "Access-Control-Max-Age": "600",
    }
    return web.Response(status=204, headers=cors)
