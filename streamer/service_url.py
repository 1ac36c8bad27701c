"""The URL of a running service, as the CLI's `publish --url` and `watch --url` take it."""

from __future__ import annotations

from urllib.parse import urlsplit

from .config import without_password


def service_url(url: str, flag: str = "--url") -> str:
    """`url` without a trailing slash, if it is http(s)://host[:port][/path] with a port
    that can be connected to; raises ValueError naming `flag` otherwise (never showing
    a password the URL carries)."""
    shown = without_password(url)
    parts = urlsplit(url) if url.isprintable() and " " not in url else None
    try:
        port = parts.port if parts is not None else None
    except ValueError:  # not a number, or out of range
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname or port == 0:
        raise ValueError(f"{flag} must be an http:// or https:// URL of the service, got {shown!r}")
    # The endpoint's path is appended to it, and urllib sends no user or password.
    if "@" in parts.netloc or "?" in url or "#" in url:
        raise ValueError(
            f"{flag} must be the service's URL without user, password, query or fragment, "
            f"got {shown!r}"
        )
    return url.rstrip("/")
