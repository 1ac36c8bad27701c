"""python -m bench.reference --port 8001 --redis-url redis://127.0.0.1:6379/0

Serves bench.reference.app with uvicorn on uvloop, one process."""

from __future__ import annotations

import argparse
import os

import uvicorn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()
    os.environ["BENCH_REDIS_URL"] = args.redis_url
    uvicorn.run(
        "bench.reference.app:app",
        host=args.host,
        port=args.port,
        loop="uvloop",
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
