"""Redis key layout, the Lua scripts and their replies, shared by the broker and the
publishers.

Events are published by the script in `redis_publish_script`, which writes these keys
and PUBLISHes each event on its user's channel, to which each process with a client of
that user is subscribed (on its one subscriber connection).
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from ..events import (
    TaskState,
    full_task_state,
)
from ..wire import Delivery, EventId, with_id
from .base import ACTIVE_TASK_TTL_S, MAX_SNAPSHOT_BYTES, MAX_SNAPSHOT_TASKS, BrokerUnavailable

log = logging.getLogger(__name__)

PREFIX = "streamer"
EPOCH_KEY = f"{PREFIX}:epoch"


def _user(user_id: str) -> str:
    """The user id inside keys, escaped so that no (user, task) pair can spell
    another pair's key (`{a}:b}:c` vs `{a}:b` + `c`)."""
    return "{" + quote(user_id, safe="") + "}"


def user_channel(user_id: str, db: int = 0) -> str:
    """Where the user's events are published; hash-tagged like the user's keys.

    Pub/sub channels are shared by all the databases of a Redis server: the channels
    of a database other than 0 carry its number, so that deployments on one server
    (one database each) hear only their own users' events.
    """
    if db:
        return f"{PREFIX}:{db}:u:{_user(user_id)}"
    return f"{PREFIX}:u:{_user(user_id)}"


def user_epoch_key(user_id: str) -> str:
    """Under Redis Cluster, each user has an epoch of their own, in their slot: a script
    touches one slot only, and a failover of one shard resyncs only its users."""
    return f"{PREFIX}:epoch:{_user(user_id)}"


def user_epoch_ttl(history_ttl: int) -> int:
    """How long a user's epoch (and its fence) outlives their last event or connection:
    as long as their history or an unfinished task's state may."""
    return max(ACTIVE_TASK_TTL_S, history_ttl)


def user_fence_key(user_id: str) -> str:
    return f"{PREFIX}:epoch:master:{_user(user_id)}"


def task_key(user_id: str, task_id: str) -> str:
    return task_key_prefix(user_id) + task_id


def task_key_prefix(user_id: str) -> str:
    return f"{PREFIX}:task:{_user(user_id)}:"


def active_key(user_id: str) -> str:
    return f"{PREFIX}:active:{_user(user_id)}"


def history_key(user_id: str) -> str:
    return f"{PREFIX}:history:{_user(user_id)}"


def cancel_key(user_id: str, task_id: str) -> str:
    """Per user and task: one user's cancel never reaches another user's task of that id."""
    return cancel_key_prefix(user_id) + task_id


def cancel_key_prefix(user_id: str) -> str:
    return f"{PREFIX}:cancel:{_user(user_id)}:"


SNAPSHOT_SCRIPT = """
-- KEYS: active zset, history stream, epoch
-- ARGV: max tasks, task key prefix, candidate epoch, history ttl, max bytes,
--       only this task id ('' for all), under Redis Cluster the epoch's ttl (else ''),
--       and the least position wanted ('' for any) with its epoch
-- One atomic read: the unfinished tasks' states and the user's position in their
-- history (every event up to it is reflected in the states). A user without
-- history gets one: an empty stream whose last id is the position, so that resuming
-- from it replays exactly what came after, or reports the gap if the stream expired.
redis.call('SET', KEYS[3], ARGV[3], 'NX')
if ARGV[7] ~= '' then  -- under Redis Cluster, the user's own epoch: see PUBLISH_SCRIPT
  redis.call('EXPIRE', KEYS[3], ARGV[7])
end
local epoch = redis.call('GET', KEYS[3])
local max_tasks, max_bytes = tonumber(ARGV[1]), tonumber(ARGV[5])
local ids = {}
if ARGV[6] ~= '' then
  if redis.call('ZSCORE', KEYS[1], ARGV[6]) then ids[1] = ARGV[6] end
else
  ids = redis.call('ZREVRANGE', KEYS[1], 0, max_tasks)  -- one more tells truncation
end
local states, bytes, truncated = {}, 0, 0
for n, task in ipairs(ids) do
  if n > max_tasks then truncated = 1; break end
  local state = redis.call('HGETALL', ARGV[2] .. task)
  local size = 0
  for _, part in ipairs(state) do size = size + #part end
  if bytes + size > max_bytes then truncated = 1; break end
  bytes = bytes + size
  states[#states + 1] = state
end

-- The position: the last id the history gave (its newest entry's, or above it when
-- the newest were deleted or the history was moved up, below).
local position
if redis.call('EXISTS', KEYS[2]) == 1 then
  local info = redis.call('XINFO', 'STREAM', KEYS[2])
  for k = 1, #info, 2 do
    if info[k] == 'last-generated-id' then position = info[k + 1] end
  end
else
  position = redis.call('XADD', KEYS[2], '*', 'e', '')
  redis.call('XDEL', KEYS[2], position)
  redis.call('EXPIRE', KEYS[2], ARGV[4])
end

-- A client was sent events up to the least position wanted, and Redis came back from
-- a save older than them: the history moves up to where the client stood, so that ids
-- on its connection never go down. What lay between was lost, and a resume from
-- before it is told so (max-deleted-entry-id).
local function parts(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
if ARGV[8] and ARGV[8] ~= '' and ARGV[9] == epoch then
  local want_ms, want_seq = parts(ARGV[8])
  local ms, seq = parts(position)
  if want_ms and (ms < want_ms or (ms == want_ms and seq < want_seq)) then
    redis.call('XSETID', KEYS[2], ARGV[8], 'MAXDELETEDID', ARGV[8])
    position = ARGV[8]
  end
end
return {states, position, epoch, truncated}
"""

