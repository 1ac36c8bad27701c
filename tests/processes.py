"""Real processes for the tests: redis-server, `streamer serve`, gunicorn. Always cleaned up."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
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


# What each of streamer's gunicorn workers logs once its app has started.
WORKER_STARTED_LOG = "objects made at startup left out of garbage collection passes"


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


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


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

    def __init__(
        self, directory: Path, *, persistent: bool = False, extra_args: Sequence[str] = ()
    ) -> None:
        self.directory = directory
        self.persistent = persistent
        self.extra_args = list(extra_args)
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
                *self.extra_args,
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

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Redis stops answering (SIGSTOP) until the block ends, as a stalled host does:
        connections stay open, commands go unanswered."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            self.process.send_signal(signal.SIGCONT)

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

    def wait_workers_started(self, workers: int, timeout: float = 20) -> None:
        """Wait until the gunicorn master has `workers` children and each has started its
        app: a worker logs its startup just before it takes connections."""

        def started() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            return (
                len(worker_pids(self.process.pid)) == workers
                and self.log().count(WORKER_STARTED_LOG) >= workers
            )

        eventually_sync(started, what=f"{workers} workers started", timeout=timeout)

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


SENTINEL_SERVICE = "mymaster"


class SentinelGroup:
    """A master, one replica and three sentinels (quorum 2), each on a free port, in
    `directory`. `stop()` ends every process started, whatever state it is in."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        (directory / "master").mkdir()
        (directory / "replica").mkdir()
        self.master = RedisServer(directory / "master")
        self.replica = RedisServer(
            directory / "replica",
            extra_args=["--replicaof", "127.0.0.1", str(self.master.port)],
        )
        self.sentinel_ports: list[int] = []
        taken = {self.master.port}
        while self.replica.port in taken:  # free_port() may hand out a port twice
            self.replica.port = free_port()
        taken.add(self.replica.port)
        while len(self.sentinel_ports) < 3:
            port = free_port()
            if port not in taken:
                taken.add(port)
                self.sentinel_ports.append(port)
        self.sentinels: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{SENTINEL_SERVICE}"

    def start(self) -> None:
        try:
            self.master.start()
            self.replica.start()
            eventually_sync(
                lambda: self._info(self.replica.port).get("master_link_status") == "up",
                what="the replica to follow the master",
                timeout=15,
            )
            for port in self.sentinel_ports:
                self.sentinels.append(self._start_sentinel(port))
            eventually_sync(self._sentinels_ready, what="the sentinels to be ready", timeout=45)
        except BaseException as exc:
            self.stop()
            logs = sorted(self.directory.rglob("*.log"))
            tails = "\n".join(f"{p}:\n{p.read_text(errors='replace')[-1500:]}" for p in logs)
            raise RuntimeError(f"the Sentinel group did not start: {exc}\n{tails}") from exc

    def _start_sentinel(self, port: int) -> subprocess.Popen[bytes]:
        conf = self.directory / f"sentinel-{port}.conf"  # the sentinel rewrites it
        conf.write_text(
            f"port {port}\n"
            "bind 127.0.0.1\n"
            f"dir {self.directory}\n"
            f"logfile {self.directory / f'sentinel-{port}.log'}\n"
            f"sentinel monitor {SENTINEL_SERVICE} 127.0.0.1 {self.master.port} 2\n"
            f"sentinel down-after-milliseconds {SENTINEL_SERVICE} 1000\n"
            f"sentinel failover-timeout {SENTINEL_SERVICE} 5000\n"
        )
        return subprocess.Popen(
            ["redis-server", str(conf), "--sentinel"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def _sentinels_ready(self) -> bool:
        """Each sentinel knows the master, the replica and the two other sentinels."""
        for process, port in zip(self.sentinels, self.sentinel_ports, strict=True):
            if process.poll() is not None:
                raise RuntimeError(f"sentinel on port {port} exited with {process.returncode}")
            try:
                with redis.Redis(port=port, socket_connect_timeout=0.2) as sentinel:
                    if len(sentinel.sentinel_slaves(SENTINEL_SERVICE)) != 1:
                        return False
                    if len(sentinel.sentinel_sentinels(SENTINEL_SERVICE)) != 2:
                        return False
            except redis.RedisError:
                return False
        return True

    def master_port_by(self, sentinel_port: int) -> int | None:
        try:
            with redis.Redis(port=sentinel_port, socket_connect_timeout=0.2) as sentinel:
                address = sentinel.sentinel_get_master_addr_by_name(SENTINEL_SERVICE)
        except redis.RedisError:
            return None
        return None if address is None else int(address[1])

    def role(self, port: int) -> str | None:
        try:
            with redis.Redis(port=port, socket_connect_timeout=0.2) as client:
                role = client.role()[0]
        except redis.RedisError:
            return None
        return role.decode() if isinstance(role, bytes) else str(role)

    def _info(self, port: int) -> dict[str, object]:
        try:
            with redis.Redis(port=port, socket_connect_timeout=0.2) as client:
                info: dict[str, object] = client.info("replication")
                return info
        except redis.RedisError:
            return {}

    def failover(self) -> None:
        """Ask the first sentinel to fail over now (no agreement needed)."""
        with redis.Redis(port=self.sentinel_ports[0], socket_connect_timeout=1) as sentinel:
            sentinel.execute_command("SENTINEL", "FAILOVER", SENTINEL_SERVICE)

    def pause_master_until_replaced(self, timeout: float = 60) -> None:
        """SIGSTOP the master until the sentinels promoted its replica, then SIGCONT it:
        it comes back as a master nobody should use any more (until it is converted)."""
        assert self.master.process is not None
        self.master.process.send_signal(signal.SIGSTOP)
        try:
            eventually_sync(
                lambda: self.role(self.replica.port) == "master",
                what="the sentinels to promote the replica",
                timeout=timeout,
            )
        finally:
            self.master.process.send_signal(signal.SIGCONT)

    def failed_over(self) -> bool:
        """The replica is master for every sentinel, and the old master follows it."""
        return (
            self.role(self.replica.port) == "master"
            and self.role(self.master.port) == "slave"
            and self._info(self.master.port).get("master_link_status") == "up"
            and all(self.master_port_by(p) == self.replica.port for p in self.sentinel_ports)
        )

    def stop(self) -> None:
        if self.master.process is not None:
            self.master.process.send_signal(signal.SIGCONT)  # a paused one cannot exit
        for process in self.sentinels:
            terminate(process)
        self.sentinels = []
        self.replica.stop()
        self.master.stop()


def run_bench_module(
    module: str, *args: str, bound_s: float, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`python -m <module> <args>` from the checkout, in a process group of its own.
    Past `bound_s` it gets a SIGTERM first, on which the bench modules stop the servers
    and Redis they started (in sessions of their own), then the group is killed; the
    test fails."""
    command = [sys.executable, "-m", module, *args]
    bench = subprocess.Popen(
        command,
        cwd=Path(__file__).resolve().parent.parent,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = bench.communicate(timeout=bound_s)
    except subprocess.TimeoutExpired:
        bench.send_signal(signal.SIGTERM)
        try:
            stdout, stderr = bench.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(bench.pid, signal.SIGKILL)
            stdout, stderr = bench.communicate()
        pytest.fail(f"{module} took longer than {bound_s}s:\n{stderr[-3000:]}{stdout}")
    finally:
        if bench.poll() is None:
            os.killpg(bench.pid, signal.SIGKILL)
            bench.wait()
    return subprocess.CompletedProcess(command, bench.returncode, stdout, stderr)
