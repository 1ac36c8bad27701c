"""The publish script: one EVALSHA publishes a batch of events (one or many), whatever
the number of subscribers. For each event it updates the task's state hash and the
user's active set, appends the event to the user's history stream and PUBLISHes it on
the user's channel (`redis_schema` has the keys); and here, how events are encoded for
it and how its reply is read.
"""

from __future__ import annotations

import functools
import random
import re
import time
from collections.abc import Sequence
from typing import NamedTuple

from ..events import (
    EVENT_STATE_FIELDS,
    TASK_STATE_FIELDS,
    BuiltFields,
    EventError,
    TaskEvent,
    dumps,
    validated,
)
from .base import ACTIVE_TASK_TTL_S
from .redis_schema import (
    EPOCH_KEY,
    MalformedReply,
    ScriptCall,
    active_key,
    cancel_key_prefix,
    history_key,
    task_key_prefix,
    user_channel,
)

PUBLISH_SCRIPT = """
-- Publishes a batch of events in order. Each event's state update, history entry and
-- PUBLISH belong to the same script run, so each event is atomic; what only the
-- batch's end result needs is written once per task and user, after the last event:
-- a task's hash (its values merged in event order), trimming, TTLs.
-- KEYS: epoch
-- ARGV: history size, history ttl, active ttl, candidate epoch, now in microseconds,
--       the batch (below), and under Redis Cluster the epoch's ttl.
--       The batch: pieces separated by NUL (no piece contains one), where counts and
--       numbers are two characters each (`NUMBER_TEXT`):
--         number of users, then per user: id, task key prefix, active key,
--           history key, cancel key prefix, channel
--         number of tasks, then per task: user number, task id, task id as JSON
--         number of layouts (the names an event's values go with), then per layout:
--           type, then three lists of names, each preceded by its length: the event's
--           fields, values set after them, values set only where the state has none
--         number of events, then per event: its task's and its layout's numbers, right
--           before the first of its values (no NUL between): one JSON value per name
--           of its layout
-- Returns the epoch, the events' stream ids separated by spaces, and an error or
-- nothing, on three lines: on an error the ids are those of the events before the
-- one that failed, and nothing after it was published.
local history_size = math.max(tonumber(ARGV[1]), 1)
local history_ttl, active_ttl, created = ARGV[2], ARGV[3], tonumber(ARGV[5])
local data, pos = ARGV[6], 1
local data_end = #data + 1
local call, concat, format = redis.call, table.concat, string.format
local byte, find, sub = string.byte, string.find, string.sub

local function piece()
  local stop = find(data, '\\0', pos, true) or data_end
  local text = sub(data, pos, stop - 1)
  pos = stop + 1
  return text
end

-- A count or a number: two characters (`NUMBER_TEXT`), read as bytes, and the NUL after.
local function number()
  local high, low = byte(data, pos, pos + 1)
  pos = pos + 3
  return (high - 48) * 64 + low - 48
end

local function names()
  local list = {}
  for k = 1, number() do
    list[k] = piece()
  end
  return list
end

local epoch = call('GET', KEYS[1])
if not epoch then
  epoch = ARGV[4]
  call('SET', KEYS[1], epoch)
end
if ARGV[7] then
  -- Under Redis Cluster a user's own epoch lasts as long as anything of theirs may.
  call('EXPIRE', KEYS[1], ARGV[7])
end

-- Tables are made with every key they will hold (false until it is known): growing a
-- table one key at a time costs a rehash at each power of two.
local users = {}
for n = 1, number() do
  users[n] = {id = piece(), task_prefix = piece(), active = piece(), history = piece(),
              cancel_prefix = piece(), channel = piece(), length = false, fresh = false,
              active_used = false}
end
-- Per task: its user, id and keys; once it has an event, whether it is active,
-- whether it is finished, whether its hash is to be replaced, the values to set, the
-- values to set if absent, what is stored, its event's JSON in pieces and its TTL.
local tasks = {}
for n = 1, number() do
  local user = users[number()]
  local id = piece()
  tasks[n] = {user = user, id = id, json = piece(), key = user.task_prefix .. id,
              cancel = user.cancel_prefix .. id, active = false, finished = false,
              reset = false, values = false, if_absent = false, stored = false,
              parts = false, ttl = false}
end
-- Where each name goes among the JSON pieces (`json_parts`), nil if it is not a
-- field of the JSON.
local FIELD_AT = {__FIELD_AT__}
local layouts = {}
for n = 1, number() do
  local kind = piece()
  local fields, stamps, if_absent = names(), names(), names()
  layouts[n] = {kind = kind, terminal = kind == 'task_completed', fields = fields,
                stamps = stamps, if_absent = if_absent}
end

-- A task's values to set: its user id and task id, and the fields of its events.
local function new_values(task)
  local values = {user_id = task.user.id, __NO_VALUES__}
  values.task_id = task.json
  return values
end

local function start(task)
  local user = task.user
  task.active = call('ZSCORE', user.active, task.id) ~= false
  task.reset, task.values, task.if_absent = false, new_values(task), {}
  -- What is stored, for the full state every event carries. A task that is not active
  -- and has completed has finished: its next event starts a new run, from a clean state.
  local stored, flat = {__NO_VALUES__}, call('HGETALL', task.key)
  for k = 1, #flat, 2 do
    stored[flat[k]] = flat[k + 1]
  end
  task.stored = stored
  task.finished = not task.active and stored.completed_at ~= false
end

-- The event's JSON (without its id) in pieces, kept per task and updated event by
-- event: its type, then the task's full state after it, field by field as
-- `events.event_json` writes it: what this batch set, else what is stored, else what
-- is set only where the state has none.
local STATE_FIELDS = {__STATE_FIELDS__}
local function json_parts(task)
  -- The type, the task id, then per field its key (',"name":') and its value.
  local parts = {__JSON_PARTS__}
  parts[4] = task.json
  local values, stored, if_absent, reset = task.values, task.stored, task.if_absent, task.reset
  for k = 1, #STATE_FIELDS do
    local name = STATE_FIELDS[k]
    local value = values[name]
    if not value and not reset then
      value = stored[name]
    end
    if not value then
      value = if_absent[name]
    end
    if not value then
      value = name == 'result_data' and '{}' or 'null'
    end
    parts[4 + 2 * k] = value
  end
  return parts
end

local stream_ids = {}
local function publish(n)
  -- Two numbers of two characters each, read without making strings of them.
  local t1, t2, l1, l2 = byte(data, pos, pos + 3)
  pos = pos + 4
  local task = tasks[(t1 - 48) * 64 + t2 - 48]
  local layout = layouts[(l1 - 48) * 64 + l2 - 48]
  local user = task.user
  -- Every key the event writes is read first (its type checked): an event that fails
  -- fails before it changed anything, stored or to be stored. The history's length,
  -- once known, has the user's history trimmed after the loop: it is read last.
  if not task.values then
    start(task)
  end
  if not user.length then
    user.length = call('XLEN', user.history)
    user.fresh = user.length == 0 and call('EXISTS', user.history) == 0
  end
  if not task.active and task.finished then
    -- A new run of a finished task id starts from a clean state.
    task.reset, task.values, task.if_absent, task.parts = true, new_values(task), {}, false
  end
  local values, if_absent = task.values, task.if_absent
  local parts = task.parts
  if not parts then
    parts = json_parts(task)
    task.parts = parts
  end
  parts[2] = layout.kind
  -- The event's values, read as `piece` does, without a function call for each.
  local list = layout.fields
  for k = 1, #list do
    local stop = find(data, '\\0', pos, true) or data_end
    local value = sub(data, pos, stop - 1)
    pos = stop + 1
    if value ~= 'null' then
      local name = list[k]
      values[name] = value
      local at = FIELD_AT[name]
      if at then
        parts[at] = value
      end
    end
  end
  list = layout.stamps
  for k = 1, #list do
    local stop = find(data, '\\0', pos, true) or data_end
    local value = sub(data, pos, stop - 1)
    pos = stop + 1
    local name = list[k]
    values[name] = value
    local at = FIELD_AT[name]
    if at then
      parts[at] = value
    end
  end
  list = layout.if_absent
  for k = 1, #list do
    local stop = find(data, '\\0', pos, true) or data_end
    local value = sub(data, pos, stop - 1)
    pos = stop + 1
    local name = list[k]
    if not values[name] and not if_absent[name] then
      if_absent[name] = value
      local at = FIELD_AT[name]
      if at and (task.reset or not task.stored[name]) then
        parts[at] = value
      end
    end
  end

  if layout.terminal then
    call('ZREM', user.active, task.id)
    call('DEL', task.cancel)
    task.active, task.finished, task.ttl = false, true, history_ttl
  else
    if not task.active then
      -- A new run of this task id: a cancellation of an earlier run does not apply.
      -- Whole microseconds: Redis keeps an integer score as an integer, where a
      -- fraction would be parsed again for each task that it passes on every insert.
      call('ZADD', user.active, format('%d', created + n), task.id)
      call('DEL', task.cancel)
    end
    task.active, task.finished, task.ttl = true, false, active_ttl
    user.active_used = true
  end

  -- One concatenation of every piece (`..` copies them once; `table.concat` costs a
  -- call per piece).
  local json = __JOIN_PARTS__
  local stream_id = call('XADD', user.history, '*', 'e', json)
  if user.fresh then
    -- A history that expired and starts again: earlier resume points are gaps.
    call('XSETID', user.history, stream_id, 'ENTRIESADDED', 1, 'MAXDELETEDID', stream_id)
    user.fresh = false
  end
  user.length = user.length + 1
  -- The channel's message: user, task, id and type on a line each, then the event's
  -- JSON as stored, which the subscriber puts the id in (each string the script makes
  -- costs Redis a pass over its bytes).
  call('PUBLISH', user.channel, user.id .. '\\n' .. task.id .. '\\n' .. epoch .. '-'
    .. stream_id .. '\\n' .. layout.kind .. '\\n' .. json)
  stream_ids[n] = stream_id
end

local failure = ''
for n = 1, number() do
  local ok, err = pcall(publish, n)
  if not ok then
    failure = type(err) == 'table' and tostring(err.err) or tostring(err)
    break
  end
end

for _, task in ipairs(tasks) do
  if task.ttl then
    if task.reset then
      call('DEL', task.key)
    end
    local hash, size = {__HASH_SLOTS__}, 0
    for name, value in pairs(task.values) do
      if value then
        size = size + 2
        hash[size - 1], hash[size] = name, value
      end
    end
    -- Nothing wrote the task's hash since it was read: what it holds is `stored`.
    local stored = task.reset and {} or task.stored
    for name, value in pairs(task.if_absent) do
      if not task.values[name] and not stored[name] then
        size = size + 2
        hash[size - 1], hash[size] = name, value
      end
    end
    call('HSET', task.key, unpack(hash, 1, size))
    call('EXPIRE', task.key, task.ttl)
  end
end
for _, user in ipairs(users) do
  if user.length then
    -- The last entry dropped goes with XDEL, which records max-deleted-entry-id: that
    -- tells a resuming client whether anything after its last id was dropped. XTRIM
    -- records nothing, but drops the older ones without reading them into the script.
    local excess = user.length - history_size
    if excess > 1 then
      call('XTRIM', user.history, 'MAXLEN', history_size + 1)
    end
    if excess > 0 then
      call('XDEL', user.history, call('XRANGE', user.history, '-', '+', 'COUNT', 1)[1][1])
    end
    call('EXPIRE', user.history, history_ttl)
    if user.active_used then
      call('EXPIRE', user.active, active_ttl)
    end
  end
end
return epoch .. '\\n' .. concat(stream_ids, ' ') .. '\\n' .. failure
"""


