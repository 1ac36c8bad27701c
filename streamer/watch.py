"""`streamer watch`: a user's tasks live in the terminal.

One stream (WebSocket, or SSE when the upgrade fails twice while the server answers over
HTTP, as in the browser) that resumes from the last id it saw after every drop, so
nothing is shown twice or missed. It asks for its heartbeats as messages and takes a
stream silent for three of their intervals for dead. With `--user` each connection gets
a freshly signed token, so that a watch outlives its tokens. Progress bars per task
with `rich`; completions and errors as lines; `--json` prints each message as one line
of JSON instead, for scripts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlencode

import aiohttp
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TaskProgressColumn, TextColumn

from .service_url import service_url

FIRST_DELAY_S = 0.5
MAX_DELAY_S = 10.0
WEBSOCKET_FAILURES_BEFORE_SSE = 2
CLOSE_UNAUTHORIZED = 4401
# Until the first heartbeat tells the interval (it comes right after the opening, which a
# server gives 10 s): time for the opening and a round of the default intervals.
FIRST_HEARTBEAT_S = 120.0
# Then a stream silent for this many intervals, plus a margin, is taken for dead.
HEARTBEATS_MISSED = 3
HEARTBEAT_MARGIN_S = 2.0
# How long the check whether a server answers over HTTP may take.
REACHABLE_TIMEOUT_S = 5.0

Message = dict[str, Any]
Transport = Literal["auto", "websocket", "sse"]


class Unauthorized(Exception):
    """The server refused the token (`opened`: it ended a stream that had opened with
    it, an expired token); reconnecting with it would not help."""

    def __init__(self, message: str, *, opened: bool = False) -> None:
        super().__init__(message)
        self.opened = opened


class StreamFailed(Exception):
    """The stream could not be opened or ended; `opened` says whether it had opened,
    `answered` whether the server answered (a refused upgrade)."""

    def __init__(self, message: str, *, opened: bool, answered: bool = False) -> None:
        super().__init__(message)
        self.opened = opened
        self.answered = answered


@dataclass
class Watch:
    url: str
    token: str
    transport: Transport = "auto"
    task_id: str | None = None
    last_event_id: str | None = None
    sign: Callable[[], str] | None = None  # a fresh token for each connection
    failed_websockets: int = 0
    attempt: int = 0
    _using: str = field(default="websocket")
    _silence_s: float = FIRST_HEARTBEAT_S

    def __post_init__(self) -> None:
        self.url = service_url(self.url)
        self._using = "sse" if self.transport == "sse" else "websocket"

    async def run(self, show: Callable[[Message], None], say: Callable[[str], None]) -> None:
        """Show every message until interrupted; raises Unauthorized when refused."""
        async with aiohttp.ClientSession() as session:
            while True:
                try:
                    self._silence_s = FIRST_HEARTBEAT_S
                    async for message in self._messages(session):
                        self.attempt = 0
                        if message.get("type") == "heartbeat":
                            self._heard_heartbeat(message)
                            continue
                        if message.get("id"):
                            self.last_event_id = str(message["id"])
                        show(message)
                    say("stream ended; reconnecting")
                except Unauthorized as exc:
                    if self.sign is None or not exc.opened:
                        raise
                    say(f"{exc}; reconnecting with a new token")
                except StreamFailed as exc:
                    say(f"{exc}; reconnecting")
                    if self._using == "websocket" and not exc.opened:
                        # A server that cannot be reached is down (restarting, say), not
                        # behind a proxy that refuses the upgrade: only failures while it
                        # answers over HTTP count towards SSE.
                        if exc.answered or await _answers(session, self.url):
                            self.failed_websockets += 1
                        if (
                            self.transport == "auto"
                            and self.failed_websockets >= WEBSOCKET_FAILURES_BEFORE_SSE
                        ):
                            self._using = "sse"
                            say("WebSocket unavailable: using Server-Sent Events")
                delay = min(FIRST_DELAY_S * 2**self.attempt, MAX_DELAY_S)
                self.attempt += 1
                await asyncio.sleep(delay)

    def _heard_heartbeat(self, message: Message) -> None:
        interval = message.get("interval_s")
        if isinstance(interval, int | float) and 0 < interval <= 3600:
            self._silence_s = interval * HEARTBEATS_MISSED + HEARTBEAT_MARGIN_S

    def _query(self) -> str:
        if self.sign is not None:
            self.token = self.sign()
        params = {"token": self.token, "heartbeat": "event"}
        if self.task_id is not None:
            params["task_id"] = self.task_id
        if self.last_event_id is not None:
            params["last_event_id"] = self.last_event_id
        return "?" + urlencode(params)

    def _messages(self, session: aiohttp.ClientSession) -> AsyncIterator[Message]:
        if self._using == "websocket":
            return self._websocket(session)
        return self._sse(session)

    async def _websocket(self, session: aiohttp.ClientSession) -> AsyncIterator[Message]:
        url = self.url.replace("http", "ws", 1) + "/ws/tasks/" + self._query()
        try:
            ws = await session.ws_connect(url, heartbeat=None, autoping=True)
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status in (401, 403):
                raise Unauthorized(f"refused ({exc.status})") from None
            raise StreamFailed(
                f"WebSocket upgrade failed ({exc.status})", opened=False, answered=True
            ) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise StreamFailed(
                f"cannot connect: {_without_token(str(exc))}", opened=False
            ) from None
        async with ws:
            while True:
                try:
                    frame = await ws.receive(timeout=self._silence_s)
                except TimeoutError:
                    raise self._silent() from None
                if frame.type == aiohttp.WSMsgType.TEXT:
                    yield json.loads(frame.data)
                    continue
                if ws.close_code == CLOSE_UNAUTHORIZED:
                    reason = frame.extra if isinstance(frame.extra, str) and frame.extra else None
                    raise Unauthorized(f"refused: {reason or 'unauthorized'}", opened=True)
                raise StreamFailed(f"WebSocket closed ({ws.close_code})", opened=True)

    async def _sse(self, session: aiohttp.ClientSession) -> AsyncIterator[Message]:
        timeout = aiohttp.ClientTimeout(total=None, sock_read=None)  # silence: below
        url = self.url + "/sse/tasks/" + self._query()
        try:
            response = await session.get(url, timeout=timeout)
        except (aiohttp.ClientError, OSError) as exc:
            raise StreamFailed(
                f"cannot connect: {_without_token(str(exc))}", opened=False
            ) from None
        async with response:
            if response.status == 401:
                raise Unauthorized("refused (401)")
            if response.status != 200:
                raise StreamFailed(f"SSE answered {response.status}", opened=False)
            data: list[str] = []
            event_id: str | None = None
            try:
                while raw := await self._line(response.content):
                    line = raw.decode().rstrip("\r\n")
                    if line.startswith("data:"):
                        data.append(line[5:].removeprefix(" "))
                    elif line.startswith("id:"):
                        event_id = line[3:].strip() or None
                    elif line == "" and data:
                        if event_id is not None:
                            self.last_event_id = event_id
                        yield json.loads("\n".join(data))
                        data, event_id = [], None
            except aiohttp.ClientError as exc:
                raise StreamFailed(f"stream broke: {exc!r}", opened=True) from None

    async def _line(self, content: aiohttp.StreamReader) -> bytes:
        # Not wait_for: on Python 3.11 it drops a cancel (SIGTERM) that comes as a line does.
        try:
            async with asyncio.timeout(self._silence_s):
                return await content.readline()
        except TimeoutError:
            raise self._silent() from None

    def _silent(self) -> StreamFailed:
        return StreamFailed(f"no message or heartbeat for {round(self._silence_s)} s", opened=True)


async def _answers(session: aiohttp.ClientSession, url: str) -> bool:
    """Whether the server answers over HTTP at all."""
    try:
        async with session.get(
            url + "/healthz", timeout=aiohttp.ClientTimeout(total=REACHABLE_TIMEOUT_S)
        ):
            return True
    except (aiohttp.ClientError, OSError, TimeoutError):
        return False


class ProgressView:
    """Bars for unfinished tasks; a line for each completion."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress = Progress(
            # Producers' text is shown as it is, never read as markup.
            TextColumn("{task.description}", markup=False),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[step]}", markup=False),
            console=console,
            auto_refresh=False,
        )
        self.bars: dict[str, TaskID] = {}

    def __enter__(self) -> ProgressView:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def show(self, message: Message) -> None:
        kind = message.get("type")
        if kind == "active_tasks":
            if message.get("recovered") is False:
                self.say("some events could not be replayed: showing the current state")
            for task in message.get("tasks", []):
                self._bar(task)
        elif kind == "task_progress":
            self._bar(message)
        elif kind == "task_completed":
            self._complete(message)
        self.progress.refresh()

    def say(self, text: str) -> None:
        self.progress.console.print(_shown(text), markup=False, highlight=False)

    def _bar(self, task: Message) -> None:
        task_id = str(task.get("task_id"))
        description = _shown(f"{task.get('task_name') or task_id} [{task.get('status')}]")
        completed = round(float(task.get("progress") or 0))
        step = _shown(str(task.get("current_step") or ""))
        bar = self.bars.get(task_id)
        if bar is None:
            self.bars[task_id] = self.progress.add_task(
                description, total=100, completed=completed, step=step
            )
        else:
            self.progress.update(bar, description=description, completed=completed, step=step)

    def _complete(self, message: Message) -> None:
        task_id = str(message.get("task_id"))
        bar = self.bars.pop(task_id, None)
        if bar is not None:
            self.progress.remove_task(bar)
        name = message.get("task_name") or task_id
        status = message.get("status")
        if status == "SUCCESS":
            self.say(f"done    {name} SUCCESS {json.dumps(message.get('result_data'))}")
        else:
            self.say(f"ended   {name} {status}: {message.get('error_message') or ''}".rstrip())


