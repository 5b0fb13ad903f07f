"""The integer kernels of the grid and ternary types (engine/kernels/iquant_simd.py).

Every product (IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ1_S, IQ1_M, TQ1_0, TQ2_0; host ISA and
portable IR; one token and batches of 16- and 8-token tiles plus a remainder) equals the weights as
gguf-py dequantizes them times the dequantized Q8_K activations, to float rounding; host and
portable paths agree bit for bit; extreme codes and scales stay exact (no 16-bit saturation).
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize
from llvm_targets import CALLS, instructions_for
from test_kquant_simd import run_both

from engine.kernels import iquant_simd as iq
from engine.kernels import kquant_simd as ks

T = GGMLQuantizationType
TYPES = [T[name.upper()] for name in iq.TYPES]
D_OFFSET = {T.TQ1_0: 52, T.TQ2_0: 64}  # where the fp16 d sits (IQ1_M: spread over its scales)


def set_d(blocks: np.ndarray, qtype: GGMLQuantizationType, halves: np.ndarray) -> None:
    """Write the fp16 super-block scales ``halves`` (one per block) into ``blocks`` in place."""
    bits = halves.astype(np.float16).view(np.uint16)
    if qtype == T.IQ1_M:  # d's 16 bits are the top nibbles of the four scale words
        words = blocks[..., 48:56].copy().view(np.uint16)
        for k in range(4):
            words[..., k] = (words[..., k] & 0x0FFF) | (((bits >> (4 * k)) & 0xF) << 12)
        blocks[..., 48:56] = words.view(np.uint8)
    else:
        at = D_OFFSET.get(qtype, 0)
        blocks[..., at : at + 2] = bits[..., None].view(np.uint8)


def random_rows(qtype: GGMLQuantizationType, n_out: int, n_in: int, rng: np.random.Generator) -> np.ndarray:
    size = GGML_QUANT_SIZES[qtype][1]
    raw = rng.integers(0, 256, (n_out, n_in // 256 * size), dtype=np.uint8)
    blocks = raw.reshape(n_out, -1, size)
    set_d(blocks, qtype, rng.uniform(-1.0, 1.0, blocks.shape[:2]) / 64)
    return raw


def reference(qtype: GGMLQuantizationType, raw: np.ndarray, xq: np.ndarray, xd: np.ndarray):
    """(float64 product, the bound of its float32 rounding) from gguf-py's dequantized weights."""
    w = dequantize(raw, qtype).astype(np.float64)
    x_used = (xq.reshape(len(xq), -1, 256) * xd[:, :, None].astype(np.float64)).reshape(len(xq), -1)
    # float32 rounding of one multiply-add per super-block on top of exact integers
    return x_used @ w.T, 1e-6 * (np.abs(x_used) @ np.abs(w).T) + 1e-30


@pytest.mark.parametrize("n_tok", [1, 27])  # 27: a 16-token tile (host), 8-token tiles, 3 single tokens
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_products_match_dequantized_weights_and_activations(qtype, n_tok) -> None:
    rng = np.random.default_rng(int(qtype) * 10 + n_tok)
    raw = random_rows(qtype, 37, 1024, rng)  # 37 rows: two whole 16-row chunks and a partial one
    x = rng.standard_normal((n_tok, 1024)).astype(np.float32)
    xq, xd, host, portable = run_both(qtype, raw, x)
    expected, bound = reference(qtype, raw, xq, xd)
    assert np.isfinite(expected).all()
    assert np.all(np.abs(host - expected) <= bound)
    np.testing.assert_array_equal(host.view(np.uint32), portable.view(np.uint32))


@pytest.mark.parametrize("fill", [0xFF, 0x00, 0xAA])
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_extreme_codes_and_scales_are_exact(qtype, fill) -> None:
    """Every byte the same (0xFF: the largest indices, scales 15/7 and every sign set; 0: the
    smallest), d = 1, activations +-127: the products are integers far from float32's limits, so
    any saturation or lost sign would show."""
    size = GGML_QUANT_SIZES[qtype][1]
    raw = np.full((2, 2 * size), fill, np.uint8)
    blocks = raw.reshape(2, -1, size)
    set_d(blocks, qtype, np.ones(blocks.shape[:2]))
    x = np.ones((3, 512), np.float32)
    x[1, ::2] = -1.0
    x[2, ::3] = -1.0
    xq, xd, host, portable = run_both(qtype, raw, x)
    assert np.abs(xq).max() == 127
    expected, _ = reference(qtype, raw, xq, xd)
    np.testing.assert_allclose(host, expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max())
    np.testing.assert_array_equal(host.view(np.uint32), portable.view(np.uint32))


@pytest.mark.parametrize(
    "triple, cpu, isa, expect",
    [
        ("aarch64-unknown-linux-gnu", "cortex-a76", "neon-dotprod", "sdot"),
        ("aarch64-unknown-linux-gnu", "cortex-a72", "generic", "smull"),
        ("x86_64-unknown-linux-gnu", "haswell", "avx2", "vpmaddubsw"),
        ("x86_64-unknown-linux-gnu", "x86-64", "generic", "pmullw"),  # SSE2 only
    ],
)
@pytest.mark.parametrize("qtype", iq.TYPES)
def test_ir_compiles_for_each_target_without_library_calls(qtype, triple, cpu, isa, expect) -> None:
    """The arm64 paths run only under emulation; here each is compiled for its target, with its
    grid tables, to the instructions it is written for."""
    ir_text = ks.standalone_row_dot_ir(qtype, isa, emitter=iq._IQEmitter)
    instructions, asm = instructions_for(ir_text, triple, cpu)
    assert not [i for i in instructions if i in CALLS], asm
    assert expect in instructions, asm
