"""Producers: the Python publishers, the HTTP endpoint, and validation of what they send."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import AsyncIterator, Callable

import pytest
import redis
from aiohttp.test_utils import TestClient

from streamer.app import create_app
from streamer.auth.tokens import verify_token
from streamer.broker.redis_schema import user_channel
from streamer.config import Config
from streamer.events import EventError
from streamer.publisher import AsyncPublisher, BrokerUnavailable, Publisher

from .clients import ws_json, ws_messages
from .conftest import PUBLISH_KEY, SECRET
from .processes import BIN, free_port

TokenFor = Callable[..., str]


async def test_sync_and_async_publishers_reach_clients(
    redis_client: TestClient, redis_url: str, token_for: TokenFor, user_id: str
) -> None:
    async with redis_client.ws_connect(f"/ws/tasks/?token={token_for(user_id)}") as ws:
        await ws_json(ws)
        with Publisher(redis_url) as publisher:
            first = publisher.progress(
                user_id, "job", progress=10, current_step="start", processed_items=1,
                total_items=10, status="STARTED",
            )  # fmt: skip
            assert not publisher.is_cancelled(user_id, "job")
        async with AsyncPublisher(redis_url) as async_publisher:
            second = await async_publisher.progress(user_id, "job", progress=50)
            third = await async_publisher.completed(
                user_id, "job", result_data={"rows": 3, "files": []}
            )
        events = await ws_messages(ws, 3)
        assert [e["id"] for e in events] == [first, second, third]
        assert events[0]["status"] == "STARTED" and events[0]["processed_items"] == 1
        assert events[2]["result_data"] == {"rows": 3, "files": []}

        await ws.send_json({"type": "get_task_status", "task_id": "job"})
        state = (await ws_json(ws))["status"]
        assert state["status"] == "SUCCESS" and state["progress"] == 100
        assert state["result_data"] == {"rows": 3, "files": []}
        assert state["created_at"] <= state["started_at"] <= state["completed_at"]


async def test_cancellation_is_seen_by_the_producer(
    redis_client: TestClient, redis_url: str, token_for: TokenFor, user_id: str
) -> None:
    with Publisher(redis_url) as publisher:
        publisher.progress(user_id, "long-job", progress=1)
        async with redis_client.ws_connect(f"/ws/tasks/?token={token_for(user_id)}") as ws:
            await ws_json(ws)
            await ws.send_json({"type": "cancel_task", "task_id": "long-job"})
            assert (await ws_json(ws))["success"] is True
        assert publisher.is_cancelled(user_id, "long-job")
        async with AsyncPublisher(redis_url) as async_publisher:
            assert await async_publisher.is_cancelled(user_id, "long-job")


def test_one_publish_costs_a_constant_number_of_redis_commands(redis_url: str) -> None:
    """Publishing is one script call, whatever the number of subscribers."""
    with redis.Redis.from_url(redis_url) as admin, Publisher(redis_url) as publisher:
        # Loads the script, and makes "t" an active task with a history, so that both
        # measurements below take the same path through the script.
        publisher.progress("u", "t", progress=1)

        def evalsha_calls() -> int:
            stats = admin.info("commandstats").get("cmdstat_evalsha", {"calls": 0})
            return int(stats["calls"])

        def calls_for_one_publish() -> int:
            """Every command Redis ran for one publish, the script's own included."""
            before = admin.info("stats")["total_commands_processed"]
            publisher.progress("u", "t", progress=5)
            after = admin.info("stats")["total_commands_processed"]
            return int(after - before) - 1  # the INFO call itself

        scripts_before = evalsha_calls()
        alone = calls_for_one_publish()
        assert evalsha_calls() - scripts_before == 1  # one round trip
        subscribers = [admin.pubsub() for _ in range(20)]
        for pubsub in subscribers:
            pubsub.subscribe(user_channel("u"))
        try:
            assert calls_for_one_publish() == alone
        finally:
            for pubsub in subscribers:
                pubsub.close()


def test_publisher_validates_events(redis_url: str) -> None:
    with Publisher(redis_url) as publisher:
        with pytest.raises(EventError, match="progress"):
            publisher.progress("u", "t", progress=101)
        with pytest.raises(EventError, match="progress"):
            publisher.progress("u", "t", progress=10**400)  # too large for a float
        with pytest.raises(EventError, match="status"):
            publisher.progress("u", "t", status="SUCCESS")
        with pytest.raises(EventError, match="result_data"):
            publisher.completed("u", "t", result_data=[1, 2])
        with pytest.raises(EventError, match="user_id"):
            publisher.progress("", "t", progress=1)
        assert publisher.progress(42, "t", progress=1)  # numeric user ids become strings


