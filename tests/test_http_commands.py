"""The WebSocket commands over plain HTTP (`/api/tasks/...`): the same answers, credentials,
validation and limits, origins and CORS, broker outages, and real gunicorn with curl."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import jwt
import pytest
from aiohttp.test_utils import TestClient
from yarl import URL

from streamer.app import create_app
from streamer.app_keys import BROKER, COMMAND_BUCKETS
from streamer.auth.sessions import SESSION_COOKIE
from streamer.broker.base import MAX_SNAPSHOT_TASKS
from streamer.config import Config
from streamer.events import completed_event, progress_event
from streamer.publisher import AsyncPublisher
from streamer.rate_limit import BucketsByKey

from .clients import ws_json
from .conftest import SECRET, StartGunicorn
from .nginx import Nginx
from .processes import RedisServer
from .waiting import eventually

TokenFor = Callable[..., str]
AiohttpClient = Callable[..., Any]
ALLOWED = "https://app.example.com"
EVIL = "https://evil.example"
# What the same task-id rules refuse, as they reach the path (percent-encoded).
INVALID_TASK_IDS = ["%00", "a%0Ab", "%7F", "x" * 201, "%2E", "%2E%2E", ".%2E"]


async def make_client(aiohttp_client: AiohttpClient, config: Config, **changes: Any) -> TestClient:
    client: TestClient = await aiohttp_client(await create_app(config.replace(**changes)))
    return client


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def own_origin(client: TestClient) -> str:
    return f"http://{client.host}:{client.port}"


async def ws_reply(client: TestClient, token: str, command: dict[str, Any]) -> dict[str, Any]:
    """The WebSocket's reply to one command, for comparison."""
    async with client.ws_connect(f"/ws/tasks/?token={token}") as ws:
        await ws_json(ws)
        await ws.send_json(command)
        return await ws_json(ws)


async def publish(client: TestClient, *events: Any) -> None:
    for event in events:
        await client.app[BROKER].publish(event)


# --- what each endpoint answers ---------------------------------------------------------


async def test_active_tasks_status_and_cancel_of_own_tasks(
    client: TestClient, token_for: TokenFor, user_id: str
) -> None:
    token = token_for(user_id)
    await publish(
        client,
        progress_event(user_id, "t-old", progress=10, task_name="import"),
        progress_event(user_id, "t-new", progress=40, current_step="resizing"),
        progress_event(user_id, "t-done", progress=90),
        completed_event(user_id, "t-done", result_data={"rows": 3}),
    )

    listed = await client.get("/api/tasks/", headers=bearer(token))
    assert listed.status == 200
    assert listed.content_type == "application/json"
    assert listed.headers["Cache-Control"] == "no-store"
    body = await listed.json()
    assert set(body) == {"type", "id", "tasks", "recovered", "truncated"}
    assert (body["type"], body["recovered"], body["truncated"]) == ("active_tasks", True, False)
    assert [t["task_id"] for t in body["tasks"]] == ["t-new", "t-old"]
    # The same tasks as the WebSocket's answer to get_active_tasks.
    over_ws = await ws_reply(client, token, {"type": "get_active_tasks"})
    assert body["tasks"] == over_ws["tasks"]
    assert body["truncated"] == over_ws["truncated"]
    assert isinstance(body["id"], str) and body["id"]

    status = await client.get("/api/tasks/t-new", headers=bearer(token))
    assert status.status == 200 and status.headers["Cache-Control"] == "no-store"
    reply = await status.json()
    assert reply == await ws_reply(client, token, {"type": "get_task_status", "task_id": "t-new"})
    assert reply["type"] == "task_status" and reply["status"]["progress"] == 40
    finished = await (await client.get("/api/tasks/t-done", headers=bearer(token))).json()
    assert finished["status"]["status"] == "SUCCESS"
    assert finished["status"]["result_data"] == {"rows": 3}

    cancelled = await client.post("/api/tasks/t-old/cancel", headers=bearer(token))
    assert cancelled.status == 200
    assert await cancelled.json() == {"type": "task_cancelled", "task_id": "t-old", "success": True}
    assert await client.app[BROKER].is_cancelled(user_id, "t-old")
    # Success only when recorded for a running task, as over the WebSocket.
    for task_id in ("t-done", "never-ran"):
        refused = await client.post(f"/api/tasks/{task_id}/cancel", headers=bearer(token))
        assert refused.status == 200
        expected = {"type": "task_cancelled", "task_id": task_id, "success": False}
        assert await refused.json() == expected
        cmd = {"type": "cancel_task", "task_id": task_id}
        assert await ws_reply(client, token, cmd) == expected


