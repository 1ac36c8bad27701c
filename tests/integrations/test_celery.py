"""The Celery integration, end to end: a real Celery worker runs ProgressTasks, a real
streamer server (gunicorn) serves them to WebSocket and SSE clients, all on the private
Redis (Celery on database 1, streamer on 0)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis
from celery import Celery, Signature
from celery.result import AsyncResult
from kombu.exceptions import EncodeError

from streamer.broker.redis_schema import history_key
from streamer.config import ConfigError
from streamer.events import completed_event
from streamer.integrations import celery as celery_integration
from streamer.integrations import kept_ends as kept_ends_module
from streamer.integrations.celery import ProgressTask
from streamer.integrations.kept_ends import KeptEnds, Outage
from streamer.publisher import BrokerUnavailable, Publisher

from ..clients import Stream, open_stream
from ..conftest import StartGunicorn
from ..processes import RedisServer, ServerProcess
from ..waiting import eventually, eventually_sync
from . import celery_app
from .celery_app import app as celery_app_object
from .celery_app import (
    broken,
    broken_lazy_text,
    django_values,
    ended_abruptly,
    flaky,
    hard_limited,
    long_export,
    resize_images,
    retried_at_once,
    silent_job,
    sloppy_progress,
    unpicklable_failure,
)

ROOT = Path(__file__).resolve().parent.parent.parent
TokenFor = Callable[..., str]
EVENT_TYPES = ("task_progress", "task_completed")

IMPORT_THE_CORE = """
import importlib, pkgutil, sys, streamer
for module in pkgutil.walk_packages(streamer.__path__, "streamer."):
    if module.name != "streamer.__main__" and not module.name.startswith("streamer.integrations."):
        importlib.import_module(module.name)
