"""`halfbyte run`: what reaches stdout and stderr, interactive mode, the compile notice."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner

from converters.synthetic import LlamaShape, write_synthetic
from engine.cli import main
from engine.model import Model

SHAPE = LlamaShape(n_vocab=32000, n_embd=128, n_layer=2, n_head=4, n_head_kv=2, n_ctx=256, n_ff=256)
GREEDY = ["--temp", "0", "--repeat-penalty", "1", "-t", "1"]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    return write_synthetic(tmp_path_factory.mktemp("run") / "m.gguf", SHAPE)


def invoke(*args, input=None):
    return CliRunner().invoke(main, ["run", *map(str, args)], input=input)


def test_stdout_is_exactly_the_generated_text(model_file):
    expected = Model.load(model_file, threads=1).generate("hello", max_tokens=10, temperature=0, repeat_penalty=1)
    result = invoke(model_file, "-p", "hello", "-n", 10, *GREEDY)
    assert result.exit_code == 0, result.output
    assert result.stdout == expected
    assert "prompt" in result.stderr and "tokens/s" in result.stderr and "stopped: length" in result.stderr


def test_echo_prints_the_prompt_first(model_file):
    result = invoke(model_file, "-p", "hello", "-n", 4, "--echo", *GREEDY)
    assert result.exit_code == 0 and result.stdout.startswith("hello")


def test_interactive_mode_reads_turns_until_end_of_input(model_file):
    model = Model.load(model_file, threads=1)
    first = model.generate("hi\n", max_tokens=3, temperature=0, repeat_penalty=1)
    second = model.generate("again\n", max_tokens=3, temperature=0, repeat_penalty=1, reset=False, add_bos=False)
    result = invoke(model_file, "-i", "-n", 3, *GREEDY, input="hi\nagain\n")
    assert result.exit_code == 0, result.output
    assert result.stdout == first + second  # the second turn continues the first one's context
    assert result.stderr.count("> ") == 3  # a prompt before each turn and one at end of input


def test_no_compile_notice_when_nothing_compiles(model_file):
    invoke(model_file, "-p", "hi", "-n", 1, *GREEDY)  # whatever this process had to compile, it has now
    warm = invoke(model_file, "-p", "hi", "-n", 1, *GREEDY)
    assert warm.exit_code == 0 and "compiling kernels" not in warm.stderr


@pytest.mark.slow
def test_compile_notice_and_time_when_kernels_compile(tmp_path):
    """A fresh Numba cache: the notice appears, and the compile time is reported apart from the prompt
    speed. A second process with the now-warm cache says nothing about compiling."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    args = [sys.executable, "-m", "engine", "run", "-p", "Once upon a time", "-n", "2", "-s", "1", "-t", "1"]
    cold = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert cold.returncode == 0, cold.stderr
    assert "halfbyte: compiling kernels (first use of " in cold.stderr
    match = re.search(r"prompt +\d+ tokens in +([\d.]+) s .*\(\+([\d.]+) s compiling kernels\)", cold.stderr)
    assert match and float(match.group(2)) > 0.5, cold.stderr
    warm = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert warm.returncode == 0, warm.stderr
    assert "compiling" not in warm.stderr


def test_compile_watcher_counts_only_real_compilations():
    import numba

    from engine import jit_cache

    notices = []
    jit_cache.set_notice(notices.append)
    monkey_after = jit_cache.NOTICE_AFTER
    try:
        jit_cache.NOTICE_AFTER = 0.0

        @numba.njit
        def _fresh_kernel(x):
            return x + 1

        before = jit_cache.compile_seconds()
        _fresh_kernel(1)
        compiled = jit_cache.compile_seconds() - before
        _fresh_kernel(2)  # already compiled: no event
        assert compiled > 0 and jit_cache.compile_seconds() - before == compiled
    finally:
        jit_cache.NOTICE_AFTER = monkey_after
        jit_cache.set_notice(None)
    time.sleep(0.1)  # the notice comes from a timer thread
    assert notices in ([], ["fresh_kernel"])  # a fast compile may end before the timer fires


