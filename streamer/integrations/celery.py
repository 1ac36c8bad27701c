"""Celery tasks that report their progress to streamer (`pip install streamer[celery]`).

    from celery import Celery
    from streamer.integrations.celery import ProgressTask

    app = Celery("jobs", broker=..., backend=...)
    app.conf.streamer_redis_url = "redis://localhost:6379/0"  # or STREAMER_REDIS_URL

    @app.task(base=ProgressTask, bind=True)
    def import_rows(self, path, *, user_id):
        rows = read(path)
        for done, row in enumerate(rows, 1):
            save(row)
            self.update_progress(100 * done / len(rows), current_step=f"row {done}",
                                 processed_items=done, total_items=len(rows))
        return {"rows": len(rows)}

    import_rows.delay("data.csv", user_id=request.user.id)

The task's user is its `user_id` argument (`streamer_user_kwarg` names another one), the
streamer task id is the Celery task id, and `task_name` is the task's name. PENDING is
published when the task is sent (`delay`, `apply_async`: the sending process needs the
Redis URL too), so a queued task is on the streams and can be cancelled. Celery's own
hooks publish the rest: STARTED before the task runs, SUCCESS (with the returned dict as
`result_data`), FAILURE (with the error message), RETRY. `update_progress` publishes
PROGRESS with an estimated completion time from the rate of progress so far.

Cancellation: `update_progress` checks whether the user cancelled the task; if so it
publishes REVOKED, stores REVOKED as the task's Celery state and raises `TaskCancelled`,
which ends the task (let it propagate). A run that starts after a cancel (a retry that
was waiting for its countdown) ends the same way before the task's code runs.

Tasks that never call `update_progress` can be revoked instead: with
`app.conf.streamer_revoke_on_cancel = True` (or STREAMER_CELERY_REVOKE=true in the
worker's environment, or the task attribute `streamer_revoke_on_cancel = True`), each
worker polls the cancel flags of the ProgressTasks it is running (every
`streamer_revoke_interval` seconds, default 1) and revokes a cancelled one with
`app.control.revoke(task_id, terminate=True)`; REVOKED is published once Celery has
terminated it. Terminating needs a pool that can terminate a
running task (prefork, the default), not `--pool=solo` or `threads`.

The service is not involved in revoking: it records the cancel flag in Redis as it does
for any producer, and the workers, which know their Celery app, act on it.
"""

from __future__ import annotations

import contextlib
import decimal
import inspect
import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, date, datetime
from datetime import time as time_of_day
from typing import Any, ClassVar
from uuid import UUID

from celery import Celery, Task, states
from celery.exceptions import Ignore, Reject, WorkerLostError
from celery.signals import (
    task_failure,
    task_postrun,
    task_revoked,
    worker_process_shutdown,
    worker_ready,
    worker_shutdown,
)
from celery.utils import uuid
from celery.utils.serialization import UnpickleableExceptionWrapper
from celery.worker import state as worker_state

from ..events import (
    MAX_TEXT_LENGTH,
    EventError,
    TaskEvent,
    completed_event,
    progress_event,
    validate_identifier,
    validate_task_id,
)
from ..publisher import BrokerUnavailable, NoRedisURL, Publisher
from .kept_ends import KEPT_ENDS, OUTAGE

__all__ = ["ProgressTask", "TaskCancelled", "publisher_for"]

log = logging.getLogger(__name__)

DEFAULT_REVOKE_INTERVAL_S = 1.0


class TaskCancelled(Ignore):
    """Raised by `ProgressTask.update_progress` when the user cancelled the task.

    An `Ignore`: Celery neither retries it (even with `autoretry_for`) nor stores a
    result over the REVOKED state already stored; catching it keeps the task running.
    """


# --- One publisher per worker process, made when first needed -----------------------------

_publishers_lock = threading.Lock()
_publishers: dict[tuple[int, str | None], Publisher] = {}