def test_publisher_reports_an_unreachable_redis() -> None:
    with Publisher(f"redis://127.0.0.1:{free_port()}/0") as publisher:
        with pytest.raises(BrokerUnavailable):
            publisher.progress("u", "t", progress=1)
        with pytest.raises(BrokerUnavailable):
            publisher.is_cancelled("u", "t")


async def test_http_publish_endpoint(client: TestClient, token_for: TokenFor, user_id: str) -> None:
    url = "/api/tasks/events"
    key = {"X-API-Key": PUBLISH_KEY}
    async with client.ws_connect(f"/ws/tasks/?token={token_for(user_id)}") as ws:
        await ws_json(ws)
        accepted = await client.post(
            url, json={"user_id": user_id, "task_id": "t", "progress": 5}, headers=key
        )
        assert accepted.status == 202
        event_id = (await accepted.json())["id"]
        event = await ws_json(ws)
        assert event["id"] == event_id and event["type"] == "task_progress"
        # A terminal status without "type" means task_completed.
        done = await client.post(
            url, json={"user_id": user_id, "task_id": "t", "status": "SUCCESS"}, headers=key
        )
        assert done.status == 202
        assert (await ws_json(ws))["type"] == "task_completed"

        numeric = await client.post(
            url, json={"user_id": 7, "task_id": "t", "progress": 1}, headers=key
        )
        assert numeric.status == 202

    refusals = [
        ({}, {"user_id": "u", "task_id": "t"}, 401),
        ({"X-API-Key": "wrong-key-0123456789"}, {"user_id": "u", "task_id": "t"}, 401),
        (key, {"task_id": "t"}, 422),
        (key, {"user_id": "u"}, 422),
        (key, {"user_id": "u", "task_id": "t", "progress": "lots"}, 422),
        (key, {"user_id": "u", "task_id": "t", "progress": 10**400}, 422),  # no float
        (key, {"user_id": "u", "task_id": "t", "progres": 5}, 422),
        (key, {"user_id": "u", "task_id": "t", "type": "active_tasks"}, 422),
        (key, {"user_id": "u", "task_id": "t", "status": ["SUCCESS"]}, 422),
        (key, ["not", "an", "object"], 422),
    ]
    for headers, body, status in refusals:
        response = await client.post(url, json=body, headers=headers)
        assert response.status == status, (body, await response.text())
        assert (await response.json())["type"] == "error"

    not_json = await client.post(url, data=b"{oops", headers=key)
    assert not_json.status == 400
    too_big = await client.post(url, data=b"{" + b" " * 300_000 + b"}", headers=key)
    assert too_big.status == 413


