"""End to end in real headless Chromium: the demo page and streamer.js against `streamer serve`."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest

from streamer.publisher import Publisher

from .browser import Browser
from .processes import ServerProcess
from .waiting import eventually

Row = dict[str, Any]
SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "demo-page.png"

# Every task row of the page, in the order shown.
ROWS_JS = """
Array.from(document.querySelectorAll("#tasks [data-task-id]"), (row) => ({
  task_id: row.dataset.taskId,
  status: row.dataset.status,
  progress: row.querySelector("progress").value,
  name: row.querySelector(".task-name").textContent,
  text: row.textContent,
  cancel_shown: Boolean(row.querySelector("button")) && !row.querySelector("button").hidden,
}))
"""


@pytest.fixture
def server_env(process_env: dict[str, str], redis_url: str) -> dict[str, str]:
    return {**process_env, "STREAMER_REDIS_URL": redis_url}


@pytest.fixture
def server(
    server_env: dict[str, str], start_process: Callable[..., ServerProcess]
) -> ServerProcess:
    process = start_process(["streamer", "serve", "--port", "{port}"], server_env)
    process.wait_healthy()
    return process


def page_url(server: ServerProcess, token: str, transport: str) -> str:
    return f"{server.base_url}/?{urlencode({'token': token, 'transport': transport})}"


def row_js(task_id: str) -> str:
    return f"document.querySelector({json.dumps(f'#tasks [data-task-id={json.dumps(task_id)}]')})"


async def open_page(browser: Browser, url: str) -> None:
    await browser.navigate(url)
    await browser.wait_for(
        "document.body && document.body.dataset.connection === 'open'",
        what="the page to receive active_tasks",
    )


async def rows(browser: Browser) -> dict[str, Row]:
    shown: list[Row] = await browser.evaluate(ROWS_JS)
    return {row["task_id"]: row for row in shown}


async def wait_status(browser: Browser, task_id: str, status: str) -> None:
    await browser.wait_for(
        f"{row_js(task_id)}?.dataset.status === {json.dumps(status)}",
        what=f"task {task_id} to show {status}",
    )


@pytest.mark.parametrize("transport", ["websocket", "sse", "auto"])
async def test_page_renders_active_tasks(
    transport: str,
    server: ServerProcess,
    publisher: Publisher,
    browser: Browser,
    token_for: Callable[..., str],
    user_id: str,
) -> None:
    publisher.progress(
        user_id,
        "t-old",
        progress=10,
        current_step="downloading",
        task_name="import",
        status="STARTED",
    )
    markup = "<img src=x onerror=alert(1)> thumbnails"
    publisher.progress(
        user_id,
        "t-new",
        progress=40,
        current_step="resizing",
        task_name=markup,
        processed_items=4,
        total_items=10,
    )
    publisher.progress("someone-else", "t-foreign", progress=99, task_name="not yours")

    await open_page(browser, page_url(server, token_for(user_id), transport))

    shown = await browser.evaluate(ROWS_JS)
    assert [row["task_id"] for row in shown] == ["t-new", "t-old"]  # newest first
    new, old = shown
    assert (new["status"], new["progress"], new["name"]) == ("PROGRESS", 40, markup)
    assert "resizing" in new["text"] and "4/10 items" in new["text"]
    assert (old["status"], old["progress"], old["name"]) == ("STARTED", 10, "import")
    assert "downloading" in old["text"]
    # Text, not markup: the task name did not become an element.
    assert await browser.evaluate("document.querySelectorAll('#tasks img').length") == 0
    # Cancelling works on every transport (over HTTP on SSE).
    assert new["cancel_shown"]
    assert await browser.evaluate("document.getElementById('user-id').textContent") == user_id
    expected = "sse" if transport == "sse" else "websocket"
    assert expected in await browser.evaluate("document.getElementById('status').textContent")


@pytest.mark.parametrize("transport", ["websocket", "sse"])
async def test_page_shows_live_progress_and_completion(
    transport: str,
    server: ServerProcess,
    publisher: Publisher,
    browser: Browser,
    token_for: Callable[..., str],
    user_id: str,
) -> None:
    publisher.progress(user_id, "t1", progress=10, current_step="starting", task_name="export")
    await open_page(browser, page_url(server, token_for(user_id), transport))
    assert list(await rows(browser)) == ["t1"]

    publisher.progress(user_id, "t2", progress=5, current_step="queued", task_name="report")
    publisher.progress(user_id, "t1", progress=75, current_step="uploading")
    publisher.completed(user_id, "t1", result_data={"url": "https://example.com/out.csv"})

    await wait_status(browser, "t1", "SUCCESS")
    await wait_status(browser, "t2", "PROGRESS")
    shown = await rows(browser)
    assert list(shown) == ["t2", "t1"]
    assert shown["t1"]["progress"] == 100
    assert shown["t1"]["name"] == "export"  # merged: the completion does not repeat the name
    assert "uploading" in shown["t1"]["text"]
    assert "https://example.com/out.csv" in shown["t1"]["text"]
    assert not shown["t1"]["cancel_shown"]
    assert (shown["t2"]["progress"], shown["t2"]["name"]) == (5, "report")

    publisher.completed(user_id, "t2", status="FAILURE", error_message="disk <full>")
    await wait_status(browser, "t2", "FAILURE")
    assert "Error: disk <full>" in (await rows(browser))["t2"]["text"]


@pytest.mark.parametrize("transport", ["websocket", "sse"])
async def test_cancel_button_sends_cancel_task(
    transport: str,
    server: ServerProcess,
    publisher: Publisher,
    browser: Browser,
    token_for: Callable[..., str],
    user_id: str,
) -> None:
    publisher.progress(user_id, "t-cancel", progress=30, task_name="long job")
    await open_page(browser, page_url(server, token_for(user_id), transport))

    await browser.evaluate(f"{row_js('t-cancel')}.querySelector('button').click()")

    await eventually(
        lambda: publisher.is_cancelled(user_id, "t-cancel"), what="cancel_task to reach the server"
    )
    await browser.wait_for(
        "document.getElementById('status').textContent.includes('cancel requested')",
        what="the page to confirm the cancel request",
    )


API_REQUESTS_JS = """
performance.getEntriesByType("resource")
  .map((entry) => new URL(entry.name).pathname)
  .filter((path) => path.startsWith("/api/tasks/"))
