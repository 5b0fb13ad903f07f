"""The arm64 smoke check: bench/arm64/run_emulated.sh with ARM64_SMOKE=1 (see bench/arm64/README.md).

Under qemu-user, as a Cortex-A76 (Raspberry Pi 5: the dot-product kernels must be picked at
start-up) and as a Cortex-A72 (Raspberry Pi 4: the portable kernels): machine_info(), the
Q4_0/Q8_0/K-quant kernel outputs on seeded data against x86's (bit-identical where the kernels are
built to be), and greedy Q4_0 generation on the A76 (token ids equal to x86's). The full run (two
greedy files per CPU and a test subset) is the documented script.

It installs qemu-user-static and adds Debian's arm64 architecture to apt, so it runs only in CI
(CI set) or when asked (HALFBYTE_ARM64_EMULATION=1). A machine that cannot host the emulation
(no apt-get, no root or password-less sudo, no mirror: the script's exit status 77) skips it,
saying why; any failed check fails it.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "arm64" / "run_emulated.sh"
SETUP_FAILED = 77


@pytest.mark.slow
def test_arm64_emulated_smoke() -> None:
    if not (os.environ.get("CI") or os.environ.get("HALFBYTE_ARM64_EMULATION")):
        pytest.skip("changes the system (apt): runs in CI or with HALFBYTE_ARM64_EMULATION=1")
    if platform.machine() != "x86_64" or not sys.platform.startswith("linux"):
        pytest.skip("the emulation script is for x86-64 Linux hosts")
    if shutil.which("qemu-aarch64-static") is None and shutil.which("apt-get") is None:
        pytest.skip("no qemu-aarch64-static and no apt-get to install it")
    env = dict(os.environ, ARM64_SMOKE="1", HOST_PYTHON=sys.executable)
    result = subprocess.run(["bash", str(SCRIPT)], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=2400)
    summary = result.stdout[result.stdout.rfind("=== SUMMARY"):]
    if result.returncode == SETUP_FAILED:
        pytest.skip(f"this machine cannot host the arm64 emulation:\n{summary}")
    assert result.returncode == 0, f"{summary}\n{result.stderr[-2000:]}"
    for part in ("cortex-a76: machine_info + info", "cortex-a76: kernel outputs vs x86",
                 "cortex-a76: greedy q4_0 x86 == arm64", "cortex-a72: machine_info + info",
                 "cortex-a72: kernel outputs vs x86"):
        assert any(line.startswith(part) and " PASS " in line for line in summary.splitlines()), summary
