"""Who may open a stream, and with what: one check for every transport.

Origin, request parameters and credentials, in that order; any refusal is one
`Refused` with its reason, which each transport turns into its own signal.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from ..app_keys import BROKER, CONFIG, DELEGATED_AUTH, HUB, OPENING_BUCKETS
from ..auth.credentials import authenticate, uses_cookie_credentials
from ..auth.delegated import AuthUnavailable
from ..auth.origin import origin_allowed
from ..auth.sessions import SessionStoreUnavailable
from ..auth.tokens import Identity, InvalidToken
from ..broker.base import BrokerUnavailable
from ..connection import Connection
from ..events import EventError, validate_task_id
from ..opening import Opening, read_opening
from ..rate_limit import TokenBucket
from ..reasons import BROKER_UNAVAILABLE_MESSAGE, SHUTTING_DOWN_MESSAGE, Reason, Refused
from ..request_query import QueryError, query_value
from ..wire import EventId, Transport

MAX_EVENT_ID_LENGTH = 200
# A resume point that is no event's: the client gets `recovered: false` and a snapshot.
UNUSABLE_EVENT_ID = "unusable"
# How long an opening past its user's rate may wait for its turn before it is refused.
MAX_OPENING_WAIT_S = 1.0
# The longest a stream's opening may wait for the broker (its user's subscription, then
# the snapshot and the replay's first page, each read retried while Redis is away) before
# it is refused as unavailable. The client sees nothing of a stream until then, and
# streamer.js takes an event stream silent for 12 s for one a proxy holds back.
OPENING_DEADLINE_S = 10.0


@dataclass(frozen=True)
class Admission:
    identity: Identity
    task_id: str | None
    last_event_id: str | None


def check_origin(request: web.Request, what: str = "read the stream") -> None:
    """Cross-site pages may not read streams (or use the task API); requests that ride
    on a cookie must come from the service's own or a listed origin, even when `*` is
    configured."""
    allowed = request.app[CONFIG].allowed_origins
    delegated = DELEGATED_AUTH in request.app
    cookie = uses_cookie_credentials(request, delegated=delegated)
    if not origin_allowed(request, allowed, wildcard=not cookie):
        raise Refused(Reason.ORIGIN_NOT_ALLOWED, f"this origin may not {what}")


def cookie_usable(request: web.Request) -> bool:
    """Whether the request's cookies may vouch for it (see `authenticate`)."""
    return origin_allowed(request, request.app[CONFIG].allowed_origins, wildcard=False)


def stream_params(
    request: web.Request, *, last_event_header: bool
) -> tuple[str | None, str | None]:
    """`?task_id=` narrows to one task; `?last_event_id=` (or the SSE header) resumes."""
    try:
        task_id = query_value(request, "task_id")
        if task_id is not None:
            task_id = validate_task_id(task_id)
    except (QueryError, EventError) as exc:
        raise Refused(Reason.INVALID_TASK_ID, str(exc)) from None
    last_event_id = request.headers.get("Last-Event-ID") if last_event_header else None
    if not (last_event_id and last_event_id.strip()):  # an empty header is no id
        try:
            last_event_id = query_value(request, "last_event_id")
        except QueryError:  # the client resumes, from where is not known
            last_event_id = UNUSABLE_EVENT_ID
    if last_event_id is not None:
        # An unusable id is not an error: the client gets recovered=false and a snapshot.
        last_event_id = last_event_id.strip()[:MAX_EVENT_ID_LENGTH] or None
    return task_id, last_event_id


async def admit(request: web.Request, *, last_event_header: bool) -> Admission:
    """Raises Refused (origin, parameters, credentials, session store); each refusal
    is counted by its reason."""
    try:
        return await _admit(request, last_event_header=last_event_header)
    except Refused as refusal:
        request.app[HUB].refused[refusal.reason] += 1
        raise


async def _admit(request: web.Request, *, last_event_header: bool) -> Admission:
    check_origin(request)
    task_id, last_event_id = stream_params(request, last_event_header=last_event_header)
    try:
        identity = await authenticate(
            request,
            request.app[CONFIG].secret,
            request.app.get(DELEGATED_AUTH),
            cookie_usable=cookie_usable(request),
        )
    except InvalidToken as exc:
        raise Refused(Reason.UNAUTHORIZED, str(exc)) from None
    except AuthUnavailable as exc:
        raise Refused(Reason.AUTH_UNAVAILABLE, f"{exc}; try again") from None
    except SessionStoreUnavailable:
        raise Refused(Reason.BROKER_UNAVAILABLE, BROKER_UNAVAILABLE_MESSAGE) from None
    return Admission(identity, task_id, last_event_id)


