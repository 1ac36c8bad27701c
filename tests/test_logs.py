"""STREAMER_LOG_FORMAT=json: one JSON object per line, one line per stream end, no
credentials."""

from __future__ import annotations

import asyncio
import json
import re
import signal
from collections.abc import Callable
from typing import Any

import pytest

from .conftest import StartGunicorn
from .processes import ServerProcess, gunicorn_args
from .raw_ws import RawWebSocket
from .streams import CurlStream, WsStream, run_cli
from .waiting import eventually_sync

TokenFor = Callable[..., str]
StartProcess = Callable[..., ServerProcess]
COMMANDS = {
    "serve": ["streamer", "serve", "--port", "{port}"],
    "gunicorn": gunicorn_args(1),
}


def json_lines(log: str) -> list[dict[str, Any]]:
    lines = []
    for line in log.splitlines():
        if line.startswith("{"):
            lines.append(json.loads(line))
    return lines


def stream_ends(log: str) -> list[dict[str, Any]]:
    return [line for line in json_lines(log) if line.get("event") == "stream_ended"]


@pytest.mark.parametrize("command", sorted(COMMANDS))
async def test_json_logs_one_line_per_stream_end_without_credentials(
    command: str,
    redis_url: str,
    process_env: dict[str, str],
    start_process: StartProcess,
    token_for: TokenFor,
    user_id: str,
) -> None:
    env = {**process_env, "STREAMER_REDIS_URL": redis_url, "STREAMER_LOG_FORMAT": "json"}
    server = start_process(COMMANDS[command], env)
    await asyncio.to_thread(server.wait_healthy)
    token = token_for(user_id)
    sse = await CurlStream.open(f"{server.base_url}/sse/tasks/", token)  # Authorization header
    try:
        assert (await sse.next_data())["type"] == "active_tasks"
    finally:
        await sse.close()
    ends = await asyncio.to_thread(
        eventually_sync, lambda: stream_ends(server.log()), what="the SSE stream's end line"
    )
    ws_url = server.base_url.replace("http", "ws") + f"/ws/tasks/?token={token}"
    ws = await WsStream.open(ws_url)  # the token in the query string
    try:
        assert (await ws.next())["type"] == "active_tasks"
    finally:
        await ws.close()
    ends = await asyncio.to_thread(
        eventually_sync,
        lambda: (found := stream_ends(server.log())) and len(found) >= 2 and found,
        what="the WebSocket stream's end line",
    )
    assert len(ends) == 2, ends
    by_transport = {line["transport"]: line for line in ends}
    assert set(by_transport) == {"sse", "websocket"}
    for transport, line in by_transport.items():
        assert line["user"] == user_id
        assert line["reason"] == "client_closed"
        assert line["events_sent"] == 1  # the snapshot
        assert 0 <= line["duration_s"] < 30
        assert line["level"] == "info" and line["logger"] == "streamer.streams"
        assert f"transport={transport}" in line["message"]
    log = server.log()
    assert token not in log
    assert token.split(".")[-1] not in log  # not even the signature

    def access_logged() -> bool:
        return any("/ws/tasks/?token=[redacted]" in x["message"] for x in json_lines(server.log()))

    await asyncio.to_thread(eventually_sync, access_logged, what="the WebSocket's access log line")
    if command == "gunicorn":  # a reload sets gunicorn's loggers up anew
        server.signal(signal.SIGHUP)
        await asyncio.to_thread(
            eventually_sync,
            lambda: sum("Booting worker" in x["message"] for x in json_lines(server.log())) >= 2,
            what="the reloaded worker",
        )
        await asyncio.to_thread(server.wait_healthy)
    log = server.log()
    assert token not in log
    # Everything the server wrote is JSON, from its first line (gunicorn's "Starting
    # gunicorn"; streamer serve's come as it starts, "serving on" once it listens) to
    # the access log's (a token redacted), also after a reload.
    lines = [line for line in log.splitlines() if line.strip()]
    assert [line for line in lines if not line.startswith("{")] == []
    if command == "gunicorn":
        assert "Starting gunicorn" in json_lines(log)[0]["message"]
    else:
        assert any("serving on" in line["message"] for line in json_lines(log))


async def test_text_access_log_lines_under_gunicorn_carry_their_time(
    process_env: dict[str, str], start_process: StartProcess
) -> None:
    """aiohttp writes them through gunicorn's access logger, which writes the bare
    message: a line no one could place in time."""
    server = start_process(COMMANDS["gunicorn"], process_env)
    await asyncio.to_thread(server.wait_healthy)
    await asyncio.to_thread(server.get, "/healthz?probe=1")

    def access_line() -> str | None:
        found = [line for line in server.log().splitlines() if "/healthz?probe=1" in line]
        return found[0] if found else None

    line = await asyncio.to_thread(eventually_sync, access_line, what="the access log line")
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO gunicorn.access: ", line), line


