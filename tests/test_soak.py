"""The bounded soak run (bench/soak.py): clients reconnecting at random while Redis
subscriber connections and gunicorn workers are killed. Nothing may be lost,
duplicated or reordered. Its duration is SOAK_SECONDS (60 by default, as in CI)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def test_soak_loses_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    duration = float(os.environ.get("SOAK_SECONDS", "60"))
    result = subprocess.run(
        [
            *(sys.executable, "-m", "bench.soak", "--duration", str(duration)),
            *("--worker-kill-every", str(duration / 4), "--redis-kill-every", str(duration / 10)),
        ],
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        capture_output=True,
        text=True,
        timeout=duration + 240,
    )
    with capsys.disabled():  # the figures belong in the CI log
        print("\n" + "\n".join(result.stdout.splitlines()[:-1]))
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout
    figures = json.loads(result.stdout.splitlines()[-1])
    assert figures["published"] > 0 and figures["delivered"] == figures["expected_deliveries"]
    assert figures["lost"] == figures["duplicated"] == figures["reordered"] == 0
    assert figures["worker_kills"] >= 1 and figures["redis_subscriber_kills"] >= 1
    assert figures["reconnects"] > 0