"""


@pytest.mark.parametrize("transport", ["websocket", "sse"])
async def test_commands_answer_alike_on_every_transport(
    transport: str,
    server: ServerProcess,
    publisher: Publisher,
    browser: Browser,
    token_for: Callable[..., str],
    user_id: str,
) -> None:
    """getTaskStatus, cancelTask and getActiveTasks resolve to the WebSocket's replies;
    on SSE they go over HTTP (/api/tasks/...)."""
    publisher.progress(user_id, "t-run", progress=30, task_name="long job")
    publisher.progress(user_id, "t-done", progress=10)
    publisher.completed(user_id, "t-done", result_data={"n": 1})
    publisher.progress("someone-else", "theirs", progress=5)
    await open_page(browser, page_url(server, token_for(user_id), transport))
    assert await browser.evaluate("window.taskStream.transport") == transport

    async def call(js: str) -> Any:
        return await browser.evaluate(f"window.taskStream.{js}")

    status = await call('getTaskStatus("t-run")')
    assert (status["type"], status["task_id"]) == ("task_status", "t-run")
    assert (status["status"]["progress"], status["status"]["task_name"]) == (30, "long job")
    done = await call('getTaskStatus("t-done")')
    assert (done["status"]["status"], done["status"]["result_data"]) == ("SUCCESS", {"n": 1})
    for task_id in ("theirs", "never-ran"):  # another user's task looks unknown
        unknown = await call(f"getTaskStatus({json.dumps(task_id)})")
        assert unknown == {"type": "task_status", "task_id": task_id, "status": None}

    active = await call("getActiveTasks()")
    assert active["type"] == "active_tasks" and active["truncated"] is False
    assert [task["task_id"] for task in active["tasks"]] == ["t-run"]

    cancelled = await call('cancelTask("t-run")')
    assert cancelled == {"type": "task_cancelled", "task_id": "t-run", "success": True}
    assert publisher.is_cancelled(user_id, "t-run")
    for task_id in ("t-done", "theirs"):
        refused = await call(f"cancelTask({json.dumps(task_id)})")
        assert refused == {"type": "task_cancelled", "task_id": task_id, "success": False}
    assert not publisher.is_cancelled("someone-else", "theirs")

    invalid = await call(
        'getTaskStatus("a\\u0000b").then(() => null, (e) => ({name: e.name, code: e.code}))'
    )
    assert invalid == {"name": "CommandError", "code": "invalid_task_id"}

    requests = await browser.evaluate(API_REQUESTS_JS)
    if transport == "sse":
        assert "/api/tasks/t-run" in requests and "/api/tasks/t-run/cancel" in requests
        assert "/api/tasks/" in requests
    else:
        assert requests == []  # everything went over the open WebSocket


async def test_commands_over_http_with_the_session_cookie(
    server_env: dict[str, str],
    start_process: Callable[..., ServerProcess],
    publisher: Publisher,
    browser: Browser,
    token_for: Callable[..., str],
    user_id: str,
) -> None:
    """A page that logged in (a session cookie, no token) cancels over HTTP: the
    browser's Origin on the POST is the service's own, so it is accepted."""
    # The page is served over plain http: the cookie must not be Secure-only.
    server = start_process(
        ["streamer", "serve", "--port", "{port}"], {**server_env, "STREAMER_COOKIE_SECURE": "false"}
    )
    server.wait_healthy()
    publisher.progress(user_id, "t-run", progress=30)
    await open_page(browser, page_url(server, token_for(user_id), "sse"))
    login = f"""
    fetch("/auth/session", {{
      method: "POST", headers: {{Authorization: "Bearer {token_for(user_id)}"}}
    }}).then((response) => response.status)
    """
    assert await browser.evaluate(login) == 200
    reply = await browser.evaluate(
        'new Streamer.TaskStream({url: location.origin, transport: "sse"}).cancelTask("t-run")'
    )
    assert reply == {"type": "task_cancelled", "task_id": "t-run", "success": True}
    assert publisher.is_cancelled(user_id, "t-run")


@pytest.mark.parametrize("transport", ["websocket", "sse"])
async def test_page_resumes_after_server_restart(
    transport: str,
    server: ServerProcess,
    server_env: dict[str, str],
    start_process: Callable[..., ServerProcess],
    publisher: Publisher,
    browser: Browser,
    token_for: Callable[..., str],
    user_id: str,
) -> None:
    publisher.progress(user_id, "t1", progress=10, task_name="first")
    publisher.progress(user_id, "t2", progress=20, task_name="second")
    await open_page(browser, page_url(server, token_for(user_id), transport))
    publisher.progress(user_id, "t2", progress=30)
    await browser.wait_for(f"{row_js('t2')}?.querySelector('progress').value === 30", what="t2")

    server.stop()  # SIGTERM: WebSockets close with 1001, SSE streams end
    await browser.wait_for(
        "document.body.dataset.connection !== 'open'", what="the page to notice the restart"
    )
    publisher.progress(user_id, "t1", progress=60, current_step="while away")
    publisher.completed(user_id, "t2", result_data={"n": 1})
    restarted = start_process(["streamer", "serve", "--port", "{port}"], server_env, server.port)
    restarted.wait_healthy()

    # t2 finished while the page was away: it is no longer in the active_tasks snapshot, so
    # it only shows SUCCESS if the client resumed from its last event id.
    await wait_status(browser, "t2", "SUCCESS")
    shown = await rows(browser)
    assert (shown["t1"]["progress"], shown["t1"]["status"]) == (60, "PROGRESS")
    assert shown["t2"]["progress"] == 100


@pytest.mark.parametrize("transport", ["websocket", "sse"])
async def test_page_that_dropped_before_any_event_resumes_from_its_snapshot(
    transport: str,
    server: ServerProcess,
    server_env: dict[str, str],
    start_process: Callable[..., ServerProcess],
    publisher: Publisher,
    browser: Browser,
    token_for: Callable[..., str],
    user_id: str,
) -> None:
    """A user with no history: the page gets only its snapshot, then loses the server.
    A task that starts and finishes meanwhile is in no later snapshot: the page shows
    it only if streamer.js resumed from the snapshot's id."""
    await open_page(browser, page_url(server, token_for(user_id), transport))
    resume_point = await browser.evaluate("window.taskStream.lastEventId")
    assert isinstance(resume_point, str) and resume_point, "the snapshot carried no id"

    server.stop()
    await browser.wait_for(
        "document.body.dataset.connection !== 'open'", what="the page to notice the restart"
    )
    publisher.progress(user_id, "quick", progress=50, task_name="quick job")
    publisher.completed(user_id, "quick", result_data={"n": 2})
    restarted = start_process(["streamer", "serve", "--port", "{port}"], server_env, server.port)
    restarted.wait_healthy()

    await wait_status(browser, "quick", "SUCCESS")
    assert (await rows(browser))["quick"]["progress"] == 100


