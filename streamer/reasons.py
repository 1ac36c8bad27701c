"""Why a stream was refused or ended: one list for every transport, also the metrics label.

Each transport maps these to its own signals with one table (`handlers/ws.py`,
`handlers/sse.py`).
"""

from __future__ import annotations

import enum

# What a client is told when Redis fails it: its own error names hosts and ports of the
# private network (the worker's log and metrics have the rest).
BROKER_UNAVAILABLE_MESSAGE = "the broker is unavailable; try again"
SHUTTING_DOWN_MESSAGE = "the server is shutting down; reconnect"


class Reason(enum.Enum):
    # Refused before the stream starts.
    ORIGIN_NOT_ALLOWED = "origin_not_allowed"
    UNAUTHORIZED = "unauthorized"
    INVALID_TASK_ID = "invalid_task_id"
    TOO_MANY_CONNECTIONS = "too_many_connections"
    TOO_MANY_OPENINGS = "too_many_openings"  # the user opens streams faster than their rate
    BROKER_UNAVAILABLE = "broker_unavailable"
    AUTH_UNAVAILABLE = "auth_unavailable"  # the delegated auth service gave no answer
    SHUTTING_DOWN = "shutting_down"
    # Ended by the server.
    OVERFLOW = "overflow"  # the client did not keep up with its buffer
    STALLED = "stalled"  # a write waited longer than the send timeout
    UNRESPONSIVE = "unresponsive"  # no answer to the last WebSocket ping
    SHUTDOWN = "shutdown"  # the process is stopping or reloading
    EXPIRED = "expired"  # the access token expired
    RATE_LIMIT = "rate_limit"  # the client kept sending commands past its rate
    # The client broke the WebSocket protocol (a message too big, text not UTF-8, bad
    # framing): aiohttp closed it with the matching code (1009, 1007, 1002).
    PROTOCOL_ERROR = "protocol_error"
    ANSWERED = "answered"  # a long poll got its answer (events, or none by its timeout)
    # Ended by the client.
    CLIENT_CLOSED = "client_closed"


class Refused(Exception):
    """A stream is not admitted; `message` is for the client."""

    def __init__(self, reason: Reason, message: str, *, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.retry_after_s = retry_after_s  # when the client may try again, where known
