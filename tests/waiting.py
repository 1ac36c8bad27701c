"""Bounded waits for the tests: poll a condition until it holds, or fail naming what was
awaited. `eventually` for async tests (the condition may be sync or async),
`eventually_sync` for plain code and threads.

A condition that raises fails the wait at once (a process that exited does not become
healthy by waiting); a falsy result means "not yet".
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

WAIT_S = 10.0
POLL_S = 0.05


def _timed_out(what: str, timeout: float, last: object) -> TimeoutError:
    return TimeoutError(f"timed out after {timeout}s waiting for {what} (last result: {last!r})")


async def eventually(
    condition: Callable[[], T | Awaitable[T]],
    *,
    what: str,
    timeout: float = WAIT_S,
    interval: float = POLL_S,
) -> T:
    """Call `condition` every `interval` seconds until it returns something truthy, and
    return that. The timeout bounds the whole wait, including a call that hangs."""
    last: object = None
    bound = asyncio.timeout(timeout)
    try:
        async with bound:
            while True:
                result = condition()
                if inspect.isawaitable(result):
                    result = await result
                if result:
                    return result  # type: ignore[return-value]
                last = result
                await asyncio.sleep(interval)
    except TimeoutError:
        if bound.expired():
            raise _timed_out(what, timeout, last) from None
        raise  # the condition's own TimeoutError


def eventually_sync(
    condition: Callable[[], T],
    *,
    what: str,
    timeout: float = WAIT_S,
    interval: float = POLL_S,
) -> T:
    """The blocking twin of `eventually`: the condition is called at least once, and
    again until the timeout; a call in progress is not interrupted."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise _timed_out(what, timeout, result)
        time.sleep(interval)
