"""The shipped nginx configuration in front of gunicorn: WebSocket upgrade and unbuffered SSE."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import pytest

from .conftest import StartGunicorn
from .nginx import BARE_SITE, Nginx
from .processes import ServerProcess, gunicorn_args
from .streams import CurlStream, WsStream, run_cli
from .waiting import eventually, eventually_sync

TokenFor = Callable[..., str]
StartProcess = Callable[..., ServerProcess]


@pytest.fixture
def proxied(
    start_gunicorn: StartGunicorn, tmp_path: Path
) -> Iterator[tuple[Nginx, dict[str, str]]]:
    server, env = start_gunicorn(2)
    nginx = Nginx(tmp_path / "nginx", server.port)
    nginx.directory.mkdir()
    try:
        nginx.start()
        yield nginx, env
    finally:
        nginx.stop()


async def test_websocket_and_sse_through_nginx(
    proxied: tuple[Nginx, dict[str, str]], token_for: TokenFor, user_id: str
) -> None:
    nginx, env = proxied
    token = token_for(user_id)
    ws = await WsStream.open(nginx.base_url.replace("http", "ws") + f"/ws/tasks/?token={token}")
    sse = await CurlStream.open(f"{nginx.base_url}/sse/tasks/", token)
    try:
        assert (await ws.next())["type"] == "active_tasks"
        assert sse.status == 200 and sse.headers["content-type"].startswith("text/event-stream")
        assert (await sse.next_data())["type"] == "active_tasks"
        for progress in (10, 20, 30):
            event_id = await run_cli(
                "publish", "--user", user_id, "--task", "t", "--progress", str(progress), env=env
            )  # fmt: skip
            # Each event arrives on its own: nginx does not buffer the stream.
            assert (await ws.next(timeout=5))["id"] == event_id
            assert (await sse.next_data(timeout=5))["id"] == event_id
    finally:
        await ws.close()
        await sse.close()

    # nginx's access log has the requests, without the token (a proxied stream's line
    # is written once nginx has seen both of its sides close).
    def logged() -> str | None:
        log = nginx.access_log.read_text() if nginx.access_log.exists() else ""
        return log if "/ws/tasks/" in log and "/sse/tasks/" in log else None

    async with aiohttp.ClientSession() as session:
        # The service refuses a token given twice and decodes the name: neither leaks.
        for query, status in ((f"token={token}&token=x", 401), (f"%74oken={token}", 200)):
            async with session.get(f"{nginx.base_url}/api/tasks/?{query}") as answer:
                assert answer.status == status, query
    log = await eventually(logged, what="nginx to log both streams")
    assert "/ws/tasks/?[query not logged]" in log and "/api/tasks/?[query not logged]" in log
    assert token not in log
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{nginx.base_url}/metrics") as metrics:
            assert metrics.status == 404  # not exposed through the public proxy
        async with session.get(f"{nginx.base_url}/healthz") as health:
            assert health.status == 200


async def test_same_origin_browser_upgrade_through_nginx(
    proxied: tuple[Nginx, dict[str, str]], token_for: TokenFor
) -> None:
    """nginx passes Host on, so the service recognises its own origin behind the proxy."""
    nginx, _ = proxied
    async with aiohttp.ClientSession() as session:
        url = nginx.base_url.replace("http", "ws") + f"/ws/tasks/?token={token_for('u')}"
        async with session.ws_connect(url, headers={"Origin": nginx.base_url}) as ws:
            assert (await ws.receive_json(timeout=10))["type"] == "active_tasks"
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(url, headers={"Origin": "https://evil.example"})
        assert refused.value.status == 403


async def test_same_origin_through_nginx_behind_a_tls_load_balancer(
    proxied: tuple[Nginx, dict[str, str]], token_for: TokenFor
) -> None:
    """The plain template is for behind a load balancer that terminates TLS: the page's
    origin is https, which the balancer reports in X-Forwarded-Proto; nginx passes it on
    instead of its own http."""
    nginx, _ = proxied
    token = token_for("u")
    page = nginx.base_url.replace("http://", "https://")
    balancer = {"Origin": page, "X-Forwarded-Proto": "https"}
    async with aiohttp.ClientSession() as session:
        url = nginx.base_url.replace("http", "ws") + f"/ws/tasks/?token={token}"
        async with session.ws_connect(url, headers=balancer) as ws:
            assert (await ws.receive_json(timeout=10))["type"] == "active_tasks"
        async with session.get(
            f"{nginx.base_url}/api/tasks/?token={token}", headers=balancer
        ) as answer:
            assert answer.status == 200, await answer.text()
        # The same page over plain http behind it is another origin.
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(url, headers={**balancer, "Origin": nginx.base_url})
        assert refused.value.status == 403


async def test_long_poll_through_nginx(
    proxied: tuple[Nginx, dict[str, str]], token_for: TokenFor, user_id: str
) -> None:
    """The shipped configuration passes long polls: the snapshot, then a held poll
    answered by the next event."""
    nginx, env = proxied
    headers = {"Authorization": f"Bearer {token_for(user_id)}"}
    url = f"{nginx.base_url}/poll/tasks/"
    async with aiohttp.ClientSession(headers=headers) as session:
        async with session.get(url) as response:
            first = await response.json()
        assert response.status == 200 and first["events"][0]["type"] == "active_tasks"
        held = asyncio.ensure_future(
            session.get(url, params={"last_event_id": first["last_event_id"]})
        )
        event_id = await run_cli("publish", "--user", user_id, "--task", "t", env=env)
        async with await asyncio.wait_for(held, 30) as response:
            body = await response.json()
        assert response.status == 200 and response.headers["Cache-Control"] == "no-store"
        assert [e["id"] for e in body["events"]] == [event_id]
        assert body["last_event_id"] == event_id


async def test_sse_and_long_poll_through_nginx_speaking_http_1_0(
    start_gunicorn: StartGunicorn, tmp_path: Path, token_for: TokenFor, user_id: str
) -> None:
    """Each event still arrives on its own: the service streams an HTTP/1.0 request's
    body until the connection closes, unframed, and nginx honours X-Accel-Buffering."""
    server, env = start_gunicorn(1)
    nginx = Nginx(tmp_path / "nginx", server.port, template=BARE_SITE)
    nginx.directory.mkdir()
    nginx.start()
    token = token_for(user_id)
    try:
        sse = await CurlStream.open(f"{nginx.base_url}/sse/tasks/", token)
        try:
            assert sse.status == 200 and sse.headers["content-type"].startswith("text/event-stream")
            assert (await sse.next_data())["type"] == "active_tasks"
            for progress in (10, 20):
                event_id = await run_cli(
                    "publish", "--user", user_id, "--task", "t",
                    "--progress", str(progress), env=env,
                )  # fmt: skip
                assert (await sse.next_data(timeout=5))["id"] == event_id
        finally:
            await sse.close()
        headers = {"Authorization": f"Bearer {token}"}
        async with (
            aiohttp.ClientSession(headers=headers) as session,
            session.get(f"{nginx.base_url}/poll/tasks/") as response,
        ):
            assert response.status == 200
            body = await response.json()
        assert body["events"][0]["type"] == "active_tasks"
        assert body["events"][0]["tasks"][0]["progress"] == 20
    finally:
        nginx.stop()
    log = (tmp_path / "nginx" / "error.log").read_text()
    assert "upstream prematurely closed" not in log, log


@pytest.mark.parametrize(
    ("trusted_proxies", "shown"),
    [(None, "198.51.100.7"), ("10.0.0.0/8", "127.0.0.1")],
    ids=["nginx on loopback, trusted by default", "nginx not trusted"],
)
async def test_the_access_log_shows_the_client_nginx_forwards_for(
    start_process: StartProcess,
    process_env: dict[str, str],
    redis_url: str,
    tmp_path: Path,
    token_for: TokenFor,
    user_id: str,
    trusted_proxies: str | None,
    shown: str,
) -> None:
    """Behind nginx the access log shows the address nginx forwards for, not nginx's
    own; nothing nginx says is believed when it is not a trusted proxy. Here the test
    plays a trusted proxy (on loopback) in front of nginx, forwarding for a client."""
    env = {**process_env, "STREAMER_REDIS_URL": redis_url}
    if trusted_proxies is not None:
        env["STREAMER_TRUSTED_PROXIES"] = trusted_proxies
    server = start_process(gunicorn_args(1), env)
    await asyncio.to_thread(server.wait_healthy)
    nginx = Nginx(tmp_path / "nginx", server.port)
    nginx.directory.mkdir()
    try:
        nginx.start()
        async with aiohttp.ClientSession() as session:
            for name, forwarded_for in (
                ("forwarded", {"X-Forwarded-For": "198.51.100.7"}),
                ("direct", {}),
            ):
                url = f"{nginx.base_url}/api/tasks/?token={token_for(user_id)}&as={name}"
                async with session.get(url, headers=forwarded_for) as answer:
                    assert answer.status == 200
    finally:
        nginx.stop()

    def access_lines() -> dict[str, str] | None:
        found = re.findall(r'(\S+) "GET /api/tasks/\?token=\[redacted\]&as=(\w+) ', server.log())
        return {name: address for address, name in found} if len(found) == 2 else None

    addresses = await asyncio.to_thread(eventually_sync, access_lines, what="two access lines")
    assert addresses == {"forwarded": shown, "direct": "127.0.0.1"}
