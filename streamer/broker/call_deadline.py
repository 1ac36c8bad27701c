"""`asyncio.timeout` for calls made one after the other, with one timer for many calls.

`asyncio.timeout` makes a timer for each call and cancels it when the call returns: for
a publisher making thousands of short calls a second, that cost more than the rest of
its own work on each call. Here each call notes its deadline; one timer, made for the
first, is set again for the latest deadline when it fires before it, and cancels the
call that is past it.
"""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Any


class CallDeadline:
    """`async with deadline:` bounds what it holds to `limit_s` seconds, raising
    `TimeoutError` past it, as `asyncio.timeout(limit_s)` does; one call at a time."""

    __slots__ = ("_cancelling", "_deadline", "_expired", "_limit_s", "_loop", "_task", "_timer")

    def __init__(self, limit_s: float) -> None:
        self._limit_s = limit_s
        self._deadline = 0.0
        self._task: asyncio.Task[Any] | None = None
        self._cancelling = 0
        self._expired = False
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the timer's

    async def __aenter__(self) -> None:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("CallDeadline must be used inside a task")
        if self._task is not None:
            raise RuntimeError("CallDeadline bounds one call at a time")
        loop = task.get_loop()
        self._deadline = loop.time() + self._limit_s
        self._task, self._cancelling, self._expired = task, task.cancelling(), False
        if self._timer is None or self._loop is not loop:  # (another loop's does nothing)
            self._timer, self._loop = loop.call_at(self._deadline, self._on_timer, loop), loop

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        task, self._task = self._task, None
        # As asyncio.timeout: the cancellation it made is taken back (uncancel), and a
        # cancellation of the caller's own stays one.
        if (
            self._expired
            and task is not None
            and task.uncancel() <= self._cancelling
            and exc_type is asyncio.CancelledError
        ):
            raise TimeoutError from exc

    def close(self) -> None:
        """Drop the timer (between calls), so that nothing is left scheduled."""
        if self._task is None and self._timer is not None:
            self._timer.cancel()
            self._timer = self._loop = None

    def _on_timer(self, loop: asyncio.AbstractEventLoop) -> None:
        if loop is not self._loop:  # a timer left in a loop used before
            return
        task = self._task
        if task is None:  # no call now: the next one sets a timer again
            self._timer = self._loop = None
            return
        if loop.time() < self._deadline:  # a later call's deadline (or a timer a tick early)
            self._timer = loop.call_at(self._deadline, self._on_timer, loop)
            return
        self._timer = None
        self._expired = True
        task.cancel()
