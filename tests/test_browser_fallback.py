"""The demo page behind real nginx configurations that break WebSocket (or buffer even
SSE): streamer.js in `transport: "auto"` ends on SSE (or long polling) by itself, shows
every event once, and never storms the server with reconnects."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlencode

import aiohttp
import pytest

import streamer
from streamer.handlers.ws import CLOSE_CODES, CLOSE_TOO_MANY
from streamer.publisher import Publisher
from streamer.reasons import Reason

from .browser import Browser
from .nginx import BUFFERING_SITE, Nginx
from .processes import RedisServer, ServerProcess
from .waiting import eventually

WS_LOCATION_HEADERS = (
    "proxy_set_header Upgrade $http_upgrade;\n"
    "        proxy_set_header Connection $connection_upgrade;"
)
WS_TIMEOUTS = "proxy_read_timeout 1h;\n        proxy_send_timeout 1h;"
FIRST_EVENT_BOUND_S = 15.0


def _replace(site: str, old: str, new: str) -> str:
    assert site.count(old) == 1, f"the template changed: {old!r}"
    return site.replace(old, new)


PROXIES: dict[str, Callable[[str], str]] = {
    # A proxy that does not pass the upgrade on: the service sees a plain GET.
    "drops-upgrade": lambda site: _replace(
        site, WS_LOCATION_HEADERS, 'proxy_set_header Connection "";'
    ),
    # A proxy that refuses upgrades outright.
    "forbids-upgrade": lambda site: _replace(
        site, "location /ws/ {\n", "location /ws/ {\n        if ($http_upgrade) { return 403; }\n"
    ),
    # WebSockets open, then die after 1 s without upstream data (heartbeats are 30 s).
    "kills-idle-websockets": lambda site: _replace(
        site, WS_TIMEOUTS, "proxy_read_timeout 1s;\n        proxy_send_timeout 1s;"
    ),
}

# Records the ids of the events the page handles from now on.
RECORD_JS = """
(() => {
  const stream = window.taskStream;
  const handle = stream.onEvent;
  window.seenIds = [];
  stream.onEvent = (message) => {
    if (message.type !== "active_tasks") window.seenIds.push(message.id);
    handle(message);
  };
  return true;
})()
"""


# Records when each check of whether the server answers (`/healthz`) ended, and how.
RECORD_REACHABILITY_CHECKS_JS = """
(() => {
  window.healthChecks = [];
  const fetch = window.fetch;
  window.fetch = function (url, options) {
    const answer = fetch.apply(this, arguments);
    if (String(url).includes("/healthz")) {
      answer.then(
        () => window.healthChecks.push([Date.now(), true]),
        () => window.healthChecks.push([Date.now(), false]),
      );
    }
    return answer;
  };
  return true;
})()
"""


@pytest.fixture
def server(
    process_env: dict[str, str], redis_url: str, start_process: Callable[..., ServerProcess]
) -> ServerProcess:
    env = {**process_env, "STREAMER_REDIS_URL": redis_url}
    process = start_process(["streamer", "serve", "--port", "{port}"], env)
    process.wait_healthy()
    return process


@pytest.fixture
def start_nginx(server: ServerProcess, tmp_path: Path) -> Iterator[Callable[[str], Nginx]]:
    started: list[Nginx] = []

    def start(proxy: str) -> Nginx:
        if proxy == "buffers-everything":
            nginx = Nginx(tmp_path / f"nginx-{proxy}", server.port, template=BUFFERING_SITE)
        else:
            nginx = Nginx(tmp_path / f"nginx-{proxy}", server.port, edit=PROXIES[proxy])
        nginx.directory.mkdir()
        started.append(nginx)
        nginx.start()
        return nginx

    try:
        yield start
    finally:
        for nginx in started:
            nginx.stop()


def websocket_attempts(nginx: Nginx) -> int:
    """WebSocket requests nginx has finished (refused, failed or closed)."""
    if not nginx.access_log.exists():
        return 0
    return sum("GET /ws/tasks/" in line for line in nginx.access_log.read_text().splitlines())


def row_js(task_id: str) -> str:
    return f"document.querySelector({json.dumps(f'#tasks [data-task-id={json.dumps(task_id)}]')})"


async def open_demo(browser: Browser, nginx: Nginx, token: str, transport: str) -> float:
    """Load the demo page through nginx; seconds from navigation to its first event."""
    started = time.monotonic()
    await browser.navigate(
        f"{nginx.base_url}/?{urlencode({'token': token, 'transport': transport})}"
    )
    await browser.wait_for(
        "document.body?.dataset.connection === 'open'",
        what="the page's first event",
        timeout=FIRST_EVENT_BOUND_S + 15,
    )
    return time.monotonic() - started


async def run_a_job(browser: Browser, publisher: Publisher, user_id: str) -> list[str]:
    """Publish a job from 20 % to completion; the ids, once each, as the page handled them."""
    await browser.evaluate(RECORD_JS)
    published = [publisher.progress(user_id, "job", progress=p) for p in (20, 40, 60, 80, 100)]
    published.append(publisher.completed(user_id, "job", result_data={"rows": 5}))
    await browser.wait_for(
        f"{row_js('job')}?.dataset.status === 'SUCCESS'", what="the job to complete", timeout=30
    )
    assert await browser.evaluate(f"{row_js('job')}.querySelector('progress').value") == 100
    seen: list[str] = await browser.evaluate("window.seenIds")
    assert seen == published, "an event was lost or shown twice"
    return seen


@pytest.mark.parametrize("proxy", ["drops-upgrade", "forbids-upgrade"])
async def test_auto_ends_on_sse_behind_a_proxy_that_blocks_the_upgrade(
    proxy: str,
    start_nginx: Callable[[str], Nginx],
    browser: Browser,
    publisher: Publisher,
    token_for: Callable[..., str],
    user_id: str,
) -> None:
    nginx = start_nginx(proxy)
    publisher.progress(user_id, "job", progress=0, task_name="export")
    first_event_s = await open_demo(browser, nginx, token_for(user_id), "auto")
    shown = await browser.evaluate("document.getElementById('status').textContent")
    transport = await browser.evaluate("window.taskStream.transport")
    print(f"\n{proxy}: first event after {first_event_s:.2f} s, on {transport} ({shown!r})")
    assert first_event_s < FIRST_EVENT_BOUND_S, f"first event after {first_event_s:.2f} s"
    assert transport == "sse" and "sse" in shown, shown

    await run_a_job(browser, publisher, user_id)
    attempts = websocket_attempts(nginx)
    assert 1 <= attempts <= 3, f"{attempts} WebSocket attempts"


@pytest.mark.parametrize("transport", ["auto", "websocket"])
async def test_websockets_that_die_after_opening_cause_no_reconnect_storm(
    transport: str,
    start_nginx: Callable[[str], Nginx],
    browser: Browser,
    publisher: Publisher,
    token_for: Callable[..., str],
    user_id: str,
) -> None:
    """nginx closes each WebSocket after 1 s: "auto" moves to SSE after two of them;
    "websocket" keeps trying, further and further apart, and still shows every event."""
    nginx = start_nginx("kills-idle-websockets")
    publisher.progress(user_id, "job", progress=0, task_name="export")
    first_event_s = await open_demo(browser, nginx, token_for(user_id), transport)
    window_s = 10
    # The page's own clock: a bounded wait, polled.
    await browser.evaluate(f"window.windowEnds = performance.now() + {window_s * 1000}")
    await browser.wait_for(
        "performance.now() >= window.windowEnds",
        what=f"{window_s} s of dying WebSockets",
        timeout=window_s + 10,
    )
    attempts = websocket_attempts(nginx)
    shown = await browser.evaluate("window.taskStream.transport")
    print(f"\n{transport}: first event after {first_event_s:.2f} s; {attempts} WebSockets "
          f"in ~{window_s} s; now on {shown}")  # fmt: skip
    if transport == "auto":
        assert shown == "sse"
        assert attempts <= 3, f"{attempts} WebSocket attempts in {window_s} s"
    else:
        # They did die and were tried again; without backoff it would be one every
        # ~1.4 s (about 8).
        assert 2 <= attempts <= 5, f"{attempts} WebSocket attempts in {window_s} s"
    await run_a_job(browser, publisher, user_id)


async def test_auto_ends_on_long_polling_behind_a_proxy_that_buffers_everything(
    browser: Browser,
    start_nginx: Callable[[str], Nginx],
    publisher: Publisher,
    token_for: Callable[..., str],
    user_id: str,
) -> None:
    """No upgrade passes and SSE is held in nginx's buffers: the page gets no snapshot over
    SSE, notices, and long-polls."""
    nginx = start_nginx("buffers-everything")
    first_event_s = await open_demo(browser, nginx, token_for(user_id), "auto")
    print(f"\nbuffers-everything: first event after {first_event_s:.2f} s, over poll")
    assert await browser.evaluate("window.taskStream.transport") == "poll"
    assert first_event_s < FIRST_EVENT_BOUND_S + 14  # two failed upgrades, 12 s of SSE, a poll
    ids = await run_a_job(browser, publisher, user_id)
    assert len(ids) == len(set(ids)) == 6


async def test_auto_stays_on_websocket_across_a_restart_of_the_server(
    browser: Browser,
    server: ServerProcess,
    process_env: dict[str, str],
    redis_url: str,
    start_process: Callable[..., ServerProcess],
    publisher: Publisher,
    token_for: Callable[..., str],
    user_id: str,
) -> None:
    """A server that is down (a deploy) cannot be reached at all, which is not a proxy
    refusing the upgrade: the page comes back on WebSocket, not on SSE for good."""
    await browser.navigate(
        f"{server.base_url}/?{urlencode({'token': token_for(user_id), 'transport': 'auto'})}"
    )
    await browser.wait_for(
        "document.body?.dataset.connection === 'open'", what="the page's first event"
    )
    assert await browser.evaluate("window.taskStream.transport") == "websocket"
    server.stop()
    await browser.wait_for(
        "document.body?.dataset.connection !== 'open'", what="the page to see the server go"
    )
    await browser.wait_for(
        "new Promise((done) => setTimeout(() => done(true), 4000))", what="4 s down"
    )
    env = {**process_env, "STREAMER_REDIS_URL": redis_url}
    start_process(["streamer", "serve", "--port", "{port}"], env, port=server.port).wait_healthy()
    await browser.wait_for(
        "document.body?.dataset.connection === 'open'", what="the page back", timeout=40
    )
    assert await browser.evaluate("window.taskStream.transport") == "websocket"
    await run_a_job(browser, publisher, user_id)


async def test_auto_stays_on_websocket_while_the_server_refuses_it_for_now(
    browser: Browser,
    process_env: dict[str, str],
    redis_url: str,
    start_process: Callable[..., ServerProcess],
    publisher: Publisher,
    token_for: Callable[..., str],
    user_id: str,
) -> None:
    """A WebSocket that the server closes with a refusal for now (4029: the user holds
    every stream they may) came through every proxy on the way: the page tries again,
    further and further apart, on WebSocket, and does not leave it for SSE."""
    env = {
        **process_env,
        "STREAMER_REDIS_URL": redis_url,
        "STREAMER_MAX_CONNECTIONS_PER_USER": "1",
    }
    server = start_process(["streamer", "serve", "--port", "{port}"], env)
    server.wait_healthy()
    token = token_for(user_id)

    def refusals() -> int:
        text = server.get("/metrics")[1].decode()
        found = re.search(r'streamer_refusals_total\{reason="too_many_connections"\} (\S+)', text)
        return int(float(found.group(1))) if found else 0

    async with aiohttp.ClientSession() as session:
        held = await session.ws_connect(f"ws://127.0.0.1:{server.port}/ws/tasks/?token={token}")
        assert json.loads((await held.receive()).data)["type"] == "active_tasks"
        await browser.navigate(
            f"{server.base_url}/?{urlencode({'token': token, 'transport': 'auto'})}"
        )
        await eventually(lambda: refusals() >= 3, what="three refused WebSockets", timeout=20)
        assert await browser.evaluate("window.taskStream.transport") == "websocket"
        await held.close()
    await browser.wait_for(
        "document.body?.dataset.connection === 'open'", what="the page's stream", timeout=30
    )
    assert await browser.evaluate("window.taskStream.transport") == "websocket"
    await run_a_job(browser, publisher, user_id)


def test_the_clients_refusals_for_now_are_the_servers_own() -> None:
    """streamer.js tells a refusal for now by the close code and reason the WebSocket
    handler sends with it."""
    source = (Path(streamer.__file__).parent / "static" / "streamer.js").read_text()
    refusals_for_now = (
        Reason.TOO_MANY_CONNECTIONS,
        Reason.TOO_MANY_OPENINGS,
        Reason.BROKER_UNAVAILABLE,
        Reason.AUTH_UNAVAILABLE,
        Reason.SHUTTING_DOWN,
        Reason.SHUTDOWN,
    )
    for reason in refusals_for_now:
        code, text = CLOSE_CODES[reason]
        if code == CLOSE_TOO_MANY:
            assert f"const CLOSE_TOO_MANY = {code};" in source
            continue
        listed = re.search(rf"\n\s*{code}: new Set\(\[(.*?)\]\)", source)
        assert listed is not None, code
        assert json.dumps(text.decode()) in listed.group(1), (code, text)


async def test_auto_stays_on_sse_while_its_proxy_cannot_be_reached(
    browser: Browser,
    server: ServerProcess,
    process_env: dict[str, str],
    redis_url: str,
    start_process: Callable[..., ServerProcess],
    start_nginx: Callable[[str], Nginx],
    publisher: Publisher,
    token_for: Callable[..., str],
    user_id: str,
) -> None:
    """On SSE behind a proxy that blocks the upgrade, the server goes (the proxy answers
    502, and the page opens new streams), then the network to the proxy hangs (it takes
    connections and answers nothing) for longer than the page waits for a stream's first
    message: the server cannot be reached at all, which is not a buffering proxy, and the
    page comes back on SSE, not on long polling for good."""
    nginx = start_nginx("drops-upgrade")
    await open_demo(browser, nginx, token_for(user_id), "auto")
    assert await browser.evaluate("window.taskStream.transport") == "sse"
    server.stop()
    await browser.wait_for(
        "document.getElementById('status').textContent.includes('reconnecting in')",
        what="the page to give its stream up (the proxy answers 502) and wait to open another",
    )
    nginx.stop()
    held: list[asyncio.StreamWriter] = []

    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        await reader.read()

    black_hole = await asyncio.start_server(hang, "127.0.0.1", nginx.port)
    await browser.evaluate(RECORD_REACHABILITY_CHECKS_JS)
    try:
        # The page's next stream (within its 10 s back-off) hangs for longer than the 12 s
        # it waits for a first message; it must not move on.
        down_until = time.monotonic() + 26
        while time.monotonic() < down_until:
            assert await browser.evaluate("window.taskStream.transport") == "sse"
            await asyncio.sleep(0.2)
        assert held, "the page never tried the proxy while it hung"
        assert await browser.evaluate("window.healthChecks.length"), "the page never checked"
    finally:
        black_hole.close()
        for writer in held:
            writer.close()
        await black_hole.wait_closed()
    env = {**process_env, "STREAMER_REDIS_URL": redis_url}
    start_process(["streamer", "serve", "--port", "{port}"], env, port=server.port).wait_healthy()
    # Back just before the page's next check (12 s after its last failed one), while its
    # stream still waits to retry: the server answers before the stream does, which is
    # no reason to leave it.
    checks = await browser.evaluate("window.healthChecks.length")
    failed_at = await browser.wait_for(
        f"window.healthChecks.length > {checks} && window.healthChecks.at(-1)",
        what="a check that finds the proxy down",
        timeout=30,
    )
    assert failed_at[1] is False
    await browser.wait_for(
        f"Date.now() >= {failed_at[0] + 11600}", what="the moment before the next check"
    )
    nginx.start()
    await browser.wait_for(
        "document.body?.dataset.connection === 'open'", what="the page back", timeout=40
    )
    assert await browser.evaluate("window.taskStream.transport") == "sse"
    await run_a_job(browser, publisher, user_id)


async def test_auto_does_not_take_a_stalled_redis_for_a_buffering_proxy(
    browser: Browser,
    start_nginx: Callable[[str], Nginx],
    redis_server: RedisServer,
    publisher: Publisher,
    token_for: Callable[..., str],
    user_id: str,
) -> None:
    """Behind a proxy that blocks the upgrade, the page opens its event stream while Redis
    stalls: the server sends nothing until it gives up on Redis (10 s) and refuses the
    stream. Not a buffering proxy: the page stays on SSE, and is there once Redis is back."""
    nginx = start_nginx("drops-upgrade")
    with redis_server.paused():
        await browser.navigate(f"{nginx.base_url}/?{urlencode({'token': token_for(user_id)})}")
        stalled_until = time.monotonic() + 16
        while time.monotonic() < stalled_until:
            transport = await browser.evaluate("window.taskStream?.transport ?? null")
            assert transport != "poll", "a stalled Redis was taken for a buffering proxy"
            await asyncio.sleep(0.2)
        assert await browser.evaluate("window.taskStream.transport") == "sse"
    await browser.wait_for(
        "document.body?.dataset.connection === 'open'", what="the page's stream", timeout=40
    )
    assert await browser.evaluate("window.taskStream.transport") == "sse"
    await run_a_job(browser, publisher, user_id)
