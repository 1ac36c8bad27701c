"""Real server processes: gunicorn with aiohttp's worker and Redis, and `streamer serve`."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from streamer.auth.tokens import issue_token

from .clients import ws_close_code
from .conftest import StartGunicorn
from .processes import (
    BIN,
    GUNICORN_CONF,
    WORKER_STARTED_LOG,
    ServerProcess,
    free_port,
    gunicorn_args,
    pid_alive,
    worker_pids,
)
from .streams import CurlStream, WsStream, close_all, run_cli, streams_on_every_worker
from .waiting import eventually, eventually_sync

TokenFor = Callable[..., str]
StartProcess = Callable[..., ServerProcess]


def run_to_exit(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run a server command that is expected to refuse to start."""
    return subprocess.run(
        [str(BIN / args[0]), *args[1:]], env=env, capture_output=True, text=True, timeout=30
    )


async def test_gunicorn_two_workers_share_events_through_redis(
    redis_url: str, start_gunicorn: StartGunicorn, token_for: TokenFor, user_id: str
) -> None:
    server, env = start_gunicorn(2)
    token = token_for(user_id)
    ws_streams, sse_streams = await streams_on_every_worker(server.base_url, token, 2)
    try:
        for ws in ws_streams:
            assert (await ws.next())["type"] == "active_tasks"
        for sse in sse_streams:
            assert sse.status == 200
            assert sse.headers["content-type"].startswith("text/event-stream")
            assert (await sse.next_data())["type"] == "active_tasks"

        # A separate producer process publishes straight to Redis.
        progress_id = await run_cli(
            "publish", "--user", user_id, "--task", "report", "--progress", "40",
            "--step", "crunching", "--redis-url", redis_url, env=env,
        )  # fmt: skip
        done_id = await run_cli(
            "publish", "--user", user_id, "--task", "report", "--status", "SUCCESS",
            "--result", '{"rows": 12}', "--redis-url", redis_url, env=env,
        )  # fmt: skip
        for ws in ws_streams:
            progress = await ws.next()
            assert progress["id"] == progress_id and progress["current_step"] == "crunching"
            done = await ws.next()
            assert done["id"] == done_id and done["result_data"] == {"rows": 12}
        for sse in sse_streams:
            assert (await sse.next_data())["id"] == progress_id
            assert (await sse.next_data())["id"] == done_id
    finally:
        await close_all(ws_streams, sse_streams)
    # The access log shows the requests (each line written once its stream ended), never
    # the credentials.
    await eventually(
        lambda: "GET /ws/tasks/?token=[redacted]" in server.log(), what="the access log line"
    )
    log = server.log()
    assert token not in log
    assert frozen_at_startup(log) == 2  # one line per worker


def frozen_at_startup(log: str) -> int:
    """How many processes said they left their startup objects out of garbage collection
    passes, each with a count no process could start with fewer than."""
    counts = re.findall(r"(\d+) objects made at startup left out of garbage collection", log)
    assert all(int(count) > 10_000 for count in counts), counts
    return len(counts)


def test_gunicorn_refuses_several_workers_without_redis(process_env: dict[str, str]) -> None:
    result = run_to_exit(gunicorn_args(2, free_port()), process_env)
    assert result.returncode != 0
    assert "refusing to start 2 workers without STREAMER_REDIS_URL" in result.stderr
    assert "Booting worker" not in result.stderr  # refused before forking any worker


def test_gunicorn_refuses_to_start_no_workers(process_env: dict[str, str]) -> None:
    """gunicorn takes WEB_CONCURRENCY=0 (a negative number it refuses itself)."""
    command = [arg for arg in gunicorn_args(1, free_port()) if arg not in ("--workers", "1")]
    result = run_to_exit(command, process_env | {"WEB_CONCURRENCY": "0"})
    assert result.returncode != 0
    assert "streamer: configuration error: 0 workers (--workers or WEB_CONCURRENCY)" in (
        result.stderr
    )
    assert "Booting worker" not in result.stderr


