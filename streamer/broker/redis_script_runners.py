"""Running a script on a connection directly, the way publishing does: redis-py's
command machinery (pool checkout, argument encoding, retries, timeouts per socket
operation) costs more than the encoding of a small batch of events.

A failed call is not retried: the script may have run before the connection failed.
Each runner's `unanswered` says whether its last call was sent (or may have been) and
its reply not read: where it was never sent (no connection), it did not run.
`each` runs calls one after the other and builds the next one (the caller's iterator
takes its next step) while Redis runs the one before; it sends it only once the reply
before it was taken, so a caller that stops at a reply has sent nothing after it.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import AsyncGenerator, Generator, Iterator, Sequence
from typing import Any

import redis
import redis.asyncio as aioredis
import redis.asyncio.cluster as aiocluster
import redis.cluster as synccluster
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import NoScriptError

from .call_deadline import CallDeadline
from .redis_connect import closed_by_server, current_master, watches_master
from .redis_schema import ScriptCall

Argument = str | int | float
CALL_TIMEOUT_S = 5.0


def resp_command(parts: Sequence[Argument]) -> bytes:
    """A command in the Redis protocol, encoded as redis-py encodes it."""
    encoded = [part.encode() if isinstance(part, str) else repr(part).encode() for part in parts]
    chunks = [b"*%d\r\n" % len(encoded)]
    for part in encoded:
        chunks += (b"$%d\r\n" % len(part), part, b"\r\n")
    return b"".join(chunks)


class _ThreadsCalls(threading.local):
    """A synchronous runner's `unanswered`, for each thread: a `Publisher` is shared
    between threads, and one thread's call must not answer for another's."""

    unanswered = False


class PooledScript:
    """A script run on a connection of a synchronous client's pool: safe between threads,
    and the pool checks each connection it hands out."""

    def __init__(self, client: redis.Redis, script: str) -> None:
        self._pool = client.connection_pool
        self._script = script
        self._sha = hashlib.sha1(script.encode()).hexdigest()
        self._calls = _ThreadsCalls()

    @property
    def unanswered(self) -> bool:
        return self._calls.unanswered

    def each(self, calls: Iterator[ScriptCall]) -> Generator[object, None, None]:
        # redis-py's synchronous connections carry no type annotations.
        state = self._calls
        state.unanswered = False
        connection: Any = self._pool.get_connection()
        try:
            call = next(calls, None)
            while call is not None:
                try:
                    state.unanswered = True
                    self._send(connection, call)
                    following = next(calls, None)
                    reply = self._reply(connection, call)
                    state.unanswered = False
                except BaseException:
                    connection.disconnect()  # part of a reply may be left unread
                    raise
                yield reply
                call = following
        finally:
            self._pool.release(connection)

    def _send(self, connection: Any, call: ScriptCall) -> None:
        command = ["EVALSHA", self._sha, len(call.keys), *call.keys, *call.args]
        connection.send_packed_command([resp_command(command)])

    def _reply(self, connection: Any, call: ScriptCall) -> object:
        try:
            return connection.read_response()
        except NoScriptError:
            connection.send_command("SCRIPT", "LOAD", self._script)
            connection.read_response()
            self._send(connection, call)
            return connection.read_response()


class HeldScript:
    """A script run on an asyncio connection of its own, one call at a time, each call
    bounded as a whole by the client's socket timeout."""

    def __init__(self, client: aioredis.Redis, script: str) -> None:
        pool = client.connection_pool
        self._pool = pool
        self._behind_sentinel = watches_master(pool)
        self._settings = {**pool.connection_kwargs, "socket_timeout": None}
        self._connection_class: type[AbstractConnection] = pool.connection_class
        # The client's, or (when it was given none) what redis-py's connections default
        # to: a call is never left waiting for ever.
        timeout: float = pool.connection_kwargs.get("socket_timeout") or CALL_TIMEOUT_S
        self._deadline = CallDeadline(timeout)
        self._script = script
        self._sha = hashlib.sha1(script.encode()).hexdigest()
        self._connection: AbstractConnection | None = None
        self.unanswered = False

    async def each(self, calls: Iterator[ScriptCall]) -> AsyncGenerator[object, None]:
        self.unanswered = False
        call = next(calls, None)
        while call is not None:
            try:
                async with self._deadline:
                    # Connecting is bounded too: a stalled Redis accepts the connection
                    # and never answers its handshake.
                    connection = await self._usable_connection()
                    self.unanswered = True
                    await self._send(connection, call)
                    following = next(calls, None)
                    reply = await self._reply(connection, call)
                    self.unanswered = False
            except BaseException:
                # A failed, timed out or cancelled call may leave part of a reply unread.
                await self.close()
                raise
            yield reply
            call = following

    async def _send(self, connection: AbstractConnection, call: ScriptCall) -> None:
        command = ["EVALSHA", self._sha, len(call.keys), *call.keys, *call.args]
        await connection.send_packed_command(resp_command(command), check_health=True)

    async def _reply(self, connection: AbstractConnection, call: ScriptCall) -> object:
        try:
            return await connection.read_response()
        except NoScriptError:
            await connection.send_command("SCRIPT", "LOAD", self._script)
            await connection.read_response()
            await self._send(connection, call)
            return await connection.read_response()

    async def _usable_connection(self) -> AbstractConnection:
        """The held connection, checked first (Redis may have closed it, a restart), so
        that a restarted Redis costs no failed call."""
        if self._behind_sentinel and self._connection is not None and self._connection.is_connected:
            # Behind Sentinel: a connection to a replaced master is not used again.
            master = await current_master(self._pool)
            if master is not None and master != _address(self._connection):
                await self.close()
        if self._connection is not None and closed_by_server(self._connection):
            await self.close()
        if self._connection is None:
            connection = self._connection_class(**self._settings)
            # Connected here, not by its first command, which would skip how a connection
            # behind Sentinel finds the master (redis-py's default address instead).
            try:
                await connection.connect()  # type: ignore[no-untyped-call]
            except BaseException:
                await connection.disconnect(nowait=True)
                raise
            self._connection = connection
        return self._connection

    async def close(self) -> None:
        self._deadline.close()
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.disconnect(nowait=True)


