"""Sessions, origins and CORS, limits, isolation under load, and what the logs keep."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from streamer.access_log import redact
from streamer.app import create_app
from streamer.app_keys import BROKER, HUB
from streamer.auth.sessions import SESSION_COOKIE
from streamer.config import Config
from streamer.events import progress_event
from streamer.rate_limit import TokenBucket, opening_burst

from .clients import SseReader, ws_close_code, ws_json
from .raw_ws import RawWebSocket
from .waiting import eventually

TokenFor = Callable[..., str]
AiohttpClient = Callable[..., Any]
ALLOWED = "https://app.example.com"


async def make_client(aiohttp_client: AiohttpClient, config: Config, **changes: Any) -> TestClient:
    client: TestClient = await aiohttp_client(await create_app(config.replace(**changes)))
    return client


# --- sessions ---------------------------------------------------------------------------


async def test_session_cookie_flow(
    config: Config, aiohttp_client: AiohttpClient, token_for: TokenFor, user_id: str
) -> None:
    # The test client speaks plain http, where browsers never send a Secure cookie back.
    client = await make_client(aiohttp_client, config, cookie_secure=False)
    login = await client.post(
        "/auth/session", headers={"Authorization": f"Bearer {token_for(user_id)}"}
    )
    assert login.status == 200
    assert (await login.json())["user_id"] == user_id
    cookie = login.cookies[SESSION_COOKIE]
    assert cookie["httponly"] and cookie["samesite"] == "Lax"
    stolen = cookie.value

    # Both transports accept the cookie alone.
    async with client.ws_connect("/ws/tasks/") as ws:
        assert (await ws_json(ws))["type"] == "active_tasks"
        await client.app[BROKER].publish(progress_event(user_id, "t", progress=1))
        assert (await ws_json(ws))["task_id"] == "t"
    sse = await client.get("/sse/tasks/")
    assert sse.status == 200
    assert (await SseReader(sse).next()).event == "active_tasks"
    sse.close()

    logout = await client.delete("/auth/session")
    assert logout.status == 204
    assert (await client.get("/sse/tasks/")).status == 401
    async with client.ws_connect("/ws/tasks/") as ws:
        assert await ws_close_code(ws) == 4401

    # A copy of the cookie taken before logout: with Redis the session is gone
    # server-side; the encrypted cookie of the embedded mode stays valid until it
    # expires (documented in SECURITY.md).
    replay = await client.get("/sse/tasks/", cookies={SESSION_COOKIE: stolen})
    assert replay.status == (401 if config.redis_url else 200)
    replay.close()


async def test_session_from_json_body_and_refusals(
    config: Config, aiohttp_client: AiohttpClient, token_for: TokenFor, user_id: str
) -> None:
    client = await make_client(aiohttp_client, config, cookie_secure=False)
    assert (await client.post("/auth/session", json={"token": token_for(user_id)})).status == 200
    for body in ({}, {"token": 5}, {"token": "garbage"}, ["x"]):
        assert (await client.post("/auth/session", json=body)).status == 401
    assert (await client.post("/auth/session", data=b"{not json")).status == 401
    too_large = await client.post("/auth/session", data=b"{" + b" " * 20_000 + b"}")
    assert too_large.status == 413
    assert (await too_large.json())["code"] == "too_large"
    foreign = await client.post(
        "/auth/session",
        json={"token": token_for(user_id)},
        headers={"Origin": "https://evil.example"},
    )
    assert foreign.status == 403


async def test_tampered_cookie_is_refused(
    config: Config, aiohttp_client: AiohttpClient, token_for: TokenFor, user_id: str
) -> None:
    client = await make_client(aiohttp_client, config, cookie_secure=False)
    login = await client.post("/auth/session", json={"token": token_for(user_id)})
    value = login.cookies[SESSION_COOKIE].value
    client.session.cookie_jar.clear()
    for forged in (value[:-4] + "AAAA", value[::-1], "x", ""):
        response = await client.get("/sse/tasks/", cookies={SESSION_COOKIE: forged})
        assert response.status == 401


async def test_session_cookie_is_secure_by_default(
    config: Config, aiohttp_client: AiohttpClient, token_for: TokenFor
) -> None:
    client = await make_client(aiohttp_client, config)
    login = await client.post("/auth/session", json={"token": token_for("u")})
    cookie = login.cookies[SESSION_COOKIE]
    assert cookie["secure"] and cookie["httponly"] and cookie["samesite"] == "Lax"


async def test_session_ends_with_its_token(
    config: Config, aiohttp_client: AiohttpClient, token_for: TokenFor, user_id: str
) -> None:
    client = await make_client(aiohttp_client, config, cookie_secure=False)
    await client.post("/auth/session", json={"token": token_for(user_id, ttl_s=5)})
    async with client.ws_connect("/ws/tasks/") as ws:
        await ws_json(ws)
        assert await ws_close_code(ws) == 4401  # at the token's expiry
    assert (await client.get("/sse/tasks/")).status == 401


# --- origins and CORS -------------------------------------------------------------------


async def test_sse_origins_and_cors(
    config: Config, aiohttp_client: AiohttpClient, token_for: TokenFor
) -> None:
    client = await make_client(aiohttp_client, config, allowed_origins=(ALLOWED,))
    url = f"/sse/tasks/?token={token_for('u')}"

    foreign = await client.get(url, headers={"Origin": "https://evil.example"})
    assert foreign.status == 403
    assert "Access-Control-Allow-Origin" not in foreign.headers

    allowed = await client.get(url, headers={"Origin": ALLOWED})
    assert allowed.status == 200
    assert allowed.headers["Access-Control-Allow-Origin"] == ALLOWED
    assert allowed.headers["Access-Control-Allow-Credentials"] == "true"
    assert "Origin" in allowed.headers["Vary"]
    allowed.close()

    no_origin = await client.get(url)  # curl and servers send none
    assert no_origin.status == 200 and "Access-Control-Allow-Origin" not in no_origin.headers
    no_origin.close()

    preflight = await client.options(
        "/sse/tasks/",
        headers={"Origin": ALLOWED, "Access-Control-Request-Headers": "authorization"},
    )
    assert preflight.status == 204
    assert "Authorization" in preflight.headers["Access-Control-Allow-Headers"]
    denied = await client.options("/sse/tasks/", headers={"Origin": "https://evil.example"})
    assert denied.status == 403

    async with client.ws_connect(f"/ws/tasks/?token={token_for('u')}", origin=ALLOWED) as ws:
        assert (await ws_json(ws))["type"] == "active_tasks"


@pytest.mark.parametrize("origin", ["http://[", "https://[::1", "http://a]b"])
async def test_an_origin_that_is_not_a_url_is_refused_like_a_foreign_one(
    config: Config, aiohttp_client: AiohttpClient, token_for: TokenFor, origin: str
) -> None:
    client = await make_client(aiohttp_client, config, allowed_origins=(ALLOWED,))
    token = token_for("u")
    headers = {"Origin": origin}
    for path in ("/sse/tasks/", "/poll/tasks/", "/api/tasks/"):
        response = await client.get(f"{path}?token={token}", headers=headers)
        assert response.status == 403, path
        assert (await response.json())["code"] == "origin_not_allowed", path
    login = await client.post("/auth/session", json={"token": token}, headers=headers)
    assert login.status == 403
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.ws_connect(f"/ws/tasks/?token={token}", headers=headers)
    assert refused.value.status == 403
    async with client.ws_connect(f"/ws/tasks/?token={token}", origin=ALLOWED) as ws:
        assert (await ws_json(ws))["type"] == "active_tasks"  # and it still serves


# --- limits -----------------------------------------------------------------------------


async def test_connection_limits(
    config: Config, aiohttp_client: AiohttpClient, token_for: TokenFor
) -> None:
    client = await make_client(
        aiohttp_client, config, max_connections_per_user=2, max_connections=4
    )
    alice, bob, carol = token_for("alice"), token_for("bob"), token_for("carol")
    async with (
        client.ws_connect(f"/ws/tasks/?token={alice}") as first,
        client.ws_connect(f"/ws/tasks/?token={alice}") as second,
    ):
        await ws_json(first)
        await ws_json(second)
        async with client.ws_connect(f"/ws/tasks/?token={alice}") as third:
            assert await ws_close_code(third) == 4029
        refused = await client.get(f"/sse/tasks/?token={alice}")
        assert refused.status == 429 and (await refused.json())["code"] == "too_many_connections"
        assert refused.headers["Retry-After"]

        # Another user is not affected, up to the per-process limit.
        bob_sse = await client.get(f"/sse/tasks/?token={bob}")
        assert bob_sse.status == 200
        async with client.ws_connect(f"/ws/tasks/?token={bob}") as bob_ws:
            await ws_json(bob_ws)
            assert len(client.app[HUB]) == 4
            full = await client.get(f"/sse/tasks/?token={carol}")
            assert full.status == 429
            # The connected clients keep receiving.
            await client.app[BROKER].publish(progress_event("alice", "t", progress=1))
            assert (await ws_json(first))["task_id"] == "t"
            assert (await ws_json(second))["task_id"] == "t"
        bob_sse.close()
    assert (await client.get("/sse/tasks/?token=nonsense")).status == 401
    metrics = await (await client.get("/metrics")).text()
    assert 'streamer_refusals_total{reason="too_many_connections"} 3.0' in metrics
    assert 'streamer_refusals_total{reason="unauthorized"} 1.0' in metrics


async def test_streams_opened_past_the_users_rate_are_refused(
    config: Config, aiohttp_client: AiohttpClient, token_for: TokenFor
) -> None:
    """Each opening reads the user's snapshot: a user (one token, in a loop) may not make
    the broker read it faster than their rate, on any transport."""
    # A burst of 2 (what a user may hold), then one opening per 10 s: the next turn is
    # further away than an opening may wait for it.
    client = await make_client(
        aiohttp_client, config, openings_per_s=0.1, max_connections_per_user=2
    )
    alice, bob = token_for("alice"), token_for("bob")
    started = time.monotonic()
    for _ in range(2):
        async with client.ws_connect(f"/ws/tasks/?token={alice}") as ws:
            assert (await ws_json(ws))["type"] == "active_tasks"
    async with client.ws_connect(f"/ws/tasks/?token={alice}") as ws:
        assert await ws_close_code(ws) == 4029
        assert ws.close_code == 4029
    # A long poll that resumes reads the snapshot too.
    for path in ("/sse/tasks/?", "/poll/tasks/?", "/poll/tasks/?last_event_id=0-0&"):
        refused = await client.get(f"{path}token={alice}")
        assert refused.status == 429, path
        assert await refused.json() == {
            "type": "error",
            "code": "too_many_openings",
            "message": "streams opened too fast (at most 0.1 per second for a user); retry later",
        }
        # The next turn is 10 s after the burst began, less what has passed since.
        waited_s = time.monotonic() - started
        assert 10 - waited_s - 1 <= int(refused.headers["Retry-After"]) <= 10, path
    # What admission refuses is refused first; another user has their own turns.
    assert (await client.get(f"/sse/tasks/?token={alice}&task_id=%00")).status == 400
    sse = await client.get(f"/sse/tasks/?token={bob}")
    assert sse.status == 200
    assert (await SseReader(sse).next()).event == "active_tasks"
    sse.close()
    assert (await client.get(f"/poll/tasks/?token={bob}")).status == 200
    metrics = await (await client.get("/metrics")).text()
    assert 'streamer_refusals_total{reason="too_many_openings"} 4.0' in metrics


async def test_streams_opened_past_the_burst_wait_for_their_turn(
    config: Config, aiohttp_client: AiohttpClient, token_for: TokenFor
) -> None:
    """Past the burst, an opening whose turn comes within a second waits for it and is
    served (a long poll answered again and again is slowed, not failed); one further
    away is refused at once."""
    client = await make_client(aiohttp_client, config, openings_per_s=4, max_connections_per_user=8)
    alice = token_for("alice")
    started = time.monotonic()
    for _ in range(8):  # the burst: all that alice may hold
        assert (await client.get(f"/poll/tasks/?token={alice}")).status == 200
    # Twelve more at once, each answered as soon as it is served: a turn every quarter
    # second, four of them within the second an opening may wait, and one more for
    # each quarter second the burst took.
    burst_s = time.monotonic() - started
    answers = await asyncio.gather(*(client.get(f"/poll/tasks/?token={alice}") for _ in range(12)))
    statuses = sorted(answer.status for answer in answers)
    served, refused = statuses.count(200), statuses.count(429)
    assert served + refused == 12, statuses
    assert 4 <= served <= 5 + 4 * burst_s, (statuses, burst_s)
    assert refused >= 1, (statuses, burst_s)
    codes = {(await answer.json()).get("code") for answer in answers if answer.status == 429}
    assert codes == {"too_many_openings"}


async def test_an_opening_refused_for_a_limit_takes_no_turn(
    config: Config, aiohttp_client: AiohttpClient, token_for: TokenFor
) -> None:
    """At the user's limit an opening is refused at once as too many connections, and
    is not made to wait for a turn it could not use."""
    # One stream, and one turn every 10 s: the held stream took the turn there was.
    client = await make_client(
        aiohttp_client, config, openings_per_s=0.1, max_connections_per_user=1
    )
    alice = token_for("alice")
    async with client.ws_connect(f"/ws/tasks/?token={alice}") as held:
        assert (await ws_json(held))["type"] == "active_tasks"
        for _ in range(3):
            refused = await client.get(f"/sse/tasks/?token={alice}")
            assert refused.status == 429
            assert (await refused.json())["code"] == "too_many_connections"
    metrics = await (await client.get("/metrics")).text()
    assert 'streamer_refusals_total{reason="too_many_connections"} 3.0' in metrics
    assert 'reason="too_many_openings"' not in metrics


async def test_head_on_a_stream_answers_like_a_get_and_opens_nothing(
    config: Config, aiohttp_client: AiohttpClient, token_for: TokenFor
) -> None:
    """HEAD on the SSE and poll endpoints (what streamer.js asks after a failed stream,
    to tell a refused token from a network fault) gets the status a GET would, at once,
    and opens no stream: no turn is taken, nothing is read from the broker."""
    client = await make_client(
        aiohttp_client, config, openings_per_s=0.1, max_connections_per_user=1
    )
    alice = token_for("alice")
    within = aiohttp.ClientTimeout(total=5)
    kinds = {"/sse/tasks/": "text/event-stream", "/poll/tasks/": "application/json"}
    for _ in range(3):
        for path, kind in kinds.items():
            params = {"token": alice, "last_event_id": "0-0"}
            answer = await client.head(path, params=params, timeout=within)
            assert answer.status == 200, path
            assert answer.headers["Content-Type"].startswith(kind), path
    assert len(client.app[HUB]) == 0
    # No body follows a HEAD: on a kept-alive connection the next answer comes intact.
    assert client.host and client.port
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(
            f"HEAD /sse/tasks/?token={alice} HTTP/1.1\r\nHost: x\r\n\r\n"
            "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
        )
        both = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, rest = both.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and rest.startswith(b"HTTP/1.1 200 "), both
    # The one turn alice has is still hers: her stream opens, and fills her limit.
    async with client.ws_connect(f"/ws/tasks/?token={alice}") as held:
        assert (await ws_json(held))["type"] == "active_tasks"
        for path in kinds:
            refused = await client.head(path, params={"token": alice}, timeout=within)
            assert refused.status == 429, path
            assert refused.headers["Retry-After"], path
    for path in kinds:
        unauthorized = await client.head(path, params={"token": "nonsense"}, timeout=within)
        assert unauthorized.status == 401, path
        assert unauthorized.headers["WWW-Authenticate"] == 'Bearer realm="streamer"'
    metrics = await (await client.get("/metrics")).text()
    assert 'reason="too_many_openings"' not in metrics
    assert 'streamer_refusals_total{reason="too_many_connections"} 2.0' in metrics


async def test_a_client_that_leaves_while_it_waits_gives_its_turn_back(
    config: Config, aiohttp_client: AiohttpClient, token_for: TokenFor
) -> None:
    app = await create_app(config.replace(openings_per_s=1, max_connections_per_user=2))
    client = await aiohttp_client(app, server_kwargs={"handler_cancellation": True})
    alice = token_for("alice")
    for _ in range(2):  # the burst
        assert (await client.get(f"/poll/tasks/?token={alice}")).status == 200
    # The next turn is about a second away: this one waits for it, and leaves.
    with pytest.raises(asyncio.TimeoutError):
        await client.get(f"/poll/tasks/?token={alice}", timeout=aiohttp.ClientTimeout(total=0.2))
    # Its turn is the next one's: kept, that one would be two seconds away and refused.
    assert (await client.get(f"/poll/tasks/?token={alice}")).status == 200


def test_a_reserved_turn_is_the_next_token_to_come(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr("streamer.rate_limit.time.monotonic", lambda: now[0])
    bucket = TokenBucket(rate=2, burst=2)
    assert [bucket.reserve(1.0) for _ in range(2)] == [0.0, 0.0]  # the burst
    # Each further turn comes half a second after the one reserved before it.
    assert [bucket.reserve(1.0) for _ in range(2)] == [0.5, 1.0]
    assert bucket.reserve(1.0) is None  # 1.5 s away: refused, and nothing taken
    now[0] += 0.5
    assert bucket.reserve(1.0) == 1.0
    assert bucket.retry_after_s() == 2
    bucket.give_back()
    assert bucket.reserve(1.0) == 1.0  # the turn given back is the next one's
    assert opening_burst(10, 20) == 20 and opening_burst(10, 5) == 20


async def test_command_rate_limit(
    config: Config, aiohttp_client: AiohttpClient, token_for: TokenFor
) -> None:
    client = await make_client(aiohttp_client, config, commands_per_s=2)
    async with client.ws_connect(f"/ws/tasks/?token={token_for('u')}") as ws:
        await ws_json(ws)
        for _ in range(10):
            await ws.send_json({"type": "ping"})
        replies = [await ws_json(ws) for _ in range(10)]
        assert replies[:4] == [{"type": "pong"}] * 4  # the burst
        assert {r["type"] for r in replies[4:]} <= {"pong", "error"}
        assert any(r.get("code") == "rate_limited" for r in replies[4:])

        # The bucket refills: a ping is answered again within a bounded time.
        async def answered() -> bool:
            await ws.send_json({"type": "ping"})
            return bool((await ws_json(ws))["type"] == "pong")

        # The interval paces the retries: each one costs a token.
        await eventually(
            answered, what="the rate limit to let a command through", timeout=5, interval=0.2
        )

        # A client that keeps flooding is dropped; others are not affected.
        async with client.ws_connect(f"/ws/tasks/?token={token_for('other')}") as other:
            await ws_json(other)
            for _ in range(200):
                await ws.send_json({"type": "ping"})
            assert await ws_close_code(ws) == 4029
            await other.send_json({"type": "ping"})
            assert await ws_json(other) == {"type": "pong"}


@contextlib.asynccontextmanager
async def reading(
    ws: aiohttp.ClientWebSocketResponse,
) -> AsyncIterator[asyncio.Queue[dict[str, object]]]:
    """A client that reads all the time, past its snapshot, and so answers pings
    (aiohttp's client does while it receives): what it reads, in a queue."""
    await ws_json(ws)  # the snapshot
    replies: asyncio.Queue[dict[str, object]] = asyncio.Queue()

    async def read() -> None:
        while True:
            await replies.put(await ws_json(ws, timeout=30))

    reader = asyncio.create_task(read())
    try:
        yield replies
    finally:
        reader.cancel()


async def test_a_client_whose_command_waits_for_the_broker_is_not_taken_for_dead(
    config: Config, aiohttp_client: AiohttpClient, token_for: TokenFor
) -> None:
    """The client answers every ping, but its answers wait unread while its command
    waits for a slow broker (several ping rounds): it is still served afterwards."""
    client = await make_client(aiohttp_client, config, ws_heartbeat_s=1.0)
    broker = client.app[BROKER]
    task_state = broker.task_state

    async def slow_task_state(user_id: str, task_id: str) -> Any:
        # Long enough for a ping round to find the previous ping unanswered: the
        # client's ping comes once a second, at a point of the second of its own.
        await asyncio.sleep(2.5)
        return await task_state(user_id, task_id)

    broker.task_state = slow_task_state  # type: ignore[method-assign]
    async with (
        client.ws_connect(f"/ws/tasks/?token={token_for('u')}") as ws,
        reading(ws) as replies,
    ):
        await ws.send_json({"type": "get_task_status", "task_id": "t"})
        reply = await asyncio.wait_for(replies.get(), 10)
        assert reply == {"type": "task_status", "task_id": "t", "status": None}
        await asyncio.sleep(2.0)  # more ping rounds, answered and read
        await ws.send_json({"type": "ping"})
        assert await asyncio.wait_for(replies.get(), 5) == {"type": "pong"}
        assert len(client.app[HUB]) == 1


async def test_dead_websocket_peers_are_dropped(
    config: Config, aiohttp_client: AiohttpClient, token_for: TokenFor
) -> None:
    client = await make_client(aiohttp_client, config, ws_heartbeat_s=1.0)
    assert client.host and client.port
    async with (
        client.ws_connect(f"/ws/tasks/?token={token_for('u')}") as alive,
        reading(alive) as replies,
    ):
        silent = await asyncio.to_thread(
            RawWebSocket, client.host, client.port, f"/ws/tasks/?token={token_for('u')}"
        )
        try:
            assert len(client.app[HUB]) == 2

            # It answers no ping, so the server gives up on it.
            await eventually(
                lambda: len(client.app[HUB]) != 2, what="the silent peer to be dropped", timeout=10
            )
            # The other one answered every ping round meanwhile and is still served.
            await asyncio.sleep(3.0)  # three more ping rounds
            assert len(client.app[HUB]) == 1
            await alive.send_json({"type": "ping"})
            assert await asyncio.wait_for(replies.get(), 5) == {"type": "pong"}
        finally:
            silent.close()


async def test_oversized_headers_are_refused_and_the_server_keeps_serving(
    config: Config, aiohttp_client: AiohttpClient
) -> None:
    client = await make_client(aiohttp_client, config, max_header_bytes=2048)
    refused = await client.get("/healthz", headers={"X-Big": "x" * 4096})
    assert refused.status in (400, 431)
    assert (await client.get("/healthz")).status == 200


# --- isolation ----------------------------------------------------------------------------


async def test_many_users_interleaved_publishing_never_leak(
    client: TestClient, token_for: TokenFor
) -> None:
    users = [f"iso-{n}" for n in range(12)]
    rng = random.Random(7)
    plan = [(user, step) for user in users for step in range(6)]
    rng.shuffle(plan)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        streams: dict[str, tuple[aiohttp.ClientWebSocketResponse, SseReader]] = {}
        for user in users:
            url = client.make_url(f"/ws/tasks/?token={token_for(user)}")
            ws = await session.ws_connect(url)
            sse = SseReader(
                await session.get(client.make_url(f"/sse/tasks/?token={token_for(user)}"))
            )
            await ws_json(ws)
            await sse.next()
            streams[user] = (ws, sse)
        published: dict[str, list[str]] = {user: [] for user in users}
        broker = client.app[BROKER]
        for user, step in plan:
            event = progress_event(user, f"{user}-task", progress=step, current_step=user)
            published[user].append(str(await broker.publish(event)))
        # Each user's last event is a sentinel; everything before it is counted.
        for user in users:
            ws, sse = streams[user]
            via_ws = [await ws_json(ws) for _ in published[user]]
            via_sse = [(await sse.next()).json for _ in published[user]]
            for received in (via_ws, via_sse):
                assert [m["id"] for m in received] == published[user]
                assert {m["current_step"] for m in received} == {user}
            await ws.send_json({"type": "ping"})
            assert await ws_json(ws) == {"type": "pong"}  # nothing else was queued
            await ws.close()
            sse.response.close()


# --- logs -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/sse/tasks/?token=abc.def.ghi", "/sse/tasks/?token=[redacted]"),
        ("/ws/?task_id=1&token=x&last_event_id=2", "/ws/?task_id=1&token=[redacted]&last_event_id=2"),  # noqa: E501
        ("/x?TOKEN=a&access_token=b", "/x?TOKEN=[redacted]&access_token=[redacted]"),
        ("/x?tok%65n=a&%74oken=b&a=token=c", "/x?tok%65n=[redacted]&%74oken=[redacted]&a=token=c"),
        ("/x?a=1#token=b", "/x?a=1#token=[redacted]"),
        # `;` separates parameters for other parsers (a proxy, a log reader): redacted too.
        ("/x?a=1;token=b", "/x?a=1;token=[redacted]"),
        # A raw `;` in a token (an opaque one) is part of it to aiohttp's parser.
        ("/x?token=ab;cd;ef&a=1", "/x?token=[redacted];[redacted];[redacted]&a=1"),
        ("/healthz", "/healthz"),
    ],
)  # fmt: skip
def test_access_log_redaction(path: str, expected: str) -> None:
    assert redact(path) == expected


