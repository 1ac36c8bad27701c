"""Clients of real server processes: curl for SSE, aiohttp for WebSocket, the CLI to publish."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from .clients import ws_json

BIN = Path(sys.executable).parent
WAIT_S = 15.0


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