loaded = sorted(name for name in sys.modules if name.split(".")[0] in ("celery", "kombu"))
assert not loaded, loaded
"""


def test_the_core_package_never_imports_celery() -> None:
    """Celery is an optional extra: only streamer.integrations.celery imports it."""
    subprocess.run([sys.executable, "-c", IMPORT_THE_CORE], check=True, timeout=60)


def celery_url(redis_url: str) -> str:
    return redis_url.rsplit("/", 1)[0] + "/1"


def test_the_user_is_the_user_id_argument_by_keyword_or_by_position() -> None:
    app = Celery("users", set_as_current=False)

    @app.task(base=ProgressTask, bind=True)
    def job(self: ProgressTask, user_id: str, size: int = 1) -> None: ...

    @app.task(base=ProgressTask, bind=True, streamer_user_kwarg="owner")
    def owned(self: ProgressTask, path: str, owner: str) -> None: ...

    assert job.streamer_user_id((), {"user_id": "7", "size": 2}) == "7"
    assert job.streamer_user_id(("7", 2), {}) == "7"
    assert job.streamer_user_id((), {"size": 2}) is None
    assert owned.streamer_user_id(("a.csv",), {"owner": "ann"}) == "ann"
    assert owned.streamer_user_id(("a.csv", "ann"), {}) == "ann"
    # As the stream knows them: numbers and UUIDs (Django primary keys) as their text.
    assert job.streamer_user_id((7,), {}) == "7"
    key = uuid.UUID("12345678-1234-5678-1234-567812345678")
    assert job.streamer_user_id((), {"user_id": key}) == str(key)
    # None that could be a user: the job runs, its progress unpublished.
    for unusable in ({"id": 7}, "", True):
        assert job.streamer_user_id((), {"user_id": unusable}) is None


@pytest.fixture
def streamer_server(start_gunicorn: StartGunicorn) -> tuple[ServerProcess, dict[str, str]]:
    return start_gunicorn(1)


@pytest.fixture
def celery_worker(
    streamer_server: tuple[ServerProcess, dict[str, str]],
    redis_url: str,
    start_process: Callable[..., ServerProcess],
) -> Iterator[ServerProcess]:
    """`celery worker` (prefork, 2 processes) with revoking on; stopped at teardown,
    with its pool, whatever the test did."""
    _, env = streamer_server
    url = celery_url(redis_url)
    env = {
        **env,
        "CELERY_BROKER_URL": url,
        "CELERY_RESULT_BACKEND": url,
        "STREAMER_CELERY_REVOKE": "true",
        "PYTHONPATH": str(ROOT),
    }
    # This process sends the tasks, as the web app would: it publishes their PENDING.
    celery_app.app.conf.update(broker_url=url, result_backend=url, streamer_redis_url=redis_url)
    worker = start_process(
        [
            "celery", "-A", "tests.integrations.celery_app", "worker", "--pool=prefork",
            "-c", "2", "--without-heartbeat", "--without-gossip", "--without-mingle",
            "-l", "info", "-n", "streamer-test@%h",
        ],
        env,
    )  # fmt: skip

    def ready() -> bool:
        if worker.process.poll() is not None:
            raise RuntimeError(f"the Celery worker exited:\n{worker.log()}")
        return " ready." in worker.log()

    eventually_sync(ready, what="the Celery worker", timeout=30)
    yield worker


@pytest.fixture
async def session(
    streamer_server: tuple[ServerProcess, dict[str, str]],
) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(base_url=streamer_server[0].base_url) as session:
        yield session


async def task_events(stream: Stream, task_id: str) -> list[dict[str, Any]]:
    """The task's events on `stream` after the PENDING published when it was sent, up
    to and including its task_completed."""
    events: list[dict[str, Any]] = []
    while not events or events[-1]["type"] != "task_completed":
        received = await stream.next()
        if received.type in EVENT_TYPES and received.message["task_id"] == task_id:
            events.append(received.message)
    assert events[0]["status"] == "PENDING" and events[0]["progress"] == 0, events[0]
    return events[1:]


async def state_of(result: AsyncResult) -> str:
    state: str = await asyncio.to_thread(lambda: result.state)
    return state


@pytest.mark.usefixtures("celery_worker")
async def test_websocket_and_sse_clients_see_a_task_start_progress_and_succeed(
    session: aiohttp.ClientSession, token_for: TokenFor, user_id: str
) -> None:
    token = token_for(user_id)
    async with (
        open_stream(session, "websocket", token) as ws,
        open_stream(session, "sse", token) as sse,
    ):
        for stream in (ws, sse):
            assert (await stream.next()).type == "active_tasks"
        result = resize_images.apply_async((4,), {"user_id": user_id})
        for stream in (ws, sse):
            events = await task_events(stream, result.id)
            assert [e["status"] for e in events] == ["STARTED"] + ["PROGRESS"] * 4 + ["SUCCESS"]
            assert [e["progress"] for e in events] == [0, 25, 50, 75, 100, 100]
            assert {e["task_name"] for e in events} == {resize_images.name}
            assert events[2]["current_step"] == "image 2 of 4"
            assert events[2]["processed_items"] == 2 and events[2]["total_items"] == 4
            started_at = datetime.fromisoformat(events[0]["started_at"])
            for event in events[1:5]:
                eta = datetime.fromisoformat(event["estimated_completion"])
                assert eta >= started_at
            assert events[-1]["result_data"] == {"images": 4}
            assert events[-1]["error_message"] is None
    assert await asyncio.to_thread(result.get, timeout=10) == {"images": 4}


@pytest.mark.usefixtures("celery_worker")
async def test_a_task_of_a_user_with_a_uuid_for_an_id_runs_and_is_streamed(
    session: aiohttp.ClientSession, token_for: TokenFor
) -> None:
    """Django apps with UUID primary keys pass `request.user.id`: the worker gets a
    UUID back from the message, and the user's stream, named by its text, the task."""
    user = uuid.uuid4()
    async with open_stream(session, "websocket", token_for(str(user))) as ws:
        await ws.next()
        result = resize_images.apply_async((2,), {"user_id": user})
        events = await task_events(ws, result.id)
    assert [e["status"] for e in events] == ["STARTED", "PROGRESS", "PROGRESS", "SUCCESS"]
    assert await asyncio.to_thread(result.get, timeout=10) == {"images": 2}