def _address(connection: AbstractConnection) -> tuple[str, int] | None:
    host, port = getattr(connection, "host", None), getattr(connection, "port", None)
    return None if host is None or port is None else (host, int(port))


class ClusterScript:
    """A script run through a Redis Cluster client, which sends it to the master of its
    keys' slot (following MOVED and ASK) and loads it there when missing."""

    def __init__(self, client: aiocluster.RedisCluster, script: str) -> None:
        self._script = client.register_script(script)
        self.unanswered = False  # the cluster client does not say whether it sent a call

    async def each(self, calls: Iterator[ScriptCall]) -> AsyncGenerator[object, None]:
        """One call at a time: the calls of a batch go to the masters of their users."""
        for call in calls:
            self.unanswered = True
            reply = await self._script(keys=call.keys, args=call.args)
            self.unanswered = False
            yield reply

    async def close(self) -> None:
        """Nothing is held: the cluster client's pools own the connections."""


class ClusterScriptSync:
    """The synchronous twin of `ClusterScript`."""

    def __init__(self, client: synccluster.RedisCluster, script: str) -> None:
        self._script = client.register_script(script)
        self._calls = _ThreadsCalls()

    @property
    def unanswered(self) -> bool:
        return self._calls.unanswered

    def each(self, calls: Iterator[ScriptCall]) -> Generator[object, None, None]:
        state = self._calls
        for call in calls:
            state.unanswered = True
            reply = self._script(keys=call.keys, args=call.args)
            state.unanswered = False
            yield reply


AsyncScriptRunner = HeldScript | ClusterScript
SyncScriptRunner = PooledScript | ClusterScriptSync


def held_script(client: aioredis.Redis | aiocluster.RedisCluster, script: str) -> AsyncScriptRunner:
    if isinstance(client, aiocluster.RedisCluster):
        return ClusterScript(client, script)
    return HeldScript(client, script)


def pooled_script(client: redis.Redis | synccluster.RedisCluster, script: str) -> SyncScriptRunner:
    if isinstance(client, synccluster.RedisCluster):
        return ClusterScriptSync(client, script)
    return PooledScript(client, script)
