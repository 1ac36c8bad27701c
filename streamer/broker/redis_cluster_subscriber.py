"""Under Redis Cluster, the process's subscriber: one subscriber connection per master
(a `Subscriber` each, with sharded pub/sub), each holding the channels of the users
here whose slots that master serves.

The layout of slots is asked of the cluster every TOPOLOGY_CHECK_S, and at once when a
master tells a connection that a channel's slot left it. When it changed (a failover
promoted a replica, a slot was migrated), the connections are opened again on the new
layout, and each catches up from the history of its users before it hands on what
arrives live, in order, as after any lost subscription.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Set
from typing import Any

import redis.asyncio.cluster as aiocluster
from redis.crc import key_slot

from .base import BrokerUnavailable
from .outage_log import OutageLog
from .redis_cluster import cluster_client, masters, node_client
from .redis_connect import REDIS_ERRORS, redis_failure
from .redis_subscriber import SUBSCRIBE_TIMEOUT_S, Rerouted, Subscriber

log = logging.getLogger(__name__)

TOPOLOGY_CHECK_S = 1.0
READY_CHECK_S = 0.1
Address = tuple[str, int]


class ClusterSubscriber:
    def __init__(
        self,
        url: str,
        *,
        on_messages: Callable[[list[bytes]], None],
        on_restored: Callable[[Set[str]], Awaitable[None]],
        idle_ping_s: float,
        pong_timeout_s: float,
    ) -> None:
        self._url = url
        self._on_messages = on_messages
        self._on_restored = on_restored
        self._idle_ping_s = idle_ping_s
        self._pong_timeout_s = pong_timeout_s
        self.wanted: set[str] = set()
        self.ready = asyncio.Event()  # every shard connected and subscribed
        self._rebuilds = 0
        self._layout: dict[int, Address] = {}
        self._shards: dict[Address, Subscriber] = {}
        self._moved = asyncio.Event()
        self._rebuilt = asyncio.Event()
        self._messages_before = 0
        self._restarts_before = 0
        self._reconnects_before = 0

    @property
    def messages(self) -> int:
        return self._messages_before + sum(shard.messages for shard in self._shards.values())

    @property
    def restarts(self) -> int:
        """Subscriptions lost and opened again: on a new layout, or a shard's connection."""
        shards = self._shards.values()
        return self._rebuilds + self._restarts_before + sum(shard.restarts for shard in shards)

    @property
    def reconnects(self) -> int:
        """Subscriptions lost and opened again: on a new layout, or a shard's connection
        that was open (attempts that failed are not counted)."""
        shards = self._shards.values()
        return self._rebuilds + self._reconnects_before + sum(s.reconnects for s in shards)

    def shard_for(self, channel: str) -> Subscriber | None:
        address = self._layout.get(key_slot(channel.encode()))
        return None if address is None else self._shards.get(address)

    async def subscribe(self, channel: str) -> None:
        self.wanted.add(channel)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SUBSCRIBE_TIMEOUT_S
        while (left := deadline - loop.time()) > 0:
            if channel not in self.wanted:
                # Withdrawn meanwhile (its last client left): subscribing it on the
                # shard that now serves it would leave it there, unwanted, for good.
                raise BrokerUnavailable("the subscription was withdrawn")
            shard = self.shard_for(channel)
            if shard is None:
                self._rebuilt.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._rebuilt.wait(), left)
                continue
            try:
                await asyncio.wait_for(shard.subscribe(channel), left)
            except Rerouted:
                continue
            except TimeoutError:
                break
            if self.shard_for(channel) is shard:
                return
        raise BrokerUnavailable("Redis did not confirm the subscription in time")

    def unsubscribe(self, channel: str) -> None:
        self.wanted.discard(channel)
        shard = self.shard_for(channel)
        if shard is not None:
            shard.unsubscribe(channel)

    async def run(self) -> None:
        """Follow the cluster's layout until cancelled."""
        client = cluster_client(self._url, socket_connect_timeout=5)
        backoff = 0.1
        outage = OutageLog(log)
        try:
            while True:
                try:
                    layout = await masters(client)
                except REDIS_ERRORS as exc:
                    outage.failed(
                        f"cannot read the cluster's layout ({redis_failure(exc)}); retrying"
                    )
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
                    continue
                ended = outage.ended()
                if ended:
                    log.info("the cluster's layout read%s", ended)
                backoff = 0.1
                await self._serve(client, layout)
                self._rebuilds += 1
        finally:
            with contextlib.suppress(Exception):
                await client.aclose()

    async def _serve(self, client: aiocluster.RedisCluster, layout: dict[int, Address]) -> None:
        """One subscriber per master of `layout`, until the layout changes."""

        def connect(address: Address) -> Callable[..., Any]:
            return lambda **settings: node_client(client, address, **settings)

        shards = {
            address: Subscriber(
                self._url,
                make_client=connect(address),
                sharded=True,
                catch_up_first=self._rebuilds > 0,
                on_moved=self._moved.set,
                on_messages=self._on_messages,
                on_restored=self._on_restored,
                idle_ping_s=self._idle_ping_s,
                pong_timeout_s=self._pong_timeout_s,
            )
            for address in sorted(set(layout.values()))
        }
        for channel in self.wanted:
            address = layout.get(key_slot(channel.encode()))
            if address is not None:
                shards[address].wanted.add(channel)
        self._layout, self._shards = layout, shards
        self._moved.clear()
        self._rebuilt.set()
        tasks = [
            asyncio.create_task(shard.run(), name=f"streamer-redis-subscriber-{host}:{port}")
            for (host, port), shard in shards.items()
        ]
        try:
            checks = 0
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._moved.wait(), READY_CHECK_S)
                if all(shard.ready.is_set() for shard in shards.values()):
                    self.ready.set()
                else:
                    self.ready.clear()
                checks += 1
                if self._moved.is_set():
                    log.warning("a slot left a subscriber connection: subscribing again")
                    break
                if checks % round(TOPOLOGY_CHECK_S / READY_CHECK_S) == 0 and await self._changed(
                    client, layout
                ):
                    log.warning("the cluster's layout changed: subscribing again")
                    break
        finally:
            self.ready.clear()
            self._messages_before += sum(shard.messages for shard in shards.values())
            self._restarts_before += sum(shard.restarts for shard in shards.values())
            self._reconnects_before += sum(shard.reconnects for shard in shards.values())
            self._layout, self._shards = {}, {}
            for task in tasks:
                task.cancel()
            for shard in shards.values():
                shard.abandon()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _changed(self, client: aiocluster.RedisCluster, layout: dict[int, Address]) -> bool:
        try:
            return await masters(client) != layout
        except REDIS_ERRORS:
            # Asked again next time; a master that is down shows as its connection's
            # failure meanwhile, and as a new layout once its replica took over.
            return False
