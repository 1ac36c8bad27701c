"""streamer.js as an ES module (`/static/streamer.mjs`) and the TypeScript declarations
(`streamer.d.mts`, `streamer.d.ts`): the types compile against code written as an
application would write it, and the module gives what the types promise, in real
Chromium."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from .browser import Browser
from .processes import ServerProcess

JS_TESTS = Path(__file__).resolve().parent / "js"
TSC = JS_TESTS / "node_modules" / ".bin" / "tsc"


def test_the_declarations_type_check_an_application() -> None:
    if not TSC.exists():
        pytest.fail("TypeScript is not installed: `npm ci --prefix tests/js`", pytrace=False)
    checked = subprocess.run(
        [str(TSC), "-p", str(JS_TESTS)], capture_output=True, text=True, timeout=120
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.fixture
def server(
    process_env: dict[str, str], start_process: Callable[..., ServerProcess]
) -> ServerProcess:
    process = start_process(["streamer", "serve", "--port", "{port}"], process_env)
    process.wait_healthy()
    return process


async def test_the_module_exports_what_the_types_declare(
    browser: Browser, server: ServerProcess, token_for: Callable[..., str]
) -> None:
    await browser.navigate(server.base_url + "/")  # a page of the service, with streamer.js
    exported = await browser.evaluate(
        """import("/static/streamer.mjs").then((module) => ({
             names: Object.keys(module).sort(),
             same: module.default === window.Streamer
               && module.TaskStream === window.Streamer.TaskStream,
           }))"""
    )
    assert exported == {
        "names": ["CommandError", "TaskBoard", "TaskStream", "default"],
        "same": True,
    }
    token = token_for("u-module")
    reply = await browser.evaluate(
        f"""import("/static/streamer.mjs").then(({{ TaskStream }}) => new Promise((done) => {{
              const stream = new TaskStream({{
                url: location.origin, token: {token!r}, transport: "websocket",
                onEvent: (message) => {{
                  if (message.type !== "active_tasks") return;
                  stream.getTaskStatus("none").then((status) => {{ stream.stop(); done(status); }});
                }},
              }});
              stream.start();
            }}))"""
    )
    assert reply == {"type": "task_status", "task_id": "none", "status": None}


async def test_task_commands_over_http_refuse_ids_no_url_can_name(
    browser: Browser, server: ServerProcess, token_for: Callable[..., str]
) -> None:
    """`.` and `..` are dot-segments to every URL parser (`/api/tasks/..` is
    `/api/`), and an empty id names the task list: over HTTP each got another
    endpoint's answer (a snapshot for a task status, a 405 or 404 for a cancel)."""
    await browser.navigate(server.base_url + "/")
    token = token_for("u-dots")
    replies = await browser.evaluate(
        f"""import("/static/streamer.mjs").then(({{ TaskStream }}) => new Promise((done) => {{
              const stream = new TaskStream({{
                url: location.origin, token: {token!r}, transport: "poll",
                onEvent: async (message) => {{
                  if (message.type !== "active_tasks") return;
                  const outcome = (promise) => promise.then(
                    (reply) => ({{ reply }}), (error) => ({{ code: error.code }}));
                  const results = [];
                  for (const id of ["", ".", ".."]) {{
                    results.push(await outcome(stream.getTaskStatus(id)));
                    results.push(await outcome(stream.cancelTask(id)));
                  }}
                  results.push(await outcome(stream.getTaskStatus("none")));
                  stream.stop();
                  done(results);
                }},
              }});
              stream.start();
            }}))"""
    )
    assert replies[:6] == [{"code": "invalid_task_id"}] * 6
    assert replies[6] == {"reply": {"type": "task_status", "task_id": "none", "status": None}}


def test_the_module_imports_where_there_is_no_window(tmp_path: Path) -> None:
    """Server-side rendering imports it in Node, where there is no `window`."""
    script = (
        "const module = await import(process.argv[1]);"
        "console.log(JSON.stringify(Object.keys(module).sort()));"
    )
    module = Path(__file__).resolve().parents[1] / "streamer" / "static" / "streamer.mjs"
    ran = subprocess.run(
        ["node", "--input-type=module", "-e", script, module.as_uri()],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip() == '["CommandError","TaskBoard","TaskStream","default"]'
