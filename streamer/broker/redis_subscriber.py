"""The process's one Redis subscriber connection, subscribed to the channels of the
users that have a connection here (and nothing else).

Routing by user: a process receives only the events of its own users, so Redis sends
each event once per process that needs it, not once per process. Channels are
subscribed and unsubscribed as users come and go (the hub counts their connections),
in batches when many come at once, on the same one connection. `subscribe()` returns
once Redis confirmed the subscription, so that a client never misses an event
published between its connect and its snapshot. What Redis sends is read by a
`PushReader`; the events of one read are handed on together.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Set
from typing import Any

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError

from .base import BrokerUnavailable
from .outage_log import OutageLog
from .redis_connect import (
    MASTER_CHECK_S,
    REDIS_ERRORS,
    REDIS_ERRORS_OR_TIMEOUT,
    current_master,
    redis_client,
    redis_failure,
    watches_master,
)
from .redis_push_reader import PushReader, Reply

log = logging.getLogger(__name__)

# Always subscribed, so that the connection is in subscriber mode (and answers PING
# as such) even while no user has a connection here.
CONTROL_CHANNEL = "streamer:control"
COMMAND_BATCH = 1000
RECONNECT_BACKOFF_MIN_S = 0.1
RECONNECT_BACKOFF_MAX_S = 5.0
UNREACHABLE_RETRY_S = 1.0  # the longest wait between attempts while Redis is down
# How long a new client waits for its user's subscription (the connection may be
# reconnecting) before it is told to come back later.
SUBSCRIBE_TIMEOUT_S = 10.0
_SUBSCRIPTION_LOST: tuple[type[Exception], ...] = (*REDIS_ERRORS, BrokerUnavailable)
_EVENT = frozenset({b"message", b"smessage"})
_CONFIRMATION = frozenset({b"subscribe", b"unsubscribe", b"ssubscribe", b"sunsubscribe"})


class Rerouted(BrokerUnavailable):
    """The channel's shard changed while its subscription was awaited (Redis Cluster)."""


