"""The URL of a running service, as the CLI's `publish --url` and `watch --url` take it."""

from __future__ import annotations

from urllib.parse import urlsplit


def service_url(url: str, flag: str = "--url") -> str:
    """`url` without a trailing slash, if it is http(s)://host[:port][/path] with a port
    that can be connected to; raises ValueError naming `flag` otherwise."""
    parts = urlsplit(url) if url.isprintable() and " " not in url else None
    try:
        port = parts.port if parts is not None else None
    except ValueError:  # not a number, or out of range
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname or port == 0:
        raise ValueError(f"{flag} must be an http:// or https:// URL of the service, got {url!r}")
    return url.rstrip("/")
