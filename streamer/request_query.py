"""Query parameters read without keeping them: `request.query` stores the parsed query
(a token among it) in the request's URL for as long as the request lives, which for a
stream is its whole life."""

from __future__ import annotations

from urllib.parse import parse_qsl

from aiohttp import web


def query_value(request: web.BaseRequest, name: str) -> str | None:
    """The first value of `name` in the request's query, decoded as `request.query`
    decodes it ('+' and percent escapes); None when it is absent."""
    query = request.raw_path.partition("?")[2].partition("#")[0]
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key == name:
            return value
    return None
