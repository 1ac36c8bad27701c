"""gunicorn workers: aiohttp's, serving the app with streamer's HTTP timeouts.

    gunicorn 'streamer.app:create_app' -k streamer.worker.StreamerWorker

aiohttp's worker uses an AppRunner returned by the app factory as it is, so the factory
is wrapped to return a GuardedAppRunner built with what the worker itself would have
passed (gunicorn's loggers, access log format, graceful timeout). Keep-alive comes from
STREAMER_KEEPALIVE_S; gunicorn's `keepalive` setting is not used.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from aiohttp.worker import GunicornUVLoopWebWorker, GunicornWebWorker

from .http_server import guarded_runner


class StreamerWorker(GunicornWebWorker):
    wsgi: Any  # gunicorn's loaded app: here the factory, streamer.app:create_app
    sockets: list[Any]  # gunicorn's listeners, handed to aiohttp

    def load_wsgi(self) -> None:
        super().load_wsgi()
        load_app = self.wsgi

        async def make_runner() -> web.AppRunner:
            app = load_app if isinstance(load_app, web.Application) else await load_app()
            return guarded_runner(
                app,
                logger=self.log,
                access_log=self.log.access_log if self.cfg.accesslog else None,
                access_log_format=self._get_valid_log_format(self.cfg.access_log_format),
                shutdown_timeout=self.cfg.graceful_timeout / 100 * 95,
            )

        self.wsgi = make_runner

    def run(self) -> None:
        # aiohttp serves `self.sockets` as they are: gunicorn's wrappers, not sockets.
        # uvloop closes a listening socket's descriptor itself, counting on the socket
        # object's I/O references (which a wrapper does not carry) to keep the object's
        # close from closing it again: with a wrapper it was closed twice at every
        # shutdown ("Error while closing socket [Errno 9]"), and the second close could
        # have hit a descriptor opened in between.
        self.sockets = [getattr(listener, "sock", listener) for listener in self.sockets]
        super().run()


class StreamerUVLoopWorker(StreamerWorker, GunicornUVLoopWebWorker):
    """The same on uvloop (the default in deploy/gunicorn.conf.py)."""
