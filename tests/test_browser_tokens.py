"""Tokens that expire, in real headless Chromium: streamer.js asks `getToken()` for a fresh
token before `exp` and when the server refuses the token, resumes without loss, and stops
as unauthorized (once, no loop) when there is no new token."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import urlencode

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

import streamer
from streamer.publisher import Publisher

from .browser import Browser
from .processes import ServerProcess
from .waiting import eventually

TOKEN_TTL_S = 5
STREAMER_JS = Path(streamer.__file__).parent / "static" / "streamer.js"
# The page's timers of 100 s or more run a hundred times faster: the waits of minutes
# streamer.js makes, in seconds (its own figures in what it shows stay as they are).
FAST_LONG_TIMERS = """<script>
const realSetTimeout = window.setTimeout;
window.setTimeout = (callback, ms, ...args) =>
  realSetTimeout(callback, ms >= 100000 ? ms / 100 : ms, ...args);
</script>"""
OPAQUE_TTL_S = 3

# The page: streamer.js from the streamer server, getToken asking the page's own origin.
PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><script src="STREAMER/static/streamer.js"></script></head>
<body><script>
"use strict";
const params = new URLSearchParams(location.search);
window.seen = [];
window.states = [];
window.texts = [];
window.tokenCalls = 0;
window.tokensGot = 0;
window.taskStream = new Streamer.TaskStream({
  url: params.get("streamer"),
  token: params.get("token"),
  transport: params.get("transport"),
  getToken: async () => {
    window.tokenCalls += 1;
    if (params.get("mode") === "hang") return new Promise(() => {});  // never settles
    const response = await fetch("/token?mode=" + params.get("mode"), {cache: "no-store"});
    window.tokensGot += 1;
    return response.ok ? await response.text() : null;
  },
  onEvent: (message) => window.seen.push(message),
  onStatus: (text, state) => { window.states.push(state); window.texts.push(text); },
  pollTimeoutMs: params.has("pollTimeoutMs") ? Number(params.get("pollTimeoutMs")) : undefined,
});
window.taskStream.start();
</script></body></html>
"""


@pytest.fixture
async def page_server(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    token_for: Callable[..., str],
    user_id: str,
) -> TestServer:
    """The page's origin, with /token: a fresh short-lived token ("fresh"), a 401
    ("none"), a token the server refuses ("bad"), after 3 s an hour's token ("slow"), or
    an opaque token that /auth (a delegated auth service) takes for OPAQUE_TTL_S
    ("opaque"); and an /api/tasks/ that answers after 16 s."""

    async def index(request: web.Request) -> web.Response:
        html = PAGE.replace("STREAMER", request.query["streamer"])
        if "fast_long_timers" in request.query:
            html = html.replace("<head>", "<head>" + FAST_LONG_TIMERS, 1)
        return web.Response(text=html, content_type="text/html")

    async def token(request: web.Request) -> web.Response:
        mode = request.query["mode"]
        if mode == "fresh":
            return web.Response(text=token_for(user_id, ttl_s=TOKEN_TTL_S))
        if mode == "bad":
            return web.Response(text="still-not-a-token")
        if mode == "slow":
            await asyncio.sleep(3)
            return web.Response(text=token_for(user_id, ttl_s=3600))
        if mode == "opaque":
            return web.Response(text=f"opaque-{time.time()}")
        return web.Response(status=401)

    async def auth(request: web.Request) -> web.Response:
        token = (await request.json())["token"] or ""
        issued = float(token.removeprefix("opaque-")) if token.startswith("opaque-") else 0
        left = issued + OPAQUE_TTL_S - time.time()
        if left <= 0:
            return web.Response(status=401)
        return web.json_response({"user_id": user_id, "expires_in": left})

    async def slow_api(request: web.Request) -> web.Response:
        await asyncio.sleep(16)
        return web.json_response({"type": "active_tasks", "tasks": []})

    app = web.Application()
    app.router.add_get("/", index)
    app.router.add_get("/token", token)
    app.router.add_get("/api/tasks/", slow_api)
    app.router.add_post("/auth", auth)
    return await aiohttp_server(app)


