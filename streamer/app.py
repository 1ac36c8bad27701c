"""The application factory: `gunicorn 'streamer.app:create_app' -c deploy/gunicorn.conf.py`."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
from collections.abc import AsyncIterator, Callable, Sequence
from importlib import resources

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from .access_log import access_logger
from .app_keys import BROKER, CONFIG, DELEGATED_AUTH, HUB, METRICS, OPENING_BUCKETS
from .auth.delegated import DelegatedAuth
from .auth.sessions import SessionStoreUnavailable, setup_sessions
from .broker.base import Broker
from .broker.memory import MemoryBroker
from .broker.redis import RedisBroker
from .config import Config, log_warnings_once
from .connection import Limits
from .handlers import api, demo, health, poll, publish, session, sse, ws
from .handlers.common import json_error
from .http_server import note_prepared_response
from .hub import Hub
from .metrics import Metrics, metrics_ctx_for
from .rate_limit import BucketsByKey, opening_burst
from .reasons import BROKER_UNAVAILABLE_MESSAGE, Reason

MAX_REQUEST_BODY_BYTES = 256 * 1024
log = logging.getLogger(__name__)


def build_broker(config: Config, on_undecodable: Callable[[], None]) -> Broker:
    if config.redis_url is None:
        return MemoryBroker(history_size=config.history_size, history_ttl=config.history_ttl)
    return RedisBroker(
        config.redis_url,
        history_size=config.history_size,
        history_ttl=config.history_ttl,
        on_undecodable=on_undecodable,
    )


async def _broker_ctx(app: web.Application) -> AsyncIterator[None]:
    broker = app[BROKER]
    await broker.start(app[HUB])
    yield
    await broker.close()


async def _clock_ctx(app: web.Application) -> AsyncIterator[None]:
    """The hub's one clock: expiries, SSE heartbeats and WebSocket pings."""
    config = app[CONFIG]
    clock = asyncio.create_task(
        app[HUB].keep_time(heartbeat_s=config.heartbeat_s, ping_s=config.ws_heartbeat_s)
    )
    yield
    clock.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await clock


async def _metrics_ctx(app: web.Application) -> AsyncIterator[None]:
    async for _ in metrics_ctx_for(app[METRICS]):
        yield


async def _delegated_auth_ctx(app: web.Application) -> AsyncIterator[None]:
    auth = app[DELEGATED_AUTH]
    await auth.open()
    yield
    await auth.close()


async def _close_connections(app: web.Application) -> None:
    # WebSockets close with 1001 and SSE streams end; clients resume elsewhere.
    app[HUB].close_all(Reason.SHUTDOWN)


@web.middleware
async def _store_unavailable(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Redis failing under the session store (saving a session, for one) is a 503 the
    client can retry, not a 500."""
    try:
        return await handler(request)
    except SessionStoreUnavailable as exc:
        log.warning("%s %s: broker unavailable: %s", request.method, request.path, exc)
        return json_error(503, "broker_unavailable", BROKER_UNAVAILABLE_MESSAGE)


def build_app(config: Config) -> web.Application:
    # No middleware on the streams: its frames would live as long as each stream.
    app = web.Application(
        client_max_size=MAX_REQUEST_BODY_BYTES,
        handler_args={
            "access_log_class": access_logger(config.trusted_proxies),
            "max_line_size": config.max_header_bytes,
            "max_field_size": config.max_header_bytes,
        },
    )
    broker = build_broker(config, on_undecodable=lambda: app[METRICS].undecodable_entries.inc())
    hub = Hub(
        subscribe=broker.subscribe,
        unsubscribe=broker.unsubscribe,
        max_connections=config.max_connections,
        max_connections_per_user=config.max_connections_per_user,
        limits=Limits(config.client_buffer, config.client_buffer_bytes, config.send_timeout_s),
    )
    app[CONFIG] = config
    app[BROKER] = broker
    app[HUB] = hub
    app[OPENING_BUCKETS] = BucketsByKey(
        config.openings_per_s,
        burst=opening_burst(config.openings_per_s, config.max_connections_per_user),
    )
    app[METRICS] = Metrics(hub, broker)
    app.cleanup_ctx.append(_broker_ctx)
    app.cleanup_ctx.append(_clock_ctx)
    app.cleanup_ctx.append(_metrics_ctx)
    if config.auth_url is not None:
        app[DELEGATED_AUTH] = DelegatedAuth(
            config.auth_url, timeout_s=config.auth_timeout_s, cache_s=config.auth_cache_s
        )
        app.cleanup_ctx.append(_delegated_auth_ctx)
    close_sessions, sessions = setup_sessions(
        app,
        secret=config.secret,
        redis_url=config.redis_url,
        secure=config.cookie_secure,
        max_sessions_per_user=config.max_sessions_per_user,
    )
    app.cleanup_ctx.append(close_sessions)
    app.cleanup_ctx.append(demo.demo_jobs_ctx)
    app.on_shutdown.append(_close_connections)
    app.on_response_prepare.append(note_prepared_response)

    static_dir = resources.files("streamer").joinpath("static")
    app.router.add_get("/", demo.index)
    app.router.add_static("/static/", str(static_dir))
    # Each stream also without its final slash, as people type it (`curl -N .../sse/tasks`).
    for path in ("/ws/tasks/", "/ws/tasks"):
        app.router.add_get(path, ws.websocket_handler)
    for path in ("/sse/tasks/", "/sse/tasks"):
        app.router.add_get(path, sse.sse_handler)
        app.router.add_route("OPTIONS", path, sse.sse_preflight)
    for path in ("/poll/tasks/", "/poll/tasks"):
        app.router.add_get(path, poll.poll_handler)
        app.router.add_route("OPTIONS", path, poll.poll_preflight)
    app.router.add_post(
        "/api/tasks/events", publish.publish_handler, expect_handler=publish.expect_publish
    )
    api.setup(app, config)  # the commands over HTTP: /api/tasks/...
    app.router.add_get("/healthz", health.healthz)
    app.router.add_get("/readyz", health.readyz)
    app.router.add_get("/metrics", health.metrics)
    app.router.add_get("/demo/token", demo.demo_token)
    app.router.add_post("/demo/jobs", demo.start_demo_job)

    # Middlewares only around the session routes: any middleware in the application
    # (a sub-application's too) puts frames on every stream's call chain for its length.
    with_sessions = functools.partial(_through, (_store_unavailable, sessions))
    app.router.add_post("/auth/session", with_sessions(session.create_session))
    app.router.add_delete("/auth/session", with_sessions(session.delete_session))
    return app


def _through(middlewares: Sequence[Middleware], handler: Handler) -> Handler:
    """`handler` behind `middlewares` (the first one outermost), as aiohttp chains them."""
    for middleware in reversed(middlewares):
        handler = functools.partial(middleware, handler=handler)
    return handler


async def create_app(config: Config | None = None) -> web.Application:
    """Build the application; without `config`, read it from STREAMER_* variables now."""
    if config is None:
        config = Config.from_env(os.environ)
        # Under a worker started without streamer's gunicorn config (which logs them in
        # the master), a misspelt setting would otherwise pass without a word.
        log_warnings_once(config, functools.partial(log.warning, "%s"))
    return build_app(config)
