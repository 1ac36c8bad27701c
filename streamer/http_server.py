"""aiohttp's HTTP server with a deadline for request headers and error answers that never
repeat what the client sent. Used by the gunicorn worker (`streamer.worker`) and by
`streamer serve`.

Without it, the only limit on how long a client may take to send its headers is
aiohttp's keep-alive timeout, and a request the parser refuses is answered (and logged,
with a traceback) with the parser's message, which quotes the offending line: a token
in `?token=` or in an `Authorization` header included.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import (
    BadHttpMethod,
    BadStatusLine,
    HttpProcessingError,
    InvalidHeader,
    InvalidURLError,
    LineTooLong,
)
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from .app_keys import CONFIG
from .gc_passes import SurvivorFreezer, freeze_startup_objects, freezes_safely

log = logging.getLogger(__name__)

# What a client still sends after an answer that did not read its whole body (413,
# 408) is read and dropped for at most this long, so that it sees the answer rather
# than a reset; then the connection closes.
LINGERING_S = 2.0

# The status logged for a request whose client went away before it was answered
# (nginx's "client closed request"); never sent.
CLIENT_CLOSED_REQUEST = 499

# Bytes read from a socket at a time, and (twice that) buffered of a request body before
# reading pauses until the handler takes some. With asyncio's and aiohttp's defaults
# (256 KiB reads, 128 KiB buffered) every client that sends a body along with its
# headers puts that much in memory before any handler has looked at the request.
READ_CHUNK_BYTES = 16 * 1024

# Most specific first: the reason given for a request the parser refused.
_PARSE_ERROR_REASONS: tuple[tuple[type[HttpProcessingError], str], ...] = (
    (BadHttpMethod, "bad method"),
    (LineTooLong, "request line or header too long"),
    (BadStatusLine, "malformed request line"),
    (InvalidURLError, "malformed URL"),
    (InvalidHeader, "malformed header"),
)


def parse_error_reason(exc: HttpProcessingError) -> str:
    for kind, reason in _PARSE_ERROR_REASONS:
        if isinstance(exc, kind):
            return reason
    return "malformed request"


class GuardedRequestHandler(RequestHandler, asyncio.BufferedProtocol):
    """One connection. A request's headers must be complete within `header_timeout_s`
    of the connection opening, or of the first byte of a request that follows another;
    otherwise the connection is closed. The deadline ends with the headers, so a stream
    (one long request) is never cut by it; idle time between requests is aiohttp's
    keep-alive timeout. Reads go through `read_buffer`, shared by the connections of
    one server (asyncio fills it and hands it over synchronously)."""

    __slots__ = ("_header_deadline", "_header_timeout_s", "_prepared_response", "_read_buffer")

    def __init__(
        self,
        manager: web.Server,
        *,
        header_timeout_s: float,
        read_buffer: memoryview,
        **kwargs: Any,
    ) -> None:
        super().__init__(manager, **kwargs)
        self._header_timeout_s = header_timeout_s
        self._header_deadline: asyncio.TimerHandle | None = None
        self._read_buffer = read_buffer
        self._prepared_response: web.StreamResponse | None = None

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(bytes(self._read_buffer[:nbytes]))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm_header_deadline()

    def data_received(self, data: bytes) -> None:
        if self._header_deadline is None and self._waiting_for_request():
            self._arm_header_deadline()
        requests_before = self._request_count
        super().data_received(data)
        if self._request_count != requests_before:  # headers complete, or refused
            self._disarm_header_deadline()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm_header_deadline()
        super().connection_lost(exc)

    def _waiting_for_request(self) -> bool:
        """True while the connection handles no request and has none parsed."""
        return self._waiter is not None and not self._waiter.done()

    def _arm_header_deadline(self) -> None:
        self._header_deadline = self._loop.call_later(
            self._header_timeout_s, self._header_deadline_passed
        )

    def _disarm_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _header_deadline_passed(self) -> None:
        self._header_deadline = None
        if self._waiting_for_request():
            self.log_debug("Request headers not complete in time: closing the connection")
            self.force_close()

    async def _handle_request(
        self,
        request: BaseRequest,
        start_time: float | None,
        request_handler: Callable[[BaseRequest], Awaitable[web.StreamResponse]],
    ) -> tuple[web.StreamResponse, bool]:
        try:
            return await super()._handle_request(request, start_time, request_handler)
        except asyncio.CancelledError:
            # aiohttp writes no access line for a handler cancelled because its client
            # went away (`handler_cancellation`), which is how most streams end, or at
            # the end of a shutdown; one that had answered nothing yet (a held long
            # poll) is logged as nginx logs a client that left.
            response = self._prepared_response
            if response is None:
                response = web.Response(status=CLIENT_CLOSED_REQUEST)
            self.log_access(request, response, start_time)
            raise
        finally:
            self._prepared_response = None  # it refers to the request

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """A request the parser refused gets a fixed reason, in the 400 body and in one
        log line; aiohttp's message would quote the request."""
        if status != 400 or not isinstance(exc, HttpProcessingError):
            return super().handle_error(request, status, exc, message)
        reason = parse_error_reason(exc)
        # Non-HTTP bytes as a connection's first request (TLS to a plain port, scanners)
        # are routine on the internet: debug, as aiohttp does.
        routine = isinstance(exc, BadHttpMethod) and self._request_count == 1
        log = self.logger.debug if routine else self.logger.info
        log("Bad request from %s: %s", request.remote, reason)
        response = web.Response(status=400, text=f"400 Bad Request: {reason}\n")
        response.force_close()
        return response