async def test_every_credential_of_the_streams_works(
    config: Config, aiohttp_client: AiohttpClient, token_for: TokenFor, user_id: str
) -> None:
    client = await make_client(aiohttp_client, config, cookie_secure=False)
    token = token_for(user_id)
    await publish(client, progress_event(user_id, "t", progress=5))
    by_query = await client.get("/api/tasks/t", params={"token": token})
    assert by_query.status == 200 and (await by_query.json())["status"]["progress"] == 5
    assert (await client.post("/api/tasks/t/cancel", params={"token": token})).status == 200

    assert (await client.post("/auth/session", headers=bearer(token))).status == 200
    by_cookie = await client.get("/api/tasks/")
    assert by_cookie.status == 200
    assert [t["task_id"] for t in (await by_cookie.json())["tasks"]] == ["t"]
    assert (await client.get("/api/tasks/t")).status == 200


async def test_another_users_task_looks_exactly_like_an_unknown_one(
    client: TestClient, token_for: TokenFor
) -> None:
    await publish(client, progress_event("alice", "report-7", progress=50))
    bob = bearer(token_for("bob"))

    foreign = await client.get("/api/tasks/report-7", headers=bob)
    unknown = await client.get("/api/tasks/report-8", headers=bob)
    assert foreign.status == unknown.status == 404
    assert await foreign.read() == await unknown.read()
    assert await foreign.json() == {
        "type": "error",
        "code": "task_not_found",
        "message": "no such task",
    }
    skip = {"Date"}
    assert {k: v for k, v in foreign.headers.items() if k not in skip} == {
        k: v for k, v in unknown.headers.items() if k not in skip
    }

    cancel_foreign = await client.post("/api/tasks/report-7/cancel", headers=bob)
    assert await cancel_foreign.json() == {
        "type": "task_cancelled",
        "task_id": "report-7",
        "success": False,
    }
    assert not await client.app[BROKER].is_cancelled("alice", "report-7")
    listed = await (await client.get("/api/tasks/", headers=bob)).json()
    assert listed["tasks"] == []


# --- refusals ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/api/tasks/"), ("GET", "/api/tasks/t"), ("POST", "/api/tasks/t/cancel")],
)
async def test_bad_or_missing_credentials_are_401(
    client: TestClient, token_for: TokenFor, method: str, path: str
) -> None:
    expired = jwt.encode({"sub": "u", "exp": int(time.time()) - 10}, SECRET, algorithm="HS256")
    wrong_key = jwt.encode({"sub": "u", "exp": int(time.time()) + 60}, "k" * 40, algorithm="HS256")
    for headers, params in [
        ({}, {}),
        (bearer("not-a-token"), {}),
        (bearer(expired), {}),
        (bearer(wrong_key), {}),
        ({"Authorization": "Basic dTpw"}, {}),
        ({}, {"token": "nonsense"}),
    ]:
        response = await client.request(method, path, headers=headers, params=params)
        assert response.status == 401, (headers, params)
        body = await response.json()
        assert (body["type"], body["code"]) == ("error", "unauthorized")
        assert response.headers["WWW-Authenticate"] == 'Bearer realm="streamer"'
    assert not await client.app[BROKER].is_cancelled("u", "t")


async def test_unknown_paths_and_methods_under_api_are_answered_in_json(
    client: TestClient,  # type: ignore[type-arg]
) -> None:
    for method, path, status, allow in [
        ("GET", "/api/tasks/t/cancel", 405, "OPTIONS, POST"),
        ("POST", "/api/tasks/", 405, "GET, HEAD, OPTIONS"),
        ("DELETE", "/api/tasks/events", 405, "GET, HEAD, OPTIONS, POST"),
        ("GET", "/api/tasks/t/cancel/more", 404, None),
        ("GET", "/api/", 404, None),
    ]:
        response = await client.request(method, path)
        assert response.status == status and response.headers.get("Allow") == allow
        body = await response.json()
        expected = "method_not_allowed" if status == 405 else "not_found"
        assert body["type"] == "error" and body["code"] == expected