@pytest.mark.parametrize("transport", ["websocket", "sse"])
async def test_page_reports_a_refused_token(
    transport: str, server: ServerProcess, browser: Browser
) -> None:
    await browser.navigate(page_url(server, "not-a-valid-token", transport))
    await browser.wait_for(
        "document.body && document.body.dataset.connection === 'unauthorized'",
        what="the page to report the refused token",
    )
    status = await browser.evaluate("document.getElementById('status').textContent")
    assert "not authorised" in status


async def test_demo_mode_logs_in_and_runs_a_demo_job(
    process_env: dict[str, str], start_process: Callable[..., ServerProcess], browser: Browser
) -> None:
    # No STREAMER_SECRET and no Redis: development mode on the embedded broker.
    env = {k: v for k, v in process_env.items() if not k.startswith("STREAMER_")}
    server = start_process(["streamer", "serve", "--port", "{port}"], env)
    server.wait_healthy()
    await open_page(browser, server.base_url + "/")
    assert await browser.evaluate("document.getElementById('user-id').textContent") == "demo"

    await browser.evaluate("document.getElementById('start-job').click()")
    await browser.wait_for(
        "document.querySelector('#tasks [data-task-id^=\"demo-\"]')?.dataset.status === 'SUCCESS'",
        what="the demo job to finish",
    )
    (job,) = (await rows(browser)).values()
    assert (job["name"], job["progress"]) == ("demo job", 100)


