"""While Redis does not answer, a worker process stops waiting on it and keeps the task
ends it could not publish, to send them once Redis answers again.

A stalled Redis (paused, partitioned: connections hang rather than fail) costs each call
the publisher's timeout; a task reporting its progress at every step would wait it out
at every step. After a failure, `Outage` says to skip what can be lost (progress, a
cancel check) for a while; `KeptEnds` holds what must not be (SUCCESS, FAILURE,
REVOKED) and a thread of the process sends it, in order, when the outage is over: each
only if its task is still running on the streams (a command that timed out may have run
all the same, once Redis woke up; a task the streams never showed needs no end).
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from ..events import TaskEvent
from ..publisher import BrokerUnavailable, Publisher

log = logging.getLogger(__name__)

# After Redis failed to answer, how long calls that can be skipped are.
OUTAGE_S = 15.0
# How often kept ends are tried again, how long each is kept, and how many at most.
RETRY_EVERY_S = 2.0
KEEP_FOR_S = 600.0
MAX_KEPT = 10_000


class Outage:
    """Whether Redis failed to answer in the last OUTAGE_S seconds (in this process)."""

    def __init__(self) -> None:
        self._until = 0.0

    @property
    def ongoing(self) -> bool:
        return time.monotonic() < self._until

    def began(self, exc: BrokerUnavailable) -> None:
        """A call failed: skip what can be skipped for OUTAGE_S (said once per outage)."""
        if not self.ongoing:
            log.warning(
                "Redis does not answer (%s): progress reports and cancel checks are skipped "
                "for %ss, task ends are kept and sent when it answers",
                exc,
                OUTAGE_S,
            )
        self._until = time.monotonic() + OUTAGE_S


@dataclass(frozen=True)
class _Kept:
    event: TaskEvent
    publisher: Callable[[], Publisher]
    expires: float


class KeptEnds:
    """Task ends to send once Redis answers again, oldest first, by a thread of this
    process (made when the first is kept; a forked child starts with none)."""

    def __init__(self, outage: Outage) -> None:
        self._outage = outage
        self._lock = threading.Lock()
        self._sending = threading.Lock()  # the thread, or the flush at exit
        self._kept: deque[_Kept] = deque()
        self._closed = threading.Event()
        self._pid = 0  # the process whose thread sends them

    def keep(self, event: TaskEvent, publisher: Callable[[], Publisher]) -> None:
        with self._lock:
            if self._pid != os.getpid():  # inherited through fork: the parent's to send
                self._kept.clear()
                self._pid = os.getpid()
                threading.Thread(target=self._run, name="streamer-kept-ends", daemon=True).start()
            if len(self._kept) >= MAX_KEPT:
                dropped = self._kept.popleft()
                log.error("task %s: its end is dropped (too many kept)", dropped.event.task_id)
            expires = time.monotonic() + KEEP_FOR_S
            self._kept.append(_Kept(event, publisher, expires))

    def __len__(self) -> int:
        with self._lock:
            return len(self._kept) if self._pid == os.getpid() else 0

    def close(self) -> None:
        """Stop this process's thread (what is kept stays kept)."""
        self._closed.set()

    def _run(self) -> None:
        while not self._closed.wait(RETRY_EVERY_S):
            if not self._outage.ongoing:
                self.send()

    def send(self) -> None:
        """Send what is kept, in order; stop at the first call Redis does not answer."""
        with self._sending:
            self._send()

    def _send(self) -> None:
        while True:
            with self._lock:
                if not self._kept or self._pid != os.getpid():
                    return
                kept = self._kept[0]
            event = kept.event
            if time.monotonic() > kept.expires:
                log.error("task %s: its end is dropped (Redis did not answer)", event.task_id)
            else:
                try:
                    publisher = kept.publisher()
                    if publisher.is_running(event.user_id, event.task_id):
                        publisher.publish(event)
                except BrokerUnavailable as exc:
                    self._outage.began(exc)
                    return
                except Exception:  # one bad entry must not hold the others back
                    log.exception("task %s: its end could not be sent", event.task_id)
            with self._lock:
                if self._kept and self._kept[0] is kept:
                    self._kept.popleft()

    def send_at_exit(self, **_: object) -> None:
        """What is kept, sent before the process exits if Redis answers now, outage or
        not (one call's timeout at most); what is left is said."""
        self.send()
        left = len(self)
        if left:
            log.error("%d task end(s) not published: Redis did not answer", left)


OUTAGE = Outage()
KEPT_ENDS = KeptEnds(OUTAGE)
atexit.register(KEPT_ENDS.send_at_exit)
