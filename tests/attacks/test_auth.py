"""The hostile review's authentication findings (issue 11), each replayed against the
real gunicorn server, plus unit-level checks of the same rules."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import jwt
import pytest
import redis.asyncio as redis
from aiohttp.test_utils import TestClient

from streamer.app import create_app
from streamer.auth.sessions import SESSION_COOKIE
from streamer.auth.tokens import InvalidToken, issue_token, verify_token
from streamer.config import Config, ConfigError

from ..clients import WAIT_S, SseReader, ws_close_code, ws_json
from ..conftest import SECRET, StartGunicorn
from ..processes import ServerProcess, gunicorn_args

TokenFor = Callable[..., str]
StartProcess = Callable[..., ServerProcess]
AiohttpClient = Callable[..., Any]

DEFAULT_MAX_SESSIONS = 10  # STREAMER_MAX_SESSIONS_PER_USER when unset
ROTATED_SECRET = "rotated-secret-" + "r" * 50
# aiohttp-session's RedisStorage keeps a session under "<cookie name>_<session id>".
SESSION_KEY_PREFIX = f"{SESSION_COOKIE}_"
HUGE = 10**400
SERVER_ERROR_IN_LOG = re.compile(r'HTTP/1\.1" 5\d\d |Traceback|OverflowError')


# --- clients of the real server ---------------------------------------------------------


@asynccontextmanager
async def browser() -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTP client that sends exactly the cookies it is told to (an attacker replays
    copied cookies; a cookie jar would also refuse Secure cookies over plain http)."""
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
        yield session


def credentials(token: str | None = None, cookie: str | None = None) -> dict[str, str]:
    headers = {}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if cookie is not None:
        headers["Cookie"] = f"{SESSION_COOKIE}={cookie}"
    return headers


async def log_in(
    http: aiohttp.ClientSession, base_url: str, token: str, headers: dict[str, str] | None = None
) -> tuple[int, str | None]:
    """POST /auth/session; the status and the session cookie it set, if any."""
    async with http.post(
        f"{base_url}/auth/session", headers=credentials(token) | (headers or {})
    ) as response:
        cookie = response.cookies.get(SESSION_COOKIE)
        return response.status, cookie.value if cookie is not None else None


async def session_cookie(http: aiohttp.ClientSession, base_url: str, token: str) -> str:
    status, cookie = await log_in(http, base_url, token)
    assert status == 200 and cookie is not None, f"login answered {status}"
    return cookie


async def sse_status(http: aiohttp.ClientSession, base_url: str, headers: dict[str, str]) -> int:
    """Open an SSE stream: its status, after checking that a 200 really streams."""
    async with http.get(f"{base_url}/sse/tasks/", headers=headers) as response:
        if response.status == 200:
            assert (await SseReader(response).next()).event == "active_tasks"
        return response.status


async def ws_outcome(
    http: aiohttp.ClientSession, base_url: str, headers: dict[str, str], token: str | None = None
) -> str:
    """Open a WebSocket (the token, if any, in the query, as browsers must): "active_tasks"
    when it streams, "close <code>" when the server closes it first, "http <status>" when
    the upgrade is refused."""
    query = f"?token={token}" if token is not None else ""
    url = base_url.replace("http", "ws", 1) + f"/ws/tasks/{query}"
    try:
        async with http.ws_connect(url, headers=headers) as ws:
            message = await ws.receive(timeout=WAIT_S)
            if message.type == aiohttp.WSMsgType.TEXT:
                return str(json.loads(message.data)["type"])
            assert message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED), message
            return f"close {ws.close_code}"
    except aiohttp.WSServerHandshakeError as refused:
        return f"http {refused.status}"


async def stored_sessions(redis_url: str, user: str) -> dict[str, int]:
    """The user's sessions stored in Redis: session id -> milliseconds its key has left."""
    sessions: dict[str, int] = {}
    async with redis.Redis.from_url(redis_url) as store:
        async for key in store.scan_iter(match=f"{SESSION_KEY_PREFIX}*"):
            raw = await store.get(key)
            if raw and json.loads(raw).get("session", {}).get("user_id") == user:
                sessions[key.decode().removeprefix(SESSION_KEY_PREFIX)] = await store.pttl(key)
    return sessions


