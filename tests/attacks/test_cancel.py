"""Finding 5: one user's cancel never reaches another user's task of the same id."""

from __future__ import annotations

from collections.abc import Callable

import aiohttp
import pytest

from streamer.publisher import AsyncPublisher, Publisher

from ..processes import ServerProcess
from .conftest import Serve

TokenFor = Callable[..., str]
Session = Callable[[ServerProcess], aiohttp.ClientSession]


async def test_a_cancel_stays_with_the_user_who_sent_it(
    serve: Serve, session: Session, redis_url: str, token_for: TokenFor
) -> None:
    """Finding 5: alice and bob both run `report-7`; bob's `cancel_task` made alice's
    producer see `is_cancelled("report-7")`, and alice finishing or restarting her
    run wiped bob's acknowledged cancel."""
    server = serve(2)
    with Publisher(redis_url) as publisher:
        publisher.progress("alice", "report-7", progress=10)
        publisher.progress("bob", "report-7", progress=20)
        async with session(server).ws_connect(f"/ws/tasks/?token={token_for('bob')}") as ws:
            await ws.receive_json(timeout=10)
            await ws.send_json({"type": "cancel_task", "task_id": "report-7"})
            reply = await ws.receive_json(timeout=10)
        assert reply == {"type": "task_cancelled", "task_id": "report-7", "success": True}

        assert publisher.is_cancelled("bob", "report-7")
        assert not publisher.is_cancelled("alice", "report-7")
        # Alice's run ending, and her next run starting, leave bob's cancel alone.
        publisher.completed("alice", "report-7")
        publisher.progress("alice", "report-7", progress=1, status="STARTED")
        assert publisher.is_cancelled("bob", "report-7")
        assert not publisher.is_cancelled("alice", "report-7")
        # The old one-argument form could cross users: it is refused, with the fix.
        with pytest.raises(TypeError, match=r"is_cancelled\(user_id, task_id\)"):
            publisher.is_cancelled("report-7")
    async with AsyncPublisher(redis_url) as async_publisher:
        assert await async_publisher.is_cancelled("bob", "report-7")
        assert not await async_publisher.is_cancelled("alice", "report-7")
