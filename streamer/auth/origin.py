"""Origin checks (against cross-site WebSocket hijacking and cookie misuse) and CORS."""

from __future__ import annotations

from urllib.parse import urlsplit

from aiohttp import web

WEB_SCHEMES = ("http", "https")


def origin_allowed(
    request: web.Request, allowed: tuple[str, ...], *, wildcard: bool = True
) -> bool:
    """Allow requests without Origin (curl, servers), listed origins, and same-origin:
    an http(s) origin with the scheme the browser used and the request's Host.

    `wildcard=False` ignores a configured `*`: requests that ride on the session
    cookie must come from the service's own or an explicitly listed origin.
    """
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    origin = origin.strip().rstrip("/").lower()
    if (wildcard and "*" in allowed) or origin in allowed:
        return True
    try:
        parts = urlsplit(origin)
    except ValueError:  # not a URL (an unbalanced [ or ]): no page's origin
        return False
    host = request.headers.get("Host", "").lower()
    return (
        parts.scheme in WEB_SCHEMES
        and parts.scheme == browser_scheme(request)
        and bool(parts.netloc)
        and parts.netloc == host
    )


def browser_scheme(request: web.Request) -> str:
    """The scheme the browser used: the request's own, or the one the proxy in front
    reports in X-Forwarded-Proto (the shipped nginx configuration sets it).

    Trusting the header is safe here: a page cannot set it on a browser's request, and
    the origin check only protects browsers.
    """
    forwarded = request.headers.get("X-Forwarded-Proto")
    if forwarded is None:
        return request.scheme
    # Proxies in a chain append theirs: the first is the one the browser spoke to.
    return forwarded.split(",")[0].strip().lower()


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