async def keys_without_ttl(redis_url: str) -> list[str]:
    async with redis.Redis.from_url(redis_url) as store:
        return [key.decode() async for key in store.scan_iter() if await store.ttl(key) == -1]


# --- the attacks, against gunicorn ------------------------------------------------------


async def test_finding_7_one_token_cannot_mint_unbounded_long_lived_sessions(
    start_gunicorn: StartGunicorn, redis_url: str, token_for: TokenFor, user_id: str
) -> None:
    """Finding 7: one 60 s token posted to /auth/session again and again minted a
    24-hour session each time, without limit.

    Now each session expires with its token, and a user keeps only the newest few.
    """
    server, _ = start_gunicorn(2)
    base = server.base_url
    token = token_for(user_id, ttl_s=60)
    token_exp = verify_token(SECRET, token).expires_at
    async with browser() as http:
        cookies = [await session_cookie(http, base, token) for _ in range(30)]

        now = time.time()
        sessions = await stored_sessions(redis_url, user_id)
        for ttl_ms in sessions.values():
            assert 0 < ttl_ms / 1000 <= token_exp - now, "a session outlives its token"
        assert len(sessions) <= DEFAULT_MAX_SESSIONS

        # The earliest sessions were evicted; the newest still stream, on both transports.
        statuses = [await sse_status(http, base, credentials(cookie=c)) for c in cookies]
        assert statuses == [401] * 20 + [200] * 10
        assert await ws_outcome(http, base, credentials(cookie=cookies[0])) == "close 4401"
        assert await ws_outcome(http, base, credentials(cookie=cookies[-1])) == "active_tasks"

        # Another user's logins evict nothing of this user's.
        other = await session_cookie(http, base, token_for(f"{user_id}-other"))
        assert await sse_status(http, base, credentials(cookie=other)) == 200
        assert await sse_status(http, base, credentials(cookie=cookies[-10])) == 200

        # A burst of parallel logins, spread over both workers, keeps to the cap as well.
        burst_user = f"{user_id}-burst"
        burst_token = token_for(burst_user, ttl_s=60)
        burst = await asyncio.gather(*(session_cookie(http, base, burst_token) for _ in range(40)))
        assert len(await stored_sessions(redis_url, burst_user)) == DEFAULT_MAX_SESSIONS
        statuses = [await sse_status(http, base, credentials(cookie=c)) for c in burst]
        assert statuses.count(200) == DEFAULT_MAX_SESSIONS

    # Whatever the session bookkeeping stores expires (only the epoch may not).
    assert await keys_without_ttl(redis_url) in ([], ["streamer:epoch"])


async def test_finding_8_rotating_the_secret_ends_sessions(
    start_gunicorn: StartGunicorn, start_process: StartProcess, token_for: TokenFor, user_id: str
) -> None:
    """Finding 8: after a restart with a new STREAMER_SECRET the old token was refused
    but a session cookie made with it kept streaming.

    Now a session ends with the secret that signed its token.
    """
    server, env = start_gunicorn(1)
    token = token_for(user_id)
    async with browser() as http:
        cookie = await session_cookie(http, server.base_url, token)
        assert await sse_status(http, server.base_url, credentials(cookie=cookie)) == 200
        assert await ws_outcome(http, server.base_url, credentials(cookie=cookie)) == (
            "active_tasks"
        )

        server.stop()
        rotated = start_process(gunicorn_args(1), {**env, "STREAMER_SECRET": ROTATED_SECRET})
        await asyncio.to_thread(rotated.wait_healthy)
        base = rotated.base_url

        assert await sse_status(http, base, credentials(token=token)) == 401
        assert await sse_status(http, base, credentials(cookie=cookie)) == 401
        assert await ws_outcome(http, base, credentials(cookie=cookie)) == "close 4401"
        # Sessions themselves work under the new secret.
        fresh = await session_cookie(http, base, issue_token(ROTATED_SECRET, user_id, ttl_s=60))
        assert await sse_status(http, base, credentials(cookie=fresh)) == 200


