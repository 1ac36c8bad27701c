"""Routing by user: a process receives only the events of users it has a connection
for, on its one subscriber connection."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import tracemalloc
from collections.abc import AsyncIterator, Callable, Sequence

import aiohttp
import redis
import redis.asyncio

from streamer.broker.redis import RedisBroker
from streamer.broker.redis_schema import user_channel
from streamer.events import progress_event
from streamer.publisher import AsyncPublisher, Publisher
from streamer.wire import Delivery, EventId

from .conftest import StartGunicorn
from .waiting import eventually

TokenFor = Callable[..., str]


class Recorder:
    def __init__(self) -> None:
        self.users: list[str] = []
        self.ids: list[EventId] = []
        self.reads: list[int] = []  # events per deliver_all call

    def deliver(self, delivery: Delivery) -> None:
        self.users.append(delivery.user_id)

    def deliver_all(self, deliveries: Sequence[Delivery]) -> None:
        self.users += (delivery.user_id for delivery in deliveries)
        self.ids += (delivery.event_id for delivery in deliveries)
        self.reads.append(len(deliveries))

    def reset(self) -> None:
        raise AssertionError("no data loss here")

    def resume_points(self) -> dict[str, EventId | None]:
        return {}


@contextlib.asynccontextmanager
async def recording_broker(redis_url: str) -> AsyncIterator[tuple[RedisBroker, Recorder]]:
    """A started broker handing its events to a `Recorder`."""
    broker = RedisBroker(redis_url, history_size=100, history_ttl=60)
    recorder = Recorder()
    await broker.start(recorder)
    try:
        yield broker, recorder
    finally:
        await broker.close()


async def test_a_process_receives_no_event_of_users_it_has_no_client_for(redis_url: str) -> None:
    async with recording_broker(redis_url) as (broker, recorder):
        await broker.subscribe("here")
        async with AsyncPublisher(redis_url) as publisher:
            for n in range(20):
                await publisher.progress("elsewhere", "t", progress=n)
            await publisher.progress("here", "t", progress=1)
        await eventually(lambda: "here" in recorder.users, what="the subscribed user's event")
        assert broker.subscriber.messages == 1  # not 21: nothing of "elsewhere" came
        assert recorder.users == ["here"]

        # Once the last connection of a user is gone, their events stop coming too.
        broker.unsubscribe("here")
        async with redis.asyncio.Redis.from_url(redis_url) as admin:

            async def unsubscribed() -> bool:
                return bool((await admin.pubsub_numsub(user_channel("here")))[0][1] == 0)

            await eventually(unsubscribed, what="Redis to confirm the UNSUBSCRIBE")
        async with AsyncPublisher(redis_url) as publisher:
            await publisher.progress("here", "t", progress=2)
            await broker.subscribe("other")
            await publisher.progress("other", "t", progress=1)
        await eventually(lambda: recorder.users[-1] == "other", what="the other user's event")
        assert broker.subscriber.messages == 2 and recorder.users == ["here", "other"]


async def test_deployments_on_two_databases_of_one_server_hear_only_their_own_users(
    redis_url: str,
) -> None:
    """Pub/sub channels are shared by all the databases of a Redis server: a process
    on database 5 and one on database 0, each with a client of user "42", get only
    what was published to their own database, from either publisher."""
    other_url = redis_url.rsplit("/", 1)[0] + "/5"
    async with (
        recording_broker(redis_url) as (broker, recorder),
        recording_broker(other_url) as (other_broker, other_recorder),
        AsyncPublisher(other_url) as other_publisher,
    ):
        await broker.subscribe("42")
        await other_broker.subscribe("42")
        theirs = [await other_publisher.progress("42", "t", progress=n) for n in range(3)]
        with Publisher(redis_url) as publisher:
            mine = publisher.progress("42", "t", progress=50)
        await eventually(lambda: len(recorder.ids) == 1, what="the event of database 0")
        await eventually(lambda: len(other_recorder.ids) == 3, what="those of database 5")
        assert [str(i) for i in recorder.ids] == [mine]
        assert [str(i) for i in other_recorder.ids] == theirs
        snapshot = await broker.snapshot("42")
        assert [task["progress"] for task in snapshot.tasks] == [50]
    # Channels of database 0 are named as before: publishers and servers of an earlier
    # version still hear each other there.
    assert user_channel("42") == user_channel("42", 0) == "streamer:u:{42}"
    assert user_channel("42", 5) == "streamer:5:u:{42}"


async def test_a_health_check_interval_in_the_url_leaves_the_subscriber_alone(
    redis_url: str,
) -> None:
    """redis-py's health check (`health_check_interval` in the URL) PINGs before a
    command once the interval has passed and reads the answer itself: on the
    subscriber connection, whose replies the subscriber reads, that read would time
    out and the connection be dropped. Its commands go without it."""
    async with recording_broker(f"{redis_url}?health_check_interval=1") as (broker, recorder):
        await broker.subscribe("early")
        await asyncio.sleep(1.5)  # the interval passes: the next command would check
        started = asyncio.get_running_loop().time()
        await broker.subscribe("late")
        # Not held by a health check's read, which would wait until the subscription's
        # own timeout (10 s).
        assert asyncio.get_running_loop().time() - started < 5
        async with AsyncPublisher(redis_url) as publisher:
            await publisher.progress("late", "t", progress=1)
        await eventually(lambda: recorder.users == ["late"], what="the late user's event")
        assert broker.subscriber.restarts == 0


async def test_users_who_came_and_went_leave_nothing_behind_in_the_subscriber(
    redis_url: str,
) -> None:
    """A long-lived worker sees ever new users come and go: what it keeps for routing
    does not grow with each of them once they are gone (their UNSUBSCRIBE confirmed).
    Two crowds of 3000 users, one after the other: the second one leaves no object
    behind (the first one has grown the tables that both use)."""
    async with (
        recording_broker(redis_url) as (broker, _),
        redis.asyncio.Redis.from_url(redis_url) as admin,
    ):

        async def all_gone() -> bool:
            channels = await admin.pubsub_channels()
            return channels == [b"streamer:control"]

        async def come_and_go(crowd: str) -> None:
            users = [f"{crowd}-{n:05d}-" + "x" * 40 for n in range(3000)]
            await asyncio.gather(*(broker.subscribe(user) for user in users))
            assert len(await admin.pubsub_channels()) == len(users) + 1
            for user in users:
                broker.unsubscribe(user)
            await eventually(all_gone, what="Redis to confirm every UNSUBSCRIBE")

        tracemalloc.start()
        try:
            await come_and_go("first")
            before = tracemalloc.take_snapshot()

            def objects_kept() -> int:
                """Blocks allocated since `before` and still alive (a table that grew
                is still one block)."""
                gc.collect()  # what only waits for the collector is not kept
                stats = tracemalloc.take_snapshot().compare_to(before, "filename")
                mine = (s for s in stats if s.traceback[0].filename != tracemalloc.__file__)
                return sum(stat.count_diff for stat in mine if stat.count_diff > 0)

            await come_and_go("second")
            await eventually(
                lambda: objects_kept() < 500,  # not one or more per user of the crowd
                what="the subscriber to keep nothing of the second crowd",
                interval=0.2,
            )
        finally:
            tracemalloc.stop()


async def test_events_redis_sends_together_reach_the_hub_together(redis_url: str) -> None:
    """One script call PUBLISHes a batch: Redis writes its messages at once, and they are
    handed on in a few calls (one per read), not one per event, in order."""
    async with recording_broker(redis_url) as (broker, recorder):
        await broker.subscribe("reader")
        async with AsyncPublisher(redis_url) as publisher:
            events = [progress_event("reader", "t", progress=n) for n in range(50)]
            published = await publisher.publish_many(events)
        await eventually(lambda: len(recorder.ids) == 50, what="the 50 events")
        assert [str(event_id) for event_id in recorder.ids] == published
        assert sum(recorder.reads) == 50 and len(recorder.reads) < 50


def redis_output_bytes(admin: redis.Redis) -> int:
    return int(admin.info("stats")["total_net_output_bytes"])


async def test_redis_sends_each_event_to_the_processes_that_need_it(
    start_gunicorn: StartGunicorn, redis_url: str, token_for: TokenFor
) -> None:
    """4 workers, 1000 users with one SSE client each, spread over the workers by the
    kernel: Redis sends about one copy of an event per process that has its user, not
    one per process, and each process holds one subscriber connection."""
    workers, users = 4, [f"routed-{n}" for n in range(1000)]
    server, _ = start_gunicorn(workers)
    admin = redis.Redis.from_url(redis_url)

    def every_worker_started() -> bool:  # its subscriber connects as its app starts
        return len(admin.client_list(_type="pubsub")) == workers

    # /readyz answered from one worker; the others may still be starting, and would
    # get none of the streams.
    await eventually(every_worker_started, what=f"{workers} workers' subscribers")
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        streams: list[aiohttp.ClientResponse] = []
        try:
            semaphore = asyncio.Semaphore(100)

            async def open_stream(user: str) -> aiohttp.ClientResponse:
                async with semaphore:
                    url = f"{server.base_url}/sse/tasks/?token={token_for(user)}"
                    response = await session.get(url)
                    assert response.status == 200
                    while b"active_tasks" not in await response.content.readline():
                        pass
                    return response

            streams = list(await asyncio.gather(*(open_stream(u) for u in users)))
            served_by = {r.headers["X-Streamer-Worker"] for r in streams}
            assert len(served_by) == workers, "the kernel put every stream on too few workers"
            pubsub_clients = admin.client_list(_type="pubsub")
            assert len(pubsub_clients) == workers  # one subscriber connection per process

            # The size of one event as a subscriber gets it, and the publisher's share.
            probe = admin.pubsub()
            probe.subscribe(user_channel("probe-user"))
            probe.get_message(timeout=5)
            with Publisher(redis_url) as publisher:
                publisher.progress("probe-user", "t", progress=50, current_step="probe")
                message = probe.get_message(timeout=5)
                assert message is not None and message["type"] == "message"
                probe.close()
                channel = user_channel("probe-user").encode()
                one_copy = len(message["data"]) + len(channel) + 40  # RESP framing, about
                before = redis_output_bytes(admin)
                for n in range(200):
                    publisher.progress(f"nobody-{n}", "t", progress=50, current_step="probe")
                publisher_share = (redis_output_bytes(admin) - before) / 200

                before = redis_output_bytes(admin)
                for user in users:
                    publisher.progress(user, "t", progress=50, current_step="probe")
                per_event = (redis_output_bytes(admin) - before) / len(users) - publisher_share
            # Users and channel names differ in length by a few bytes: "about" one copy.
            assert 0.8 * one_copy <= per_event <= 1.3 * one_copy, (per_event, one_copy)
            assert per_event < workers * one_copy / 2
        finally:
            for stream in streams:
                with contextlib.suppress(Exception):
                    stream.close()
            admin.close()
