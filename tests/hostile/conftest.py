"""Shared by the hostile-input tests: the test server's error log, its address, and the
check that it still serves a well-behaved client."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
from aiohttp.test_utils import TestClient

from ..clients import WAIT_S, ws_json

TokenFor = Callable[..., str]
ServerErrors = Callable[[], list[logging.LogRecord]]

# A blocking raw-socket exchange: the sockets time out after 10 s, this bounds the whole.
THREAD_WAIT_S = 3 * WAIT_S


@pytest.fixture
def server_errors(caplog: pytest.LogCaptureFixture) -> ServerErrors:
    """ERROR records logged so far (the test server runs in this process): a handler
    that crashed shows up here as aiohttp's "Error handling request" with a traceback,
    the access logger (on, as in production) as "Unhandled exception"."""
    caplog.set_level(logging.INFO, logger="aiohttp.access")

    def errors() -> list[logging.LogRecord]:
        return [record for record in caplog.records if record.levelno >= logging.ERROR]

    return errors


def address(client: TestClient) -> tuple[str, int]:  # type: ignore[type-arg]
    assert client.host and client.port
    return client.host, client.port


async def assert_still_serving(client: TestClient, token: str) -> None:  # type: ignore[type-arg]
    """A brand-new, well-behaved WebSocket client gets its snapshot and a pong."""
    async with client.ws_connect(f"/ws/tasks/?token={token}") as ws:
        first = await ws_json(ws)
        assert first["type"] == "active_tasks"
        await ws.send_json({"type": "ping"})
        assert await ws_json(ws) == {"type": "pong"}
