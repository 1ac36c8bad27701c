"""Liveness, readiness and metrics."""

from __future__ import annotations

from aiohttp import web

from ..app_keys import BROKER, METRICS

# The text format's media type with its version, which Prometheus 3 reads to know what
# it parses (prometheus_client writes that version).
EXPOSITION_TYPE = "text/plain; version=0.0.4; charset=utf-8"


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    if await request.app[BROKER].ready():
        return web.json_response({"status": "ready"})
    return web.json_response({"status": "broker unreachable"}, status=503)


async def metrics(request: web.Request) -> web.Response:
    body = await request.app[METRICS].render_when_readable()
    return web.Response(
        body=body, headers={"Content-Type": EXPOSITION_TYPE, "Cache-Control": "no-cache"}
    )
