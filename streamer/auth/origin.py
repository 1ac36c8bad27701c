"""Origin checks against cross-site WebSocket hijacking."""

from __future__ import annotations

from urllib.parse import urlsplit

from aiohttp import web


def origin_allowed(request: web.Request, allowed: tuple[str, ...]) -> bool:
    """Allow requests without Origin (curl, servers), listed origins, and same-origin."""
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    origin = origin.strip().rstrip("/").lower()
    if "*" in allowed or origin in allowed:
        return True
    parts = urlsplit(origin)
    host = request.headers.get("Host", "").lower()
    return bool(parts.netloc) and parts.netloc == host
