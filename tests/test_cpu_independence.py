"""The same file gives the same logits on every x86 CPU, whatever LLVM tunes the code for.

Numba compiles for the host's CPU name, and LLVM's cost model for that name picks vector widths
and interleave counts. Wherever float math may be reassociated, that choice changes the order of
a sum, so a Sapphire Rapids and a Zen 5 running the very same AVX-512 kernels once produced
different logits, and a README sample recorded on one failed on the other (issue 13). The kernels
now fix every float summation order in their own code (integer block dots, explicit vector IR,
no ``reassoc``). This test holds them to it: the demo model's logits, for a prompt and for
token-by-token decoding, computed in child processes whose Numba target is the host's features
tuned as other CPUs (Zen 5, Sapphire Rapids, Haswell tuning), are bit-identical to the host's.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from engine.kernels import simd

REPO = Path(__file__).resolve().parents[1]

LOGITS_SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    from engine import Model
    from engine.default_model import default_model_path

    model = Model.load(default_model_path(), threads=2)
    ids = model.tokenize("And the LORD said unto Moses, Speak unto the children of Israel")
    prompt = model.eval(ids)
    steps = [model.eval([t]) for t in (300, 261, 345, 394)]
    np.save(sys.argv[1], np.concatenate([prompt, *steps]))
    """
)

# LLVM CPU names whose tuning differs from one another (512-bit vs 256-bit preferred vectors,
# other interleave counts); the features stay the host's, so the same kernels are picked.
TUNINGS = ("znver5", "sapphirerapids", "haswell")


def logits_in_child(tmp_path: Path, cpu_name: str | None) -> np.ndarray:
    env = dict(os.environ, PYTHONPATH=str(REPO), NUMBA_CACHE_DIR=str(tmp_path / f"cache-{cpu_name}"))
    if cpu_name is not None:
        env["NUMBA_CPU_NAME"] = cpu_name
        # Every feature said, present or absent: a feature left unsaid takes the CPU name's default,
        # and znver5's include AVX-VNNI, which a Zen 4 host lacks (the child died of SIGILL there).
        import llvmlite.binding as llvm

        have = simd._target_features()
        known = set(llvm.get_host_cpu_features()) | have
        env["NUMBA_CPU_FEATURES"] = ",".join(f"+{f}" if f in have else f"-{f}" for f in sorted(known))
    out = tmp_path / f"logits-{cpu_name}.npy"
    result = subprocess.run([sys.executable, "-c", LOGITS_SCRIPT, str(out)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return np.load(out)


@pytest.mark.slow
def test_logits_do_not_depend_on_the_cpu_tuning(tmp_path: Path) -> None:
    if not simd.has_x8_kernels():
        pytest.skip("the tunings compared here are x86 ones")
    host = logits_in_child(tmp_path, None)
    assert np.isfinite(host).all()
    for name in TUNINGS:
        np.testing.assert_array_equal(logits_in_child(tmp_path, name), host, err_msg=f"tuned for {name}")