@pytest.fixture
async def silent_server(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
) -> tuple[TestServer, list[str]]:
    """A server that takes streams and sends nothing on them (as a proxy does whose
    server is gone), serving streamer.js; with the list of the streams it took."""
    opens: list[str] = []
    sockets: set[web.WebSocketResponse] = set()

    async def silent_script(request: web.Request) -> web.Response:
        return web.Response(text=STREAMER_JS.read_text(), content_type="text/javascript")

    async def silent_websocket(request: web.Request) -> web.WebSocketResponse:
        opens.append("websocket")
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        sockets.add(ws)
        async for _ in ws:  # until the page closes it
            pass
        return ws

    async def silent_event_stream(request: web.Request) -> web.StreamResponse:
        opens.append("sse")
        origin = request.headers.get("Origin", "*")
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Access-Control-Allow-Origin": origin}
        )
        await response.prepare(request)
        await asyncio.Event().wait()  # until the page leaves (the server cancels it)
        return response

    app = web.Application()
    app.router.add_get("/static/streamer.js", silent_script)
    app.router.add_get("/ws/tasks/", silent_websocket)
    app.router.add_get("/sse/tasks/", silent_event_stream)

    async def close_sockets(app: web.Application) -> None:
        for ws in sockets:
            await ws.close()

    app.on_shutdown.append(close_sockets)
    return await aiohttp_server(app), opens


StartStreamer = Callable[..., ServerProcess]


@pytest.fixture
def start_streamer(
    page_server: TestServer,
    process_env: dict[str, str],
    redis_url: str,
    start_process: Callable[..., ServerProcess],
) -> StartStreamer:
    """`streamer serve` on another origin than the page's, which it lists."""

    def start(**settings: str) -> ServerProcess:
        origin = str(page_server.make_url("/")).rstrip("/")
        env = {
            **process_env,
            "STREAMER_REDIS_URL": redis_url,
            "STREAMER_ALLOWED_ORIGINS": origin,
            **settings,
        }
        process = start_process(["streamer", "serve", "--port", "{port}"], env)
        process.wait_healthy()
        return process

    return start


@pytest.fixture
def server(start_streamer: StartStreamer) -> ServerProcess:
    return start_streamer()


async def open_page(
    browser: Browser,
    page_server: TestServer,
    server: ServerProcess,
    token: str,
    transport: str,
    mode: str,
    **options: str,
) -> None:
    settings = {"streamer": server.base_url, "transport": transport, "mode": mode, **options}
    query = urlencode({**settings, "token": token} if token else settings)
    await browser.navigate(f"{page_server.make_url('/')}?{query}")


def refusals(server: ServerProcess) -> int:
    """streamer_refusals_total{reason="unauthorized"}: every refused connection attempt."""
    name = 'streamer_refusals_total{reason="unauthorized"}'
    for line in server.get("/metrics")[1].decode().splitlines():
        if line.startswith(name):
            return int(float(line.split()[-1]))
    return 0


def event_ids_js() -> str:
    return "window.seen.filter((m) => m.type === 'task_progress').map((m) => m.id)"


async def publish_and_see(browser: Browser, publisher: Publisher, user_id: str) -> str:
    """Publish an event; its id, once the page has it."""
    sent = publisher.progress(user_id, "t", progress=5)
    await browser.wait_for(f"{event_ids_js()}.includes({json.dumps(sent)})", what="the event")
    return sent


async def pause(browser: Browser, seconds: float) -> None:
    """Let time pass (bounded): the page's own clock, not a synchronisation."""
    await browser.wait_for(
        f"new Promise((done) => setTimeout(() => done(true), {seconds * 1000}))",
        what=f"{seconds} s to pass",
        timeout=seconds + 10,
    )


