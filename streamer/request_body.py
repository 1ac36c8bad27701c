"""Reading a request body with a size cap and a deadline, so that a client cannot make
the server hold large bodies or wait forever for a body that never comes."""

from __future__ import annotations

import asyncio

from aiohttp import HttpVersion11, web

from .events import dumps


def _refusal(refusal: web.HTTPException, code: str, message: str) -> web.HTTPException:
    """`refusal` with the service's JSON error body; the connection closes after it,
    so nobody waits for the rest of the body to reuse it."""
    refusal.text = dumps({"type": "error", "code": code, "message": message})
    refusal.content_type = "application/json"
    refusal.force_close()
    return refusal


def _too_large(limit: int) -> web.HTTPException:
    return _refusal(
        web.HTTPRequestEntityTooLarge(max_size=limit),
        "too_large",
        f"the body must be at most {limit} bytes",
    )


def check_declared_size(request: web.Request, limit: int) -> None:
    """Raises 413 when Content-Length is over `limit`."""
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(limit)


async def continue_expected(request: web.Request) -> None:
    """What aiohttp's own handler of `Expect` does (aiohttp 3.14's
    `_default_expect_handler`, private), for a route that checks more first: `100
    Continue` (the client then sends the body); 417 for any other expectation."""
    if request.version != HttpVersion11:
        return
    expectation = request.headers.get("Expect", "")
    if expectation.lower() != "100-continue":
        raise _refusal(
            web.HTTPExpectationFailed(),
            "expectation_failed",
            f"the only expectation understood is 100-continue, got {expectation!r}",
        )
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    request.writer.output_size = 0  # the response proper has not started


async def read_body(request: web.Request, *, limit: int, timeout_s: float) -> bytes:
    """The whole body, at most `limit` bytes, received within `timeout_s`.

    Raises 413 without reading anything when Content-Length is over the limit, and as
    soon as a chunked body goes over it; 408 when the body does not arrive in time;
    400 when its framing is broken or the client goes away.
    """
    check_declared_size(request, limit)
    body = bytearray()
    try:
        async with asyncio.timeout(timeout_s):
            while len(body) <= limit:
                chunk = await request.content.read(limit + 1 - len(body))
                if not chunk:
                    return bytes(body)
                body += chunk
    except TimeoutError:
        raise _refusal(
            web.HTTPRequestTimeout(),
            "body_timeout",
            f"the body did not arrive within {timeout_s:g} s",
        ) from None
    except (web.RequestPayloadError, ConnectionError):
        raise _refusal(
            web.HTTPBadRequest(), "invalid_body", "the body is malformed or incomplete"
        ) from None
    raise _too_large(limit)
