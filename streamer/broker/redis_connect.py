"""The one place a Redis client is made from STREAMER_REDIS_URL.

`redis://`, `rediss://` and `unix://` URLs give a plain client. A Sentinel URL,

    redis+sentinel://[:password@]host:port[,host:port...]/<service>[/<db>]

gives a client of the service's current master, found through the sentinels (any of
them answers; a port left out is 26379). The password, if any, is the one of the
Redis servers (the sentinels are asked without one). On a failover redis-py's
Sentinel connection pool asks the sentinels again when a connection is opened, so a
client that lost its connection (the sentinels close the clients of the servers they
reconfigure) reconnects to the new master by itself.

Replication is asynchronous: what the old master acknowledged but had not yet passed
on is lost when its replica takes over. `fence_failover` detects that the master is
not the one the current epoch was issued under, and starts a new epoch: clients then
resync (`recovered: false`) instead of silently missing events.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import select
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import redis
import redis.asyncio as aioredis
import redis.asyncio.cluster as aiocluster
import redis.asyncio.sentinel as aiosentinel
import redis.cluster as synccluster
import redis.sentinel as syncsentinel
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError
from redis.retry import Retry
from redis.sentinel import MasterNotFoundError

# What a failing Redis raises: a Redis Cluster client raises RedisClusterException (not a
# RedisError) when it cannot reach any node or a slot is not served.
REDIS_ERRORS: tuple[type[Exception], ...] = (RedisError, RedisClusterException, OSError)
REDIS_ERRORS_OR_TIMEOUT: tuple[type[Exception], ...] = (*REDIS_ERRORS, TimeoutError)


def redis_failure(exc: BaseException) -> str:
    """What went wrong, for a message: a timeout often comes without any text, and
    redis-py's "No master found" comes with the repr of every sentinel's client (over
    a kilobyte a line), which says nothing more."""
    text = str(exc)
    if isinstance(exc, (MasterNotFoundError, aiosentinel.MasterNotFoundError)):
        text = text.partition(" : <")[0]
    if text:
        return text
    return "timed out" if isinstance(exc, TimeoutError) else type(exc).__name__


# A Redis Cluster client is not a `Redis`, but answers the same commands.
AsyncClient = aioredis.Redis | aiocluster.RedisCluster
SyncClient = redis.Redis | synccluster.RedisCluster

SENTINEL_SCHEME = "redis+sentinel"
DEFAULT_SENTINEL_PORT = 26379
SENTINEL_TIMEOUT_S = 2.0
FENCE_KEY = "streamer:epoch:master"


class BadRedisUrl(ValueError):
    """The URL cannot be used; the message says why (without the password)."""


@dataclass(frozen=True)
class SentinelTarget:
    sentinels: tuple[tuple[str, int], ...]
    service: str
    password: str | None = None
    username: str | None = None
    db: int = 0


# Digits as URLs write them (`str.isdigit` takes "²" and every script's digits too),
# not so many that `int()` refuses them.
_NUMBER = re.compile(r"[0-9]{1,18}")


def is_sentinel_url(url: str) -> bool:
    return url.lower().startswith(SENTINEL_SCHEME + "://")


def parse_sentinel_url(url: str) -> SentinelTarget:
    netloc, path, username, password = split_url(
        url, SENTINEL_SCHEME, "a Sentinel URL takes no query or fragment (the db goes in the path)"
    )
    sentinels = tuple(host_port(item, DEFAULT_SENTINEL_PORT) for item in netloc.split(","))
    parts = path.split("/")
    if not parts or not parts[0]:
        raise BadRedisUrl("no service name: redis+sentinel://host:port[,host:port]/<service>")
    if len(parts) > 2 or (len(parts) == 2 and not _NUMBER.fullmatch(parts[1])):
        raise BadRedisUrl("the path is /<service> or /<service>/<db number>")
    service = unquote(parts[0])
    if any(ord(ch) < 33 for ch in service):
        raise BadRedisUrl("the service name must not contain spaces or control characters")
    db = int(parts[1]) if len(parts) == 2 else 0
    return SentinelTarget(sentinels, service, password, username, db)


def split_url(url: str, scheme: str, no_query: str) -> tuple[str, str, str | None, str | None]:
    """`scheme://[[user]:password@]hosts[/path]`: the hosts, the path, the user name and
    the password (both unquoted; None when absent). `no_query` is the error for a URL
    with a query or a fragment."""
    if not url.lower().startswith(scheme + "://"):
        raise BadRedisUrl(f"not a {scheme}:// URL")
    rest = url[len(scheme) + 3 :]
    username = password = None
    if "@" in rest:
        # Up to the last @: a password may hold a / ? or # its writer did not escape,
        # and no part of it may show in an error.
        userinfo, _, rest = rest.rpartition("@")
        user, sep, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if sep else None
    if "?" in rest or "#" in rest:
        raise BadRedisUrl(no_query)
    netloc, _, path = rest.partition("/")
    return netloc, path, username, password


def host_port(item: str, default_port: int, what: str = "sentinel") -> tuple[str, int]:
    """`host`, `host:port` or `[IPv6]:port`, checked."""
    item = item.strip()
    if not item:
        raise BadRedisUrl(f"an empty {what} address (host:port[,host:port])")
    if item.startswith("["):  # [IPv6]:port
        host, sep, tail = item[1:].partition("]")
        if not sep or (tail and not tail.startswith(":")):
            raise BadRedisUrl(f"a bad {what} address {item!r}")
        port_text = tail[1:] if tail else ""
    else:
        host, _, port_text = item.partition(":")
    if not host or any(ch in host for ch in " /?#@"):
        raise BadRedisUrl(f"a bad {what} host in {item!r}")
    if not port_text:
        return host, default_port
    if not _NUMBER.fullmatch(port_text) or not 0 < int(port_text) < 65536:
        raise BadRedisUrl(f"a bad {what} port in {item!r}")
    return host, int(port_text)


def _sentinel_settings(target: SentinelTarget, kwargs: dict[str, Any]) -> dict[str, Any]:
    settings = dict(kwargs)
    settings.setdefault("db", target.db)
    if target.password is not None:
        settings.setdefault("password", target.password)
    if target.username is not None:
        settings.setdefault("username", target.username)
    return settings


def _sentinel_kwargs(kwargs: dict[str, Any], retry: object) -> dict[str, Any]:
    """Sentinels are asked with short timeouts and once (`retry`: none): one that is
    down must not hold up the discovery (the next one is asked, and the pool asks again
    every MASTER_CHECK_S). redis-py's own default retries each three times with
    backoff: with the sentinels unreachable, every command took 8 s to fail."""
    timeout = kwargs.get("socket_connect_timeout") or SENTINEL_TIMEOUT_S
    return {
        "socket_connect_timeout": min(timeout, SENTINEL_TIMEOUT_S),
        "socket_timeout": SENTINEL_TIMEOUT_S,
        "retry": retry,
    }


# How often a pool asks the sentinels which server is master. redis-py asks only when a
# connection opens; connections that stay open would otherwise keep writing to a
# replaced master (whose writes are lost once it becomes a replica) until it is
# reconfigured, seconds later. A changed answer closes the idle connections.
MASTER_CHECK_S = 1.0


class _WatchedPool(aiosentinel.SentinelConnectionPool):
    """Sentinel's pool, that checks the master at most every MASTER_CHECK_S."""

    _checked_at = 0.0

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        await self.check_master()
        return await super().get_connection(*args, **kwargs)  # type: ignore[no-untyped-call]

    async def check_master(self) -> tuple[str, int] | None:
        """The current master's address, asked again if the last answer is old."""
        now = time.monotonic()
        if now - self._checked_at >= MASTER_CHECK_S:
            self._checked_at = now
            with contextlib.suppress(RedisError, OSError):
                await self.get_master_address()  # type: ignore[no-untyped-call]
        address: tuple[str, int] | None = self.master_address
        return address