@pytest.mark.parametrize("transport", ["websocket", "sse", "poll"])
async def test_a_short_lived_token_is_refreshed_before_it_expires(
    transport: str,
    browser: Browser,
    page_server: TestServer,
    server: ServerProcess,
    publisher: Publisher,
    token_for: Callable[..., str],
    user_id: str,
) -> None:
    first_token = token_for(user_id, ttl_s=TOKEN_TTL_S)
    await open_page(browser, page_server, server, first_token, transport, "fresh")
    await browser.wait_for(
        "window.seen?.some((m) => m.type === 'active_tasks')", what="the snapshot"
    )
    published: list[str] = []
    # Twelve events over about 3 token lifetimes: each is awaited before the next.
    for step in range(12):
        published.append(publisher.progress(user_id, "t", progress=step * 8))
        await browser.wait_for(
            f"{event_ids_js()}.includes({json.dumps(published[-1])})",
            what=f"event {step} to arrive",
        )
        await pause(browser, 1.2)
    received = await browser.evaluate(event_ids_js())
    assert received == published  # none lost, none twice, in order
    calls = await browser.evaluate("window.tokenCalls")
    assert calls >= 2, f"getToken called {calls} times in ~15 s of 5-second tokens"
    assert await browser.evaluate("window.taskStream.token") != first_token
    assert "unauthorized" not in await browser.evaluate("window.states")
    # Refreshed before `exp`: the server never had to refuse an expired token.
    assert refusals(server) == 0
    # Commands (over HTTP on SSE) carry the current token: the first one expired long ago.
    active = await browser.evaluate("window.taskStream.getActiveTasks()")
    assert active["type"] == "active_tasks"
    assert [task["task_id"] for task in active["tasks"]] == ["t"]


@pytest.mark.parametrize("transport", ["websocket", "sse", "poll"])
async def test_a_refused_token_is_replaced_once_and_the_stream_resumes(
    transport: str,
    browser: Browser,
    page_server: TestServer,
    server: ServerProcess,
    publisher: Publisher,
) -> None:
    """Not a JWT (no `exp` to read): refreshed only when refused, then it streams."""
    await open_page(browser, page_server, server, "opaque-and-refused", transport, "fresh")
    await browser.wait_for(
        "window.seen?.some((m) => m.type === 'active_tasks')", what="the snapshot"
    )
    assert await browser.evaluate("window.tokenCalls") == 1
    # A command over HTTP refused with 401 is sent once more, with a token from getToken.
    command = """
    new Streamer.TaskStream({
      url: params.get("streamer"), token: "refused-too", transport: "sse",
      getToken: () => { window.tokenCalls += 1; return window.taskStream.token; },
    }).getTaskStatus("unknown")
    """
    reply = await browser.evaluate(command)
    assert reply == {"type": "task_status", "task_id": "unknown", "status": None}
    assert await browser.evaluate("window.tokenCalls") == 2
    # On SSE the refusal is counted twice: the EventSource, and the status check that
    # tells a refused token from a network error (a WebSocket close and a poll's 401 say
    # it by themselves).
    assert refusals(server) == (2 if transport == "sse" else 1)


@pytest.mark.parametrize("transport", ["websocket", "sse", "poll"])
@pytest.mark.parametrize("mode", ["none", "bad", "hang"])
async def test_no_new_token_stops_as_unauthorized_without_a_loop(
    transport: str,
    mode: str,
    browser: Browser,
    page_server: TestServer,
    server: ServerProcess,
    publisher: Publisher,
    token_for: Callable[..., str],
    user_id: str,
) -> None:
    """getToken gives nothing ("none"), a token refused again ("bad"), or never answers
    ("hang", given up after 15 s): the 5-second token expires while streaming, and the
    page stops as unauthorized."""
    await open_page(
        browser, page_server, server, token_for(user_id, ttl_s=TOKEN_TTL_S), transport, mode
    )
    await browser.wait_for(
        "window.seen?.some((m) => m.type === 'active_tasks')", what="the snapshot"
    )
    await browser.wait_for(
        "window.states.at(-1) === 'unauthorized'",
        what="the page to stop as unauthorized",
        timeout=TOKEN_TTL_S + 30,
    )
    first = refusals(server)
    calls = await browser.evaluate("window.tokenCalls")
    # One proactive call before `exp`, one after the refusal: never more.
    assert 1 <= calls <= 2, calls
    await pause(browser, 3)
    assert refusals(server) == first, "the page kept reconnecting"
    assert await browser.evaluate("window.tokenCalls") == calls
    assert await browser.evaluate("window.states.at(-1)") == "unauthorized"
    # A few at most: the expired token and the bad one (on SSE, each counted twice: the
    # EventSource and the status check that tells a refusal from a network error).
    assert first <= 4, first


