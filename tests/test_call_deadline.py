"""The publisher's bound on each Redis call: `asyncio.timeout`'s behaviour, one timer for
many calls."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from streamer.broker.call_deadline import CallDeadline

LIMIT_S = 0.2


async def never() -> None:
    await asyncio.get_running_loop().create_future()


async def test_a_call_past_its_limit_raises_timeout_error() -> None:
    deadline = CallDeadline(LIMIT_S)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        async with deadline:
            await asyncio.wait_for(never(), 10)  # bounded if the deadline fails
    assert LIMIT_S - 0.01 <= time.monotonic() - started < 5
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0  # its cancellation taken back


async def test_the_callers_own_cancellation_stays_a_cancellation() -> None:
    deadline = CallDeadline(LIMIT_S)
    entered = asyncio.Event()

    async def call() -> None:
        async with deadline:
            entered.set()
            await never()

    task = asyncio.ensure_future(call())
    await asyncio.wait_for(entered.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_many_calls_share_one_timer(monkeypatch: pytest.MonkeyPatch) -> None:
    """asyncio.timeout made (and cancelled) a timer for each call."""
    loop = asyncio.get_running_loop()
    timers: list[float] = []
    call_at = loop.call_at

    def counted(when: float, callback: Any, *args: Any) -> asyncio.TimerHandle:
        timers.append(when)
        return call_at(when, callback, *args)

    monkeypatch.setattr(loop, "call_at", counted)
    deadline = CallDeadline(60)
    for _ in range(1000):
        async with deadline:
            await asyncio.sleep(0)
    assert len(timers) == 1
    deadline.close()


async def test_each_call_has_its_own_limit() -> None:
    """The timer made for an earlier call fires during a later one: it is set again for
    the later call's deadline instead of cutting it short."""
    deadline = CallDeadline(LIMIT_S)
    async with deadline:
        pass
    await asyncio.sleep(LIMIT_S * 0.6)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        async with deadline:
            await asyncio.wait_for(never(), 10)
    assert time.monotonic() - started >= LIMIT_S - 0.01


async def test_a_call_right_after_another_is_not_cut_before_its_limit() -> None:
    """The earlier call's timer fires during the later one, a moment before the later
    one's deadline: it waits for it (a margin of a millisecond cut calls short)."""
    deadline = CallDeadline(LIMIT_S)
    for _ in range(5):
        async with deadline:
            pass
        started = asyncio.get_running_loop().time()
        with pytest.raises(TimeoutError):
            async with deadline:
                await asyncio.wait_for(never(), 10)
        assert asyncio.get_running_loop().time() - started >= LIMIT_S


async def test_a_call_that_returns_in_time_is_left_alone() -> None:
    deadline = CallDeadline(LIMIT_S)
    for _ in range(3):
        async with deadline:
            await asyncio.sleep(LIMIT_S / 4)
    # Past the first call's deadline, between calls: nothing is cancelled.
    await asyncio.sleep(LIMIT_S)
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0


async def test_closed_between_calls_it_leaves_nothing_scheduled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    loop = asyncio.get_running_loop()
    handles: list[asyncio.TimerHandle] = []
    call_at = loop.call_at

    def kept(when: float, callback: Any, *args: Any) -> asyncio.TimerHandle:
        handles.append(call_at(when, callback, *args))
        return handles[-1]

    monkeypatch.setattr(loop, "call_at", kept)
    deadline = CallDeadline(60)
    async with deadline:
        pass
    deadline.close()
    assert [handle.cancelled() for handle in handles] == [True]


def test_it_bounds_calls_in_each_event_loop_it_is_used_in() -> None:
    """A timer left in a loop that was closed does not stand for one in the next."""
    deadline = CallDeadline(LIMIT_S)

    async def quick() -> None:
        async with deadline:
            pass

    async def stalled() -> None:
        async with deadline:
            await asyncio.wait_for(never(), 10)

    asyncio.run(quick())
    with pytest.raises(TimeoutError):
        asyncio.run(stalled())


def test_a_timer_left_in_a_loop_used_before_leaves_the_current_one_alone() -> None:
    """Used in loop A, then in loop B, then A runs again: A's timer firing took B's
    for its own, and `close` then left B's scheduled."""
    deadline = CallDeadline(0.05)
    first, second = asyncio.new_event_loop(), asyncio.new_event_loop()
    try:

        async def quick() -> None:
            async with deadline:
                pass

        first.run_until_complete(quick())
        second.run_until_complete(quick())
        first.run_until_complete(asyncio.sleep(0.1))  # A's timer fires
        deadline.close()
        assert not [handle for handle in second._scheduled if not handle.cancelled()]  # type: ignore[attr-defined]
    finally:
        first.close()
        second.close()


async def test_one_call_at_a_time() -> None:
    deadline = CallDeadline(LIMIT_S)
    async with deadline:
        with pytest.raises(RuntimeError, match="one call at a time"):
            async with deadline:
                pass
