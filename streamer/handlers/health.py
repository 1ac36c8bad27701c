"""Liveness, readiness and metrics."""

from __future__ import annotations

from aiohttp import web

from ..app_keys import BROKER, METRICS


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    if await request.app[BROKER].ready():
        return web.json_response({"status": "ready"})
    return web.json_response({"status": "broker unreachable"}, status=503)


async def metrics(request: web.Request) -> web.Response:
    body = await request.app[METRICS].render_when_readable()
    return web.Response(
        body=body, content_type="text/plain", charset="utf-8", headers={"Cache-Control": "no-cache"}
    )