@pytest.mark.parametrize(
    ("bind", "said"),
    [
        ("127.0.0.1:70000", "the port must be from 0 to 65535, not 70000"),
        ("127.0.0.1:-1", "the port must be from 0 to 65535, not -1"),
        ("unix:", "a unix socket needs a path"),
    ],
)
def test_gunicorn_refuses_an_address_it_cannot_listen_on(
    process_env: dict[str, str], bind: str, said: str
) -> None:
    """A port out of range ended gunicorn with a traceback; an empty socket path was
    retried for seconds. GUNICORN_BIND, read by the config file, and --bind alike."""
    command = [arg for arg in gunicorn_args(1, free_port()) if not arg.startswith("127.0.0.1:")]
    command.remove("--bind")
    result = run_to_exit(command, process_env | {"GUNICORN_BIND": f"127.0.0.1:0,{bind}"})
    assert result.returncode != 0
    assert f"streamer: configuration error: --bind / GUNICORN_BIND {bind!r}: {said}" in (
        result.stderr
    )
    assert "Traceback" not in result.stderr and "Booting worker" not in result.stderr
    result = run_to_exit([*command, "--bind", bind], process_env)
    assert result.returncode != 0 and said in result.stderr


def test_gunicorn_refuses_to_start_without_a_secret(
    process_env: dict[str, str], redis_url: str
) -> None:
    env = {k: v for k, v in process_env.items() if k != "STREAMER_SECRET"}
    result = run_to_exit(gunicorn_args(1, free_port()), env | {"STREAMER_REDIS_URL": redis_url})
    assert result.returncode != 0
    assert "STREAMER_SECRET is not set" in result.stderr


def test_gunicorn_refuses_a_bad_setting(process_env: dict[str, str], redis_url: str) -> None:
    env = {**process_env, "STREAMER_REDIS_URL": redis_url, "STREAMER_HISTORY_SIZE": "lots"}
    result = run_to_exit(gunicorn_args(1, free_port()), env)
    assert result.returncode != 0
    assert "STREAMER_HISTORY_SIZE must be an integer" in result.stderr + result.stdout


async def test_streamer_serve_with_the_embedded_broker(
    process_env: dict[str, str], start_process: StartProcess, token_for: TokenFor, user_id: str
) -> None:
    server = start_process(["streamer", "serve", "--port", "{port}"], process_env)
    await asyncio.to_thread(server.wait_healthy)
    assert "embedded" in server.log()
    assert frozen_at_startup(server.log()) == 1
    token = token_for(user_id)
    sse = await CurlStream.open(f"{server.base_url}/sse/tasks/", token)
    ws = await WsStream.open(server.base_url.replace("http", "ws") + f"/ws/tasks/?token={token}")
    try:
        assert (await sse.next_data())["type"] == "active_tasks"
        assert (await ws.next())["type"] == "active_tasks"
        # Without Redis, the CLI publishes over HTTP to the running service.
        event_id = await run_cli(
            "publish", "--user", user_id, "--task", "t1", "--progress", "5",
            "--url", server.base_url, env=process_env,
        )  # fmt: skip
        assert (await sse.next_data())["id"] == event_id
        assert (await ws.next())["id"] == event_id
    finally:
        await sse.close()
        await ws.close()


async def test_streamer_serve_development_mode(
    process_env: dict[str, str], start_process: StartProcess
) -> None:
    env = {k: v for k, v in process_env.items() if not k.startswith("STREAMER_")}
    server = start_process(["streamer", "serve", "--port", "{port}"], env)
    await asyncio.to_thread(server.wait_healthy)
    assert "generated one for this run" in server.log()
    status, body = server.get("/demo/token")
    assert status == 200 and b'"token"' in body
    status, page = server.get("/")
    assert status == 200 and b"streamer.js" in page


def test_streamer_serve_refuses_a_port_out_of_range(process_env: dict[str, str]) -> None:
    result = run_to_exit(["streamer", "serve", "--port", "70000"], process_env)
    assert result.returncode == 2
    assert "must be a port number from 1 to 65535" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        # Not development mode (a generated secret, the demo login): an empty secret.
        ("--secret", "", "STREAMER_SECRET must be at least 32"),
        ("--host", "", "argument --host: must be a host name"),  # not every interface
        ("--host", " ", "argument --host: must be a host name"),
    ],
)
def test_streamer_serve_refuses_empty_flags(
    process_env: dict[str, str], flag: str, value: str, message: str
) -> None:
    env = dict(process_env)
    if flag == "--secret":
        del env["STREAMER_SECRET"]
    result = run_to_exit(["streamer", "serve", "--port", str(free_port()), flag, value], env)
    assert result.returncode == 2
    assert message in result.stderr and "generated" not in result.stderr


