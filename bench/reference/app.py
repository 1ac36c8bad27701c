"""The reference: task progress fan-out as a Python developer would write it in an
afternoon with Starlette and uvicorn.

One Redis pub/sub listener per process (PSUBSCRIBE bench:user:*), one asyncio.Queue per
connection, and the published JSON relayed as it is. A client names its user in the
query string (`/ws/tasks/?user=42`, `/sse/tasks/?user=42`): no authentication, no
history, no resume, no limits. Its first message says it is subscribed, like
streamer's `active_tasks`. Run it with `python -m bench.reference`.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis.asyncio as aioredis
from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

CHANNEL_PREFIX = "bench:user:"
HELLO = json.dumps({"type": "active_tasks", "tasks": [], "recovered": True})


class Hub:
    """The queues of this process's connections, by user."""

    def __init__(self) -> None:
        self.queues: defaultdict[str, set[asyncio.Queue[str]]] = defaultdict(set)

    def subscribe(self, user: str) -> asyncio.Queue[str]:
        queue: asyncio.Queue[str] = asyncio.Queue()
        self.queues[user].add(queue)
        return queue

    def unsubscribe(self, user: str, queue: asyncio.Queue[str]) -> None:
        self.queues[user].discard(queue)
        if not self.queues[user]:
            del self.queues[user]

    def publish(self, user: str, message: str) -> None:
        for queue in self.queues.get(user, ()):
            queue.put_nowait(message)


async def relay(pubsub: aioredis.client.PubSub, hub: Hub) -> None:
    async for message in pubsub.listen():
        if message["type"] == "pmessage":
            hub.publish(message["channel"].removeprefix(CHANNEL_PREFIX), message["data"])


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    hub = Hub()
    app.state.hub = hub
    client = aioredis.from_url(os.environ["BENCH_REDIS_URL"], decode_responses=True)
    pubsub = client.pubsub()
    await pubsub.psubscribe(CHANNEL_PREFIX + "*")
    listener = asyncio.create_task(relay(pubsub, hub))
    yield
    listener.cancel()
    await pubsub.aclose()
    await client.aclose()


async def ws_tasks(websocket: WebSocket) -> None:
    user = websocket.query_params["user"]
    hub: Hub = websocket.app.state.hub
    await websocket.accept()
    queue = hub.subscribe(user)

    async def send_events() -> None:
        await websocket.send_text(HELLO)
        while True:
            await websocket.send_text(await queue.get())

    sender = asyncio.create_task(send_events())
    try:
        while True:
            await websocket.receive_text()  # nothing to answer; waits for the disconnect
    except WebSocketDisconnect:
        pass
    finally:
        sender.cancel()
        hub.unsubscribe(user, queue)


async def sse_tasks(request: Request) -> EventSourceResponse:
    user = request.query_params["user"]
    hub: Hub = request.app.state.hub
    queue = hub.subscribe(user)

    async def events() -> AsyncIterator[dict[str, str]]:
        try:
            yield {"event": "active_tasks", "data": HELLO}
            while True:
                yield {"data": await queue.get()}
        finally:
            hub.unsubscribe(user, queue)

    return EventSourceResponse(events())


async def readyz(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok\n")


app = Starlette(
    routes=[
        WebSocketRoute("/ws/tasks/", ws_tasks),
        Route("/sse/tasks/", sse_tasks),
        Route("/readyz", readyz),
    ],
    lifespan=lifespan,
)