async def test_a_websocket_refused_at_the_handshake_stops_as_unauthorized_without_a_loop(
    browser: Browser, page_server: TestServer, start_streamer: StartStreamer
) -> None:
    """Refused before the upgrade (as Channels did), a socket just does not open: the
    page asks over HTTP why, and stops as unauthorized instead of retrying for ever."""
    server = start_streamer(STREAMER_WS_REFUSE_AT_HANDSHAKE="true")
    await open_page(browser, page_server, server, "not-a-token", "websocket", "none")
    await browser.wait_for(
        "window.states.at(-1) === 'unauthorized'", what="the page to stop as unauthorized"
    )
    first = refusals(server)
    await pause(browser, 3)
    assert refusals(server) == first, "the page kept reconnecting"
    assert await browser.evaluate("window.states.at(-1)") == "unauthorized"


@pytest.mark.parametrize("transport", ["sse", "poll"])
async def test_a_session_cookie_carries_a_stream_of_another_origin(
    transport: str,
    browser: Browser,
    page_server: TestServer,
    start_streamer: StartStreamer,
    publisher: Publisher,
    token_for: Callable[..., str],
    user_id: str,
) -> None:
    """No token: the session cookie of the streamer's origin (set by logging in there)
    goes with the stream to that origin, from a page of a listed one."""
    server = start_streamer(STREAMER_COOKIE_SECURE="false")
    await browser.navigate(server.base_url + "/")
    login = f"""fetch("/auth/session", {{method: "POST",
        headers: {{"Content-Type": "application/json"}},
        body: JSON.stringify({{token: {json.dumps(token_for(user_id))}}})}})
      .then((response) => response.status)"""
    assert await browser.evaluate(login) == 200
    await open_page(browser, page_server, server, "", transport, "none")
    await browser.wait_for(
        "window.seen?.some((m) => m.type === 'active_tasks')", what="the snapshot"
    )
    await publish_and_see(browser, publisher, user_id)
    assert "unauthorized" not in await browser.evaluate("window.states")


async def test_a_refresh_and_a_refusal_at_once_leave_one_connection(
    browser: Browser,
    page_server: TestServer,
    server: ServerProcess,
    publisher: Publisher,
    token_for: Callable[..., str],
    user_id: str,
) -> None:
    """getToken takes longer than the token has left: the refresh before `exp` and the
    refusal at `exp` both get a new token and reconnect; one connection is left, and
    each event arrives once."""
    await open_page(
        browser, page_server, server, token_for(user_id, ttl_s=TOKEN_TTL_S), "websocket", "slow"
    )
    await browser.wait_for(
        "window.seen?.some((m) => m.type === 'active_tasks')", what="the snapshot"
    )
    await browser.wait_for(
        "window.tokensGot >= 2 && window.states.at(-1) === 'connected'",
        what="both new tokens, and connected with the second",
        timeout=TOKEN_TTL_S + 15,
    )
    published = [publisher.progress(user_id, "t", progress=step) for step in range(3)]
    await browser.wait_for(
        f"{event_ids_js()}.includes({json.dumps(published[-1])})", what="the events"
    )
    await pause(browser, 1)
    assert await browser.evaluate(event_ids_js()) == published  # each once

    def one_websocket() -> bool:
        return 'streamer_connections{transport="websocket"} 1.0' in (
            server.get("/metrics")[1].decode()
        )

    await eventually(lambda: asyncio.to_thread(one_websocket), what="one WebSocket left")


