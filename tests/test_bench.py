"""The benchmark suite's smoke test: `bench.compare --quick` runs tiny versions of a
WebSocket and an SSE scenario against the reference server and streamer (real uvicorn,
real gunicorn, a private redis-server) and prints its table with their ratio."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from pathlib import Path

import pytest

from bench.load import publisher as bench_publisher
from bench.load import scenarios

from .processes import run_bench_module

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ("S1", "S2-sse")
SERVERS = ("reference", "streamer")
BOUND_S = 60
EVENTS = 60  # instead of the quick scenarios' 100: `--events` is passed on


def run_compare(output: Path) -> subprocess.CompletedProcess[str]:
    return run_bench(
        "bench.compare", *SCENARIOS, "--quick", "--events", str(EVENTS),
        "--output", str(output), "--timeout", "30",
    )  # fmt: skip


def run_bench(
    module: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return run_bench_module(module, *args, bound_s=BOUND_S, env=env)


@pytest.mark.timeout(BOUND_S + 40)
def test_compare_quick_prints_the_table(tmp_path: Path) -> None:
    output = tmp_path / "results.jsonl"
    compare = run_compare(output)
    assert compare.returncode == 0, compare.stderr[-3000:] + compare.stdout

    rows = {tuple(line.split()[:2]): line.split() for line in compare.stdout.splitlines()}
    for scenario in SCENARIOS:
        for server in SERVERS:
            row = rows[scenario, server]
            connected, clients = row[2].split("/")
            assert connected == clients != "0", row
            assert row[-2] == "0", f"lost deliveries: {row}"
        ratio = rows[scenario, "streamer/reference"]
        assert len(ratio) > 2 and all(cell.startswith("x") for cell in ratio[2:]), ratio

    results = [json.loads(line) for line in output.read_text().splitlines()]
    assert {(r["scenario"], r["server"]) for r in results} == {
        (scenario, server) for scenario in SCENARIOS for server in SERVERS
    }
    for result in results:
        assert result["events"] == EVENTS, result
        assert result["connected"] == result["clients"] == result["probed"], result
        assert result["delivered"] == result["expected"] > 0 and result["lost"] == 0, result
        assert result["duplicates"] == result["misrouted"] == 0, result
        assert result["p99_ms"] is not None and result["deliveries_per_cpu_s"] > 0, result


def test_a_number_of_events_is_refused_where_it_does_not_apply() -> None:
    assert scenarios.scenario("S1", events=5000).events == 5000
    with pytest.raises(ValueError, match="S3 has idle clients"):
        scenarios.scenario("S3", events=10)
    with pytest.raises(ValueError, match="at least 1"):
        scenarios.scenario("S1-sse", events=0)


@pytest.mark.timeout(BOUND_S + 40)
def test_publish_bench_fills_the_histories_then_measures() -> None:
    env = {**os.environ, "STREAMER_HISTORY_SIZE": "30"}
    args = ("--seconds", "0.3", "--users", "3", "--only", "sync", "many-sync-100")
    bench = run_bench("bench.publish", *args, env=env)
    assert bench.returncode == 0, bench.stderr[-3000:] + bench.stdout

    assert "histories filled first: 90 events" in bench.stdout.splitlines(), bench.stdout
    rows = {line[:24].strip(): line[24:].split() for line in bench.stdout.splitlines()}
    for name in ("sync progress", "sync many 100"):
        events_per_s, *per_event, events_per_call = rows[name]
        assert float(events_per_s.replace(",", "")) > 0, rows[name]
        assert len(per_event) == 3 and all(float(value) > 0 for value in per_event), rows[name]
        assert events_per_call == ("1" if name == "sync progress" else "100"), rows[name]


@pytest.mark.timeout(BOUND_S + 40)
def test_resume_bench_has_every_client_get_every_event_and_reports_the_worker_peak() -> None:
    args = ("--clients", "2", "--events", "40", "--event-kib", "4", "--hold", "0.2")
    bench = run_bench("bench.resume", *args)
    assert bench.returncode == 0, bench.stderr[-3000:] + bench.stdout
    outcome = json.loads(bench.stdout.splitlines()[-1])
    assert outcome["complete_clients"] == 2 and outcome["events"] == 40, outcome
    assert outcome["worker_rss_before_mib"] > 0 and outcome["worker_peak_growth_mib"] >= 0


class _CountingSink:
    """Records each send and how many were in flight at once."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.sent: list[tuple[str, int]] = []
        self.in_flight = 0
        self.most_in_flight = 0
        self._fail_at = fail_at

    async def send(self, user: str, task_id: str, seq: int, total: int) -> None:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0.001)
            if seq == self._fail_at:
                raise ConnectionError("the broker went away")
            self.sent.append((user, seq))
        finally:
            self.in_flight -= 1

    async def close(self) -> None:
        return None


async def test_the_bench_publisher_keeps_its_calls_in_flight_and_sends_each_event_once() -> None:
    sink = _CountingSink()
    answer = await bench_publisher.publish(sink, users=3, events=50, rate=0)
    assert answer["published"] == 50
    assert sorted(seq for _, seq in sink.sent) == list(range(50))
    assert all(user == str(seq % 3) for user, seq in sink.sent)
    assert sink.most_in_flight == bench_publisher.IN_FLIGHT


async def test_a_failed_bench_publish_is_the_run_s_error() -> None:
    with pytest.raises(ConnectionError, match="went away"):
        await bench_publisher.publish(_CountingSink(fail_at=7), users=3, events=20, rate=0)
