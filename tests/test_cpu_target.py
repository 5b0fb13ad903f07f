"""Which kernels a CPU gets: the arm64 start-up check (engine/kernels/cpu_target.py) and kernel_isa().

The hwcap values are the ones qemu-user reports for its Cortex-A72 (Raspberry Pi 4) and
Cortex-A76 (Raspberry Pi 5) models; the arm64-only tests run under bench/arm64/run_emulated.sh,
once per emulated CPU.
"""

from __future__ import annotations

import os

import pytest

from engine.kernels import cpu_target, simd

CORTEX_A72_HWCAP = 0x8FB  # fp asimd evtstrm aes pmull sha1 sha2 crc32 cpuid
CORTEX_A76_HWCAP = 0x119FFB  # ... plus atomics fphp asimdhp asimdrdm lrcpc dcpop asimddp


def test_hwcap_bits_name_the_llvm_features() -> None:
    assert cpu_target.features_from_hwcaps(CORTEX_A72_HWCAP, 0) == {"fp-armv8", "neon"}
    assert cpu_target.features_from_hwcaps(CORTEX_A76_HWCAP, 0) == {"fp-armv8", "neon", "fullfp16", "dotprod"}
    assert "i8mm" in cpu_target.features_from_hwcaps(0, 1 << 13)
    assert cpu_target.features_from_hwcaps(0, 0) == set()


def test_dotprod_is_added_only_when_the_hardware_has_it_and_llvm_missed_it() -> None:
    # qemu-user with the x86 host's /proc/cpuinfo: LLVM finds a few negative features only
    assert cpu_target.completed_features("-aes,-rand,-sha2,-sve", {"neon", "dotprod"}) == (
        "-aes,-rand,-sha2,-sve,+dotprod"
    )
    # an explicit "-dotprod" from LLVM is replaced, not contradicted
    assert cpu_target.completed_features("+neon,-dotprod", {"dotprod"}) == "+neon,+dotprod"
    # nothing missing: LLVM already has it, or the hardware lacks it (Cortex-A72)
    assert cpu_target.completed_features("+neon,+dotprod", {"dotprod"}) is None
    assert cpu_target.completed_features("", cpu_target.features_from_hwcaps(CORTEX_A72_HWCAP, 0)) is None
    assert cpu_target.completed_features("", set()) is None


@pytest.mark.parametrize(
    "arm64, features, isa",
    [
        (True, {"neon", "fp-armv8", "dotprod"}, "neon-dotprod"),
        (True, {"neon", "fp-armv8"}, "generic"),
        (True, set(), "generic"),
        (False, {"avx2", "fma", "f16c"}, "avx2"),
        (False, {"avx2", "fma", "f16c", "avxvnni"}, "avx2-vnni"),
        (False, {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512vnni"}, "avx512-vnni"),
        (False, {"avx2", "fma"}, "generic"),  # no F16C
        (False, {"dotprod"}, "generic"),  # an arm64 name means nothing on x86
    ],
)
def test_kernel_isa_follows_the_target_features(arm64: bool, features: set[str], isa: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(simd, "is_arm64", lambda: arm64)
    monkeypatch.setattr(simd, "_target_features", lambda: features)
    assert simd.kernel_isa.__wrapped__() == isa


def test_start_up_check_leaves_x86_and_user_choices_alone() -> None:
    from numba.core import config

    if not cpu_target.is_arm64():
        assert cpu_target.arm64_hwcap_features() == set()
    if os.environ.get("NUMBA_CPU_FEATURES"):
        assert config.CPU_FEATURES == os.environ["NUMBA_CPU_FEATURES"]


@pytest.mark.skipif(not cpu_target.is_arm64(), reason="arm64 only (bench/arm64/run_emulated.sh runs it)")
def test_arm64_kernels_match_what_the_hardware_reports() -> None:
    if os.environ.get("NUMBA_CPU_NAME") or os.environ.get("NUMBA_CPU_FEATURES"):
        pytest.skip("the user chose Numba's target")
    hardware = cpu_target.arm64_hwcap_features()
    assert {"neon", "fp-armv8"} <= hardware  # mandatory on arm64 Linux
    expected = "neon-dotprod" if "dotprod" in hardware else "generic"
    assert simd.kernel_isa() == expected
    # and the features Numba compiles for say the same, or the sdot IR would not compile
    assert ("dotprod" in cpu_target.numba_target_features()) == ("dotprod" in hardware)
