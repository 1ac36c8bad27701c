"""Redis Cluster: the URL, the clients, and which master serves which user.

    redis+cluster://[[user]:password@]host:port[,host:port...]

names some of the cluster's nodes (a port left out is 6379); the clients learn the
rest from them. Every key of one user carries the user's hash tag (`redis_schema`), so
a user's state, history, epoch and channel live in one slot: the publish script runs
in one call on that slot's master, and a user's events are published there with
SPUBLISH (sharded pub/sub), so only the shard's master sends them on. A process keeps
one subscriber connection per master (`redis_cluster_subscriber`).

Commands are not retried by the clients after a connection error (a publish may have
run before the connection failed, and running it again would publish twice); MOVED and
ASK redirections are followed, as they mean the command did not run.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
import redis.asyncio.cluster as aiocluster
import redis.cluster as synccluster
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry

from .base import BrokerUnavailable
from .redis_connect import FENCE_SCRIPT, REDIS_ERRORS, BadRedisUrl, host_port, split_url

CLUSTER_SCHEME = "redis+cluster"
DEFAULT_PORT = 6379
# The settings of a single-server pool that a cluster client does not take: its pools
# are per node and do not wait for a free connection.
_POOL_ONLY = ("timeout", "max_connections", "db")


@dataclass(frozen=True)
class ClusterTarget:
    nodes: tuple[tuple[str, int], ...]
    password: str | None = None
    username: str | None = None


def is_cluster_url(url: str) -> bool:
    return url.lower().startswith(CLUSTER_SCHEME + "://")


def parse_cluster_url(url: str) -> ClusterTarget:
    netloc, path, username, password = split_url(
        url, CLUSTER_SCHEME, "a cluster URL takes no query or fragment"
    )
    if path not in ("", "0"):
        raise BadRedisUrl("Redis Cluster has only database 0: leave the path out")
    nodes = tuple(host_port(item, DEFAULT_PORT, "cluster node") for item in netloc.split(","))
    return ClusterTarget(nodes, password, username)


def _settings(target: ClusterTarget, kwargs: dict[str, Any], retry: object) -> dict[str, Any]:
    settings = {key: value for key, value in kwargs.items() if key not in _POOL_ONLY}
    settings.setdefault("retry", retry)
    if target.password is not None:
        settings.setdefault("password", target.password)
    if target.username is not None:
        settings.setdefault("username", target.username)
    return settings


class _ClusterClient(aiocluster.RedisCluster):
    """Learns the layout before its first command: commands started together on a
    client that had not yet (seen with redis-py 8.1) fail with "Connection closed by
    server" when the layout is read under them."""

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        if self._initialize:
            await self.initialize()
        return await super().execute_command(*args, **kwargs)


def cluster_client(url: str, **kwargs: Any) -> aiocluster.RedisCluster:
    target = parse_cluster_url(url)
    nodes = [aiocluster.ClusterNode(host, port) for host, port in target.nodes]
    settings = _settings(target, kwargs, AsyncRetry(NoBackoff(), 0))
    return _ClusterClient(startup_nodes=nodes, **settings)


def cluster_client_sync(url: str, **kwargs: Any) -> synccluster.RedisCluster:
    target = parse_cluster_url(url)
    nodes = [
        synccluster.ClusterNode(host, port)  # type: ignore[no-untyped-call]
        for host, port in target.nodes
    ]
    settings = _settings(target, kwargs, Retry(NoBackoff(), 0))
    return synccluster.RedisCluster(startup_nodes=nodes, **settings)


def node_client(
    client: aiocluster.RedisCluster, address: tuple[str, int], **kwargs: Any
) -> aioredis.Redis:
    """A plain client of one node of the cluster (for its subscriber connection), with
    the cluster client's credentials."""
    connection = client.get_connection_kwargs()
    settings: dict[str, Any] = {
        key: connection[key]
        for key in ("username", "password", "ssl", "socket_connect_timeout")
        if connection.get(key) is not None
    }
    settings.update(kwargs)
    host, port = address
    return aioredis.Redis(host=host, port=port, **settings)


async def masters(client: aiocluster.RedisCluster) -> dict[int, tuple[str, int]]:
    """Each slot's master now, asked of the cluster (CLUSTER SLOTS)."""
    await client.initialize()
    layout: dict[int, tuple[str, int]] = {}
    reply = await client.execute_command("CLUSTER SLOTS", target_nodes=client.get_random_node())
    for (start, end), info in _slot_ranges(reply):
        host, port = info
        for slot in range(start, end + 1):
            layout[slot] = (host, port)
    return layout


def _slot_ranges(reply: Any) -> list[tuple[tuple[int, int], tuple[str, int]]]:
    """redis-py parses CLUSTER SLOTS into {(start, end): {"primary": (host, port), ...}}."""
    ranges = []
    for bounds, nodes in dict(reply).items():
        primary = nodes["primary"]
        host = primary[0].decode() if isinstance(primary[0], bytes) else str(primary[0])
        ranges.append(((int(bounds[0]), int(bounds[1])), (host, int(primary[1]))))
    return ranges


# How long a master's replication id is trusted before it is asked again.
REPLID_CHECK_S = 1.0


# FENCE_SCRIPT for one user's keys, which expire (ARGV[3]) like the rest of theirs.
USER_FENCE_SCRIPT = f"""
local changed = (function()
{FENCE_SCRIPT}
end)()
redis.call('EXPIRE', KEYS[2], ARGV[3])
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('EXPIRE', KEYS[1], ARGV[3])
end
return changed
"""


class UserFence:
    """Per user, the failover fence of `redis_connect`: each user's epoch is kept with
    the replication id of the master it was issued under. A replica promoted after its
    master failed has an id of its own: what the old master acknowledged and had not
    passed on is gone, so the user's epoch changes and their clients resync."""

    def __init__(self, client: aiocluster.RedisCluster, *, ttl_s: int) -> None:
        self._client = client
        self._ttl_s = ttl_s
        self._script = client.register_script(USER_FENCE_SCRIPT)
        self._replids: dict[str, tuple[float, str | None]] = {}

    async def check(self, user_epoch_key: str, user_fence_key: str) -> bool:
        """Start a new epoch for the key's user if its master changed; True if it did."""
        await self._client.initialize()  # at once if it already knows the layout
        node = self._client.get_node_from_key(user_epoch_key)
        if node is None:
            return False
        replid = await self._replid(node)
        if replid is None:
            # Unknown is not unchanged: whoever asked tries again (the layout the client
            # knew may be out of date; a failed call makes it read the layout again).
            raise BrokerUnavailable("could not ask the master of a user's slot for its id")
        changed = await self._script(
            keys=[user_epoch_key, user_fence_key],
            args=[replid, secrets.token_hex(4), self._ttl_s],
        )
        return bool(changed)

    async def _replid(self, node: aiocluster.ClusterNode) -> str | None:
        now = time.monotonic()
        known = self._replids.get(node.name)
        if known is not None and now - known[0] < REPLID_CHECK_S:
            return known[1]
        replid = None
        with contextlib.suppress(*REDIS_ERRORS):
            info = await self._client.info("replication", target_nodes=node)
            value = info.get("master_replid") if isinstance(info, dict) else None
            replid = value if isinstance(value, str) else None
        if replid is not None:
            self._replids[node.name] = (now, replid)
        return replid