async def note_prepared_response(request: web.Request, response: web.StreamResponse) -> None:
    """An `on_response_prepare` hook: a connection's handler keeps the response whose
    head it sent, for the access line of a request whose client went away."""
    handler = request.protocol
    if isinstance(handler, GuardedRequestHandler):
        handler._prepared_response = response


class GuardedServer(web.Server):
    """aiohttp's low-level server, with GuardedRequestHandler for each connection."""

    def __init__(
        self,
        handler: Callable[[BaseRequest], Awaitable[web.StreamResponse]],
        *,
        header_timeout_s: float,
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, **kwargs)
        self._header_timeout_s = header_timeout_s
        self._read_buffer = memoryview(bytearray(READ_CHUNK_BYTES))

    def __call__(self) -> RequestHandler:
        return GuardedRequestHandler(
            self,
            loop=self._loop,
            header_timeout_s=self._header_timeout_s,
            read_buffer=self._read_buffer,
            **self._kwargs,
        )


class GuardedAppRunner(web.AppRunner):
    """AppRunner whose server is a GuardedServer, in a process of its own: once the app
    has started, what startup made is kept out of the cyclic collector's full passes."""

    __slots__ = ("_header_timeout_s", "_survivor_freezer")

    def __init__(self, app: web.Application, *, header_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._header_timeout_s = header_timeout_s
        self._survivor_freezer: SurvivorFreezer | None = None

    async def setup(self) -> None:
        await super().setup()
        frozen = freeze_startup_objects()
        log.info("%d objects made at startup left out of garbage collection passes", frozen)
        if freezes_safely(asyncio.get_running_loop()):
            self._survivor_freezer = SurvivorFreezer()
            self._survivor_freezer.install()

    async def cleanup(self) -> None:
        if self._survivor_freezer is not None:
            self._survivor_freezer.uninstall()
        await super().cleanup()

    async def _make_server(self) -> web.Server:
        # AppRunner starts the app and builds aiohttp's Server with the app's handler
        # arguments merged into ours; the same server, with the guarded handler.
        server = await super()._make_server()
        return GuardedServer(
            server.request_handler,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            header_timeout_s=self._header_timeout_s,
            **server._kwargs,
        )


def guarded_runner(app: web.Application, **kwargs: Any) -> GuardedAppRunner:
    """A runner for the streamer app, with the HTTP timeouts of its configuration."""
    config = app.get(CONFIG)
    if config is None:
        raise RuntimeError("not a streamer application: build it with streamer.app.create_app")
    return GuardedAppRunner(
        app,
        header_timeout_s=config.header_timeout_s,
        keepalive_timeout=config.keepalive_s,
        lingering_time=LINGERING_S,
        read_bufsize=READ_CHUNK_BYTES,
        # A stream's handler ends as soon as its client goes away.
        handler_cancellation=True,
        **kwargs,
    )


async def serve(
    app: Awaitable[web.Application],
    *,
    host: str,
    port: int,
    listening: Callable[[], None] | None = None,
) -> None:
    """Serve until SIGINT or SIGTERM, then shut down as aiohttp's run_app does: the
    app's shutdown hooks first (WebSockets close with 1001), then the connections.
    `listening` is called once the port is bound."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        runner = guarded_runner(await app)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
            if listening is not None:
                listening()
            await stop.wait()
        finally:
            await runner.cleanup()
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
