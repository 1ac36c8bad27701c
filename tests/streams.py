"""Clients of real server processes: curl for SSE, aiohttp for WebSocket, the CLI to publish."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from .clients import ws_json

BIN = Path(sys.executable).parent
WAIT_S = 15.0
SPREAD_DEADLINE_S = 30.0


@dataclass
class CurlStream:
    """`curl -N -i` reading an SSE stream; parses headers and `data:` lines."""

    process: asyncio.subprocess.Process
    headers: dict[str, str] = field(default_factory=dict)
    status: int = 0

    @classmethod
    async def open(cls, url: str, token: str) -> CurlStream:
        curl = shutil.which("curl")
        if curl is None:
            raise AssertionError("curl is not installed: .ci/run installs it")
        process = await asyncio.create_subprocess_exec(
            curl, "-N", "-s", "-i", "-H", f"Authorization: Bearer {token}", url,
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        stream = cls(process)
        try:
            await asyncio.wait_for(stream._read_headers(), WAIT_S)
        except BaseException:
            await stream.close()
            raise
        return stream

    async def _line(self) -> str:
        assert self.process.stdout is not None
        raw = await self.process.stdout.readline()
        if not raw:
            raise EOFError("curl's stream ended")
        return raw.decode().rstrip("\r\n")

    async def _read_headers(self) -> None:
        status_line = await self._line()
        self.status = int(status_line.split()[1])
        while line := await self._line():
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()

    async def next_data(self, timeout: float = WAIT_S) -> dict[str, Any]:
        """The JSON of the next `data:` line (heartbeats and other fields skipped)."""

        async def read() -> dict[str, Any]:
            while True:
                line = await self._line()
                if line.startswith("data: "):
                    decoded: dict[str, Any] = json.loads(line[len("data: ") :])
                    return decoded

        return await asyncio.wait_for(read(), timeout)

    async def close(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
        await self.process.wait()


@dataclass
class WsStream:
    session: aiohttp.ClientSession
    ws: aiohttp.ClientWebSocketResponse
    worker: str

    @classmethod
    async def open(cls, url: str) -> WsStream:
        session = aiohttp.ClientSession()
        try:
            ws = await session.ws_connect(url, timeout=aiohttp.ClientWSTimeout(ws_close=5))
        except BaseException:
            await session.close()
            raise
        assert ws._response is not None
        return cls(session, ws, ws._response.headers.get("X-Streamer-Worker", ""))

    async def next(self, timeout: float = WAIT_S) -> dict[str, Any]:
        return await ws_json(self.ws, timeout)

    async def close(self) -> None:
        await self.ws.close()
        await self.session.close()


async def run_cli(*args: str, env: dict[str, str]) -> str:
    """Run the `streamer` command; return its stdout, fail with its stderr."""
    process = await asyncio.create_subprocess_exec(
        str(BIN / "streamer"),
        *args,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), WAIT_S)
    if process.returncode != 0:
        raise AssertionError(f"streamer {' '.join(args)} failed: {stderr.decode()}")
    return stdout.decode().strip()


async def streams_on_every_worker(
    base_url: str, token: str, workers: int
) -> tuple[list[WsStream], list[CurlStream]]:
    """Open WebSocket and curl SSE streams until each worker serves at least one of each.

    Which worker accepts is the kernel's choice and can be skewed, so this keeps
    connecting (surplus streams are closed) until a deadline.
    """
    ws_streams: list[WsStream] = []
    sse_streams: list[CurlStream] = []
    ws_url = base_url.replace("http", "ws") + f"/ws/tasks/?token={token}"
    deadline = time.monotonic() + SPREAD_DEADLINE_S

    def ws_workers() -> set[str]:
        return {s.worker for s in ws_streams}

    def sse_workers() -> set[str]:
        return {s.headers["x-streamer-worker"] for s in sse_streams}

    try:
        while len(ws_workers()) < workers or len(sse_workers()) < workers:
            if time.monotonic() > deadline:
                raise AssertionError(f"streams did not reach all {workers} workers")
            if len(ws_workers()) < workers:
                stream = await WsStream.open(ws_url)
                if stream.worker in ws_workers():
                    await stream.close()
                else:
                    ws_streams.append(stream)
            if len(sse_workers()) < workers:
                sse = await CurlStream.open(f"{base_url}/sse/tasks/", token)
                worker = sse.headers.get("x-streamer-worker")
                if sse.status != 200 or worker is None or worker in sse_workers():
                    await sse.close()
                    assert sse.status == 200, f"SSE answered {sse.status}"
                else:
                    sse_streams.append(sse)
    except BaseException:
        await close_all(ws_streams, sse_streams)
        raise
    return ws_streams, sse_streams


async def close_all(ws_streams: list[WsStream], sse_streams: list[CurlStream]) -> None:
    for ws in ws_streams:
        await ws.close()
    for sse in sse_streams:
        await sse.close()