async def test_a_raw_message_is_answered_in_its_own_turn(
    browser: Browser,
    page_server: TestServer,
    server: ServerProcess,
    token_for: Callable[..., str],
    user_id: str,
) -> None:
    """The server answers every message in order: the error a raw `send()` gets is its
    own, not the reply of a command sent after it."""
    await open_page(browser, page_server, server, token_for(user_id), "websocket", "fresh")
    await browser.wait_for("window.states.at(-1) === 'connected'", what="the WebSocket")
    reply = await browser.evaluate(
        """(async () => {
             const stream = window.taskStream;
             stream.send({type: "ping"});
             stream.send({type: "get_task_status"});  // no task_id: an error
             return await stream.getTaskStatus("t1");
           })()"""
    )
    assert reply == {"type": "task_status", "task_id": "t1", "status": None}


async def test_a_command_over_http_that_gets_no_answer_times_out(
    browser: Browser, page_server: TestServer, server: ServerProcess
) -> None:
    await open_page(browser, page_server, server, "", "sse", "none")
    await browser.wait_for("typeof Streamer !== 'undefined'", what="streamer.js")
    await browser.evaluate(
        """new Streamer.TaskStream({url: location.origin, token: "t", transport: "sse"})
             .getActiveTasks().then(() => "answered", (error) => error.code)
             .then((outcome) => { window.outcome = outcome; }), true"""
    )
    outcome = await browser.wait_for("window.outcome", what="the command to end", timeout=25)
    assert outcome == "timeout"


@pytest.mark.parametrize("transport", ["websocket", "sse", "poll"])
async def test_opaque_tokens_are_replaced_at_every_refusal(
    transport: str,
    browser: Browser,
    page_server: TestServer,
    start_streamer: StartStreamer,
    publisher: Publisher,
    user_id: str,
) -> None:
    """Tokens of the application (delegated auth) that expire and are not JWTs: each is
    replaced when the server refuses it, however long the stream was idle; a long poll
    of an idle user answers nothing, which must not count as a second refusal."""
    server = start_streamer(
        STREAMER_AUTH_URL=str(page_server.make_url("/auth")), STREAMER_AUTH_CACHE_S="0"
    )
    token = f"opaque-{time.time()}"
    await open_page(browser, page_server, server, token, transport, "opaque")
    await browser.wait_for(
        "window.seen?.some((m) => m.type === 'active_tasks')", what="the snapshot"
    )
    # Three lifetimes of the tokens, with nothing published.
    await browser.wait_for(
        "window.tokenCalls >= 3",
        what="three refusals, each replaced",
        timeout=OPAQUE_TTL_S * 3 + 20,
    )
    assert "unauthorized" not in await browser.evaluate("window.states")
    await publish_and_see(browser, publisher, user_id)
    assert "unauthorized" not in await browser.evaluate("window.states")


async def test_a_poll_unanswered_for_too_long_is_made_again(
    browser: Browser,
    page_server: TestServer,
    start_streamer: StartStreamer,
    publisher: Publisher,
    token_for: Callable[..., str],
    user_id: str,
) -> None:
    """The server holds a poll up to its poll timeout; one that stays unanswered longer
    than the page's pollTimeoutMs is on a dead connection (here: the server's timeout is
    longer than the page allows), and the page polls again, resuming where it was."""
    server = start_streamer(STREAMER_POLL_TIMEOUT_S="60")
    await open_page(
        browser, page_server, server, token_for(user_id, ttl_s=3600), "poll", "none",
        pollTimeoutMs="1500",
    )  # fmt: skip
    await browser.wait_for(
        "window.seen?.some((m) => m.type === 'active_tasks')", what="the snapshot"
    )
    await browser.wait_for(
        "window.texts.some((text) => text.includes('no answer in 2 s'))",
        what="the held poll given up",
    )
    # The polls after it are held too (resumed, nothing new): the page shows itself
    # connected while they are (the server took them), not "connecting".
    await browser.wait_for(
        "window.states.lastIndexOf('connected') > window.states.indexOf('reconnecting')",
        what="the page connected again while its poll is held",
    )
    sent = await publish_and_see(browser, publisher, user_id)
    assert await browser.evaluate(event_ids_js()) == [sent]
    # A bad value is refused at once.
    refused = """(() => { try { new Streamer.TaskStream({pollTimeoutMs: -1}); return null; }
                 catch (error) { return error.message; } })()"""
    assert "pollTimeoutMs must be a positive number" in await browser.evaluate(refused)


