"""CPU time and resident memory of other processes, read from /proc."""

from __future__ import annotations

import functools
import os
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """Time a process (all its threads) spent on a CPU, in seconds: from the
    scheduler's nanosecond counts, so that a short run reads more than a few clock
    ticks; from utime + stime where the kernel keeps no such counts."""
    if not _has_schedstat():
        return _stat_cpu_seconds(pid)
    while True:
        try:
            per_thread = [
                int(schedstat.read_text().split()[0])
                for schedstat in Path(f"/proc/{pid}/task").glob("*/schedstat")
            ]
        except FileNotFoundError:
            continue  # a thread ended while they were read: again
        if not per_thread:
            raise ProcessLookupError(f"no process {pid}")
        return sum(per_thread) / 1e9


@functools.cache
def _has_schedstat() -> bool:
    return Path("/proc/self/schedstat").exists()


def _stat_cpu_seconds(pid: int) -> float:
    return sum(cpu_split_seconds(pid))


def cpu_split_seconds(pid: int) -> tuple[float, float]:
    """utime and stime of a process (all its threads): in user space and in the kernel,
    in seconds (counted in clock ticks)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) may hold spaces and parentheses: split after its end.
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])
    return utime / CLOCK_TICKS, stime / CLOCK_TICKS


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def total_cpu_seconds(pids: list[int]) -> float:
    return sum(cpu_seconds(pid) for pid in pids)


def total_cpu_split_seconds(pids: list[int]) -> tuple[float, float]:
    splits = [cpu_split_seconds(pid) for pid in pids]
    return sum(user for user, _ in splits), sum(kernel for _, kernel in splits)


def total_rss_kib(pids: list[int]) -> int:
    return sum(rss_kib(pid) for pid in pids)


def own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system