def publisher_for(app: Celery) -> Publisher:
    """This process's publisher for `app`: Redis from `app.conf.streamer_redis_url`, else
    STREAMER_REDIS_URL. Made on first use, so a prefork child never shares its parent's
    connections."""
    url = app.conf.get("streamer_redis_url") or None
    pid = os.getpid()
    with _publishers_lock:
        publisher = _publishers.get((pid, url))
        if publisher is None:
            # Entries of another pid were inherited through fork: not ours to use or close.
            for key in [key for key in _publishers if key[0] != pid]:
                del _publishers[key]
            publisher = _publishers[(pid, url)] = Publisher(url)
        return publisher


_told_unconfigured: set[int] = set()


def _unconfigured(exc: NoRedisURL) -> None:
    """No Redis URL in this worker: its jobs run unreported; said once per process."""
    pid = os.getpid()
    if pid not in _told_unconfigured:
        _told_unconfigured.add(pid)
        log.error("ProgressTask progress is not published from this process: %s", exc)


def _describe(exc: BaseException) -> str:
    """An exception as a user reads it: its message, or its type when it has none."""
    if isinstance(exc, UnpickleableExceptionWrapper):
        # What Celery hands on_failure for an exception it cannot pickle: its str() is
        # the original's repr; its arguments are the original's (made picklable).
        args = tuple(exc.exc_args or ())
        text = str(args[0]) if len(args) == 1 else str(args) if args else ""
        return text or str(exc.exc_cls_name or "") or type(exc).__name__
    return str(exc) or type(exc).__name__


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _publishable(text: str) -> str:
    """`text` as an event carries it: valid Unicode (a lone surrogate, as in a file name
    Python could not decode, becomes U+FFFD) and at most MAX_TEXT_LENGTH long."""
    text = _LONE_SURROGATE.sub("\ufffd", text)
    return text if len(text) <= MAX_TEXT_LENGTH else text[: MAX_TEXT_LENGTH - 1] + "…"


def _lazy_text(value: object) -> bool:
    """Whether `value` is a Django lazy translation string (`gettext_lazy`), which a
    Django app passes wherever it passes text."""
    functional = sys.modules.get("django.utils.functional")
    return functional is not None and isinstance(value, functional.Promise)


def _text(value: Any) -> Any:
    """Text as an event carries it (`_publishable`), a lazy translation string too (one
    that fails to make its text is left as it is, and refused)."""
    if _lazy_text(value):
        with contextlib.suppress(Exception):
            value = str(value)
    return _publishable(value) if isinstance(value, str) else value


