"""How a connection that keeps failing is logged: the first failure, then a reminder
now and then, not a line per attempt (each worker retries every second while Redis is
down, which is a line per worker per second)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

REMIND_EVERY_S = 60.0


class OutageLog:
    """The first failure of an outage at WARNING, the attempts after it at DEBUG but
    one each `remind_every_s` (at WARNING, with how long it lasts), and its end."""

    __slots__ = ("_clock", "_failures", "_last_warned", "_log", "_remind_every_s", "_since")

    def __init__(
        self,
        log: logging.Logger,
        *,
        remind_every_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = log
        self._remind_every_s = REMIND_EVERY_S if remind_every_s is None else remind_every_s
        self._clock = clock
        self._failures = 0
        self._since = 0.0
        self._last_warned = 0.0

    def failed(self, message: str, *, level: int = logging.WARNING, exc_info: bool = False) -> None:
        now = self._clock()
        self._failures += 1
        if self._failures == 1:
            self._since = self._last_warned = now
            self._log.log(level, "%s", message, exc_info=exc_info)
        elif now - self._last_warned >= self._remind_every_s:
            self._last_warned = now
            lasting = self._lasting(now)
            self._log.log(level, "%s (failing for %s)", message, lasting, exc_info=exc_info)
        else:
            self._log.debug("%s", message, exc_info=exc_info)

    def ended(self) -> str:
        """How the outage went, for the line that says it is over ('' if there was
        none); the next failure starts a new one."""
        if not self._failures:
            return ""
        failures, self._failures = self._failures, 0
        attempts = "attempt" if failures == 1 else "attempts"
        return f" after {failures} failed {attempts} over {self._lasting(self._clock())}"

    def _lasting(self, now: float) -> str:
        lasting = now - self._since
        return f"{lasting:.1f}s" if lasting < 10 else f"{lasting:.0f}s"
