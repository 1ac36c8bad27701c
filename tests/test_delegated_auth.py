"""Delegated authentication against auth services that misbehave: every answer that is
not a clear yes or no is "unavailable" (503 / 1013), never "admitted".

The auth services here are real HTTP servers on loopback; the Django one is in
tests/integrations/test_django_auth.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import WSServerHandshakeError, web
from aiohttp.test_utils import TestClient, TestServer

from streamer.app import create_app
from streamer.config import Config, ConfigError

from .clients import ws_close_code, ws_json
from .conftest import PUBLISH_KEY, SECRET

AuthHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MakeClient = Callable[..., Awaitable[TestClient]]  # type: ignore[type-arg]


@pytest.fixture
def with_auth_service(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    aiohttp_client: Callable[..., Awaitable[TestClient]],  # type: ignore[type-arg]
) -> Callable[..., Awaitable[tuple[TestClient, list[dict[str, Any]]]]]:  # type: ignore[type-arg]
    """The service with STREAMER_AUTH_URL pointing at an auth app answering with
    `handler`; returns the service's client and the bodies the auth app received."""

    async def start(
        handler: AuthHandler, userinfo: str = "", **settings: Any
    ) -> tuple[TestClient, list[dict[str, Any]]]:  # type: ignore[type-arg]
        received: list[dict[str, Any]] = []

        async def record(request: web.Request) -> web.StreamResponse:
            received.append(await request.json())
            return await handler(request)

        auth_app = web.Application()
        auth_app.router.add_post("/auth", record)
        auth_server = await aiohttp_server(auth_app)
        auth_url = str(auth_server.make_url("/auth"))
        if userinfo:
            auth_url = auth_url.replace("://", f"://{userinfo}@", 1)
        config = Config(
            secret=SECRET,
            publish_key=PUBLISH_KEY,
            auth_url=auth_url,
            auth_timeout_s=0.5,
            **settings,
        )
        return await aiohttp_client(await create_app(config)), received

    return start


def _answer(status: int, body: Any = None, **headers: str) -> AuthHandler:
    async def handler(request: web.Request) -> web.StreamResponse:
        if isinstance(body, bytes | str):
            return web.Response(status=status, body=body, headers=headers)
        return web.json_response(body, status=status, headers=headers)

    return handler


async def _sse_status(client: TestClient, query: str = "?token=opaque") -> int:  # type: ignore[type-arg]
    async with client.get("/sse/tasks/" + query) as response:
        return response.status


async def test_the_credentials_are_posted_and_the_answer_admits_that_user(
    with_auth_service: Any,
) -> None:
    client, received = await with_auth_service(_answer(200, {"user_id": 42}))
    headers = {"Cookie": "sessionid=s1"}
    async with client.ws_connect("/ws/tasks/?token=drf-token", headers=headers) as ws:
        assert (await ws_json(ws))["type"] == "active_tasks"
    assert received == [{"token": "drf-token", "cookie": "sessionid=s1"}]
    assert (await _sse_status(client, "")) == 401  # no token and no cookie: not asked
    assert len(received) == 1


@pytest.mark.parametrize(
    "status, body",
    [
        (500, {"user_id": "1"}),
        (404, {"user_id": "1"}),
        (200, b"not json"),
        (200, {"user": "1"}),
        (200, {"user_id": ""}),
        (200, {"user_id": True}),
        (200, {"user_id": "x" * 201}),
        (200, {"user_id": "a\nb"}),
        (200, ["1"]),
        (200, {"user_id": "1", "expires_in": -5}),
        (200, {"user_id": "1", "expires_in": "soon"}),
        (200, {"user_id": "1", "expires_in": 1e300}),
    ],
)
async def test_anything_but_a_clear_answer_is_unavailable(
    with_auth_service: Any, status: int, body: Any
) -> None:
    client, _ = await with_auth_service(_answer(status, body))
    async with client.get("/sse/tasks/?token=opaque") as response:
        assert response.status == 503
        assert response.headers["Retry-After"] == "1"
    async with client.ws_connect("/ws/tasks/?token=opaque") as ws:
        assert await ws_close_code(ws) == 1013