def _number(value: Any) -> Any:
    """A float or Decimal that is a whole number as an int (an item count computed as
    5.0), another Decimal as a float."""
    if isinstance(value, decimal.Decimal) and value.is_finite():
        # Past 19 digits no count is meant (and int() of 1e999999 makes a million digits).
        whole = value.adjusted() < 19 and value == value.to_integral_value()
        value = int(value) if whole else float(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _json_value(value: object) -> object:
    """For `json.dumps(default=...)`: the values of a Django app's results that JSON has
    no type for: dates and times in ISO 8601, the others as their text."""
    if isinstance(value, datetime | date | time_of_day):
        return value.isoformat()
    if isinstance(value, decimal.Decimal | UUID) or _lazy_text(value):
        return str(value)
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _percent(value: Any) -> Any:
    """A computed percentage a rounding error put just outside 0..100, put back in."""
    if isinstance(value, decimal.Decimal) and value.is_finite():
        value = float(value)
    if isinstance(value, float) and -1e-6 < value < 0:
        return 0
    if isinstance(value, float) and 100 < value < 100 + 1e-6:
        return 100
    return value


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def _flag(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"{name} must be true or false, got {raw!r}")


class ProgressTask(Task):
    """A Celery task base class that publishes the task's progress to streamer."""

    #: The task argument that holds the user id (by keyword, or by position in the
    #: task's signature).
    streamer_user_kwarg: ClassVar[str] = "user_id"
    #: Published as the task's `category`.
    streamer_category: ClassVar[str | None] = None
    #: Revoke the task when the user cancels it; None: the app's
    #: `streamer_revoke_on_cancel`, else STREAMER_CELERY_REVOKE, else False.
    streamer_revoke_on_cancel: ClassVar[bool | None] = None

    # --- What the task calls -------------------------------------------------------------

    def update_progress(
        self,
        progress: float,
        current_step: str | None = None,
        processed_items: int | None = None,
        total_items: int | None = None,
    ) -> str | None:
        """Publish PROGRESS (0..100) and return the event id; None outside a task or
        without a user, or when the values cannot be published (logged: a progress
        report never fails the job). Raises `TaskCancelled` when the user cancelled
        the task."""
        request = self.request
        user_id = self.streamer_user_id(request.args or (), request.kwargs or {})
        if request.id is None or user_id is None or not self._streamable(request.id):
            return None
        started_at = getattr(request, "streamer_started_at", None)
        progress = _percent(progress)
        event: TaskEvent | None = None
        try:
            event = progress_event(
                user_id,
                request.id,
                status="PROGRESS",
                progress=progress,
                current_step=_text(current_step),
                processed_items=_number(processed_items),
                total_items=_number(total_items),
                task_name=self.name,
                category=self.streamer_category,
                estimated_completion=self._estimated_completion(progress, started_at),
            )
        except EventError as exc:
            log.warning("task %s[%s]: progress not published: %s", self.name, request.id, exc)
        if self._cancelled(user_id, request.id):
            self._end_cancelled(user_id, request.id)
        return None if event is None else self._publish(event)

    # --- Sending ---------------------------------------------------------------------------

    def apply_async(
        self,
        args: Any = None,
        kwargs: Any = None,
        task_id: Any = None,
        producer: Any = None,
        link: Any = None,
        link_error: Any = None,
        shadow: Any = None,
        **options: Any,
    ) -> Any:
        """Celery's, publishing PENDING first: a queued task is on its user's streams
        (in `active_tasks`, `get_task_status`), and a cancel reaches it before it
        starts. A retry is not queued anew (RETRY says it)."""
        user_id = None
        if not options.get("retries"):
            task_id = task_id or uuid()
            user_id = self._publish_pending(task_id, args or (), kwargs or {})
        send = super().apply_async
        try:
            return send(  # type: ignore[no-untyped-call]
                args, kwargs, task_id, producer, link, link_error, shadow, **options
            )
        except Exception as exc:
            if user_id is not None:
                if self.app.conf.task_always_eager:
                    # Run here, its exception propagated (task_eager_propagates): Celery
                    # calls no on_failure then.
                    self._ended_without_hooks(user_id, task_id, "FAILURE", _describe(exc))
                else:
                    self._not_sent(user_id, task_id, exc)
            raise

    def _publish_pending(self, task_id: str, args: Any, kwargs: Any) -> str | None:
        """The task's user, when its PENDING was published."""
        user_id = self.streamer_user_id(args, kwargs)
        if user_id is None or not self._streamable(task_id):
            return None
        self._publish_beginning(user_id, task_id, "PENDING")
        return user_id

    def _not_sent(self, user_id: str, task_id: str, exc: Exception) -> None:
        """Sending failed (Celery's broker down, arguments it cannot encode): the task
        published as PENDING ends FAILURE, unless it ended already (run eagerly)."""
        message = _publishable(f"the task could not be sent: {_describe(exc)}")
        self._end_if_running(
            completed_event(user_id, task_id, status="FAILURE", error_message=message)
        )

    def _publish_beginning(
        self, user_id: str, task_id: str, status: str, *, retried: bool = False
    ) -> None:
        """PENDING when sent, STARTED when it starts: at 0 %, with its name; a retry's
        run without the step RETRY showed ("retrying after: ..."), which the task's end
        would otherwise still show."""
        self._publish(
            progress_event(
                user_id,
                task_id,
                status=status,
                progress=0,
                current_step="" if retried else None,
                task_name=self.name,
                category=self.streamer_category,
            )
        )

    # --- Celery's hooks --------------------------------------------------------------------

    def before_start(self, task_id: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
        self.request.streamer_started_at = time.time()
        user_id = self.streamer_user_id(args, kwargs)
        if user_id is None:
            log.warning(
                "task %s[%s] has no %r argument: its progress is not published",
                self.name,
                task_id,
                self.streamer_user_kwarg,
            )
            return
        if not self._streamable(task_id, warn=True):
            return
        if self._cancelled(user_id, task_id):  # while queued or waiting for a retry
            self._end_cancelled(user_id, task_id)
        self._publish_beginning(user_id, task_id, "STARTED", retried=bool(self.request.retries))

    def on_success(
        self, retval: Any, task_id: str, args: Sequence[Any], kwargs: Mapping[str, Any]
    ) -> None:
        user_id = self.streamer_user_id(args, kwargs)
        if user_id is None or not self._streamable(task_id):
            return
        result = (
            retval if isinstance(retval, dict) else {} if retval is None else {"result": retval}
        )
        try:
            event = completed_event(user_id, task_id, status="SUCCESS", result_data=result)
        except EventError as exc:
            try:  # with its dates, Decimals, UUIDs and lazy text as Django writes them
                plain = json.loads(json.dumps(result, default=_json_value))
                event = completed_event(user_id, task_id, status="SUCCESS", result_data=plain)
            except Exception as again:  # a lazy string's own failure among them
                problem = again if isinstance(again, EventError) else exc
                log.warning("task %s[%s]: result not published (%s)", self.name, task_id, problem)
                event = completed_event(user_id, task_id, status="SUCCESS")
        self._publish(event, end=True)

    def on_failure(
        self,
        exc: BaseException,
        task_id: str,
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        einfo: Any,
    ) -> None:
        user_id = self.streamer_user_id(args, kwargs)
        if user_id is None or not self._streamable(task_id):
            return
        message = _publishable(_describe(exc))
        event = completed_event(user_id, task_id, status="FAILURE", error_message=message)
        self._publish(event, end=True)

    def on_retry(
        self,
        exc: BaseException,
        task_id: str,
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        einfo: Any,
    ) -> None:
        if getattr(self.request, "streamer_retry_published", False):
            return  # by `retry`, before the next run was sent
        self._publish_retry(self.streamer_user_id(args, kwargs), task_id, exc)

    def retry(
        self,
        args: Any = None,
        kwargs: Any = None,
        exc: BaseException | None = None,
        throw: bool = True,
        eta: Any = None,
        countdown: Any = None,
        max_retries: int | None = None,
        **options: Any,
    ) -> Any:
        """Celery's, publishing RETRY before the next run is sent, not after (in
        `on_retry`): that run could start and even finish first (a countdown of 0, another
        worker process), and RETRY then showed a running or finished task as retrying."""
        request = self.request
        limit = self.max_retries if max_retries is None else max_retries
        if not request.called_directly and (limit is None or request.retries < limit):
            reason = exc if exc is not None else sys.exc_info()[1]
            args_now, kwargs_now = request.args or (), request.kwargs or {}
            self._publish_retry(self.streamer_user_id(args_now, kwargs_now), request.id, reason)
            request.streamer_retry_published = True
        return super().retry(  # type: ignore[no-untyped-call]
            args, kwargs, exc, throw, eta, countdown, max_retries, **options
        )

    def _publish_retry(
        self, user_id: str | None, task_id: str | None, exc: BaseException | None
    ) -> None:
        if user_id is None or task_id is None or not self._streamable(task_id):
            return
        step = "retrying" if exc is None else _publishable(f"retrying after: {_describe(exc)}")
        self._publish(progress_event(user_id, task_id, status="RETRY", current_step=step))

    def on_replace(self, sig: Any) -> Any:
        """Replaced (`raise self.replace(...)`): the replacement runs under this task's id
        and reports only if it is a ProgressTask too."""
        replacement = self.app.tasks.get(getattr(sig, "task", None) or "")
        if not isinstance(replacement, ProgressTask):
            log.warning(
                "task %s[%s] replaced by %s, which is not a ProgressTask: its end is not published",
                self.name,
                self.request.id,
                getattr(sig, "task", sig),
            )
        self.request.streamer_replaced = True
        return super().on_replace(sig)  # type: ignore[no-untyped-call]

    # --- Helpers -------------------------------------------------------------------------

    def streamer_user_id(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> str | None:
        """The user of one call: the `streamer_user_kwarg` argument, by keyword or by
        its position in the task's signature, as the user id streams know (a number or
        a UUID as its text); None when the call has none, or none that can be one (the
        job runs all the same, its progress unpublished)."""
        name = self.streamer_user_kwarg
        found: object | None = None
        if name in kwargs:
            found = kwargs[name]
        elif args:
            try:
                found = inspect.signature(self.run).bind_partial(*args).arguments.get(name)
            except (TypeError, ValueError):
                return None
        if found is None:
            return None
        try:
            return validate_identifier(name, found)
        except EventError as exc:
            log.warning("task %s: progress not published: %s", self.name, exc)
            return None

    def _streamable(self, task_id: str, *, warn: bool = False) -> bool:
        """Whether the task id can name a task on a stream; one chosen by hand
        (`apply_async(task_id=...)`) may not be (the job runs all the same, its
        progress unpublished)."""
        try:
            validate_task_id(task_id)
        except EventError as exc:
            if warn:
                log.warning("task %s[%r]: progress not published: %s", self.name, task_id, exc)
            return False
        return True

    def streamer_revokes(self) -> bool:
        """Whether a cancel request revokes this task (see the module's docstring)."""
        if self.streamer_revoke_on_cancel is not None:
            return self.streamer_revoke_on_cancel
        setting = self.app.conf.get("streamer_revoke_on_cancel")
        if setting is not None:
            return bool(setting)
        return _flag("STREAMER_CELERY_REVOKE", os.environ.get("STREAMER_CELERY_REVOKE", ""))

    @staticmethod
    def _estimated_completion(progress: object, started_at: float | None) -> str | None:
        if started_at is None or isinstance(progress, bool):
            return None
        if not isinstance(progress, int | float) or not 0 < progress <= 100:
            return None
        now = time.time()
        try:
            return _iso(started_at + (now - started_at) * 100 / progress)
        except (OverflowError, ValueError, OSError):  # a progress so small it never ends
            return None

    def _publish(self, event: TaskEvent, *, end: bool = False) -> str | None:
        """Progress reports never fail the job: an unreachable Redis is logged, and while
        it does not answer they are skipped; a task's `end` is kept and sent when it
        answers again (`kept_ends`)."""
        if OUTAGE.ongoing:
            if end:
                KEPT_ENDS.keep(event, self._publisher)
            return None
        try:
            return publisher_for(self.app).publish(event)
        except NoRedisURL as exc:
            _unconfigured(exc)
        except BrokerUnavailable as exc:
            OUTAGE.began(exc)
            log.warning("task %s[%s]: not published now: %s", self.name, event.task_id, exc)
            if end:
                KEPT_ENDS.keep(event, self._publisher)
        return None

    def _publisher(self) -> Publisher:
        return publisher_for(self.app)

    def _cancelled(self, user_id: object, task_id: str) -> bool:
        if OUTAGE.ongoing:
            return False
        try:
            return publisher_for(self.app).is_cancelled(user_id, task_id)
        except NoRedisURL as exc:
            _unconfigured(exc)
        except BrokerUnavailable as exc:
            OUTAGE.began(exc)
            log.warning("task %s[%s]: cancel flag not read: %s", self.name, task_id, exc)
        return False

    def _end_if_running(self, event: TaskEvent) -> None:
        """`event`, the task's end, unless it ended already (a hook that did run, an
        event that came first); kept for later, with that condition, while Redis does
        not answer."""
        if not OUTAGE.ongoing:
            try:
                if publisher_for(self.app).is_running(event.user_id, event.task_id):
                    self._publish(event, end=True)
                return
            except NoRedisURL as exc:
                _unconfigured(exc)
                return
            except BrokerUnavailable as exc:
                OUTAGE.began(exc)
                log.warning(
                    "task %s[%s]: its end kept for later: %s", self.name, event.task_id, exc
                )
        KEPT_ENDS.keep(event, self._publisher)

    def _ended_without_hooks(self, user_id: str, task_id: str, status: str, message: str) -> None:
        """The task ended where Celery calls none of its hooks: `status` for it, unless
        it ended already."""
        error = _publishable(message)
        self._end_if_running(completed_event(user_id, task_id, status=status, error_message=error))

    def _end_cancelled(self, user_id: object, task_id: str) -> None:
        self._publish(completed_event(user_id, task_id, status="REVOKED"), end=True)
        if not self.ignore_result:
            backend: Any = self.backend  # a property Celery's source declares None
            backend.mark_as_revoked(task_id, "cancelled by the user", request=self.request)
        log.info("task %s[%s] cancelled by the user", self.name, task_id)
        raise TaskCancelled(f"task {task_id} cancelled by the user")


# --- Revoking tasks that never check (in the worker's main process) --------------------------


class _RevokeWatcher:
    """Polls the cancel flags of the ProgressTasks this worker runs; revokes cancelled ones."""

    def __init__(self, app: Celery, hostname: str, interval: float) -> None:
        self.app = app
        self.hostname = hostname
        self.interval = interval
        # Task id -> (user id, when revoke was asked): REVOKED is published when Celery
        # reports the task revoked, not before (it may have finished meanwhile).
        self.revoking: dict[str, tuple[object, float]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="streamer-revoke", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(self.interval + 5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check()
            except Exception:  # keep watching: one bad round must not end revoking
                log.exception("checking cancel requests failed")

    def _running(self) -> list[Any]:
        for _ in range(10):
            try:
                return list(worker_state.active_requests)
            except RuntimeError:  # the set changed while copied: copy again
                continue
        return []

    def check(self) -> None:
        now = time.monotonic()
        with self._lock:
            for task_id, (_, asked) in list(self.revoking.items()):
                if now - asked > 60:  # finished before it could be revoked
                    del self.revoking[task_id]
        for request in self._running():
            task = request.task
            if not isinstance(task, ProgressTask) or not task.streamer_revokes():
                continue
            with self._lock:
                if request.id in self.revoking:
                    continue
            user_id = task.streamer_user_id(request.args or (), request.kwargs or {})
            if user_id is None or not task._cancelled(user_id, request.id):
                continue
            with self._lock:
                self.revoking[request.id] = (user_id, now)
            log.info("revoking task %s[%s]: cancelled by the user", task.name, request.id)
            self.app.control.revoke(request.id, destination=[self.hostname], terminate=True)

    def revoked(self, task_id: str) -> object | None:
        """The user of a task this watcher had revoked; None for other tasks."""
        with self._lock:
            entry = self.revoking.pop(task_id, None)
        return None if entry is None else entry[0]


_watcher: _RevokeWatcher | None = None


def _start_watcher(sender: Any = None, **_: Any) -> None:
    global _watcher
    app = getattr(sender, "app", None)
    if app is None or _watcher is not None:
        return
    tasks = [task for task in app.tasks.values() if isinstance(task, ProgressTask)]
    if not any(task.streamer_revokes() for task in tasks):
        return
    interval = float(app.conf.get("streamer_revoke_interval") or DEFAULT_REVOKE_INTERVAL_S)
    _watcher = _RevokeWatcher(app, sender.hostname, interval)
    _watcher.start()
    log.info("revoking cancelled tasks (checked every %ss)", interval)


def _stop_watcher(**_: Any) -> None:
    global _watcher
    if _watcher is not None:
        _watcher.stop()
        _watcher = None


def _publish_revoked(sender: Any = None, request: Any = None, **_: Any) -> None:
    """A running ProgressTask terminated (by this module's watcher, or by anyone with
    `app.control.revoke(..., terminate=True)`: an admin, Flower) ends REVOKED on the
    streams, as does one revoked or expired while queued (published PENDING when sent)."""
    if not isinstance(sender, ProgressTask) or request is None or request.id is None:
        return
    cancelled_by_user = None if _watcher is None else _watcher.revoked(request.id)
    if cancelled_by_user is not None:
        user_id = cancelled_by_user
    else:
        user_id = sender.streamer_user_id(request.args or (), request.kwargs or {})
        if user_id is None or not sender._streamable(request.id):
            return
    # Not when the run had just ended (its SUCCESS published as it was terminated: a
    # finished task's next event would start a new run, without its result), nor when
    # the task saw the cancel by itself and published REVOKED.
    sender._end_if_running(completed_event(user_id, request.id, status="REVOKED"))


# Failures Celery's worker reports from its main process, where no on_failure runs: the
# process running the task was lost (killed by the OOM killer), or the task rejected its
# message for good. (For a hard time limit the main process calls on_failure itself.)
_FAILED_WITHOUT_HOOKS = (WorkerLostError, Reject)


def _publish_failure(
    sender: Any = None,
    task_id: str | None = None,
    exception: BaseException | None = None,
    args: Any = None,
    kwargs: Any = None,
    **_: Any,
) -> None:
    """Those failures end FAILURE on the streams (a task's own exceptions have their
    on_failure, which published it)."""
    if not isinstance(sender, ProgressTask) or task_id is None:
        return
    if not isinstance(exception, _FAILED_WITHOUT_HOOKS):
        return
    user_id = sender.streamer_user_id(args or (), kwargs or {})
    if user_id is not None and sender._streamable(task_id):
        if isinstance(exception, Reject):  # its reason: what the task said
            message = "rejected" if exception.reason is None else _describe(exception.reason)
        else:
            message = _describe(exception)
        sender._ended_without_hooks(user_id, task_id, "FAILURE", message)


def _publish_ignored(
    sender: Any = None,
    task_id: str | None = None,
    task: Any = None,
    args: Any = None,
    kwargs: Any = None,
    retval: Any = None,
    state: str | None = None,
    **_: Any,
) -> None:
    """A ProgressTask that raised Celery's `Ignore` ends there, with no hook called: it
    ends REVOKED on the streams (a cancel published that already; a replaced task goes
    on under the same id)."""
    if not isinstance(task, ProgressTask) or task_id is None or state != states.IGNORED:
        return
    if isinstance(retval, TaskCancelled) or getattr(task.request, "streamer_replaced", False):
        return
    user_id = task.streamer_user_id(args or (), kwargs or {})
    if user_id is not None and task._streamable(task_id):
        task._ended_without_hooks(user_id, task_id, "REVOKED", "ended by the task (Ignore)")


# Celery's Signal.connect is untyped.
worker_ready.connect(_start_watcher)  # type: ignore[no-untyped-call]
worker_shutdown.connect(_stop_watcher)  # type: ignore[no-untyped-call]
task_revoked.connect(_publish_revoked)  # type: ignore[no-untyped-call]
task_failure.connect(_publish_failure)  # type: ignore[no-untyped-call]
# A prefork child leaves with os._exit: atexit handlers do not run there.
worker_process_shutdown.connect(KEPT_ENDS.send_at_exit)  # type: ignore[no-untyped-call]
task_postrun.connect(_publish_ignored)  # type: ignore[no-untyped-call]