@pytest.mark.usefixtures("celery_worker")
async def test_a_task_whose_id_cannot_be_streamed_runs_unreported(
    session: aiohttp.ClientSession, token_for: TokenFor, user_id: str
) -> None:
    """A task id chosen by hand that no stream can carry (a no-break space) does not
    fail the job: it runs, and its progress is not published."""
    async with open_stream(session, "websocket", token_for(user_id)) as ws:
        await ws.next()
        unseen = resize_images.apply_async((2,), {"user_id": user_id}, task_id="job\u00a01")
        assert await asyncio.to_thread(unseen.get, timeout=10) == {"images": 2}
        marker = resize_images.apply_async((1,), {"user_id": user_id})
        seen = []
        while not seen or seen[-1] != (marker.id, "task_completed"):
            received = await ws.next()
            if received.type in EVENT_TYPES:
                seen.append((received.message["task_id"], received.type))
        assert {task_id for task_id, _ in seen} == {marker.id}


@pytest.mark.usefixtures("celery_worker")
async def test_a_failing_task_ends_failure_with_its_message(
    session: aiohttp.ClientSession, token_for: TokenFor, user_id: str
) -> None:
    async with open_stream(session, "websocket", token_for(user_id)) as ws:
        await ws.next()
        result = broken.apply_async(("the disk is full",), {"user_id": user_id})
        events = await task_events(ws, result.id)
    assert [e["status"] for e in events] == ["STARTED", "PROGRESS", "FAILURE"]
    assert events[-1]["type"] == "task_completed"
    assert events[-1]["error_message"] == "the disk is full"
    assert events[-1]["progress"] == 10  # where it failed
    await eventually(lambda: state_of(result), what="FAILURE stored")
    assert await state_of(result) == "FAILURE"


@pytest.mark.parametrize(
    ("failing", "message"),
    [
        # A file name Python could not decode leaves a lone surrogate in the message: it
        # was refused, and the FAILURE said so instead of what failed.
        (broken.s("no such file: \udce9.csv"), "no such file: \ufffd.csv"),
        # Celery hands on_failure a stand-in for an exception it cannot pickle, whose
        # text is the original's repr.
        (unpicklable_failure.s(), "the disk is full"),
    ],
    ids=["not valid unicode", "not picklable"],
)
@pytest.mark.usefixtures("celery_worker")
async def test_an_error_message_is_published_as_a_user_reads_it(
    session: aiohttp.ClientSession,
    token_for: TokenFor,
    user_id: str,
    failing: Signature,
    message: str,
) -> None:
    async with open_stream(session, "websocket", token_for(user_id)) as ws:
        await ws.next()
        result = failing.apply_async(kwargs={"user_id": user_id})
        events = await task_events(ws, result.id)
    assert events[-1]["status"] == "FAILURE"
    assert events[-1]["error_message"] == message


@pytest.mark.usefixtures("celery_worker")
async def test_progress_values_a_little_off_never_fail_the_job(
    session: aiohttp.ClientSession, token_for: TokenFor, user_id: str
) -> None:
    async with open_stream(session, "websocket", token_for(user_id)) as ws:
        await ws.next()
        result = sloppy_progress.apply_async((), {"user_id": user_id})
        events = await task_events(ws, result.id)
    assert [e["status"] for e in events] == ["STARTED", "PROGRESS", "PROGRESS", "SUCCESS"]
    assert events[2]["progress"] == 1e-300  # its estimate (past any calendar) left out
    progress = events[1]
    assert progress["progress"] == 100
    assert progress["processed_items"] == 5 and progress["total_items"] == 5
    assert len(progress["current_step"]) == 2000 and progress["current_step"].endswith("\u2026")
    assert await asyncio.to_thread(result.get, timeout=10) == {"done": True}


