"""Knowing when Numba compiles kernels, and for how long.

Kernels are compiled on first use (``cache=True``: later processes load them from Numba's
on-disk cache). Numba announces each real compilation, a cache miss, with a ``numba:compile``
event; loading from the cache sends none. A listener on that event:

* adds up the seconds spent compiling (``compile_seconds()``), so timings can leave them out
  (``halfbyte run`` reports prompt speed without them and shows them separately);
* calls the notice callback (``set_notice``, installed by the CLI) once a compilation has been
  running for ``NOTICE_AFTER`` seconds, from a timer thread, so the user learns why nothing
  happens while it does. Compilations less than ``BURST_GAP`` apart count as one burst, which
  gets one notice.

Nothing is remembered between processes: a notice appears exactly when compiling happens.

It also makes sure a Ctrl-C during a compilation is not lost, nor held back until it ends (main
thread, under Python's SIGINT handler or engine.model's deferral). The KeyboardInterrupt is raised
where it arrives, as usual, but that can be inside a ctypes callback of LLVM's code generator
(llvmlite's object-cache notification), which prints "Exception ignored" and drops it: the
compilation then completes and `halfbyte run` went on generating (seen in the Ctrl-C test when a
kernel compiled mid-run). So the Ctrl-C is also noted, and raised again when a compilation it
arrived in ends without it, and Python's "Exception ignored" report of the dropped one (a
traceback on the user's terminal) is left out. (Holding it until the end instead would make a
Ctrl-C wait for a whole compilation: over 15 s on a loaded machine.)
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from collections.abc import Callable

from numba.core import event

NOTICE_AFTER = 0.5  # seconds of compiling before the user is told
BURST_GAP = 1.0  # compilations closer than this share one notice

_log = logging.getLogger("halfbyte")


def kernel_label(dispatcher: object) -> str:
    """A readable name for a Numba dispatcher: its Python function's name."""
    func = getattr(dispatcher, "py_func", None)
    name = getattr(func, "__name__", None) or type(dispatcher).__name__
    return name.strip("_") or name


class _CompileWatcher(event.Listener):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._depth = 0  # nested compile events (a kernel compiles the functions it calls)
        self._started = 0.0
        self._total = 0.0
        self._burst_end = float("-inf")  # when the last compilation ended
        self._burst_seconds = 0.0
        self._announced = False
        self._what = ""
        self._timer: threading.Timer | None = None
        self.notice: Callable[[str], None] | None = None
        self._previous_sigint: object = None  # the SIGINT handler a compilation replaced, if it did
        self._sigint_pending = False
        self._previous_unraisablehook: Callable[[object], None] | None = None

    def _note_sigint(self, signum: int, frame: object) -> None:
        self._sigint_pending = True
        raise KeyboardInterrupt

    def _unraisable(self, unraisable: object) -> None:
        # the noted Ctrl-C, dropped in a ctypes callback: on_end raises it again, so nothing is lost
        if self._sigint_pending and isinstance(getattr(unraisable, "exc_value", None), KeyboardInterrupt):
            return
        (self._previous_unraisablehook or sys.__unraisablehook__)(unraisable)

    def on_start(self, ev: event.Event) -> None:
        with self._lock:
            self._depth += 1
            if self._depth > 1:
                return
            in_main = threading.current_thread() is threading.main_thread()
            previous = signal.getsignal(signal.SIGINT) if in_main else None
            # Python's handler, or one that only defers a Ctrl-C until the kernels return (engine.model:
            # a compilation is Python code, where a KeyboardInterrupt is safe, and can take many seconds)
            if previous is signal.default_int_handler or getattr(previous, "defers_ctrl_c", False):
                signal.signal(signal.SIGINT, self._note_sigint)
                self._previous_sigint = previous
                self._previous_unraisablehook = sys.unraisablehook
                sys.unraisablehook = self._unraisable
            now = time.perf_counter()
            self._started = now
            if now - self._burst_end > BURST_GAP:
                self._announced = False
                self._burst_seconds = 0.0
            data = ev.data if isinstance(ev.data, dict) else {}
            self._what = kernel_label(data.get("dispatcher"))
            if not self._announced:
                delay = max(0.0, NOTICE_AFTER - self._burst_seconds)
                self._timer = threading.Timer(delay, self._still_compiling)
                self._timer.daemon = True
                self._timer.start()

    def on_end(self, ev: event.Event) -> None:
        with self._lock:
            self._depth = max(0, self._depth - 1)
            if self._depth:
                return
            now = time.perf_counter()
            self._total += now - self._started
            self._burst_seconds += now - self._started
            self._burst_end = now
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            lost = False
            if self._previous_sigint is not None:
                if signal.getsignal(signal.SIGINT) == self._note_sigint:  # nobody replaced it meanwhile
                    signal.signal(signal.SIGINT, self._previous_sigint)
                self._previous_sigint = None
                if sys.unraisablehook == self._unraisable:
                    sys.unraisablehook = self._previous_unraisablehook
                self._previous_unraisablehook = None
                # a Ctrl-C arrived, yet the compilation ended without its KeyboardInterrupt: dropped
                lost = self._sigint_pending and not _ended_by_interrupt(ev)
                self._sigint_pending = False
        if lost:
            raise KeyboardInterrupt

    def _still_compiling(self) -> None:
        with self._lock:
            if not self._depth or self._announced:
                return
            self._announced = True
            what = self._what
        notice = self.notice
        if notice is not None:
            notice(what)
        else:
            _log.info("compiling kernels (first use of %s)...", what)

    def total(self) -> float:
        with self._lock:
            running = time.perf_counter() - self._started if self._depth else 0.0
            return self._total + running


def _ended_by_interrupt(ev: event.Event) -> bool:
    details = getattr(ev, "_exc_details", None)  # Event.is_failed says only whether there was one
    return bool(details) and isinstance(details[1], KeyboardInterrupt)


_watcher = _CompileWatcher()
event.register("numba:compile", _watcher)


def compile_seconds() -> float:
    """Seconds this process has spent compiling kernels so far (a running compilation included)."""
    return _watcher.total()


def set_notice(callback: Callable[[str], None] | None) -> None:
    """``callback(kernel_name)`` runs (from a timer thread) when a compilation has taken more than
    ``NOTICE_AFTER`` seconds; None: log it to the ``halfbyte`` logger at INFO level instead."""
    _watcher.notice = callback