async def test_http_publish_is_off_without_a_key(
    redis_url: str, aiohttp_client: Callable[..., object]
) -> None:
    app = await create_app(Config(secret=SECRET))
    test_client: TestClient = await aiohttp_client(app)  # type: ignore[misc]
    response = await test_client.post(
        "/api/tasks/events", json={"user_id": "u", "task_id": "t"}, headers={"X-API-Key": ""}
    )
    assert response.status == 403
    assert "STREAMER_PUBLISH_KEY" in (await response.json())["message"]


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--redis-url", "redis://127.0.0.1:{port}/0"], 1, "could not publish to Redis"),
        (["--url", "http://127.0.0.1:{port}", "--publish-key", PUBLISH_KEY], 1, "could not reach"),
        (["--progress", "150", "--redis-url", "redis://127.0.0.1:1/0"], 2, "progress must be"),
        (["--status", "DONE", "--redis-url", "redis://127.0.0.1:1/0"], 2, "status of a"),
        (["--result", "[1]", "--status", "SUCCESS", "--url", "http://x"], 2, "result_data"),
        (["--status", "SUCCESS", "--progress", "50", "--url", "http://x"], 2, "--progress: not"),
        (["--redis-url", "redis://127.0.0.1:1/0", "--url", "http://x"], 2, "not allowed with"),
        (["--url", "http://127.0.0.1:abc", "--publish-key", "k"], 2, "--url must be an http"),
        (["--url", "http://127.0.0.1:{port}/a b", "--publish-key", "k"], 2, "--url must be"),
        (["--url", "ftp://127.0.0.1/", "--publish-key", "k"], 2, "--url must be an http"),
        (["--url", "", "--publish-key", "k"], 2, "--url must be an http"),
        (["--url", "http://u:s3cret@h", "--publish-key", "k"], 2, "without user, password"),
        (["--url", "http://h/base?x=1", "--publish-key", "k"], 2, "without user, password, query"),
        (["--status", "", "--url", "http://x"], 2, "status of a task_progress event"),
    ],
)
def test_cli_publish_errors_are_clear(
    args: list[str], code: int, message: str, process_env: dict[str, str]
) -> None:
    port = str(free_port())  # nothing listens there
    result = subprocess.run(
        [str(BIN / "streamer"), "publish", "--user", "u", "--task", "t"]
        + [a.replace("{port}", port) for a in args],
        env={k: v for k, v in process_env.items() if k != "STREAMER_REDIS_URL"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == code
    assert message in result.stderr and "Traceback" not in result.stderr
    assert "s3cret" not in result.stderr


def test_cli_publish_takes_blank_settings_for_unset(process_env: dict[str, str]) -> None:
    """As everywhere else, a blank STREAMER_REDIS_URL or STREAMER_PUBLISH_KEY is no
    setting: it publishes over HTTP, and says it needs a key."""
    env = {**process_env, "STREAMER_REDIS_URL": " ", "STREAMER_PUBLISH_KEY": "  "}
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    result = subprocess.run(
        [str(BIN / "streamer"), "publish", "--user", "u", "--task", "t", "--url", url],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "publishing over HTTP needs --publish-key" in result.stderr, result.stderr


async def test_http_publish_reads_a_body_sent_in_pieces(
    client: TestClient, token_for: TokenFor, user_id: str
) -> None:
    body = json.dumps({"user_id": user_id, "task_id": "t", "current_step": "x" * 1500})

    async def chunks() -> AsyncIterator[bytes]:
        half = len(body) // 2
        yield body[:half].encode()
        await asyncio.sleep(0)  # let the first piece go out on its own
        yield body[half:].encode()

    response = await client.post(
        "/api/tasks/events", data=chunks(), headers={"X-API-Key": PUBLISH_KEY}
    )
    assert response.status == 202, await response.text()


async def test_http_publish_expecting_100_continue_is_refused_before_its_body(
    client: TestClient, user_id: str
) -> None:
    """`Expect: 100-continue` (curl's way with bodies over 1 KiB): a wrong key or a body
    declared too large is answered at once, without asking for the body; otherwise the
    client is asked for it, and the event is published."""
    assert client.host and client.port
    body = json.dumps({"user_id": user_id, "task_id": "t", "progress": 5}).encode()

    async def answer(
        key: str, length: int
    ) -> tuple[bytes, asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection(client.host, client.port)
        writer.write(
            f"POST /api/tasks/events HTTP/1.1\r\nHost: x\r\nX-API-Key: {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {length}\r\n"
            "Expect: 100-continue\r\n\r\n".encode()
        )
        return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10), reader, writer

    for key, length, status in (("wrong", len(body), b"401"), (PUBLISH_KEY, 10**9, b"413")):
        head, _, writer = await answer(key, length)
        writer.close()
        assert head.startswith(b"HTTP/1.1 " + status + b" "), head
        assert b"connection: close" in head.lower()  # the body that may follow is not read
    head, reader, writer = await answer(PUBLISH_KEY, len(body))
    try:
        assert head == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(body)
        accepted = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert accepted.startswith(b"HTTP/1.1 202 "), accepted
    finally:
        writer.close()


async def test_http_publish_with_an_unknown_expectation_is_417_in_json(
    client: TestClient, user_id: str
) -> None:
    body = json.dumps({"user_id": user_id, "task_id": "t", "progress": 5})
    headers = {"X-API-Key": PUBLISH_KEY, "Expect": "something-else"}
    response = await client.post("/api/tasks/events", data=body, headers=headers)
    assert response.status == 417
    error = await response.json()
    assert error["type"] == "error" and error["code"] == "expectation_failed"
    assert "something-else" in error["message"]


async def test_http_publish_with_an_undecodable_key_is_refused(client: TestClient) -> None:
    assert client.host and client.port
    request = (
        b"POST /api/tasks/events HTTP/1.1\r\nHost: x\r\nX-API-Key: \xff\xfe\r\n"
        b"Content-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"
    )
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(request)
    status_line = await asyncio.wait_for(reader.readline(), 10)
    writer.close()
    assert status_line.startswith(b"HTTP/1.1 401"), status_line


async def test_numeric_user_ids_reach_the_user_with_that_decimal_string(
    client: TestClient, token_for: TokenFor
) -> None:
    async with client.ws_connect(f"/ws/tasks/?token={token_for('7')}") as ws:
        await ws_json(ws)
        accepted = await client.post(
            "/api/tasks/events",
            json={"user_id": 7, "task_id": "t", "progress": 1},
            headers={"X-API-Key": PUBLISH_KEY},
        )
        assert accepted.status == 202
        assert (await ws_json(ws))["id"] == (await accepted.json())["id"]


def test_publisher_defaults_to_streamer_redis_url(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STREAMER_REDIS_URL", redis_url)
    with Publisher() as publisher:
        event_id = publisher.progress(42, "t", progress=1)
    with redis.Redis.from_url(redis_url) as admin:
        assert admin.xlen("streamer:history:{42}") == 1
    assert event_id
    # Read as the server reads them: trimmed, and a blank variable is an unset one.
    monkeypatch.setenv("STREAMER_REDIS_URL", f"  {redis_url} ")
    monkeypatch.setenv("STREAMER_HISTORY_SIZE", "  ")
    with Publisher() as publisher:
        assert publisher.progress(42, "t", progress=2)
    monkeypatch.setenv("STREAMER_REDIS_URL", " ")
    with pytest.raises(ValueError, match="STREAMER_REDIS_URL"):
        Publisher()
    monkeypatch.delenv("STREAMER_REDIS_URL")
    with pytest.raises(ValueError, match="STREAMER_REDIS_URL"):
        Publisher()
    with pytest.raises(TypeError, match="redis_url must be a str, got bytes"):
        Publisher(redis_url.encode())  # type: ignore[arg-type]


def test_streamer_token_signs_with_the_secret_as_the_server_reads_it(
    process_env: dict[str, str],
) -> None:
    """The server trims STREAMER_SECRET and refuses a blank or unprintable one: so do
    `streamer token` and `streamer watch --user`, whose tokens must be the server's."""
    padded = {**process_env, "STREAMER_SECRET": f"  {SECRET}\t"}
    result = subprocess.run(
        [str(BIN / "streamer"), "token", "--user", "42"],
        env=padded, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert verify_token(SECRET, result.stdout.strip()).user_id == "42"
    for secret, says in ((" " * 40, "STREAMER_SECRET is not set"), ("\x01" * 40, "control")):
        refused = subprocess.run(
            [str(BIN / "streamer"), "token", "--user", "42", "--secret", secret],
            env=process_env, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert refused.returncode == 2 and says in refused.stderr, refused.stderr
        assert not refused.stdout


def test_streamer_token_prints_a_token_for_the_user(process_env: dict[str, str]) -> None:
    result = subprocess.run(
        [str(BIN / "streamer"), "token", "--user", "42", "--ttl", "120"],
        env=process_env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    identity = verify_token(SECRET, result.stdout.strip())
    assert identity.user_id == "42"
    assert 100 < identity.expires_at - time.time() <= 121
    refused = subprocess.run(
        [str(BIN / "streamer"), "token", "--user", "42"],
        env={k: v for k, v in process_env.items() if k != "STREAMER_SECRET"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert refused.returncode == 2 and "STREAMER_SECRET is not set" in refused.stderr
    for ttl in ("0", "300000000000"):  # the second would expire after any valid `exp`
        too_long = subprocess.run(
            [str(BIN / "streamer"), "token", "--user", "42", "--ttl", ttl],
            env=process_env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert too_long.returncode == 2 and "--ttl must be" in too_long.stderr, ttl
        assert not too_long.stdout


@pytest.mark.parametrize(
    ("status", "said"),
    [
        (None, "got null"),  # as the body has it, not Python's None
        ("success", 'got "success" (statuses are upper case: SUCCESS)'),
        ("progress", "(statuses are upper case: PROGRESS)"),
    ],
)
async def test_a_bad_status_over_http_is_named_as_the_body_has_it(
    client: TestClient, user_id: str, status: str | None, said: str
) -> None:
    body = {"user_id": user_id, "task_id": "t", "status": status}
    response = await client.post("/api/tasks/events", json=body, headers={"X-API-Key": PUBLISH_KEY})
    assert response.status == 422
    assert said in (await response.json())["message"]
