"""gunicorn settings for streamer.

    gunicorn 'streamer.app:create_app' -c deploy/gunicorn.conf.py

Command-line flags (--bind, --workers, ...) override these values.
"""

import atexit
import fcntl
import glob
import os
import shutil
import sys
import tempfile

# A reload (SIGHUP) runs this file again in the master. Workers forked after it would
# inherit the master's imports of streamer (this file's, the worker class's) and import
# the rest anew: after an upgrade, two versions of streamer in one worker. Forgotten
# here, every module comes from the version installed now (but for the log formatting:
# gunicorn keeps its logger object, so a change there needs a restart).
for _module in [name for name in sys.modules if name.split(".")[0] == "streamer"]:
    del sys.modules[_module]

# /metrics sums over the workers: each keeps its values in files in this directory
# (prometheus-client's multiprocess mode). It must be set before a worker imports
# prometheus-client; without it, a temporary one is made here and removed on exit.
METRICS_DIR_PREFIX = "streamer-metrics-"
# Locked (flock) in each such directory by the master that made it, and by its workers,
# which inherit the lock, for as long as any of them runs: a directory nobody holds is
# stale, whatever pid it names (a container's master is always pid 1) and in whichever
# pid namespace its master ran (containers that share a /tmp).
OWNER_LOCK = "owner.lock"


def _remove_metrics_dir(path: str, master_pid: int) -> None:
    if os.getpid() == master_pid:  # not in a worker that exits: the others go on
        shutil.rmtree(path, ignore_errors=True)


def _hold(path: str) -> None:
    descriptor = os.open(os.path.join(path, OWNER_LOCK), os.O_CREAT | os.O_RDWR, 0o600)
    fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    # Never closed: the lock goes when this master and its workers have all exited, and
    # a master started by a binary upgrade (SIGUSR2, an exec) holds it too.
    os.set_inheritable(descriptor, True)


def _held(path: str) -> bool | None:
    """Whether a running master or worker holds the directory; None for one made
    without the lock (by an earlier version)."""
    try:
        descriptor = os.open(os.path.join(path, OWNER_LOCK), os.O_RDWR)
    except FileNotFoundError:
        return None
    except OSError:
        return True  # another user's: not this master's to judge
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(descriptor)  # and the lock with it, where it was taken
    return False


def _owner_pid(path: str) -> str:
    """The pid in a directory's name: streamer-metrics-<pid>-<random>."""
    return os.path.basename(path.rstrip(os.sep))[len(METRICS_DIR_PREFIX) :].split("-")[0]


def _pid_gone(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:
        pass  # another user's
    return False


def _remove_stale_metrics_dirs() -> None:
    """Those of masters that are gone without removing theirs (killed)."""
    pattern = os.path.join(tempfile.gettempdir(), f"{METRICS_DIR_PREFIX}*-*")
    for path in glob.glob(pattern):
        held = _held(path)
        if held is None:  # by the pid in its name
            pid = _owner_pid(path)
            stale = pid.isdigit() and _pid_gone(pid)
        else:
            stale = not held
        if stale:
            shutil.rmtree(path, ignore_errors=True)


def _made_by_another_master(path: str) -> bool:
    """One of these directories, inherited from the master that started this one
    (gunicorn's binary upgrade, SIGUSR2): that master removes it when it exits."""
    if not os.path.basename(path.rstrip(os.sep)).startswith(METRICS_DIR_PREFIX):
        return False
    return _owner_pid(path) != str(os.getpid())


# The directory this master made (and locked); another one, given by the operator (in
# the environment, or with gunicorn's -e, which is applied after this file runs), is
# locked at start (on_starting).
_made_here = None
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR") or _made_by_another_master(
    os.environ["PROMETHEUS_MULTIPROC_DIR"]
):
    _remove_stale_metrics_dirs()
    # Made and locked under a name other masters' clean-ups do not look at, then renamed:
    # none of them ever sees it without its lock held.
    _making = tempfile.mkdtemp(prefix=f".{METRICS_DIR_PREFIX}{os.getpid()}-")
    try:
        _hold(_making)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = os.path.join(
            os.path.dirname(_making), os.path.basename(_making)[1:]
        )
        os.rename(_making, os.environ["PROMETHEUS_MULTIPROC_DIR"])
        _made_here = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    except BaseException:
        shutil.rmtree(_making, ignore_errors=True)
        raise
    # When the master exits, however it does (on_starting may refuse to start).
    atexit.register(_remove_metrics_dir, os.environ["PROMETHEUS_MULTIPROC_DIR"], os.getpid())

from streamer.config import Config, ConfigError, log_warnings_once  # noqa: E402

# Comma-separated addresses, as gunicorn's own GUNICORN_CMD_ARGS would take several.
bind = [
    address.strip() for address in os.environ.get("GUNICORN_BIND", "").split(",") if address.strip()
] or ["0.0.0.0:8080"]
# gunicorn parses WEB_CONCURRENCY itself first (a value int() refuses stops it there).
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
# aiohttp's uvloop worker with streamer's HTTP timeouts (streamer.worker.StreamerWorker
# is the same on asyncio's own event loop).
worker_class = "streamer.worker.StreamerUVLoopWorker"
# Long-lived streams: the worker timeout only concerns the worker's heartbeat
# to the arbiter, which aiohttp's worker sends from its event loop.
timeout = 30
# On SIGTERM / reload, WebSockets close with 1001 and SSE streams end within this.
graceful_timeout = 20
# Keep-alive, request header and body timeouts come from STREAMER_KEEPALIVE_S,
# STREAMER_HEADER_TIMEOUT_S and STREAMER_BODY_TIMEOUT_S; gunicorn's keepalive is unused.
accesslog = "-"
errorlog = "-"
# Every line of gunicorn's own in STREAMER_LOG_FORMAT, its first and those after a reload.
logger_class = "streamer.gunicorn_logger.GunicornLogger"
# gunicorn's control socket (gunicornc, gunicorn >= 25.1) only where asked for, with
# GUNICORN_CONTROL_SOCKET=/run/streamer/gunicorn.ctl: by default it would go to
# $HOME/.gunicorn/, which a system user without a home cannot create, and which
# every gunicorn of that user on the host would share.
control_socket = os.environ.get("GUNICORN_CONTROL_SOCKET", "").strip()
control_socket_disable = not control_socket