def connection_for(
    request: web.Request,
    admission: Admission,
    transport: Transport,
    close_transport: Callable[[Reason, bool], asyncio.Future[object] | None],
    out: asyncio.Transport | None = None,
) -> Connection:
    """The hub's connection object for an admitted stream, writing to its socket (or
    to `out`)."""
    if out is None:
        out = request.transport
    assert out is not None
    expires_at = admission.identity.expires_at
    return Connection(
        user_id=admission.identity.user_id,
        task_id=admission.task_id,
        transport=transport,
        out=out,
        drain=request.writer.drain,
        close_transport=close_transport,
        broker=request.app[BROKER],
        limits=request.app[HUB].limits,
        expires_at=expires_at if math.isfinite(expires_at) else None,
    )


async def open_stream(
    request: web.Request,
    connection: Connection,
    *,
    last_event_id: str | None,
    encode_snapshot: Callable[[str, EventId], bytes],
) -> Opening:
    """Count the connection in at the hub and read what it gets first (snapshot, the
    replay's first page), in the user's turn (`_take_turn`). Raises Refused; when it
    fails in any way, the client going away while Redis is slow included, the
    connection is no longer counted."""
    hub = request.app[HUB]
    hub.check_admissible(connection.user_id)  # at once, before a turn is taken for it
    turn = await _take_turn(request, connection.user_id)
    try:
        async with asyncio.timeout(OPENING_DEADLINE_S) as deadline:
            with hub.opening(deadline):  # which comes at once if the process shuts down
                return await _attach_and_read(
                    request, connection, turn, last_event_id, encode_snapshot
                )
    except TimeoutError:
        if hub.shutting_down:
            hub.refused[Reason.SHUTTING_DOWN] += 1
            raise Refused(Reason.SHUTTING_DOWN, SHUTTING_DOWN_MESSAGE) from None
        hub.refused[Reason.BROKER_UNAVAILABLE] += 1
        raise Refused(Reason.BROKER_UNAVAILABLE, BROKER_UNAVAILABLE_MESSAGE) from None


async def _attach_and_read(
    request: web.Request,
    connection: Connection,
    turn: TokenBucket,
    last_event_id: str | None,
    encode_snapshot: Callable[[str, EventId], bytes],
) -> Opening:
    hub = request.app[HUB]
    try:
        await hub.attach(connection)
    except BaseException:  # refused, or the client went away: nothing was read for it
        turn.give_back()
        raise
    opened = False
    try:
        opening = await read_opening(
            request.app[BROKER],
            connection,
            last_event_id=last_event_id,
            encode_snapshot=encode_snapshot,
        )
        opened = True
        return opening
    except BrokerUnavailable:
        hub.refused[Reason.BROKER_UNAVAILABLE] += 1
        raise Refused(Reason.BROKER_UNAVAILABLE, BROKER_UNAVAILABLE_MESSAGE) from None
    finally:
        if not opened:
            hub.detach(connection, None)


async def _take_turn(request: web.Request, user_id: str) -> TokenBucket:
    """Each opening reads the user's snapshot (and replay) from the broker: a user who
    opens streams faster than `openings_per_s`, past a burst, waits for their turn
    (a long poll answered again and again gathers more events per answer), and is
    refused when it is more than MAX_OPENING_WAIT_S away. Taken before the connection
    counts, so that a user's routing does not churn with every refused one; returns
    the user's bucket, to give the turn back if nothing is read in it."""
    bucket = request.app[OPENING_BUCKETS].get(user_id)
    wait_s = bucket.reserve(MAX_OPENING_WAIT_S)
    if wait_s is None:
        request.app[HUB].refused[Reason.TOO_MANY_OPENINGS] += 1
        rate = request.app[CONFIG].openings_per_s
        raise Refused(
            Reason.TOO_MANY_OPENINGS,
            f"streams opened too fast (at most {rate:g} per second for a user); retry later",
            retry_after_s=bucket.retry_after_s(),
        )
    if wait_s > 0:
        try:
            await asyncio.sleep(wait_s)
        except asyncio.CancelledError:  # the client went away while it waited
            bucket.give_back()
            raise
    return bucket