async def test_a_wildcard_origin_never_covers_the_session_cookie(
    config: Config, aiohttp_client: AiohttpClient, token_for: TokenFor, user_id: str
) -> None:
    client = await make_client(aiohttp_client, config, allowed_origins=("*",), cookie_secure=False)
    evil = {"Origin": "https://evil.example"}
    # Login and logout from another site are refused even with `*` ...
    login = await client.post("/auth/session", json={"token": token_for(user_id)}, headers=evil)
    assert login.status == 403
    assert (await client.post("/auth/session", json={"token": token_for(user_id)})).status == 200
    # ... and so are cookie-carried streams from another site, while tokens work anywhere.
    assert (await client.get("/sse/tasks/", headers=evil)).status == 403
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.ws_connect("/ws/tasks/", headers=evil)
    assert refused.value.status == 403
    with_token = await client.get(f"/sse/tasks/?token={token_for(user_id)}", headers=evil)
    assert with_token.status == 200
    assert with_token.headers["Access-Control-Allow-Origin"] == "*"
    assert "Access-Control-Allow-Credentials" not in with_token.headers
    with_token.close()
    assert (await client.delete("/auth/session", headers=evil)).status == 403


async def test_login_needs_a_json_body(
    config: Config, aiohttp_client: AiohttpClient, token_for: TokenFor
) -> None:
    """An HTML form (text/plain or urlencoded) posted from elsewhere cannot log in."""
    client = await make_client(aiohttp_client, config, cookie_secure=False)
    body = f'{{"token": "{token_for("u")}"}}'
    for content_type in ("text/plain", "application/x-www-form-urlencoded"):
        response = await client.post(
            "/auth/session", data=body, headers={"Content-Type": content_type}
        )
        assert response.status == 401
        assert SESSION_COOKIE not in response.cookies
