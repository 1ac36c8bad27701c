"""Delegated authentication: credentials streamer cannot verify itself (a Django REST
framework token, a Django session cookie, ...) are checked by the application that
issued them, at `STREAMER_AUTH_URL`.

streamer sends `POST <url>` with JSON `{"token": ..., "cookie": ...}`. A 200 answer
`{"user_id": "42", "expires_in": 600}` admits (`expires_in` is optional), 401 or 403
refuses, anything else (or no answer in time) is "unavailable": never "admitted".
Answers, refusals included, are kept for a short time under a hash of the credentials,
and concurrent checks of the same credentials share one request, so a reconnect storm
does not become a storm on the auth service.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import math
import time
from collections import OrderedDict
from dataclasses import dataclass

import aiohttp

from ..config import without_password
from .tokens import Identity, InvalidToken

log = logging.getLogger(__name__)

MAX_ANSWER_BYTES = 64 * 1024
MAX_CACHED_ANSWERS = 10_000
MAX_USER_ID_LENGTH = 200
# Ten years: longer lifetimes are treated as a malformed answer, not as "forever".
MAX_EXPIRES_IN_S = 10 * 365 * 86400


class AuthUnavailable(Exception):
    """The auth service gave no usable answer: the client should try again later."""


@dataclass(frozen=True)
class _Answer:
    identity: Identity | None  # None: refused
    refusal: str
    keep_until: float


class DelegatedAuth:
    """Checks credentials at an HTTP endpoint of the application that issued them."""

    def __init__(self, url: str, *, timeout_s: float, cache_s: float) -> None:
        self.url = url
        self._shown = without_password(url)  # for the logs
        self.timeout_s = timeout_s
        self.cache_s = cache_s
        self.requests_sent = 0
        self._answers: OrderedDict[bytes, _Answer] = OrderedDict()
        self._pending: dict[bytes, asyncio.Future[_Answer]] = {}
        self._session: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout_s),
            headers={"User-Agent": "streamer-auth"},
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def check(self, token: str | None, cookie: str | None) -> Identity:
        """The identity the auth service gives these credentials.

        Raises InvalidToken when it refuses them, AuthUnavailable when it cannot say.
        """
        key = hashlib.sha256(json.dumps([token, cookie]).encode()).digest()
        answer = self._cached(key)
        if answer is None:
            pending = self._pending.get(key)
            if pending is None:
                pending = asyncio.ensure_future(self._ask(token, cookie))
                self._pending[key] = pending
                pending.add_done_callback(functools.partial(self._settle, key))
            # Shielded: one client leaving must not cancel the check others wait for.
            answer = await asyncio.shield(pending)
        if answer.identity is None:
            raise InvalidToken(answer.refusal)
        return answer.identity

    def _cached(self, key: bytes) -> _Answer | None:
        answer = self._answers.get(key)
        if answer is None:
            return None
        if answer.keep_until <= time.monotonic() or (
            answer.identity is not None and answer.identity.expires_at <= time.time()
        ):
            del self._answers[key]
            return None
        self._answers.move_to_end(key)
        return answer

    def _settle(self, key: bytes, pending: asyncio.Future[_Answer]) -> None:
        del self._pending[key]
        if pending.cancelled() or pending.exception() is not None:
            return  # unavailable is never kept: the next client asks again
        if self.cache_s > 0:
            self._answers[key] = pending.result()
            self._answers.move_to_end(key)
            while len(self._answers) > MAX_CACHED_ANSWERS:
                self._answers.popitem(last=False)

    async def _ask(self, token: str | None, cookie: str | None) -> _Answer:
        session = self._session
        if session is None:
            raise AuthUnavailable("the auth client is not open")
        self.requests_sent += 1
        try:
            async with session.post(
                self.url, json={"token": token, "cookie": cookie}, allow_redirects=False
            ) as response:
                status = response.status
                body = await _read_at_most(response.content, MAX_ANSWER_BYTES + 1)
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("auth service %s did not answer: %r", self._shown, exc)
            raise AuthUnavailable("the auth service did not answer") from None
        keep_until = time.monotonic() + self.cache_s
        if status in (401, 403):
            return _Answer(None, "refused by the auth service", keep_until)
        if status != 200:
            log.warning("auth service %s answered %d", self._shown, status)
            raise AuthUnavailable(f"the auth service answered {status}")
        identity = _identity(body)
        if identity is None:
            log.warning("auth service %s answered 200 without a usable user_id", self._shown)
            raise AuthUnavailable("the auth service gave a malformed answer")
        lifetime = identity.expires_at - time.time()
        return _Answer(identity, "", min(keep_until, time.monotonic() + lifetime))


async def _read_at_most(content: aiohttp.StreamReader, limit: int) -> bytes:
    """The body up to `limit` bytes, however many pieces it comes in (`read(n)` gives
    what has arrived so far)."""
    body = bytearray()
    while len(body) < limit:
        piece = await content.read(limit - len(body))
        if not piece:
            break
        body += piece
    return bytes(body)


def _identity(body: bytes) -> Identity | None:
    """The identity in a 200 answer, or None when the answer is not one."""
    if len(body) > MAX_ANSWER_BYTES:
        return None
    try:
        answer = json.loads(body)
    except ValueError:
        return None
    if not isinstance(answer, dict):
        return None
    user_id = answer.get("user_id")
    if isinstance(user_id, int) and not isinstance(user_id, bool):
        user_id = str(user_id)
    if not isinstance(user_id, str) or not 0 < len(user_id) <= MAX_USER_ID_LENGTH:
        return None
    if not user_id.isprintable():
        return None
    expires_in = answer.get("expires_in")
    if expires_in is None:
        return Identity(user_id=user_id, expires_at=math.inf)
    if isinstance(expires_in, bool) or not isinstance(expires_in, int | float):
        return None
    if not 0 < expires_in <= MAX_EXPIRES_IN_S:
        return None
    return Identity(user_id=user_id, expires_at=time.time() + expires_in)
