"""`streamer watch` against a running `streamer serve` (Redis): JSON lines for scripts,
progress bars in a real pseudo-terminal, resume across a server restart, refusal."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

import pexpect
import pytest

from streamer.publisher import Publisher

from .conftest import SECRET
from .processes import BIN, ServerProcess, free_port

WAIT_S = 20.0
StartServer = Callable[[], ServerProcess]


@pytest.fixture
def start_server(
    process_env: dict[str, str], redis_url: str, start_process: Callable[..., ServerProcess]
) -> StartServer:
    """Start `streamer serve`, always on the same port (a restart comes back there)."""
    port = free_port()
    env = {**process_env, "STREAMER_REDIS_URL": redis_url}

    def start() -> ServerProcess:
        server = start_process(["streamer", "serve", "--port", "{port}"], env, port)
        server.wait_healthy()
        return server

    return start


class JsonWatch:
    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    async def next(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = await asyncio.wait_for(self.process.stdout.readline(), WAIT_S)
        assert line.endswith(b"\n"), f"watch ended: {line!r}"
        message: dict[str, Any] = json.loads(line)  # one valid event per line
        return message

    async def next_task_event(self) -> dict[str, Any]:
        while True:
            message = await self.next()
            if message["type"] != "active_tasks":
                return message


@pytest.fixture
async def watch_json(
    process_env: dict[str, str],
) -> AsyncIterator[Callable[..., Any]]:
    started: list[asyncio.subprocess.Process] = []

    async def start(server: ServerProcess, *args: str) -> JsonWatch:
        process = await asyncio.create_subprocess_exec(
            str(BIN / "streamer"), "watch", "--url", server.base_url, "--json", *args,
            env=process_env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        started.append(process)
        return JsonWatch(process)

    try:
        yield start
    finally:
        for process in started:
            if process.returncode is None:
                process.kill()
            await process.wait()


async def test_json_lines_resume_across_a_server_restart(
    start_server: StartServer,
    publisher: Publisher,
    watch_json: Callable[..., Any],
    user_id: str,
) -> None:
    server = start_server()
    watch = await watch_json(server, "--user", user_id)
    assert (await watch.next())["type"] == "active_tasks"
    for step in range(3):
        publisher.progress(user_id, "job", progress=10 * (step + 1), current_step=f"s{step}")
    seen = [await watch.next_task_event() for _ in range(3)]

    server.stop()
    # Published while no server runs: the restarted one replays them from Redis.
    publisher.progress(user_id, "job", progress=40, current_step="s3")
    publisher.completed(user_id, "job", status="SUCCESS", result_data={"rows": 4})
    start_server()
    seen += [await watch.next_task_event() for _ in range(2)]

    assert [m["current_step"] for m in seen] == ["s0", "s1", "s2", "s3", "s3"]
    assert [m["type"] for m in seen][-1] == "task_completed"
    ids = [m["id"] for m in seen]
    assert len(set(ids)) == 5  # nothing twice


async def test_json_over_sse_only(
    start_server: StartServer,
    publisher: Publisher,
    watch_json: Callable[..., Any],
    user_id: str,
) -> None:
    server = start_server()
    watch = await watch_json(server, "--user", user_id, "--transport", "sse")
    assert (await watch.next())["type"] == "active_tasks"
    publisher.progress(user_id, "over-sse", progress=5)
    assert (await watch.next_task_event())["task_id"] == "over-sse"


async def test_a_refused_token_ends_with_a_message_not_a_loop(
    start_server: StartServer, watch_json: Callable[..., Any]
) -> None:
    server = start_server()
    watch = await watch_json(server, "--token", "not-a-token")
    assert await asyncio.wait_for(watch.process.wait(), WAIT_S) == 3
    assert watch.process.stderr is not None
    assert b"get a new token" in await watch.process.stderr.read()


def watch_in_a_terminal(
    server: ServerProcess, user_id: str, env: dict[str, str], columns: int, **options: Any
) -> pexpect.spawn:
    """`streamer watch --user` in a pseudo-terminal 30 lines high, `columns` wide."""
    return pexpect.spawn(
        str(BIN / "streamer"),
        ["watch", "--url", server.base_url, "--user", user_id],
        env={**env, "STREAMER_SECRET": SECRET, "TERM": "xterm", "COLUMNS": str(columns)},
        dimensions=(30, columns),
        timeout=WAIT_S,
        encoding="utf-8",
        **options,
    )


def test_progress_bars_in_a_terminal(
    start_server: StartServer, publisher: Publisher, process_env: dict[str, str], user_id: str
) -> None:
    terminal = watch_in_a_terminal(start_server(), user_id, process_env, 100, logfile=sys.stdout)
    try:
        publisher.progress(user_id, "imp", progress=25, current_step="first", task_name="Import")
        terminal.expect(r"Import \[PROGRESS\].*25%.*first")
        publisher.progress(user_id, "imp", progress=75, current_step="second")
        terminal.expect(r"75%.*second")
        publisher.completed(user_id, "imp", status="SUCCESS", result_data={"rows": 3})
        terminal.expect(r'done    Import SUCCESS \{"rows": 3\}')
        publisher.completed(user_id, "other", status="FAILURE", error_message="disk full")
        terminal.expect("ended   other FAILURE: disk full")
        terminal.sendintr()
        terminal.expect(pexpect.EOF)
    finally:
        terminal.close(force=True)
    assert terminal.exitstatus == 0  # Ctrl-C ends it cleanly


def test_task_text_is_shown_as_text_in_a_terminal(
    start_server: StartServer, publisher: Publisher, process_env: dict[str, str], user_id: str
) -> None:
    """Producers' text is neither markup for the bars nor escape sequences for the
    terminal (one could retitle the window or clear the screen)."""
    terminal = watch_in_a_terminal(start_server(), user_id, process_env, 120)
    try:
        step = "[/oops] \x1b]0;PWNED\x07 [blink]x[/]"
        publisher.progress(user_id, "t", progress=5, current_step=step, task_name="[/x] job")
        terminal.expect(r"\[/x\] job \[PROGRESS\].*\[/oops\] \ufffd\]0;PWNED\ufffd \[blink\]x\[/\]")
        shown = terminal.before + terminal.after
        publisher.completed(user_id, "t", status="FAILURE", error_message="bad \x1b[2J")
        terminal.expect("ended   \\[/x\\] job FAILURE: bad \ufffd\\[2J")
        shown += terminal.before + terminal.after
        terminal.sendintr()
        terminal.expect(pexpect.EOF)
    finally:
        terminal.close(force=True)
    assert terminal.exitstatus == 0  # still running until Ctrl-C
    assert "\x1b]0;" not in shown and "\x1b[2J" not in shown


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--url", "http://127.0.0.1:abc"], b"--url must be an http:// or https:// URL"),
        (["--task-id", ""], b"--task-id"),  # not every task
    ],
)
async def test_bad_arguments_are_refused_at_once(
    process_env: dict[str, str], args: list[str], says: bytes
) -> None:
    process = await asyncio.create_subprocess_exec(
        str(BIN / "streamer"), "watch", "--token", "t.o.k", *args,
        env=process_env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, stderr = await asyncio.wait_for(process.communicate(), WAIT_S)
    assert process.returncode == 2
    assert says in stderr and b"Traceback" not in stderr
    assert b"t.o.k" not in stderr
