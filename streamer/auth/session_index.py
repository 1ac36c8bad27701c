"""Each user's live Redis sessions, so that nobody holds more than a set number.

A sorted set per user holds session ids scored by creation time (Redis's clock,
shared by every worker). Logging in once too often evicts the user's oldest
sessions: their ids leave the set and their keys are deleted, so those cookies stop
working. The set expires with the longest-lived session it lists.
"""

from __future__ import annotations

import hashlib
import secrets
from urllib.parse import quote

import redis.asyncio as redis
import redis.asyncio.cluster as aiocluster

INDEX_PREFIX = "streamer:sessions:"

# One script, so that parallel logins (on any worker) never leave more than the cap.
TRACK_SCRIPT = """
-- KEYS: the user's index
-- ARGV: new session id, prefix of session keys, its lifetime in seconds, the cap
-- Session keys are named after the ids listed in the index, so they are not in KEYS.
local index, id, key_prefix = KEYS[1], ARGV[1], ARGV[2]
local lifetime, cap = tonumber(ARGV[3]), tonumber(ARGV[4])
local now = redis.call('TIME')
redis.call('ZADD', index, now[1] .. string.format('%06d', now[2]), id)
if redis.call('ZCARD', index) > cap then
  -- Sessions that already ended (expired, evicted elsewhere) give their place first.
  for _, listed in ipairs(redis.call('ZRANGE', index, 0, -1)) do
    if redis.call('EXISTS', key_prefix .. listed) == 0 then
      redis.call('ZREM', index, listed)
    end
  end
  local excess = redis.call('ZCARD', index) - cap
  if excess > 0 then
    for _, oldest in ipairs(redis.call('ZRANGE', index, 0, excess - 1)) do
      redis.call('ZREM', index, oldest)
      redis.call('DEL', key_prefix .. oldest)
    end
  end
end
if redis.call('TTL', index) < lifetime then
  redis.call('EXPIRE', index, lifetime)
end
return redis.call('ZCARD', index)
"""


def index_key(user_id: str) -> str:
    """Escaped like the keys of broker/redis_schema: the user id alone inside the hash tag."""
    return INDEX_PREFIX + "{" + quote(user_id, safe="") + "}"


def cluster_tag(user_id: str) -> str:
    """Under Redis Cluster, the hash tag of a user's index and sessions: a digest, as
    session ids travel in cookies (where the user id has no business)."""
    return "{" + hashlib.sha256(user_id.encode()).hexdigest()[:20] + "}"


class SessionIndex:
    """Under Redis Cluster, the index and the sessions it lists share a slot: session
    ids start with the index's hash tag (`new_session_id`), so the script touches one
    slot only."""

    def __init__(
        self,
        client: redis.Redis | aiocluster.RedisCluster,
        *,
        key_prefix: str,
        max_per_user: int,
    ) -> None:
        self._client = client
        self._cluster = isinstance(client, aiocluster.RedisCluster)
        self._track = client.register_script(TRACK_SCRIPT)
        self._key_prefix = key_prefix
        self._max_per_user = max_per_user

    def _key(self, user_id: str) -> str:
        return INDEX_PREFIX + cluster_tag(user_id) if self._cluster else index_key(user_id)

    def new_session_id(self, user_id: str) -> str:
        """The id for a new session of `user_id`: random, behind the index's hash tag
        under Redis Cluster."""
        session_id = secrets.token_hex(16)
        return cluster_tag(user_id) + session_id if self._cluster else session_id

    async def add(self, user_id: str, session_id: str, lifetime_s: int) -> None:
        """List a session whose key is stored; evict the oldest past the cap."""
        await self._track(
            keys=[self._key(user_id)],
            args=[session_id, self._key_prefix, lifetime_s, self._max_per_user],
        )

    async def remove(self, user_id: str, session_id: str) -> None:
        await self._client.zrem(self._key(user_id), session_id)