def test_streamer_serve_refuses_an_empty_secret_variable(process_env: dict[str, str]) -> None:
    """An empty STREAMER_SECRET (a placeholder left in a deployment) is no development
    mode, whose demo login would let anyone in."""
    result = run_to_exit(
        ["streamer", "serve", "--port", str(free_port())], process_env | {"STREAMER_SECRET": ""}
    )
    assert result.returncode == 2
    assert "STREAMER_SECRET is not set" in result.stderr and "generated" not in result.stderr


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("STREAMER_SECRET", "short", "STREAMER_SECRET must be at least 32"),
        ("STREAMER_REDIS_URL", "http://x", "STREAMER_REDIS_URL must be a redis://"),
        ("STREAMER_HEARTBEAT_S", "-1", "STREAMER_HEARTBEAT_S must be between"),
        ("STREAMER_CLIENT_BUFFER", "0", "STREAMER_CLIENT_BUFFER must be between"),
        ("STREAMER_ALLOWED_ORIGINS", "evil.example", "STREAMER_ALLOWED_ORIGINS"),
        ("STREAMER_ALLOWED_ORIGINS", "https://[::1", "STREAMER_ALLOWED_ORIGINS is not a URL"),
        ("STREAMER_ALLOWED_ORIGINS", "https://a.example:99999", "has a bad port"),
        ("STREAMER_REDIS_URL", "redis://[::1", "STREAMER_REDIS_URL is not a URL"),
        ("STREAMER_REDIS_URL", "redis://localhost/abc", "the database after the host"),
        # redis-py takes port 0 for none given, and would use 6379: another server.
        ("STREAMER_REDIS_URL", "redis://127.0.0.1:0/0", "STREAMER_REDIS_URL has a bad port"),
        # Each of these would start, then retry a connection that can never work.
        ("STREAMER_REDIS_URL", "unix://", "STREAMER_REDIS_URL has no socket path"),
        ("STREAMER_REDIS_URL", "redis://ho st/0", "STREAMER_REDIS_URL has a bad host"),
        ("STREAMER_REDIS_URL", "redis://h/" + "9" * 20, "must be a number up to 999999999"),
        ("STREAMER_PUBLISH_KEY", "ключ-ключ-ключ-ключ", "STREAMER_PUBLISH_KEY must be printable"),
        ("STREAMER_REDIS_URL", "redis://localhost/0?foo=bar", "a setting redis-py does not take"),
        ("STREAMER_REDIS_URL", "unix:///run/r.sock?db=x", "?db= must be a number"),
        ("STREAMER_REDIS_URL", "redis://h:1?db=" + "9" * 11, "?db= must be a number up to"),
        ("STREAMER_REDIS_URL", "redis://h:1/0?db=-1", "?db= must be a number up to"),
        ("STREAMER_REDIS_URL", "rediss://h:1?ssl_cert_reqs=no", "a setting redis-py does not take"),
        ("STREAMER_REDIS_URL", "redis://localhost/0?protocol=3", "the protocol is streamer's"),
        ("STREAMER_ALLOWED_ORIGINS", "https://a.example?x=1", "STREAMER_ALLOWED_ORIGINS must be"),
        ("STREAMER_ALLOWED_ORIGINS", "https://a.example#top", "STREAMER_ALLOWED_ORIGINS must be"),
        ("STREAMER_ALLOWED_ORIGINS", "https://me@a.example", "STREAMER_ALLOWED_ORIGINS must be"),
        ("STREAMER_AUTH_URL", "http://[::1", "STREAMER_AUTH_URL is not a URL"),
    ],
)
def test_streamer_serve_refuses_bad_settings(
    process_env: dict[str, str], variable: str, value: str, message: str
) -> None:
    env = {**process_env, variable: value}
    result = run_to_exit(["streamer", "serve", "--port", str(free_port())], env)
    assert result.returncode == 2
    assert message in result.stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
