"""The LLVM-IR Q4_0 / Q8_0 kernels (engine/kernels/simd.py) against the plain-Numba reference.

* The activation quantizer is byte-identical to ``gguf.quants.quantize(x, Q8_0)`` (int8 values
  and fp16 scales), including round-half-away ties, subnormal and overflowing fp16 scales.
* Every fast path (host ISA and portable IR; matrix-vector and batched) matches the reference
  within the float-summation bound of ``row_dot_error_bound``; with unit scales, where every
  float operation is exact, they match bit for bit: the integer block dots are identical.
* 1 and 2 threads give bit-identical results.
* The portable IR compiles for aarch64 (NEON) and baseline x86-64 without library calls, the
  arm64 dot-product IR to ``sdot`` (it runs under bench/arm64/run_emulated.sh, where the
  host-path tests here check it).
* Compiled kernels are loaded from Numba's on-disk cache by a second process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numba
import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import quantize
from llvm_targets import CALLS, instructions_for

from engine.kernels import simd

REPO = Path(__file__).resolve().parents[1]
N_INS = (32, 64, 4096, 11008)

# (matvec, matmul) drivers per quant type and path
DRIVERS = {
    ("q4_0", "host"): (simd.matvec_q4_0, simd.matmul_q4_0),
    ("q4_0", "generic"): (simd.matvec_q4_0_generic, simd.matmul_q4_0_generic),
    ("q8_0", "host"): (simd.matvec_q8_0, simd.matmul_q8_0),
    ("q8_0", "generic"): (simd.matvec_q8_0_generic, simd.matmul_q8_0_generic),
}
PATHS = ("host", "generic")


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------


def fp16_bytes(values: np.ndarray) -> np.ndarray:
    return np.asarray(values, np.float16).reshape(-1, 1).view(np.uint8)


def make_weights(qtype: str, kind: str, n_out: int, n_in: int, rng: np.random.Generator) -> np.ndarray:
    """uint8[n_out, row_bytes] ggml rows: realistic (from gguf's quantizer) or hostile."""
    if kind == "gguf":
        dense = rng.standard_normal((n_out, n_in)).astype(np.float32)
        gtype = GGMLQuantizationType.Q4_0 if qtype == "q4_0" else GGMLQuantizationType.Q8_0
        return np.ascontiguousarray(quantize(dense, gtype))
    block_bytes = simd.Q4_0_BLOCK_BYTES if qtype == "q4_0" else simd.Q8_0_BLOCK_BYTES
    n_blocks = n_out * n_in // 32
    payload = {
        "random": lambda: rng.integers(0, 256, (n_blocks, block_bytes - 2)),
        "all_high": lambda: np.full((n_blocks, block_bytes - 2), 0xFF if qtype == "q4_0" else 0x7F),  # 15 / +127
        "all_low": lambda: np.full((n_blocks, block_bytes - 2), 0x00 if qtype == "q4_0" else 0x80),  # 0 / -128
    }[kind]().astype(np.uint8)
    scales = rng.uniform(0.25, 2.0, n_blocks) * rng.choice([-1.0, 1.0], n_blocks)
    blocks = np.concatenate([fp16_bytes(scales), payload], axis=1)
    return blocks.reshape(n_out, n_in // 32 * block_bytes)


def make_activations(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "normal":
        return rng.standard_normal(n).astype(np.float32)
    if kind == "zeros":
        return np.zeros(n, np.float32)
    if kind == "max":  # every value quantizes to +-127
        return (rng.choice([-1.0, 1.0], n) * 1000.0).astype(np.float32)
    if kind == "max_positive":
        return np.full(n, 1000.0, np.float32)
    raise ValueError(kind)


def exact_row_dots(qtype: str, w_raw: np.ndarray, xq: np.ndarray) -> np.ndarray:
    """int64[n_out] sum over the row of (weight integer) * (activation integer), in numpy."""
    n_out = w_raw.shape[0]
    if qtype == "q4_0":
        blocks = w_raw.reshape(n_out, -1, 18)[:, :, 2:].astype(np.int64)
        weights = np.concatenate([blocks & 0x0F, blocks >> 4], axis=2) - 8
    else:
        weights = w_raw.reshape(n_out, -1, 34)[:, :, 2:].view(np.int8).astype(np.int64)
    return (weights.reshape(n_out, -1) * xq.astype(np.int64)).sum(axis=1)


def reference(qtype: str, w_raw, xq, xscales) -> np.ndarray:
    out = np.empty(w_raw.shape[0], np.float32)
    (simd.matvec_q4_0_ref if qtype == "q4_0" else simd.matvec_q8_0_ref)(w_raw, xq, xscales, out)
    return out


def run_matvec(qtype: str, path: str, w_raw, xq, xscales, xsums) -> np.ndarray:
    out = np.full(w_raw.shape[0], np.nan, np.float32)
    matvec = DRIVERS[qtype, path][0]
    if qtype == "q4_0":
        matvec(w_raw, xq, xscales, xsums, out)
    else:
        matvec(w_raw, xq, xscales, out)
    return out


def run_matmul(qtype: str, path: str, w_raw, xq, xscales, xsums) -> np.ndarray:
    out = np.full((xq.shape[0], w_raw.shape[0]), np.nan, np.float32)
    matmul = DRIVERS[qtype, path][1]
    if qtype == "q4_0":
        matmul(w_raw, xq, xscales, xsums, out)
    else:
        matmul(w_raw, xq, xscales, out)
    return out


def assert_within_bound(qtype: str, fast: np.ndarray, ref: np.ndarray, w_raw, xq, xscales) -> None:
    for row in range(w_raw.shape[0]):
        bound = simd.row_dot_error_bound(qtype, w_raw[row], xq, xscales)
        diff = abs(float(fast[row]) - float(ref[row]))
        assert diff <= bound, f"row {row}: |{fast[row]} - {ref[row]}| = {diff} > bound {bound}"


# ---------------------------------------------------------------------------------------------
# activation quantizer
# ---------------------------------------------------------------------------------------------


def quantizer_cases() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    ties = np.tile(np.float32([127.0, 0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 126.5] * 4), 2)  # d = 1: exact .5
    return {
        "normal": rng.standard_normal(4096).astype(np.float32),
        "wide": (rng.standard_normal(11008) * np.exp(rng.uniform(-8, 8, 11008))).astype(np.float32),
        "uniform": rng.uniform(-1, 1, 64).astype(np.float32),
        "zeros": np.zeros(64, np.float32),
        "zero_block_then_normal": np.concatenate([np.zeros(32), rng.standard_normal(32)]).astype(np.float32),
        "ties": ties,
        "fp16_subnormal_scale": (rng.standard_normal(256) * 1e-4).astype(np.float32),
        "fp16_underflow_scale": (rng.standard_normal(256) * 1e-9).astype(np.float32),
        "fp16_overflow_scale": (rng.standard_normal(64) * 1e8).astype(np.float32),
        "single_spike": np.eye(1, 32, 7, dtype=np.float32).ravel() * -3.0,
    }


@pytest.mark.parametrize("case", sorted(quantizer_cases()))
def test_quantizer_matches_gguf_byte_for_byte(case: str) -> None:
    x = quantizer_cases()[case]
    with np.errstate(over="ignore"):
        expected = quantize(x, GGMLQuantizationType.Q8_0).reshape(-1, 34)
    qs, scales, sums = simd.quantize_activations_q8_0(x)
    assert qs.dtype == np.int8 and scales.dtype == np.float32 and sums.dtype == np.int32
    np.testing.assert_array_equal(qs, expected[:, 2:].view(np.int8).ravel())
    with np.errstate(over="ignore"):
        # the float32 scale is exactly the fp16 value: converting back is lossless, same bits
        np.testing.assert_array_equal(
            scales.astype(np.float16).view(np.uint16), expected[:, :2].copy().view(np.uint16).ravel()
        )
    np.testing.assert_array_equal(scales.astype(np.float16).astype(np.float32), scales)
    np.testing.assert_array_equal(sums, qs.reshape(-1, 32).astype(np.int64).sum(axis=1))
    assert qs.min() >= -127  # never -128: the Q8_0 sign trick relies on it


def test_quantizer_batch_equals_rows() -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((5, 128)).astype(np.float32)
    x[3] = 0.0
    qs, scales, sums = simd.quantize_activations_q8_0_batch(x)
    for t in range(5):
        row = simd.quantize_activations_q8_0(x[t])
        np.testing.assert_array_equal(qs[t], row[0])
        np.testing.assert_array_equal(scales[t], row[1])
        np.testing.assert_array_equal(sums[t], row[2])


def test_quantizer_rejects_ragged_length() -> None:
    with pytest.raises(ValueError):
        simd.quantize_activations_q8_0(np.ones(33, np.float32))


# ---------------------------------------------------------------------------------------------
# integer parts: reference block dots and bit-exactness of the fast paths
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", ["q4_0", "q8_0"])
def test_reference_block_dots_are_exact(qtype: str) -> None:
    rng = np.random.default_rng(3)
    w_raw = make_weights(qtype, "random", 3, 256, rng)
    xq = rng.integers(-127, 128, 256).astype(np.int8)
    block_dots = simd.q4_0_block_dots_ref if qtype == "q4_0" else simd.q8_0_block_dots_ref
    for row in range(3):
        np.testing.assert_array_equal(
            block_dots(w_raw[row], xq).sum(), exact_row_dots(qtype, w_raw[row : row + 1], xq)[0]
        )


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("qtype", ["q4_0", "q8_0"])
@pytest.mark.parametrize("kind", ["random", "all_high", "all_low"])
def test_unit_scales_are_bit_exact(qtype: str, path: str, kind: str) -> None:
    """With weight and activation scales 1.0 every float step is an exact integer operation, so any
    difference would be an integer-part error. Exactness holds when every partial sum stays below
    2**24 whatever the split into lanes: the sum of |lane| over a block is at most
    sum_j 15|x_j| + 8|sum_j x_j| <= 23 sum_j |x_j| for Q4_0 and 128 sum_j |x_j| for Q8_0, so the
    activation magnitude is capped at (2**24 - 1) // (C * n_in)."""
    rng = np.random.default_rng(4)
    for n_in in N_INS:
        n_out = 5 if n_in > 64 else 33
        w_raw = make_weights(qtype, kind, n_out, n_in, rng)
        block_bytes = simd.Q4_0_BLOCK_BYTES if qtype == "q4_0" else simd.Q8_0_BLOCK_BYTES
        w_raw.reshape(n_out, -1, block_bytes)[:, :, :2] = fp16_bytes([1.0])[0]
        limit = min(127, (2**24 - 1) // ((23 if qtype == "q4_0" else 128) * n_in))
        xq = rng.integers(-limit, limit + 1, (4, n_in)).astype(np.int8)
        xq[1] = limit  # max-magnitude activations
        xq[2] = 0
        xscales = np.ones((4, n_in // 32), np.float32)
        xsums = xq.reshape(4, -1, 32).astype(np.int32).sum(axis=2).astype(np.int32)
        for t in range(4):
            exact = exact_row_dots(qtype, w_raw, xq[t])
            np.testing.assert_array_equal(reference(qtype, w_raw, xq[t], xscales[t]), exact.astype(np.float32))
            fast = run_matvec(qtype, path, w_raw, xq[t], xscales[t], xsums[t])
            np.testing.assert_array_equal(fast, exact.astype(np.float32), err_msg=f"n_in={n_in} token={t}")
        batched = run_matmul(qtype, path, w_raw, xq, xscales, xsums)
        np.testing.assert_array_equal(batched, np.stack([exact_row_dots(qtype, w_raw, xq[t]) for t in range(4)]))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("qtype", ["q4_0", "q8_0"])
def test_every_finite_fp16_weight_scale_is_decoded_exactly(qtype: str, path: str) -> None:
    """One single-block row per finite fp16 bit pattern (subnormals, -0 included), block dot 1 and
    activation scale 1: each output must be exactly the scale (F16C on AVX2, integer bit
    manipulation in the portable IR)."""
    bits = np.arange(0x10000, dtype=np.uint32)
    bits = bits[(bits >> 10) & 0x1F != 0x1F].astype(np.uint16)  # exponent 31 is inf / nan
    if qtype == "q4_0":
        payload = np.full((len(bits), 16), 0x88, np.uint8)  # all weights 0 (nibble 8) ...
        payload[:, 0] = 0x89  # ... but element 0 = +1
    else:
        payload = np.zeros((len(bits), 32), np.uint8)
        payload[:, 0] = 1
    w_raw = np.ascontiguousarray(np.concatenate([bits.reshape(-1, 1).view(np.uint8), payload], axis=1))
    xq = np.zeros(32, np.int8)
    xq[0] = 1
    out = run_matvec(qtype, path, w_raw, xq, np.ones(1, np.float32), np.ones(1, np.int32))
    expected = bits.view(np.float16).astype(np.float32)
    assert np.array_equal(out, expected)  # value equality: -0 comes out as +0 (accumulators start at +0)
    assert np.array_equal(out[expected != 0].view(np.uint32), expected[expected != 0].view(np.uint32))


# ---------------------------------------------------------------------------------------------
# float results within the summation-order bound
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_in", N_INS)
@pytest.mark.parametrize("qtype", ["q4_0", "q8_0"])
def test_matvec_matches_reference(qtype: str, n_in: int) -> None:
    rng = np.random.default_rng(n_in)
    n_out = 7 if n_in > 64 else 33
    for w_kind in ("gguf", "random", "all_high", "all_low"):
        w_raw = make_weights(qtype, w_kind, n_out, n_in, rng)
        for x_kind in ("normal", "zeros", "max", "max_positive"):
            xq, xscales, xsums = simd.quantize_activations_q8_0(make_activations(x_kind, n_in, rng))
            ref = reference(qtype, w_raw, xq, xscales)
            if x_kind == "zeros":
                np.testing.assert_array_equal(ref, 0.0)
            for path in PATHS:
                fast = run_matvec(qtype, path, w_raw, xq, xscales, xsums)
                assert np.all(np.isfinite(fast)), (w_kind, x_kind, path)
                assert_within_bound(qtype, fast, ref, w_raw, xq, xscales)


@pytest.mark.parametrize("qtype", ["q4_0", "q8_0"])
def test_row_dot_intrinsics_match_drivers(qtype: str) -> None:
    """The public single-row intrinsics, called from user njit code, are the matvec rows."""
    rng = np.random.default_rng(5)
    w_raw = make_weights(qtype, "gguf", 3, 4096, rng)
    xq, xscales, xsums = simd.quantize_activations_q8_0(make_activations("normal", 4096, rng))
    if qtype == "q4_0":

        @numba.njit
        def rows(w, xq, xs, xsum):
            return [
                (simd.q4_0_row_dot(w[r], xq, xs, xsum), simd.q4_0_row_dot_generic(w[r], xq, xs, xsum)) for r in range(3)
            ]

        got = rows(w_raw, xq, xscales, xsums)
    else:

        @numba.njit
        def rows(w, xq, xs):
            return [(simd.q8_0_row_dot(w[r], xq, xs), simd.q8_0_row_dot_generic(w[r], xq, xs)) for r in range(3)]

        got = rows(w_raw, xq, xscales)
    np.testing.assert_array_equal(np.float32([g[0] for g in got]), run_matvec(qtype, "host", w_raw, xq, xscales, xsums))
    np.testing.assert_array_equal(
        np.float32([g[1] for g in got]), run_matvec(qtype, "generic", w_raw, xq, xscales, xsums)
    )


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("qtype", ["q4_0", "q8_0"])
def test_matmul_matches_reference(qtype: str, path: str) -> None:
    """Batched drivers: 4-token tiles plus a remainder, each token within the bound of the reference."""
    rng = np.random.default_rng(6)
    for n_in, n_out, n_tok in ((32, 9, 1), (64, 33, 7), (4096, 5, 9), (11008, 3, 4)):
        w_raw = make_weights(qtype, "gguf", n_out, n_in, rng)
        x = rng.standard_normal((n_tok, n_in)).astype(np.float32)
        x[n_tok // 2] = 0.0
        xq, xscales, xsums = simd.quantize_activations_q8_0_batch(x)
        out = run_matmul(qtype, path, w_raw, xq, xscales, xsums)
        for t in range(n_tok):
            assert_within_bound(qtype, out[t], reference(qtype, w_raw, xq[t], xscales[t]), w_raw, xq[t], xscales[t])


@pytest.mark.parametrize("qtype", ["q4_0", "q8_0"])
def test_one_and_two_threads_are_bit_identical(qtype: str) -> None:
    rng = np.random.default_rng(7)
    w_raw = make_weights(qtype, "gguf", 101, 4096, rng)
    xq, xscales, xsums = simd.quantize_activations_q8_0_batch(rng.standard_normal((6, 4096)).astype(np.float32))
    results = {}
    before = numba.get_num_threads()
    try:
        for threads in (1, min(2, numba.config.NUMBA_NUM_THREADS)):
            numba.set_num_threads(threads)
            results[threads] = [run_matvec(qtype, p, w_raw, xq[0], xscales[0], xsums[0]) for p in PATHS] + [
                run_matmul(qtype, p, w_raw, xq, xscales, xsums) for p in PATHS
            ]
    finally:
        numba.set_num_threads(before)
    for one, two in zip(*results.values()):
        np.testing.assert_array_equal(one, two)


@pytest.mark.parametrize("qtype", ["q4_0", "q8_0"])
def test_drivers_reject_mismatched_shapes(qtype: str) -> None:
    rng = np.random.default_rng(8)
    w_raw = make_weights(qtype, "random", 4, 64, rng)
    xq, xscales, xsums = simd.quantize_activations_q8_0(np.ones(96, np.float32))  # 3 blocks vs 2
    with pytest.raises(ValueError):
        run_matvec(qtype, "host", w_raw, xq, xscales, xsums)


# ---------------------------------------------------------------------------------------------
# ISA selection and portability of the generic IR
# ---------------------------------------------------------------------------------------------


def test_kernel_isa_follows_target_features() -> None:
    # the choice for other feature sets is tested in tests/test_cpu_target.py
    host = simd._target_features()
    expected = "generic"
    if simd.is_arm64():
        expected = "neon-dotprod" if "dotprod" in host else "generic"
    elif {"avx2", "fma", "f16c"} <= host:
        expected = "avx2-vnni" if "avxvnni" in host or {"avx512vnni", "avx512vl"} <= host else "avx2"
        if {"avx512f", "avx512bw", "avx512vl", "avx512vnni"} <= host:
            expected = "avx512-vnni"
    assert simd.kernel_isa() == expected


def test_host_ir_uses_avx2_and_generic_ir_is_target_independent() -> None:
    for qtype in ("q4_0", "q8_0"):
        generic = simd.standalone_row_dot_ir(qtype, "generic")
        assert "llvm.x86" not in generic
        avx2 = simd.standalone_row_dot_ir(qtype, "avx2")
        assert "llvm.x86.avx2.pmadd.ub.sw" in avx2 and "llvm.x86.avx2.pmadd.wd" in avx2
        vnni = simd.standalone_row_dot_ir(qtype, "avx2-vnni")
        assert "llvm.x86.avx512.vpdpbusd.256" in vnni and "pmadd" not in vnni


# The kernels of the x86 ISA this host does not pick (plain AVX2 on a VNNI machine, or the
# reverse), compiled in a child process for a CPU with those features and checked there: every
# path is tested on whatever machine runs the suite, where the CPU can run it.
OTHER_ISA_SCRIPT = textwrap.dedent(
    """
    import numpy as np
    from engine.kernels import simd
    assert simd.kernel_isa() == "{isa}", simd.kernel_isa()
    rng = np.random.default_rng(5)
    for qtype in ("q4_0", "q8_0"):
        for n_in, n_out, n_tok in ((64, 19, 1), (4096, 16, 9), (96, 8, 5)):
            block = 18 if qtype == "q4_0" else 34
            w = rng.integers(0, 256, (n_out, n_in // 32 * block), dtype=np.uint8)
            w.reshape(n_out, -1, block)[..., :2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
            xq, xs, xsum = simd.quantize_activations_q8_0_batch(rng.standard_normal((n_tok, n_in)).astype(np.float32))
            drivers = {{"q4_0": (simd.matmul_q4_0, simd.matmul_q4_0_x8, simd.matmul_q4_0_generic),
                       "q8_0": (simd.matmul_q8_0, simd.matmul_q8_0_x8, simd.matmul_q8_0_generic)}}[qtype]
            outs = []
            for fn in drivers:
                out = np.empty((n_tok, n_out), np.float32)
                if qtype == "q8_0" and fn is not simd.matmul_q8_0_x8:
                    fn(w, xq, xs, out)
                else:
                    fn(w, xq, xs, xsum, out)
                outs.append(out)
            for out in outs[:2]:
                np.testing.assert_allclose(out, outs[2], rtol=2e-6, atol=2e-6 * np.abs(outs[2]).max())
    # K-quants: this ISA's (unpaired on AVX2) tiles give the portable IR's bits
    from engine.kernels import kquant_gemm, kquant_simd
    for qtype, size in (("q4_k", 144), ("q5_k", 176), ("q6_k", 210)):
        w = rng.integers(0, 256, (19, 2 * size), dtype=np.uint8)
        where = slice(208, 210) if qtype == "q6_k" else slice(0, 4)
        halves = np.frombuffer(np.float16(0.01).tobytes() * 2, np.uint8)
        w.reshape(19, 2, size)[..., where] = halves[: where.stop - where.start]
        act = kquant_simd.activations_for(qtype, rng.standard_normal((11, 512)).astype(np.float32))
        outs = [np.empty((11, 19), np.float32) for _ in range(2)]
        kquant_simd.DRIVERS[qtype][1](w, *act, outs[0])
        kquant_simd.DRIVERS[qtype][3](w, *act, outs[1])
        np.testing.assert_array_equal(outs[0], outs[1])
    # the prompt products with tokens in the lanes, random rows and the largest codes (IQ4_XS 241, Q8_0 255)
    scale = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    for qtype in kquant_gemm.TYPES + ("iq4_xs_max", "q8_0_max"):
        name = qtype.removesuffix("_max")
        size = kquant_gemm.BLOCK_BYTES[name]
        w = rng.integers(0, 256, (19, 2 * size), dtype=np.uint8)
        if qtype.endswith("_max"):
            w[:] = 0x7F if name == "q8_0" else 0xFF
        if name in kquant_gemm.BLOCK32_TYPES:  # 8 blocks of 32 per 256 values, each its fp16 d first
            w.reshape(19, 16, size // 8)[..., 0:2] = scale
        for offset in kquant_simd.FP16_OFFSETS.get(name, ()):  # finite fp16 scales
            if offset is not None:
                w.reshape(19, 2, size)[..., offset : offset + 2] = scale
        x = rng.standard_normal((100, 512)).astype(np.float32)
        if qtype.endswith("_max"):
            x[:] = 1.0
        lanes = kquant_gemm.activations_for_lanes(name, x)
        outs = [np.empty((100, 19), np.float32) for _ in range(2)]
        for driver, out in zip(kquant_gemm.DRIVERS[name], outs):
            driver(w, *lanes, 100, out)
        np.testing.assert_array_equal(outs[0], outs[1])
    print("ok")
    """
)


# What to take away from the host's features to make Numba compile (and kernel_isa() pick) each
# lesser x86 ISA. "avx2-no-gfni" is an AVX2 CPU before GFNI (Zen 3, Haswell): its 4-bit unpacking
# differs from a GFNI host's.
LESSER_ISA_DROP = {"avx2": ("avxvnni", "avx512vnni"), "avx2-no-gfni": ("avxvnni", "avx512vnni", "gfni"),
                   "avx2-vnni": ("avx512vnni",)}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(LESSER_ISA_DROP))
def test_lesser_x86_isas_match_the_portable_kernels(case: str, tmp_path: Path) -> None:
    host = simd._target_features()
    isa = case.removesuffix("-no-gfni")
    if case != isa and "gfni" not in host:
        pytest.skip("this CPU has no GFNI: the avx2 case is already without it")
    if not simd.has_x8_kernels() or case == simd.kernel_isa():
        pytest.skip(f"{isa} is this host's own ISA (tested directly) or the host is not x86 AVX2")
    drop = LESSER_ISA_DROP[case]
    if isa == "avx2-vnni" and "avxvnni" not in host:
        pytest.skip("AVX-VNNI without AVX512-VNNI: this CPU cannot run that combination")
    if isa == "avx2-vnni" and simd.kernel_isa() == "avx2":
        pytest.skip("this CPU has no VNNI")
    # Numba compiles for NUMBA_CPU_FEATURES (and kernel_isa() follows it)
    features = ",".join(f"+{f}" for f in sorted(host) if f not in drop)
    env = dict(os.environ, NUMBA_CPU_FEATURES=features, NUMBA_CACHE_DIR=str(tmp_path / "cache"), PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-c", OTHER_ISA_SCRIPT.format(isa=isa)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


@pytest.mark.parametrize(
    "triple, cpu, features, isa",
    [
        ("aarch64-unknown-linux-gnu", "generic", "+neon", "generic"),
        ("aarch64-unknown-linux-gnu", "apple-m1", "", "generic"),
        ("x86_64-unknown-linux-gnu", "x86-64", "", "generic"),  # SSE2 only: no F16C, no FMA
        # the arm64 dot-product kernels: the Raspberry Pi 5's core, and what the start-up check
        # makes of a CPU that LLVM could not name (qemu-user)
        ("aarch64-unknown-linux-gnu", "cortex-a76", "", "neon-dotprod"),
        ("aarch64-unknown-linux-gnu", "generic", "+neon,+dotprod", "neon-dotprod"),
    ],
)
def test_ir_lowers_without_library_calls(triple: str, cpu: str, features: str, isa: str) -> None:
    for qtype in ("q4_0", "q8_0"):
        instructions, asm = instructions_for(simd.standalone_row_dot_ir(qtype, isa), triple, cpu, features)
        assert not [i for i in instructions if i in CALLS], asm
        if isa == "neon-dotprod":
            # 2 sdot per block and token (x the 2-block unroll), no widening multiplies left
            assert instructions.count("sdot") >= 4 and "smull" not in instructions, asm
            assert "fmla" in instructions
        elif triple.startswith("aarch64"):
            assert "smull" in instructions or "smlal" in instructions  # NEON widening multiplies
            assert "fmla" in instructions


@pytest.mark.parametrize("gfni, cpu, isa, unpack", [(True, "znver4", "avx512-vnni", "vgf2p8affineqb"),
                                                     (True, "icelake-server", "avx512-vnni", "vgf2p8affineqb"),
                                                     (False, "haswell", "avx2", "vpsrlvq")])
def test_x86_4bit_unpacking_is_one_instruction_per_block(gfni: bool, cpu: str, isa: str, unpack: str) -> None:
    """Q4_0's nibbles: one broadcast load of the 16 bytes, then one GFNI affine (or one variable
    shift and a mask): no per-half shift/mask/insert sequence."""
    instructions, asm = instructions_for(simd.standalone_row_dot_ir("q4_0", isa, gfni=gfni),
                                         "x86_64-unknown-linux-gnu", cpu)
    assert not [i for i in instructions if i in CALLS], asm
    blocks = instructions.count("vpdpbusd" if "vnni" in isa else "vpmaddubsw")
    assert blocks >= 2 and instructions.count(unpack) == blocks, asm
    assert "vinserti128" not in instructions, asm


# ---------------------------------------------------------------------------------------------
# on-disk cache across processes
# ---------------------------------------------------------------------------------------------

CACHE_SCRIPT = textwrap.dedent(
    """
    import time
    t0 = time.perf_counter()
    import numpy as np
    from engine.kernels import simd
    w = np.zeros((3, 36), np.uint8)
    xq, xs, xsum = simd.quantize_activations_q8_0(np.ones(64, np.float32))
    out = np.empty(3, np.float32)
    simd.matvec_q4_0(w, xq, xs, xsum, out)
    hits = sum(simd.matvec_q4_0.stats.cache_hits.values())
    misses = sum(simd.matvec_q4_0.stats.cache_misses.values())
    print(hits, misses, time.perf_counter() - t0)
    """
)


@pytest.mark.slow
def test_compiled_kernels_load_from_cache_in_a_new_process(tmp_path: Path) -> None:
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba-cache"), PYTHONPATH=str(REPO))
    runs = []
    for _ in range(2):
        result = subprocess.run(
            [sys.executable, "-c", CACHE_SCRIPT], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, result.stderr
        hits, misses, seconds = result.stdout.split()
        runs.append((int(hits), int(misses), float(seconds)))
    (cold_hits, cold_misses, cold_s), (warm_hits, warm_misses, warm_s) = runs
    assert cold_hits == 0 and cold_misses == 1
    assert warm_hits == 1 and warm_misses == 0, "second process recompiled instead of loading the cache"
    assert warm_s < cold_s


# ---------------------------------------------------------------------------------------------
# 8-row interleaved prompt-processing kernel (AVX2)
# ---------------------------------------------------------------------------------------------

needs_avx2 = pytest.mark.skipif(not simd.has_x8_kernels(), reason="the x8 kernel is AVX2 code")


def test_repack_layout() -> None:
    rng = np.random.default_rng(12)
    w_raw = make_weights("q4_0", "random", 11, 96, rng)
    packed = np.empty(3 * 256, np.uint8)
    scales = np.empty(3 * 8, np.float32)
    simd.repack_q4_0_x8(w_raw, 2, packed, scales)
    blocks = w_raw.reshape(11, 3, 18)
    nibbles = np.concatenate([blocks[..., 2:] & 0x0F, blocks[..., 2:] >> 4], axis=-1)  # (row, block, 32)
    for r in range(8):
        for b in range(3):
            assert scales[b * 8 + r] == blocks[2 + r, b, :2].copy().view(np.float16)[0].astype(np.float32)
            for e in range(32):
                assert packed[b * 256 + (e // 4) * 32 + r * 4 + e % 4] == nibbles[2 + r, b, e]


@needs_avx2
def test_x8_matmul_matches_reference() -> None:
    rng = np.random.default_rng(13)
    for n_in, n_out, n_tok in ((32, 8, 1), (64, 37, 7), (4096, 16, 9), (11008, 13, 4), (256, 3, 5)):
        w_raw = make_weights("q4_0", "gguf", n_out, n_in, rng)
        x = rng.standard_normal((n_tok, n_in)).astype(np.float32)
        x[n_tok // 2] = 0.0
        xq, xscales, xsums = simd.quantize_activations_q8_0_batch(x)
        out = np.full((n_tok, n_out), np.nan, np.float32)
        simd.matmul_q4_0_x8(w_raw, xq, xscales, xsums, out)
        for t in range(n_tok):
            assert_within_bound("q4_0", out[t], reference("q4_0", w_raw, xq[t], xscales[t]), w_raw, xq[t],
                                xscales[t])


@needs_avx2
def test_x8_extreme_blocks_stay_exact_in_16_bits() -> None:
    """All nibbles 15 against activations of +-127: the largest 16-bit partial sums the kernel forms."""
    n_in, n_out = 64, 8
    w_raw = np.zeros((n_out, n_in // 32 * 18), np.uint8)
    blocks = w_raw.reshape(n_out, -1, 18)
    blocks[..., :2] = fp16_bytes(np.ones(1))[0]
    blocks[..., 2:] = 0xFF
    for sign in (1, -1):
        x = np.full((1, n_in), sign * 127.0, np.float32)
        xq, xscales, xsums = simd.quantize_activations_q8_0_batch(x)
        out = np.empty((1, n_out), np.float32)
        simd.matmul_q4_0_x8(w_raw, xq, xscales, xsums, out)
        expected = (15 - 8) * 127 * sign * n_in * float(xscales[0, 0])
        np.testing.assert_array_equal(out[0], np.float32(expected))


@needs_avx2
def test_x8_q8_0_matmul_matches_reference_including_minus_128() -> None:
    rng = np.random.default_rng(14)
    for n_in, n_out, n_tok in ((32, 8, 1), (64, 37, 7), (4096, 16, 9)):
        w_raw = make_weights("q8_0", "gguf", n_out, n_in, rng)
        w_raw.reshape(n_out, -1, 34)[0, 0, 2:6] = 0x80  # -128: |w| = 128 as unsigned, still exact
        x = rng.standard_normal((n_tok, n_in)).astype(np.float32)
        xq, xscales, xsums = simd.quantize_activations_q8_0_batch(x)
        out = np.full((n_tok, n_out), np.nan, np.float32)
        simd.matmul_q8_0_x8(w_raw, xq, xscales, xsums, out)
        for t in range(n_tok):
            assert_within_bound("q8_0", out[t], reference("q8_0", w_raw, xq[t], xscales[t]), w_raw, xq[t],
                                xscales[t])
