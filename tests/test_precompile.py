"""Compiling the kernels ahead of the first run (engine/precompile.py, `halfbyte precompile`, and the
wheel's build step in setup.py): what it compiled is what a real run asks for, so the run after it
compiles nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from converters.synthetic import LlamaShape, write_synthetic

REPO = Path(__file__).resolve().parents[1]


def halfbyte(args: list[str], env: dict) -> subprocess.CompletedProcess:
    # NUMBA_DEBUG_CACHE: Numba prints "[cache] data saved to ..." for every kernel it compiles
    result = subprocess.run([sys.executable, "-m", "engine", *args], cwd=REPO, env=dict(env, NUMBA_DEBUG_CACHE="1"),
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


@pytest.mark.slow
def test_after_precompile_the_runs_compile_nothing(tmp_path) -> None:
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba-cache"), HALFBYTE_BACKGROUND_COMPILE="0")
    first = halfbyte(["precompile", "q4_0"], env)
    assert "[cache] data saved" in first.stdout  # it compiled, into this empty cache
    assert "halfbyte: kernels compiled for this machine in " in first.stderr

    # a model of another shape than precompile's tiny one: kernels depend on types, not sizes
    q4_0 = write_synthetic(tmp_path / "q4_0.gguf", LlamaShape(1000, 512, 2, 8, 4, 1024, 512), seed=5)
    for args in (["run", "-p", "In the beginning", "-n", "12"],  # the demo model
                 ["run", str(q4_0), "-p", "hi", "-n", "4", "--temp", "0"],
                 ["bench", str(q4_0), "-p", "40", "-n", "4", "-r", "1"]):
        result = halfbyte(args, env)
        assert "[cache] data saved" not in result.stdout, (args, result.stdout[-3000:])
        assert "compiling kernels" not in result.stderr, (args, result.stderr)


def test_precompile_names_what_it_cannot_do() -> None:
    result = subprocess.run([sys.executable, "-m", "engine", "precompile", "q4_k_s"], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.startswith("halfbyte: error: q4_k_s: precompile covers q4_k_m, ")
    assert "Traceback" not in result.stderr
