"""Browser sessions (aiohttp-session): a cookie that stands for a verified token.

`POST /auth/session` with a valid token sets it; both transports accept it, so a
browser on the same site needs no token in the URL. The session ends when the token
it was made from expires (or after SESSION_MAX_AGE_S, whichever comes first).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator, Callable

import redis.asyncio as redis
from aiohttp import web
from aiohttp_session import AbstractStorage, get_session, new_session, session_middleware
from aiohttp_session.cookie_storage import EncryptedCookieStorage
from aiohttp_session.redis_storage import RedisStorage

from .tokens import Identity

SESSION_COOKIE = "streamer_session"
SESSION_MAX_AGE_S = 86400


def _cookie_options(secure: bool) -> dict[str, object]:
    return {
        "cookie_name": SESSION_COOKIE,
        "max_age": SESSION_MAX_AGE_S,
        "httponly": True,
        "samesite": "Lax",
        "secure": secure,
    }


def cookie_key(secret: str) -> bytes:
    """The cookie encryption key, derived from STREAMER_SECRET (32 bytes for Fernet)."""
    return hashlib.sha256(b"streamer session cookie\0" + secret.encode()).digest()


def setup_sessions(
    app: web.Application, *, secret: str, redis_url: str | None, secure: bool
) -> Callable[[web.Application], AsyncIterator[None]]:
    """Install the session middleware; returns the cleanup context that closes its store.

    With Redis, sessions live server-side (ending one revokes it everywhere);
    without, they live in an encrypted cookie.
    """
    storage: AbstractStorage
    client: redis.Redis | None = None
    if redis_url is not None:
        # redis-py connects lazily: nothing is opened until the first session request.
        client = redis.Redis.from_url(redis_url, socket_connect_timeout=5)
        # The cookie name doubles as the prefix of the Redis keys.
        storage = RedisStorage(client, **_cookie_options(secure))  # type: ignore[arg-type]
    else:
        storage = EncryptedCookieStorage(cookie_key(secret), **_cookie_options(secure))  # type: ignore[arg-type]
    app.middlewares.append(session_middleware(storage))

    async def close_store(app: web.Application) -> AsyncIterator[None]:
        yield
        if client is not None:
            await client.aclose()

    return close_store


async def identity_from_session(request: web.Request) -> Identity | None:
    session = await get_session(request)
    user_id = session.get("user_id")
    expires_at = session.get("expires_at")
    if not isinstance(user_id, str) or not isinstance(expires_at, int | float):
        return None
    if expires_at <= time.time():
        return None
    return Identity(user_id=user_id, expires_at=float(expires_at))


async def start_session(request: web.Request, identity: Identity) -> Identity:
    session = await new_session(request)
    expires_at = min(identity.expires_at, time.time() + SESSION_MAX_AGE_S)
    session["user_id"] = identity.user_id
    session["expires_at"] = expires_at
    return Identity(identity.user_id, expires_at)


async def end_session(request: web.Request) -> None:
    session = await get_session(request)
    session.invalidate()
