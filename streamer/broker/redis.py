"""The Redis broker: state, history and publishing in Redis, and the process's one
subscriber connection (`redis_subscriber`), routed to the users with connections here."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable, Coroutine, Iterable, Set
from typing import Any, ParamSpec, TypeVar, cast

import redis.asyncio.cluster as aiocluster
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from ..events import TaskEvent, TaskState
from ..wire import Delivery, EventId, UndecodableEvent, stored_event
from .base import Broker, BrokerUnavailable, Listener, Replay, Snapshot
from .redis_cluster import UserFence, is_cluster_url
from .redis_cluster_subscriber import ClusterSubscriber
from .redis_connect import (
    REDIS_ERRORS,
    REDIS_ERRORS_OR_TIMEOUT,
    AsyncClient,
    database,
    drop_closed_idle_connections,
    fence_failover,
    is_sentinel_url,
    redis_client,
    redis_failure,
)
from .redis_publish_script import check_event
from .redis_publishing import HistoryLimits, PublishQueue, check
from .redis_schema import (
    CANCEL_SCRIPT,
    EPOCH_KEY,
    REPLAY_SCRIPT,
    SNAPSHOT_SCRIPT,
    cancel_call,
    cancel_key,
    decode_message,
    decode_state,
    history_key,
    snapshot_call,
    task_key,
    user_channel,
    user_epoch_key,
    user_epoch_ttl,
    user_fence_key,
)
from .redis_subscriber import Subscriber

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")


def _unavailable_on_error(
    method: Callable[P, Coroutine[Any, Any, R]],
) -> Callable[P, Coroutine[Any, Any, R]]:
    """Redis and socket errors become BrokerUnavailable, the interface's one failure."""

    @functools.wraps(method)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await method(*args, **kwargs)
        except REDIS_ERRORS as exc:
            raise BrokerUnavailable(f"Redis is unavailable: {redis_failure(exc)}") from exc

    return wrapper


REDIS_POOL_SIZE = 50
REDIS_POOL_WAIT_S = 10.0
# A command with no answer by then (a partition, a stalled server) fails as unavailable
# instead of holding its caller, a client's command loop say, for good.
REDIS_COMMAND_TIMEOUT_S = 10.0
IDLE_PING_S = 15.0
# The longest a start waits for Redis (the epoch, the subscriber) before the process
# serves: a stalled Redis must not keep a starting or reloaded worker from answering
# (its health check included); what was not read by then is read later.
STARTUP_WAIT_S = 3.0
PONG_TIMEOUT_S = 10.0


def _nothing() -> None:
    pass


