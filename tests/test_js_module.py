"""streamer.js as an ES module (`/static/streamer.mjs`) and its TypeScript declarations
(`streamer.d.ts`): the types compile against code written as an application would
write it, and the module gives what the types promise, in real Chromium."""

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
