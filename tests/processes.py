"""Real processes for the tests: redis-server, `streamer serve`, gunicorn. Always cleaned up."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import redis

from .waiting import eventually_sync

BIN = Path(sys.executable).parent
GUNICORN_CONF = str(Path(__file__).resolve().parent.parent / "deploy" / "gunicorn.conf.py")


def gunicorn_args(workers: int, port: int | str = "{port}") -> list[str]:
    """The production command line, with `{port}` filled in by start_server_process."""
    return [
        "gunicorn", "streamer.app:create_app", "-c", GUNICORN_CONF,
        "--workers", str(workers), "--bind", f"127.0.0.1:{port}",
    ]  # fmt: skip


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def terminate(process: subprocess.Popen[bytes], grace_s: float = 10) -> None:
    """SIGTERM, then SIGKILL if the process has not exited within the grace period."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """The benchmark suite's name for `eventually_sync` (bench/ imports it from here);
    tests use tests.waiting."""
    eventually_sync(condition, what=what, timeout=timeout)


def worker_pids(master_pid: int) -> list[int]:
    """The gunicorn master's children: its workers."""
    path = Path(f"/proc/{master_pid}/task/{master_pid}/children")
    return [int(pid) for pid in path.read_text().split()]


def rss_kib(pid: int) -> int:
    """Resident memory of a process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class RedisServer:
    """A private redis-server on a free port (never the shared one on 6379)."""

    def __init__(self, directory: Path, *, persistent: bool = False) -> None:
        self.directory = directory
        self.persistent = persistent
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        persistence = (
            ["--appendonly", "yes", "--appendfsync", "always"]
            if self.persistent
            else ["--save", "", "--appendonly", "no"]
        )
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.directory),
                "--logfile",
                str(self.directory / "redis.log"),
                *persistence,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            eventually_sync(self._answers, what=f"redis-server on port {self.port}", timeout=10)
        except BaseException:
            self.stop()
            raise

    def _answers(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"redis-server exited with {self.process.returncode}")
        try:
            with redis.Redis(port=self.port, socket_connect_timeout=0.2) as client:
                return bool(client.ping())
        except redis.RedisError:
            return False

    def ensure_running(self) -> None:
        if self.process is None or self.process.poll() is not None:
            self.start()

    def stop(self) -> None:
        if self.process is not None:
            terminate(self.process)
        self.process = None


class ServerProcess:
    """A server subprocess (its own process group, so workers die with it)."""

    def __init__(self, process: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
        self.process = process
        self.port = port
        self.log_path = log_path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.base_url + path, timeout=2) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def wait_healthy(self, timeout: float = 20) -> None:
        def healthy() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                return self.get("/readyz")[0] == 200
            except OSError:
                return False

        eventually_sync(healthy, what=f"server on port {self.port}", timeout=timeout)

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def wait_exit(self, timeout: float) -> int:
        return self.process.wait(timeout)

    def stop(self) -> None:
        if self.process.poll() is None:
            with _suppress_lookup():
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                with _suppress_lookup():
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        else:
            # Workers of a master that died still belong to its group.
            with _suppress_lookup():
                os.killpg(self.process.pid, signal.SIGKILL)


class _suppress_lookup:
    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: object, exc: object, tb: object) -> bool:
        return isinstance(exc, ProcessLookupError | PermissionError)


def start_server_process(
    args: list[str], env: dict[str, str], port: int, directory: Path, cwd: Path | None = None
) -> ServerProcess:
    """Run `args` (with `{port}` filled in) from this interpreter's bin directory."""
    command = [a.replace("{port}", str(port)) for a in args]
    if not os.path.isabs(command[0]):
        command[0] = str(BIN / command[0])
    log_path = directory / f"server-{port}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=cwd,
        )
    return ServerProcess(process, port, log_path)