async def test_shutdown_and_reload_close_streams_for_clients_to_resume(
    start_gunicorn: StartGunicorn, token_for: TokenFor, user_id: str, signum: int
) -> None:
    """SIGTERM stops gunicorn, SIGHUP replaces its workers: either way WebSockets close
    with 1001 and SSE streams end, and a client resuming with its last id loses nothing;
    the workers stop without an error."""
    server, env = start_gunicorn(1)
    token = token_for(user_id)
    ws = await WsStream.open(server.base_url.replace("http", "ws") + f"/ws/tasks/?token={token}")
    sse = await CurlStream.open(f"{server.base_url}/sse/tasks/", token)
    try:
        await ws.next()
        await sse.next_data()
        seen = await run_cli(
            "publish", "--user", user_id, "--task", "t", "--progress", "1", env=env
        )  # fmt: skip
        assert (await ws.next())["id"] == seen
        assert (await sse.next_data())["id"] == seen

        server.signal(signum)
        assert await ws_close_code(ws.ws) == 1001
        with pytest.raises(EOFError):
            await sse.next_data()
        missed = await run_cli(
            "publish", "--user", user_id, "--task", "t", "--progress", "2", env=env
        )  # fmt: skip
    finally:
        await ws.close()
        await sse.close()

    if signum == signal.SIGTERM:
        assert await asyncio.to_thread(server.wait_exit, 30) == 0
        # The listening socket's descriptor is closed once, by the event loop.
        assert "Worker exiting" in server.log()
        assert "Error while closing socket" not in server.log()
        server, env = start_gunicorn(1)
    else:
        await asyncio.to_thread(server.wait_healthy)  # the reloaded workers
    resumed = await WsStream.open(
        server.base_url.replace("http", "ws") + f"/ws/tasks/?token={token}&last_event_id={seen}"
    )
    try:
        assert (await resumed.next())["recovered"] is True
        assert (await resumed.next())["id"] == missed
    finally:
        await resumed.close()


async def test_worker_killed_mid_stream_loses_nothing_for_resuming_clients(
    start_gunicorn: StartGunicorn, token_for: TokenFor, user_id: str
) -> None:
    server, env = start_gunicorn(2)
    token = token_for(user_id)
    ws_url = server.base_url.replace("http", "ws") + f"/ws/tasks/?token={token}"
    ws = await WsStream.open(ws_url)
    try:
        await ws.next()
        seen = await run_cli("publish", "--user", user_id, "--task", "t", env=env)
        assert (await ws.next())["id"] == seen
        os.kill(int(ws.worker), signal.SIGKILL)
        assert await ws_close_code(ws.ws) == 1006  # dropped: no close frame from a dead worker
    finally:
        await ws.close()
    missed = [
        await run_cli("publish", "--user", user_id, "--task", "t", "--progress", str(n), env=env)
        for n in range(3)
    ]
    resumed = await WsStream.open(f"{ws_url}&last_event_id={seen}")
    try:
        assert resumed.worker != ws.worker  # another (or a respawned) worker
        assert (await resumed.next())["recovered"] is True
        assert [(await resumed.next())["id"] for _ in missed] == missed
    finally:
        await resumed.close()


async def test_streamer_serve_takes_every_setting_as_a_flag(
    redis_url: str, process_env: dict[str, str], start_process: StartProcess, user_id: str
) -> None:
    env = {k: v for k, v in process_env.items() if not k.startswith("STREAMER_")}
    secret, key = "flag-secret-" + "f" * 40, "flag-publish-key-0123"
    server = start_process(
        [
            "streamer", "serve", "--port", "{port}", "--secret", secret,
            "--publish-key", key, "--redis-url", redis_url, "--heartbeat-s", "0.5",
            "--history-size", "10", "--max-connections-per-user", "3",
        ],
        env,
    )  # fmt: skip
    await asyncio.to_thread(server.wait_healthy)
    assert f"with broker {redis_url}" in server.log()
    assert "development mode" not in server.log()
    token = issue_token(secret, user_id)
    sse = await CurlStream.open(f"{server.base_url}/sse/tasks/", token)
    try:
        assert (await sse.next_data())["type"] == "active_tasks"
        event_id = await run_cli(
            "publish", "--user", user_id, "--task", "t", "--url", server.base_url,
            "--publish-key", key, env=env,
        )  # fmt: skip
        assert (await sse.next_data())["id"] == event_id
    finally:
        await sse.close()
    assert server.get("/demo/token")[0] == 404  # a given secret means production mode


MISSPELT_WARNING = (
    "STREAMER_HISTROY_SIZE is not a setting of streamer (ignored): "
    "did you mean STREAMER_HISTORY_SIZE?"
)