def _lua_constants(script: str) -> str:
    fields = EVENT_STATE_FIELDS
    json_parts = ['\'{"type":"\'', "''", '\'","task_id":\'', "''"]
    for name in fields:
        json_parts += [f"',\"{name}\":'", "''"]
    values = ("task_id", *fields)
    replacements = {
        "__STATE_FIELDS__": ", ".join(f"'{name}'" for name in fields),
        "__FIELD_AT__": ", ".join(f"{name} = {4 + 2 * k}" for k, name in enumerate(fields, 1)),
        "__JSON_PARTS__": ", ".join([*json_parts, "'}'"]),
        "__NO_VALUES__": ", ".join(f"{name} = false" for name in values),
        "__HASH_SLOTS__": ", ".join(["false"] * 2 * (len(values) + 1)),  # and user_id
        "__JOIN_PARTS__": " .. ".join(f"parts[{n}]" for n in range(1, len(json_parts) + 2)),
    }
    for placeholder, text in replacements.items():
        script = script.replace(placeholder, text)
    return script


PUBLISH_SCRIPT = _lua_constants(PUBLISH_SCRIPT)
# Under Redis Cluster: sharded pub/sub (a user's channel is in the user's slot, and
# only that shard's nodes pass the message on), and one user per call, whose epoch
# key is KEYS[1].
CLUSTER_PUBLISH_SCRIPT = PUBLISH_SCRIPT.replace("call('PUBLISH',", "call('SPUBLISH',")
assert CLUSTER_PUBLISH_SCRIPT != PUBLISH_SCRIPT