async def test_page_without_token_asks_for_one(
    server: ServerProcess,
    publisher: Publisher,
    browser: Browser,
    token_for: Callable[..., str],
    user_id: str,
) -> None:
    publisher.progress(user_id, "t1", progress=50, task_name="pasted")
    await browser.navigate(server.base_url + "/")
    await browser.wait_for(
        "document.getElementById('login') && !document.getElementById('login').hidden",
        what="the token form (no demo login outside development mode)",
    )
    assert await browser.evaluate("document.getElementById('start-job').hidden") is True
    await browser.evaluate(
        f"document.getElementById('token').value = {json.dumps(token_for(user_id))};"
        "document.getElementById('login').requestSubmit()"
    )
    await browser.wait_for(
        "document.body.dataset.connection === 'open'", what="the page to connect"
    )
    assert list(await rows(browser)) == ["t1"]


async def test_a_finished_task_shows_its_final_count(
    server: ServerProcess,
    publisher: Publisher,
    browser: Browser,
    token_for: Callable[..., str],
    user_id: str,
) -> None:
    await open_page(browser, page_url(server, token_for(user_id), "websocket"))
    publisher.progress(user_id, "t-count", progress=90, processed_items=9, total_items=10)
    await browser.wait_for(f"{row_js('t-count')}?.textContent.includes('9/10 items')", what="9/10")
    publisher.completed(user_id, "t-count", status="SUCCESS", result_data={"rows": 10})
    await wait_status(browser, "t-count", "SUCCESS")
    assert "10/10 items" in (await rows(browser))["t-count"]["text"]


async def test_the_status_line_follows_a_cancelled_task_to_its_end(
    server: ServerProcess,
    publisher: Publisher,
    browser: Browser,
    token_for: Callable[..., str],
    user_id: str,
) -> None:
    publisher.progress(user_id, "t-stop", progress=30, task_name="long job")
    await open_page(browser, page_url(server, token_for(user_id), "websocket"))
    await browser.evaluate(f"{row_js('t-stop')}.querySelector('button').click()")
    status = "document.getElementById('status').textContent"
    await browser.wait_for(f"{status} === 'cancel requested for t-stop'", what="the request")
    publisher.completed(user_id, "t-stop", status="REVOKED")
    await browser.wait_for(f"{status} === 't-stop cancelled'", what="the end of the task")


@pytest.mark.parametrize("transport", ["websocket", "sse"])
async def test_the_page_shows_its_transport(
    server: ServerProcess,
    browser: Browser,
    token_for: Callable[..., str],
    user_id: str,
    transport: str,
) -> None:
    await open_page(browser, page_url(server, token_for(user_id), transport))
    assert await browser.evaluate("document.getElementById('transport').textContent") == transport
    assert await browser.evaluate("document.body.dataset.transport") == transport


async def test_the_readme_screenshot_is_made_from_the_demo_page(
    server: ServerProcess,
    publisher: Publisher,
    browser: Browser,
    token_for: Callable[..., str],
    user_id: str,
) -> None:
    """docs/demo-page.png, shown in the README, is this page as the test run sees it."""
    publisher.progress(
        user_id, "export-7", progress=100 / 3, current_step="page 4 of 12",
        processed_items=4, total_items=12, task_name="PDF export",
    )  # fmt: skip
    publisher.progress(user_id, "report-3", progress=80, task_name="monthly report")
    await open_page(browser, page_url(server, token_for(user_id), "websocket"))
    publisher.progress(
        user_id, "export-7", progress=50, current_step="page 6 of 12", processed_items=6
    )
    publisher.completed(user_id, "report-3", status="SUCCESS", result_data={"rows": 1250})
    await wait_status(browser, "report-3", "SUCCESS")
    await browser.wait_for(f"{row_js('export-7')}?.textContent.includes('6/12')", what="50%")
    await browser.call("Emulation.setDeviceMetricsOverride", {
        "width": 800, "height": 420, "deviceScaleFactor": 1, "mobile": False,
    })  # fmt: skip
    shot = await browser.call("Page.captureScreenshot", {"format": "png"})
    png = base64.b64decode(shot["data"])
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    SCREENSHOT.write_bytes(png)