@pytest.mark.parametrize("config_file", [True, False], ids=["streamer's config", "none"])
def test_a_misspelt_setting_is_warned_about_once_with_or_without_the_config_file(
    redis_url: str, process_env: dict[str, str], start_process: StartProcess, config_file: bool
) -> None:
    """With streamer's gunicorn config the master says it, once for all its workers;
    without it (`gunicorn streamer.app:create_app -k aiohttp.GunicornWebWorker`, as
    aiohttp's documentation runs an app) each worker says it: nothing did."""
    env = {**process_env, "STREAMER_REDIS_URL": redis_url, "STREAMER_HISTROY_SIZE": "5"}
    args = gunicorn_args(2)
    if not config_file:
        at = args.index("-c")
        args[at : at + 2] = ["-k", "aiohttp.GunicornWebWorker"]
    server = start_process(args, env)
    server.wait_healthy()
    eventually_sync(
        lambda: server.log().count("Booting worker") == 2, what="both workers", timeout=20
    )
    expected = 1 if config_file else 2
    eventually_sync(
        lambda: server.log().count(MISSPELT_WARNING) >= expected, what="the warning", timeout=20
    )
    if config_file:
        server.wait_workers_started(2)  # past the point where a worker would have said it
    assert server.log().count(MISSPELT_WARNING) == expected
    if not config_file:
        return
    # A reload runs the config file again: the master says it once more, for the workers
    # it starts then and for one started after a crash (each of them said it again).
    first = set(worker_pids(server.process.pid))
    server.signal(signal.SIGHUP)
    eventually_sync(
        lambda: (
            server.log().count(WORKER_STARTED_LOG) == 4
            and not first & set(worker_pids(server.process.pid))
        ),
        what="two new workers",
        timeout=30,
    )
    os.kill(worker_pids(server.process.pid)[0], signal.SIGKILL)
    eventually_sync(
        lambda: (
            server.log().count(WORKER_STARTED_LOG) == 5
            and len(worker_pids(server.process.pid)) == 2
        ),
        what="a worker in place of the one killed",
        timeout=30,
    )
    assert server.log().count(MISSPELT_WARNING) == 2


@pytest.fixture(params=["streamer.worker.StreamerWorker", "aiohttp.GunicornWebWorker"])
def limited_server(
    request: pytest.FixtureRequest,
    redis_url: str,
    process_env: dict[str, str],
    start_process: StartProcess,
) -> ServerProcess:
    """gunicorn with one worker of each class, 3 streams per user, a heartbeat every 60 s."""
    env = {
        **process_env,
        "STREAMER_REDIS_URL": redis_url,
        "STREAMER_MAX_CONNECTIONS_PER_USER": "3",
        "STREAMER_HEARTBEAT_S": "60",
    }
    server = start_process([*gunicorn_args(1), "-k", request.param], env)
    server.wait_healthy()
    return server


async def test_streams_whose_clients_left_are_forgotten(
    limited_server: ServerProcess, token_for: TokenFor, user_id: str
) -> None:
    """Clients that hang up are no longer counted: with streamer's worker at once (their
    handler is cancelled), with aiohttp's own within about a second (the hub looks for
    them), not at the next heartbeat (here 60 s). 15 streams opened and dropped one
    after the other fit in a limit of 3 per user."""
    server = limited_server
    token = token_for(user_id)

    def none_open() -> bool:
        metrics = server.get("/metrics")[1].decode()
        return 'streamer_connections{transport="sse"} 0.0' in metrics

    for _ in range(15):
        sse = await CurlStream.open(f"{server.base_url}/sse/tasks/", token)
        try:
            assert sse.status == 200, "a stream of a client that left still counts"
            assert (await sse.next_data())["type"] == "active_tasks"
        finally:
            await sse.close()
        await asyncio.to_thread(
            eventually_sync, none_open, what="the hub to forget the stream", timeout=5
        )