@pytest.mark.parametrize("task_id", INVALID_TASK_IDS)
async def test_invalid_task_ids_are_400_with_the_websocket_code(
    client: TestClient, token_for: TokenFor, task_id: str
) -> None:
    token = token_for("u")
    for method, path in [
        ("GET", f"/api/tasks/{task_id}"),
        ("POST", f"/api/tasks/{task_id}/cancel"),
    ]:
        response = await client.request(method, URL(path, encoded=True), headers=bearer(token))
        assert response.status == 400
        body = await response.json()
        assert body["code"] == "invalid_task_id"
    # The message is the one the WebSocket gives for the same id.
    over_ws = await ws_reply(
        client, token, {"type": "get_task_status", "task_id": URL(task_id, encoded=True).path}
    )
    assert over_ws == body


async def test_task_ids_with_any_printable_character(
    client: TestClient, token_for: TokenFor, user_id: str
) -> None:
    """A task id is a path segment once percent-encoded, whatever it holds."""
    awkward = "reports/2024 ?#%é"
    await publish(client, progress_event(user_id, awkward, progress=7))
    path = "/api/tasks/" + quote(awkward, safe="")
    status = await client.get(URL(path, encoded=True), headers=bearer(token_for(user_id)))
    assert status.status == 200
    assert (await status.json())["task_id"] == awkward
    cancel = await client.post(
        URL(path + "/cancel", encoded=True), headers=bearer(token_for(user_id))
    )
    assert (await cancel.json())["success"] is True


async def test_a_task_id_whose_escapes_are_not_utf8_is_400(
    client: TestClient, token_for: TokenFor, user_id: str
) -> None:
    """`%ff` is no text: aiohttp keeps it as written, which named the task "%ff" (the
    task `%25ff` names)."""
    await publish(client, progress_event(user_id, "%ff", progress=7))
    headers = bearer(token_for(user_id))
    for method, path in [("GET", "/api/tasks/%ff"), ("POST", "/api/tasks/%ff/cancel")]:
        response = await client.request(method, URL(path, encoded=True), headers=headers)
        assert response.status == 400
        assert await response.json() == {
            "type": "error",
            "code": "invalid_task_id",
            "message": "the task id is not UTF-8 text once its escapes are decoded",
        }
    named = await client.get(URL("/api/tasks/%25ff", encoded=True), headers=headers)
    assert named.status == 200 and (await named.json())["status"]["progress"] == 7
    assert not await client.app[BROKER].is_cancelled(user_id, "%ff")


async def test_commands_beyond_the_rate_are_429_per_user(
    config: Config, aiohttp_client: AiohttpClient, token_for: TokenFor
) -> None:
    client = await make_client(aiohttp_client, config, commands_per_s=2)
    alice, bob = bearer(token_for("alice")), bearer(token_for("bob"))
    paths = ["/api/tasks/", "/api/tasks/t", "/api/tasks/", "/api/tasks/t"]
    # The burst (twice the rate) across every endpoint: the bucket is the user's.
    answered = [(await client.get(path, headers=alice)).status for path in paths]
    assert answered == [200, 404, 200, 404]
    refused = await client.post("/api/tasks/t/cancel", headers=alice)
    assert refused.status == 429
    assert await refused.json() == {
        "type": "error",
        "code": "rate_limited",
        "message": "at most 2 commands per second",
    }
    assert refused.headers["Retry-After"] == "1"
    # Another user has their own bucket; bad credentials cost no one anything.
    assert (await client.get("/api/tasks/", headers=bob)).status == 200
    assert (await client.get("/api/tasks/", headers=bearer("nonsense"))).status == 401

    async def let_through() -> bool:
        return (await client.get("/api/tasks/", headers=alice)).status == 200

    # The interval paces the retries: each refused one takes no token, but is a request.
    await eventually(let_through, what="alice's bucket to refill", timeout=5, interval=0.2)


async def test_a_large_snapshot_costs_its_size(
    config: Config, aiohttp_client: AiohttpClient, token_for: TokenFor, user_id: str
) -> None:
    client = await make_client(aiohttp_client, config, commands_per_s=1)  # a burst of 2
    step = "x" * 1000
    for n in range(MAX_SNAPSHOT_TASKS + 1):
        await client.app[BROKER].publish(progress_event(user_id, f"t{n:04d}", current_step=step))
    token = bearer(token_for(user_id))
    first = await client.get("/api/tasks/", headers=token)
    body = await first.json()
    assert body["truncated"] is True and 0 < len(body["tasks"]) <= MAX_SNAPSHOT_TASKS
    # Over 16 KiB: it cost more than the one command left in the burst.
    assert (await client.get("/api/tasks/t0000", headers=token)).status == 429


