"""Browser sessions (aiohttp-session): a cookie that stands for a verified token.

`POST /auth/session` with a valid token sets it; both transports accept it, so a
browser on the same site needs no token in the URL. A session ends when the token it
was made from expires (or after SESSION_MAX_AGE_S, whichever comes first), when
STREAMER_SECRET changes, and, with Redis, when its user has started
`max_sessions_per_user` newer ones.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

import redis.asyncio as redis
from aiohttp import web
from aiohttp.typedefs import Middleware
from aiohttp_session import (
    AbstractStorage,
    Session,
    get_session,
    new_session,
    session_middleware,
)
from aiohttp_session.cookie_storage import EncryptedCookieStorage
from aiohttp_session.redis_storage import RedisStorage

from ..broker.redis_connect import REDIS_ERRORS, AsyncClient, redis_client, redis_failure
from .session_index import SessionIndex
from .tokens import Identity, InvalidToken

SESSION_COOKIE = "streamer_session"
SESSION_MAX_AGE_S = 86400
# RedisStorage keeps a session under "<cookie name>_<session id>".
SESSION_KEY_PREFIX = f"{SESSION_COOKIE}_"


@dataclass(frozen=True)
class SessionRules:
    signing_key_id: str
    storage: AbstractStorage
    store: IndexedRedisStorage | None  # None without Redis: nothing is kept server-side


SESSION_RULES = web.AppKey("session_rules", SessionRules)


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


def signing_key_id(secret: str) -> str:
    """Names STREAMER_SECRET without revealing it: sessions made under another secret
    carry another id. An HMAC of a fixed label, truncated."""
    return hmac.new(secret.encode(), b"streamer signing key id", hashlib.sha256).hexdigest()[:16]


class SessionStoreUnavailable(Exception):
    """The session store (Redis) cannot be reached: try again later."""


@contextlib.contextmanager
def _store_errors() -> Iterator[None]:
    """The one place where the session store's own errors become SessionStoreUnavailable."""
    try:
        yield
    except REDIS_ERRORS as exc:
        reason = redis_failure(exc)
        raise SessionStoreUnavailable(f"the session store is unavailable: {reason}") from exc


class _OwnCookiesOnly(AbstractStorage):
    """Session cookies are ASCII (a Fernet token, or a session id): one with other bytes
    (kept by aiohttp as surrogates, which the storages cannot encode) is no session."""

    def load_cookie(self, request: web.Request) -> str | None:
        cookie = super().load_cookie(request)
        return cookie if cookie is not None and cookie.isascii() else None


class CookieStorage(_OwnCookiesOnly, EncryptedCookieStorage):
    """The encrypted cookie store (no Redis)."""


class IndexedRedisStorage(_OwnCookiesOnly, RedisStorage):
    """RedisStorage that lists each new session in its user's index once stored."""

    def __init__(self, client: AsyncClient, index: SessionIndex, **options: object) -> None:
        # RedisStorage insists on a `Redis`; a Redis Cluster client answers the same
        # GET and SET, so it takes the place of an unused, never connected, stand-in.
        stand_in = client if isinstance(client, redis.Redis) else redis.Redis()
        super().__init__(stand_in, **options)  # type: ignore[arg-type]
        self._redis = client  # type: ignore[assignment]
        self._index = index

    async def load_session(self, request: web.Request) -> Session:
        with _store_errors():
            return await super().load_session(request)

    async def save_session(
        self, request: web.Request, response: web.StreamResponse, session: Session
    ) -> None:
        with _store_errors():
            await super().save_session(request, response, session)
            user_id = session.get("user_id")
            # Only start_session makes new, non-empty sessions, with their id and lifetime.
            session_id, lifetime_s = session.identity, session.max_age
            if session.new and isinstance(user_id, str) and session_id and lifetime_s:
                await self._index.add(user_id, str(session_id), lifetime_s)

    def new_session_id(self, user_id: str) -> str:
        return self._index.new_session_id(user_id)

    async def forget(self, user_id: str, session_id: str) -> None:
        with _store_errors():
            await self._index.remove(user_id, session_id)


