"""The prompt products with the tokens in the vector lanes (engine/kernels/kquant_gemm.py).

* Every product (Q4_K, Q5_K, Q6_K, IQ4_XS, Q3_K, Q2_K; 12 to 100 tokens, so the 4- and 1-row tiles of
  2 and 1 token vectors and a padded last vector; a partial 16-row chunk) equals the dequantized
  weights (gguf-py) times the dequantized activations to float rounding, and the host and portable
  paths agree bit for bit (the lesser x86 ISAs are checked in test_simd.py's child processes, arm64
  under qemu by bench/arm64).
* Extreme codes and scales stay exact (no 16-bit saturation on AVX2's pmaddubsw, IQ4_XS's codes up
  to 241 included).
* The public ``matmul`` takes these products from 8 tokens on (Q8_0, Q4_0, IQ4_NL: on VNNI hosts), and
  they agree with the kquant_simd tiles to float rounding.
* Q8_0, Q4_0 and IQ4_NL (8 blocks of 32 as one super-block, Q8_0 activations) likewise, Q8_0's
  value 127 (code 255) and IQ4_NL's 113 included; and the grid and ternary types (IQ1/IQ2/IQ3, TQ).
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize
from llvm_targets import CALLS, instructions_for
from test_iquant_simd import random_rows as random_iq_rows
from test_kquant_simd import random_k_rows

from engine.kernels import kquant_gemm as kg
from engine.kernels import kquant_simd as ks
from engine.kernels import matmul as mm
from engine.kernels import simd

T = GGMLQuantizationType
TYPES = (T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_XS, T.Q3_K, T.Q2_K)


def run_lanes(qtype: GGMLQuantizationType, raw: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(host result, portable result) of the lane products."""
    name = qtype.name.lower()
    acts = kg.activations_for_lanes(name, x)
    outs = []
    for driver in kg.DRIVERS[name]:
        out = np.full((x.shape[0], raw.shape[0]), np.nan, np.float32)
        driver(raw, *acts, x.shape[0], out)
        outs.append(out)
    return outs[0], outs[1]


def used_activations(qtype: GGMLQuantizationType, x: np.ndarray) -> np.ndarray:
    """The activations the integer products see: Q8_K values times their scales, float64."""
    xq, xd, _ = ks.quantize_activations_q8_k(x)
    return (xq.reshape(x.shape[0], -1, 256) * xd[:, :, None].astype(np.float64)).reshape(x.shape[0], -1)


def assert_lanes_match(qtype: GGMLQuantizationType, raw: np.ndarray, x: np.ndarray, x_used: np.ndarray) -> None:
    """Host and portable lane products bit for bit equal, and within float rounding of the dequantized
    weights (gguf-py) times ``x_used``: float32 roundings of the sub-block sums, scales and mins per
    super-block on top of exact integers, at most ~40 of 2**-24 of the magnitudes."""
    host, portable = run_lanes(qtype, raw, x)
    w = dequantize(raw, qtype).astype(np.float64)
    bound = 3e-6 * (np.abs(x_used) @ np.abs(w).T) + 1e-30
    assert np.all(np.abs(host - x_used @ w.T) <= bound)
    np.testing.assert_array_equal(host.view(np.uint32), portable.view(np.uint32))


@pytest.mark.parametrize("n_tok", [12, 16, 27, 40, 100])  # 100: 7 vectors, the last one padded
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_lane_products_match_dequantized_weights_and_activations(qtype, n_tok) -> None:
    rng = np.random.default_rng(int(qtype) * 100 + n_tok)
    n_out, n_in = 37, 1024  # two whole 16-row chunks and a partial one
    raw = random_k_rows(qtype, n_out, n_in, rng)
    x = rng.standard_normal((n_tok, n_in)).astype(np.float32)
    assert_lanes_match(qtype, raw, x, used_activations(qtype, x))


