"""The React hook of the migration guide (docs/examples/useTaskStream.js), in a React app
in real headless Chromium, against `streamer serve` on Redis: the shape of a Channels
`useTaskWebSocket` hook, on both transports."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import urlencode

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from streamer.publisher import Publisher

from .browser import Browser
from .processes import ServerProcess
from .waiting import eventually

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "tests" / "js"
REACT = PAGE / "node_modules"
HOOK = ROOT / "docs" / "examples" / "useTaskStream.js"


@pytest.fixture
async def page_server(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
) -> TestServer:
    """The React app's own origin (as a front end served apart from the stream)."""
    if not (REACT / "react" / "umd").is_dir():
        pytest.fail("React is not installed: `npm ci --prefix tests/js`", pytrace=False)
    files = {
        "/react.js": REACT / "react" / "umd" / "react.development.js",
        "/react-dom.js": REACT / "react-dom" / "umd" / "react-dom.development.js",
        "/react-shim.js": PAGE / "react-shim.js",
        "/useTaskStream.js": HOOK,
    }

    async def index(request: web.Request) -> web.Response:
        html = (PAGE / "index.html").read_text().replace("STREAMER", request.query["streamer"])
        return web.Response(text=html, content_type="text/html")

    async def script(request: web.Request) -> web.Response:
        body = files[request.path].read_text()
        return web.Response(text=body, content_type="text/javascript")

    app = web.Application()
    app.router.add_get("/", index)
    for path in files:
        app.router.add_get(path, script)
    return await aiohttp_server(app)


@pytest.fixture
def server(
    page_server: TestServer,
    process_env: dict[str, str],
    redis_url: str,
    start_process: Callable[..., ServerProcess],
) -> ServerProcess:
    origin = str(page_server.make_url("/")).rstrip("/")
    env = {**process_env, "STREAMER_REDIS_URL": redis_url, "STREAMER_ALLOWED_ORIGINS": origin}
    process = start_process(["streamer", "serve", "--port", "{port}"], env)
    process.wait_healthy()
    return process


async def open_app(
    browser: Browser, page_server: TestServer, server: ServerProcess, token: str, transport: str
) -> None:
    query = urlencode({"streamer": server.base_url, "token": token, "transport": transport})
    await browser.navigate(f"{page_server.make_url('/')}?{query}")


def task_js(task_id: str) -> str:
    return f"window.hook?.activeTasks[{json.dumps(task_id)}]"


@pytest.mark.parametrize("transport", ["websocket", "sse"])
async def test_the_hook_shows_tasks_answers_commands_and_calls_back(
    browser: Browser,
    page_server: TestServer,
    server: ServerProcess,
    publisher: Publisher,
    token_for: Callable[..., str],
    user_id: str,
    transport: str,
) -> None:
    publisher.progress(user_id, "t1", progress=40, current_step="a", task_name="Report")
    await open_app(browser, page_server, server, token_for(user_id), transport)
    await browser.wait_for("window.hook?.isConnected === true", what="isConnected")
    await browser.wait_for(f"{task_js('t1')}?.progress === 40", what="the snapshot")

    # A producer that publishes only the step: the entry still has its progress.
    publisher.progress(user_id, "t1", current_step="b")
    await browser.wait_for(f"{task_js('t1')}.current_step === 'b'", what="the second event")
    assert await browser.evaluate(f"{task_js('t1')}.progress") == 40
    assert await browser.evaluate("window.seen.progress.map((m) => m.current_step)") == ["b"]
    shown = await browser.evaluate("document.querySelector('[data-task-id=\"t1\"]').textContent")
    assert shown == "Report: 40% b (PROGRESS)"

    status = await browser.evaluate("window.hook.getTaskStatus('t1')")
    assert (status["task_id"], status["progress"], status["current_step"]) == ("t1", 40, "b")
    assert await browser.evaluate("window.hook.getTaskStatus('not-mine')") is None
    assert await browser.evaluate("window.hook.cancelTask('t1')") is True
    await eventually(lambda: publisher.is_cancelled(user_id, "t1"), what="the cancel")

    publisher.completed(user_id, "t1", status="SUCCESS", result_data={"rows": 3})
    await browser.wait_for("window.seen.completed.length === 1", what="onCompleted")
    publisher.completed(user_id, "t2", status="FAILURE", error_message="disk full")
    await browser.wait_for("window.seen.errors.length === 1", what="onError")
    assert await browser.evaluate("window.seen.errors[0].error_message") == "disk full"

    await browser.evaluate("window.hook.refreshActiveTasks()")
    await browser.wait_for(
        "Object.keys(window.hook.activeTasks).length === 0", what="no unfinished tasks"
    )


@pytest.mark.parametrize("transport", ["websocket", "sse"])
async def test_a_refused_token_calls_on_error_once_and_does_not_loop(
    browser: Browser,
    page_server: TestServer,
    server: ServerProcess,
    transport: str,
) -> None:
    await open_app(browser, page_server, server, "not-a-token", transport)
    await browser.wait_for("window.seen?.errors.length === 1", what="onError")
    assert await browser.evaluate("window.hook.isConnected") is False
    refusals = 'streamer_refusals_total{reason="unauthorized"}'

    def refused() -> str:
        return next(
            line for line in server.get("/metrics")[1].decode().splitlines() if refusals in line
        )

    first = refused()
    # Still one refusal a while later: the hook does not reconnect with a refused token.
    await browser.wait_for(
        "new Promise((done) => setTimeout(() => done(true), 3000))", what="3 s to pass"
    )
    assert refused() == first
    assert await browser.evaluate("window.seen.errors.length") == 1
