"""Full passes of the cyclic garbage collector kept short on a process with many streams.

A full pass walks every object the collector tracks, and each open stream holds about
60 (aiohttp's request, its tasks and coroutines). CPython starts one whenever what
survived since the last has grown by a quarter, so while 10,000 clients connect to a
worker it stops the worker again and again, for up to half a second at the end. On
uvloop, a stream's objects are freed by reference counting when it ends (none are left
in cycles: tests/test_gc_passes.py), so once a full pass has found objects alive they
are frozen (`gc.freeze`): the next full passes walk only what came after them. In case
old objects do end up in a cycle, one pass every RESCAN_AFTER_S walks everything again.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Callable
from typing import Any

RESCAN_AFTER_S = 3600.0


def freezes_safely(loop: asyncio.AbstractEventLoop) -> bool:
    """On uvloop (the workers' loop), a stream leaves nothing in cycles when it ends; on
    the standard loop, each socket transport is a cycle of its own (its read callback
    is a bound method it holds), which frozen would wait for the hourly pass."""
    return type(loop).__module__.partition(".")[0] == "uvloop"


def freeze_startup_objects() -> int:
    """Modules, the app, its routes and the broker live as long as the process, yet each
    full pass would walk them all: frozen (as gunicorn's docs advise), they leave those
    passes. Garbage is collected first, so that only live objects are frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


class SurvivorFreezer:
    """A `gc.callbacks` entry: freezes what each full pass found alive."""

    def __init__(
        self, *, clock: Callable[[], float] = time.monotonic, rescan_after_s: float = RESCAN_AFTER_S
    ) -> None:
        self._clock = clock
        self._rescan_after_s = rescan_after_s
        self._walked_at = clock()  # when a full pass last walked everything
        self._rescanning = False
        self.rescans = 0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase != "stop" or info.get("generation") != 2:
            return
        now = self._clock()
        gc.freeze()
        if self._rescanning:  # this pass walked everything
            self._rescanning = False
            self._walked_at = now
        elif now - self._walked_at >= self._rescan_after_s:
            gc.unfreeze()  # the next full pass walks everything
            self._rescanning = True
            self.rescans += 1

    def install(self) -> None:
        if self not in gc.callbacks:
            gc.callbacks.append(self)

    def uninstall(self) -> None:
        if self in gc.callbacks:
            gc.callbacks.remove(self)