class _BlockingWatchedPool(_WatchedPool, aioredis.BlockingConnectionPool):
    """The same, that waits for a free connection (as the broker's plain pool does)
    instead of failing when all are in use."""


class _WatchedSyncPool(syncsentinel.SentinelConnectionPool):
    """The synchronous twin of `_WatchedPool`."""

    _checked_at = 0.0

    def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        now = time.monotonic()
        if now - self._checked_at >= MASTER_CHECK_S:
            self._checked_at = now
            with contextlib.suppress(RedisError, OSError):
                self.get_master_address()  # type: ignore[no-untyped-call]
        return super().get_connection(*args, **kwargs)


def watches_master(pool: object) -> bool:
    """Whether `pool` is a Sentinel pool (its master may move)."""
    return isinstance(pool, _WatchedPool)


async def current_master(pool: object) -> tuple[str, int] | None:
    """For a Sentinel pool, the master's address (checked as the pool checks it);
    None for any other pool."""
    if isinstance(pool, _WatchedPool):
        return await pool.check_master()
    return None


class _SentinelClient(aioredis.Redis):
    """A master's client that closes its connections to the sentinels with its own."""

    sentinels: tuple[aioredis.Redis, ...] = ()

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        try:
            await super().aclose(close_connection_pool)
        finally:
            for sentinel in self.sentinels:
                await sentinel.aclose()