def test_buckets_by_user_stay_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr("streamer.rate_limit.time.monotonic", lambda: now[0])
    buckets = BucketsByKey(rate=1, burst=2, max_size=3)
    for user in ("a", "b", "c", "d"):
        assert buckets.get(user).take()
    assert len(buckets) == 3  # "a", the least recently used, went first
    assert buckets.get("d").take()
    assert not buckets.get("d").take()
    assert buckets.get("d").retry_after_s() == 1
    now[0] += 2.0  # every bucket has refilled: each is the same as a new one
    assert buckets.get("e").take()
    assert len(buckets) == 1


# --- origins and CORS -------------------------------------------------------------------


async def test_cookie_posts_need_an_allowed_origin(
    config: Config, aiohttp_client: AiohttpClient, token_for: TokenFor, user_id: str
) -> None:
    client = await make_client(
        aiohttp_client, config, cookie_secure=False, allowed_origins=(ALLOWED,)
    )
    await publish(client, progress_event(user_id, "t", progress=1))
    assert (await client.post("/auth/session", headers=bearer(token_for(user_id)))).status == 200
    assert SESSION_COOKIE in {c.key for c in client.session.cookie_jar}

    for origin in (EVIL, "null", own_origin(client).replace("http:", "https:")):
        foreign = await client.post("/api/tasks/t/cancel", headers={"Origin": origin})
        assert foreign.status == 403, origin
        assert (await foreign.json())["code"] == "origin_not_allowed"
        assert "Access-Control-Allow-Origin" not in foreign.headers
    no_origin = await client.post("/api/tasks/t/cancel")
    assert no_origin.status == 403
    assert "Origin header" in (await no_origin.json())["message"]
    assert not await client.app[BROKER].is_cancelled(user_id, "t")
    # A cookie GET from another site is refused too (it would read the user's tasks).
    assert (await client.get("/api/tasks/", headers={"Origin": EVIL})).status == 403

    own = await client.post("/api/tasks/t/cancel", headers={"Origin": own_origin(client)})
    assert own.status == 200 and (await own.json())["success"] is True
    assert "Access-Control-Allow-Origin" not in own.headers  # same origin: no CORS needed
    listed = await client.get("/api/tasks/t", headers={"Origin": ALLOWED})
    assert listed.status == 200
    assert listed.headers["Access-Control-Allow-Origin"] == ALLOWED
    assert listed.headers["Access-Control-Allow-Credentials"] == "true"
    assert "Origin" in listed.headers["Vary"]
    # Its mistakes too, which it could not read otherwise.
    for method, path in [("GET", "/api/nothing"), ("DELETE", "/api/tasks/t")]:
        wrong = await client.request(method, path, headers={"Origin": ALLOWED})
        assert wrong.status in (404, 405)
        assert wrong.headers["Access-Control-Allow-Origin"] == ALLOWED
        wrong = await client.request(method, path, headers={"Origin": EVIL})
        assert "Access-Control-Allow-Origin" not in wrong.headers


async def test_token_posts_without_origin_are_accepted(
    client: TestClient, token_for: TokenFor, user_id: str
) -> None:
    await publish(client, progress_event(user_id, "t", progress=1))
    response = await client.post("/api/tasks/t/cancel", headers=bearer(token_for(user_id)))
    assert response.status == 200 and (await response.json())["success"] is True
    # From a page of another site, the token is not enough: the origin is not allowed.
    evil = bearer(token_for(user_id)) | {"Origin": EVIL}
    assert (await client.post("/api/tasks/t/cancel", headers=evil)).status == 403