async def test_held_polls_whose_clients_left_are_forgotten_within_a_second(
    limited_server: ServerProcess, token_for: TokenFor, user_id: str
) -> None:
    """A held long poll is written to only when it is answered: one whose client left
    no longer counts within about a second under either worker (with aiohttp's own, the
    hub looks for them), not at the next heartbeat (here 60 s). Six polls held and
    dropped one after the other fit in a limit of 3 per user."""
    server = limited_server
    auth = f"Authorization: Bearer {token_for(user_id)}"
    curl = shutil.which("curl")
    assert curl is not None, "curl is not installed: .ci/run installs it"
    first = await asyncio.create_subprocess_exec(
        curl, "-s", "-f", "-H", auth, f"{server.base_url}/poll/tasks/",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    answer, _ = await asyncio.wait_for(first.communicate(), 10)
    assert first.returncode == 0, answer
    held_url = f"{server.base_url}/poll/tasks/?last_event_id={json.loads(answer)['last_event_id']}"

    def polls_open(count: int) -> bool:
        metrics = server.get("/metrics")[1].decode()
        return f'streamer_connections{{transport="poll"}} {count}.0' in metrics

    for _ in range(6):
        poll = await asyncio.create_subprocess_exec(
            curl, "-s", "-o", "/dev/null", "-w", "%{http_code}", "-H", auth, held_url,
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            await eventually(lambda: polls_open(1), what="the poll held")
        finally:
            poll.kill()
            await poll.wait()
        await eventually(lambda: polls_open(0), what="the poll forgotten", timeout=5)


def test_more_workers_at_run_time_need_redis_too(
    process_env: dict[str, str], start_process: StartProcess
) -> None:
    """SIGTTIN adds a worker: without Redis gunicorn stays at one (each worker would run
    its own embedded broker), as it refuses to start with two."""
    server = start_process(gunicorn_args(1), process_env)
    server.wait_healthy()
    master = server.process.pid
    server.signal(signal.SIGTTIN)
    eventually_sync(
        lambda: "refusing to run 2 workers without STREAMER_REDIS_URL" in server.log(),
        what="the refusal",
    )
    server.signal(signal.SIGTTIN)
    eventually_sync(lambda: server.log().count("refusing to run") == 2, what="a second refusal")
    assert len(worker_pids(master)) == 1
    assert server.log().count("Booting worker") == 1


def test_a_reload_to_more_workers_needs_redis_too(
    process_env: dict[str, str], start_process: StartProcess, tmp_path: Path
) -> None:
    """The config file changed to three workers, then a reload (which starts as many as
    the settings say): without Redis it runs one."""
    conf = tmp_path / "gunicorn.conf.py"
    conf.write_text((Path(GUNICORN_CONF)).read_text())
    args = [str(conf) if arg == GUNICORN_CONF else arg for arg in gunicorn_args(1)]
    args.remove("--workers")
    args.remove("1")  # the config file's, from WEB_CONCURRENCY
    server = start_process(args, {**process_env, "WEB_CONCURRENCY": "1"})
    server.wait_healthy()
    first = set(worker_pids(server.process.pid))
    conf.write_text(conf.read_text() + "\nworkers = 3\n")
    server.signal(signal.SIGHUP)
    eventually_sync(
        lambda: (
            worker_pids(server.process.pid) and not first & set(worker_pids(server.process.pid))
        ),
        what="the reload",
    )
    assert "refusing to run 3 workers without STREAMER_REDIS_URL" in server.log()
    assert server.log().count("Booting worker") == 2  # the first one, and one after it
    assert len(worker_pids(server.process.pid)) == 1


def test_a_reload_keeps_the_workers_of_a_redis_given_with_gunicorns_env_flag(
    redis_url: str, process_env: dict[str, str], start_process: StartProcess
) -> None:
    """Redis set with `gunicorn -e`, which a reload takes out of the environment for a
    while: the reload keeps both workers, and refuses nothing."""
    env = {k: v for k, v in process_env.items() if k != "STREAMER_REDIS_URL"}
    server = start_process([*gunicorn_args(2), "-e", f"STREAMER_REDIS_URL={redis_url}"], env)
    server.wait_healthy()  # one worker serves: the other may still be starting

    def both_workers() -> set[int] | None:
        workers = set(worker_pids(server.process.pid))
        return workers if len(workers) == 2 else None

    first = eventually_sync(both_workers, what="both workers")
    server.signal(signal.SIGHUP)

    def reloaded() -> bool:
        workers = set(worker_pids(server.process.pid))
        return len(workers) == 2 and not first & workers

    eventually_sync(reloaded, what="two new workers")
    assert "refusing" not in server.log()
    assert server.log().count("Booting worker") == 4


def test_more_workers_at_run_time_with_redis(
    redis_url: str, process_env: dict[str, str], start_process: StartProcess
) -> None:
    server = start_process(gunicorn_args(1), {**process_env, "STREAMER_REDIS_URL": redis_url})
    server.wait_healthy()
    server.signal(signal.SIGTTIN)
    eventually_sync(lambda: len(worker_pids(server.process.pid)) == 2, what="a second worker")
    assert "refusing" not in server.log()


def test_a_binary_upgrade_keeps_the_metrics_of_both_generations(
    redis_url: str, process_env: dict[str, str], start_process: StartProcess, tmp_path: Path
) -> None:
    """SIGUSR2 starts a new master beside the old one (gunicorn's binary upgrade): it
    must neither wipe the old workers' metrics nor lose its own when the old master,
    which made its metrics directory, exits."""
    pid_file = tmp_path / "gunicorn.pid"
    env = {**process_env, "STREAMER_REDIS_URL": redis_url, "TMPDIR": str(tmp_path)}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    server = start_process([*gunicorn_args(1), "--pid", str(pid_file)], env)
    server.wait_healthy()
    # After a reload, which hands the metrics directory to the environment gunicorn
    # starts a new master with.
    first_worker = set(worker_pids(server.process.pid))
    server.signal(signal.SIGHUP)
    eventually_sync(
        lambda: not first_worker & set(worker_pids(server.process.pid)), what="the reload"
    )
    old_dirs = list(tmp_path.glob("streamer-metrics-*"))
    assert len(old_dirs) == 1 and list(old_dirs[0].glob("*.db"))
    server.signal(signal.SIGUSR2)
    new_pid_file = tmp_path / "gunicorn.pid.2"
    eventually_sync(new_pid_file.exists, what="the new master")
    new_master = int(new_pid_file.read_text())
    eventually_sync(lambda: len(worker_pids(new_master)) == 1, what="the new master's worker")
    dirs = list(tmp_path.glob("streamer-metrics-*"))
    assert len(dirs) == 2 and old_dirs[0] in dirs
    assert list(old_dirs[0].glob("*.db")), "the old workers' metrics were wiped"

    server.signal(signal.SIGTERM)  # the old master goes, the new one serves
    assert server.wait_exit(30) == 0
    assert not old_dirs[0].exists()
    try:
        eventually_sync(lambda: server.get("/readyz")[0] == 200, what="the new generation")
        status, body = server.get("/metrics")
        assert status == 200 and b"streamer_connections" in body
    finally:
        os.kill(new_master, signal.SIGTERM)
        eventually_sync(lambda: not pid_alive(new_master), what="the new master to stop")


def test_a_reload_runs_one_version_of_streamer(
    redis_url: str,
    process_env: dict[str, str],
    start_process: StartProcess,
    token_for: TokenFor,
    tmp_path: Path,
) -> None:
    """After an upgrade, SIGHUP (systemctl reload) must start workers on the new code
    throughout: modules the master had imported (the settings) as well as the others
    (the handlers)."""
    import streamer

    copy = tmp_path / "site" / "streamer"
    shutil.copytree(Path(streamer.__file__).parent, copy)
    env = {**process_env, "STREAMER_REDIS_URL": redis_url, "PYTHONPATH": str(copy.parent)}
    # Not from the checkout: gunicorn puts its working directory first on the path.
    server = start_process(gunicorn_args(1), env, cwd=tmp_path)
    server.wait_healthy()
    assert json.loads(server.get("/healthz")[1])["status"] == "ok"

    def edit(name: str, old: str, new: str) -> None:
        path = copy / name
        text = path.read_text()
        assert old in text
        path.write_text(text.replace(old, new))

    # (Of another length: a source file's cached bytecode is checked by size and mtime
    # in whole seconds.)
    edit("config.py", "sse_retry_ms: int = 3000", "sse_retry_ms: int = 12345")
    edit("handlers/health.py", '{"status": "ok"}', '{"status": "ok", "version": 2}')
    old_workers = set(worker_pids(server.process.pid))
    server.signal(signal.SIGHUP)
    eventually_sync(
        lambda: not old_workers & set(worker_pids(server.process.pid)),
        what="the old worker to stop",
    )
    assert json.loads(server.get("/healthz")[1]).get("version") == 2
    curl = subprocess.run(
        ["curl", "-sN", "--max-time", "2", "-H", f"Authorization: Bearer {token_for('u')}",
         f"{server.base_url}/sse/tasks/"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert "retry: 12345" in curl.stdout, curl.stdout


def test_serve_on_a_port_in_use_says_so_and_never_that_it_serves(
    process_env: dict[str, str], start_process: StartProcess
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = start_process(["streamer", "serve", "--port", "{port}"], process_env, port)
        assert server.wait_exit(30) == 1
    said = server.log()
    assert f"cannot listen on 127.0.0.1:{port}: the address is already in use" in said
    assert "serving on" not in said
