"""The integer K-quant kernels (engine/kernels/kquant_simd.py).

* The Q8_K activation quantizer equals a plain numpy transcription of ggml's
  ``quantize_row_q8_K_ref`` bit for bit (and, checked by hand against libggml's own function,
  ggml itself: see the module doc).
* Every product (Q4_K, Q5_K, Q6_K, IQ4_XS, Q2_K, Q3_K; host ISA and portable IR; matrix-vector and
  batched, one token at a time; kquant_gemm's lane products take batches of 8 and more in the
  engine, tests/test_kquant_gemm.py) equals the dequantized weights (gguf-py) times the dequantized
  activations to float rounding, and the host and portable paths agree bit for bit.
* Extreme codes and scales (every code at its maximum, scales -128, activations +-127) stay exact:
  no 16-bit saturation in the x86 multiply-adds.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize
from llvm_targets import CALLS, instructions_for

from engine.kernels import iquant_simd as iq
from engine.kernels import kquant_simd as ks

T = GGMLQuantizationType
K_TYPES = (T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_XS, T.Q2_K, T.Q3_K)


def q8_k_reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ggml's quantize_row_q8_K_ref, transcribed with numpy (float32 arithmetic throughout)."""
    blocks = x.astype(np.float32).reshape(-1, 256)
    first_max = np.argmax(np.abs(blocks), axis=1)  # the first value of largest magnitude
    vmax = blocks[np.arange(len(blocks)), first_max]
    qs = np.zeros(blocks.shape, np.int8)
    d = np.zeros(len(blocks), np.float32)
    for i, block in enumerate(blocks):
        if vmax[i] == 0:
            continue
        iscale = np.float32(-127.0) / vmax[i]
        qs[i] = np.minimum(127, np.rint(iscale * block)).astype(np.int8)  # rint: ties to even
        d[i] = np.float32(1.0) / iscale
    bsums = qs.reshape(len(blocks), 16, 16).sum(axis=2, dtype=np.int32).astype(np.int16)
    return qs.reshape(-1), d, bsums.reshape(-1)


@pytest.mark.parametrize(
    "make",
    [
        lambda rng: rng.standard_normal(4096).astype(np.float32),
        lambda rng: (rng.standard_normal(1024) * 1e-30).astype(np.float32),  # tiny: huge iscale
        lambda rng: rng.uniform(-1e4, 1e4, 1024).astype(np.float32),
        lambda rng: np.zeros(512, np.float32),  # an all-zero block: d = 0, values 0
        lambda rng: np.tile(np.float32([3.0, -3.0, 1.5, -1.5, 0.5]), 205)[:1024],  # ties, +-max
        lambda rng: (np.arange(768, dtype=np.float32) - 384) / 4,  # exact halves: round to even
    ],
    ids=["normal", "tiny", "large", "zeros", "ties", "halves"],
)
def test_q8_k_activations_match_ggml(make) -> None:
    x = make(np.random.default_rng(3))
    qs, d, bsums = ks.quantize_activations_q8_k(x[None])
    ref_qs, ref_d, ref_bsums = q8_k_reference(x)
    np.testing.assert_array_equal(qs[0], ref_qs)
    np.testing.assert_array_equal(d[0].view(np.uint32), ref_d.view(np.uint32))
    np.testing.assert_array_equal(bsums[0], ref_bsums)
    assert qs.min() >= -127  # the x86 kernels rely on it (as on Q8_0)


def test_q8_k_needs_whole_blocks() -> None:
    with pytest.raises(ValueError, match="multiple of 256"):
        ks.quantize_activations_q8_k(np.zeros((1, 300), np.float32))


