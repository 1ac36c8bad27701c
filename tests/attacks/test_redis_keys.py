"""Nothing streamer writes to Redis lives forever, except the dataset's epoch."""

from __future__ import annotations

from collections.abc import Callable

import aiohttp
import redis

from streamer.broker.redis_schema import EPOCH_KEY
from streamer.publisher import Publisher

from ..clients import open_stream
from ..processes import ServerProcess
from .conftest import Serve

TokenFor = Callable[..., str]
Session = Callable[[ServerProcess], aiohttp.ClientSession]


async def test_every_key_but_the_epoch_expires(
    serve: Serve, session: Session, redis_url: str, token_for: TokenFor
) -> None:
    """A user with no history connecting, progress, completion, a new run, a cancel,
    a login and a logout: every key they leave has a TTL, `streamer:epoch` excepted."""
    server = serve(1)
    http = session(server)
    for transport in ("websocket", "sse"):
        async with open_stream(http, transport, token_for(f"newcomer-{transport}")) as stream:
            await stream.next()  # a snapshot for a user without history starts one
    with Publisher(redis_url) as publisher:
        publisher.progress("worker", "job", progress=10)
        publisher.completed("worker", "job", result_data={"ok": True})
        publisher.progress("worker", "job", progress=1, status="STARTED")
        publisher.progress("worker", "other", progress=5)
    async with http.ws_connect(f"/ws/tasks/?token={token_for('worker')}") as ws:
        await ws.receive_json(timeout=10)
        await ws.send_json({"type": "cancel_task", "task_id": "other"})
        assert (await ws.receive_json(timeout=10))["success"] is True
    login = await http.post(
        "/auth/session", headers={"Authorization": f"Bearer {token_for('browser')}"}
    )
    assert login.status == 200
    logout = await http.delete("/auth/session")
    assert logout.status == 204
    again = await http.post("/auth/session", json={"token": token_for("browser")})
    assert again.status == 200

    with redis.Redis.from_url(redis_url) as admin:
        keys = {key.decode(): admin.ttl(key) for key in admin.scan_iter(count=1000)}
    assert EPOCH_KEY in keys and keys.pop(EPOCH_KEY) == -1
    kinds = {key.split(":")[1] if key.startswith("streamer:") else key[:16] for key in keys}
    assert {"task", "active", "history", "cancel"} <= kinds, kinds
    assert any(key.startswith("streamer_session") for key in keys), keys
    forever = [key for key, ttl in keys.items() if ttl < 0]
    assert forever == [], f"keys without a TTL: {forever}"
