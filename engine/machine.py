"""What machine a benchmark ran on: CPU model, cores, the ISA features the kernels use, versions.

Enough to put a Raspberry Pi's numbers beside a laptop's and know what each measured.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

# Features that decide which kernels run (x86: AVX2/FMA/F16C and AVX-512; arm64: NEON and the
# dot-product extension), as LLVM names them.
KERNEL_FEATURES = ("sse4.2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512vnni", "avxvnni",
                   "neon", "fp-armv8", "dotprod", "i8mm", "fullfp16")


def _read(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def cpu_info() -> str:
    """A human name for the CPU: x86 "model name", else the board (device tree), else the platform."""
    fields: dict[str, str] = {}
    for line in _read("/proc/cpuinfo").splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    for key in ("model name", "Model", "Hardware"):
        if fields.get(key):
            name = fields[key]
            break
    else:
        name = _read("/proc/device-tree/model").strip("\0\n ") or platform.processor() or platform.machine()
    if fields.get("CPU part") and "model name" not in fields:
        name += f" (CPU part {fields['CPU part']})"  # arm64 cores: 0xd03 = Cortex-A53, 0xd0b = A76, ...
    if _is_arm64() and "vendor_id" in fields:
        # qemu-user running an arm64 Python on an x86 host passes the host's /proc/cpuinfo through.
        name = f"arm64 under emulation (host /proc/cpuinfo: {name})"
    return name


def _is_arm64() -> bool:
    return platform.machine().lower() in ("aarch64", "arm64")


def n_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def kernel_features() -> list[str]:
    """The host features (as LLVM reports them) that matter to the kernels."""
    from engine.kernels.simd import _target_features

    have = _target_features()
    if _is_arm64():
        # Mandatory in ARMv8-A (and for arm64 Linux), so on in LLVM's "generic" aarch64 target even
        # when the host detection finds nothing, as under qemu-user (no arm64 /proc/cpuinfo to read).
        have |= {"neon", "fp-armv8"}
    return [f for f in KERNEL_FEATURES if f in have]


def versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for package in ("halfbyte", "numpy", "numba", "llvmlite"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = "unknown"
    return out


def machine_info() -> dict[str, Any]:
    from engine.kernels.matmul import kernel_description

    return {
        "cpu_info": cpu_info(),
        "n_cpus": n_cpus(),
        "machine": platform.machine(),
        "os": f"{platform.system()} {platform.release()}",
        "kernels": kernel_description(),
        "cpu_features": kernel_features(),
        "versions": versions(),
    }