async def test_finding_13_a_huge_exp_is_refused_not_a_crash(
    start_gunicorn: StartGunicorn, user_id: str
) -> None:
    """Finding 13: a correctly signed token whose exp is a 400-digit integer made the
    server answer 500 (OverflowError); now it is refused like any bad token.
    """
    server, _ = start_gunicorn(1)
    base = server.base_url
    now = int(time.time())
    tokens = {
        claim: jwt.encode({"sub": user_id, "exp": now + 60, claim: HUGE}, SECRET, "HS256")
        for claim in ("exp", "iat", "nbf")
    }
    async with browser() as http:
        for claim, token in tokens.items():
            assert await sse_status(http, base, credentials(token=token)) == 401, claim
            assert await ws_outcome(http, base, {}, token=token) == "close 4401", claim
            assert (await log_in(http, base, token))[0] == 401, claim
    assert SERVER_ERROR_IN_LOG.search(server.log()) is None, server.log()


async def test_finding_13_origin_scheme_is_compared(
    start_gunicorn: StartGunicorn, token_for: TokenFor, user_id: str
) -> None:
    """Finding 13: an Origin of ftp://host:port or https://host:port passed the
    same-origin check of a plain-http service (only the host was compared).
    """
    server, _ = start_gunicorn(1)
    base = server.base_url
    token = token_for(user_id)
    own = f"127.0.0.1:{server.port}"
    behind_tls = {"X-Forwarded-Proto": "https"}
    refused = [
        {"Origin": f"ftp://{own}"},
        {"Origin": f"https://{own}"},
        {"Origin": f"http://{own}"} | behind_tls,  # a plain-http page of an https service
        {"Origin": f"ftp://{own}", "X-Forwarded-Proto": "ftp"},
    ]
    allowed = [{"Origin": f"http://{own}"}, {"Origin": f"https://{own}"} | behind_tls]
    async with browser() as http:
        for headers in refused:
            assert await sse_status(http, base, credentials(token) | headers) == 403, headers
            assert await ws_outcome(http, base, headers, token=token) == "http 403", headers
            assert (await log_in(http, base, token, headers))[0] == 403, headers
        for headers in allowed:
            assert await sse_status(http, base, credentials(token) | headers) == 200, headers
            assert await ws_outcome(http, base, headers, token=token) == "active_tasks", headers
            assert (await log_in(http, base, token, headers))[0] == 200, headers


# --- the same rules, unit level ---------------------------------------------------------


OUT_OF_RANGE_TIMES: dict[str, dict[str, object]] = {
    "exp 400 digits": {"exp": HUGE},
    "exp -400 digits": {"exp": -HUGE},
    "exp 1e308": {"exp": 1e308},
    "exp string of 400 digits": {"exp": str(HUGE)},
    "exp numeric string": {"exp": "2000000000"},
    "exp true": {"exp": True},
    "iat 400 digits": {"exp": 2_000_000_000, "iat": HUGE},
    "iat -400 digits": {"exp": 2_000_000_000, "iat": -HUGE},
    "iat 1e300": {"exp": 2_000_000_000, "iat": 1e300},
    "nbf 400 digits": {"exp": 2_000_000_000, "nbf": HUGE},
}


@pytest.mark.parametrize("claims", OUT_OF_RANGE_TIMES.values(), ids=OUT_OF_RANGE_TIMES.keys())
def test_out_of_range_timestamps_are_invalid_tokens(claims: dict[str, object]) -> None:
    with pytest.raises(InvalidToken):
        verify_token(SECRET, jwt.encode({"sub": "u", **claims}, SECRET, algorithm="HS256"))


async def make_client(aiohttp_client: AiohttpClient, config: Config, **changes: Any) -> TestClient:
    client: TestClient = await aiohttp_client(
        await create_app(config.replace(cookie_secure=False, **changes))
    )
    return client


async def test_session_lasts_no_longer_than_its_token(
    config: Config, aiohttp_client: AiohttpClient, token_for: TokenFor, user_id: str
) -> None:
    client = await make_client(aiohttp_client, config)
    token = token_for(user_id, ttl_s=30)
    login = await client.post("/auth/session", json={"token": token})
    assert login.status == 200
    assert 0 < int(login.cookies[SESSION_COOKIE]["max-age"]) <= 30
    assert (await login.json())["expires_at"] <= verify_token(SECRET, token).expires_at


