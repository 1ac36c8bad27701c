"""`streamer watch` against a running `streamer serve` (Redis): JSON lines for scripts,
progress bars in a real pseudo-terminal, resume across a server restart, refusal."""

from __future__ import annotations

import asyncio
import json
import os
import signal
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
        self.said: list[str] = []

    async def says(self, text: str, times: int = 1) -> None:
        """Until `times` lines of its stderr hold `text`."""
        assert self.process.stderr is not None
        while sum(text in line for line in self.said) < times:
            line = await asyncio.wait_for(self.process.stderr.readline(), WAIT_S)
            assert line, f"watch ended: {self.said}"
            self.said.append(line.decode())

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

    async def start(server: ServerProcess | str, *args: str) -> JsonWatch:
        url = server if isinstance(server, str) else server.base_url
        process = await asyncio.create_subprocess_exec(
            str(BIN / "streamer"), "watch", "--url", url, "--json", *args,
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


async def test_a_server_down_at_first_is_waited_for_on_the_websocket(
    process_env: dict[str, str],
    redis_url: str,
    start_process: Callable[..., ServerProcess],
    watch_json: Callable[..., Any],
    user_id: str,
) -> None:
    """Connections refused count as no failed upgrade (the server is down, not behind a
    proxy that refuses upgrades): once it is up the watch is on the WebSocket. What it
    says are whole lines, however long, for the scripts that read them."""
    port = free_port()
    watch = await watch_json(f"http://127.0.0.1:{port}", "--user", user_id)
    await watch.says("cannot connect", times=3)
    assert all(line.endswith("; reconnecting\n") for line in watch.said), watch.said
    server = start_process(
        ["streamer", "serve", "--port", "{port}"],
        {**process_env, "STREAMER_REDIS_URL": redis_url},
        port,
    )
    server.wait_healthy()
    assert (await watch.next())["type"] == "active_tasks"
    metrics = server.get("/metrics")[1].decode()
    assert 'streamer_connections{transport="websocket"} 1.0' in metrics
    assert 'streamer_connections{transport="sse"} 0.0' in metrics
    assert not any("Server-Sent Events" in line for line in watch.said), watch.said


@pytest.mark.parametrize("transport", ["websocket", "sse"])
async def test_a_silent_stream_is_given_up_after_three_heartbeat_intervals(
    transport: str,
    process_env: dict[str, str],
    redis_url: str,
    start_process: Callable[..., ServerProcess],
    publisher: Publisher,
    watch_json: Callable[..., Any],
    user_id: str,
) -> None:
    """The interval comes with the heartbeats the watch asks for: a server stopped
    (its sockets open and silent) is given up after three of them and a margin, and the
    watch resumes once it answers again."""
    server = start_process(
        ["streamer", "serve", "--port", "{port}"],
        {
            **process_env,
            "STREAMER_REDIS_URL": redis_url,
            "STREAMER_HEARTBEAT_S": "0.5",
            "STREAMER_WS_HEARTBEAT_S": "0.5",
        },
    )
    server.wait_healthy()
    watch = await watch_json(server, "--user", user_id, "--transport", transport)
    assert (await watch.next())["type"] == "active_tasks"
    # The first heartbeat, which tells the interval, comes right after the opening: by
    # the time an event published later is shown, the watch has read it.
    before = publisher.progress(user_id, "t", progress=1)
    assert (await watch.next_task_event())["id"] == before
    os.kill(server.process.pid, signal.SIGSTOP)
    try:
        await watch.says("no message or heartbeat for 4 s; reconnecting")
        meanwhile = publisher.progress(user_id, "t", progress=3)
    finally:
        os.kill(server.process.pid, signal.SIGCONT)
    assert (await watch.next_task_event())["id"] == meanwhile


@pytest.mark.parametrize("transport", ["websocket", "sse"])
async def test_a_watch_of_a_user_signs_a_new_token_for_each_connection(
    transport: str,
    start_server: StartServer,
    publisher: Publisher,
    watch_json: Callable[..., Any],
    user_id: str,
) -> None:
    """Its token expires (here after 2 s) and the server ends the stream: the watch
    goes on with a new one, and misses nothing."""
    server = start_server()
    watch = await watch_json(server, "--user", user_id, "--ttl", "2", "--transport", transport)
    assert (await watch.next())["type"] == "active_tasks"
    await watch.says("reconnecting")  # the stream ended with its token
    sent = publisher.progress(user_id, "t", progress=4)
    assert (await watch.next_task_event())["id"] == sent
    assert watch.process.returncode is None
    assert not any("get a new token" in line for line in watch.said), watch.said


def test_terminated_in_a_terminal_it_leaves_the_cursor_shown(
    start_server: StartServer, publisher: Publisher, process_env: dict[str, str], user_id: str
) -> None:
    terminal = watch_in_a_terminal(start_server(), user_id, process_env, 100)
    try:
        publisher.progress(user_id, "imp", progress=25, current_step="first", task_name="Import")
        terminal.expect(r"Import \[PROGRESS\].*25%")
        terminal.kill(signal.SIGTERM)
        terminal.expect(pexpect.EOF)
        shown = terminal.before
    finally:
        terminal.close(force=True)
    assert "\x1b[?25h" in shown  # the cursor, hidden while the bars are drawn
    assert terminal.exitstatus == 0
