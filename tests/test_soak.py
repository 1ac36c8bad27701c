"""The bounded soak runs (bench/soak.py): clients reconnecting at random (a quarter of
their connections ending right after the snapshot, before any task event) while Redis
subscriber connections and gunicorn workers are killed. Nothing may be lost,
duplicated or reordered, and ids on a connection only go up. Each run lasts
SOAK_SECONDS (60 by default, as in CI): the usual setting, a harsher one with
more clients, users, producers and workers and faster faults, and (at most 30 s) one
on a Redis Cluster."""

from __future__ import annotations

import json
import os

import pytest

from .processes import run_bench_module

DURATION_S = float(os.environ.get("SOAK_SECONDS", "60"))
# Publishing, the bounded drain (at most 120 s), start-up and shutdown.
BOUND_S = DURATION_S + 240


SETTINGS = {
    "usual": [
        *("--worker-kill-every", str(DURATION_S / 4), "--redis-kill-every", str(DURATION_S / 10)),
    ],
    "harsh": [
        *("--clients", "200", "--users", "20", "--producers", "8", "--workers", "3"),
        *("--worker-kill-every", "7", "--redis-kill-every", "2", "--seed", "7"),
        *("--timeout", "120"),
    ],
    # Redis Cluster: subscriber connections killed on every master, workers killed.
    "cluster": [
        *("--cluster", "--duration", str(min(DURATION_S, 30.0))),
        *("--worker-kill-every", "10", "--redis-kill-every", "3"),
    ],
}


@pytest.mark.timeout(BOUND_S + 120)
@pytest.mark.parametrize("setting", SETTINGS)
def test_soak_loses_nothing(setting: str, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--duration", str(DURATION_S), *SETTINGS[setting]]
    soak = run_bench_module("bench.soak", *args, bound_s=BOUND_S)
    stdout, stderr = soak.stdout, soak.stderr
    with capsys.disabled():  # the figures belong in the CI log
        print(f"\n{setting} soak: -m bench.soak {' '.join(args)}")
        print("\n".join(stdout.splitlines()[:-1]))
    assert soak.returncode == 0, stderr[-3000:] + stdout
    figures = json.loads(stdout.splitlines()[-1])
    assert figures["published"] > 0 and figures["delivered"] == figures["expected_deliveries"]
    assert figures["lost"] == figures["duplicated"] == figures["reordered"] == 0
    assert figures["unexpected"] == figures["backward_ids"] == 0
    assert figures["drops_after_snapshot"] > 0
    assert figures["worker_kills"] >= 1 and figures["redis_subscriber_kills"] >= 1
    assert figures["reconnects"] > 0
