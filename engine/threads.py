"""How many threads to run the kernels with: the cores other processes leave free.

Every parallel kernel splits its rows evenly over its threads and ends at a barrier, so one thread
that shares its core with another busy process holds up every kernel call: on a 2-core machine
with one core busy, 2 threads gave 1.5 tokens/s where 1 thread gave 12.7 (TinyLlama-shape Q4_0,
Intel Xeon). llama.cpp collapses the same way. So when the user does not fix the thread count,
halfbyte uses the cores that were not busy with *other* processes over the last sampling window:
``/proc/stat`` says how busy every CPU was, ``/proc/self/stat`` how much of that was us (our own
threads spin while they wait at barriers, which must not count against us).

Sampling costs two small file reads and no waiting: the window is the time between two calls,
and a new sample is taken at most every ``interval`` seconds (the decode loop asks every token).
"""

from __future__ import annotations

import os
import time

# /proc/stat counts in USER_HZ ticks; /proc/self/stat too (utime + stime).
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
# A core counts as taken by others when they used more than this share of one core.
BUSY_SHARE = 0.5


def available_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _cpu_set() -> set[int] | None:
    try:
        return set(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return None


def _snapshot(cpus: set[int] | None) -> tuple[float, float, float] | None:
    """(monotonic seconds, busy ticks of the CPUs we may run on, CPU ticks of this process)."""
    try:
        with open("/proc/stat", "rb") as f:
            lines = f.read().splitlines()
        with open("/proc/self/stat", "rb") as f:
            own = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    busy = 0
    for line in lines:
        if not (line.startswith(b"cpu") and line[3:4].isdigit()):
            continue
        name, *fields = line.split()
        if cpus is not None and int(name[3:]) not in cpus:
            continue
        values = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
        busy += sum(values) - values[3] - values[4]
    return time.monotonic(), float(busy), float(int(own[11]) + int(own[12]))  # our utime + stime


class ThreadPolicy:
    """``requested`` threads if the user chose a number, else the cores free of other processes."""

    def __init__(self, requested: int | None, interval: float = 0.5) -> None:
        self.cores = available_cores()
        self.fixed = requested is not None and requested > 0
        self.max_threads = requested if self.fixed else self.cores
        self.interval = interval
        self._cpus = _cpu_set()
        self._last = _snapshot(self._cpus)
        self._current = self.max_threads

    def threads(self) -> int:
        """The thread count for the next kernel calls (refreshed at most every ``interval`` s)."""
        if self.fixed:
            return self.max_threads
        now = time.monotonic()
        if self._last is None or now - self._last[0] < self.interval:
            return self._current
        sample = _snapshot(self._cpus)
        if sample is None:
            return self._current
        seconds = sample[0] - self._last[0]
        others = max(0.0, (sample[1] - self._last[1]) - (sample[2] - self._last[2])) / _TICKS / seconds
        self._last = sample
        busy_cores = int(others + (1.0 - BUSY_SHARE))  # a core counts once others use half of it
        self._current = max(1, min(self.max_threads, self.cores - busy_cores))
        return self._current