def _shown(text: str) -> str:
    """`text` fit for a terminal: control characters (an escape sequence could retitle
    the window or clear the screen) are shown as U+FFFD."""
    return text if text.isprintable() else "".join(c if c.isprintable() else "\ufffd" for c in text)


def _without_token(text: str) -> str:
    return re.sub(r"(token=)[^&\s'\"]+", r"\1[redacted]", text)


async def watch(stream: Watch, *, as_json: bool) -> int:
    """Run until interrupted or terminated (0), or refused (3)."""
    # Messages are lines whatever the terminal's width (a script reads them).
    errors = Console(stderr=True, soft_wrap=True)
    running = asyncio.current_task()
    assert running is not None
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, running.cancel)  # the bars' cleanup runs
    try:
        if as_json:

            def print_json(message: Message) -> None:
                sys.stdout.write(json.dumps(message, separators=(",", ":")) + "\n")
                sys.stdout.flush()

            await stream.run(print_json, lambda text: errors.print(text, markup=False))
        else:
            with ProgressView(Console()) as view:
                await stream.run(view.show, view.say)
    except Unauthorized as exc:
        errors.print(f"streamer: {exc}: get a new token", markup=False)
        return 3
    except asyncio.CancelledError:  # SIGTERM
        return 0
    finally:
        with contextlib.suppress(RuntimeError):
            loop.remove_signal_handler(signal.SIGTERM)
    return 0