def _refuse(server, message):  # type: ignore[no-untyped-def]
    """Stop before any worker starts, saying why in gunicorn's log (in
    STREAMER_LOG_FORMAT, as every other line)."""
    server.log.error("streamer: %s", message)
    sys.exit(1)


def _bind_problem(address):  # type: ignore[no-untyped-def]
    """What gunicorn would otherwise fail on with a traceback, or after retrying for
    seconds: a port it cannot parse or no port can have, a socket path left empty."""
    from gunicorn.util import parse_address

    try:
        parsed = parse_address(address.strip())
    except RuntimeError as exc:
        return str(exc)
    if isinstance(parsed, tuple) and not 0 <= parsed[1] <= 65535:
        return f"the port must be from 0 to 65535, not {parsed[1]}"
    if parsed == "":
        return "a unix socket needs a path (unix:/run/streamer/streamer.sock)"
    return None


def on_starting(server):  # type: ignore[no-untyped-def]
    """Refuse to start with a configuration that cannot work, before forking workers;
    start the metrics from zero (files of an earlier run would be summed in), unless
    this master was started by a binary upgrade (SIGUSR2): the workers of the one
    that started it still write theirs."""
    metrics_dir = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    try:
        os.makedirs(metrics_dir, exist_ok=True)
    except OSError as exc:
        _refuse(server, f"configuration error: PROMETHEUS_MULTIPROC_DIR: {exc}")
    if not server.master_pid:
        if metrics_dir != _made_here:
            # Its files are this master's to clear and its workers' to write: another
            # gunicorn running on it would have them wiped, and its numbers mixed in.
            try:
                _hold(metrics_dir)
            except BlockingIOError:
                _refuse(
                    server,
                    f"configuration error: PROMETHEUS_MULTIPROC_DIR={metrics_dir} "
                    "is in use by another gunicorn that is running: give each its own",
                )
            except OSError as exc:
                _refuse(server, f"configuration error: PROMETHEUS_MULTIPROC_DIR: {exc}")
        for path in glob.glob(os.path.join(metrics_dir, "*.db")):
            os.remove(path)
    try:
        config = Config.from_env(os.environ)
    except ConfigError as exc:
        _refuse(server, f"configuration error: {exc}")
    log_warnings_once(config, lambda warning: server.log.warning("streamer: %s", warning))
    if server.cfg.workers < 1:
        _refuse(
            server,
            f"configuration error: {server.cfg.workers} workers "
            "(--workers or WEB_CONCURRENCY): at least one serves the clients",
        )
    if not server.cfg.bind or not all(address.strip() for address in server.cfg.bind):
        _refuse(server, "configuration error: no address to listen on (--bind, GUNICORN_BIND)")
    for address in server.cfg.bind:
        problem = _bind_problem(address)
        if problem:
            _refuse(server, f"configuration error: --bind / GUNICORN_BIND {address!r}: {problem}")
    if config.redis_url is None and server.cfg.workers > 1:
        _refuse(
            server,
            f"refusing to start {server.cfg.workers} workers without "
            "STREAMER_REDIS_URL: the embedded broker lives in one process, so clients "
            "of one worker would never see events published through another. "
            "Set STREAMER_REDIS_URL, or run a single worker (--workers 1).",
        )


def _workers_settings(server):  # type: ignore[no-untyped-def]
    """The settings as the workers get them (during a reload, gunicorn has taken its -e
    variables out of the environment for a while); None if they are refused (the
    workers refuse to start, and say why)."""
    try:
        return Config.from_env({**os.environ, **server.cfg.env})
    except ConfigError:
        return None


def _without_redis(server):  # type: ignore[no-untyped-def]
    """Whether the workers would run the embedded broker."""
    config = _workers_settings(server)
    return config is not None and config.redis_url is None


def nworkers_changed(server, new_value, old_value):  # type: ignore[no-untyped-def]
    """More workers at run time (SIGTTIN, a reload to more) need Redis, as at start: the
    embedded broker lives in one process. gunicorn counts the change before this is
    called."""
    if old_value is not None and new_value > 1 and _without_redis(server):
        server.log.error(
            "streamer: refusing to run %d workers without STREAMER_REDIS_URL (the embedded "
            "broker lives in one process): running 1",
            new_value,
        )
        server.num_workers = 1


def on_reload(server):  # type: ignore[no-untyped-def]
    """A reload starts as many workers as the settings say (a changed config file, say),
    without on_starting's checks; nworkers_changed has said why it is one."""
    if server.cfg.workers > 1 and _without_redis(server):
        server.cfg.set("workers", 1)
    # This file ran again, and streamer's modules with it: the settings' warnings, once
    # more here, not by each worker to come.
    config = _workers_settings(server)
    if config is not None:
        log_warnings_once(config, lambda warning: server.log.warning("streamer: %s", warning))


def child_exit(server, worker):  # type: ignore[no-untyped-def]
    """A worker is gone (stopped, crashed or killed): its open connections no longer
    count; what it counted (events, disconnects, ...) stays in the sums."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
