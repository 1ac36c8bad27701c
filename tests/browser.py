"""Headless Chromium for end-to-end tests, driven over the DevTools protocol (CDP).

    async with Browser(find_chromium()) as browser:
        await browser.navigate(url)
        await browser.wait_for("document.body.dataset.connection === 'open'", what="the stream")
        tab = await browser.new_tab(url)  # another page of the same browser, driven alike
        await tab.close()

Chromium runs in its own process group with a throw-away profile; both are gone after `close()`,
whatever happened in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote

import aiohttp

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--no-default-browser-check",
    # Port 0: Chromium picks a free port and writes it to <profile>/DevToolsActivePort.
    "--remote-debugging-port=0",
)
START_TIMEOUT_S = 30.0
CALL_TIMEOUT_S = 10.0


def find_chromium() -> str | None:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path is not None:
            return path
    return None


def _read_port(port_file: Path) -> int | None:
    """The port in Chromium's DevToolsActivePort file, once it is written."""
    try:
        return int(port_file.read_text().splitlines()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return None


class CdpError(RuntimeError):
    """A DevTools call failed, or the page's JavaScript threw."""


class Browser:
    """One headless Chromium with one page; `evaluate()` runs JavaScript in it.
    `new_tab()` opens another page of the same browser (same profile: storage, Web Locks and
    BroadcastChannel are shared), returned as a Browser that drives only that page."""

    def __init__(self, executable: str) -> None:
        self.executable = executable
        self.console: list[str] = []  # console output and page errors, for failure messages
        self._root: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._http: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._ids = itertools.count(1)
        self._port: int | None = None
        self._target_id: str | None = None
        self._owner: Browser | None = None  # set on tabs: the Browser that runs Chromium
        self._tabs: list[Browser] = []

    async def __aenter__(self) -> Self:
        try:
            await self.start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> None:
        profile = self._launch()
        port = await self._devtools_port(profile / "DevToolsActivePort")
        self._port = port
        self._http = aiohttp.ClientSession()
        async with self._http.get(f"http://127.0.0.1:{port}/json/list") as response:
            targets: list[dict[str, Any]] = await response.json()
        page = next((t for t in targets if t.get("type") == "page"), None)
        if page is None:
            raise CdpError(f"Chromium has no page target: {targets}")
        await self._attach(page)

    async def _attach(self, page: dict[str, Any]) -> None:
        assert self._http is not None
        self._target_id = page["id"]
        self._ws = await self._http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        self._reader = asyncio.create_task(self._read(self._ws))
        await self.call("Runtime.enable")
        await self.call("Log.enable")

    async def new_tab(self, url: str = "about:blank") -> Browser:
        """Open another page of this browser at `url`; `close()` on it closes only the page."""
        owner = self._owner or self
        assert owner._http is not None, "the browser is not running"
        address = f"http://127.0.0.1:{owner._port}/json/new?{quote(url, safe='')}"
        async with owner._http.put(address) as response:
            page: dict[str, Any] = await response.json()
        tab = Browser(self.executable)
        tab._owner, tab._http, tab._port = owner, owner._http, owner._port
        owner._tabs.append(tab)
        try:
            await tab._attach(page)
        except BaseException:
            await tab.close()
            raise
        return tab

    async def close_page(self) -> None:
        """Close this page only (its scripts end as when a user closes the tab); Chromium
        keeps running with its other pages."""
        await self._detach()
        owner = self._owner or self
        if self._target_id is not None and owner._http is not None and not owner._http.closed:
            with contextlib.suppress(aiohttp.ClientError):
                async with owner._http.get(
                    f"http://127.0.0.1:{owner._port}/json/close/{self._target_id}"
                ) as response:
                    await response.read()
        self._target_id = None

    async def _detach(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        if self._ws is not None:
            with contextlib.suppress(Exception):
                await self._ws.close()
        self._reader = self._ws = None

    def _launch(self) -> Path:
        """Start Chromium with a fresh profile; returns the profile directory."""
        self._root = Path(tempfile.mkdtemp(prefix="streamer-chromium-"))
        profile = self._root / "profile"
        with open(self._root / "chromium.log", "wb") as log:
            self._process = subprocess.Popen(
                [self.executable, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: close() kills all its helpers
            )
        return profile

    async def _devtools_port(self, port_file: Path) -> int:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise CdpError(f"Chromium exited with {self._process.returncode}:\n{self.log()}")
            port = _read_port(port_file)
            if port is not None:
                return port
            await asyncio.sleep(0.05)
        raise CdpError(f"Chromium did not open its DevTools port in {START_TIMEOUT_S}s")

    def log(self) -> str:
        if self._root is None:
            return ""
        with contextlib.suppress(OSError):
            return (self._root / "chromium.log").read_text(errors="replace")[-4000:]
        return ""

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        try:
            async for message in ws:
                if message.type != aiohttp.WSMsgType.TEXT:
                    continue
                data: dict[str, Any] = json.loads(message.data)
                if "id" in data:
                    future = self._pending.pop(data["id"], None)
                    if future is not None and not future.done():
                        future.set_result(data)
                else:
                    self._record_event(data.get("method", ""), data.get("params", {}))
        finally:
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(CdpError("the DevTools connection closed"))
            self._pending.clear()

    def _record_event(self, method: str, params: dict[str, Any]) -> None:
        if method == "Runtime.consoleAPICalled":
            args = " ".join(str(a.get("value", a.get("description", ""))) for a in params["args"])
            self.console.append(f"console.{params['type']}: {args}")
        elif method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            self.console.append(f"uncaught: {text}")
        elif method == "Log.entryAdded":
            entry = params["entry"]
            self.console.append(f"log.{entry['level']}: {entry['text']}")

    async def call(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """Send one CDP command and return its `result`."""
        if self._ws is None or self._ws.closed:
            raise CdpError("the browser is not running")
        call_id = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[call_id] = future
        await self._ws.send_json({"id": call_id, "method": method, "params": params or {}})
        try:
            reply = await asyncio.wait_for(future, CALL_TIMEOUT_S)
        finally:
            self._pending.pop(call_id, None)
        if "error" in reply:
            raise CdpError(f"{method} failed: {reply['error']}")
        result: dict[str, Any] = reply.get("result", {})
        return result

    async def navigate(self, url: str) -> None:
        result = await self.call("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise CdpError(f"could not load {url}: {result['errorText']}")

    async def evaluate(self, expression: str) -> Any:
        """Evaluate a JavaScript expression in the page; returns its JSON value."""
        result = await self.call(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise CdpError(f"JavaScript error in {expression!r}: {text}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, *, what: str, timeout: float = 15.0) -> Any:
        """Poll `expression` until it is truthy and return its value; TimeoutError otherwise.

        Errors count as "not yet" (the page may be navigating); the last one is reported.
        """
        deadline = time.monotonic() + timeout
        last: object = None
        while True:
            try:
                value = await self.evaluate(expression)
            except CdpError as exc:
                last = exc
            else:
                if value:
                    return value
                last = value
            if time.monotonic() >= deadline:
                console = "\n".join(self.console[-30:]) or "(nothing)"
                raise TimeoutError(
                    f"timed out after {timeout}s waiting for {what}; last value: {last!r}\n"
                    f"page console:\n{console}"
                )
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        """Stop Chromium and remove its profile; safe to call more than once. On a tab from
        `new_tab()`: close that page only."""
        if self._owner is not None:
            await self.close_page()
            return
        try:
            for tab in self._tabs:
                await tab._detach()
            await self._detach()
            if self._http is not None:
                await self._http.close()
        finally:
            self._reader = self._ws = self._http = None
            self._stop_process()
            if self._root is not None:
                shutil.rmtree(self._root, ignore_errors=True)
                self._root = None

    def _stop_process(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        for signum, wait_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signum)  # the group Chromium leads (start_new_session)
            try:
                process.wait(wait_s)
                break
            except subprocess.TimeoutExpired:
                continue
        # Helpers (renderer, zygote) outlive the browser process for a moment: end them too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
