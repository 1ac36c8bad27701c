"""What the benchmarks run against: a private redis-server and real gunicorn workers."""

from __future__ import annotations

import os
import signal
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.processes import RedisServer, ServerProcess, free_port, start_server_process
from tests.redis_cluster import RedisCluster


def stop_on_sigterm() -> None:
    """A SIGTERM (a CI timeout) unwinds like an error: the servers and Redis started in
    `with` blocks are stopped."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


ROOT = Path(__file__).resolve().parent.parent
SECRET = "bench-secret-" + "b" * 40


@contextmanager
def running_service(
    *,
    workers: int,
    settings: dict[str, str],
    gunicorn_flags: tuple[str, ...] = (),
    cluster: bool = False,
) -> Iterator[tuple[ServerProcess, str]]:
    """gunicorn with `workers` aiohttp workers on a private Redis (with `cluster`, a
    private Redis Cluster of 3 masters and 3 replicas); yields the server and the Redis
    URL. `settings` are extra STREAMER_* variables. Everything is stopped on exit, and
    the server's log is printed if the body fails."""
    with tempfile.TemporaryDirectory() as tmp:
        redis_server = RedisCluster() if cluster else RedisServer(Path(tmp))
        redis_server.start()
        try:
            env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMER_")}
            env.update(STREAMER_SECRET=SECRET, STREAMER_REDIS_URL=redis_server.url, **settings)
            command = [
                "gunicorn", "streamer.app:create_app", "-c", str(ROOT / "deploy/gunicorn.conf.py"),
                "--workers", str(workers), "--bind", "127.0.0.1:{port}",
                "--access-logfile", "/dev/null", *gunicorn_flags,
            ]  # fmt: skip
            server = start_server_process(command, env, free_port(), Path(tmp))
            try:
                server.wait_healthy()
                yield server, redis_server.url
            except BaseException:
                print(server.log()[-3000:], file=sys.stderr)
                raise
            finally:
                server.stop()
        finally:
            redis_server.stop()