class RedisBroker(Broker):
    def __init__(
        self,
        url: str,
        *,
        history_size: int,
        history_ttl: int,
        idle_ping_s: float = IDLE_PING_S,
        pong_timeout_s: float = PONG_TIMEOUT_S,
        on_undecodable: Callable[[], None] = lambda: None,
    ) -> None:
        self._url = url
        self._sentinel = is_sentinel_url(url)
        # Under Redis Cluster each user has an epoch of their own (`redis_schema`).
        self._cluster = is_cluster_url(url)
        self._user_epochs: dict[str, str | None] = {}
        self._users_here: set[str] = set()
        self._user_fence: UserFence | None = None
        self._on_undecodable = on_undecodable
        self._history_size = history_size
        self._history_ttl = history_ttl
        self._idle_ping_s = idle_ping_s
        self._pong_timeout_s = pong_timeout_s
        self._client: AsyncClient | None = None
        self._subscriber: Subscriber | ClusterSubscriber | None = None
        self._subscriber_task: asyncio.Task[None] | None = None
        self._listener: Listener | None = None
        # The epoch of the Redis dataset events came from; a new one means Redis
        # lost its data (flushed, or restarted without persistence).
        self._epoch: str | None = None
        self._db = 0  # the database of the URL: its users' channels carry its number

    @property
    def client(self) -> AsyncClient:
        if self._client is None:
            raise RuntimeError("RedisBroker.start() has not been called")
        return self._client

    @property
    def reconnects(self) -> int:
        return 0 if self._subscriber is None else self._subscriber.reconnects

    @property
    def subscriber(self) -> Subscriber | ClusterSubscriber:
        if self._subscriber is None:
            raise RuntimeError("RedisBroker.start() has not been called")
        return self._subscriber

    async def start(self, listener: Listener) -> None:
        # A burst of (re)connecting clients all read their snapshot at once: they
        # queue for a bounded set of connections instead of failing.
        self._client = redis_client(
            self._url,
            blocking=True,
            max_connections=REDIS_POOL_SIZE,
            timeout=REDIS_POOL_WAIT_S,
            socket_connect_timeout=5,
            socket_timeout=REDIS_COMMAND_TIMEOUT_S,
            health_check_interval=30,
        )
        self._db = database(self._client)
        limits = HistoryLimits(
            size=self._history_size, ttl=self._history_ttl, per_user=self._cluster, db=self._db
        )
        self._publishing = PublishQueue(self._client, limits)
        self._cancel_script = self._client.register_script(CANCEL_SCRIPT)
        self._snapshot_script = self._client.register_script(SNAPSHOT_SCRIPT)
        self._replay_script = self._client.register_script(REPLAY_SCRIPT)
        self._listener = listener
        deadline = asyncio.get_running_loop().time() + STARTUP_WAIT_S
        if isinstance(self._client, aiocluster.RedisCluster):
            self._user_fence = UserFence(self._client, ttl_s=user_epoch_ttl(self._history_ttl))
        else:
            with contextlib.suppress(*REDIS_ERRORS, TimeoutError):
                async with asyncio.timeout_at(deadline):
                    self._epoch = await self._read_epoch()
        subscriber_class = ClusterSubscriber if self._cluster else Subscriber
        self._subscriber = subscriber_class(
            self._url,
            on_messages=self._on_messages,
            on_restored=self._catch_up,
            idle_ping_s=self._idle_ping_s,
            pong_timeout_s=self._pong_timeout_s,
        )
        self._subscriber_task = asyncio.create_task(
            self._subscriber.run(), name="streamer-redis-subscriber"
        )
        # Wait briefly for the subscriber so that /readyz is right from the start, but
        # do not refuse to start while Redis is down: the subscriber keeps retrying
        # and /readyz reports not ready meanwhile.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(deadline):
                await self._subscriber.ready.wait()

    async def close(self) -> None:
        if self._subscriber_task is not None:
            self._subscriber_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._subscriber_task
        if self._client is not None:
            await self._publishing.close()
            await self._client.aclose()

    async def subscribe(self, user_id: str) -> None:
        self._users_here.add(user_id)
        await self.subscriber.subscribe(user_channel(user_id, self._db))

    def unsubscribe(self, user_id: str) -> None:
        self._users_here.discard(user_id)
        self._user_epochs.pop(user_id, None)
        self.subscriber.unsubscribe(user_channel(user_id, self._db))

    def _on_messages(self, messages: list[bytes]) -> None:
        """Events read together from the users' channels, handed on together."""
        listener = self._listener
        assert listener is not None
        arrived: list[Delivery] = []

        def before_reset() -> None:  # what came before goes out before its clients resync
            _deliver_all(listener, arrived)
            arrived.clear()

        for data in messages:
            delivery = decode_message(data)
            if delivery is None:
                log.warning("ignoring a malformed message on a user's channel")
                continue
            epoch = delivery.event_id.epoch
            if self._cluster:
                self._check_user_epoch(listener, delivery.user_id, epoch, before_reset)
            else:
                self._check_epoch(listener, epoch, before_reset)
            arrived.append(delivery)
        _deliver_all(listener, arrived)

    def _check_epoch(
        self, listener: Listener, epoch: str | None, before_reset: Callable[[], None] = _nothing
    ) -> bool:
        """Tell the listener when the dataset changed under us; True if it did."""
        lost = self._epoch is not None and epoch != self._epoch
        if lost:
            log.warning("redis lost its data (epoch %s -> %s): clients resync", self._epoch, epoch)
            before_reset()
            listener.reset()
        # None (Redis empty, nothing published yet) is remembered too, so the first
        # epoch of the new dataset does not count as a second loss.
        self._epoch = epoch
        return lost

    def _check_user_epoch(
        self,
        listener: Listener,
        user_id: str,
        epoch: str | None,
        before_reset: Callable[[], None] = _nothing,
    ) -> bool:
        """`_check_epoch` for one user's epoch (Redis Cluster)."""
        known = self._user_epochs.get(user_id)
        lost = known is not None and epoch != known
        if lost:
            log.warning("redis lost user data (epoch %s -> %s): their clients resync", known, epoch)
            before_reset()
            listener.reset(user_id)
        if user_id in self._users_here:
            self._user_epochs[user_id] = epoch
        return lost

    async def _catch_up(self, channels: Set[str]) -> None:
        client = self.client
        if isinstance(client, aiocluster.RedisCluster):
            await self._catch_up_users(channels)
        else:
            # Idle pooled connections may lead to a server that went away meanwhile: the
            # first command on each would fail (redis-py retries none), this one first.
            with contextlib.suppress(*REDIS_ERRORS_OR_TIMEOUT):  # closing a dead one
                await drop_closed_idle_connections(client.connection_pool)
            await self._catch_up_all()

    async def _catch_up_users(self, channels: Set[str]) -> None:
        """`_catch_up_all` under Redis Cluster, for the users of `channels` (those of one
        shard), each with their own epoch."""
        listener = self._listener
        assert listener is not None
        for user_id, oldest in listener.resume_points().items():
            if user_channel(user_id, self._db) not in channels:
                continue
            await self._fence_user(user_id)
            epoch = _text(await self.client.get(user_epoch_key(user_id)))
            if self._check_user_epoch(listener, user_id, epoch) or epoch is None:
                continue
            await self._catch_up_user(listener, user_id, epoch, oldest)

    async def _fence_user(self, user_id: str) -> None:
        if self._user_fence is not None and await self._user_fence.check(
            user_epoch_key(user_id), user_fence_key(user_id)
        ):
            log.warning("redis master of a user's slot changed (failover): their clients resync")

    async def _catch_up_all(self) -> None:
        """Deliver what local connections missed while the subscription was down.

        Each user's history is read from the oldest id one of their connections has
        (connections drop what they already have), so no clock is involved. If
        Redis lost its data meanwhile there is nothing to catch up from: clients
        get a fresh snapshot instead.
        """
        listener = self._listener
        assert listener is not None
        epoch = await self._read_epoch()
        if self._check_epoch(listener, epoch) or epoch is None:
            return
        for user_id, oldest in listener.resume_points().items():
            await self._catch_up_user(listener, user_id, epoch, oldest)

    async def _catch_up_user(
        self, listener: Listener, user_id: str, epoch: str, oldest: EventId | None
    ) -> None:
        """Deliver the user's history after `oldest` (all of it for None). When events
        after `oldest` were trimmed meanwhile, their clients resync instead."""
        if oldest is None:
            deliveries = await self._read_history(user_id, epoch, "-")
        else:
            caught_up = await self._history_after(user_id, oldest)
            if not caught_up.complete:
                if not await self.client.exists(history_key(user_id)):
                    return  # nothing was published for them for the history's TTL
                log.warning("user %r missed more than their history holds: resync", user_id)
                listener.reset(user_id)
                return
            deliveries = caught_up.events
        for delivery in deliveries:
            try:
                listener.deliver(delivery)
            except Exception:  # one user's data never stalls the others
                log.exception("catch-up of user %r failed at %s", user_id, delivery.event_id)
                break

    async def _read_epoch(self) -> str | None:
        await self._fence()
        return _text(await self.client.get(EPOCH_KEY))

    async def _fence(self) -> None:
        """Behind Sentinel: a master other than the one the epoch began under may lack
        events the old one acknowledged; a new epoch makes clients resync."""
        client = self.client
        if self._sentinel and isinstance(client, Redis) and await fence_failover(client, EPOCH_KEY):
            log.warning("redis master changed (failover): new epoch, clients resync")

    async def _read_history(self, user_id: str, epoch: str | None, start: str) -> list[Delivery]:
        if epoch is None:
            return []
        entries = await self.client.xrange(history_key(user_id), min=start, max="+")
        return self._to_deliveries(user_id, epoch, entries)

    def _to_deliveries(self, user_id: str, epoch: str, entries: Any) -> list[Delivery]:
        """History entries as deliveries; one that cannot be read is one bad entry:
        logged, counted and skipped, never a reason to fail or retry the whole read."""
        deliveries = []
        for stream_id, fields in entries or ():
            ms, seq = _require_text(stream_id).split("-")
            event_id = EventId(epoch, int(ms), int(seq))
            try:
                raw = fields.get(b"e", b"").decode()
                deliveries.append(stored_event(user_id, event_id, raw))
            except (UndecodableEvent, UnicodeDecodeError) as exc:
                log.warning("skipping an undecodable history entry: %s", exc)
                self._on_undecodable()
        return deliveries

    @_unavailable_on_error
    async def publish(self, event: TaskEvent) -> EventId:
        return (await self._publishing.publish([check_event(event)])).event_ids()[0]

    @_unavailable_on_error
    async def publish_many(self, events: Iterable[TaskEvent]) -> list[EventId]:
        return (await self._publishing.publish(check(events))).event_ids()

    @_unavailable_on_error
    async def snapshot(
        self, user_id: str, task_id: str | None = None, *, at_least: EventId | None = None
    ) -> Snapshot:
        await self._fence_user(user_id)
        call = snapshot_call(
            user_id,
            task_id,
            history_ttl=self._history_ttl,
            per_user_epoch=self._cluster,
            at_least=at_least,
        )
        raw_states, raw_position, raw_epoch, truncated = await self._snapshot_script(
            keys=call.keys, args=call.args
        )
        states = (decode_state(_pairs(raw)) for raw in raw_states)
        position = EventId.parse(f"{_require_text(raw_epoch)}-{_require_text(raw_position)}")
        if position is None:
            raise BrokerUnavailable(f"Redis returned a malformed position: {raw_position!r}")
        # The snapshot may have begun the epoch (Redis was empty): a later loss of this
        # data must be noticed as one.
        if self._cluster and user_id in self._users_here:
            if self._user_epochs.get(user_id) is None:  # unknown, or none in Redis then
                self._user_epochs[user_id] = position.epoch
        elif not self._cluster and self._epoch is None:
            self._epoch = position.epoch
        tasks = [state for state in states if state is not None]
        return Snapshot(tasks, position, truncated=bool(truncated))

    @_unavailable_on_error
    async def task_state(self, user_id: str, task_id: str) -> TaskState | None:
        raw = cast(_RawHash, await self.client.hgetall(task_key(user_id, task_id)))
        if raw.get(b"user_id") != user_id.encode():
            return None  # unknown, or (defence in depth) someone else's
        return decode_state(raw)

    @_unavailable_on_error
    async def request_cancel(self, user_id: str, task_id: str) -> bool:
        call = cancel_call(user_id, task_id)
        return bool(await self._cancel_script(keys=call.keys, args=call.args))

    @_unavailable_on_error
    async def is_cancelled(self, user_id: str, task_id: str) -> bool:
        return bool(await self.client.exists(cancel_key(user_id, task_id)))

    @_unavailable_on_error
    async def replay(self, user_id: str, after: str, limit: int | None = None) -> Replay:
        resume_point = EventId.parse(after)
        if resume_point is None:
            return Replay([], complete=False)
        # A resume from before a failover is not recovered.
        if self._cluster:
            await self._fence_user(user_id)
        else:
            await self._fence()
        return await self._history_after(user_id, resume_point, limit)

    async def _history_after(
        self, user_id: str, resume_point: EventId, limit: int | None = None
    ) -> Replay:
        """The user's events after `resume_point`; incomplete when some may be missing
        (another epoch, the history gone, trimmed past the point, or the point lost with
        data Redis no longer has)."""
        key = history_key(user_id)
        epoch_key = user_epoch_key(user_id) if self._cluster else EPOCH_KEY
        # The range is read before the trim marker (XINFO): a trim in between can
        # only make the answer more cautious, never hide a gap.
        try:
            epoch_raw, raw_entries, exists, here = await self._replay_script(
                keys=[epoch_key, key],
                args=[resume_point.stream_id, *([] if limit is None else [limit])],
            )
        except ResponseError:  # an id Redis cannot use is an unknown id
            return Replay([], complete=False)
        entries = [(stream_id, _pairs(fields)) for stream_id, fields in raw_entries]
        if _text(epoch_raw) != resume_point.epoch or not exists:
            return Replay([], complete=False)
        try:
            info = await self.client.xinfo_stream(key)
        except ResponseError:  # the key expired in between
            return Replay([], complete=False)
        last_generated = _stream_id(info.get("last-generated-id"))
        max_deleted = _stream_id(info.get("max-deleted-entry-id"))
        point = (resume_point.ms, resume_point.seq)
        if last_generated is not None and point > last_generated:
            return Replay([], complete=False)
        if max_deleted is not None and max_deleted > point:
            return Replay([], complete=False)
        if not here and max_deleted != point:
            # Neither an entry nor deleted (trimmed, or a snapshot's placeholder): Redis
            # restarted from a save older than the point, and what came after the save
            # is gone, though events published since then follow it.
            return Replay([], complete=False)
        last_read = None
        if entries and (last := _stream_id(entries[-1][0])) is not None:
            last_read = EventId(resume_point.epoch, *last)
        events = self._to_deliveries(user_id, resume_point.epoch, entries)
        return Replay(events, complete=True, read=len(entries), last_read=last_read)

    async def ready(self) -> bool:
        if not self.subscriber.ready.is_set():
            return False
        try:
            return bool(await asyncio.wait_for(self.client.ping(), timeout=2))
        except REDIS_ERRORS_OR_TIMEOUT:
            return False


def _deliver_all(listener: Listener, deliveries: list[Delivery]) -> None:
    if not deliveries:
        return
    try:
        listener.deliver_all(deliveries)
    except Exception:  # events never take the subscription down
        log.exception("delivering %d events failed", len(deliveries))


def _stream_id(raw: object) -> tuple[int, int] | None:
    if isinstance(raw, bytes):
        raw = raw.decode()
    if not isinstance(raw, str) or "-" not in raw:
        return None
    ms, seq = raw.split("-", 1)
    return int(ms), int(seq)


_RawHash = dict[bytes, bytes]


def _pairs(flat: list[bytes]) -> _RawHash:
    """HGETALL's reply inside a script is a flat [field, value, ...] list."""
    return dict(zip(flat[::2], flat[1::2], strict=True))


def _text(raw: object) -> str | None:
    if raw is None:
        return None
    return _require_text(raw)


def _require_text(raw: object) -> str:
    if isinstance(raw, bytes):
        return raw.decode()
    if isinstance(raw, str):
        return raw
    raise BrokerUnavailable(f"unexpected reply from Redis: {raw!r}")
