"""The default thread count follows the cores other processes leave free (engine/threads.py)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from engine import threads
from engine.threads import ThreadPolicy, available_cores


def feed(monkeypatch: pytest.MonkeyPatch, samples: list[tuple[float, float, float]]) -> None:
    """Make the policy read these (seconds, machine busy ticks, own ticks) snapshots in turn."""
    it = iter(samples)
    monkeypatch.setattr(threads, "_snapshot", lambda cpus: next(it))
    monkeypatch.setattr(threads.time, "monotonic", lambda: samples[-1][0])
    monkeypatch.setattr(threads, "available_cores", lambda: 4)


def test_others_busy_cores_are_left_to_them(monkeypatch: pytest.MonkeyPatch) -> None:
    tick = threads._TICKS
    # over 1 s: 3.4 cores busy in all, 2.0 of them ours -> others use 1.4 cores -> one taken
    feed(monkeypatch, [(0.0, 0.0, 0.0), (1.0, 3.4 * tick, 2.0 * tick)])
    assert ThreadPolicy(None).threads() == 3


def test_our_own_spinning_threads_do_not_count(monkeypatch: pytest.MonkeyPatch) -> None:
    tick = threads._TICKS
    feed(monkeypatch, [(0.0, 0.0, 0.0), (1.0, 4.0 * tick, 4.0 * tick)])
    assert ThreadPolicy(None).threads() == 4


def test_at_least_one_thread_and_a_fixed_count_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    tick = threads._TICKS
    feed(monkeypatch, [(0.0, 0.0, 0.0), (1.0, 4.0 * tick, 0.0)])
    assert ThreadPolicy(None).threads() == 1
    feed(monkeypatch, [(0.0, 0.0, 0.0), (1.0, 4.0 * tick, 0.0)])
    assert ThreadPolicy(3).threads() == 3  # -t 3: the user's choice, busy or not


def test_a_real_busy_process_takes_a_core_away() -> None:
    cores = available_cores()
    if cores < 2:
        pytest.skip("needs two cores")
    policy = ThreadPolicy(None, interval=0.0)
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        policy.threads()  # starts a window with the busy process running
        time.sleep(0.5)
        assert policy.threads() <= cores - 1
    finally:
        busy.kill()
        busy.wait()