# An event's type, and the names of its fields, of its stamps and of its if-absent stamps.
Layout = tuple[str, tuple[str, ...], tuple[str, ...], tuple[str, ...]]


class EncodedEvent(NamedTuple):
    """An event as the publish script reads it: its layout (type and the names its
    values go with) and `text`, its values."""

    user_id: str
    task_id: str
    layout: Layout
    text: str


_EVENT_TYPES = frozenset({"task_progress", "task_completed"})
_FIELD_NAMES = frozenset(TASK_STATE_FIELDS)


# Values `dumps` encodes whatever they hold.
_ALWAYS_ENCODABLE = frozenset({str, int, bool, type(None)})


def check_event(event: TaskEvent) -> TaskEvent:
    """`event`, if `encode_event` can encode it; else the error it would raise. A batch is
    checked whole before any of it is encoded, so that a malformed event stops it
    before anything is sent."""
    if not isinstance(event, TaskEvent):
        raise TypeError(f"expected a TaskEvent, got {type(event).__name__}")
    event = validated(event)  # one made by hand
    fields = event.fields
    key = _shape_key(event)
    if key is None or key not in _SHAPES:
        _check_shape(event)
        if key is not None:
            _remember(key, event)
    # JSON text never holds a NUL or a newline (they are escaped), nor do the ids of
    # validated events: an event built by hand must not shift the pieces of the other
    # events of its batch, nor the lines of its channel message.
    task_id, user_id = event.task_id, event.user_id
    if "\0" in task_id or "\0" in user_id or "\n" in task_id or "\n" in user_id:
        raise EventError(_MALFORMED)
    for value in fields.values():
        if type(value) not in _ALWAYS_ENCODABLE:
            dumps(value)  # raises for what JSON cannot carry
    if type(event.published_at) not in _ALWAYS_ENCODABLE:
        dumps(event.published_at)  # the value of its stamps
    return event