async def test_every_stream_has_an_access_line_however_it_ended(
    process_env: dict[str, str], start_process: StartProcess, token_for: TokenFor, user_id: str
) -> None:
    """A stream whose client went away (curl stopped, a WebSocket's connection dropped
    without a close frame), a long poll given up while held, and a WebSocket closed by a
    shutdown each get their access line, as a stream the client closed does."""
    server = start_process(COMMANDS["gunicorn"], process_env)
    await asyncio.to_thread(server.wait_healthy)
    token = token_for(user_id)

    def access_lines(path: str) -> list[str]:
        return [line for line in server.log().splitlines() if f'"GET {path}' in line]

    sse = await CurlStream.open(f"{server.base_url}/sse/tasks/?probe=sse", token)
    try:
        assert (await sse.next_data())["type"] == "active_tasks"
    finally:
        await sse.close()  # curl killed: the connection ends without a word
    line = await asyncio.to_thread(
        eventually_sync, lambda: access_lines("/sse/tasks/?probe=sse"), what="the SSE line"
    )
    assert '" 200 ' in line[0], line

    dropped = await asyncio.to_thread(
        RawWebSocket, "127.0.0.1", server.port, f"/ws/tasks/?probe=dropped&token={token}"
    )
    assert (await asyncio.to_thread(dropped.receive))[0] == 1  # the snapshot, a text frame
    dropped.close()
    line = await asyncio.to_thread(
        eventually_sync, lambda: access_lines("/ws/tasks/?probe=dropped"), what="the WS line"
    )
    assert '" 101 ' in line[0] and token not in line[0], line

    # A long poll held, then given up by its client: logged as nginx does (499).
    status, first = await asyncio.to_thread(server.get, f"/poll/tasks/?token={token}")
    assert status == 200
    resume = json.loads(first)["last_event_id"]
    curl = await asyncio.create_subprocess_exec(
        "curl", "-s", "--max-time", "1", "-o", "/dev/null",
        f"{server.base_url}/poll/tasks/?probe=poll&last_event_id={resume}&token={token}",
    )  # fmt: skip
    assert await curl.wait() == 28  # curl's "timed out": the poll was held
    line = await asyncio.to_thread(
        eventually_sync, lambda: access_lines("/poll/tasks/?probe=poll"), what="the poll line"
    )
    assert '" 499 0 ' in line[0], line

    shut = await WsStream.open(
        server.base_url.replace("http", "ws") + f"/ws/tasks/?probe=shutdown&token={token}"
    )
    try:
        await shut.next()
        server.signal(signal.SIGTERM)
        assert await asyncio.to_thread(server.wait_exit, 30) == 0
    finally:
        await shut.close()
    assert len(access_lines("/ws/tasks/?probe=shutdown")) == 1, server.log()


def test_a_bad_log_format_stops_start_up(process_env: dict[str, str]) -> None:
    from streamer.config import Config, ConfigError

    with pytest.raises(ConfigError, match="STREAMER_LOG_FORMAT must be text or json"):
        Config.from_env({**process_env, "STREAMER_LOG_FORMAT": "xml"})
    assert Config.from_env(process_env).log_format == "text"


async def test_json_set_with_gunicorns_env_flag_covers_its_first_line(
    process_env: dict[str, str], start_process: StartProcess
) -> None:
    """`gunicorn -e STREAMER_LOG_FORMAT=json`: gunicorn puts it in the environment only
    after setting its loggers up."""
    env = {key: value for key, value in process_env.items() if key != "STREAMER_LOG_FORMAT"}
    server = start_process([*COMMANDS["gunicorn"], "-e", "STREAMER_LOG_FORMAT=json"], env)
    await asyncio.to_thread(server.wait_healthy)
    lines = [line for line in server.log().splitlines() if line.strip()]
    assert lines and [line for line in lines if not line.startswith("{")] == []
    assert "Starting gunicorn" in json.loads(lines[0])["message"]


