"""One connection per browser: eight tabs of the demo page for one user share one
server connection (Web Locks elect the tab that holds it, a BroadcastChannel relays);
when that tab closes another takes over and resumes, nothing lost, nothing twice."""

from __future__ import annotations

import json
from collections.abc import Callable
from urllib.parse import urlencode

import pytest

from streamer.publisher import Publisher

from .browser import Browser
from .processes import ServerProcess
from .waiting import eventually

TABS = 8

# Records the ids of the task events the page handles from now on.
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


@pytest.fixture
def server(
    process_env: dict[str, str], redis_url: str, start_process: Callable[..., ServerProcess]
) -> ServerProcess:
    env = {**process_env, "STREAMER_REDIS_URL": redis_url}
    process = start_process(["streamer", "serve", "--port", "{port}"], env)
    process.wait_healthy()
    return process


def open_connections(server: ServerProcess) -> int:
    """streamer_connections, every transport."""
    total = 0.0
    for line in server.get("/metrics")[1].decode().splitlines():
        if line.startswith("streamer_connections{"):
            total += float(line.split()[-1])
    return int(total)


def progress_js() -> str:
    row = json.dumps('#tasks [data-task-id="job"]')
    return f"document.querySelector({row})?.querySelector('progress').value"


async def all_show(tabs: list[Browser], expression: str, value: object, what: str) -> None:
    for index, tab in enumerate(tabs):
        await tab.wait_for(f"({expression}) === {json.dumps(value)}", what=f"tab {index}: {what}")


async def leaders(tabs: list[Browser]) -> list[Browser]:
    return [tab for tab in tabs if await tab.evaluate("window.taskStream.leader")]


@pytest.mark.parametrize("transport", ["websocket", "sse", "poll"])
async def test_tabs_share_one_connection_and_take_over_without_loss(
    transport: str,
    browser: Browser,
    server: ServerProcess,
    publisher: Publisher,
    token_for: Callable[..., str],
    user_id: str,
) -> None:
    publisher.progress(user_id, "job", progress=10, task_name="export")
    url = f"{server.base_url}/?{urlencode({'token': token_for(user_id), 'transport': transport})}"
    await browser.navigate(url)
    tabs = [browser]
    for _ in range(TABS - 1):
        tabs.append(await browser.new_tab(url))
    await all_show(tabs, "document.body?.dataset.connection", "open", "the snapshot")
    await all_show(tabs, progress_js(), 10, "the snapshot's progress")
    status = "document.getElementById('status').textContent"
    await all_show(tabs, status, f"connected ({transport})", "the transport")
    await eventually(lambda: open_connections(server) == 1, what="one connection")
    (leader,) = await leaders(tabs)
    assert await leader.evaluate("window.taskStream.transport") == transport

    for tab in tabs:
        await tab.evaluate(RECORD_JS)
    published = [publisher.progress(user_id, "job", progress=p) for p in (20, 30, 40)]
    await all_show(tabs, progress_js(), 40, "live progress")

    # The leader goes; events published meanwhile reach the others through the next one.
    await leader.close_page()
    tabs.remove(leader)
    published += [publisher.progress(user_id, "job", progress=p) for p in (50, 60, 70)]
    await eventually(lambda: leaders(tabs), what="another tab to take the connection", timeout=15)
    published.append(publisher.completed(user_id, "job", result_data={"rows": 8}))
    await all_show(tabs, progress_js(), 100, "the completion")
    assert len(await leaders(tabs)) == 1
    await eventually(lambda: open_connections(server) == 1, what="one connection again")
    for index, tab in enumerate(tabs):
        seen = await tab.evaluate("window.seenIds")
        assert seen == published, f"tab {index}: an event was lost or shown twice"
        status = await tab.evaluate(
            "document.querySelector('#tasks [data-task-id=\"job\"]').dataset.status"
        )
        assert status == "SUCCESS"

    # Commands from a tab that does not hold the connection go over HTTP.
    (new_leader,) = await leaders(tabs)
    follower = next(tab for tab in tabs if tab is not new_leader)
    reply = await follower.evaluate('window.taskStream.getTaskStatus("job")')
    assert reply["status"]["status"] == "SUCCESS"


async def test_share_connection_false_opens_one_connection_per_tab(
    browser: Browser,
    server: ServerProcess,
    token_for: Callable[..., str],
    user_id: str,
) -> None:
    page = f"{server.base_url}/static/streamer.js"
    script = f"""
    new Promise((resolve) => {{
      const tag = document.createElement("script");
      tag.src = {json.dumps(page)};
      tag.onload = () => {{
        window.taskStream = new Streamer.TaskStream({{
          url: {json.dumps(server.base_url)}, token: {json.dumps(token_for(user_id))},
          transport: "websocket", shareConnection: false,
          onEvent: (m) => {{ if (m.type === "active_tasks") window.opened = true; }},
        }});
        window.taskStream.start();
        resolve(true);
      }};
      document.head.appendChild(tag);
    }})
    """
    tabs = [browser, await browser.new_tab(f"{server.base_url}/healthz")]
    await browser.navigate(f"{server.base_url}/healthz")
    for tab in tabs:
        await tab.wait_for("document.readyState === 'complete'", what="the page")
        await tab.evaluate(script)
        await tab.wait_for("window.opened === true", what="the snapshot")
        assert await tab.evaluate("window.taskStream.leader") is True
    await eventually(lambda: open_connections(server) == 2, what="two connections")


async def test_a_refused_token_stops_every_tab_without_a_loop(
    browser: Browser, server: ServerProcess
) -> None:
    url = f"{server.base_url}/?{urlencode({'token': 'not-a-token', 'transport': 'websocket'})}"
    await browser.navigate(url)
    tabs = [browser] + [await browser.new_tab(url) for _ in range(3)]
    await all_show(tabs, "document.body?.dataset.connection", "unauthorized", "the refusal")
    refused = 'streamer_refusals_total{reason="unauthorized"}'

    def refusals() -> str:
        lines = server.get("/metrics")[1].decode().splitlines()
        return next(line for line in lines if line.startswith(refused))

    first = refusals()
    assert float(first.split()[-1]) <= len(tabs)  # at most one per tab, often one in all
    await browser.evaluate("window.windowEnds = performance.now() + 3000")
    await browser.wait_for("performance.now() >= window.windowEnds", what="3 s to pass")
    assert refusals() == first, "a tab kept reconnecting"