def test_a_ctrl_c_dropped_inside_a_compilation_is_raised_when_it_ends(monkeypatch):
    """A SIGINT during a compilation raises at once, but where it lands in a ctypes callback
    (llvmlite's) the KeyboardInterrupt is dropped with an "Exception ignored" traceback on stderr,
    and the compilation completes: the compile watcher raises it again then (the run used to go
    on), and leaves that report out (the CI flake of session 8). One that comes out of the
    compilation itself is not raised twice."""
    import ctypes
    import signal

    import numba
    from numba.core import event

    from engine import jit_cache  # noqa: F401 (installs the compile watcher)

    def ctrl_c_arrives() -> None:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # the handler runs here and raises

    class CtrlCInACallback(event.Listener):
        """The Ctrl-C arrives while a ctypes callback runs (ctypes drops it), or in plain code."""

        def __init__(self, in_ctypes_callback: bool) -> None:
            self.callback = ctypes.CFUNCTYPE(None)(ctrl_c_arrives) if in_ctypes_callback else ctrl_c_arrives

        def on_start(self, ev):
            self.callback()

        def on_end(self, ev):
            pass

    reported = []  # what Python would print as "Exception ignored ..."
    monkeypatch.setattr(sys, "unraisablehook", reported.append)
    for dropped in (True, False):
        @numba.njit
        def kernel_compiled_under_ctrl_c(x):
            return x * 2 + 1

        listener = CtrlCInACallback(dropped)
        event.register("numba:compile", listener)
        try:
            with pytest.raises(KeyboardInterrupt):
                kernel_compiled_under_ctrl_c(1)
        finally:
            event.unregister("numba:compile", listener)
        # dropped: raised after the compilation, which completed; not dropped: it stopped the compilation
        assert bool(kernel_compiled_under_ctrl_c.signatures) == dropped
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert sys.unraisablehook == reported.append
        assert not jit_cache._watcher._sigint_pending  # nothing left over for the next compilation
        assert kernel_compiled_under_ctrl_c(2) == 5
        assert reported == []

    # inside a forward pass (Ctrl-C deferred while kernels run) a compilation still takes it at once
    from engine.model import deferred_interrupts

    @numba.njit
    def kernel_compiled_in_a_forward_pass(x):
        return x - 1

    listener = CtrlCInACallback(in_ctypes_callback=False)
    event.register("numba:compile", listener)
    try:
        with pytest.raises(KeyboardInterrupt), deferred_interrupts():
            deferring = signal.getsignal(signal.SIGINT)
            kernel_compiled_in_a_forward_pass(1)
    finally:
        event.unregister("numba:compile", listener)
    assert deferring is not signal.default_int_handler and not kernel_compiled_in_a_forward_pass.signatures
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.parametrize("args,message", [
    (["-p", "hi", "--temp", "-1"], "temperature"),
    (["-p", "hi", "-c", "-1"], "-c must be >= 0"),
    (["-p", "word " * 300, "-c", "64"], "does not fit in the context of 64"),
    (["-f", "{missing}"], "missing.txt"),
])
def test_bad_input_is_one_line(model_file, tmp_path, args, message):
    args = [a.format(missing=tmp_path / "missing.txt") for a in args]
    result = invoke(model_file, *args)
    assert result.exit_code == 1 and message in result.stderr and "Traceback" not in result.output


def test_context_shift_keeps_generating_past_the_context(model_file):
    model = Model.load(model_file, n_ctx=32, threads=1)
    model.generate("hello", max_tokens=60, temperature=0, repeat_penalty=1)
    assert model.last_stats.stop_reason == "context" and model.last_stats.generated_tokens < 60
    model.generate("hello", max_tokens=60, temperature=0, repeat_penalty=1, context_shift=True)
    assert model.last_stats.stop_reason == "length" and model.last_stats.generated_tokens == 60
    assert model.n_past <= 32
    # After a shift the state is exactly a fresh evaluation of the kept tokens.
    kept = list(model.tokens)
    logits = model.eval([5], last_only=True)
    fresh = Model.load(model_file, n_ctx=32, threads=1)
    fresh.eval(kept)
    np.testing.assert_allclose(fresh.eval([5], last_only=True), logits, rtol=1e-5, atol=1e-5)
    result = invoke(model_file, "-p", "hello", "-n", 40, "-c", 16, "--context-shift", *GREEDY)
    assert result.exit_code == 0 and "stopped: length" in result.stderr
