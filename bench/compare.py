"""streamer against the reference server, one after the other in the same run.

    python -m bench.compare S2 [S2-sse S1 ...] [--quick] [--server-cmd CMD] [--output FILE]
        [--only streamer|reference]

For each scenario it starts the reference (bench/reference: Starlette + uvicorn), runs
the load generator (bench/load) against it, stops it, flushes Redis, then does the same
with streamer under gunicorn, and prints one table with both and their ratio. The
server runs on CPU 0; the load generator, its publisher and the private redis-server on
CPU 1. Each result is also appended as a JSON line to --output. Exit status 1 when a
run lost deliveries or could not connect every client.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.load.scenarios import NAMES, scenario
from bench.report import table
from bench.servers import (
    LOAD_CPU,
    ROOT,
    SECRET,
    STREAMER_COMMAND,
    RunningServer,
    ServerSpec,
    flush,
    pinned,
    private_redis,
    reference_spec,
    running_server,
    streamer_spec,
)
from bench.service import stop_on_sigterm

DEFAULT_OUTPUT = ROOT / "bench" / "results.jsonl"


def run_load(
    name: str, spec: ServerSpec, server: RunningServer, redis_url: str, args: argparse.Namespace
) -> dict[str, Any]:
    timeout = args.timeout
    command = [
        sys.executable, "-m", "bench.load", "--scenario", name, "--server", spec.name,
        "--port", str(server.process.port),
        "--pids", ",".join(str(pid) for pid in server.serving_pids),
        "--redis-url", redis_url, "--secret", SECRET, "--timeout", str(timeout),
        *(["--quick"] if args.quick else []),
        *([] if args.events is None else ["--events", str(args.events)]),
    ]  # fmt: skip
    load = subprocess.Popen(
        pinned(LOAD_CPU, command),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its publisher child goes with it if it must be killed
    )
    try:
        stdout, stderr = load.communicate(timeout=timeout + 60)
    finally:
        if load.poll() is None:
            os.killpg(load.pid, signal.SIGKILL)
            load.wait()
    if load.returncode != 0 or not stdout.strip():
        raise RuntimeError(f"the load generator failed ({load.returncode}):\n{stderr[-3000:]}")
    result: dict[str, Any] = json.loads(stdout.splitlines()[-1])
    return result


def measure(
    name: str, spec: ServerSpec, redis_url: str, directory: Path, args: argparse.Namespace
) -> dict[str, Any]:
    """One scenario against one freshly started server; Redis is left empty."""
    print(f"{name}: {spec.name} ...", file=sys.stderr, flush=True)
    with running_server(spec, directory) as server:
        result = run_load(name, spec, server, redis_url, args)
    flush(redis_url)
    result.update(
        time=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        quick=args.quick,
        command=" ".join(spec.command),
        server_pids=server.serving_pids,
    )
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenarios", nargs="+", choices=NAMES, metavar="SCENARIO")
    parser.add_argument("--quick", action="store_true", help="tiny versions, a smoke test")
    parser.add_argument(
        "--events",
        type=int,
        help="measured events of each scenario (default: its own); longer runs read the "
        "server's CPU time steadier",
    )
    parser.add_argument(
        "--server-cmd",
        default=STREAMER_COMMAND,
        help=f"how to start streamer, {{port}} filled in (default: {STREAMER_COMMAND})",
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON lines file")
    parser.add_argument("--timeout", type=float, default=300, help="bound for each load run")
    parser.add_argument(
        "--only", choices=["streamer", "reference"], help="measure one server, not both"
    )
    args = parser.parse_args()
    for name in args.scenarios:
        try:
            scenario(name, quick=args.quick, events=args.events)
        except ValueError as exc:
            parser.error(str(exc))
    stop_on_sigterm()

    results: list[dict[str, Any]] = []
    try:
        with tempfile.TemporaryDirectory() as tmp, private_redis(Path(tmp)) as redis_url:
            specs = [reference_spec(redis_url), streamer_spec(redis_url, args.server_cmd)]
            specs = [spec for spec in specs if args.only in (None, spec.name)]
            for name in args.scenarios:
                for spec in specs:
                    result = measure(name, spec, redis_url, Path(tmp), args)
                    with args.output.open("a") as output:
                        output.write(json.dumps(result) + "\n")
                    results.append(result)
    finally:
        if results:  # what was measured before a failure too
            print(table(results), flush=True)
    complete = all(r["lost"] == 0 and r["connected"] == r["clients"] for r in results)
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())
