"""The attacked target: real gunicorn with aiohttp workers on the private Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest

from ..processes import ServerProcess, gunicorn_args

Serve = Callable[..., ServerProcess]


@pytest.fixture
def serve(
    redis_url: str, process_env: dict[str, str], start_process: Callable[..., ServerProcess]
) -> Serve:
    """`serve(workers, STREAMER_X="...")`: gunicorn with those extra settings, once ready."""

    def start(workers: int = 2, **settings: str) -> ServerProcess:
        env = {**process_env, "STREAMER_REDIS_URL": redis_url, **settings}
        server = start_process(gunicorn_args(workers), env)
        server.wait_healthy()
        return server

    return start


@pytest.fixture
async def session() -> AsyncIterator[Callable[[ServerProcess], aiohttp.ClientSession]]:
    """`session(server)`: an HTTP client session for that server; closed at teardown."""
    opened: list[aiohttp.ClientSession] = []

    def open_session(server: ServerProcess) -> aiohttp.ClientSession:
        client = aiohttp.ClientSession(base_url=server.base_url)
        opened.append(client)
        return client

    try:
        yield open_session
    finally:
        for client in opened:
            await client.close()