@pytest.mark.usefixtures("celery_worker")
async def test_a_task_revoked_by_an_admin_ends_revoked_on_the_streams(
    session: aiohttp.ClientSession, token_for: TokenFor, user_id: str
) -> None:
    """Not only those the user cancelled: `revoke(terminate=True)` from Flower or a
    shell left the task running on the streams."""
    async with session.ws_connect("/ws/tasks/", params={"token": token_for(user_id)}) as ws:
        assert (await ws.receive_json(timeout=10))["type"] == "active_tasks"
        result = silent_job.apply_async((60,), {"user_id": user_id})
        await _read_until(ws, lambda m: m.get("status") == "STARTED")
        await asyncio.to_thread(celery_app_object.control.revoke, result.id, terminate=True)
        events = await _read_until(ws, lambda m: m["type"] == "task_completed")
        assert events[-1]["task_id"] == result.id and events[-1]["status"] == "REVOKED"


@pytest.mark.usefixtures("celery_worker")
async def test_a_retried_task_reports_retry_then_its_new_run(
    session: aiohttp.ClientSession, token_for: TokenFor, user_id: str
) -> None:
    async with open_stream(session, "sse", token_for(user_id)) as sse:
        await sse.next()
        result = flaky.apply_async((), {"user_id": user_id})
        events = await task_events(sse, result.id)
    assert [e["status"] for e in events] == ["STARTED", "RETRY", "STARTED", "SUCCESS"]
    assert "the upstream timed out" in events[1]["current_step"]
    # The new run no longer shows why the one before was retried (its end kept it).
    assert [e["current_step"] for e in events[2:]] == ["", ""]
    assert events[-1]["result_data"] == {"attempts": 2}


@pytest.mark.usefixtures("celery_worker")
async def test_a_lazy_string_that_fails_in_a_report_does_not_fail_the_task(
    session: aiohttp.ClientSession, token_for: TokenFor, user_id: str
) -> None:
    async with open_stream(session, "sse", token_for(user_id)) as sse:
        await sse.next()
        result = broken_lazy_text.apply_async((), {"user_id": user_id})
        events = await task_events(sse, result.id)
    assert [e["status"] for e in events] == ["STARTED", "SUCCESS"]  # the report left out
    assert events[-1]["result_data"] == {"done": True}
    assert await state_of(result) == "SUCCESS"


@pytest.mark.usefixtures("celery_worker")
async def test_what_a_django_app_reports_and_returns_is_published(
    session: aiohttp.ClientSession, token_for: TokenFor, user_id: str
) -> None:
    """A lazy translation string for a step, Decimals for numbers: the report was not
    published; a Decimal, UUID or date in the result: the whole result was left out."""
    async with open_stream(session, "sse", token_for(user_id)) as sse:
        await sse.next()
        result = django_values.apply_async((), {"user_id": user_id})
        events = await task_events(sse, result.id)
    assert [e["status"] for e in events] == ["STARTED", "PROGRESS", "SUCCESS"]
    progress = events[1]
    assert progress["progress"] == 50 and progress["current_step"] == "Importing"
    assert progress["processed_items"] == 3 and progress["total_items"] == 6
    assert events[-1]["result_data"] == {
        "amount": "12.50",
        "id": "00000000-0000-0000-0000-000000000007",
        "at": "2030-01-31T12:00:00+00:00",
        "day": "2030-01-31",
        "label": "Importing",
    }


@pytest.mark.usefixtures("celery_worker")
async def test_a_task_retried_at_once_reports_retry_before_its_next_run(
    session: aiohttp.ClientSession, token_for: TokenFor, user_id: str
) -> None:
    """With no countdown the next run can start (and end) in the worker's other
    process before the first one's on_retry: RETRY went out after it, and a task that
    had succeeded showed as retrying for good."""
    async with open_stream(session, "sse", token_for(user_id)) as sse:
        await sse.next()
        for _ in range(30):  # it went wrong about once in six, one task at a time
            result = retried_at_once.apply_async((), {"user_id": user_id})
            events = await task_events(sse, result.id)
            assert [e["status"] for e in events] == ["STARTED", "RETRY", "STARTED", "SUCCESS"]