class _SyncSentinelClient(redis.Redis):
    """The synchronous twin of `_SentinelClient`."""

    sentinels: tuple[redis.Redis, ...] = ()

    def close(self) -> None:
        try:
            super().close()
        finally:
            for sentinel in self.sentinels:
                sentinel.close()


def database(client: object) -> int:
    """The number of the database a client uses (0 under Redis Cluster, which has no
    other)."""
    pool = getattr(client, "connection_pool", None)
    settings = getattr(pool, "connection_kwargs", None) or {}
    return int(settings.get("db") or 0)


# What only a TCP connection takes: redis-py refuses it for a Unix socket.
_TCP_ONLY_SETTINGS = ("socket_keepalive", "socket_keepalive_options")


def _for_transport(url: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    if url.startswith("unix:"):
        return {name: value for name, value in kwargs.items() if name not in _TCP_ONLY_SETTINGS}
    return kwargs


def redis_client(url: str, *, blocking: bool = False, **kwargs: Any) -> AsyncClient:
    """An asyncio client for `url`. With `blocking`, the pool (`max_connections`,
    `timeout`) makes callers wait for a free connection (not under Redis Cluster,
    whose client keeps a pool per node)."""
    from .redis_cluster import cluster_client, is_cluster_url

    if is_cluster_url(url):
        return cluster_client(url, **kwargs)
    if is_sentinel_url(url):
        target = parse_sentinel_url(url)
        sentinel = aiosentinel.Sentinel(  # type: ignore[no-untyped-call]
            list(target.sentinels),
            sentinel_kwargs=_sentinel_kwargs(kwargs, AsyncRetry(NoBackoff(), 0)),
        )
        pool_class = _BlockingWatchedPool if blocking else _WatchedPool
        client: _SentinelClient = sentinel.master_for(
            target.service,
            redis_class=_SentinelClient,
            connection_pool_class=pool_class,
            **_sentinel_settings(target, kwargs),
        )
        client.sentinels = tuple(sentinel.sentinels)
        return client
    kwargs = _for_transport(url, kwargs)
    if blocking:
        pool = aioredis.BlockingConnectionPool.from_url(url, **kwargs)
        return aioredis.Redis.from_pool(pool)  # owns the pool: aclose() closes it
    return aioredis.Redis.from_url(url, **kwargs)


def redis_client_sync(url: str, **kwargs: Any) -> SyncClient:
    """The synchronous twin of `redis_client` (for `Publisher` and the session store's
    tools)."""
    from .redis_cluster import cluster_client_sync, is_cluster_url

    if is_cluster_url(url):
        return cluster_client_sync(url, **kwargs)
    if is_sentinel_url(url):
        target = parse_sentinel_url(url)
        sentinel = syncsentinel.Sentinel(  # type: ignore[no-untyped-call]
            list(target.sentinels), sentinel_kwargs=_sentinel_kwargs(kwargs, Retry(NoBackoff(), 0))
        )
        client: _SyncSentinelClient = sentinel.master_for(  # type: ignore[no-untyped-call]
            target.service,
            redis_class=_SyncSentinelClient,
            connection_pool_class=_WatchedSyncPool,
            **_sentinel_settings(target, kwargs),
        )
        client.sentinels = tuple(sentinel.sentinels)
        return client
    return redis.Redis.from_url(url, **_for_transport(url, kwargs))


FENCE_SCRIPT = """
-- KEYS: epoch, fence. ARGV: the master's replication id, a new epoch.
-- The fence holds the replication id of the master the current epoch is known under.
-- A promoted replica has a replication id of its own: what the old master wrote after
-- the replica stopped following it is gone, so a new epoch starts (clients resync).
local fence = redis.call('GET', KEYS[2])
if fence == ARGV[1] then
  return 0
end
redis.call('SET', KEYS[2], ARGV[1])
if fence == false and redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
redis.call('SET', KEYS[1], ARGV[2])
return 1
"""


async def fence_failover(client: aioredis.Redis, epoch_key: str) -> bool:
    """Start a new epoch if the master changed since the current one began; True if
    it did. Only for Sentinel clients: a plain Redis has no failover (and an AOF
    restart gives it a new replication id without losing acknowledged writes)."""
    info = await client.info("replication")
    replid = info.get("master_replid")
    if not isinstance(replid, str):
        return False
    new_epoch = secrets.token_hex(4)
    return bool(await client.eval(FENCE_SCRIPT, 2, epoch_key, FENCE_KEY, replid, new_epoch))


def closed_by_server(connection: AbstractConnection) -> bool:
    """Whether Redis closed or reset an idle connection (a restart): the event loop has
    seen it (no system call), or the kernel has something to read on it, which between
    commands means the same, seen even where the event loop did not run since (a caller
    that blocked it through a restart; one `poll` that does not wait: `select` refuses
    descriptors from 1024 on, which a server with a thousand clients has)."""
    reader = getattr(connection, "_reader", None)
    if isinstance(reader, asyncio.StreamReader) and (
        reader.at_eof() or reader.exception() is not None
    ):
        return True
    writer = getattr(connection, "_writer", None)
    sock = writer.get_extra_info("socket") if isinstance(writer, asyncio.StreamWriter) else None
    if sock is None:
        return False
    descriptor = sock.fileno()
    if descriptor < 0:  # closed under it
        return True
    poller = select.poll()
    poller.register(descriptor, select.POLLIN)
    try:
        return bool(poller.poll(0))  # readable, hung up or failed
    except OSError:
        return True


async def drop_closed_idle_connections(pool: aioredis.ConnectionPool) -> None:
    """Disconnect the pool's idle connections that Redis closed (it restarted): the first
    command on each would fail (redis-py's pool does not look). Only those: closing
    every idle one raced with the commands that took them meanwhile, which failed."""
    idle = getattr(pool, "_available_connections", None)
    if not isinstance(idle, list):  # another redis-py: every idle one, as it can
        await pool.disconnect(inuse_connections=False)
        return
    for connection in [connection for connection in idle if closed_by_server(connection)]:
        if connection in idle:  # not taken by a command meanwhile
            await connection.disconnect()