async def test_a_wildcard_covers_tokens_never_the_cookie(
    config: Config, aiohttp_client: AiohttpClient, token_for: TokenFor, user_id: str
) -> None:
    client = await make_client(aiohttp_client, config, cookie_secure=False, allowed_origins=("*",))
    await publish(client, progress_event(user_id, "t", progress=1))
    assert (await client.post("/auth/session", headers=bearer(token_for(user_id)))).status == 200
    evil = {"Origin": EVIL}
    assert (await client.post("/api/tasks/t/cancel", headers=evil)).status == 403
    assert (await client.get("/api/tasks/", headers=evil)).status == 403
    with_token = await client.post("/api/tasks/t/cancel", headers=evil | bearer(token_for(user_id)))
    assert with_token.status == 200
    assert with_token.headers["Access-Control-Allow-Origin"] == "*"
    assert "Access-Control-Allow-Credentials" not in with_token.headers


async def test_preflight_for_listed_origins(
    config: Config, aiohttp_client: AiohttpClient, token_for: TokenFor
) -> None:
    client = await make_client(aiohttp_client, config, allowed_origins=(ALLOWED,))
    asks = {
        "Origin": ALLOWED,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization",
    }
    for path, method in [
        ("/api/tasks/t/cancel", "POST"),
        ("/api/tasks/t", "GET"),
        ("/api/tasks/cancel", "GET"),  # a task called "cancel"
        ("/api/tasks/", "GET"),
    ]:
        preflight = await client.options(path, headers=asks)
        assert preflight.status == 204, path
        assert preflight.headers["Access-Control-Allow-Origin"] == ALLOWED
        assert preflight.headers["Access-Control-Allow-Credentials"] == "true"
        assert preflight.headers["Access-Control-Allow-Methods"] == method, path
        assert "Authorization" in preflight.headers["Access-Control-Allow-Headers"]
    denied = await client.options("/api/tasks/t/cancel", headers=asks | {"Origin": EVIL})
    assert denied.status == 403
    assert "Access-Control-Allow-Origin" not in denied.headers
    # The error answers carry CORS headers too, so the page can read why.
    unauthorized = await client.get("/api/tasks/", headers={"Origin": ALLOWED})
    assert unauthorized.status == 401
    assert unauthorized.headers["Access-Control-Allow-Origin"] == ALLOWED


# --- the broker down --------------------------------------------------------------------


async def test_broker_down_is_503_with_retry_after(
    redis_client: TestClient,
    redis_server: RedisServer,
    redis_url: str,
    token_for: TokenFor,
    user_id: str,
) -> None:
    token = bearer(token_for(user_id))
    async with AsyncPublisher(redis_url) as publisher:
        await publisher.progress(user_id, "t", progress=1)
    assert (await redis_client.get("/api/tasks/t", headers=token)).status == 200
    redis_server.stop()
    try:
        for method, path in [
            ("GET", "/api/tasks/"),
            ("GET", "/api/tasks/t"),
            ("POST", "/api/tasks/t/cancel"),
        ]:
            response = await redis_client.request(method, path, headers=token)
            assert response.status == 503, path
            assert response.headers["Retry-After"] == "1"
            body = await response.json()
            assert body == {
                "type": "error",
                "code": "broker_unavailable",
                "message": "the broker is unavailable; try again",
            }
    finally:
        redis_server.start()

    async def answered() -> bool:
        # The private Redis keeps no data over a restart: "t" is gone, the API is back.
        return (await redis_client.get("/api/tasks/", headers=token)).status == 200

    await eventually(answered, what="the API to answer once Redis is back", interval=0.3)


async def test_session_store_down_is_503(
    redis_client: TestClient, redis_server: RedisServer, token_for: TokenFor, user_id: str
) -> None:
    login = await redis_client.post("/auth/session", headers=bearer(token_for(user_id)))
    assert login.status == 200
    cookie = {SESSION_COOKIE: login.cookies[SESSION_COOKIE].value}
    redis_server.stop()
    try:
        response = await redis_client.get("/api/tasks/", cookies=cookie)
        assert response.status == 503
        assert response.headers["Retry-After"] == "1"
        assert (await response.json())["code"] == "broker_unavailable"
    finally:
        redis_server.start()


# --- real gunicorn, and the README's curl commands --------------------------------------