@pytest.mark.parametrize("transport", ["websocket", "sse"])
async def test_a_stream_gone_silent_is_taken_for_dead_and_opened_again(
    transport: str,
    browser: Browser,
    page_server: TestServer,
    start_streamer: StartStreamer,
    publisher: Publisher,
    token_for: Callable[..., str],
    user_id: str,
) -> None:
    """A connection that died without the browser noticing (here: the server stopped,
    its sockets open and silent) is noticed by the page: its heartbeat messages stop.
    The page reconnects, and once the server answers again, resumes with what was
    published meanwhile."""
    server = start_streamer(STREAMER_HEARTBEAT_S="0.5", STREAMER_WS_HEARTBEAT_S="0.5")
    await open_page(browser, page_server, server, token_for(user_id, ttl_s=3600), transport, "none")
    await browser.wait_for(
        "window.seen?.some((m) => m.type === 'active_tasks')", what="the snapshot"
    )
    await pause(browser, 4)  # longer than the silence allowed: heartbeats keep it
    assert await browser.evaluate("window.states.at(-1)") == "connected"
    assert "heartbeat" not in await browser.evaluate("window.seen.map((m) => m.type)")
    os.kill(server.process.pid, signal.SIGSTOP)
    try:
        await browser.wait_for(
            "window.states.at(-1) === 'reconnecting'", what="the dead stream noticed"
        )
        texts = await browser.evaluate("window.texts")
        what = "the WebSocket" if transport == "websocket" else "the event stream"
        assert f"{what} brought nothing for 4 s" in texts[-1], texts
        meanwhile = publisher.progress(user_id, "t", progress=7)
    finally:
        os.kill(server.process.pid, signal.SIGCONT)
    await browser.wait_for(
        f"{event_ids_js()}.includes({json.dumps(meanwhile)})", what="the event published meanwhile"
    )
    assert await browser.evaluate("window.states.at(-1)") == "connected"
    assert await browser.evaluate(event_ids_js()) == [meanwhile]


@pytest.mark.parametrize("transport", ["websocket", "sse"])
async def test_a_stream_open_but_silent_from_the_start_is_opened_again(
    transport: str,
    browser: Browser,
    page_server: TestServer,
    silent_server: tuple[TestServer, list[str]],
) -> None:
    """A stream that opens and then brings nothing, not even the heartbeat that tells
    its interval (a proxy that took the connection while the server behind it is gone),
    is taken for dead after the first heartbeat's allowance (120 s, here a hundred times
    faster), and opened again."""
    server, opens = silent_server
    silent = str(server.make_url("/")).rstrip("/")
    settings = {"streamer": silent, "transport": transport, "mode": "none", "token": "t"}
    await browser.navigate(f"{page_server.make_url('/')}?{urlencode(settings)}&fast_long_timers")
    what = "the WebSocket" if transport == "websocket" else "the event stream"
    await browser.wait_for(
        f"window.texts.some((text) => text.includes({json.dumps(what + ' brought nothing')}))",
        what="the silent stream given up",
    )
    texts = await browser.evaluate("window.texts")
    given_up = [text for text in texts if "brought nothing" in text]
    assert given_up[0].startswith(f"{what} brought nothing for 120 s"), texts
    assert await browser.evaluate("window.seen") == []
    assert texts.index(given_up[0]) > texts.index(f"connected ({transport})"), texts
    await eventually(lambda: opens.count(transport) >= 2, what="the stream opened again")
    assert set(opens) == {transport}
