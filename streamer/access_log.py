"""An access log that never writes credentials: `token=` query values are redacted and
no header other than the User-Agent is logged. Behind trusted proxies, the address is
the client's they forward for (`client_address`)."""

from __future__ import annotations

import re
from typing import ClassVar
from urllib.parse import unquote_plus

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse

from .client_address import LOOPBACK, Network, client_address

# Every byte a stream sent, its response head included: set by the stream handlers,
# since the hub writes events to the socket past aiohttp's writer, and aiohttp counts
# its own writes only for a response that it ended itself.
STREAMED_BYTES = web.ResponseKey("streamed_bytes", int)

_SECRET_PARAMETERS = frozenset({"token", "access_token"})
# `;` is no separator to aiohttp's parser, but is to others': a token after it is one,
# and what follows a token up to the next `&` is taken for part of it (to aiohttp it is).
_PARAMETER_SEPARATORS = re.compile(r"([&;#])")


def redact(path_qs: str) -> str:
    """`path_qs` with the values of token parameters replaced; names are compared
    decoded, as the query parser sees them (`?tok%65n=` is a token too)."""
    path, question_mark, query = path_qs.partition("?")
    if not question_mark:
        return path_qs
    # Separators kept; a fragment (never sent by browsers) is treated like the query.
    pieces = _PARAMETER_SEPARATORS.split(query)
    in_secret = False
    for index in range(0, len(pieces), 2):  # parameters, with a separator between each
        name, equals, _ = pieces[index].partition("=")
        if equals and unquote_plus(name).strip().lower() in _SECRET_PARAMETERS:
            pieces[index] = f"{name}=[redacted]"
            in_secret = True
        elif in_secret and pieces[index - 1] == ";":
            pieces[index] = "[redacted]"
        else:
            in_secret = False
    return f"{path}?{''.join(pieces)}"


class RedactingAccessLogger(AbstractAccessLogger):
    """Fixed format: client "METHOD path HTTP/x.y" status bytes seconds "user agent"."""

    trusted_proxies: ClassVar[tuple[Network, ...]] = LOOPBACK

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        peer = request.remote
        # A request the parser refused comes with a plain dict of headers, if any.
        getall = getattr(request.headers, "getall", None)
        forwarded_for = () if getall is None else getall("X-Forwarded-For", ())
        self.logger.info(
            '%s "%s %s HTTP/%d.%d" %d %d %.3fs "%s"',
            "-" if peer is None else client_address(peer, forwarded_for, self.trusted_proxies),
            request.method,
            redact(request.path_qs),
            request.version.major,
            request.version.minor,
            response.status,
            response.get(STREAMED_BYTES, response.body_length),
            time,
            request.headers.get("User-Agent", "-").replace('"', "'"),
        )


def access_logger(trusted_proxies: tuple[Network, ...]) -> type[RedactingAccessLogger]:
    """The logger class aiohttp makes its access logger from, with these proxies."""
    return type(
        "RedactingAccessLogger", (RedactingAccessLogger,), {"trusted_proxies": trusted_proxies}
    )
