"""Producers' API: publish task progress from Celery tasks or any Python code.

from streamer.publisher import Publisher

with Publisher() as publisher:          # STREAMER_REDIS_URL
    publisher.progress(user_id, task_id, progress=40, current_step="resizing")
    if publisher.is_cancelled(user_id, task_id):
        ...
    publisher.completed(user_id, task_id, result_data={"url": "..."})

    publisher.publish_many([progress_event(user, task, progress=p) for ...])  # batches

`AsyncPublisher` batches by itself: calls made concurrently leave in one script call.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import weakref
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any, Self

from .broker.base import BrokerUnavailable
from .broker.redis_cluster import is_cluster_url
from .broker.redis_connect import (
    REDIS_ERRORS,
    database,
    redis_client,
    redis_client_sync,
    redis_failure,
)
from .broker.redis_publish_script import check_event
from .broker.redis_publishing import (
    HistoryLimits,
    PublishQueue,
    check,
    publish_script,
    publish_sync,
)
from .broker.redis_schema import active_key, cancel_key
from .broker.redis_script_runners import pooled_script
from .config import ENV_VARIABLES, ConfigError
from .events import (
    TaskEvent,
    completed_event,
    progress_event,
    validate_identifier,
    validate_task_id,
)

__all__ = ["AsyncPublisher", "BrokerUnavailable", "Publisher"]

_DEFAULTS = {"history_size": 1000, "history_ttl": 3600}
# How long a publisher waits for Redis to connect, and to answer a call, before it raises
# BrokerUnavailable (a stalled Redis must not hold its caller, a web request, for ever).
REDIS_TIMEOUT_S = 5.0


class NoRedisURL(ConfigError):
    """Neither `redis_url=` nor STREAMER_REDIS_URL: there is nowhere to publish to."""


def _settings(redis_url: str | None, environ: Mapping[str, str]) -> tuple[str, HistoryLimits]:
    """As the server reads them: values trimmed, a blank variable is an unset one."""
    if redis_url is not None and not isinstance(redis_url, str):
        raise TypeError(f"redis_url must be a str, got {type(redis_url).__name__}")
    name = "redis_url"
    url = redis_url
    if url is None:
        name, url = "STREAMER_REDIS_URL", environ.get("STREAMER_REDIS_URL", "").strip()
    if not url:
        raise NoRedisURL("no Redis URL: pass redis_url= or set STREAMER_REDIS_URL")
    url = ENV_VARIABLES["redis_url"][0](name, url)
    limits: dict[str, int] = {}
    for setting, default in _DEFAULTS.items():
        variable = f"STREAMER_{setting.upper()}"
        raw = environ.get(variable, "").strip()
        limits[setting] = ENV_VARIABLES[setting][0](variable, raw) if raw else default
    return url, HistoryLimits(
        size=limits["history_size"], ttl=limits["history_ttl"], per_user=is_cluster_url(url)
    )


_NO_TASK = object()


def _active_key(user_id: object, task_id: object) -> tuple[str, str]:
    """The user's active-task set, and the task as a member of it."""
    return active_key(validate_identifier("user_id", user_id)), validate_task_id(task_id)


def _cancel_key(user_id: object, task_id: object) -> str:
    if task_id is _NO_TASK:
        # The one-argument form of earlier versions could see another user's cancel.
        raise TypeError("is_cancelled() needs the user id too: is_cancelled(user_id, task_id)")
    user, task = validate_identifier("user_id", user_id), validate_task_id(task_id)
    return cancel_key(user, task)


