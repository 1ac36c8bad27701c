"""The load generator's side of the publisher process (bench.load.publisher)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from typing import Any, Self


class PublisherProcess:
    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    @classmethod
    async def spawn(cls, server: str, redis_url: str, users: int) -> Self:
        process = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "bench.load.publisher", "--server", server),
            *("--redis-url", redis_url, "--users", str(users)),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        publisher = cls(process)
        try:
            await publisher._answer(timeout=30)  # {"ready": true}
        except BaseException:
            await publisher.close()
            raise
        return publisher

    @property
    def pid(self) -> int:
        return self.process.pid

    async def probe(self, round_: int, timeout: float) -> dict[str, Any]:
        return await self._command(f"probe {round_}", timeout)

    async def run(self, events: int, rate: float | None, timeout: float) -> dict[str, Any]:
        return await self._command(f"run {events} {rate or 0}", timeout)

    async def _command(self, line: str, timeout: float) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(line.encode() + b"\n")
        await self.process.stdin.drain()
        return await self._answer(timeout)

    async def _answer(self, timeout: float) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = await asyncio.wait_for(self.process.stdout.readline(), timeout)
        if not line:
            raise RuntimeError(f"the publisher exited with {await self.process.wait()}")
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"publisher: {answer['error']}")
        return answer

    async def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()  # end of commands: it exits
        try:
            await asyncio.wait_for(self.process.wait(), 10)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            await self.process.wait()