@pytest.mark.parametrize(
    ("how", "status", "message"),
    [
        ("killed", "FAILURE", "Worker exited prematurely"),
        ("rejected", "FAILURE", "the input is gone"),
        ("ignored", "REVOKED", "ended by the task (Ignore)"),
    ],
)
@pytest.mark.usefixtures("celery_worker")
async def test_a_task_that_ends_without_its_hooks_ends_on_the_streams(
    session: aiohttp.ClientSession,
    token_for: TokenFor,
    user_id: str,
    how: str,
    status: str,
    message: str,
) -> None:
    """Its process killed, its message rejected, or Ignore raised: Celery calls none of
    the task's hooks, and the task stayed at its last progress on the streams."""
    async with open_stream(session, "sse", token_for(user_id)) as sse:
        await sse.next()
        result = ended_abruptly.apply_async((how,), {"user_id": user_id})
        events = await task_events(sse, result.id)
    assert [e["status"] for e in events] == ["STARTED", "PROGRESS", status]
    assert events[-1]["error_message"].startswith(message), events[-1]


@pytest.mark.usefixtures("celery_worker")
async def test_a_task_past_its_hard_time_limit_ends_failure_once(
    session: aiohttp.ClientSession, token_for: TokenFor, user_id: str
) -> None:
    """The worker's main process calls on_failure itself for a hard time limit: no
    second FAILURE (which would start a new run of the task on the streams)."""
    async with open_stream(session, "sse", token_for(user_id)) as sse:
        await sse.next()
        result = hard_limited.apply_async((), {"user_id": user_id})
        events = await task_events(sse, result.id)
        assert [e["status"] for e in events] == ["STARTED", "PROGRESS", "FAILURE"]
        assert "TimeLimitExceeded" in events[-1]["error_message"], events[-1]
        # Sent once the main process has handled the time limit: whatever it published
        # for the task arrives before this one's events.
        after = resize_images.apply_async((1,), {"user_id": user_id})
        more: list[str] = []
        while True:
            received = await sse.next()
            if received.type not in EVENT_TYPES:
                continue
            message = received.message
            if message["task_id"] == result.id:
                more.append(message["status"])
            if message["task_id"] == after.id and message["type"] == "task_completed":
                break
    assert more == []


@pytest.mark.usefixtures("celery_worker")
async def test_cancel_ends_a_task_that_checks_between_steps_as_revoked(
    session: aiohttp.ClientSession, token_for: TokenFor, user_id: str
) -> None:
    async with session.ws_connect("/ws/tasks/", params={"token": token_for(user_id)}) as ws:
        assert (await ws.receive_json(timeout=10))["type"] == "active_tasks"
        result = long_export.apply_async((400,), {"user_id": user_id})  # 20 s uncancelled
        events = await _read_until(ws, lambda m: m.get("status") == "PROGRESS")
        await ws.send_json({"type": "cancel_task", "task_id": result.id})
        events += await _read_until(ws, lambda m: m["type"] == "task_completed")
        answers = [m for m in events if m["type"] == "task_cancelled"]
        assert answers == [{"type": "task_cancelled", "task_id": result.id, "success": True}]
        completed = events[-1]
        assert completed["task_id"] == result.id and completed["status"] == "REVOKED"
        assert completed["progress"] < 100
        await eventually(lambda: _is(result, "REVOKED"), what="REVOKED stored in Celery")

        # The task is over: cancelling it again is refused.
        await ws.send_json({"type": "cancel_task", "task_id": result.id})
        answer = await _read_until(ws, lambda m: m["type"] == "task_cancelled")
        assert answer[-1]["success"] is False


