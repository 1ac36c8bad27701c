"""Publishing to Redis, the one way `Publisher`, `AsyncPublisher` and `RedisBroker` do it.

Events are checked before anything is sent, then go through the publish script
(`redis_publish_script`) in chunks, in order, one script call per chunk: each chunk is
encoded while Redis runs the one before, and sent once that one succeeded.
Asynchronous callers share a queue per lane (a lane per group of users): the calls made
in one turn of the event loop leave together in the next, and the calls made while the
lane's batch is in flight leave together when it is back. A lone call therefore leaves
at once, and no timer ever holds one back.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import redis.asyncio as aioredis
import redis.asyncio.cluster as aiocluster

from ..events import TaskEvent
from ..wire import EventId
from .base import BrokerUnavailable
from .redis_connect import REDIS_ERRORS, REDIS_ERRORS_OR_TIMEOUT, redis_failure
from .redis_publish_script import (
    CLUSTER_PUBLISH_SCRIPT,
    PUBLISH_SCRIPT,
    EncodedEvent,
    check_event,
    encode_event,
    publish_call,
    publish_reply,
)
from .redis_schema import ScriptCall, user_epoch_key, user_epoch_ttl
from .redis_script_runners import AsyncScriptRunner, SyncScriptRunner, held_script

# A script call blocks Redis while it runs, about 12 microseconds an event on a shared
# 2-core machine: a chunk keeps that stall around 10 ms and bounds one command's size.
# Smaller chunks cost Redis more per event (users' and tasks' work is shared by fewer).
MAX_CHUNK_EVENTS = 1000
MAX_CHUNK_CHARS = 1 << 20


@dataclass(frozen=True)
class HistoryLimits:
    size: int
    ttl: int
    # Under Redis Cluster: one user per script call, their epoch key in their slot.
    per_user: bool = False
    db: int = 0  # the database published to: its users' channels carry its number


class Published(NamedTuple):
    """Ids of published events: each event's epoch and position in its user's stream."""

    epochs: Sequence[str]
    stream_ids: Sequence[str]

    def strings(self) -> list[str]:
        return [
            f"{epoch}-{stream_id}"
            for epoch, stream_id in zip(self.epochs, self.stream_ids, strict=True)
        ]

    def event_ids(self) -> list[EventId]:
        ids = []
        for epoch, stream_id in zip(self.epochs, self.stream_ids, strict=True):
            ms, seq = stream_id.split("-")
            ids.append(EventId(epoch, int(ms), int(seq)))
        return ids


class PublishFailed(BrokerUnavailable):
    """Redis refused one event; those before it were published, none after it."""


def check(events: Iterable[TaskEvent]) -> list[TaskEvent]:
    """Every event checked: a malformed one raises here, before anything is sent."""
    return [check_event(event) for event in events]


def chunks(events: Iterable[TaskEvent], *, per_user: bool = False) -> Iterator[list[EncodedEvent]]:
    """`events` encoded, one chunk (a script call's worth) at a time."""
    chunk: list[EncodedEvent] = []
    chars = 0
    for event in events:
        encoded = encode_event(event)
        if chunk and (
            len(chunk) == MAX_CHUNK_EVENTS
            or chars + len(encoded.text) > MAX_CHUNK_CHARS
            or (per_user and encoded.user_id != chunk[0].user_id)
        ):
            yield chunk
            chunk, chars = [], 0
        chunk.append(encoded)
        chars += len(encoded.text)
    if chunk:
        yield chunk


class _Calls:
    """The script calls publishing `events`, each built when it is taken, and the number
    of events in each."""

    def __init__(self, events: Iterable[TaskEvent], limits: HistoryLimits) -> None:
        self.sizes: list[int] = []
        self._chunks = chunks(events, per_user=limits.per_user)
        self._limits = limits

    def __iter__(self) -> Iterator[ScriptCall]:
        for chunk in self._chunks:
            self.sizes.append(len(chunk))
            yield _call(chunk, self._limits)


def _call(chunk: Sequence[EncodedEvent], limits: HistoryLimits) -> ScriptCall:
    if limits.per_user:
        return publish_call(
            chunk,
            history_size=limits.size,
            history_ttl=limits.ttl,
            epoch_key=user_epoch_key(chunk[0].user_id),
            epoch_ttl=user_epoch_ttl(limits.ttl),
        )
    return publish_call(chunk, history_size=limits.size, history_ttl=limits.ttl, db=limits.db)


def publish_script(limits: HistoryLimits) -> str:
    return CLUSTER_PUBLISH_SCRIPT if limits.per_user else PUBLISH_SCRIPT


def publish_sync(
    script: SyncScriptRunner, events: Sequence[TaskEvent], limits: HistoryLimits
) -> Published:
    """Publish `events` (checked) in order; raise on the first that could not be."""
    epochs: list[str] = []
    stream_ids: list[str] = []
    calls = _Calls(events, limits)
    answered = 0
    with contextlib.closing(script.each(iter(calls))) as replies:
        try:
            for raw in replies:
                reply = publish_reply(raw, calls.sizes[answered])
                answered += 1
                epochs += [reply.epoch] * len(reply.stream_ids)
                stream_ids += reply.stream_ids
                if reply.error is not None:
                    raise _failure(reply.error, len(stream_ids), len(events))
        except REDIS_ERRORS as exc:
            maybe_ran = answered < len(calls.sizes) and script.unanswered
            in_flight = calls.sizes[answered] if maybe_ran else 0
            raise _unavailable(exc, len(stream_ids), len(events), in_flight) from exc
    return Published(epochs, stream_ids)


def _unavailable(
    exc: BaseException, published: int, total: int, in_flight: int
) -> BrokerUnavailable:
    """Redis failed during a call: for a batch, how far it got (a call that was sent
    and not answered may have published its events)."""
    text = f"could not publish to Redis: {redis_failure(exc)}"
    if total == 1 and in_flight:
        text += " (the event may have been published)"
    elif total > 1:
        in_flight = min(in_flight, total - published)
        perhaps = f", perhaps {in_flight} more after them" if in_flight else ""
        text += f" ({published} of {total} events were published{perhaps}; none after "
        text += "those)" if in_flight else "them)"
    return BrokerUnavailable(text)


def _failure(error: str, published: int, total: int) -> PublishFailed:
    if total == 1:
        return PublishFailed(f"could not publish to Redis: {error}")
    return PublishFailed(
        f"could not publish to Redis: {error} (at event {published + 1} of {total}: "
        f"the ones before it were published, none after it)"
    )


_Request = tuple[Sequence[TaskEvent], "asyncio.Future[Published]"]


class _Barrier:
    """A place in a lane's queue where its sender stops (once what was queued before it
    is sent) until a call that spans several lanes is sent."""

    __slots__ = ("reached", "released")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.reached: asyncio.Future[None] = loop.create_future()
        self.released: asyncio.Future[None] = loop.create_future()

    def release(self) -> None:
        if not self.released.done():
            self.released.set_result(None)


# Users are spread over this many queues, each with one batch in flight: while Redis
# runs one queue's batch, this process prepares the other's. A user always has the
# same queue, so each user's events keep their order.
LANES = 2
# Under Redis Cluster a script call carries one user's events: more lanes keep more
# calls in flight (to every master at once) instead of one user after another.
CLUSTER_LANES = 16


class PublishQueue:
    """Auto-batching for asyncio: concurrent `publish` calls share script calls."""

    def __init__(
        self,
        client: aioredis.Redis | aiocluster.RedisCluster,
        limits: HistoryLimits,
        lanes: int | None = None,
    ) -> None:
        script = publish_script(limits)
        if lanes is None:
            lanes = CLUSTER_LANES if limits.per_user else LANES
        self._lanes = [_Lane(held_script(client, script), limits) for _ in range(lanes)]
        self._crossing: set[asyncio.Task[None]] = set()

    async def publish(self, events: Sequence[TaskEvent]) -> Published:
        """Publish `events` (of any users, checked) in order. Events of users of several
        lanes wait for what those lanes hold and hold them meanwhile: a user's events
        published after them by another call must not overtake them."""
        if not events:
            return Published([], [])
        lanes = self._lanes
        first = self._lane_of(events[0].user_id)
        others = {self._lane_of(user) for user in {event.user_id for event in events}} - {first}
        if not others:
            return await lanes[first].publish(events)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Published] = loop.create_future()
        # Every lane's barrier now, in this call: two such calls hold their lanes in the
        # same order, and a call made after this one for the first lane waits too.
        barriers = [lanes[index].barrier() for index in (first, *sorted(others))]
        crossing = loop.create_task(lanes[first].publish_after(barriers, events, future))
        self._crossing.add(crossing)
        crossing.add_done_callback(self._crossing.discard)
        return await future

    def _lane_of(self, user_id: str) -> int:
        return zlib.crc32(user_id.encode()) % len(self._lanes)

    async def close(self) -> None:
        """Wait until everything queued has been sent, then give the connections back."""
        while self._crossing:
            await asyncio.wait(self._crossing)
        for lane in self._lanes:
            await lane.close()


