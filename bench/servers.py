"""The processes bench.compare runs: a private redis-server and the two servers, each
pinned to its CPU (server on CPU 0; Redis, like the load generator, on CPU 1)."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import redis

from tests.processes import BIN, ServerProcess, free_port, terminate, wait_until, worker_pids

ROOT = Path(__file__).resolve().parent.parent
SERVER_CPU, LOAD_CPU = 0, 1
SECRET = "bench-secret-" + "b" * 40
STREAMER_COMMAND = (
    "gunicorn streamer.app:create_app -c deploy/gunicorn.conf.py --workers 1 "
    "--bind 127.0.0.1:{port}"
)
STREAMER_SETTINGS = {
    "STREAMER_SECRET": SECRET,
    "STREAMER_MAX_CONNECTIONS_PER_USER": "10000",
    "STREAMER_MAX_CONNECTIONS": "19000",
}


def pinned(cpu: int, command: list[str]) -> list[str]:
    """`command` run on `cpu` only (taskset: the affinity holds for the threads and
    processes it starts too, such as gunicorn's workers and Redis's threads)."""
    taskset = shutil.which("taskset")
    if taskset is None:
        raise RuntimeError("taskset (util-linux) is needed to pin the processes to their CPUs")
    if cpu not in os.sched_getaffinity(0):
        raise RuntimeError(f"CPU {cpu} is not available here: the benchmarks need CPUs 0 and 1")
    return [taskset, "-c", str(cpu), *command]


@contextmanager
def private_redis(directory: Path) -> Iterator[str]:
    """A redis-server on a free port, pinned to the load CPU; yields its URL."""
    port = free_port()
    command = [
        "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory),
        "--save", "", "--appendonly", "no", "--logfile", str(directory / "redis.log"),
    ]  # fmt: skip
    process = subprocess.Popen(
        pinned(LOAD_CPU, command), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:

        def answers() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {process.returncode}")
            try:
                with redis.Redis(port=port, socket_connect_timeout=0.2) as client:
                    return bool(client.ping())
            except redis.RedisError:
                return False

        wait_until(answers, 10, f"redis-server on port {port}")
        yield url
    finally:
        terminate(process)


def flush(redis_url: str) -> None:
    with redis.Redis.from_url(redis_url) as client:
        client.flushall()


@dataclass(frozen=True)
class ServerSpec:
    name: str  # "reference" or "streamer": also how the load subscribes and publishes
    command: list[str]  # `{port}` is filled in
    env: dict[str, str] = field(default_factory=dict)


def reference_spec(redis_url: str) -> ServerSpec:
    command = [sys.executable, "-m", "bench.reference", "--port", "{port}"]
    return ServerSpec("reference", [*command, "--redis-url", redis_url])


def streamer_spec(redis_url: str, command: str | None = None) -> ServerSpec:
    env = {**STREAMER_SETTINGS, "STREAMER_REDIS_URL": redis_url}
    return ServerSpec("streamer", shlex.split(command or STREAMER_COMMAND), env)


@dataclass(frozen=True)
class RunningServer:
    process: ServerProcess
    serving_pids: list[int]  # gunicorn's workers, not its master; or the process itself


def _executable(name: str) -> str:
    """A bare program name from this interpreter's environment first, then from PATH."""
    if os.path.sep in name or not (BIN / name).exists():
        return name
    return str(BIN / name)


@contextmanager
def running_server(spec: ServerSpec, directory: Path) -> Iterator[RunningServer]:
    port = free_port()
    command = [part.replace("{port}", str(port)) for part in spec.command]
    command[0] = _executable(command[0])
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMER_")}
    env.update(spec.env, PORT=str(port))
    log_path = directory / f"{spec.name}-{port}.log"
    with open(log_path, "wb") as log:
        popen = subprocess.Popen(
            pinned(SERVER_CPU, command),
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own group: stop() takes the workers with it
        )
    server = ServerProcess(popen, port, log_path)
    try:
        server.wait_healthy(timeout=30)
        yield RunningServer(server, worker_pids(popen.pid) or [popen.pid])
    except BaseException:
        print(server.log()[-3000:], file=sys.stderr)
        raise
    finally:
        server.stop()
