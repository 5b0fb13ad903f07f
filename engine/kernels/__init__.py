"""Numba kernels. Importing the package first fixes the CPU target they compile for (arm64:
hardware features LLVM's detection missed, see cpu_target), before any kernel is compiled."""

from engine.kernels.cpu_target import complete_arm64_target

complete_arm64_target()
