"""Full garbage collection passes on a process with many streams: what a pass found
alive is frozen, so the next ones walk only newer objects. That is only safe because a
stream's objects are freed by reference counting when it ends, whatever the way it
ends: checked here with the real app on uvloop in a process of its own, and streams
from a client in another."""

from __future__ import annotations

import asyncio
import gc
import json
import sys
import textwrap
import weakref
from collections.abc import Iterator
from typing import Any

import pytest
import uvloop

from streamer.auth.tokens import issue_token
from streamer.gc_passes import RESCAN_AFTER_S, SurvivorFreezer, freezes_safely

from .conftest import SECRET
from .processes import free_port

STREAMS_PER_TRANSPORT = 40

CLIENT = textwrap.dedent(
    """
    import asyncio, sys
    import aiohttp

    async def main(base, token, count):
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            streams = []
            for _ in range(count):
                ws = await session.ws_connect(f"{base}/ws/tasks/?token={token}", origin=base)
                assert (await ws.receive()).type == aiohttp.WSMsgType.TEXT
                sse = await session.get(f"{base}/sse/tasks/?token={token}")
                assert sse.status == 200
                await sse.content.readuntil(b"\\n\\n")
                streams += [ws, sse]
            print("open", flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
            for stream in streams:
                if isinstance(stream, aiohttp.ClientWebSocketResponse):
                    await stream.close()
                else:
                    stream.close()

    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
    """
)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Node:
    """An object the collector tracks (an instance with a __dict__)."""

    def __init__(self) -> None:
        self.other: Node | None = None


@pytest.fixture
def freezer() -> Iterator[tuple[SurvivorFreezer, Clock]]:
    clock = Clock()
    freezer = SurvivorFreezer(clock=clock)
    gc.collect()
    freezer.install()
    try:
        yield freezer, clock
    finally:
        freezer.uninstall()
        gc.unfreeze()


def test_what_a_full_pass_found_alive_is_frozen_and_newer_cycles_are_still_collected(
    freezer: tuple[SurvivorFreezer, Clock],
) -> None:
    before = gc.get_freeze_count()
    alive = [Node() for _ in range(1000)]
    gc.collect()
    assert gc.get_freeze_count() >= before + len(alive)
    cycle = Node()
    cycle.other = cycle
    newer = weakref.ref(cycle)
    del cycle
    gc.collect()
    assert newer() is None  # made after the freeze: walked and collected


def test_a_frozen_object_left_in_a_cycle_is_collected_by_the_periodic_pass_over_everything(
    freezer: tuple[SurvivorFreezer, Clock],
) -> None:
    survivor, clock = freezer
    alive = [Node() for _ in range(100)]
    gc.collect()  # frozen from here on
    old = alive[0]
    old.other = old
    frozen = weakref.ref(old)
    del alive, old
    gc.collect()
    assert frozen() is not None, "a frozen object is not walked by the next passes"
    clock.now += RESCAN_AFTER_S
    gc.collect()  # due: the objects are unfrozen for the next pass
    assert survivor.rescans == 1
    gc.collect()
    assert frozen() is None
    gc.collect()
    assert survivor.rescans == 1  # the next is due an interval later


SERVER = textwrap.dedent(
    """
    import asyncio, gc, json, sys, weakref
    import uvloop
    from aiohttp import web
    from streamer.app import create_app
    from streamer.app_keys import HUB
    from streamer.config import Config
    from streamer.http_server import guarded_runner

    def say(what):
        print(json.dumps(what), flush=True)

    async def until(condition, bound_s):
        loop = asyncio.get_running_loop()
        deadline = loop.time() + bound_s
        while not condition() and loop.time() < deadline:
            await asyncio.sleep(0.05)

    async def main(secret, port):
        loop = asyncio.get_running_loop()
        config = Config.from_env(
            {"STREAMER_SECRET": secret, "STREAMER_MAX_CONNECTIONS_PER_USER": "1000"}
        )
        app = await create_app(config)
        runner = guarded_runner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        hub = app[HUB]
        say({"listening": True, "loop": type(loop).__module__})
        await loop.run_in_executor(None, sys.stdin.readline)  # the streams are open
        gc.collect()
        gc.disable()  # from here on, only reference counting frees anything
        streams = [weakref.ref(c) for c in hub.connections()]
        say({"open": len(streams)})
        await loop.run_in_executor(None, sys.stdin.readline)  # their clients are gone
        await until(lambda: len(hub) == 0, 30)
        await until(lambda: all(s() is None for s in streams), 10)
        alive = sum(1 for s in streams if s() is not None)
        say({"open_now": len(hub), "alive": alive, "in_cycles": gc.collect()})
        gc.enable()
        await runner.cleanup()

    uvloop.run(main(sys.argv[1], int(sys.argv[2])))
    """
)


async def _line(process: asyncio.subprocess.Process) -> Any:
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), 60)
    assert line, "the process ended early"
    return json.loads(line)


async def test_streams_are_frozen_only_on_uvloop() -> None:
    """On the standard loop each socket transport is a cycle of its own."""
    assert not freezes_safely(asyncio.get_running_loop())
    loop = uvloop.new_event_loop()
    try:
        assert freezes_safely(loop)
    finally:
        loop.close()


@pytest.mark.parametrize("ending", ["closed", "killed"])
async def test_streams_that_ended_leave_nothing_for_the_cyclic_collector(ending: str) -> None:
    """A worker (on uvloop, as under gunicorn) with WebSocket and SSE streams whose
    clients then close them or vanish: once they ended, with the collector off, every
    stream's objects were freed and nothing at all is left for a collection to find."""
    port = free_port()
    token = issue_token(SECRET, "gc-user", ttl_s=600)
    server = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SERVER, SECRET, str(port),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    client: asyncio.subprocess.Process | None = None
    assert server.stdin is not None
    try:
        assert (await _line(server))["loop"] == "uvloop"
        client = await asyncio.create_subprocess_exec(
            sys.executable, "-c", CLIENT, f"http://127.0.0.1:{port}", token,
            str(STREAMS_PER_TRANSPORT),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert client.stdin is not None and client.stdout is not None
        assert await asyncio.wait_for(client.stdout.readline(), 60) == b"open\n"
        server.stdin.write(b"\n")
        assert await _line(server) == {"open": 2 * STREAMS_PER_TRANSPORT}
        if ending == "closed":
            client.stdin.write(b"\n")
            await client.stdin.drain()
        else:
            client.kill()
        await asyncio.wait_for(client.wait(), 30)
        server.stdin.write(b"\n")
        assert await _line(server) == {"open_now": 0, "alive": 0, "in_cycles": 0}
        await asyncio.wait_for(server.wait(), 30)
    finally:
        for process in (client, server):
            if process is not None and process.returncode is None:
                process.kill()
                await process.wait()