async def test_an_answer_that_arrives_in_pieces_is_read_whole(with_auth_service: Any) -> None:
    """A body written in several pieces (a proxy, a streaming framework) was read as far
    as it had arrived, taken for malformed: unavailable, every time."""

    async def in_pieces(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(b'{"user_id"')
        await asyncio.sleep(0.1)  # the second piece comes later, as over a network
        await response.write(b': "9"}')
        await response.write_eof()
        return response

    client, _ = await with_auth_service(in_pieces)
    async with client.ws_connect("/ws/tasks/?token=opaque") as ws:
        assert (await ws_json(ws))["type"] == "active_tasks"


async def test_the_auth_services_password_stays_out_of_the_logs(
    with_auth_service: Any, caplog: pytest.LogCaptureFixture
) -> None:
    client, _ = await with_auth_service(_answer(500, {}), userinfo="streamer:S3CRETPASS")
    async with client.get("/sse/tasks/?token=opaque") as response:
        assert response.status == 503
    warnings = [r.getMessage() for r in caplog.records if "auth service" in r.getMessage()]
    assert warnings and all("S3CRETPASS" not in w and "***@" in w for w in warnings)


async def test_a_redirect_to_a_login_page_is_unavailable(with_auth_service: Any) -> None:
    client, _ = await with_auth_service(_answer(302, b"", Location="/login"))
    assert await _sse_status(client) == 503


async def test_no_answer_in_time_is_unavailable(with_auth_service: Any) -> None:
    async def slow(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(5)
        return web.json_response({"user_id": "1"})

    client, _ = await with_auth_service(slow)
    assert await _sse_status(client) == 503


@pytest.mark.parametrize("status", [401, 403])
async def test_a_refusal_is_401_and_4401_and_is_cached(with_auth_service: Any, status: int) -> None:
    client, received = await with_auth_service(_answer(status, {"error": "no"}))
    assert await _sse_status(client) == 401
    async with client.ws_connect("/ws/tasks/?token=opaque") as ws:
        assert await ws_close_code(ws) == 4401
    assert len(received) == 1


async def test_unavailable_is_never_cached(with_auth_service: Any) -> None:
    answers = iter([web.json_response({}, status=502), web.json_response({"user_id": "7"})])

    async def flaky(request: web.Request) -> web.StreamResponse:
        return next(answers)

    client, received = await with_auth_service(flaky)
    assert await _sse_status(client) == 503
    async with client.ws_connect("/ws/tasks/?token=opaque") as ws:
        assert (await ws_json(ws))["type"] == "active_tasks"
    assert len(received) == 2


async def test_a_stream_ends_when_the_answer_says_it_expires(with_auth_service: Any) -> None:
    client, _ = await with_auth_service(_answer(200, {"user_id": "7", "expires_in": 1}))
    async with client.ws_connect("/ws/tasks/?token=opaque") as ws:
        assert (await ws_json(ws))["type"] == "active_tasks"
        assert await ws_close_code(ws, timeout=5) == 4401


async def test_refusal_at_the_handshake_is_a_403_for_missing_and_bad_credentials(
    with_auth_service: Any,
) -> None:
    client, _ = await with_auth_service(_answer(401, {}), ws_refuse_at_handshake=True)
    for query in ("", "?token=opaque"):
        with pytest.raises(WSServerHandshakeError) as refused:
            await client.ws_connect("/ws/tasks/" + query)
        assert refused.value.status == 403


async def test_refusal_at_the_handshake_without_delegated_auth(
    aiohttp_client: Callable[..., Awaitable[TestClient]],  # type: ignore[type-arg]
    token_for: Callable[..., str],
) -> None:
    config = Config(secret=SECRET, ws_refuse_at_handshake=True)
    client = await aiohttp_client(await create_app(config))
    with pytest.raises(WSServerHandshakeError) as refused:
        await client.ws_connect("/ws/tasks/?token=garbage")
    assert refused.value.status == 403
    async with client.ws_connect(f"/ws/tasks/?token={token_for('u1')}") as ws:
        assert (await ws_json(ws))["type"] == "active_tasks"


@pytest.mark.parametrize(
    "name, value",
    [
        ("STREAMER_AUTH_URL", "ftp://auth.internal/check"),
        ("STREAMER_AUTH_URL", "auth.internal/check"),
        ("STREAMER_AUTH_URL", "http://auth.internal:99999/"),
        ("STREAMER_AUTH_TIMEOUT_S", "0"),
        ("STREAMER_AUTH_CACHE_S", "-1"),
        ("STREAMER_WS_REFUSE_AT_HANDSHAKE", "maybe"),
    ],
)
def test_bad_delegated_auth_settings_stop_start_up(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        Config.from_env({"STREAMER_SECRET": SECRET, name: value})


async def test_the_task_api_takes_delegated_credentials_too(with_auth_service: Any) -> None:
    client, _ = await with_auth_service(_answer(200, {"user_id": "7"}))
    async with client.get("/api/tasks/", headers={"Authorization": "Token drf"}) as response:
        assert response.status == 200
        assert (await response.json())["type"] == "active_tasks"
    down, _ = await with_auth_service(_answer(500, {}))
    async with down.get("/api/tasks/?token=opaque") as response:
        assert response.status == 503
        assert (await response.json())["code"] == "auth_unavailable"


async def test_a_page_of_another_site_cannot_lend_a_junk_token_the_users_cookie(
    with_auth_service: Any,
) -> None:
    """With `*` allowed, a page of any site may read streams with a token, never with
    the user's cookies: a token the service cannot verify goes to the auth service
    without them, from a stream, a query or a cancel alike."""
    listed = "https://app.example.com"
    client, received = await with_auth_service(
        _answer(200, {"user_id": "victim"}), allowed_origins=("*", listed)
    )
    cookie = {"Cookie": "sessionid=victim"}
    foreign = {**cookie, "Origin": "https://evil.example"}
    async with client.ws_connect("/ws/tasks/?token=junk1", headers=foreign) as ws:
        assert (await ws_json(ws))["type"] == "active_tasks"  # the auth app says who
    async with client.get("/sse/tasks/?token=junk2", headers=foreign) as response:
        assert response.status == 200
    async with client.post("/api/tasks/t1/cancel?token=junk3", headers=foreign) as response:
        assert response.status == 200
    assert received == [{"token": f"junk{n}", "cookie": None} for n in (1, 2, 3)]
    received.clear()
    # A listed page, or no page at all (answers are cached by token and cookie).
    for n, own in enumerate(({**cookie, "Origin": listed}, cookie)):
        async with client.get(f"/sse/tasks/?token=own{n}", headers=own) as response:
            assert response.status == 200
    assert received == [{"token": f"own{n}", "cookie": "sessionid=victim"} for n in (0, 1)]
