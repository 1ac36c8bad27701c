"""Full garbage collection passes on a process with many streams: what a pass found
alive is frozen, so the next ones walk only newer objects. That is only safe because a
stream's objects are freed by reference counting when it ends, whatever the way it
ends: checked here with the real app, and streams from a client in another process."""

from __future__ import annotations

import asyncio
import gc
import sys
import textwrap
import weakref
from collections.abc import Iterator

import pytest
from aiohttp import web

from streamer.app import create_app
from streamer.app_keys import HUB
from streamer.auth.tokens import issue_token
from streamer.config import Config
from streamer.gc_passes import RESCAN_AFTER_S, SurvivorFreezer
from streamer.http_server import guarded_runner

from .conftest import SECRET
from .processes import free_port
from .waiting import eventually

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


class Control:
    """A stand-in for a stream's object that does end up in a cycle: shows that the
    check below would see one."""

    def __init__(self) -> None:
        self.me: Control | None = None


@pytest.mark.parametrize("ending", ["closed", "killed"])
async def test_streams_that_ended_leave_nothing_for_the_cyclic_collector(ending: str) -> None:
    config = Config.from_env(
        {"STREAMER_SECRET": SECRET, "STREAMER_MAX_CONNECTIONS_PER_USER": "1000"}
    )
    app = await create_app(config)
    runner = guarded_runner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    hub = app[HUB]
    token = issue_token(SECRET, "gc-user", ttl_s=600)
    client = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CLIENT,
        f"http://127.0.0.1:{port}",
        token,
        str(STREAMS_PER_TRANSPORT),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert client.stdin is not None and client.stdout is not None
    try:
        assert await asyncio.wait_for(client.stdout.readline(), 60) == b"open\n"
        assert len(hub) == 2 * STREAMS_PER_TRANSPORT
        control = Control()
        control.me = control
        gc.collect()
        gc.freeze()  # the open streams' objects (and the control) among them
        del control
        if ending == "closed":
            client.stdin.write(b"\n")
            await client.stdin.drain()
        else:
            client.kill()
        await asyncio.wait_for(client.wait(), 30)
        await eventually(lambda: len(hub) == 0, what="every stream to end")
        gc.unfreeze()
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        left = {
            type(o).__qualname__
            for o in gc.garbage
            if type(o).__module__.startswith(("aiohttp", "streamer", "multidict", __name__))
        }
        assert left == {"Control"}, f"in cycles after their streams ended: {sorted(left)}"
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.unfreeze()
        if client.returncode is None:
            client.kill()
            await client.wait()
        await runner.cleanup()