_MALFORMED = "malformed event: build events with progress_event or completed_event"


def _check_shape(event: TaskEvent) -> None:
    """What events of one shape (`_shape_key`) have in common: their type, the names of
    their fields (an event built by hand must not break its own JSON with a field name
    of its own) and their stamps."""
    stamps, if_absent = event.state_stamps()
    if event.type not in _EVENT_TYPES or not _FIELD_NAMES.issuperset(event.fields):
        raise EventError(_MALFORMED)
    for values in (stamps, if_absent):
        for value in values.values():
            if type(value) not in _ALWAYS_ENCODABLE:
                dumps(value)


def encode_event(event: TaskEvent) -> EncodedEvent:
    """Each value is JSON-encoded once: the script builds the event's JSON and its state
    update (see `TaskEvent.state_update`) from the same pieces. `event` must have
    passed `check_event`."""
    fields = event.fields
    key = _shape_key(event)
    shape = _SHAPES.get(key) if key is not None else None
    if shape is None:
        shape = _shape(event) if key is None else _remember(key, event)
    layout, stamps = shape
    now = dumps(event.published_at)
    pieces = list(map(dumps, fields.values()))
    pieces += [now if stamp is None else stamp for stamp in stamps]
    return EncodedEvent(event.user_id, event.task_id, layout, "\0".join(pieces))


def _shape_key(event: TaskEvent) -> tuple[str, str, tuple[str, ...]] | None:
    """What `state_stamps` gives depends on the type and the status only: events of the
    same type, status and field names share their layout and their stamps' shape."""
    fields = event.fields
    if type(fields) is not BuiltFields:
        return None
    status = fields.get("status")
    return (event.type, status, tuple(fields)) if type(status) is str else None


def _remember(key: tuple[str, str, tuple[str, ...]], event: TaskEvent) -> _Shape:
    if len(_SHAPES) >= _MAX_SHAPES:
        _SHAPES.clear()
    shape = _SHAPES[key] = _shape(event)
    return shape


# A layout, and each of its stamps' text, None where it is the event's `published_at`.
_Shape = tuple["Layout", tuple[str | None, ...]]
_SHAPES: dict[tuple[str, str, tuple[str, ...]], _Shape] = {}
_MAX_SHAPES = 1024


def _shape(event: TaskEvent) -> _Shape:
    stamps, if_absent = event.state_stamps()
    now = event.published_at
    texts = tuple(
        None if value is now else dumps(value) for value in (*stamps.values(), *if_absent.values())
    )
    return (event.type, tuple(event.fields), tuple(stamps), tuple(if_absent)), texts