async def curl(*args: str) -> tuple[int, dict[str, Any]]:
    """Run curl; return the HTTP status and the JSON body."""
    executable = shutil.which("curl")
    assert executable is not None, "curl is not installed: tests/run.sh installs it"
    process = await asyncio.create_subprocess_exec(
        executable, "-s", "-w", "\n%{http_code}", *args, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(process.communicate(), 20)
    body, _, status = out.decode().rpartition("\n")
    return int(status), json.loads(body)


async def test_with_curl_against_gunicorn(
    start_gunicorn: StartGunicorn, redis_url: str, token_for: TokenFor, user_id: str
) -> None:
    server, _ = start_gunicorn(2)
    async with AsyncPublisher(redis_url) as publisher:
        await publisher.progress(user_id, "report-7", progress=40, current_step="crunching")
        await publisher.progress("someone-else", "theirs", progress=1)
    auth = f"Authorization: Bearer {token_for(user_id)}"
    base = server.base_url

    status, listed = await curl("-H", auth, f"{base}/api/tasks/")
    assert status == 200 and listed["type"] == "active_tasks"
    assert [t["task_id"] for t in listed["tasks"]] == ["report-7"]
    status, one = await curl("-H", auth, f"{base}/api/tasks/report-7")
    assert status == 200 and one["status"]["current_step"] == "crunching"
    status, theirs = await curl("-H", auth, f"{base}/api/tasks/theirs")
    assert (status, theirs["code"]) == (404, "task_not_found")
    status, cancelled = await curl("-X", "POST", "-H", auth, f"{base}/api/tasks/report-7/cancel")
    assert (status, cancelled["success"]) == (200, True)
    async with AsyncPublisher(redis_url) as publisher:
        assert await publisher.is_cancelled(user_id, "report-7")
        assert not await publisher.is_cancelled("someone-else", "report-7")
    status, refused = await curl(f"{base}/api/tasks/")
    assert (status, refused["code"]) == (401, "unauthorized")


async def test_rate_limit_under_gunicorn(
    start_gunicorn: StartGunicorn, token_for: TokenFor, user_id: str
) -> None:
    """One worker: its per-user bucket is the user's whole allowance (20 in a burst)."""
    server, _ = start_gunicorn(1)
    async with aiohttp.ClientSession(base_url=server.base_url) as http:
        headers = bearer(token_for(user_id))
        statuses = []
        for _ in range(30):
            async with http.get("/api/tasks/", headers=headers) as response:
                statuses.append(response.status)
                if response.status == 429:
                    assert int(response.headers["Retry-After"]) >= 1
        assert statuses.count(200) >= 20 and statuses[:20] == [200] * 20
        assert 429 in statuses
        # Another user is not affected.
        async with http.get("/api/tasks/", headers=bearer(token_for("other"))) as response:
            assert response.status == 200


async def test_buckets_are_kept_per_process(
    config: Config, aiohttp_client: AiohttpClient, token_for: TokenFor
) -> None:
    client = await make_client(aiohttp_client, config)
    for user in ("a", "b", "c"):
        assert (await client.get("/api/tasks/", headers=bearer(token_for(user)))).status == 200
    assert len(client.app[COMMAND_BUCKETS]) == 3


async def test_the_own_origin_behind_nginx(
    start_gunicorn: StartGunicorn,
    redis_url: str,
    tmp_path: Path,
    token_for: TokenFor,
    user_id: str,
) -> None:
    """Behind the shipped nginx the service's own origin is the proxy's (Host is passed
    on with its port): a cookie POST from there is accepted, one without Origin is not."""
    server, _ = start_gunicorn(1)
    nginx = Nginx(tmp_path / "nginx", server.port)
    nginx.directory.mkdir()
    nginx.start()
    try:
        async with AsyncPublisher(redis_url) as publisher:
            await publisher.progress(user_id, "t", progress=1)
        async with aiohttp.ClientSession(base_url=nginx.base_url) as http:
            async with http.post("/auth/session", headers=bearer(token_for(user_id))) as login:
                assert login.status == 200
                # Secure: a client jar would not send it back over http; the header does.
                cookie = {"Cookie": f"{SESSION_COOKIE}={login.cookies[SESSION_COOKIE].value}"}
            async with http.post("/api/tasks/t/cancel", headers=cookie) as no_origin:
                assert no_origin.status == 403
            upstream = {"Origin": server.base_url}  # gunicorn's own address: not the page's
            async with http.post("/api/tasks/t/cancel", headers=cookie | upstream) as other:
                assert other.status == 403
            own = cookie | {"Origin": nginx.base_url}
            async with http.post("/api/tasks/t/cancel", headers=own) as accepted:
                assert accepted.status == 200
                assert (await accepted.json())["success"] is True
    finally:
        nginx.stop()