@pytest.mark.parametrize("command", sorted(COMMANDS))
async def test_a_misspelt_setting_is_warned_about_once_in_the_log_format(
    command: str, redis_url: str, process_env: dict[str, str], start_process: StartProcess
) -> None:
    """Once (by gunicorn's master, not by each worker), as a JSON line as every other."""
    env = {
        **process_env,
        "STREAMER_REDIS_URL": redis_url,
        "STREAMER_LOG_FORMAT": "json",
        "STREAMER_HEARTBEAT_SECONDS": "5",
    }
    args = [*gunicorn_args(2)] if command == "gunicorn" else COMMANDS[command]
    server = start_process(args, env)
    await asyncio.to_thread(server.wait_healthy)
    if command == "gunicorn":
        await asyncio.to_thread(
            eventually_sync,
            lambda: server.log().count("Booting worker") == 2,
            what="both workers",
        )
    lines = [line for line in server.log().splitlines() if line.strip()]
    assert [line for line in lines if not line.startswith("{")] == [], lines
    warned = [
        entry
        for entry in json_lines(server.log())
        if "STREAMER_HEARTBEAT_SECONDS is not a setting" in entry["message"]
    ]
    assert len(warned) == 1 and warned[0]["level"] == "warning", warned


def test_a_refused_start_says_why_in_json_too(
    process_env: dict[str, str], start_process: StartProcess
) -> None:
    """Two workers without Redis are refused before any starts: the reason is a JSON
    line as every other, not plain text among them."""
    env = {key: value for key, value in process_env.items() if key != "STREAMER_REDIS_URL"}
    server = start_process(gunicorn_args(2), {**env, "STREAMER_LOG_FORMAT": "json"})
    assert server.wait_exit(30) != 0
    lines = [line for line in server.log().splitlines() if line.strip()]
    assert lines and [line for line in lines if not line.startswith("{")] == [], lines
    said = [json.loads(line) for line in lines]
    assert any(
        entry["level"] == "error" and "refusing to start 2 workers" in entry["message"]
        for entry in said
    ), said


async def test_a_streams_access_line_counts_the_bytes_it_sent(
    start_gunicorn: StartGunicorn, token_for: TokenFor, user_id: str
) -> None:
    """The hub writes events to the socket past aiohttp's own writer: a stream's access
    line counts them, not only the response head."""
    server, env = start_gunicorn(1)
    token = token_for(user_id)
    ws = await WsStream.open(
        server.base_url.replace("http", "ws") + f"/ws/tasks/?probe=bytes&token={token}"
    )
    sse = await CurlStream.open(f"{server.base_url}/sse/tasks/?probe=bytes", token)
    step, events = "x" * 2000, 5
    try:
        await ws.next()
        await sse.next_data()
        for progress in range(events):
            event_id = await run_cli(
                "publish", "--user", user_id, "--task", "t", "--progress", str(progress),
                "--step", step, env=env,
            )  # fmt: skip
            assert (await ws.next())["id"] == event_id
            assert (await sse.next_data())["id"] == event_id
    finally:
        await ws.close()
        await sse.close()

    def logged_bytes() -> dict[str, int] | None:
        found = re.findall(
            r'"GET /(ws|sse)/tasks/\?probe=bytes\S* HTTP/1.1" \d+ (\d+) ', server.log()
        )
        return {path: int(size) for path, size in found} if len(found) == 2 else None

    sizes = await asyncio.to_thread(eventually_sync, logged_bytes, what="both access lines")
    sent = events * len(step)
    for path, size in sizes.items():
        # The events (their steps and the rest of each message), the snapshot and head.
        assert sent < size < sent + events * 600 + 2048, (path, size)


async def test_an_event_streams_access_line_counts_every_byte_its_client_got(
    start_gunicorn: StartGunicorn, token_for: TokenFor, user_id: str
) -> None:
    """Head included, when the client leaves (aiohttp ends no response then, and counts
    nothing of its own): a raw client reads the snapshot and an event, then hangs up."""
    server, env = start_gunicorn(1)
    host, port = server.base_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    received = b""
    try:
        writer.write(
            f"GET /sse/tasks/?probe=exact HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Authorization: Bearer {token_for(user_id)}\r\n\r\n".encode()
        )

        async def read_through(message: bytes) -> None:
            """Until the chunk that holds `message` ends."""
            nonlocal received
            while message not in received or not received.endswith(b"\n\n\r\n"):
                chunk = await reader.read(65536)
                assert chunk, received
                received += chunk

        await asyncio.wait_for(read_through(b'"type":"active_tasks"'), 10)
        event_id = await run_cli(
            "publish", "--user", user_id, "--task", "t", "--progress", "5", env=env
        )  # fmt: skip
        await asyncio.wait_for(read_through(f"id: {event_id}".encode()), 10)
    finally:
        writer.close()

    def logged_bytes() -> int | None:
        found = re.search(r'"GET /sse/tasks/\?probe=exact HTTP/1.1" 200 (\d+) ', server.log())
        return int(found.group(1)) if found else None

    logged = await asyncio.to_thread(eventually_sync, logged_bytes, what="the access line")
    assert logged == len(received), received
