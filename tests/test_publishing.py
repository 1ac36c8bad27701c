"""Publishing many events: auto-batched concurrent calls and `publish_many`, checked
against Redis itself (states, histories, trimming) and against what subscribers get."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import pickle
import resource
import time
import zlib
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient

from streamer.broker import redis_publishing, redis_script_runners
from streamer.broker.memory import MemoryBroker
from streamer.broker.redis import RedisBroker
from streamer.broker.redis_publish_script import encode_event, publish_call
from streamer.broker.redis_schema import (
    active_key,
    decode_message,
    history_key,
    task_key,
    user_channel,
)
from streamer.events import EventError, TaskEvent, completed_event, progress_event
from streamer.publisher import AsyncPublisher, BrokerUnavailable, Publisher
from streamer.wire import Delivery, EventId, stored_event

from .clients import ws_json, ws_messages
from .model import expected_messages
from .processes import RedisServer

TokenFor = Callable[..., str]

MARKER = b"end of what the test published"


def script_calls(admin: redis.Redis) -> int:
    stats = admin.info("commandstats").get("cmdstat_evalsha", {"calls": 0})
    return int(stats["calls"])


def event_id(raw: str) -> EventId:
    parsed = EventId.parse(raw)
    assert parsed is not None, raw
    return parsed


def history_ids(admin: redis.Redis, user: str) -> list[str]:
    return [sid.decode() for sid, _ in admin.xrange(history_key(user))]


def stream_id(raw: str) -> str:
    return event_id(raw).stream_id


def stored_state(admin: redis.Redis, user: str, task: str) -> dict[str, Any]:
    raw = admin.hgetall(task_key(user, task))
    return {k.decode(): v.decode() for k, v in raw.items()}


@contextlib.asynccontextmanager
async def channel_listener(
    redis_url: str, users: Iterable[str]
) -> AsyncIterator[Callable[[int], Any]]:
    """Subscribes to the users' channels; yields `received(n)`, which waits for n
    deliveries in all and returns them in arrival order."""
    client = aioredis.Redis.from_url(redis_url)
    pubsub = client.pubsub()
    await pubsub.subscribe(*(user_channel(user) for user in users))
    deliveries: list[Delivery] = []

    async def received(count: int) -> list[Delivery]:
        async def read() -> None:
            while len(deliveries) < count:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
                if message is not None:
                    delivery = decode_message(message["data"])
                    assert delivery is not None, message
                    deliveries.append(delivery)

        await asyncio.wait_for(read(), 20)

        # Nothing more than expected arrives: a marker published now comes after
        # whatever else the publishes sent.
        async def read_to_the_marker() -> None:
            await client.publish(user_channel(users[0]), MARKER)
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
                if message is None:
                    continue
                if message["data"] == MARKER:
                    return
                deliveries.append(decode_message(message["data"]))  # type: ignore[arg-type]

        await asyncio.wait_for(read_to_the_marker(), 20)
        return deliveries

    try:
        yield received
    finally:
        await pubsub.aclose()
        await client.aclose()


# --- auto-batching -----------------------------------------------------------------------


async def test_concurrent_async_publishes_are_batched_stored_and_delivered_once(
    redis_url: str,
) -> None:
    tasks, steps = 40, 25
    users = [f"user-{n}" for n in range(6)]
    published: dict[int, list[str]] = {}
    with redis.Redis.from_url(redis_url) as admin:
        async with channel_listener(redis_url, users) as received:
            async with AsyncPublisher(redis_url) as publisher:
                await publisher.progress("warm-up", "t", progress=1)  # loads the script
                calls_before = script_calls(admin)

                async def producer(number: int) -> None:
                    ids = published.setdefault(number, [])
                    user, task = users[number % len(users)], f"task-{number}"
                    for step in range(1, steps + 1):
                        progress = 100 * step // steps
                        ids.append(
                            await publisher.progress(
                                user, task, progress=progress, processed_items=step
                            )
                        )

                await asyncio.gather(*(producer(n) for n in range(tasks)))
                calls = script_calls(admin) - calls_before
            deliveries = await received(tasks * steps)

        total = tasks * steps
        assert calls <= total // 5, f"{calls} script calls for {total} concurrent events"
        every_id = {(number % len(users), raw) for number, ids in published.items() for raw in ids}
        assert len(every_id) == total  # ids are positions in each user's own history
        for ids in published.values():
            assert [event_id(raw) for raw in ids] == sorted(event_id(raw) for raw in ids)
            assert len(ids) == steps

        for user in users:
            stored = history_ids(admin, user)
            mine = {
                stream_id(raw)
                for number, ids in published.items()
                if users[number % len(users)] == user
                for raw in ids
            }
            assert set(stored) == mine and len(stored) == len(mine)
            got = [d.event_id.stream_id for d in deliveries if d.user_id == user]
            assert got == stored  # each event once, in the order of the user's history
        for number in range(tasks):
            state = stored_state(admin, users[number % len(users)], f"task-{number}")
            assert state["processed_items"] == str(steps) and state["progress"] == "100"
            assert state["status"] == '"PROGRESS"'


async def test_concurrent_calls_of_one_turn_share_one_script_call_and_a_lone_call_goes_alone(
    redis_url: str,
) -> None:
    with redis.Redis.from_url(redis_url) as admin:
        async with AsyncPublisher(redis_url) as publisher:
            await publisher.progress("u", "t", progress=1)

            before = script_calls(admin)
            ids = await asyncio.gather(
                *(publisher.progress("u", f"t{n}", progress=n) for n in range(10))
            )
            assert script_calls(admin) - before == 1
            assert [event_id(raw) for raw in ids] == sorted(event_id(raw) for raw in ids)

            before = script_calls(admin)
            commands_before = admin.info("stats")["total_commands_processed"]
            loop = asyncio.get_running_loop()
            started = loop.time()
            await publisher.progress("u", "t", progress=2)
            elapsed = loop.time() - started
            assert script_calls(admin) - before == 1
            # INFO, the script, and the commands it ran: nothing else from the publisher.
            commands = admin.info("stats")["total_commands_processed"] - commands_before
            assert commands < 20
            assert elapsed < 1


async def test_a_cancelled_call_that_has_not_left_publishes_nothing(redis_url: str) -> None:
    async with AsyncPublisher(redis_url) as publisher:
        call = asyncio.ensure_future(publisher.progress("u", "gone", progress=1))
        await asyncio.sleep(0)  # queued, not sent yet
        call.cancel()
        kept = await publisher.progress("u", "kept", progress=1)
    with redis.Redis.from_url(redis_url) as admin:
        assert history_ids(admin, "u") == [stream_id(kept)]
        assert not admin.exists(task_key("u", "gone"))


def users_of_two_lanes() -> tuple[str, str]:
    def lane(user: str) -> int:
        return zlib.crc32(user.encode()) % redis_publishing.LANES

    first = next(f"a{n}" for n in range(100) if lane(f"a{n}") == 0)
    second = next(f"b{n}" for n in range(100) if lane(f"b{n}") == 1)
    return first, second


async def test_a_call_for_users_of_two_lanes_is_not_overtaken_by_a_later_call(
    redis_url: str,
) -> None:
    """`publish_many` of events of users in two lanes went in the first user's lane: a
    later call for the other user went out before it, while that lane was busy. A
    progress published before a completion landed after it, and started a new run."""
    busy_user, user = users_of_two_lanes()
    async with AsyncPublisher(redis_url) as publisher:
        busy = asyncio.ensure_future(
            publisher.publish_many([progress_event(busy_user, f"x{n}") for n in range(3000)])
        )
        both, completed = await asyncio.gather(
            publisher.publish_many(
                [
                    progress_event(busy_user, "a", progress=99),
                    progress_event(user, "t", progress=99),
                ]
            ),
            publisher.completed(user, "t"),
        )
        await busy
        assert event_id(both[1]) < event_id(completed)
        assert not await publisher.is_running(user, "t")
        # Two such calls over the same lanes, in either order, hold them in turn.
        crossed = await asyncio.gather(
            publisher.publish_many([progress_event(user, "c"), progress_event(busy_user, "c")]),
            publisher.publish_many([progress_event(busy_user, "d"), progress_event(user, "d")]),
            publisher.progress(user, "e"),
        )
    # (Each user's history numbers its events on its own: ids compare within a user.)
    (user_c, busy_c), (busy_d, user_d), user_e = crossed
    assert event_id(user_c) < event_id(user_d) < event_id(user_e)
    assert event_id(busy_c) < event_id(busy_d)


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_an_event_redis_refuses_changes_nothing(redis_url: str, kind: str) -> None:
    """A publish the script failed (here: the user's history is not a stream) wrote the
    failed event's fields to its task's state and put a new task among the active ones:
    an event that is not published changes nothing."""

    async def publish_many(events: list[TaskEvent]) -> list[str]:
        if kind == "sync":
            with Publisher(redis_url) as publisher:
                return publisher.publish_many(events)
        async with AsyncPublisher(redis_url) as publisher:
            return await publisher.publish_many(events)

    user, other = f"refused-{kind}", f"other-{kind}"
    await publish_many([progress_event(user, "t", progress=10, current_step="before")])
    with redis.Redis.from_url(redis_url) as admin:
        state = admin.hgetall(task_key(user, "t"))
        admin.delete(history_key(user))
        admin.set(history_key(user), "not a stream")
        for events in (
            [progress_event(user, "t", progress=90, current_step="failed")],
            [progress_event(user, "new", progress=5)],
        ):
            with pytest.raises(BrokerUnavailable, match="WRONGTYPE"):
                await publish_many(events)
        assert admin.hgetall(task_key(user, "t")) == state
        assert admin.zrange(active_key(user), 0, -1) == [b"t"]
        assert not admin.exists(task_key(user, "new"))
        # Nor one whose task is what the script cannot read: the user's other keys are
        # not touched either (its history's expiry was renewed).
        admin.set(task_key(other, "broken"), "not a hash")
        await publish_many([progress_event(other, "kept")])
        admin.expire(history_key(other), 50)
        with pytest.raises(BrokerUnavailable, match="WRONGTYPE"):
            await publish_many([progress_event(other, "broken")])
        assert 0 < admin.ttl(history_key(other)) <= 50
        assert admin.xlen(history_key(other)) == 1
        admin.delete(task_key(other, "broken"), history_key(other), active_key(other))
        admin.delete(task_key(other, "kept"))

        batch = [progress_event(other, "x"), completed_event(user, "t"), progress_event(other, "y")]
        with pytest.raises(BrokerUnavailable, match=r"at event 2 of 3: the ones before it"):
            await publish_many(batch)
        assert admin.xlen(history_key(other)) == 1
        assert admin.zrange(active_key(other), 0, -1) == [b"x"]
        assert not admin.exists(task_key(other, "y"))
        assert admin.hgetall(task_key(user, "t")) == state
        assert admin.zrange(active_key(user), 0, -1) == [b"t"]


# --- publish_many ------------------------------------------------------------------------
# --- publish_many ------------------------------------------------------------------------


def lifecycle(user: str) -> list[TaskEvent]:
    """Every kind of transition: pending then running, optional fields, a failure, a
    success, a new run of a finished task, a revoked task."""
    return [
        progress_event(user, "a", status="PENDING", task_name="export", category="reports"),
        progress_event(user, "b", progress=5, current_step="start", total_items=3),
        progress_event(user, "a", status="STARTED", progress=0),
        progress_event(user, "b", progress=33.5, processed_items=1, total_items=3),
        progress_event(user, "a", progress=50, estimated_completion="2030-01-31T12:00:00Z"),
        completed_event(user, "b", status="FAILURE", error_message="disk full"),
        progress_event(user, "b", status="RETRY", progress=1),  # a new run of b
        completed_event(user, "a", result_data={"rows": 3, "nested": {"ok": True}}),
        progress_event(user, "c", progress=10),
        completed_event(user, "c", status="REVOKED"),
        progress_event(user, "a", progress=1),  # a new run of a
    ]


def for_user(events: list[TaskEvent], user: str) -> list[TaskEvent]:
    """The same events (same timestamps) for another user."""
    return [dataclasses.replace(event, user_id=user) for event in events]


def user_data(admin: redis.Redis, user: str) -> dict[str, Any]:
    """Everything stored for a user, ids and expiry times aside."""
    tasks = {}
    for task in ("a", "b", "c"):
        state = stored_state(admin, user, task)
        state.pop("user_id")
        tasks[task] = state
        assert admin.ttl(task_key(user, task)) > 0
    entries = [fields[b"e"].decode() for _, fields in admin.xrange(history_key(user))]
    active = sorted(member.decode() for member in admin.zrange(active_key(user), 0, -1))
    return {"tasks": tasks, "history": entries, "active": active}


async def test_publish_many_stores_what_publishing_one_by_one_stores(redis_url: str) -> None:
    events = lifecycle("single")
    with Publisher(redis_url) as publisher:
        one_by_one = [publisher.publish(event) for event in events]
        batched = publisher.publish_many(for_user(events, "sync-batch"))
    async with AsyncPublisher(redis_url) as async_publisher:
        async_batched = await async_publisher.publish_many(for_user(events, "async-batch"))

    with redis.Redis.from_url(redis_url) as admin:
        expected = user_data(admin, "single")
        assert expected["active"] == ["a", "b"]
        assert len(expected["history"]) == len(events)
        for user, ids in (("sync-batch", batched), ("async-batch", async_batched)):
            assert user_data(admin, user) == expected
            assert [stream_id(raw) for raw in ids] == history_ids(admin, user)
            assert [event_id(raw) for raw in ids] == sorted(event_id(raw) for raw in ids)
        assert [stream_id(raw) for raw in one_by_one] == history_ids(admin, "single")
        # The new run of "a" started from a clean state.
        assert "result_data" not in expected["tasks"]["a"]
        assert json.loads(expected["tasks"]["b"]["status"]) == "RETRY"


def test_each_event_of_a_batch_carries_the_state_the_model_gives(redis_url: str) -> None:
    """Within one script call the script keeps each task's event text up to date event
    by event: across new runs, optional fields and values set only where none was, each
    event still says what the model of the task states says, in the same order."""
    events = lifecycle("batch-text") + lifecycle("batch-text")  # finished tasks start again
    with Publisher(redis_url) as publisher, redis.Redis.from_url(redis_url) as admin:
        channel = admin.pubsub(ignore_subscribe_messages=True)
        channel.subscribe(user_channel("batch-text"))
        ids = publisher.publish_many(events)
        entries = admin.xrange(history_key("batch-text"))
        live = []
        deadline = time.monotonic() + 10
        while len(live) < len(events) and time.monotonic() < deadline:
            # None also stands for the subscription's own confirmation, which is ignored.
            if (message := channel.get_message(timeout=1)) is not None:
                live.append(message)
        channel.close()
    published = [
        (event, event_id)
        for event, event_id in zip(events, map(EventId.parse, ids), strict=True)
        if event_id is not None
    ]
    assert len(published) == len(events)
    expected = expected_messages(published)
    stored = [json.loads(fields[b"e"]) for _, fields in entries]
    assert [{"id": raw, **text} for raw, text in zip(ids, stored, strict=True)] == expected
    # What subscribers get live is, byte for byte, what a resume replays.
    replayed = [
        stored_event("batch-text", event_id, fields[b"e"].decode()).json
        for (_, event_id), (_, fields) in zip(published, entries, strict=True)
    ]
    delivered = [decode_message(message["data"]) for message in live]
    assert [delivery.json for delivery in delivered if delivery is not None] == replayed
    assert [json.loads(payload) for payload in replayed] == expected


def test_a_script_call_tells_a_thousand_tasks_and_their_layouts_apart(redis_url: str) -> None:
    """Task and layout numbers travel as two characters each: past the first 64 too."""
    events = [
        progress_event(f"user-{n % 3}", f"task-{n}", progress=n % 101, current_step=f"s{n}")
        if n % 7
        else completed_event(f"user-{n % 3}", f"task-{n}", result_data={"n": n})
        for n in range(1000)
    ]
    with Publisher(redis_url) as publisher, redis.Redis.from_url(redis_url) as admin:
        ids = publisher.publish_many(events)  # one script call
        assert len(ids) == len(events)
        for n in (0, 1, 63, 64, 65, 500, 999):
            state = stored_state(admin, f"user-{n % 3}", f"task-{n}")
            if n % 7:
                assert (state["progress"], state["current_step"]) == (str(n % 101), f'"s{n}"')
            else:
                assert (state["status"], state["result_data"]) == ('"SUCCESS"', f'{{"n":{n}}}')


def test_a_script_call_takes_at_most_4095_events() -> None:
    events = [encode_event(progress_event("u", f"t{n}", progress=1)) for n in range(4096)]
    publish_call(events[:4095], history_size=10, history_ttl=60)
    with pytest.raises(ValueError, match="at most 4095 events"):
        publish_call(events, history_size=10, history_ttl=60)


async def test_publish_many_states_match_the_event_model(redis_url: str) -> None:
    """The script's state updates are those of `TaskEvent.state_update`, which the
    embedded broker applies: the same events leave the same states in both."""
    memory = MemoryBroker(history_size=100, history_ttl=3600)
    broker = RedisBroker(redis_url, history_size=100, history_ttl=3600)

    class Ignore:
        def deliver(self, delivery: Delivery) -> None: ...
        def deliver_all(self, deliveries: Sequence[Delivery]) -> None: ...
        def reset(self) -> None: ...
        def resume_points(self) -> dict[str, EventId | None]:
            return {}

    await broker.start(Ignore())
    try:
        events = lifecycle("model")
        for event in events:
            await memory.publish(event)
        ids = await broker.publish_many(events)
        assert ids == sorted(ids) and all(isinstance(i, EventId) for i in ids)
        for task in ("a", "b", "c"):
            assert await broker.task_state("model", task) == await memory.task_state("model", task)
        assert [t["task_id"] for t in (await broker.snapshot("model")).tasks] == ["a", "b"]
    finally:
        await broker.close()


async def test_publish_many_reaches_every_subscriber_in_order(
    redis_client: TestClient, redis_url: str, token_for: TokenFor, user_id: str
) -> None:
    events = [progress_event(user_id, "job", progress=n, processed_items=n) for n in range(30)]
    events.append(completed_event(user_id, "job", result_data={"n": 30}))
    async with (
        redis_client.ws_connect(f"/ws/tasks/?token={token_for(user_id)}") as first,
        redis_client.ws_connect(f"/ws/tasks/?token={token_for(user_id)}") as second,
        AsyncPublisher(redis_url) as publisher,
    ):
        await ws_json(first)
        await ws_json(second)
        ids = await publisher.publish_many(events)
        for ws in (first, second):
            got = await ws_messages(ws, len(events))
            assert [message["id"] for message in got] == ids
            assert [message.get("progress") for message in got[:-1]] == list(range(30))
            assert got[-1]["type"] == "task_completed" and got[-1]["result_data"] == {"n": 30}


def test_publish_many_trims_the_history_exactly(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STREAMER_HISTORY_SIZE", "5")
    with Publisher(redis_url) as publisher, redis.Redis.from_url(redis_url) as admin:
        ids = publisher.publish_many(
            [progress_event("u", "t", progress=n) for n in range(23)]
        )  # one batch, more than the history holds
        info = admin.xinfo_stream(history_key("u"))
        assert history_ids(admin, "u") == [stream_id(raw) for raw in ids[-5:]]
        assert info["max-deleted-entry-id"].decode() == stream_id(ids[-6])
        assert info["entries-added"] == 23

        more = publisher.publish_many([progress_event("u", "t", progress=n) for n in range(3)])
        info = admin.xinfo_stream(history_key("u"))
        assert history_ids(admin, "u") == [stream_id(raw) for raw in (ids + more)[-5:]]
        assert info["max-deleted-entry-id"].decode() == stream_id(ids[-3])

        singles = [publisher.progress("v", "t", progress=n) for n in range(8)]
        info = admin.xinfo_stream(history_key("v"))
        assert history_ids(admin, "v") == [stream_id(raw) for raw in singles[-5:]]
        assert info["max-deleted-entry-id"].decode() == stream_id(singles[-6])


async def test_publish_many_sends_nothing_when_one_event_is_malformed(redis_url: str) -> None:
    good = progress_event("u", "t", progress=1)
    malformed = [
        dataclasses.replace(good, type="task_bogus"),  # type: ignore[arg-type]
        dataclasses.replace(good, task_id="t\x00shifted"),
        dataclasses.replace(good, user_id="u\nshifted"),  # the channel message's lines
        dataclasses.replace(good, fields={"status": "PROGRESS", "bogus": 1}),
        {"user_id": "u", "task_id": "t"},
        # The same shape as `good` (checked once per shape), with values JSON cannot carry.
        dataclasses.replace(good, fields={**good.fields, "progress": {"a set"}}),
        dataclasses.replace(good, published_at=object()),  # type: ignore[arg-type]
        # Made by hand or with replace: validated as the builders validate.
        TaskEvent("u", "t", "task_progress", {"status": "SUCCESS", "progress": "lots"}),
        TaskEvent("u", "t", "task_completed", {"status": "PROGRESS", "result_data": [1, 2]}),
        dataclasses.replace(good, fields={**good.fields, "progress": 101}),
        dataclasses.replace(good, fields={**good.fields, "current_step": 5}),
        dataclasses.replace(good, fields={"status": "PROGRESS", "result_data": {}}),
        dataclasses.replace(good, user_id=""),
        dataclasses.replace(good, task_id=".."),
        dataclasses.replace(good, published_at="yesterday"),
    ]
    with Publisher(redis_url) as publisher, redis.Redis.from_url(redis_url) as admin:
        with pytest.raises(EventError, match="progress"):
            publisher.publish_many([good, progress_event("u", "t", progress=101)])
        for bad in malformed:
            with pytest.raises((EventError, TypeError)):
                publisher.publish_many([good, bad, good])  # type: ignore[list-item]
            async with AsyncPublisher(redis_url) as async_publisher:
                with pytest.raises((EventError, TypeError)):
                    await async_publisher.publish_many([good, bad])  # type: ignore[list-item]
        assert admin.dbsize() == 0  # not even the epoch: no script ran
        assert publisher.publish_many([]) == []
    for bad in malformed[7:]:  # the embedded broker refuses them too
        with pytest.raises(EventError):
            await MemoryBroker(history_size=10, history_ttl=60).publish(bad)  # type: ignore[arg-type]


def test_an_event_made_by_hand_is_published_as_the_builders_make_it(redis_url: str) -> None:
    by_hand = TaskEvent("u", 42, "task_completed", {"status": "FAILURE"})  # type: ignore[arg-type]
    with Publisher(redis_url) as publisher, redis.Redis.from_url(redis_url) as admin:
        publisher.publish(by_hand)
        state = {k.decode(): v.decode() for k, v in admin.hgetall(task_key("u", "42")).items()}
    assert state["status"] == '"FAILURE"' and state["result_data"] == "{}"
    assert state["task_id"] == '"42"' and state["completed_at"] == f'"{by_hand.published_at}"'
    with pytest.raises(EventError, match="user_id must be 1 to 200 characters"):
        progress_event(10**5000, "t")  # more digits than Python turns into a string
    built = progress_event("u", "t", progress=5)
    with pytest.raises(TypeError, match="cannot be changed once it is built"):
        built.fields["status"] = "SUCCESS"  # type: ignore[index]
    assert built.fields["status"] == "PROGRESS"
    # Its result_data too, all the way down: it was measured against the size limit
    # (5 MB appended to one of its lists was published, and every resume replayed it).
    completed = completed_event("u", "t", result_data={"rows": [], "n": {"deep": [{}]}})
    result = completed.fields["result_data"]
    for change in (
        lambda: result["rows"].append("x" * 5_000_000),
        lambda: result["rows"].extend(["x"]),
        lambda: result["n"].update(more=1),
        lambda: result["n"]["deep"][0].setdefault("k", 1),
        lambda: result["n"]["deep"].__setitem__(0, {}),
        lambda: result.pop("rows"),
    ):
        with pytest.raises(TypeError, match="cannot be changed once it is built"):
            change()
    assert result == {"rows": [], "n": {"deep": [{}]}}
    assert pickle.loads(pickle.dumps(completed)) == completed


async def test_a_batch_larger_than_a_chunk_goes_in_several_script_calls_in_order(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(redis_publishing, "MAX_CHUNK_EVENTS", 7)
    users = ["x", "y", "z"]
    events = [
        progress_event(users[n % 3], f"t{n % 4}", progress=n, processed_items=n) for n in range(50)
    ]
    with redis.Redis.from_url(redis_url) as admin:
        with Publisher(redis_url) as publisher:
            publisher.progress("warm-up", "t", progress=1)
            before = script_calls(admin)
            ids = publisher.publish_many(events)
            assert script_calls(admin) - before == 8  # ceil(50 / 7)
        async with channel_listener(redis_url, users) as received:
            async with AsyncPublisher(redis_url) as async_publisher:
                before = script_calls(admin)
                async_ids = await async_publisher.publish_many(events)
                assert script_calls(admin) - before == 8
            deliveries = await received(len(events))
        for batch in (ids, async_ids):
            for user in users:
                mine = [
                    event_id(raw) for raw, e in zip(batch, events, strict=True) if e.user_id == user
                ]
                assert mine == sorted(set(mine))
        assert [d.event_id for d in deliveries] == [event_id(raw) for raw in async_ids]
        assert stored_state(admin, "y", "t1")["processed_items"] == "49"  # the last one wins


def record_steps(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """What publishing does, in order: `encode <task>` for each event encoded, `send`
    and `reply` for each script call (sync and async runners alike)."""
    steps: list[str] = []
    encode = redis_publishing.encode_event

    def encode_event(event: TaskEvent) -> Any:
        steps.append(f"encode {event.task_id}")
        return encode(event)

    monkeypatch.setattr(redis_publishing, "encode_event", encode_event)
    for runner in (redis_script_runners.PooledScript, redis_script_runners.HeldScript):
        for name in ("_send", "_reply"):
            original = getattr(runner, name)

            def step(*args: Any, _original: Any = original, _name: str = name) -> Any:
                steps.append(_name[1:])
                return _original(*args)

            monkeypatch.setattr(runner, name, step)
    return steps


async def test_each_chunk_is_encoded_while_redis_runs_the_one_before(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(redis_publishing, "MAX_CHUNK_EVENTS", 2)
    events = [progress_event("u", f"t{n}", progress=n) for n in range(5)]
    # A chunk is complete once the event after it is encoded.
    expected = [
        "encode t0", "encode t1", "encode t2", "send",
        "encode t3", "encode t4", "reply", "send",
        "reply", "send",
        "reply",
    ]  # fmt: skip
    with Publisher(redis_url) as publisher:
        publisher.progress("warm-up", "t", progress=1)  # loads the script
        steps = record_steps(monkeypatch)
        ids = publisher.publish_many(events)
        assert steps == expected
    async with AsyncPublisher(redis_url) as async_publisher:
        await async_publisher.progress("warm-up", "t", progress=2)
        steps.clear()
        async_ids = await async_publisher.publish_many(events)
        assert steps == expected
    assert [event_id(raw) for raw in ids + async_ids] == sorted(
        event_id(raw) for raw in ids + async_ids
    )


async def test_nothing_after_a_refused_event_is_sent_even_in_later_chunks(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The next chunk is encoded while Redis runs a chunk, but it is sent only once that
    chunk succeeded."""
    monkeypatch.setattr(redis_publishing, "MAX_CHUNK_EVENTS", 4)
    batch = [progress_event("fine", "t", progress=n) for n in range(12)]
    batch[5] = progress_event("broken", "t", progress=5)  # in the second chunk
    with redis.Redis.from_url(redis_url) as admin:
        admin.set(history_key("broken"), "not a stream")
        with Publisher(redis_url) as publisher:
            publisher.progress("warm-up", "t", progress=1)
            before = script_calls(admin)
            with pytest.raises(BrokerUnavailable, match="event 6 of 12"):
                publisher.publish_many(batch)
            assert script_calls(admin) - before == 2
            assert admin.xlen(history_key("fine")) == 5
        async with AsyncPublisher(redis_url) as async_publisher:
            await async_publisher.progress("warm-up", "t", progress=2)
            before = script_calls(admin)
            with pytest.raises(BrokerUnavailable, match="event 6 of 12"):
                await async_publisher.publish_many(batch)
            assert script_calls(admin) - before == 2
            assert admin.xlen(history_key("fine")) == 10


async def test_a_refused_event_fails_its_caller_alone(redis_url: str) -> None:
    """Redis refuses an event (its user's history key was overwritten): the events
    before it are published, the ones after it are not, and concurrent callers of
    other users are not affected."""
    with redis.Redis.from_url(redis_url) as admin:
        admin.set(history_key("broken"), "not a stream")
        with Publisher(redis_url) as publisher:
            batch = [
                progress_event("fine", "t", progress=1),
                progress_event("broken", "t", progress=1),
                progress_event("fine", "t", progress=2),
            ]
            with pytest.raises(BrokerUnavailable, match="event 2 of 3"):
                publisher.publish_many(batch)
            assert admin.xlen(history_key("fine")) == 1
        async with AsyncPublisher(redis_url) as async_publisher:
            results = await asyncio.gather(
                *(
                    async_publisher.progress(user, "t", progress=3)
                    for user in ("fine", "broken", "also-fine")
                ),
                return_exceptions=True,
            )
        assert isinstance(results[1], BrokerUnavailable), results
        assert isinstance(results[0], str) and isinstance(results[2], str), results
        assert admin.xlen(history_key("fine")) == 2
        assert admin.xlen(history_key("also-fine")) == 1


async def test_publishing_survives_a_script_cache_flush_and_a_dropped_connection(
    redis_url: str,
) -> None:
    with redis.Redis.from_url(redis_url) as admin:
        async with AsyncPublisher(redis_url) as publisher:
            first = await publisher.progress("u", "t", progress=1)
            admin.script_flush()
            second = await publisher.progress("u", "t", progress=2)
            admin.client_kill_filter(_type="normal", skipme=True)
            with contextlib.suppress(BrokerUnavailable):  # unless the connection was checked
                await publisher.progress("u", "t", progress=3)
            third = await publisher.progress("u", "t", progress=4)  # a new connection
        assert event_id(first) < event_id(second) < event_id(third)
        assert stored_state(admin, "u", "t")["progress"] == "4"


async def test_calls_one_after_the_other_share_one_timer(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each call is bounded in time, without a timer of its own: making and cancelling
    one per call (asyncio.timeout) cost a busy publisher about a tenth of its time."""
    async with AsyncPublisher(redis_url) as publisher:
        await publisher.progress("u", "t", progress=0)  # connected, script loaded
        loop = asyncio.get_running_loop()
        timers: list[float] = []
        call_at = loop.call_at

        def counted(when: float, callback: Any, *args: Any, **kwargs: Any) -> asyncio.TimerHandle:
            timers.append(when)
            return call_at(when, callback, *args, **kwargs)

        monkeypatch.setattr(loop, "call_at", counted)
        for progress in range(1, 201):
            await publisher.progress("u", "t", progress=progress % 101)
        assert len(timers) <= 1
    with redis.Redis.from_url(redis_url) as admin:
        assert admin.xlen(history_key("u")) == 201


async def test_a_publisher_keeps_its_connection_in_a_process_with_many_files(
    redis_url: str,
) -> None:
    """Past descriptor 1023 (a server with a thousand clients publishing over HTTP),
    `select` refused the connection's, and every call took it for closed: a new
    connection for each."""
    needed = 1200
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert hard == resource.RLIM_INFINITY or hard >= needed, f"needs {needed} open files"
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, needed), hard))
    held: list[int] = []
    try:
        while not held or held[-1] < 1100:
            held.append(os.open(os.devnull, os.O_RDONLY))
        with redis.Redis.from_url(redis_url) as admin:
            before = admin.info("stats")["total_connections_received"]
            async with AsyncPublisher(redis_url) as publisher:
                for progress in range(20):
                    await publisher.progress("u", "t", progress=progress)
            made = admin.info("stats")["total_connections_received"] - before
        assert made == 1
    finally:
        for descriptor in held:
            os.close(descriptor)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_a_publisher_left_open_carries_on_after_redis_restarts(
    redis_server: RedisServer, redis_url: str
) -> None:
    async with AsyncPublisher(redis_url) as publisher:
        with Publisher(redis_url) as sync_publisher:
            await publisher.progress("u", "t", progress=1)
            sync_publisher.progress("u", "s", progress=1)
            redis_server.stop()
            redis_server.start()  # the same port, an empty dataset
            # The first calls after it succeed.
            await publisher.progress("u", "t", progress=2)
            sync_publisher.progress("u", "s", progress=2)
    with redis.Redis.from_url(redis_url) as admin:
        assert stored_state(admin, "u", "t")["progress"] == "2"
        assert stored_state(admin, "u", "s")["progress"] == "2"


async def test_publishing_goes_to_the_database_of_the_url(redis_url: str) -> None:
    url = redis_url.rsplit("/", 1)[0] + "/3"
    async with AsyncPublisher(url) as publisher:
        await publisher.progress("u", "t", progress=1)
    with Publisher(url) as sync_publisher:
        sync_publisher.progress("u", "t", progress=2)
    with redis.Redis.from_url(url) as admin, redis.Redis.from_url(redis_url) as default:
        assert admin.xlen(history_key("u")) == 2
        assert not default.exists(history_key("u"))
        admin.flushdb()


def test_tasks_rank_by_when_they_started_in_whole_microseconds(redis_url: str) -> None:
    before = time.time_ns() // 1000
    with Publisher(redis_url) as publisher:
        publisher.publish_many([progress_event("ranked", task, progress=1) for task in "xyz"])
        publisher.progress("ranked", "w", progress=1)
    after = time.time_ns() // 1000
    with redis.Redis.from_url(redis_url) as admin:
        ranked = admin.zrange(active_key("ranked"), 0, -1, withscores=True)
    assert [member.decode() for member, _ in ranked] == ["x", "y", "z", "w"]
    scores = [score for _, score in ranked]
    # Whole numbers: Redis keeps them as integers instead of parsing them again and again.
    assert all(score == int(score) for score in scores)
    assert before <= scores[0] < scores[1] < scores[2] < scores[3] <= after + 4


def test_an_async_publisher_used_from_a_second_event_loop_says_so(
    redis_url: str, user_id: str
) -> None:
    """Each asyncio.run makes a new loop (a Celery task calling one, say): redis-py's
    connections of the first fail there with "Event loop is closed"."""
    publisher = AsyncPublisher(redis_url)
    assert asyncio.run(publisher.progress(user_id, "t", progress=1))
    for second_use in (
        lambda: publisher.progress(user_id, "t", progress=2),
        lambda: publisher.is_cancelled(user_id, "t"),
        publisher.close,
    ):
        with pytest.raises(RuntimeError, match="belongs to the event loop it was first used in"):
            asyncio.run(second_use())

    async def one_per_loop(progress: int) -> str:
        async with AsyncPublisher(redis_url) as own:
            return await own.progress(user_id, "t", progress=progress)

    assert asyncio.run(one_per_loop(3)) and asyncio.run(one_per_loop(4))


async def test_is_running_says_whether_a_task_has_a_run_not_finished(
    redis_url: str, user_id: str
) -> None:
    with Publisher(redis_url) as publisher:
        assert publisher.is_running(user_id, "job") is False  # never published
        publisher.progress(user_id, "job", progress=10)
        assert publisher.is_running(user_id, "job") is True
        assert publisher.is_running("someone-else", "job") is False
        publisher.completed(user_id, "job", status="SUCCESS")
        assert publisher.is_running(user_id, "job") is False
        with pytest.raises(EventError):
            publisher.is_running(user_id, "..")
    async with AsyncPublisher(redis_url) as async_publisher:
        await async_publisher.progress(user_id, "again", progress=1)
        assert await async_publisher.is_running(user_id, "again") is True
        assert await async_publisher.is_running(user_id, "job") is False