def setup_sessions(
    app: web.Application,
    *,
    secret: str,
    redis_url: str | None,
    secure: bool,
    max_sessions_per_user: int,
) -> tuple[Callable[[web.Application], AsyncIterator[None]], Middleware]:
    """The session store for `app`: returns the cleanup context that closes it, and the
    middleware for the routes that log in and out (streams read sessions without it).

    With Redis, sessions live server-side (ending one revokes it everywhere) and each
    user keeps at most `max_sessions_per_user`; without, they live in an encrypted
    cookie and nothing is kept server-side.
    """
    storage: AbstractStorage
    client: AsyncClient | None = None
    store: IndexedRedisStorage | None = None
    if redis_url is not None:
        # redis-py connects lazily: nothing is opened until the first session request.
        client = redis_client(redis_url, socket_connect_timeout=5)
        index = SessionIndex(
            client, key_prefix=SESSION_KEY_PREFIX, max_per_user=max_sessions_per_user
        )
        storage = store = IndexedRedisStorage(client, index, **_cookie_options(secure))
    else:
        storage = CookieStorage(cookie_key(secret), **_cookie_options(secure))  # type: ignore[arg-type]
    app[SESSION_RULES] = SessionRules(signing_key_id(secret), storage, store)

    async def close_store(app: web.Application) -> AsyncIterator[None]:
        yield
        if client is not None:
            await client.aclose()

    return close_store, session_middleware(storage)


async def identity_from_session(request: web.Request) -> Identity | None:
    """The identity of the request's session cookie, read from the store directly:
    streams do not go through the session middleware (nothing of it stays alive for
    the length of a stream)."""
    session = await request.config_dict[SESSION_RULES].storage.load_session(request)
    user_id = session.get("user_id")
    expires_at = session.get("expires_at")
    key_id = session.get("signing_key_id")
    if not isinstance(user_id, str) or not isinstance(expires_at, int | float):
        return None
    if expires_at <= time.time():
        return None
    # Made under another STREAMER_SECRET: rotating the secret ends sessions as well.
    expected = request.config_dict[SESSION_RULES].signing_key_id
    if not isinstance(key_id, str) or not hmac.compare_digest(key_id, expected):
        return None
    return Identity(user_id=user_id, expires_at=float(expires_at))


async def start_session(request: web.Request, identity: Identity) -> Identity:
    now = time.time()
    expires_at = min(identity.expires_at, now + SESSION_MAX_AGE_S)
    # Whole seconds for the cookie's Max-Age and the Redis key's expiry, rounded down
    # so that neither outlives the token.
    lifetime_s = int(expires_at - now)
    if lifetime_s < 1:
        raise InvalidToken("the token expires too soon to start a session")
    session = await new_session(request)
    store = request.config_dict[SESSION_RULES].store
    if store is not None:
        session.set_new_identity(store.new_session_id(identity.user_id))
    else:
        session.set_new_identity(secrets.token_hex(16))
    session.max_age = lifetime_s
    session["user_id"] = identity.user_id
    session["expires_at"] = expires_at
    session["signing_key_id"] = request.config_dict[SESSION_RULES].signing_key_id
    return Identity(identity.user_id, expires_at)


async def end_session(request: web.Request) -> None:
    session = await get_session(request)
    if session.new:
        return  # nothing to end; invalidating would store an empty session
    rules = request.config_dict[SESSION_RULES]
    user_id = session.get("user_id")
    expires_at = session.get("expires_at")
    if rules.store is not None and isinstance(user_id, str) and session.identity is not None:
        await rules.store.forget(user_id, str(session.identity))
    if isinstance(expires_at, int | float):
        # What is stored in place of the session lives no longer than the session would.
        session.max_age = max(int(expires_at - time.time()), 1)
    session.invalidate()