@pytest.mark.usefixtures("celery_worker")
async def test_a_task_cancelled_while_waiting_for_its_retry_does_not_run_again(
    session: aiohttp.ClientSession, token_for: TokenFor, user_id: str
) -> None:
    async with session.ws_connect("/ws/tasks/", params={"token": token_for(user_id)}) as ws:
        assert (await ws.receive_json(timeout=10))["type"] == "active_tasks"
        # The retry waits 3 s: the cancel, sent when RETRY arrives, is there long before.
        result = flaky.apply_async((), {"user_id": user_id, "countdown": 3})
        await _read_until(ws, lambda m: m.get("status") == "RETRY")
        await ws.send_json({"type": "cancel_task", "task_id": result.id})
        events = await _read_until(ws, lambda m: m["type"] == "task_completed")
    assert events[0] == {"type": "task_cancelled", "task_id": result.id, "success": True}
    assert [e["status"] for e in events[1:]] == ["REVOKED"]  # no second STARTED
    await eventually(lambda: _is(result, "REVOKED"), what="REVOKED stored in Celery")


@pytest.mark.usefixtures("celery_worker")
async def test_a_queued_task_is_on_the_streams_and_a_cancel_ends_it_before_it_starts(
    session: aiohttp.ClientSession, token_for: TokenFor, user_id: str
) -> None:
    """Sent to run in 4 s: PENDING on the streams (the snapshot, the status) from the
    moment it is sent; cancelled meanwhile, it ends REVOKED without ever starting."""
    async with session.ws_connect("/ws/tasks/", params={"token": token_for(user_id)}) as ws:
        assert (await ws.receive_json(timeout=10))["type"] == "active_tasks"
        result = resize_images.apply_async((2,), {"user_id": user_id}, countdown=4)
        [pending] = await _read_until(ws, lambda m: m.get("task_id") == result.id)
        assert (pending["type"], pending["status"]) == ("task_progress", "PENDING")
        await ws.send_json({"type": "get_task_status", "task_id": result.id})
        status = await _read_until(ws, lambda m: m["type"] == "task_status")
        assert status[-1]["status"]["status"] == "PENDING"
        await ws.send_json({"type": "cancel_task", "task_id": result.id})
        events = await _read_until(ws, lambda m: m["type"] == "task_completed")
    assert events[0] == {"type": "task_cancelled", "task_id": result.id, "success": True}
    assert [e["status"] for e in events[1:]] == ["REVOKED"]  # never STARTED
    await eventually(lambda: _is(result, "REVOKED"), what="REVOKED stored in Celery")


@pytest.mark.usefixtures("celery_worker")
async def test_a_task_that_could_not_be_sent_ends_failure(
    session: aiohttp.ClientSession, token_for: TokenFor, user_id: str
) -> None:
    """PENDING went out, then Celery could not send the task (an argument it cannot
    encode): the stream does not keep a queued task that no worker will ever run."""
    async with session.ws_connect("/ws/tasks/", params={"token": token_for(user_id)}) as ws:
        assert (await ws.receive_json(timeout=10))["type"] == "active_tasks"
        with pytest.raises(EncodeError):
            # No result wanted: Celery's result backend would keep listening for one.
            resize_images.apply_async(
                (object(),), {"user_id": user_id}, task_id="unsendable", ignore_result=True
            )
        events = await _read_until(ws, lambda m: m["type"] == "task_completed")
        assert [(e["task_id"], e["status"]) for e in events] == [
            ("unsendable", "PENDING"),
            ("unsendable", "FAILURE"),
        ]
        assert events[-1]["error_message"].startswith("the task could not be sent: ")
        await ws.send_json({"type": "get_active_tasks"})
        [snapshot] = await _read_until(ws, lambda m: m["type"] == "active_tasks")
        assert snapshot["tasks"] == []


