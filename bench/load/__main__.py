"""python -m bench.load --scenario S2 --server streamer --port 8080 --pids 1234 \
    --redis-url redis://127.0.0.1:6390/0 --secret SECRET [--quick] [--events N] [--timeout 300]

Runs one scenario against a running server and prints one JSON line."""

from __future__ import annotations

import argparse
import asyncio
import json

import uvloop

from bench.load.runner import Target, run_scenario
from bench.load.scenarios import NAMES, scenario


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", required=True, choices=NAMES)
    parser.add_argument("--quick", action="store_true", help="the tiny smoke-test version")
    parser.add_argument("--events", type=int, help="measured events (default: the scenario's)")
    parser.add_argument("--server", choices=["streamer", "reference"], required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--pids", required=True, help="serving processes, comma-separated")
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--secret", default="", help="streamer's STREAMER_SECRET")
    parser.add_argument("--timeout", type=float, default=300, help="bound for the whole run")
    args = parser.parse_args()
    target = Target(
        server=args.server,
        host=args.host,
        port=args.port,
        pids=[int(pid) for pid in args.pids.split(",")],
        redis_url=args.redis_url,
        secret=args.secret,
    )
    try:
        chosen = scenario(args.scenario, quick=args.quick, events=args.events)
    except ValueError as exc:
        parser.error(str(exc))
    result = uvloop.run(
        asyncio.wait_for(run_scenario(chosen, target, args.timeout), args.timeout + 30)
    )
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
