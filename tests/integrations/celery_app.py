"""A Celery app whose tasks report their progress to streamer (the integration tests run
it in a real worker; the README quotes it).

    celery -A tests.integrations.celery_app worker
"""

from __future__ import annotations

import datetime
import decimal
import os
import signal
import threading
import time
import uuid
from typing import Any

from celery import Celery

from streamer.integrations.celery import ProgressTask

app = Celery(
    "streamer_example",
    broker=os.environ.get("CELERY_BROKER_URL", "redis://localhost:6379/1"),
    backend=os.environ.get("CELERY_RESULT_BACKEND", "redis://localhost:6379/1"),
)
# Where streamer's Redis is (left out: STREAMER_REDIS_URL). Revoking cancelled tasks
# that never check is set with STREAMER_CELERY_REVOKE=true in the worker's environment.
app.conf.streamer_redis_url = os.environ.get("STREAMER_REDIS_URL")
app.conf.streamer_revoke_interval = 0.2


@app.task(base=ProgressTask, bind=True)
def resize_images(self: ProgressTask, count: int, *, user_id: str) -> dict[str, Any]:
    for done in range(1, count + 1):
        time.sleep(0.05)  # the work
        self.update_progress(
            100 * done / count,
            current_step=f"image {done} of {count}",
            processed_items=done,
            total_items=count,
        )
    return {"images": count}


@app.task(base=ProgressTask, bind=True)
def broken(self: ProgressTask, message: str, *, user_id: str) -> None:
    self.update_progress(10, current_step="starting")
    raise ValueError(message)


@app.task(base=ProgressTask, bind=True, max_retries=3)
def flaky(self: ProgressTask, *, user_id: str, countdown: float = 0.1) -> dict[str, Any]:
    """Fails its first run, succeeds when retried."""
    if self.request.retries == 0:
        raise self.retry(exc=ConnectionError("the upstream timed out"), countdown=countdown)
    return {"attempts": self.request.retries + 1}


# Cancelled between steps by update_progress (never revoked: it checks by itself).
@app.task(base=ProgressTask, bind=True, streamer_revoke_on_cancel=False)
def long_export(self: ProgressTask, steps: int, *, user_id: str) -> dict[str, Any]:
    for done in range(1, steps + 1):
        time.sleep(0.05)
        self.update_progress(100 * done / steps, current_step=f"page {done}")
    return {"pages": steps}


@app.task(base=ProgressTask, bind=True)
def silent_job(self: ProgressTask, seconds: float, *, user_id: str) -> dict[str, Any]:
    """Never reports progress: only revoking can stop it."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.05)
    return {"slept": seconds}


@app.task(base=ProgressTask, bind=True)
def sloppy_progress(self: ProgressTask, *, user_id: str) -> dict[str, Any]:
    """Reports computed values a little off: published as meant, or left out, never
    failing the job."""
    self.update_progress(
        (0.1 + 0.2) / 0.3 * 100,  # 100.00000000000001
        current_step="x" * 3000,
        processed_items=5.0,
        total_items=5.0,
    )
    self.update_progress(150)  # no progress: logged, not published
    self.update_progress(50, current_step=3)  # type: ignore[arg-type]  # the same
    self.update_progress(1e-300)  # published, without an estimate past any calendar
    return {"done": True}


@app.task(base=ProgressTask, bind=True, max_retries=1)
def retried_at_once(self: ProgressTask, *, user_id: str) -> dict[str, Any]:
    """Retried with no countdown: the next run may start before this one has ended."""
    if self.request.retries == 0:
        raise self.retry(countdown=0)
    return {"attempts": self.request.retries + 1}


@app.task(base=ProgressTask, bind=True)
def ended_abruptly(self: ProgressTask, how: str, *, user_id: str) -> None:
    """Ends where Celery calls none of the task's hooks."""
    from celery.exceptions import Ignore, Reject  # here: the README quotes the imports above

    self.update_progress(50, current_step="halfway")
    if how == "killed":  # as the OOM killer would
        os.kill(os.getpid(), signal.SIGKILL)
    if how == "rejected":
        raise Reject("the input is gone", requeue=False)
    raise Ignore()


@app.task(base=ProgressTask, bind=True, time_limit=1)
def hard_limited(self: ProgressTask, *, user_id: str) -> None:
    """Killed by its hard time limit."""
    self.update_progress(10, current_step="started")
    time.sleep(30)


class DiskFull(Exception):
    """An exception Celery cannot pickle (it holds an open resource)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


@app.task(base=ProgressTask, bind=True)
def unpicklable_failure(self: ProgressTask, *, user_id: str) -> None:
    raise DiskFull("the disk is full")


@app.task(base=ProgressTask, bind=True)
def django_values(self: ProgressTask, *, user_id: str) -> dict[str, Any]:
    """Reports and returns what a Django app has at hand: lazy translation strings,
    Decimals, UUIDs, dates."""
    from django.utils.functional import lazy

    step = lazy(lambda: "Importing", str)()
    self.update_progress(
        decimal.Decimal("50"),
        current_step=step,
        processed_items=decimal.Decimal(3),
        total_items=decimal.Decimal("6.0"),
    )
    return {
        "amount": decimal.Decimal("12.50"),
        "id": uuid.UUID(int=7),
        "at": datetime.datetime(2030, 1, 31, 12, 0, tzinfo=datetime.UTC),
        "day": datetime.date(2030, 1, 31),
        "label": step,
    }


@app.task(base=ProgressTask, bind=True)
def broken_lazy_text(self: ProgressTask, *, user_id: str) -> dict[str, Any]:
    """A lazy string whose text fails to be made, in a report."""
    from django.utils.functional import lazy

    def failing() -> str:
        raise KeyError("name")

    self.update_progress(50, current_step=lazy(failing, str)())
    return {"done": True}