@pytest.mark.usefixtures("celery_worker")
async def test_cancel_revokes_a_task_that_never_checks(
    session: aiohttp.ClientSession, token_for: TokenFor, user_id: str
) -> None:
    async with session.ws_connect("/ws/tasks/", params={"token": token_for(user_id)}) as ws:
        assert (await ws.receive_json(timeout=10))["type"] == "active_tasks"
        result = silent_job.apply_async((60,), {"user_id": user_id})
        await _read_until(ws, lambda m: m.get("status") == "STARTED")
        await ws.send_json({"type": "cancel_task", "task_id": result.id})
        events = await _read_until(ws, lambda m: m["type"] == "task_completed")
        assert events[0] == {"type": "task_cancelled", "task_id": result.id, "success": True}
        assert events[-1]["task_id"] == result.id and events[-1]["status"] == "REVOKED"
        await eventually(lambda: _is(result, "REVOKED"), what="REVOKED stored in Celery")

        # The worker replaced the terminated process and goes on.
        after = resize_images.apply_async((1,), {"user_id": user_id})
        assert await asyncio.to_thread(after.get, timeout=15) == {"images": 1}

        # Nothing reported the terminated run as failed meanwhile.
        await ws.send_json({"type": "get_task_status", "task_id": result.id})
        status = await _read_until(ws, lambda m: m["type"] == "task_status")
        assert status[-1]["status"]["status"] == "REVOKED"


async def _is(result: AsyncResult, state: str) -> bool:
    return await state_of(result) == state


async def _read_until(
    ws: aiohttp.ClientWebSocketResponse, done: Callable[[dict[str, Any]], bool]
) -> list[dict[str, Any]]:
    """WebSocket messages up to and including the first for which `done` holds."""
    messages: list[dict[str, Any]] = []
    while not messages or not done(messages[-1]):
        messages.append(await ws.receive_json(timeout=15))
    return messages


