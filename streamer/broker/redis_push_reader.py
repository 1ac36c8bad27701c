"""What Redis sends on the subscriber connection, read in the socket's own callback.

redis-py opens the connection (URL, credentials, TLS, Sentinel, database) and sends its
commands, as for any client. Its `PubSub.get_message` would then wake a task and climb
half a dozen coroutines for every message: at one event a millisecond that cost a
worker about 25 microseconds of CPU per event, of the 210 that S1 cost in all.
Here the connection's transport hands each read to hiredis (the parser redis-py itself
uses) at once, and every reply parsed from it goes on in one list: no task and no
await per message, and events read together are handed on together.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import hiredis
from redis.asyncio.connection import AbstractConnection

from .redis_connect import redis_failure

log = logging.getLogger(__name__)

Reply = object


class PushReader(asyncio.Protocol):
    """Stands in for redis-py's stream protocol on one connection: reads go to
    `on_replies`; everything else (flow control, end of stream, loss) to the protocol
    it replaced, so that redis-py still writes and closes the connection as usual."""

    def __init__(
        self, replaced: asyncio.BaseProtocol, on_replies: Callable[[list[Reply]], None]
    ) -> None:
        self._replaced = replaced
        self._on_replies = on_replies
        self._parser = hiredis.Reader()
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.lost_because = ""

    @classmethod
    def install(
        cls, connection: AbstractConnection, on_replies: Callable[[list[Reply]], None]
    ) -> PushReader:
        """Take over the reads of `connection`, which must be open with nothing of
        Redis's unread (no command sent since it connected)."""
        writer = getattr(connection, "_writer", None)  # redis-py keeps its StreamWriter there
        if not isinstance(writer, asyncio.StreamWriter) or writer.transport.is_closing():
            raise ConnectionError("the subscriber connection is not open")
        transport = writer.transport
        reader = cls(transport.get_protocol(), on_replies)
        transport.set_protocol(reader)
        return reader

    def fail(self, reason: str) -> None:
        """The connection is no longer to be trusted; whoever awaits `lost` learns why."""
        if not self.lost.done():
            self.lost_because = reason
            self.lost.set_result(None)

    # --- the transport's callbacks ----------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.lost.done():
            return  # given up: nothing more is handed on from this connection
        parser = self._parser
        parser.feed(data)
        replies = []
        try:
            while (reply := parser.gets()) is not False:
                replies.append(reply)
        except hiredis.ProtocolError as exc:
            self.fail(f"Redis sent something that is not its protocol: {exc}")
        if replies:
            try:
                self._on_replies(replies)
            except Exception as exc:
                log.exception("handling what Redis sent on the subscriber connection failed")
                self.fail(f"handling what Redis sent failed: {exc!r}")

    def eof_received(self) -> bool | None:
        self._replaced.eof_received()  # type: ignore[attr-defined]
        self.fail("Redis closed the subscriber connection")
        return False  # close the transport: nothing more comes

    def connection_lost(self, exc: Exception | None) -> None:
        self._replaced.connection_lost(exc)
        reason = "closed" if exc is None else redis_failure(exc)
        self.fail(f"the subscriber connection was lost ({reason})")

    def pause_writing(self) -> None:
        self._replaced.pause_writing()

    def resume_writing(self) -> None:
        self._replaced.resume_writing()
