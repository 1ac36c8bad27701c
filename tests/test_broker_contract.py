"""What every broker must do, stated through its interface only (`streamer.broker.base`).

Each test runs against both brokers: the embedded `MemoryBroker` and `RedisBroker` on a
private redis-server, each started with a listener that records what it is handed. The
HTTP-level tests elsewhere exercise the same behaviour through clients; this is the
statement a new broker (or a change to one) is held to.

Where the brokers may differ, the contract says so: Redis routes by user (a process gets
only the events of the users subscribed there), the embedded broker, alone in its
process, may hand over every event.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from itertools import pairwise
from typing import Any

import pytest

from streamer.broker.base import MAX_SNAPSHOT_BYTES, MAX_SNAPSHOT_TASKS, Broker
from streamer.broker.memory import MemoryBroker
from streamer.broker.redis import RedisBroker
from streamer.events import (
    MAX_TEXT_LENGTH,
    TASK_STATE_FIELDS,
    TaskState,
    completed_event,
    progress_event,
)
from streamer.wire import Delivery, EventId

from .model import expected_messages
from .waiting import eventually


class RecordingListener:
    """A `streamer.broker.base.Listener` that keeps everything it is handed."""

    def __init__(self) -> None:
        self.deliveries: list[Delivery] = []
        self.resets = 0

    def deliver(self, delivery: Delivery) -> None:
        self.deliveries.append(delivery)

    def deliver_all(self, deliveries: Sequence[Delivery]) -> None:
        self.deliveries += deliveries

    def reset(self) -> None:
        self.resets += 1

    def resume_points(self) -> dict[str, EventId | None]:
        return {}

    def ids_for(self, user_id: str) -> list[EventId]:
        return [d.event_id for d in self.deliveries if d.user_id == user_id]


@dataclass
class BrokerUnderTest:
    broker: Broker
    listener: RecordingListener
    # True: this process gets only the events of users subscribed here.
    routes_by_user: bool


MakeBroker = Callable[..., Awaitable[BrokerUnderTest]]


@pytest.fixture(params=["memory", "redis"])
async def make_broker(request: pytest.FixtureRequest) -> AsyncIterator[MakeBroker]:
    """`await make_broker(history_size=..., history_ttl=...)`: a started broker of the
    parametrised kind; every one is closed at teardown."""
    redis_url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    started: list[BrokerUnderTest] = []

    async def make(*, history_size: int = 100, history_ttl: int = 3600) -> BrokerUnderTest:
        broker: Broker
        if redis_url is None:
            broker = MemoryBroker(history_size=history_size, history_ttl=history_ttl)
        else:
            broker = RedisBroker(redis_url, history_size=history_size, history_ttl=history_ttl)
        under_test = BrokerUnderTest(broker, RecordingListener(), redis_url is not None)
        started.append(under_test)
        await broker.start(under_test.listener)
        return under_test

    try:
        yield make
    finally:
        for under_test in started:
            await under_test.broker.close()
    for under_test in started:
        # Nothing in these tests loses the broker's data; a reset would hide a bug.
        assert under_test.listener.resets == 0


@pytest.fixture
async def subject(make_broker: MakeBroker) -> BrokerUnderTest:
    return await make_broker()


@pytest.fixture
def stranger(user_id: str) -> str:
    """Another user, for what must never cross from one user to another."""
    return f"{user_id}-stranger"


async def publish_progress(
    broker: Broker, user_id: str, task_id: str, progress: int = 1, **fields: Any
) -> EventId:
    return await broker.publish(progress_event(user_id, task_id, progress=progress, **fields))


async def publish_completed(broker: Broker, user_id: str, task_id: str, **fields: Any) -> EventId:
    return await broker.publish(completed_event(user_id, task_id, **fields))


async def publish_tasks(broker: Broker, user_id: str, count: int, **fields: Any) -> list[str]:
    """`count` unfinished tasks, started one after the other; their ids, oldest first."""
    task_ids = [f"task-{n:04}" for n in range(count)]
    for task_id in task_ids:
        await publish_progress(broker, user_id, task_id, **fields)
    return task_ids


def task_ids(tasks: list[TaskState]) -> list[str]:
    return [task["task_id"] for task in tasks]


def assert_strictly_increasing(ids: list[EventId]) -> None:
    assert all(a < b for a, b in pairwise(ids)), ids


# --- publish and the listener -----------------------------------------------------------


async def test_publish_returns_increasing_ids_per_user(
    subject: BrokerUnderTest, user_id: str, stranger: str
) -> None:
    published: dict[str, list[EventId]] = {user_id: [], stranger: []}
    for n in range(30):
        for user in published:
            event_id = await publish_progress(subject.broker, user, f"task-{n % 3}", progress=n)
            published[user].append(event_id)
    for ids in published.values():
        assert_strictly_increasing(ids)
        # One dataset, one epoch; and an id survives its text form (clients send it back).
        assert len({event_id.epoch for event_id in ids}) == 1
        assert all(str(EventId.parse(str(event_id))) == str(event_id) for event_id in ids)


async def test_a_subscribed_users_events_reach_the_listener_in_order(
    subject: BrokerUnderTest, user_id: str
) -> None:
    await subject.broker.subscribe(user_id)
    events = [
        progress_event(user_id, "a", progress=10, current_step="one"),
        progress_event(user_id, "b", progress=20),
        progress_event(user_id, "a", progress=50),
        completed_event(user_id, "a", result_data={"rows": 3}),
        completed_event(user_id, "b", status="FAILURE", error_message="boom"),
    ]
    published = [await subject.broker.publish(event) for event in events]

    await eventually(
        lambda: len(subject.listener.ids_for(user_id)) >= len(published),
        what="the subscribed user's events at the listener",
    )
    received = [d for d in subject.listener.deliveries if d.user_id == user_id]
    assert [d.event_id for d in received] == published  # each once, in publish order
    assert [(d.task_id, d.type) for d in received] == [(e.task_id, e.type) for e in events]
    assert [json.loads(d.json) for d in received] == expected_messages(
        list(zip(events, published, strict=True))
    )
    # Every event carries the task's full state: b's failure still says progress 20.
    assert json.loads(received[-1].json)["progress"] == 20


async def test_events_of_users_not_subscribed_here(
    subject: BrokerUnderTest, user_id: str, stranger: str
) -> None:
    """With routing (Redis) a process gets nothing of users not subscribed there. The
    embedded broker may hand them over; either way, no event is attributed to the
    wrong user."""
    await subject.broker.subscribe(user_id)
    for n in range(5):
        await publish_progress(subject.broker, stranger, "theirs", progress=n)
    sentinel = await publish_progress(subject.broker, user_id, "mine")

    # One subscription delivers in publish order: once the sentinel is in, anything of
    # the stranger's published before it would be too.
    await eventually(
        lambda: sentinel in subject.listener.ids_for(user_id), what="the subscribed user's event"
    )
    assert subject.listener.ids_for(user_id) == [sentinel]
    if subject.routes_by_user:
        assert subject.listener.ids_for(stranger) == []


# --- snapshot ---------------------------------------------------------------------------


async def test_snapshot_holds_the_unfinished_tasks_newest_first(
    subject: BrokerUnderTest, user_id: str, stranger: str
) -> None:
    broker = subject.broker
    await publish_progress(broker, user_id, "first", progress=10, task_name="one")
    await publish_progress(broker, user_id, "second", progress=20)
    await publish_progress(broker, user_id, "done", progress=30)
    await publish_completed(broker, user_id, "done")
    await publish_progress(broker, user_id, "third", progress=40)
    await publish_progress(broker, stranger, "theirs", progress=50)
    # Newest means the most recently started: a later event does not move a task up.
    last = await publish_progress(broker, user_id, "first", progress=15)

    snapshot = await broker.snapshot(user_id)
    assert task_ids(snapshot.tasks) == ["third", "second", "first"]
    assert not snapshot.truncated
    assert all(set(task) == set(TASK_STATE_FIELDS) for task in snapshot.tasks)
    first = snapshot.tasks[2]
    assert (first["progress"], first["task_name"], first["status"]) == (15, "one", "PROGRESS")
    # Every event up to the position is reflected in the tasks.
    assert snapshot.position >= last


async def test_a_user_without_history_gets_a_position(
    subject: BrokerUnderTest, user_id: str
) -> None:
    snapshot = await subject.broker.snapshot(user_id)
    assert snapshot.tasks == [] and not snapshot.truncated
    assert isinstance(snapshot.position, EventId)
    assert EventId.parse(str(snapshot.position)) == snapshot.position

    nothing_yet = await subject.broker.replay(user_id, str(snapshot.position))
    assert nothing_yet.complete and nothing_yet.events == []
    later = await publish_progress(subject.broker, user_id, "job")
    replay = await subject.broker.replay(user_id, str(snapshot.position))
    assert replay.complete
    assert [d.event_id for d in replay.events] == [later]


async def test_snapshot_is_truncated_over_max_snapshot_tasks(
    subject: BrokerUnderTest, user_id: str
) -> None:
    started = await publish_tasks(subject.broker, user_id, MAX_SNAPSHOT_TASKS)
    at_the_limit = await subject.broker.snapshot(user_id)
    assert len(at_the_limit.tasks) == MAX_SNAPSHOT_TASKS
    assert not at_the_limit.truncated

    await publish_progress(subject.broker, user_id, "one-too-many")
    over = await subject.broker.snapshot(user_id)
    assert over.truncated
    assert len(over.tasks) == MAX_SNAPSHOT_TASKS
    # The newest ones are kept: only the oldest task is left out.
    assert task_ids(over.tasks)[0] == "one-too-many"
    assert set(task_ids(over.tasks)) == {"one-too-many", *started[1:]}


async def test_snapshot_is_truncated_over_max_snapshot_bytes(
    subject: BrokerUnderTest, user_id: str
) -> None:
    big = "x" * MAX_TEXT_LENGTH
    count = MAX_SNAPSHOT_BYTES // (3 * MAX_TEXT_LENGTH) + 10  # some 300 KB of states
    started = await publish_tasks(
        subject.broker, user_id, count, current_step=big, task_name=big, category=big
    )
    snapshot = await subject.broker.snapshot(user_id)
    assert snapshot.truncated
    assert 0 < len(snapshot.tasks) < count
    assert task_ids(snapshot.tasks) == started[::-1][: len(snapshot.tasks)]


async def test_the_task_filter_applies_before_the_limit(
    subject: BrokerUnderTest, user_id: str
) -> None:
    started = await publish_tasks(subject.broker, user_id, MAX_SNAPSHOT_TASKS + 1)
    oldest = started[0]
    assert oldest not in task_ids((await subject.broker.snapshot(user_id)).tasks)

    filtered = await subject.broker.snapshot(user_id, task_id=oldest)
    assert task_ids(filtered.tasks) == [oldest]
    assert not filtered.truncated


async def test_the_task_filter_gives_only_that_unfinished_task_of_the_user(
    subject: BrokerUnderTest, user_id: str, stranger: str
) -> None:
    broker = subject.broker
    await publish_progress(broker, user_id, "running")
    await publish_progress(broker, user_id, "other")
    await publish_progress(broker, user_id, "done")
    await publish_completed(broker, user_id, "done")
    await publish_progress(broker, stranger, "theirs")

    assert task_ids((await broker.snapshot(user_id, task_id="running")).tasks) == ["running"]
    for absent in ("done", "theirs", "unknown"):
        snapshot = await broker.snapshot(user_id, task_id=absent)
        assert snapshot.tasks == [], absent
        assert isinstance(snapshot.position, EventId)


# --- replay -----------------------------------------------------------------------------


async def test_replay_after_a_snapshot_position_is_complete_and_exact(
    subject: BrokerUnderTest, user_id: str, stranger: str
) -> None:
    broker = subject.broker
    await subject.broker.subscribe(user_id)
    await publish_progress(broker, user_id, "before")
    snapshot = await broker.snapshot(user_id)
    events = [
        progress_event(user_id, "a", progress=1),
        progress_event(stranger, "theirs", progress=1),
        progress_event(user_id, "b", progress=2, task_name="b"),
        completed_event(user_id, "a", status="REVOKED"),
    ]
    published = [(event, await broker.publish(event)) for event in events]
    mine = [(event, event_id) for event, event_id in published if event.user_id == user_id]

    replay = await broker.replay(user_id, str(snapshot.position))
    assert replay.complete
    assert [d.event_id for d in replay.events] == [event_id for _, event_id in mine]
    assert all(d.user_id == user_id for d in replay.events)
    assert [json.loads(d.json) for d in replay.events] == expected_messages(mine)
    # Replayed, an event is what the listener was handed live, byte for byte.
    await eventually(
        lambda: len(subject.listener.ids_for(user_id)) >= len(mine) + 1,
        what="the live deliveries",
    )
    live = {d.event_id: d.json for d in subject.listener.deliveries if d.user_id == user_id}
    assert [d.json for d in replay.events] == [live[d.event_id] for d in replay.events]

    up_to_date = await broker.replay(user_id, str(mine[-1][1]))
    assert up_to_date.complete and up_to_date.events == []


async def test_replay_after_an_event_id_is_complete_and_exact(
    subject: BrokerUnderTest, user_id: str, stranger: str
) -> None:
    published = []
    for n in range(6):
        published.append(await publish_progress(subject.broker, user_id, f"t{n % 2}", n))
        await publish_progress(subject.broker, stranger, "theirs", n)
    for n, after in enumerate(published):
        replay = await subject.broker.replay(user_id, str(after))
        assert replay.complete, after
        assert [d.event_id for d in replay.events] == published[n + 1 :]
        assert [d.task_id for d in replay.events] == [f"t{m % 2}" for m in range(n + 1, 6)]


async def test_a_replay_read_a_page_at_a_time_is_the_whole_replay(
    subject: BrokerUnderTest, user_id: str, stranger: str
) -> None:
    """With a limit, a replay holds the first events after the point; asking again
    after the last of them gives the next ones, until a page comes back short."""
    before = await publish_progress(subject.broker, user_id, "job", 0)
    published = []
    for n in range(1, 8):
        published.append(await publish_progress(subject.broker, user_id, "job", n))
        await publish_progress(subject.broker, stranger, "theirs", n)
    pages, after = [], str(before)
    while True:
        page = await subject.broker.replay(user_id, after, 3)
        assert page.complete, after
        assert len(page.events) <= 3
        pages.append([d.event_id for d in page.events])
        if len(page.events) < 3:
            break
        after = str(page.events[-1].event_id)
    assert pages == [published[0:3], published[3:6], published[6:]]


async def test_a_page_after_a_point_the_history_lost_is_incomplete(
    make_broker: MakeBroker, user_id: str
) -> None:
    """The history moved on past the end of a page read earlier: the next page says so."""
    subject = await make_broker(history_size=4)
    published = [await publish_progress(subject.broker, user_id, "job", n) for n in range(4)]
    first = await subject.broker.replay(user_id, str(published[0]), 2)
    assert first.complete and [d.event_id for d in first.events] == published[1:3]
    for n in range(4, 8):
        await publish_progress(subject.broker, user_id, "job", n)
    assert not (await subject.broker.replay(user_id, str(published[2]), 2)).complete


def _other_epoch(event_id: EventId) -> EventId:
    epoch = "0" * 8 if event_id.epoch != "0" * 8 else "1" * 8
    return EventId(epoch, event_id.ms, event_id.seq)


RESUME_POINTS_NEVER_GIVEN_OUT: dict[str, Callable[[EventId, str], str]] = {
    "not-an-id": lambda published, other: "garbage",
    "empty": lambda published, other: "",
    "without-epoch": lambda published, other: published.stream_id,
    "foreign-epoch": lambda published, other: str(_other_epoch(published)),
    "from-the-future": lambda published, other: str(
        EventId(published.epoch, published.ms + 3_600_000, 0)
    ),
    "another-users-id": lambda published, other: other,
}


@pytest.mark.parametrize("resume_point", RESUME_POINTS_NEVER_GIVEN_OUT)
async def test_replay_from_an_unknown_id_is_incomplete(
    subject: BrokerUnderTest, user_id: str, stranger: str, resume_point: str
) -> None:
    """An id this user's history never held may hide a gap: the client must resync.
    (`another-users-id`: an id of someone else's history, for a user without one.)"""
    published = await publish_progress(subject.broker, user_id, "job")
    await publish_progress(subject.broker, user_id, "job", progress=2)
    foreign = str(await publish_progress(subject.broker, stranger, "theirs"))
    after = RESUME_POINTS_NEVER_GIVEN_OUT[resume_point](published, foreign)
    replay_user = f"{user_id}-new" if resume_point == "another-users-id" else user_id

    replay = await subject.broker.replay(replay_user, after)
    assert not replay.complete, after


async def test_replay_from_another_users_id_inside_the_history_is_incomplete(
    subject: BrokerUnderTest, user_id: str, stranger: str
) -> None:
    """An id between two of this user's events, given to someone else: the embedded
    broker took it for this user's and replayed from it (`recovered: true`). (Redis
    numbers each user's history on its own: published in the same millisecond, two
    users' events can have the same id, so each is published in a millisecond of its
    own.)"""

    async def a_millisecond_after(event_id: EventId) -> None:
        await eventually(lambda: time.time() * 1000 > event_id.ms + 1, what="the next ms")

    first = await publish_progress(subject.broker, user_id, "job")
    await a_millisecond_after(first)
    foreign = await publish_progress(subject.broker, stranger, "theirs")
    await a_millisecond_after(foreign)
    second = await publish_progress(subject.broker, user_id, "job", progress=2)
    assert first < foreign < second
    assert not (await subject.broker.replay(user_id, str(foreign))).complete


async def test_replay_from_before_the_retained_history_is_incomplete(
    make_broker: MakeBroker, user_id: str
) -> None:
    subject = await make_broker(history_size=3)
    published = [await publish_progress(subject.broker, user_id, "job", n) for n in range(6)]
    # Three are kept; the events after published[0] and [1] are partly gone.
    for trimmed in published[:2]:
        assert not (await subject.broker.replay(user_id, str(trimmed))).complete, trimmed
    # After the newest trimmed event, everything is still there.
    replay = await subject.broker.replay(user_id, str(published[2]))
    assert replay.complete
    assert [d.event_id for d in replay.events] == published[3:]


async def test_replay_after_the_history_expired_is_incomplete(
    make_broker: MakeBroker, user_id: str
) -> None:
    history_ttl = 2
    subject = await make_broker(history_ttl=history_ttl)
    broker = subject.broker
    seen = await publish_progress(broker, user_id, "job", progress=1)
    last = await publish_progress(broker, user_id, "job", progress=2)
    assert (await broker.replay(user_id, str(seen))).complete

    async def expired() -> bool:
        return not (await broker.replay(user_id, str(seen))).complete

    await eventually(expired, what="the history to expire", timeout=history_ttl + 8)
    assert not (await broker.replay(user_id, str(last))).complete
    # The task's state outlives the history of its events.
    state = await broker.task_state(user_id, "job")
    assert state is not None and state["progress"] == 2

    # A new event starts a new history: resuming from before it is still a gap, from
    # inside it is exact. (Within history_ttl of the new event, or it expires again.)
    fresh = await publish_progress(broker, user_id, "job", progress=3)
    newer = await publish_progress(broker, user_id, "job", progress=4)
    assert not (await broker.replay(user_id, str(last))).complete
    replay = await broker.replay(user_id, str(fresh))
    assert replay.complete
    assert [d.event_id for d in replay.events] == [newer]


# --- task state -------------------------------------------------------------------------


async def test_task_state_of_the_users_own_tasks_only(
    subject: BrokerUnderTest, user_id: str, stranger: str
) -> None:
    broker = subject.broker
    await publish_progress(broker, user_id, "job", progress=40, task_name="report")
    await publish_progress(broker, user_id, "job", progress=60, current_step="two")

    state = await broker.task_state(user_id, "job")
    assert state is not None and set(state) == set(TASK_STATE_FIELDS)
    # A run's events add up: a field an event leaves out keeps its value.
    assert (state["task_id"], state["status"], state["progress"]) == ("job", "PROGRESS", 60)
    assert (state["task_name"], state["current_step"]) == ("report", "two")
    assert state["completed_at"] is None

    assert await broker.task_state(user_id, "unknown") is None
    assert await broker.task_state(stranger, "job") is None

    # A finished task's state stays readable.
    await publish_completed(broker, user_id, "job", result_data={"pages": 3})
    finished = await broker.task_state(user_id, "job")
    assert finished is not None
    assert (finished["status"], finished["progress"]) == ("SUCCESS", 100)
    assert finished["result_data"] == {"pages": 3} and finished["completed_at"] is not None


# --- cancellation -----------------------------------------------------------------------


async def test_cancellation_is_per_user_and_task(
    subject: BrokerUnderTest, user_id: str, stranger: str
) -> None:
    broker = subject.broker
    await publish_progress(broker, user_id, "same-id")
    await publish_progress(broker, stranger, "same-id")
    await publish_progress(broker, user_id, "other")

    assert await broker.request_cancel(user_id, "same-id") is True
    assert await broker.is_cancelled(user_id, "same-id") is True
    assert await broker.is_cancelled(stranger, "same-id") is False
    assert await broker.is_cancelled(user_id, "other") is False

    # Another user's cancel never shows, whether or not they have a task of that id.
    await publish_progress(broker, user_id, "only-mine")
    assert await broker.request_cancel(stranger, "only-mine") is False
    assert await broker.is_cancelled(user_id, "only-mine") is False
    assert await broker.is_cancelled(stranger, "only-mine") is False

    assert await broker.request_cancel(user_id, "unknown") is False
    assert await broker.is_cancelled(user_id, "unknown") is False


async def test_a_finished_task_cannot_be_cancelled(subject: BrokerUnderTest, user_id: str) -> None:
    broker = subject.broker
    await publish_progress(broker, user_id, "done", progress=50)
    await publish_completed(broker, user_id, "done")
    assert await broker.request_cancel(user_id, "done") is False
    assert await broker.is_cancelled(user_id, "done") is False

    # A cancel asked for during a run does not outlive it.
    await publish_progress(broker, user_id, "revoked", progress=50)
    assert await broker.request_cancel(user_id, "revoked") is True
    await publish_completed(broker, user_id, "revoked", status="REVOKED")
    assert await broker.is_cancelled(user_id, "revoked") is False


async def test_a_new_run_of_a_finished_task_id_starts_clean(
    subject: BrokerUnderTest, user_id: str
) -> None:
    broker = subject.broker
    await publish_progress(
        broker, user_id, "job", progress=60, task_name="first run", current_step="3", category="c"
    )
    assert await broker.request_cancel(user_id, "job") is True
    await publish_completed(
        broker, user_id, "job", status="FAILURE", error_message="boom", result_data={"k": 1}
    )
    finished = await broker.task_state(user_id, "job")
    assert finished is not None and finished["completed_at"] is not None

    await publish_progress(broker, user_id, "job", progress=5, status="STARTED")
    state = await broker.task_state(user_id, "job")
    assert state is not None
    assert (state["status"], state["progress"]) == ("STARTED", 5)
    leftovers = ("task_name", "current_step", "category", "completed_at", "error_message")
    assert {name: state[name] for name in leftovers} == dict.fromkeys(leftovers)
    assert state["result_data"] == {}
    # Its times are the new run's.
    finished_at = datetime.fromisoformat(finished["completed_at"])
    assert datetime.fromisoformat(state["created_at"]) >= finished_at
    assert datetime.fromisoformat(state["started_at"]) >= finished_at

    assert await broker.is_cancelled(user_id, "job") is False
    assert task_ids((await broker.snapshot(user_id)).tasks) == ["job"]
    assert await broker.request_cancel(user_id, "job") is True
    assert await broker.is_cancelled(user_id, "job") is True


# --- readiness --------------------------------------------------------------------------


async def test_a_started_broker_is_ready(subject: BrokerUnderTest) -> None:
    assert await subject.broker.ready() is True


async def test_the_embedded_broker_forgets_what_redis_would_expire() -> None:
    """As Redis's TTLs do: an unfinished task whose producer went quiet for a week
    leaves the snapshots (its cancel request too), a finished one after the history's
    TTL, and a busy task stays."""
    now = [1000.0]
    broker = MemoryBroker(history_size=10, history_ttl=3600, clock=lambda: now[0])
    await broker.publish(progress_event("u", "abandoned", progress=5))
    await broker.publish(completed_event("u", "done"))
    assert await broker.request_cancel("u", "abandoned")
    now[0] += 3601
    await broker.publish(progress_event("u", "busy", progress=1))  # sweeps
    assert await broker.task_state("u", "done") is None
    assert [t["task_id"] for t in (await broker.snapshot("u")).tasks] == ["busy", "abandoned"]
    for _ in range(7):
        now[0] += 86400
        await broker.publish(progress_event("u", "busy", progress=2))
    assert [t["task_id"] for t in (await broker.snapshot("u")).tasks] == ["busy"]
    assert await broker.task_state("u", "abandoned") is None
    assert not await broker.is_cancelled("u", "abandoned")


@pytest.mark.parametrize("read", ["task_state", "snapshot", "is_cancelled", "request_cancel"])
async def test_the_embedded_broker_expires_what_is_read_without_a_publish(read: str) -> None:
    """As Redis does when a key is read: with nobody publishing, a finished task is gone
    after the history's TTL, and an unfinished one quiet for a week with its cancel
    request, whichever read comes first."""
    now = [1000.0]
    broker = MemoryBroker(history_size=10, history_ttl=60, clock=lambda: now[0])
    await broker.publish(completed_event("u", "done"))
    await broker.publish(progress_event("u", "abandoned", progress=5))
    assert await broker.request_cancel("u", "abandoned")
    now[0] += 61
    if read == "task_state":
        assert await broker.task_state("u", "done") is None
        assert await broker.task_state("u", "abandoned") is not None
    now[0] += 7 * 86400
    if read == "task_state":
        assert await broker.task_state("u", "abandoned") is None
    elif read == "snapshot":
        assert (await broker.snapshot("u")).tasks == []
    elif read == "is_cancelled":
        assert await broker.is_cancelled("u", "abandoned") is False
    else:
        assert await broker.request_cancel("u", "abandoned") is False
    assert await broker.task_state("u", "done") is None