class Subscriber:
    """The subscriber connection to one Redis server (under Redis Cluster, to one
    master, with `sharded`: users' channels are shard channels, SSUBSCRIBEd)."""

    def __init__(
        self,
        url: str,
        *,
        on_messages: Callable[[list[bytes]], None],
        on_restored: Callable[[Set[str]], Awaitable[None]],
        idle_ping_s: float,
        pong_timeout_s: float,
        make_client: Callable[..., aioredis.Redis] | None = None,
        sharded: bool = False,
        catch_up_first: bool = False,
        on_moved: Callable[[], None] = lambda: None,
    ) -> None:
        self._url = url
        self._make_client = make_client
        self._sharded = sharded
        # A shard subscriber that replaces another catches up on its first connect too.
        self._catch_up_first = catch_up_first
        self._on_moved = on_moved
        self._on_messages = on_messages
        self._on_restored = on_restored
        self._idle_ping_s = idle_ping_s
        self._pong_timeout_s = pong_timeout_s
        self.wanted: set[str] = set()
        # On the current connection: the last command sent per channel (True:
        # SUBSCRIBE), how many are still unconfirmed, and what is confirmed.
        self._requested: dict[str, bool] = {}
        self._unconfirmed: dict[str, int] = {}
        self._active: set[str] = set()
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._pubsub: PubSub | None = None
        self._reader: PushReader | None = None
        self._held: list[bytes] | None = None  # events that wait for the catch-up
        self._heard = asyncio.Event()  # set by every read
        self._sync_scheduled = False
        self._syncing: asyncio.Future[None] | None = None
        self._last_heard = 0.0
        self._pool: object = None
        self.ready = asyncio.Event()  # connected, every wanted channel subscribed
        # The last attempt to connect failed: Redis is down, not merely reconnecting.
        self.unreachable = False
        self._reached = False  # this attempt connected (what came after may have failed)
        self._abandoned = False
        self.restarts = 0  # attempts after the first, failed ones included
        self._outage = OutageLog(log)
        self.reconnects = 0  # subscriptions lost and opened again
        self._opened = False  # once: later openings are reconnections
        self.messages = 0  # events received, of every user

    # --- what the broker calls -----------------------------------------------------------

    async def subscribe(self, channel: str) -> None:
        if self._abandoned:  # a call made before the subscriber was replaced
            raise Rerouted("the channel moved to another shard")
        if self.unreachable and channel not in self._active:
            # Refused now rather than after SUBSCRIBE_TIMEOUT_S, which during an outage
            # would hold every opening stream that long.
            raise BrokerUnavailable("Redis is unreachable")
        self.wanted.add(channel)
        if channel in self._active:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(channel, []).append(waiter)
        self._schedule_sync()
        try:
            await asyncio.wait_for(asyncio.shield(waiter), SUBSCRIBE_TIMEOUT_S)
        except TimeoutError:
            raise BrokerUnavailable("Redis did not confirm the subscription in time") from None
        finally:
            waiters = self._waiters.get(channel)
            if waiters is not None and waiter in waiters:
                waiters.remove(waiter)
                if not waiters:
                    del self._waiters[channel]

    def unsubscribe(self, channel: str) -> None:
        self.wanted.discard(channel)
        self._schedule_sync()

    def abandon(self) -> None:
        """This subscriber is being replaced: whoever awaits a subscription here is told
        to ask again (of the subscriber that now holds the channel), now or later."""
        self._abandoned = True
        for waiters in self._waiters.values():
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(Rerouted("the channel moved to another shard"))
        self._waiters.clear()

    def _unreachable(self) -> None:
        """An attempt to connect failed: streams waiting for a subscription are refused
        now, as are the next ones until an attempt succeeds."""
        self.unreachable = True
        for waiters in self._waiters.values():
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(BrokerUnavailable("Redis is unreachable"))

    def _client(self, **settings: Any) -> aioredis.Redis:
        if self._make_client is not None:
            return self._make_client(**settings)
        client = redis_client(self._url, **settings)
        assert isinstance(client, aioredis.Redis), "a Redis Cluster takes ClusterSubscriber"
        return client

    async def run(self) -> None:
        """Stay subscribed until cancelled, reconnecting with backoff."""
        backoff = RECONNECT_BACKOFF_MIN_S
        while True:
            # Errors must surface here, not be retried inside redis-py, so that each
            # reconnect is followed by a catch-up from the history.
            client = self._client(
                socket_connect_timeout=5,
                socket_keepalive=True,
                retry=Retry(NoBackoff(), 0),
                protocol=2,  # the replies `_on_replies` reads are RESP2's
            )
            self._pool = client.connection_pool
            pubsub = client.pubsub()
            self._reached = False
            try:
                await self._connect(pubsub)
                backoff = RECONNECT_BACKOFF_MIN_S
                await self._listen(pubsub)
            except _SUBSCRIPTION_LOST as exc:
                self._outage.failed(
                    f"redis subscription lost ({redis_failure(exc)}); "
                    f"retrying in {self._retry_delay(backoff):.1f}s"
                )
            except Exception:
                self._outage.failed(
                    f"redis subscriber failed; reconnecting in {self._retry_delay(backoff):.1f}s",
                    level=logging.ERROR,
                    exc_info=True,
                )
            finally:
                if not self._reached and not self._sharded:
                    # (A shard's master that cannot be reached is failed over: those
                    # who wait are sent to the new one.)
                    self._unreachable()
                self._disconnected()
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
                with contextlib.suppress(Exception):
                    await client.aclose()
            self.restarts += 1
            await asyncio.sleep(self._retry_delay(backoff))
            backoff = min(backoff * 2, RECONNECT_BACKOFF_MAX_S)

    def _retry_delay(self, backoff: float) -> float:
        """While Redis cannot be reached, streams are refused: tried again as soon as
        refused clients come back (Retry-After: 1), not after a longer backoff."""
        unreachable = self.unreachable or (not self._reached and not self._sharded)
        return min(backoff, UNREACHABLE_RETRY_S) if unreachable else backoff

    # --- inside ----------------------------------------------------------------------------

    async def _connect(self, pubsub: PubSub) -> None:
        """Subscribe to the control channel and every wanted channel, wait for Redis to
        confirm them all, catch up on what was missed, then go ready. Events that
        arrive meanwhile are handed on after the catch-up, in order behind it."""
        loop = asyncio.get_running_loop()
        self._last_heard = 0.0
        await pubsub.connect()  # type: ignore[no-untyped-call]
        self._reached, self.unreachable = True, False
        # Nothing is read on this connection from here on but by the reader.
        connection = pubsub.connection
        if connection is None:
            raise ConnectionError("the subscriber connection did not open")
        self._held = []
        self._reader = PushReader.install(
            connection, lambda replies: self._on_replies(loop.time(), replies)
        )
        # redis-py reconnects a pub/sub connection by itself on the next command and
        # subscribes again: what was published in between would be lost unseen.
        connection.register_connect_callback(self._on_reconnect)
        self._pubsub = pubsub
        self._schedule_sync()
        if self._syncing is not None:
            try:  # the commands are sent
                await asyncio.wait_for(asyncio.shield(self._syncing), self._pong_timeout_s)
            except TimeoutError:
                raise ConnectionError("Redis did not take the subscriptions") from None
        while not self._all_confirmed():
            self._check_connection()
            self._heard.clear()
            heard = asyncio.ensure_future(self._heard.wait())
            try:
                done, _ = await asyncio.wait(
                    {heard, self._reader.lost},
                    timeout=self._pong_timeout_s,
                    return_when=asyncio.FIRST_COMPLETED,
                )
            finally:  # also when this is cancelled (the subscriber replaced)
                heard.cancel()
            if not done:
                raise ConnectionError("Redis did not confirm the subscriptions")
        self._check_connection()
        if self.restarts or self._catch_up_first:
            log.info("redis subscription restored%s; catching up", self._outage.ended())
            await self._on_restored(frozenset(self.wanted))
        self._check_connection()
        held, self._held = self._held, None
        if held:
            self._on_messages(held)
        self.ready.set()
        if self._opened:
            self.reconnects += 1
        self._opened = True

    def _all_confirmed(self) -> bool:
        return CONTROL_CHANNEL in self._active and not self._unconfirmed

    async def _listen(self, pubsub: PubSub) -> None:
        """Wait until the connection fails; the reader hands messages on meanwhile.

        A watchdog finds a connection that went half-open (a NAT or load balancer
        dropped it, the host vanished), which no read would notice: after idle_ping_s
        of silence a PING must be answered within pong_timeout_s, or the connection
        counts as lost.
        """
        reader = self._reader
        assert reader is not None
        self._last_heard = asyncio.get_running_loop().time()
        watchdog = asyncio.ensure_future(self._watch(pubsub, reader))
        try:
            await asyncio.shield(reader.lost)
        finally:
            watchdog.cancel()
        raise ConnectionError(reader.lost_because)

    async def _watch(self, pubsub: PubSub, reader: PushReader) -> None:
        """Ping a silent connection; give it up when the answer does not come (a
        reconnect and a catch-up follow). Behind Sentinel, also when the sentinels name
        another master: the old one may still be up, but what is published to it now
        is lost."""
        loop = asyncio.get_running_loop()
        behind_sentinel = watches_master(self._pool)
        while True:
            if behind_sentinel and await self._master_moved(pubsub):
                self.ready.clear()
                reader.fail("the sentinels moved the master")
                return
            silent_for = loop.time() - self._last_heard
            if silent_for < self._idle_ping_s:
                pause = self._idle_ping_s - silent_for
                await asyncio.sleep(min(pause, MASTER_CHECK_S) if behind_sentinel else pause)
                continue
            pinged_at = loop.time()
            # A broken connection: the reader sees it; one that takes nothing in: the
            # answer does not come.
            with contextlib.suppress(*REDIS_ERRORS_OR_TIMEOUT):
                await asyncio.wait_for(_sender(pubsub)("PING"), self._pong_timeout_s)
            await asyncio.sleep(self._pong_timeout_s)
            if self._last_heard < pinged_at:
                self.ready.clear()
                reader.fail("no answer to PING on the subscriber connection")
                return

    async def _master_moved(self, pubsub: PubSub) -> bool:
        master = await current_master(self._pool)
        connection = pubsub.connection
        if master is None or connection is None:
            return False
        address = (getattr(connection, "host", None), getattr(connection, "port", None))
        return address != master

    def _on_reconnect(self, connection: object) -> None:
        if self._reader is not None:
            self._reader.fail("the subscriber connection was lost and reopened")

    def _check_connection(self) -> None:
        reader = self._reader
        if reader is None or reader.lost.done():
            raise ConnectionError(reader.lost_because if reader else "not connected")

    def _on_replies(self, now: float, replies: list[Reply]) -> None:
        """What one read brought: events go on together (or wait for the catch-up),
        confirmations update the subscriptions."""
        self._last_heard = now
        events: list[bytes] = []
        for reply in replies:
            if type(reply) is list and len(reply) == 3:
                kind, channel, data = reply
                if kind in _EVENT:
                    if type(data) is bytes:
                        events.append(data)
                elif kind in _CONFIRMATION and type(channel) is bytes:
                    self._on_confirmation(kind, channel.decode())
            elif isinstance(reply, hiredis.ReplyError) and self._reader is not None:
                self._reader.fail(f"Redis refused a subscriber command: {reply}")
        self._heard.set()
        if events:
            self.messages += len(events)
            if self._held is not None:
                self._held += events
            else:
                self._on_messages(events)

    def _on_confirmation(self, kind: bytes, channel: str) -> None:
        if kind == b"sunsubscribe" and channel not in self._unconfirmed:
            # Not asked for: Redis Cluster moved the channel's slot to another shard.
            self._requested.pop(channel, None)
            self._active.discard(channel)
            self._on_moved()
        else:
            self._confirmed(channel)

    def _confirmed(self, channel: str) -> None:
        left = self._unconfirmed.get(channel, 0) - 1
        if left > 0:
            self._unconfirmed[channel] = left
            return
        self._unconfirmed.pop(channel, None)
        if self._requested.get(channel):
            self._active.add(channel)
            for waiter in self._waiters.pop(channel, ()):
                if not waiter.done():
                    waiter.set_result(None)
        else:
            self._active.discard(channel)
            self._requested.pop(channel, None)

    def _schedule_sync(self) -> None:
        """Send what changed, once per turn of the event loop: one SUBSCRIBE (or
        UNSUBSCRIBE) for every user who came (or left) meanwhile. One sync runs at a
        time, so that commands reach Redis in the order they were decided."""
        if self._pubsub is None:
            return
        self._sync_scheduled = True
        if self._syncing is None:
            self._syncing = asyncio.ensure_future(self._sync_while_needed())
            self._syncing.add_done_callback(_log_failure)

    async def _sync_while_needed(self) -> None:
        try:
            await asyncio.sleep(0)  # let this turn's other changes come in first
            while self._sync_scheduled:
                await self._sync()
        finally:
            if self._syncing is asyncio.current_task():
                self._syncing = None

    async def _sync(self) -> None:
        self._sync_scheduled = False
        pubsub = self._pubsub
        if pubsub is None:
            return
        wanted = self.wanted | {CONTROL_CHANNEL}
        to_subscribe = [c for c in wanted if not self._requested.get(c)]
        to_unsubscribe = [c for c, on in self._requested.items() if on and c not in wanted]
        for channel in to_subscribe:
            self._requested[channel] = True
        for channel in to_unsubscribe:
            self._requested[channel] = False
        for channel in (*to_subscribe, *to_unsubscribe):
            self._active.discard(channel)
            self._unconfirmed[channel] = self._unconfirmed.get(channel, 0) + 1
        try:
            send = _sender(pubsub)
            if CONTROL_CHANNEL in to_subscribe:
                to_subscribe.remove(CONTROL_CHANNEL)
                await send("SUBSCRIBE", CONTROL_CHANNEL)
            if self._sharded:
                # One SSUBSCRIBE names channels of one slot only.
                for group in _by_slot(to_subscribe):
                    await send("SSUBSCRIBE", *group)
                for group in _by_slot(to_unsubscribe):
                    await send("SUNSUBSCRIBE", *group)
            else:
                for start in range(0, len(to_subscribe), COMMAND_BATCH):
                    await send("SUBSCRIBE", *to_subscribe[start : start + COMMAND_BATCH])
                for start in range(0, len(to_unsubscribe), COMMAND_BATCH):
                    await send("UNSUBSCRIBE", *to_unsubscribe[start : start + COMMAND_BATCH])
        except REDIS_ERRORS as exc:
            # The connection is failing: the listener notices, reconnects and
            # subscribes to everything wanted then.
            log.warning("subscribing failed: %s", redis_failure(exc))
        except Exception:
            if self._pubsub is pubsub:
                raise
            # The connection was closed under a command (redis-py then fails in its own
            # ways: an AttributeError on its writer, gone): the next one subscribes to
            # everything wanted.
            log.debug("subscribing stopped: the subscriber connection was closed", exc_info=True)

    def _disconnected(self) -> None:
        self.ready.clear()
        if self._reader is not None:
            self._reader.fail("the subscriber connection was closed")
        if self._syncing is not None:
            # It may wait for the old socket to take its commands: the next connection
            # sends its own.
            self._syncing.cancel()
            self._syncing = None
        self._pubsub = None
        self._reader = None
        self._held = None
        self._requested.clear()
        self._unconfirmed.clear()
        self._active.clear()


def _sender(pubsub: PubSub) -> Callable[..., Awaitable[None]]:
    """Commands for the subscriber connection, sent as they are. Not redis-py's
    subscribe(), which records each channel until it reads the confirmation itself
    (never, here: the PushReader reads it), so that a worker would keep every user it
    ever served; and without redis-py's health check (`health_check_interval` in the
    URL), whose PING it would wait to read itself, in vain."""
    connection = pubsub.connection
    if connection is None:
        raise ConnectionError("the subscriber connection is closed")

    async def send(*args: str) -> None:
        if not connection.is_connected:  # only run() connects again (and catches up)
            raise RedisConnectionError("the subscriber connection is closed")
        await connection.send_command(*args, check_health=False)

    return send


def _by_slot(channels: list[str]) -> list[list[str]]:
    groups: dict[int, list[str]] = {}
    for channel in channels:
        groups.setdefault(key_slot(channel.encode()), []).append(channel)
    return list(groups.values())


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("subscription update failed", exc_info=task.exception())