def extreme_rows(qtype: GGMLQuantizationType, n_in: int = 512) -> np.ndarray:
    """Three rows of every byte 0xFF (the largest codes, scales and mins) with fp16 scales 1; row 1 of
    Q6_K takes scales -128, row 1 of Q3_K and IQ4_XS every byte 0 (their most negative values)."""
    size = GGML_QUANT_SIZES[qtype][1]
    raw = np.full((3, n_in // 256 * size), 0xFF, np.uint8)
    blocks = raw.reshape(3, -1, size)
    one = np.frombuffer(np.float16(1.0).tobytes(), np.uint8)
    if qtype in (T.Q3_K, T.IQ4_XS):
        blocks[1] = 0
    if qtype == T.Q6_K:
        blocks[1, :, 192:208] = 0x80
    for offset in {T.Q6_K: (208,), T.Q3_K: (108,), T.Q2_K: (80, 82), T.IQ4_XS: (0,)}.get(qtype, (0, 2)):
        blocks[..., offset : offset + 2] = one
    return raw


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_extreme_codes_and_scales_are_exact(qtype) -> None:
    raw = extreme_rows(qtype)
    x = np.ones((20, raw.shape[1] // GGML_QUANT_SIZES[qtype][1] * 256), np.float32)  # activations +-127
    x[1::2, ::2] = -1.0
    host, portable = run_lanes(qtype, raw, x)
    w = dequantize(raw, qtype).astype(np.float64)
    reference = used_activations(qtype, x) @ w.T
    np.testing.assert_allclose(host, reference, rtol=1e-6, atol=1e-6 * np.abs(reference).max())
    np.testing.assert_array_equal(host.view(np.uint32), portable.view(np.uint32))


@pytest.mark.parametrize("n_tok", [7, 8, 33])
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_matmul_takes_the_lanes_from_8_tokens(qtype, n_tok) -> None:
    rng = np.random.default_rng(n_tok)
    raw = random_k_rows(qtype, 24, 512, rng)
    x = rng.standard_normal((n_tok, 512)).astype(np.float32)
    weight = mm.WeightView(qtype, 512, 24, raw)
    out = mm.matmul(weight, x)
    lanes, _ = run_lanes(qtype, raw, x)
    tiles = np.empty_like(out)
    ks.DRIVERS[qtype.name.lower()][1](raw, *ks.activations_for(qtype.name.lower(), x), tiles)
    expected = lanes if n_tok >= kg.MIN_TOKENS else tiles
    np.testing.assert_array_equal(out.view(np.uint32), expected.view(np.uint32))
    np.testing.assert_allclose(lanes, tiles, rtol=1e-5, atol=1e-5 * np.abs(tiles).max())


@pytest.mark.parametrize("n_tok", [1, 3, 20])
def test_products_of_one_input_quantize_it_once_and_match_bit_for_bit(n_tok, monkeypatch) -> None:
    """matmul_many (a layer's q, k, v; gate, up): the same bits as one matmul per weight, with
    K-quants of two layouts, a repeated type, 32-block types (Q4_0 twice: the SIMD products share
    one quantization) and a float weight in one call; one token included (the decode step)."""
    rng = np.random.default_rng(11)
    weights = [mm.WeightView(T.Q5_K, 512, 24, random_k_rows(T.Q5_K, 24, 512, rng)),
               mm.WeightView(T.Q6_K, 512, 16, random_k_rows(T.Q6_K, 16, 512, rng)),
               mm.WeightView(T.Q5_K, 512, 8, random_k_rows(T.Q5_K, 8, 512, rng)),
               mm.WeightView(T.Q8_0, 512, 8, random_block32_rows(T.Q8_0, 8, 512, rng)),
               mm.WeightView(T.Q4_0, 512, 12, random_block32_rows(T.Q4_0, 12, 512, rng)),
               mm.WeightView(T.Q4_0, 512, 4, random_block32_rows(T.Q4_0, 4, 512, rng)),
               mm.WeightView(T.F32, 512, 4, rng.standard_normal((4, 512)).astype(np.float32))]
    x = rng.standard_normal((n_tok, 512)).astype(np.float32)
    quantized_for = []
    original = ks.activations_for
    monkeypatch.setattr(ks, "activations_for", lambda name, x: quantized_for.append(name) or original(name, x))
    products = mm.matmul_many(weights, x)
    if n_tok == 1:  # the K-quant row drivers: one quantization per type, Q5_K's shared by its two weights
        assert sorted(quantized_for) == ["q5_k", "q6_k"]
    monkeypatch.undo()
    for weight, shared in zip(weights, products):
        np.testing.assert_array_equal(shared.view(np.uint32), mm.matmul(weight, x).view(np.uint32))


def test_short_operands_bound_the_super_blocks() -> None:
    # activations one super-block shorter than the rows: only the blocks both have are read
    rng = np.random.default_rng(9)
    raw = random_k_rows(T.Q4_K, 4, 768, rng)
    x = rng.standard_normal((16, 512)).astype(np.float32)
    out = np.empty((16, 4), np.float32)
    kg.DRIVERS["q4_k"][0](raw, *kg.activations_for_lanes("q4_k", x), 16, out)
    expected, _ = run_lanes(T.Q4_K, np.ascontiguousarray(raw[:, : 2 * 144]), x)
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize(
    "triple, cpu, isa, expect",
    [
        ("aarch64-unknown-linux-gnu", "cortex-a76", "neon-dotprod", "sdot"),
        ("aarch64-unknown-linux-gnu", "cortex-a72", "generic", "mul"),  # products in i16
        ("x86_64-unknown-linux-gnu", "haswell", "avx2", "vpmaddubsw"),
        ("x86_64-unknown-linux-gnu", "alderlake", "avx2-vnni", "vpdpbusd"),
        ("x86_64-unknown-linux-gnu", "sapphirerapids", "avx512-vnni", "vpdpbusd"),
        ("x86_64-unknown-linux-gnu", "x86-64", "generic", "pmullw"),  # SSE2 only
    ],
)
@pytest.mark.parametrize("qtype", kg.TYPES)
def test_ir_compiles_for_each_target_without_library_calls(qtype, triple, cpu, isa, expect) -> None:
    if qtype in kg.WIDE_CODES and isa in ("avx2", "neon-dotprod"):
        # codes to 255: on AVX2 the values' magnitudes and the activations with their signs; on arm64 exact
        # products in wider lanes
        expect = {"avx2": "vpsignb", "neon-dotprod": "mul"}[isa]
    instructions, asm = instructions_for(kg.standalone_lanes_ir(qtype, isa), triple, cpu)
    assert not [i for i in instructions if i in CALLS], asm
    assert expect in asm.split(), asm  # AVX-VNNI's is "{vex} vpdpbusd"


def random_block32_rows(qtype: GGMLQuantizationType, n_out: int, n_in: int, rng: np.random.Generator) -> np.ndarray:
    """Random Q8_0 / Q4_0 / IQ4_NL bytes with finite fp16 block scales."""
    size = GGML_QUANT_SIZES[qtype][1]
    raw = rng.integers(0, 256, (n_out, n_in // 32 * size), dtype=np.uint8)
    scales = (rng.uniform(-1.0, 1.0, (n_out, n_in // 32)) / 64).astype(np.float16)
    raw.reshape(n_out, -1, size)[..., 0:2] = scales.view(np.uint8).reshape(n_out, -1, 2)
    return raw


def q8_0_activations(x: np.ndarray) -> np.ndarray:
    """The activations the block products see: Q8_0 values times their block scales, float64."""
    xq, xs, _ = simd.quantize_activations_q8_0_batch(x)
    return (xq.reshape(x.shape[0], -1, 32) * xs[:, :, None].astype(np.float64)).reshape(x.shape[0], -1)


@pytest.mark.parametrize("n_tok", [8, 27, 100])
@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_0, T.IQ4_NL], ids=lambda t: t.name)
def test_block32_lane_products_match_dequantized_weights_and_activations(qtype, n_tok) -> None:
    rng = np.random.default_rng(int(qtype) * 100 + n_tok)
    raw = random_block32_rows(qtype, 37, 768, rng)
    x = rng.standard_normal((n_tok, 768)).astype(np.float32)
    assert_lanes_match(qtype, raw, x, q8_0_activations(x))  # one float multiply-add per block


@pytest.mark.parametrize("qtype", [T.Q8_0, T.IQ4_NL], ids=lambda t: t.name)
def test_block32_largest_codes_are_exact(qtype) -> None:
    # Q8_0 values 127 (code 255), IQ4_NL values 113 (code 241), times activations +-127
    size = GGML_QUANT_SIZES[qtype][1]
    raw = np.full((4, 512 // 32 * size), 0x7F if qtype == T.Q8_0 else 0xFF, np.uint8)
    raw.reshape(4, -1, size)[..., 0:2] = np.frombuffer(np.float16(1.0).tobytes(), np.uint8)
    x = np.ones((16, 512), np.float32)
    x[1::2, ::2] = -1.0
    host, portable = run_lanes(qtype, raw, x)
    reference = q8_0_activations(x) @ dequantize(raw, qtype).astype(np.float64).T
    np.testing.assert_allclose(host, reference, rtol=1e-6, atol=1e-6 * np.abs(reference).max())
    np.testing.assert_array_equal(host.view(np.uint32), portable.view(np.uint32))


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_0, T.IQ4_NL], ids=lambda t: t.name)
def test_matmul_takes_block32_lanes_on_vnni_hosts(qtype) -> None:
    rng = np.random.default_rng(5)
    raw = random_block32_rows(qtype, 24, 512, rng)
    x = rng.standard_normal((20, 512)).astype(np.float32)
    out = mm.matmul(mm.WeightView(qtype, 512, 24, raw), x)
    lanes, _ = run_lanes(qtype, raw, x)
    if simd.kernel_isa() in ("avx512-vnni", "avx2-vnni"):
        np.testing.assert_array_equal(out.view(np.uint32), lanes.view(np.uint32))
    np.testing.assert_allclose(out, lanes, rtol=1e-5, atol=1e-5 * np.abs(lanes).max())


@pytest.mark.parametrize("qtype", [T[name.upper()] for name in kg.IQ_TYPES], ids=lambda t: t.name)
def test_grid_and_ternary_lane_products_match_dequantized_weights(qtype) -> None:
    """iquant_simd's decoders feed the lanes (their groups recorded, values + 128 or codes with their
    offset): the dequantized weights (gguf-py) times the Q8_K activations, host = portable."""
    rng = np.random.default_rng(int(qtype))
    raw = random_iq_rows(qtype, 21, 512, rng)
    x = rng.standard_normal((27, 512)).astype(np.float32)
    assert_lanes_match(qtype, raw, x, used_activations(qtype, x))