def random_k_rows(qtype: GGMLQuantizationType, n_out: int, n_in: int, rng: np.random.Generator,
                  scale: float = 1 / 64) -> np.ndarray:
    """Random K-quant bytes with finite fp16 super-block scales (gguf-py cannot quantize K-quants)."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (n_out, n_in // block_size * type_size), dtype=np.uint8)
    blocks = raw.reshape(n_out, -1, type_size)
    halves = (rng.uniform(-1.0, 1.0, blocks.shape[:2] + (2,)) * scale).astype(np.float16).view(np.uint8)
    where = {T.Q6_K: slice(208, 210), T.Q3_K: slice(108, 110), T.Q2_K: slice(80, 84)}.get(qtype, slice(0, 4))
    blocks[..., where] = halves.reshape(*blocks.shape[:2], 4)[..., : where.stop - where.start]
    return raw


def run_both(qtype: GGMLQuantizationType, raw: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, ...]:
    """(xq, xd, host result, portable result) of any Q8_K-activation type (kquant_simd, iquant_simd);
    each path's matvec driver is checked against its matmul driver on every token (the same
    integers, so the same floats)."""
    xq, xd, xs = ks.activations_for(qtype.name.lower(), x)
    matvec, matmul, matvec_portable, matmul_portable = (ks.DRIVERS | iq.DRIVERS)[qtype.name.lower()]
    outs = []
    for mv, mm in ((matvec, matmul), (matvec_portable, matmul_portable)):
        out = np.full((x.shape[0], raw.shape[0]), np.nan, np.float32)
        mm(raw, xq, xd, xs, out)
        for t in range(x.shape[0]):
            single = np.full((1, raw.shape[0]), np.nan, np.float32)
            mv(raw, xq[t : t + 1], xd[t : t + 1], xs[t : t + 1], single)
            np.testing.assert_array_equal(single[0].view(np.uint32), out[t].view(np.uint32))
        outs.append(out)
    return xq, xd, *outs


@pytest.mark.parametrize("n_tok", [1, 3, 8, 11])  # batches one token at a time (kquant_gemm: 8 and more)
@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda t: t.name)
def test_products_match_dequantized_weights_and_activations(qtype, n_tok) -> None:
    rng = np.random.default_rng(int(qtype) * 10 + n_tok)
    n_out, n_in = 37, 1024  # 37 rows: two whole 16-row chunks and a partial one
    raw = random_k_rows(qtype, n_out, n_in, rng)
    x = rng.standard_normal((n_tok, n_in)).astype(np.float32)
    xq, xd, host, portable = run_both(qtype, raw, x)
    w = dequantize(raw, qtype).astype(np.float64)
    x_used = (xq.reshape(n_tok, -1, 256) * xd[:, :, None].astype(np.float64)).reshape(n_tok, -1)
    reference = x_used @ w.T
    # float32 rounding of one multiply-add per super-block (4 here) on top of exact integers
    bound = 1e-6 * (np.abs(x_used) @ np.abs(w).T) + 1e-30
    assert np.all(np.abs(host - reference) <= bound)
    np.testing.assert_array_equal(host.view(np.uint32), portable.view(np.uint32))


@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda t: t.name)
def test_subnormal_fp16_scales(qtype) -> None:
    """Super-block scales below 2**-14 are fp16 subnormals (llama-quantize writes them for tiny
    weights): exact on every path, like normal ones."""
    rng = np.random.default_rng(int(qtype))
    raw = random_k_rows(qtype, 19, 512, rng, scale=2.0**-16)
    x = rng.standard_normal((3, 512)).astype(np.float32)
    xq, xd, host, portable = run_both(qtype, raw, x)
    w = dequantize(raw, qtype).astype(np.float64)
    x_used = (xq.reshape(3, -1, 256) * xd[:, :, None].astype(np.float64)).reshape(3, -1)
    bound = 1e-6 * (np.abs(x_used) @ np.abs(w).T) + 1e-37
    assert np.all(np.abs(host - x_used @ w.T) <= bound)
    np.testing.assert_array_equal(host.view(np.uint32), portable.view(np.uint32))


def test_fp16_conversion_is_exact_for_every_finite_half() -> None:
    from llvmlite import ir
    from numba import njit, types
    from numba.extending import intrinsic

    from engine.kernels.simd import emit_f16_bits_to_f32

    @intrinsic
    def convert(typingctx, bits):
        def codegen(context, builder, signature, args):
            return emit_f16_bits_to_f32(builder, builder.trunc(args[0], ir.IntType(16)))

        return types.float32(bits), codegen

    @njit
    def convert_all(bits, out):
        for i in range(bits.shape[0]):
            out[i] = convert(bits[i])

    bits = np.arange(1 << 16, dtype=np.int64)
    halves = bits.astype(np.uint16).view(np.float16)
    finite = np.isfinite(halves)
    out = np.empty(bits.shape[0], np.float32)
    convert_all(bits, out)
    np.testing.assert_array_equal(out[finite].view(np.uint32), halves[finite].astype(np.float32).view(np.uint32))


@pytest.mark.parametrize("qtype", K_TYPES[:3], ids=lambda t: t.name)
def test_extreme_codes_and_scales_are_exact(qtype) -> None:
    # every byte 0xFF: Q6_K codes 63 (value 31) with int8 scales -1; Q4_K/Q5_K codes 15/31 with
    # 6-bit scales and mins 63. Then Q6_K scales -128 (0x80). Activations at +-127 (x = +-1).
    n_in = 512
    raw = np.full((3, n_in // 256 * GGML_QUANT_SIZES[qtype][1]), 0xFF, np.uint8)
    blocks = raw.reshape(3, -1, GGML_QUANT_SIZES[qtype][1])
    one = np.frombuffer(np.float16(1.0).tobytes(), np.uint8)
    if qtype == T.Q6_K:
        blocks[..., 208:210] = one
        blocks[1, :, 192:208] = 0x80
    else:
        blocks[..., 0:2] = one
        blocks[..., 2:4] = one
    x = np.ones((2, n_in), np.float32)
    x[1, ::2] = -1.0
    xq, xd, host, portable = run_both(qtype, raw, x)
    assert np.abs(xq).max() == 127
    w = dequantize(raw, qtype).astype(np.float64)
    reference = (xq.astype(np.float64) * np.repeat(xd, 256, axis=1)) @ w.T
    np.testing.assert_allclose(host, reference, rtol=1e-6)
    np.testing.assert_array_equal(host.view(np.uint32), portable.view(np.uint32))


def test_iq4_xs_extremes_are_exact() -> None:
    """Values -127 and 113 (codes 0 and 15) with sub-block scales -32 and 31, activations +-127: the
    sign transfer keeps every pmaddubsw pair below 2**15."""
    n_in = 512
    raw = np.zeros((4, n_in // 256 * 136), np.uint8)
    blocks = raw.reshape(4, -1, 136)
    blocks[..., 0:2] = np.frombuffer(np.float16(1.0).tobytes(), np.uint8)
    blocks[1, :, 2:8] = 0xFF  # scales 63 - 32 = 31
    blocks[2, :, 8:] = 0xFF  # values 113, scales -32
    blocks[3, :, 2:] = 0xFF
    blocks[3, :, 8::3] = 0x0F  # mixed codes
    x = np.ones((2, n_in), np.float32)
    x[1, ::2] = -1.0
    xq, xd, host, portable = run_both(T.IQ4_XS, raw, x)
    assert np.abs(xq).max() == 127
    w = dequantize(raw, T.IQ4_XS).astype(np.float64)
    assert w.min() == -127 * 31 and w.max() == -127 * -32  # the largest |products| there are
    reference = (xq.astype(np.float64) * np.repeat(xd, 256, axis=1)) @ w.T
    np.testing.assert_allclose(host, reference, rtol=1e-6)
    np.testing.assert_array_equal(host.view(np.uint32), portable.view(np.uint32))


@pytest.mark.parametrize("qtype", [T.Q2_K, T.Q3_K], ids=lambda t: t.name)
def test_q2_k_q3_k_extremes_are_exact(qtype) -> None:
    """Every byte 0xFF (Q2_K: codes 3, scales and mins 15; Q3_K: codes 3 + 4, scales 31), then every
    byte 0 (Q3_K: values -4, scales -32), with fp16 scales 1 and activations +-127."""
    n_in, size = 512, GGML_QUANT_SIZES[qtype][1]
    raw = np.full((2, n_in // 256 * size), 0xFF, np.uint8)
    raw[1] = 0
    blocks = raw.reshape(2, -1, size)
    one = np.frombuffer(np.float16(1.0).tobytes(), np.uint8)
    for offset in ((80, 82) if qtype == T.Q2_K else (108,)):
        blocks[..., offset : offset + 2] = one
    x = np.ones((2, n_in), np.float32)
    x[1, ::2] = -1.0
    xq, xd, host, portable = run_both(qtype, raw, x)
    w = dequantize(raw, qtype).astype(np.float64)
    reference = (xq.astype(np.float64) * np.repeat(xd, 256, axis=1)) @ w.T
    np.testing.assert_allclose(host, reference, rtol=1e-6, atol=1e-6 * np.abs(reference).max())
    np.testing.assert_array_equal(host.view(np.uint32), portable.view(np.uint32))


def test_short_operands_bound_the_super_blocks() -> None:
    # activations one super-block shorter than the rows: only the blocks both have are read
    rng = np.random.default_rng(9)
    raw = random_k_rows(T.Q6_K, 4, 768, rng)
    x = rng.standard_normal((1, 512)).astype(np.float32)
    xq, xd, xbsums = ks.quantize_activations_q8_k(x)
    out = np.empty((1, 4), np.float32)
    ks.DRIVERS["q6_k"][1](raw, xq, xd, xbsums, out)
    truncated = np.ascontiguousarray(raw[:, : 2 * 210])
    expected = np.empty((1, 4), np.float32)
    ks.DRIVERS["q6_k"][1](truncated, xq, xd, xbsums, expected)
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize(
    "triple, cpu, features, isa, expect",
    [
        ("aarch64-unknown-linux-gnu", "cortex-a76", "", "neon-dotprod", "sdot"),
        ("aarch64-unknown-linux-gnu", "cortex-a72", "", "generic", "smull"),
        ("x86_64-unknown-linux-gnu", "haswell", "", "avx2", "vpmaddubsw"),
        ("x86_64-unknown-linux-gnu", "x86-64", "", "generic", "pmullw"),  # SSE2 only
    ],
)
@pytest.mark.parametrize("qtype", ["q4_k", "q5_k", "q6_k", "iq4_xs", "q2_k", "q3_k"])
def test_ir_compiles_for_each_target_without_library_calls(qtype, triple, cpu, features, isa, expect) -> None:
    """The arm64 paths only run under emulation (bench/arm64/run_emulated.sh); here every flavour
    is at least compiled for its target, to the instructions it is written for."""
    instructions, asm = instructions_for(ks.standalone_row_dot_ir(qtype, isa), triple, cpu, features)
    assert not [i for i in instructions if i in CALLS], asm
    assert expect in instructions, asm


def test_q4_k_activation_sums_are_scaled_sums_of_32_values() -> None:
    x = np.random.default_rng(4).standard_normal((3, 512)).astype(np.float32)
    qs, d, sums32 = ks.activations_for("q4_k", x)
    expected = qs.reshape(3, -1, 32).sum(axis=2).astype(np.float32) * np.repeat(d, 8, axis=1)
    np.testing.assert_array_equal(sums32, expected)
    assert ks.activations_for("q6_k", x)[2].dtype == np.int16  # Q6_K keeps the int16 sums of 16