REPLAY_SCRIPT = """
-- KEYS: epoch, history stream; ARGV: the resume point (a stream id), and optionally
-- how many entries at most. One atomic read: the epoch, what came after the resume
-- point, whether the history exists, and whether the resume point is one of its
-- entries (a point that is not, and was not deleted, was lost with the data that held
-- it: Redis went back to an older save).
local after, entries = '(' .. ARGV[1]
if ARGV[2] then
  entries = redis.call('XRANGE', KEYS[2], after, '+', 'COUNT', ARGV[2])
else
  entries = redis.call('XRANGE', KEYS[2], after, '+')
end
local here = #redis.call('XRANGE', KEYS[2], ARGV[1], ARGV[1])
return {redis.call('GET', KEYS[1]), entries, redis.call('EXISTS', KEYS[2]), here}
"""

CANCEL_SCRIPT = """
-- KEYS: task hash, active zset, cancel flag; ARGV: user, task, ttl
if redis.call('HGET', KEYS[1], 'user_id') ~= ARGV[1] then return 0 end
if redis.call('ZSCORE', KEYS[2], ARGV[2]) == false then return 0 end
redis.call('SET', KEYS[3], '1', 'EX', ARGV[3])
return 1
"""


@dataclass(frozen=True)
class ScriptCall:
    keys: list[str]
    args: list[str | int | float]


def cancel_call(user_id: str, task_id: str) -> ScriptCall:
    return ScriptCall(
        keys=[task_key(user_id, task_id), active_key(user_id), cancel_key(user_id, task_id)],
        args=[user_id, task_id, ACTIVE_TASK_TTL_S],
    )


def snapshot_call(
    user_id: str,
    task_id: str | None,
    *,
    history_ttl: int,
    per_user_epoch: bool = False,
    at_least: EventId | None = None,
) -> ScriptCall:
    epoch = user_epoch_key(user_id) if per_user_epoch else EPOCH_KEY
    return ScriptCall(
        keys=[active_key(user_id), history_key(user_id), epoch],
        args=[
            MAX_SNAPSHOT_TASKS,
            task_key_prefix(user_id),
            secrets.token_hex(4),
            history_ttl,
            MAX_SNAPSHOT_BYTES,
            task_id or "",
            user_epoch_ttl(history_ttl) if per_user_epoch else "",
            *([] if at_least is None else [at_least.stream_id, at_least.epoch]),
        ],
    )


class MalformedReply(BrokerUnavailable):
    """Redis answered something the scripts never return."""


def decode_state(raw: Mapping[bytes, bytes]) -> TaskState | None:
    """A stored task state; a field that cannot be decoded is left out (and logged),
    so one bad value never fails a whole snapshot."""
    if not raw:
        return None
    stored: dict[str, Any] = {}
    for key, value in raw.items():
        if key == b"user_id":
            continue
        try:
            stored[key.decode()] = json.loads(value)
        except (ValueError, RecursionError):
            log.warning("ignoring an undecodable task field %r", key[:50])
    return full_task_state(stored)


def decode_message(data: bytes) -> Delivery | None:
    """Parse `user\ntask\nid\ntype\njson` from a user's channel, the JSON as stored
    (without its id); None if malformed.

    The header carries what fan-out needs, so the event's JSON is never decoded here.
    """
    try:
        user, task, raw_id, event_type, stored = data.split(b"\n", 4)
        user_id, task_id, kind = user.decode(), task.decode(), event_type.decode()
        event_id = EventId.parse(raw_id.decode())
    except (UnicodeDecodeError, ValueError):
        return None
    if event_id is None or not stored.startswith(b'{"'):
        return None
    if stored.startswith(b'{"id":"'):
        # From a publisher of an earlier version, which put the id in itself.
        return Delivery(user_id, task_id, event_id, kind, stored)
    return Delivery(user_id, task_id, event_id, kind, with_id(stored, event_id))