class _Lane:
    def __init__(self, script: AsyncScriptRunner, limits: HistoryLimits) -> None:
        self._script = script
        self._limits = limits
        self._queue: list[_Request | _Barrier] = []
        self._sender: asyncio.Task[None] | None = None

    async def publish(self, events: Sequence[TaskEvent]) -> Published:
        future: asyncio.Future[Published] = asyncio.get_running_loop().create_future()
        self._queue.append((events, future))
        self._start_sender()
        return await future

    def barrier(self) -> _Barrier:
        barrier = _Barrier(asyncio.get_running_loop())
        self._queue.append(barrier)
        self._start_sender()
        return barrier

    async def publish_after(
        self,
        barriers: Sequence[_Barrier],
        events: Sequence[TaskEvent],
        future: asyncio.Future[Published],
    ) -> None:
        """Publish `events` (for `future`) on this lane's connection once every lane
        they span (this one too) is held at its one of `barriers`; release them once
        it is done."""
        try:
            reached = [held.reached for held in barriers]
            await asyncio.wait(reached)
            # Not sent if a lane's sender was cancelled (its caller's wait is cancelled
            # below), nor for a caller that gave up meanwhile.
            if not any(held.cancelled() for held in reached) and not future.cancelled():
                try:
                    await self._send([(events, future)])
                except BaseException as exc:
                    _fail(future, exc)
                    if not isinstance(exc, Exception):
                        raise
        finally:
            if not future.done():  # not sent
                future.cancel()
            for held in barriers:
                held.release()

    def _start_sender(self) -> None:
        if self._sender is None:
            # Starts in the loop's next turn: the calls made in this one join the batch.
            self._sender = asyncio.create_task(self._send_queued())

    async def close(self) -> None:
        while self._sender is not None:
            await asyncio.wait([self._sender])  # its callers get its outcome, not close()
        await self._script.close()

    async def _send_queued(self) -> None:
        queue = self._queue
        try:
            while queue:
                first = queue[0]
                if isinstance(first, _Barrier):
                    del queue[0]
                    if not first.reached.done():
                        first.reached.set_result(None)
                    await first.released
                    continue
                end = next((n for n, item in enumerate(queue) if isinstance(item, _Barrier)), None)
                batch = [
                    item
                    for item in queue[:end]
                    if not isinstance(item, _Barrier) and not item[1].cancelled()
                ]
                del queue[:end]
                try:
                    if batch:
                        await self._send(batch)
                except BaseException as exc:
                    for _, future in batch:
                        _fail(future, exc)
                    if not isinstance(exc, Exception):
                        raise
                if not queue:
                    # The callers just answered run in the loop's next turn: a next call
                    # of theirs finds this sender still there (a task less per batch).
                    await asyncio.sleep(0)
        except BaseException:
            for item in queue:
                if isinstance(item, _Barrier):
                    item.reached.cancel()
                else:
                    item[1].cancel()
            queue.clear()
            raise
        finally:
            self._sender = None

    async def _send(self, batch: list[_Request]) -> None:
        events = batch[0][0] if len(batch) == 1 else [e for request in batch for e in request[0]]
        epochs: list[str] = []
        stream_ids: list[str] = []
        waiting = iter(batch)
        request, done = next(waiting, None), 0  # the first request not answered yet
        calls = _Calls(events, self._limits)
        async with contextlib.aclosing(self._script.each(iter(calls))) as replies:
            for number in itertools.count():
                try:
                    raw = await anext(replies, _NO_MORE)
                except REDIS_ERRORS_OR_TIMEOUT as exc:
                    # Each request not answered: how far it got, and how many of its
                    # events the call in flight held (it may have run).
                    maybe_ran = number < len(calls.sizes) and self._script.unanswered
                    in_flight = calls.sizes[number] if maybe_ran else 0
                    published, start = len(stream_ids), done
                    pending = itertools.chain([] if request is None else [request], waiting)
                    for events_of, future in pending:
                        end = start + len(events_of)
                        sent = max(0, min(end, published) - start)
                        perhaps = max(0, min(end, published + in_flight) - max(start, published))
                        _fail(future, _unavailable(exc, sent, len(events_of), perhaps))
                        start = end
                    raise _unavailable(exc, 0, 1, 0) from exc
                if raw is _NO_MORE:
                    return
                reply = publish_reply(raw, calls.sizes[number])
                epochs += [reply.epoch] * len(reply.stream_ids)
                stream_ids += reply.stream_ids
                # Callers whose events are all published get their ids now.
                while request is not None and done + len(request[0]) <= len(stream_ids):
                    start, done = done, done + len(request[0])
                    if not request[1].done():
                        result = Published(epochs[start:done], stream_ids[start:done])
                        request[1].set_result(result)
                    request = next(waiting, None)
                if reply.error is not None:
                    assert request is not None
                    events_sent = len(stream_ids) - done
                    _fail(request[1], _failure(reply.error, events_sent, len(request[0])))
                    # Nothing of the requests after it was sent: they go again.
                    self._queue[0:0] = list(waiting)
                    return


_NO_MORE = object()


def _fail(future: asyncio.Future[Published], exc: BaseException) -> None:
    if future.done():
        return
    if isinstance(exc, Exception):
        future.set_exception(exc)
    else:
        future.cancel()