async def test_a_rotated_secret_ends_sessions_in_both_storage_modes(
    config: Config, aiohttp_client: AiohttpClient, token_for: TokenFor, user_id: str
) -> None:
    before = await make_client(aiohttp_client, config)
    login = await before.post("/auth/session", json={"token": token_for(user_id)})
    cookie = login.cookies[SESSION_COOKIE].value
    async with before.get("/sse/tasks/", cookies={SESSION_COOKIE: cookie}) as stream:
        assert stream.status == 200

    after = await make_client(aiohttp_client, config, secret=ROTATED_SECRET)
    assert (await after.get("/sse/tasks/", cookies={SESSION_COOKIE: cookie})).status == 401
    async with after.ws_connect("/ws/tasks/", headers=credentials(cookie=cookie)) as ws:
        assert await ws_close_code(ws) == 4401


async def test_logging_out_frees_a_session_slot(
    redis_url: str, aiohttp_client: AiohttpClient, token_for: TokenFor, user_id: str
) -> None:
    config = Config(secret=SECRET, redis_url=redis_url, max_sessions_per_user=2)
    client = await make_client(aiohttp_client, config)

    async def log_in_once() -> str:
        login = await client.post("/auth/session", json={"token": token_for(user_id)})
        client.session.cookie_jar.clear()
        return login.cookies[SESSION_COOKIE].value

    async def streams(cookie: str) -> bool:
        async with client.ws_connect("/ws/tasks/", headers=credentials(cookie=cookie)) as ws:
            return (await ws_json(ws)).get("type") == "active_tasks"

    first, second = await log_in_once(), await log_in_once()
    logout = await client.delete("/auth/session", cookies={SESSION_COOKIE: second})
    assert logout.status == 204
    third = await log_in_once()
    assert await streams(first) and await streams(third)
    assert (await client.get("/sse/tasks/", cookies={SESSION_COOKIE: second})).status == 401
    fourth = await log_in_once()  # over the cap of 2: the oldest goes
    assert (await client.get("/sse/tasks/", cookies={SESSION_COOKIE: first})).status == 401
    assert await streams(third) and await streams(fourth)
    assert await keys_without_ttl(redis_url) in ([], ["streamer:epoch"])


def test_max_sessions_per_user_setting() -> None:
    env = {"STREAMER_SECRET": SECRET}
    assert Config.from_env(env).max_sessions_per_user == DEFAULT_MAX_SESSIONS
    assert Config.from_env(env | {"STREAMER_MAX_SESSIONS_PER_USER": "3"}).max_sessions_per_user == 3
    for bad in ("0", "1001", "ten"):
        with pytest.raises(ConfigError, match="STREAMER_MAX_SESSIONS_PER_USER"):
            Config.from_env(env | {"STREAMER_MAX_SESSIONS_PER_USER": bad})


async def test_logging_out_stores_nothing_that_outlives_the_session(
    redis_url: str, aiohttp_client: AiohttpClient, token_for: TokenFor, user_id: str
) -> None:
    client = await make_client(aiohttp_client, Config(secret=SECRET, redis_url=redis_url))
    for _ in range(20):  # no session, or one that does not exist
        assert (await client.delete("/auth/session")).status == 204
        forged = await client.delete("/auth/session", cookies={SESSION_COOKIE: "0" * 32})
        assert forged.status == 204 and SESSION_COOKIE not in forged.cookies
    async with redis.Redis.from_url(redis_url) as store:
        assert [key async for key in store.scan_iter(match=f"{SESSION_KEY_PREFIX}*")] == []

    login = await client.post("/auth/session", json={"token": token_for(user_id, ttl_s=30)})
    cookie = login.cookies[SESSION_COOKIE].value
    assert (await client.delete("/auth/session", cookies={SESSION_COOKIE: cookie})).status == 204
    async with redis.Redis.from_url(redis_url) as store:
        assert 0 < await store.ttl(f"{SESSION_KEY_PREFIX}{cookie}") <= 30
