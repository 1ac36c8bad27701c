"""An access log that never writes credentials: `token=` query values are redacted and
no header other than the User-Agent is logged."""

from __future__ import annotations

import re

from aiohttp.abc import AbstractAccessLogger
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse

_TOKEN_IN_QUERY = re.compile(r"([?&](?:token|access_token)=)[^&#]*", re.IGNORECASE)


def redact(path_qs: str) -> str:
    return _TOKEN_IN_QUERY.sub(r"\1[redacted]", path_qs)


class RedactingAccessLogger(AbstractAccessLogger):
    """Fixed format: remote "METHOD path HTTP/x.y" status bytes seconds "user agent"."""

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        self.logger.info(
            '%s "%s %s HTTP/%d.%d" %d %d %.3fs "%s"',
            request.remote or "-",
            request.method,
            redact(request.path_qs),
            request.version.major,
            request.version.minor,
            response.status,
            response.body_length,
            time,
            request.headers.get("User-Agent", "-").replace('"', "'"),
        )
