"""Query parameters read without keeping them: `request.query` stores the parsed query
(a token among it) in the request's URL for as long as the request lives, which for a
stream is its whole life."""

from __future__ import annotations

from urllib.parse import unquote, unquote_plus

from aiohttp import web


class QueryError(ValueError):
    """A parameter given more than once, or whose escapes are not UTF-8."""


def path_is_text(request: web.BaseRequest) -> bool:
    """Whether the request's path decodes to text: aiohttp leaves an escape that is not
    UTF-8 as it is, so `/a/%ff` and `/a/%25ff` would both name "%ff"."""
    try:
        unquote(request.raw_path.partition("?")[0].partition("#")[0], errors="strict")
    except UnicodeDecodeError:
        return False
    return True


def query_value(request: web.BaseRequest, name: str) -> str | None:
    """The value of `name` in the request's query, decoded as `request.query` decodes it
    ('+' and percent escapes); None when it is absent. Raises QueryError when it is
    given more than once (which one counts is up to each reader of the URL) or does not
    decode to text."""
    query = request.raw_path.partition("#")[0].partition("?")[2]
    found: str | None = None
    for pair in query.split("&"):
        raw_key, _, raw_value = pair.partition("=")
        if unquote_plus(raw_key) != name:
            continue
        if found is not None:
            raise QueryError(f"?{name}= is given more than once")
        try:
            found = unquote_plus(raw_value, errors="strict")
        except UnicodeDecodeError:
            raise QueryError(f"?{name}= is not UTF-8 text once its escapes are decoded") from None
    return found
