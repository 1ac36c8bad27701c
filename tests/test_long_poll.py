"""GET /poll/tasks/: long polling, on both brokers, in process and against real servers."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from streamer import wire
from streamer.app import create_app
from streamer.app_keys import BROKER, HUB
from streamer.config import Config
from streamer.events import progress_event
from streamer.handlers.common import WORKER_HEADER
from streamer.hub import Hub
from streamer.opening import REPLAY_PAGE
from streamer.publisher import AsyncPublisher, Publisher
from streamer.reasons import Reason

from . import test_browser
from .browser import Browser
from .clients import assert_strictly_increasing
from .conftest import StartGunicorn
from .nginx import BUFFERING_SITE, Nginx
from .processes import ServerProcess
from .test_browser import open_page, page_url, row_js, rows, wait_status
from .test_transports import publish_progress
from .waiting import eventually

TokenFor = Callable[..., str]
# The browser tests' `streamer serve` on Redis (Chromium and the publisher are shared fixtures).
server_env = test_browser.server_env
server = test_browser.server
POLL_TIMEOUT_S = 2.0
ALLOWED_ORIGIN = "https://app.example.com"


@pytest.fixture
async def client(
    config: Config, aiohttp_client: Callable[..., object]
) -> AsyncIterator[TestClient]:  # type: ignore[type-arg]
    """The app (memory and Redis) with a short poll timeout and one listed origin."""
    config = config.replace(poll_timeout_s=POLL_TIMEOUT_S, allowed_origins=(ALLOWED_ORIGIN,))
    test_client = await aiohttp_client(await create_app(config))  # type: ignore[misc]
    yield test_client


async def poll(
    client: TestClient | aiohttp.ClientSession,  # type: ignore[type-arg]
    token: str,
    *,
    last_event_id: str | None = None,
    task_id: str | None = None,
    path: str = "/poll/tasks/",
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any], Any]:
    params = {"token": token} if token else {}
    if last_event_id is not None:
        params["last_event_id"] = last_event_id
    if task_id is not None:
        params["task_id"] = task_id
    async with client.get(path, params=params, headers=headers) as response:
        body = await response.json()
        return response.status, body, response.headers


def held_polls(hub: Hub) -> int:
    """Polls past their snapshot and replay, waiting for live events."""
    return sum(1 for c in hub.connections() if c.transport == "poll" and c.live)


async def hold_a_poll(
    client: TestClient,  # type: ignore[type-arg]
    token: str,
) -> tuple[asyncio.Future[tuple[int, dict[str, Any], Any]], str]:
    """A poll past the snapshot (whose id is returned too), held by the hub."""
    _, first, _ = await poll(client, token)
    held = asyncio.ensure_future(poll(client, token, last_event_id=first["last_event_id"]))
    await eventually(lambda: held_polls(client.app[HUB]) == 1, what="the poll held by the hub")
    return held, first["last_event_id"]


async def test_a_fresh_poll_gets_the_snapshot_first(
    client: TestClient,  # type: ignore[type-arg]
    token_for: TokenFor,
    user_id: str,
) -> None:
    await publish_progress(client, user_id, "a", progress=5)
    started = time.monotonic()
    status, body, headers = await poll(client, token_for(user_id))
    assert time.monotonic() - started < POLL_TIMEOUT_S / 2  # not held: the snapshot is there
    assert status == 200
    assert headers["Content-Type"].startswith("application/json")
    assert headers["Cache-Control"] == "no-store"
    assert set(body) == {"events", "last_event_id"}
    [snapshot] = body["events"]
    assert snapshot["type"] == "active_tasks" and snapshot["recovered"] is True
    assert [t["task_id"] for t in snapshot["tasks"]] == ["a"]
    assert snapshot["id"] == body["last_event_id"]


async def test_a_held_poll_is_answered_as_soon_as_an_event_comes(
    client: TestClient,  # type: ignore[type-arg]
    token_for: TokenFor,
    user_id: str,
) -> None:
    token = token_for(user_id)
    held, _ = await hold_a_poll(client, token)
    hub = client.app[HUB]
    assert not held.done()
    published = time.monotonic()
    event_id = await publish_progress(client, user_id, "a", progress=42)
    status, body, _ = await asyncio.wait_for(held, POLL_TIMEOUT_S * 2)
    elapsed = time.monotonic() - published
    assert status == 200
    # Well before its timeout: the event answered it.
    assert elapsed < POLL_TIMEOUT_S * 0.75, f"the held poll took {elapsed:.3f}s to answer"
    assert [e["id"] for e in body["events"]] == [event_id]
    assert body["events"][0]["progress"] == 42 and body["events"][0]["type"] == "task_progress"
    assert body["last_event_id"] == event_id
    await eventually(lambda: hub.open_count("poll") == 0, what="the poll detached")


async def test_a_poll_without_events_times_out_empty_with_the_same_id(
    client: TestClient,  # type: ignore[type-arg]
    token_for: TokenFor,
    user_id: str,
) -> None:
    token = token_for(user_id)
    _, first, _ = await poll(client, token)
    started = time.monotonic()
    status, body, headers = await poll(client, token, last_event_id=first["last_event_id"])
    elapsed = time.monotonic() - started
    assert status == 200 and headers["Cache-Control"] == "no-store"
    assert body == {"events": [], "last_event_id": first["last_event_id"]}
    assert POLL_TIMEOUT_S * 0.9 <= elapsed < POLL_TIMEOUT_S * 3
    # Answered, both of them: the server ended them, the client did not leave.
    ended = client.app[HUB].ended
    assert (ended[Reason.ANSWERED], ended[Reason.CLIENT_CLOSED]) == (2, 0)


async def test_resume_gets_exactly_the_events_after_the_id_in_order(
    client: TestClient,  # type: ignore[type-arg]
    token_for: TokenFor,
    user_id: str,
) -> None:
    token = token_for(user_id)
    _, first, _ = await poll(client, token)
    published = [await publish_progress(client, user_id, "a", progress=p) for p in range(1, 6)]

    _, body, _ = await poll(client, token, last_event_id=first["last_event_id"])
    assert [e["id"] for e in body["events"]] == published  # no snapshot on a served resume
    assert [e["progress"] for e in body["events"]] == [1, 2, 3, 4, 5]
    assert body["last_event_id"] == published[-1]

    _, body, _ = await poll(client, token, last_event_id=published[2])
    assert [e["id"] for e in body["events"]] == published[3:]
    assert body["last_event_id"] == published[-1]
    assert_strictly_increasing([first["last_event_id"], *published])


@pytest.mark.parametrize("task_id", [None, "a"])
async def test_pages_of_a_long_replay_come_one_per_poll(
    config: Config,
    aiohttp_client: Callable[..., Any],
    token_for: TokenFor,
    user_id: str,
    task_id: str | None,
) -> None:
    """Each answer carries a page of what the client missed and ends where the page
    does, also when a task filter left none of the page's events in it (the last page
    included); the next polls go on from there until the client has everything, once
    and in order."""
    config = config.replace(poll_timeout_s=POLL_TIMEOUT_S, history_size=1000)
    client = await aiohttp_client(await create_app(config))
    token = token_for(user_id)
    _, first, _ = await poll(client, token, task_id=task_id)
    # Task "a" only in the last page, and not its last events.
    count = 2 * REPLAY_PAGE + 10
    events = [
        progress_event(user_id, "a" if count - 8 <= n < count - 3 else "b", progress=n % 100)
        for n in range(count)
    ]
    missed = [str(i) for i in await client.app[BROKER].publish_many(events)]
    wanted = [i for i, e in zip(missed, events, strict=True) if task_id in (None, e.task_id)]
    received: list[str] = []
    ends: list[str] = []
    position = first["last_event_id"]
    for _ in range(10):  # three pages
        if len(received) >= len(wanted):
            break
        status, body, _ = await poll(client, token, last_event_id=position, task_id=task_id)
        assert status == 200
        received += [e["id"] for e in body["events"]]
        position = body["last_event_id"]
        ends.append(position)
    assert received == wanted
    assert ends == [missed[REPLAY_PAGE - 1], missed[2 * REPLAY_PAGE - 1], missed[-1]]


@pytest.mark.parametrize("resuming", [False, True])
async def test_a_poll_ended_while_its_opening_is_read_moves_the_client_nowhere(
    client: TestClient,  # type: ignore[type-arg]
    token_for: TokenFor,
    user_id: str,
    resuming: bool,
) -> None:
    """The server starts shutting down while a poll's snapshot is read: the answer has
    nothing, and the client stands where it stood (a fresh one nowhere), so that its
    next poll elsewhere misses neither the events nor the snapshot."""
    token = token_for(user_id)
    _, first, _ = await poll(client, token)
    for progress in range(1, 6):
        await publish_progress(client, user_id, "a", progress=progress)
    broker, hub = client.app[BROKER], client.app[HUB]
    snapshot = broker.snapshot

    async def shutting_down_meanwhile(*args: Any, **kwargs: Any) -> Any:
        hub.close_all(Reason.SHUTDOWN)
        return await snapshot(*args, **kwargs)

    broker.snapshot = shutting_down_meanwhile  # type: ignore[method-assign]
    resume_point = first["last_event_id"] if resuming else None
    _, body, _ = await poll(client, token, last_event_id=resume_point)
    assert body == {"events": [], "last_event_id": resume_point}


async def test_task_id_narrows_the_poll(
    client: TestClient,  # type: ignore[type-arg]
    token_for: TokenFor,
    user_id: str,
) -> None:
    token = token_for(user_id)
    await publish_progress(client, user_id, "a", progress=1)
    await publish_progress(client, user_id, "b", progress=1)
    _, first, _ = await poll(client, token, task_id="a")
    [snapshot] = first["events"]
    assert [t["task_id"] for t in snapshot["tasks"]] == ["a"]
    await publish_progress(client, user_id, "b", progress=2)
    mine = await publish_progress(client, user_id, "a", progress=2)
    await publish_progress(client, user_id, "b", progress=3)
    _, body, _ = await poll(client, token, task_id="a", last_event_id=first["last_event_id"])
    assert [(e["id"], e["task_id"]) for e in body["events"]] == [(mine, "a")]

    held = asyncio.ensure_future(poll(client, token, task_id="a", last_event_id=mine))
    hub = client.app[HUB]
    await eventually(lambda: held_polls(hub) == 1, what="the poll held by the hub")
    await publish_progress(client, user_id, "b", progress=4)  # not for this poll
    last = await publish_progress(client, user_id, "a", progress=3)
    _, body, _ = await asyncio.wait_for(held, POLL_TIMEOUT_S * 2)
    assert [(e["id"], e["task_id"]) for e in body["events"]] == [(last, "a")]


async def test_a_narrowed_poll_moves_past_the_other_tasks_events_it_saw(
    config: Config,
    aiohttp_client: Callable[..., object],
    token_for: TokenFor,
    user_id: str,
) -> None:
    """While a poll of task a is held, more events of task b go by than the history
    keeps: the answer's id is past them (none of a's is skipped), so the next poll
    resumes instead of starting over from a snapshot (`recovered: false`)."""
    config = config.replace(poll_timeout_s=POLL_TIMEOUT_S, history_size=5)
    client: TestClient = await aiohttp_client(await create_app(config))  # type: ignore[type-arg,misc]
    token = token_for(user_id)
    await publish_progress(client, user_id, "a", progress=1)
    _, first, _ = await poll(client, token, task_id="a")
    held = asyncio.ensure_future(
        poll(client, token, task_id="a", last_event_id=first["last_event_id"])
    )
    hub = client.app[HUB]
    await eventually(lambda: held_polls(hub) == 1, what="the poll held by the hub")
    others = [await publish_progress(client, user_id, "b", progress=p) for p in range(1, 21)]
    _, body, _ = await asyncio.wait_for(held, POLL_TIMEOUT_S * 3)
    assert body == {"events": [], "last_event_id": others[-1]}

    held = asyncio.ensure_future(poll(client, token, task_id="a", last_event_id=others[-1]))
    await eventually(lambda: held_polls(hub) == 1, what="the next poll held, resumed")
    mine = await publish_progress(client, user_id, "a", progress=2)
    _, body, _ = await asyncio.wait_for(held, POLL_TIMEOUT_S * 3)
    assert [(e["id"], e["type"]) for e in body["events"]] == [(mine, "task_progress")]

    # One of a's among them is never skipped: the answer carries it, and ends at it or
    # past the others after it.
    held = asyncio.ensure_future(poll(client, token, task_id="a", last_event_id=mine))
    await eventually(lambda: held_polls(hub) == 1, what="a third poll held")
    mine_again = await publish_progress(client, user_id, "a", progress=3)
    after = await publish_progress(client, user_id, "b", progress=30)
    _, body, _ = await asyncio.wait_for(held, POLL_TIMEOUT_S * 3)
    assert [e["id"] for e in body["events"]] == [mine_again]
    assert body["last_event_id"] in (mine_again, after)

    # Closed while held (its credentials expire, say) with an event of its own and then
    # another task's still on the way in: the answer ends before its own one, which the
    # next poll gets. (It ends at `after`: where the last answer ended, or past `after`
    # when that answer ended at a's event and this poll's replay went past `after`.)
    last = body["last_event_id"]
    held = asyncio.ensure_future(poll(client, token, task_id="a", last_event_id=last))
    await eventually(lambda: held_polls(hub) == 1, what="a fourth poll held")
    [connection] = [c for c in hub.connections() if c.transport == "poll"]
    connection.close(Reason.EXPIRED)
    unsent = await publish_progress(client, user_id, "a", progress=4)
    await publish_progress(client, user_id, "b", progress=40)
    _, body, _ = await asyncio.wait_for(held, POLL_TIMEOUT_S * 3)
    assert body == {"events": [], "last_event_id": after}
    _, body, _ = await poll(client, token, task_id="a", last_event_id=after)
    assert [e["id"] for e in body["events"]] == [unsent]


async def test_refusals_unusable_ids_and_cors(
    client: TestClient,  # type: ignore[type-arg]
    token_for: TokenFor,
    user_id: str,
) -> None:
    token = token_for(user_id)
    status, body, headers = await poll(client, "not-a-token")
    assert status == 401 and body["code"] == "unauthorized"
    assert headers["WWW-Authenticate"].startswith("Bearer")
    assert headers["Cache-Control"] == "no-store"

    status, body, _ = await poll(client, "", headers={"Authorization": f"Bearer {token}"})
    assert status == 200 and body["events"][0]["type"] == "active_tasks"

    status, body, _ = await poll(client, token, headers={"Origin": "https://evil.example"})
    assert status == 403 and body["code"] == "origin_not_allowed"

    status, body, _ = await poll(client, token, task_id="x" * 1000)
    assert status == 400 and body["code"] == "invalid_task_id"

    status, body, headers = await poll(client, token, headers={"Origin": ALLOWED_ORIGIN})
    assert status == 200 and body["events"][0]["type"] == "active_tasks"
    assert headers["Access-Control-Allow-Origin"] == ALLOWED_ORIGIN

    async with client.options(
        "/poll/tasks/",
        headers={"Origin": ALLOWED_ORIGIN, "Access-Control-Request-Method": "GET"},
    ) as preflight:
        assert preflight.status == 204
        assert "Authorization" in preflight.headers["Access-Control-Allow-Headers"]

    await publish_progress(client, user_id, "a", progress=9)
    for unusable in ("nonsense", "0123456789abcdef-1-0"):
        status, body, _ = await poll(client, token, last_event_id=unusable)
        assert status == 200
        [snapshot] = body["events"]
        assert snapshot["type"] == "active_tasks" and snapshot["recovered"] is False
        assert [t["task_id"] for t in snapshot["tasks"]] == ["a"]
        assert body["last_event_id"] == snapshot["id"]


async def test_a_poll_the_client_abandons_is_detached(
    client: TestClient,  # type: ignore[type-arg]
    token_for: TokenFor,
    user_id: str,
) -> None:
    token = token_for(user_id)
    held, _ = await hold_a_poll(client, token)
    hub = client.app[HUB]
    held.cancel()
    await eventually(lambda: hub.open_count("poll") == 0, what="the abandoned poll detached")
    assert (hub.ended[Reason.CLIENT_CLOSED], hub.ended[Reason.ANSWERED]) == (1, 1)  # 1: opening


async def test_an_event_is_encoded_once_for_a_hundred_held_polls(
    client: TestClient,  # type: ignore[type-arg]
    token_for: TokenFor,
    user_id: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    builds: list[bytes] = []
    real = wire.poll_item

    def counting(data: bytes, event_id: str) -> bytes:
        builds.append(data)
        return real(data, event_id)

    monkeypatch.setattr(wire, "poll_item", counting)
    token = token_for(user_id)
    _, first, _ = await poll(client, token)
    held = [
        asyncio.ensure_future(poll(client, token, last_event_id=first["last_event_id"]))
        for _ in range(100)
    ]
    hub = client.app[HUB]
    await eventually(lambda: held_polls(hub) == 100, what="100 polls held")
    event_id = await publish_progress(client, user_id, "t", progress=7)
    answers = await asyncio.wait_for(asyncio.gather(*held), POLL_TIMEOUT_S * 2)
    assert [[e["id"] for e in body["events"]] for _, body, _ in answers] == [[event_id]] * 100
    for_the_event = [b for b in builds if event_id.encode() in b]
    assert len(for_the_event) == 1, f"encoded {len(for_the_event)} times"


async def test_shutdown_answers_held_polls(
    client: TestClient,  # type: ignore[type-arg]
    token_for: TokenFor,
    user_id: str,
) -> None:
    token = token_for(user_id)
    held, first_id = await hold_a_poll(client, token)
    hub = client.app[HUB]
    hub.close_all(Reason.SHUTDOWN)
    status, body, _ = await asyncio.wait_for(held, POLL_TIMEOUT_S / 2)
    assert status == 200 and body == {"events": [], "last_event_id": first_id}
    status, body, headers = await poll(client, token, last_event_id=first_id)
    assert status == 503 and body["code"] == "shutting_down" and headers["Retry-After"]


# --- real gunicorn with two workers and Redis ------------------------------------------

REAL_POLL_TIMEOUT_S = 1.0


@pytest.fixture
def process_env(process_env: dict[str, str]) -> dict[str, str]:
    """Server processes hold polls for a short time."""
    return {**process_env, "STREAMER_POLL_TIMEOUT_S": str(REAL_POLL_TIMEOUT_S)}


async def test_resume_across_100_random_disconnects_loses_nothing(
    start_gunicorn: StartGunicorn, token_for: TokenFor, user_id: str
) -> None:
    """A producer publishes in bursts while the client polls and abandons 100 polls at
    random points (held, or already answered but not read); every poll that is read
    resumes from the last id it got. The events read: exactly those published, once
    each, in order, whichever of the two workers answered."""
    server, env = start_gunicorn(2)
    rng = random.Random(9)
    token = token_for(user_id)
    published: list[str] = []
    received: list[str] = []
    workers: set[str] = set()
    aborted = 0
    producing = True

    async def produce() -> None:
        async with AsyncPublisher(env["STREAMER_REDIS_URL"]) as publisher:
            n = 0
            while producing:
                for _ in range(rng.randint(1, 4)):
                    n += 1
                    published.append(await publisher.progress(user_id, "job", progress=n % 100))
                await asyncio.sleep(rng.uniform(0, 0.08))  # the producer's own pace

    async def read(last_event_id: str | None) -> tuple[dict[str, Any], str]:
        params = {"token": token} | ({"last_event_id": last_event_id} if last_event_id else {})
        async with session.get(f"{server.base_url}/poll/tasks/", params=params) as response:
            assert response.status == 200, await response.text()
            body: dict[str, Any] = await response.json()
            return body, response.headers[WORKER_HEADER]

    def take(body: dict[str, Any]) -> str:
        for message in body["events"]:
            if message["type"] == "active_tasks":
                assert message["recovered"] is True, "a resume within the history"
                assert not received, "a snapshot only on the first answer"
            else:
                received.append(message["id"])
        last: str = body["last_event_id"]
        return last

    async with aiohttp.ClientSession() as session:
        body, worker = await read(None)
        last_event_id = take(body)
        producer = asyncio.ensure_future(produce())
        try:
            async with asyncio.timeout(120):
                while aborted < 100:
                    request = asyncio.ensure_future(read(last_event_id))
                    if rng.random() < 0.6:
                        # Abandon it at a random point: while held, or answered unread.
                        done, _ = await asyncio.wait({request}, timeout=rng.uniform(0, 0.15))
                        if not done or rng.random() < 0.5:
                            request.cancel()
                            with contextlib.suppress(asyncio.CancelledError):
                                await request
                            aborted += 1
                            continue
                    body, worker = await request
                    workers.add(worker)
                    last_event_id = take(body)
                producing = False
                await producer
                while last_event_id != published[-1]:
                    body, worker = await read(last_event_id)
                    last_event_id = take(body)
        finally:
            producing = False
            await producer
    assert aborted == 100
    assert len(published) > 100
    lost = set(published) - set(received)
    duplicated = len(received) - len(set(received))
    assert (len(lost), duplicated) == (0, 0), f"lost {len(lost)}, duplicated {duplicated}"
    assert received == published  # in order
    assert len(workers) == 2, "polls were answered by both workers"


# --- through a proxy that buffers responses (buffering on, compressing) ----------------


async def test_long_poll_gets_through_a_buffering_proxy_where_sse_does_not(
    start_gunicorn: StartGunicorn, tmp_path: Path, token_for: TokenFor, user_id: str
) -> None:
    server, env = start_gunicorn(2)
    nginx = Nginx(tmp_path / "nginx", server.port, template=BUFFERING_SITE)
    nginx.directory.mkdir()
    nginx.start()
    token = token_for(user_id)
    url = f"{nginx.base_url}/poll/tasks/"
    try:
        async with (
            aiohttp.ClientSession() as session,
            AsyncPublisher(env["STREAMER_REDIS_URL"]) as publisher,
        ):
            # SSE through this proxy: its response is held in nginx's buffers.
            sse_events: list[str] = []

            async def read_sse() -> None:
                async with session.get(
                    f"{nginx.base_url}/sse/tasks/", params={"token": token}
                ) as response:
                    async for line in response.content:
                        if line.startswith(b"id: "):
                            sse_events.append(line[4:].decode().strip())

            sse = asyncio.ensure_future(read_sse())
            _, body, _ = await poll(session, token, path=url)
            assert body["events"][0]["type"] == "active_tasks"
            last_event_id = body["last_event_id"]
            for progress in (10, 20, 30):
                held = asyncio.ensure_future(
                    poll(session, token, path=url, last_event_id=last_event_id)
                )
                done, _ = await asyncio.wait({held}, timeout=REAL_POLL_TIMEOUT_S / 4)
                assert not done or (await held)[1]["events"] == []
                if done:  # answered empty before the event: poll again
                    held = asyncio.ensure_future(
                        poll(session, token, path=url, last_event_id=last_event_id)
                    )
                event_id = await publisher.progress(user_id, "t", progress=progress)
                status, body, headers = await asyncio.wait_for(held, 5)
                if not body["events"]:  # the poll timed out just before: the next has it
                    status, body, headers = await poll(
                        session, token, path=url, last_event_id=last_event_id
                    )
                # A complete response, through the buffering proxy, with the event.
                assert status == 200 and headers["Cache-Control"] == "no-store"
                assert [e["id"] for e in body["events"]] == [event_id]
                assert body["last_event_id"] == event_id
                last_event_id = event_id
            # Meanwhile the SSE stream delivered nothing, not even its snapshot: give
            # it a few more seconds to show it.
            done, _ = await asyncio.wait({sse}, timeout=3)
            assert not done and sse_events == [], f"SSE got through: {sse_events}"
            sse.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sse
    finally:
        nginx.stop()


# --- in Chromium: the demo page on ?transport=poll --------------------------------------


async def test_demo_page_over_long_polling(
    server: ServerProcess,
    publisher: Publisher,
    browser: Browser,
    token_for: TokenFor,
    user_id: str,
) -> None:
    """streamer.js's poll loop: snapshot, live progress and completion, through a server
    that holds each poll for a second at most (so the page polls again and again)."""
    publisher.progress(user_id, "t1", progress=10, current_step="starting", task_name="export")
    await open_page(browser, page_url(server, token_for(user_id), "poll"))
    assert list(await rows(browser)) == ["t1"]
    assert "poll" in await browser.evaluate("document.getElementById('status').textContent")

    await browser.wait_for(
        f"{row_js('t1')}.querySelector('progress').value === 10", what="t1 at 10%"
    )
    publisher.progress(user_id, "t1", progress=75, current_step="uploading")
    await browser.wait_for(
        f"{row_js('t1')}.querySelector('progress').value === 75", what="t1 at 75%"
    )
    # Past the server's poll timeout: the page keeps polling, and nothing is missed.
    await browser.wait_for(
        "new Promise((done) => setTimeout(() => done(true), 1500))", what="1.5 s of polling"
    )
    publisher.progress(user_id, "t2", progress=5, current_step="queued", task_name="report")
    publisher.completed(user_id, "t1", result_data={"url": "https://example.com/out.csv"})
    await wait_status(browser, "t1", "SUCCESS")
    await wait_status(browser, "t2", "PROGRESS")
    shown = await rows(browser)
    assert list(shown) == ["t2", "t1"]
    assert shown["t1"]["progress"] == 100 and "uploading" in shown["t1"]["text"]
    assert "https://example.com/out.csv" in shown["t1"]["text"]
    assert await browser.evaluate("document.getElementById('status').textContent") == (
        "connected (poll)"
    )


async def test_demo_page_shows_a_resumed_long_poll_as_open(
    server: ServerProcess,
    server_env: dict[str, str],
    start_process: Callable[..., ServerProcess],
    publisher: Publisher,
    browser: Browser,
    token_for: TokenFor,
    user_id: str,
) -> None:
    """After a restart of the server the page's polls resume from its last id, and such a
    poll carries no snapshot: its answer is what shows the page connected again."""
    await open_page(browser, page_url(server, token_for(user_id), "poll"))
    server.stop()
    await browser.wait_for(
        "document.body?.dataset.connection !== 'open'", what="the page to see the server go"
    )
    command = ["streamer", "serve", "--port", "{port}"]
    restarted = start_process(command, server_env, port=server.port)
    restarted.wait_healthy()
    publisher.progress(user_id, "t1", progress=10, current_step="after the restart")
    await browser.wait_for(
        f"{row_js('t1')}?.querySelector('progress').value === 10",
        what="an event after the restart",
        timeout=30,
    )
    await browser.wait_for(
        "document.body?.dataset.connection === 'open'", what="the page shown open again"
    )