def test_a_worker_without_a_redis_url_runs_its_jobs_unreported(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """No streamer_redis_url and no STREAMER_REDIS_URL (a worker deployed without it):
    every job still runs and returns, its progress not published, and the log says why."""
    monkeypatch.delenv("STREAMER_REDIS_URL", raising=False)
    app = Celery("unconfigured", set_as_current=False)
    app.conf.task_always_eager = True

    @app.task(base=ProgressTask, bind=True)
    def job(self: ProgressTask, count: int, *, user_id: str) -> int:
        for done in range(count):
            self.update_progress(done * 100 / count, current_step=f"item {done}")
        return count

    for _ in range(2):
        result = job.apply(args=(3,), kwargs={"user_id": "7"})
        assert result.successful(), result.traceback
        assert result.get() == 3
    said = [r.getMessage() for r in caplog.records if "is not published" in r.getMessage()]
    assert len(said) == 1, said  # once per process, not at every report
    assert "no Redis URL" in said[0]
    # A Redis URL that is set but wrong is a mistake to fix, not to run past.
    monkeypatch.setenv("STREAMER_REDIS_URL", "http://not-redis")
    with pytest.raises(ConfigError, match="STREAMER_REDIS_URL must be a redis://"):
        job.apply(args=(1,), kwargs={"user_id": "7"}, throw=True)


def test_in_eager_mode_a_propagated_failure_is_the_tasks_own(redis_url: str, user_id: str) -> None:
    """With task_always_eager and task_eager_propagates (Django test settings), the task
    runs inside apply_async and its exception propagates with no on_failure called: it
    ended FAILURE "could not be sent", as if the task had never run."""
    app = Celery("eager", set_as_current=False)
    app.conf.update(
        task_always_eager=True, task_eager_propagates=True, streamer_redis_url=redis_url
    )

    @app.task(base=ProgressTask, bind=True)
    def job(self: ProgressTask, *, user_id: str) -> None:
        self.update_progress(10)
        raise ValueError("the file is empty")

    with pytest.raises(ValueError, match="the file is empty"):
        job.apply_async((), {"user_id": user_id}, task_id="eager-run")
    with redis.Redis.from_url(redis_url) as client:
        entries = client.xrange(history_key(user_id))
    events = [json.loads(fields[b"e"]) for _, fields in entries]
    assert [e["status"] for e in events] == ["PENDING", "STARTED", "PROGRESS", "FAILURE"]
    assert events[-1]["error_message"] == "the file is empty"


@pytest.fixture
def kept_ends(monkeypatch: pytest.MonkeyPatch) -> Iterator[KeptEnds]:
    """This test's own outage state and kept ends (short delays), its thread stopped
    after it."""
    monkeypatch.setattr(kept_ends_module, "OUTAGE_S", 1.0)
    monkeypatch.setattr(kept_ends_module, "RETRY_EVERY_S", 0.1)
    outage = Outage()
    kept = KeptEnds(outage)
    monkeypatch.setattr(celery_integration, "OUTAGE", outage)
    monkeypatch.setattr(celery_integration, "KEPT_ENDS", kept)
    yield kept
    kept.close()


@pytest.mark.parametrize("stalled_before", ["reports", "end"])
def test_a_stalled_redis_costs_a_task_one_wait_and_its_end_is_sent_once(
    redis_server: RedisServer,
    redis_url: str,
    user_id: str,
    kept_ends: KeptEnds,
    stalled_before: str,
) -> None:
    """Redis stops answering (connections hang): every report waited out the publisher's
    timeout, twice (the event, the cancel check), and the task's end was lost. Now the
    first wait starts an outage in which reports are skipped, and the end is kept and
    sent when Redis answers again, once: an end whose publish timed out may have run
    when Redis woke up, and is not sent again then (it would start a new run)."""
    app = Celery("stalled", set_as_current=False)
    app.conf.update(task_always_eager=True, streamer_redis_url=redis_url)

    @app.task(base=ProgressTask, bind=True)
    def job(self: ProgressTask, *, user_id: str) -> dict[str, int]:
        self.update_progress(0, current_step="step 0")
        stalled.enter_context(redis_server.paused())  # until the test resumes it
        if stalled_before == "reports":
            for step in range(1, 20):
                self.update_progress(5 * step, current_step=f"step {step}")
        return {"steps": 20}

    with contextlib.ExitStack() as stalled:
        started = time.monotonic()
        result = job.apply_async((), {"user_id": user_id}, task_id="stalled-run")
        waited = time.monotonic() - started
        assert result.get() == {"steps": 20}
        assert len(kept_ends) == 1  # its SUCCESS
    # One publisher timeout (5 s), where 19 reports waited 10 s each.
    assert waited < 15, waited

    def history() -> list[dict[str, Any]]:
        with redis.Redis.from_url(redis_url) as client:
            entries = client.xrange(history_key(user_id))
        return [json.loads(fields[b"e"]) for _, fields in entries]

    eventually_sync(lambda: len(kept_ends) == 0, what="the kept end handled", timeout=30)
    events = history()
    assert [e["status"] for e in events] == ["PENDING", "STARTED", "PROGRESS", "SUCCESS"]
    assert events[-1]["result_data"] == {"steps": 20}


def test_what_is_kept_is_sent_when_the_process_exits_if_redis_answers(
    redis_url: str, user_id: str, kept_ends: KeptEnds
) -> None:
    """A prefork child recycled (max-tasks-per-child) or stopped leaves with what it
    kept: it tries once, outage or not (the outage may be over by then)."""
    with Publisher(redis_url) as publisher:
        publisher.progress(user_id, "kept", progress=50)
        celery_integration.OUTAGE.began(BrokerUnavailable("Redis did not answer"))
        kept_ends.keep(completed_event(user_id, "kept"), lambda: publisher)
        kept_ends.send_at_exit()
        assert len(kept_ends) == 0
        assert not publisher.is_running(user_id, "kept")  # its SUCCESS was published