class Publisher:
    """Synchronous publisher (one Redis connection pool); safe to share between threads."""

    def __init__(self, redis_url: str | None = None) -> None:
        url, self._limits = _settings(redis_url, os.environ)
        try:
            # A Redis Cluster client learns the cluster's layout as it is made.
            self._client = redis_client_sync(
                url, socket_connect_timeout=REDIS_TIMEOUT_S, socket_timeout=REDIS_TIMEOUT_S
            )
        except REDIS_ERRORS as exc:
            raise BrokerUnavailable(f"could not reach Redis: {redis_failure(exc)}") from exc
        self._limits = dataclasses.replace(self._limits, db=database(self._client))
        self._script = pooled_script(self._client, publish_script(self._limits))

    def progress(self, user_id: object, task_id: object, **fields: Any) -> str:
        return self.publish(progress_event(user_id, task_id, **fields))

    def completed(self, user_id: object, task_id: object, **fields: Any) -> str:
        return self.publish(completed_event(user_id, task_id, **fields))

    def publish(self, event: TaskEvent) -> str:
        return publish_sync(self._script, [check_event(event)], self._limits).strings()[0]

    def publish_many(self, events: Iterable[TaskEvent]) -> list[str]:
        """Publish events (from `progress_event` / `completed_event`) in order, each as
        one atomic step as `publish` does, in few script calls; return their ids.

        Nothing is sent if one of them is malformed. If Redis fails part-way, the events
        before the failure are published and none after it.
        """
        return publish_sync(self._script, check(events), self._limits).strings()

    def is_cancelled(self, user_id: object, task_id: object = _NO_TASK) -> bool:
        """Whether `user_id` asked to cancel the current run of their task `task_id`."""
        key = _cancel_key(user_id, task_id)
        try:
            return bool(self._client.exists(key))
        except REDIS_ERRORS as exc:
            raise BrokerUnavailable(f"could not reach Redis: {redis_failure(exc)}") from exc

    def is_running(self, user_id: object, task_id: object) -> bool:
        """Whether the task has a run that has not finished (it is among the user's
        active tasks, as a snapshot lists them)."""
        key, task = _active_key(user_id, task_id)
        try:
            return self._client.zscore(key, task) is not None
        except REDIS_ERRORS as exc:
            raise BrokerUnavailable(f"could not reach Redis: {redis_failure(exc)}") from exc

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class AsyncPublisher:
    """The asyncio twin of `Publisher`. Calls made concurrently (from several tasks, or
    gathered) are sent together: one script call for all, each event still atomic.

    Its connections belong to the event loop it is first used in: one per loop (each
    `asyncio.run` makes a new loop; there, `async with AsyncPublisher() as publisher:`
    inside the coroutine, or the blocking `Publisher`)."""

    def __init__(self, redis_url: str | None = None) -> None:
        url, self._limits = _settings(redis_url, os.environ)
        self._client = redis_client(
            url, socket_connect_timeout=REDIS_TIMEOUT_S, socket_timeout=REDIS_TIMEOUT_S
        )
        self._limits = dataclasses.replace(self._limits, db=database(self._client))
        self._queue = PublishQueue(self._client, self._limits)
        self._loop: weakref.ref[asyncio.AbstractEventLoop] | None = None

    def _check_loop(self) -> None:
        """Used from another loop, redis-py fails with "Event loop is closed" (or hangs)."""
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = weakref.ref(loop)
        elif loop is not self._loop():
            raise RuntimeError(
                "this AsyncPublisher belongs to the event loop it was first used in (each "
                "asyncio.run makes a new one): make one per loop, or use Publisher"
            )

    async def progress(self, user_id: object, task_id: object, **fields: Any) -> str:
        return await self.publish(progress_event(user_id, task_id, **fields))

    async def completed(self, user_id: object, task_id: object, **fields: Any) -> str:
        return await self.publish(completed_event(user_id, task_id, **fields))

    async def publish(self, event: TaskEvent) -> str:
        self._check_loop()
        published = await self._queue.publish([check_event(event)])
        return published.strings()[0]

    async def publish_many(self, events: Iterable[TaskEvent]) -> list[str]:
        """As `Publisher.publish_many`."""
        self._check_loop()
        return (await self._queue.publish(check(events))).strings()

    async def is_cancelled(self, user_id: object, task_id: object = _NO_TASK) -> bool:
        """Whether `user_id` asked to cancel the current run of their task `task_id`."""
        key = _cancel_key(user_id, task_id)
        self._check_loop()
        try:
            return bool(await self._client.exists(key))
        except REDIS_ERRORS as exc:
            raise BrokerUnavailable(f"could not reach Redis: {redis_failure(exc)}") from exc

    async def is_running(self, user_id: object, task_id: object) -> bool:
        """As `Publisher.is_running`."""
        key, task = _active_key(user_id, task_id)
        self._check_loop()
        try:
            return await self._client.zscore(key, task) is not None
        except REDIS_ERRORS as exc:
            raise BrokerUnavailable(f"could not reach Redis: {redis_failure(exc)}") from exc

    async def close(self) -> None:
        self._check_loop()
        await self._queue.close()
        await self._client.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()