# Task and layout numbers in the batch, two characters from "0" to "o" each: the script
# reads them as bytes.
NUMBER_TEXT = tuple(chr(48 + (n >> 6)) + chr(48 + (n & 63)) for n in range(64 * 64))


@functools.lru_cache(maxsize=4096)  # the same users come back batch after batch
def _user_pieces(user_id: str, db: int) -> tuple[str, ...]:
    return (
        user_id,
        task_key_prefix(user_id),
        active_key(user_id),
        history_key(user_id),
        cancel_key_prefix(user_id),
        user_channel(user_id, db),
    )


@functools.lru_cache(maxsize=256)
def _layout_pieces(layout: Layout) -> tuple[str, ...]:
    kind, *groups = layout
    pieces = [kind]
    for names in groups:
        pieces += (NUMBER_TEXT[len(names)], *names)
    return tuple(pieces)


def _candidate_epoch() -> str:
    """The epoch to take if Redis has none (it lost its data): only needs to differ from
    the earlier ones. `random`, unlike `secrets`, costs no system call on every publish,
    and is seeded again in every forked process."""
    return f"{random.getrandbits(32):08x}"


def publish_call(
    events: Sequence[EncodedEvent],
    *,
    history_size: int,
    history_ttl: int,
    epoch_key: str = EPOCH_KEY,
    epoch_ttl: int | None = None,
    db: int = 0,
) -> ScriptCall:
    """One script call publishing `events` in order (at most `len(NUMBER_TEXT) - 1`)."""
    if len(events) >= len(NUMBER_TEXT):
        raise ValueError(f"at most {len(NUMBER_TEXT) - 1} events per script call")
    users: dict[str, str] = {}
    tasks: dict[tuple[str, str], str] = {}
    layouts: dict[Layout, str] = {}
    user_pieces: list[str] = []
    task_pieces: list[str] = []
    layout_pieces: list[str] = []
    body: list[str] = []
    for user_id, task_id, layout, text in events:
        task = tasks.get((user_id, task_id))
        if task is None:
            user = users.get(user_id)
            if user is None:
                user = users[user_id] = NUMBER_TEXT[len(users) + 1]
                user_pieces += _user_pieces(user_id, db)
            task = tasks[user_id, task_id] = NUMBER_TEXT[len(tasks) + 1]
            task_pieces += (user, task_id, dumps(task_id))
        shape = layouts.get(layout)
        if shape is None:
            shape = layouts[layout] = NUMBER_TEXT[len(layouts) + 1]
            layout_pieces += _layout_pieces(layout)
        body.append(task + shape + text)
    batch = "\0".join(
        [
            NUMBER_TEXT[len(users)], *user_pieces, NUMBER_TEXT[len(tasks)], *task_pieces,
            NUMBER_TEXT[len(layouts)], *layout_pieces, NUMBER_TEXT[len(events)], *body,
        ]
    )  # fmt: skip
    return ScriptCall(
        keys=[epoch_key],
        args=[
            history_size,
            history_ttl,
            max(ACTIVE_TASK_TTL_S, history_ttl),
            _candidate_epoch(),
            time.time_ns() // 1000,  # the order tasks started in: their score
            batch,
            *([] if epoch_ttl is None else [epoch_ttl]),
        ],
    )


_STREAM_IDS = re.compile(rb"(?:[0-9]{1,20}-[0-9]{1,20}(?: [0-9]{1,20}-[0-9]{1,20})*)?")
_EPOCH = re.compile(rb"[0-9a-f]{8,32}")


class PublishReply(NamedTuple):
    """The publish script's reply: the ids of the events published, in order; `error`
    (if any) is why the next one failed, and nothing after it was published."""

    epoch: str
    stream_ids: list[str]
    error: str | None


def publish_reply(raw: object, events: int) -> PublishReply:
    if isinstance(raw, bytes) and raw.count(b"\n") >= 2:
        epoch, ids, error = raw.split(b"\n", 2)
        if _EPOCH.fullmatch(epoch) and _STREAM_IDS.fullmatch(ids):
            stream_ids = ids.decode().split()
            complete = len(stream_ids) == events and not error
            if complete or (len(stream_ids) < events and error):
                return PublishReply(epoch.decode(), stream_ids, error.decode() or None)
    raise MalformedReply(f"Redis returned a malformed reply to a publish: {raw!r:.200}")
