"""Origin checks (against cross-site WebSocket hijacking and cookie misuse) and CORS."""

from __future__ import annotations

from urllib.parse import urlsplit

from aiohttp import web


def origin_allowed(
    request: web.Request, allowed: tuple[str, ...], *, wildcard: bool = True
) -> bool:
    """Allow requests without Origin (curl, servers), listed origins, and same-origin.

    `wildcard=False` ignores a configured `*`: requests that ride on the session
    cookie must come from the service's own or an explicitly listed origin.
    """
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    origin = origin.strip().rstrip("/").lower()
    if (wildcard and "*" in allowed) or origin in allowed:
        return True
    parts = urlsplit(origin)
    host = request.headers.get("Host", "").lower()
    return bool(parts.netloc) and parts.netloc == host


def cors_headers(request: web.Request, allowed: tuple[str, ...]) -> dict[str, str]:
    """CORS response headers for a cross-origin request from an allowed origin, else none."""
    origin = request.headers.get("Origin")
    if origin is None:
        return {}
    normalized = origin.strip().rstrip("/").lower()
    if normalized in allowed:
        return {
            "Access-Control-Allow-Origin": origin.strip(),
            "Access-Control-Allow-Credentials": "true",
            "Vary": "Origin",
        }
    if "*" in allowed:
        # Any origin may read the stream, but never with the user's cookies.
        return {"Access-Control-Allow-Origin": "*"}
    return {}
