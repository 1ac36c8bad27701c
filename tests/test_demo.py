"""Development mode: the demo login and demo jobs, and their absence otherwise."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp.test_utils import TestClient

from streamer.app import create_app
from streamer.config import Config

from .clients import ws_json
from .conftest import SECRET


async def demo_client(aiohttp_client: Callable[..., object], demo: bool) -> TestClient:
    app = await create_app(Config(secret=SECRET, demo_mode=demo))
    test_client: TestClient = await aiohttp_client(app)  # type: ignore[misc]
    return test_client


async def test_demo_job_runs_and_can_be_cancelled(aiohttp_client: Callable[..., object]) -> None:
    client = await demo_client(aiohttp_client, demo=True)
    token = (await (await client.get("/demo/token")).json())["token"]
    async with client.ws_connect(f"/ws/tasks/?token={token}") as ws:
        await ws_json(ws)
        started = await client.post("/demo/jobs")
        assert started.status == 202
        task_id = (await started.json())["task_id"]
        first = await ws_json(ws)
        assert first["task_id"] == task_id and first["status"] == "STARTED"
        await ws.send_json({"type": "cancel_task", "task_id": task_id})
        while (message := await ws_json(ws))["type"] != "task_completed":
            assert message["type"] in ("task_progress", "task_cancelled")
        assert message["status"] == "REVOKED"


async def test_demo_endpoints_are_off_outside_development_mode(
    aiohttp_client: Callable[..., object],
) -> None:
    client = await demo_client(aiohttp_client, demo=False)
    assert (await client.get("/demo/token")).status == 404
    assert (await client.post("/demo/jobs")).status == 404
