"""The CPU features Numba compiles the kernels for, and the arm64 start-up check that completes them.

Numba targets what LLVM detects on the host. On arm64 Linux LLVM reads /proc/cpuinfo, which is
right on real boards (a Raspberry Pi 5 is detected as cortex-a76, with the dot-product extension)
but can be missing or foreign: qemu-user before 8.2 passes the x86 host's file through, some
containers mask it. The kernel's auxiliary vector (``getauxval(AT_HWCAP)``) is what the CPU really
offers, so at start-up (before Numba compiles anything) :func:`complete_arm64_target` adds the
dot-product extension to Numba's target when the hardware has it and LLVM missed it. Nothing is
ever removed, and nothing changes on x86 or when the user set ``NUMBA_CPU_NAME`` /
``NUMBA_CPU_FEATURES`` themselves.
"""

from __future__ import annotations

import ctypes
import platform
import sys

# arm64 Linux hwcaps (arch/arm64/include/uapi/asm/hwcap.h), as LLVM names the features.
AT_HWCAP = 16
AT_HWCAP2 = 26
HWCAP_FEATURES = {0: "fp-armv8", 1: "neon", 9: "fullfp16", 20: "dotprod"}  # bit -> LLVM feature
HWCAP2_FEATURES = {13: "i8mm"}
# The features the arm64 kernels use; only these are ever added to Numba's target.
KERNEL_ARM64_FEATURES = ("dotprod",)


def is_arm64() -> bool:
    return platform.machine().lower() in ("aarch64", "arm64")


def _getauxval(kind: int) -> int:
    try:
        libc = ctypes.CDLL(None)
        libc.getauxval.restype = ctypes.c_ulong
        libc.getauxval.argtypes = [ctypes.c_ulong]
        return int(libc.getauxval(kind))
    except (OSError, AttributeError):  # not glibc / not Linux: nothing known
        return 0


def features_from_hwcaps(hwcap: int, hwcap2: int) -> set[str]:
    """LLVM feature names of the bits set in AT_HWCAP / AT_HWCAP2 (arm64 Linux)."""
    have = {name for bit, name in HWCAP_FEATURES.items() if hwcap >> bit & 1}
    return have | {name for bit, name in HWCAP2_FEATURES.items() if hwcap2 >> bit & 1}


def arm64_hwcap_features() -> set[str]:
    """What the kernel says this arm64 CPU has (empty off arm64 Linux)."""
    if not (is_arm64() and sys.platform.startswith("linux")):
        return set()
    return features_from_hwcaps(_getauxval(AT_HWCAP), _getauxval(AT_HWCAP2))


def completed_features(llvm_features: str, hardware: set[str]) -> str | None:
    """LLVM's feature string plus the kernel features the hardware has but LLVM missed, or None
    when nothing is missing. A feature LLVM explicitly disabled ("-dotprod") is turned on only if
    the hardware has it."""
    items = [item for item in llvm_features.split(",") if item]
    enabled = {item[1:] for item in items if item.startswith("+")}
    missing = [f for f in KERNEL_ARM64_FEATURES if f in hardware and f not in enabled]
    if not missing:
        return None
    kept = [item for item in items if item[1:] not in missing]
    return ",".join(kept + [f"+{f}" for f in missing])


def complete_arm64_target() -> None:
    """Add hardware features LLVM's host detection missed to Numba's target (arm64 only).

    Must run before Numba's CPU target context exists: that context builds the LLVM target
    machine once, from ``numba.core.config``. If something in the process compiled with Numba
    before halfbyte was imported, the target is left as it is (kernel_isa() follows it anyway).
    """
    if not is_arm64():
        return
    from numba.core import codegen, config
    from numba.core.registry import cpu_target

    if config.CPU_NAME is not None or config.CPU_FEATURES is not None:
        return  # the user chose the target
    if "_toplevel_target_context" in vars(cpu_target):
        return  # too late: Numba already built its target machine
    features = completed_features(codegen.get_host_cpu_features(), arm64_hwcap_features())
    if features is not None:
        config.CPU_FEATURES = features


def numba_target_features() -> set[str]:
    """CPU features Numba compiles for: NUMBA_CPU_FEATURES (or the completed arm64 set) if set,
    else the host's as LLVM detects them (exactly Numba's own choice)."""
    from numba.core import codegen, config

    features = config.CPU_FEATURES if config.CPU_FEATURES is not None else codegen.get_host_cpu_features()
    return {item[1:] for item in features.split(",") if item.startswith("+")}
