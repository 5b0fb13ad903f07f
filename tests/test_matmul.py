"""The weight-matrix kernels against plain float64 references built on gguf.quants.

Two references per quantized type:

* ``reference_matmul(w, X, quantize_activations=True)`` rounds X through Q8_0 (and, for
  Q4_1/Q5_1, uses the Q8_1 block sums) exactly like ggml: the fast path must agree to
  float32 summation error, checked as ``|y - ref| <= 1e-5 * (|X| @ |W|^T)``.
* ``reference_matmul(w, X)`` keeps X in float: the difference is the activation
  quantization error, bounded per element by ``amax(block) / 127 * 0.57`` (half a step
  plus the fp16 rounding of the scale), so ``|y - ref| <= |W| @ err_bound``.
"""

from __future__ import annotations

import contextlib

import numba
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

from engine.errors import HalfbyteError
from engine.kernels.matmul import (
    DEQUANT_TYPES,
    GGUF_DEQUANT_TYPES,
    K_QUANT_TYPES,
    KERNEL_PATHS,
    QUANT_TYPES,
    SUPPORTED_TYPES,
    WeightView,
    dequantize_weight,
    kernel_description,
    matmul,
    matvec,
    quantize_activations,
    reference_matmul,
    set_kernel_path,
)

T = GGMLQuantizationType
# K-quants: tested below; the dequantizing products (Q2_K, Q3_K, IQ*, TQ*): tests/test_new_types.py
ALL_TYPES = [t for t in SUPPORTED_TYPES if t not in K_QUANT_TYPES and t not in DEQUANT_TYPES + GGUF_DEQUANT_TYPES]
SHAPES = [(37, 32), (5, 64), (19, 4096)]  # (n_out, n_in): odd row counts, one block .. 128 blocks


def make_weight(qtype: GGMLQuantizationType, n_out: int, n_in: int, rng: np.random.Generator) -> WeightView:
    dense = rng.standard_normal((n_out, n_in), dtype=np.float32)
    if qtype == T.F32:
        raw = dense
    elif qtype == T.F16:
        raw = dense.astype(np.float16)
    else:
        raw = quants.quantize(dense, qtype)
    return WeightView.from_raw(qtype, (n_in, n_out), raw)


@contextlib.contextmanager
def threads(n: int):
    previous = numba.get_num_threads()
    numba.set_num_threads(n)
    try:
        yield
    finally:
        numba.set_num_threads(previous)


def activation_error_bound(weight: WeightView, x: np.ndarray) -> np.ndarray:
    """Worst-case |fast - float reference| caused by quantizing ``x`` ``(n_tok, n_in)`` to Q8_0/Q8_1."""
    blocks = x.reshape(x.shape[0], -1, 32)
    amax = np.abs(blocks).max(-1).astype(np.float64)  # (n_tok, nb)
    per_element = np.repeat(amax / 127 * 0.57, 32, axis=1)  # half a step + fp16 rounding of d
    w = np.abs(dequantize_weight(weight).astype(np.float64))
    bound = per_element @ w.T
    if weight.ggml_type in (T.Q4_1, T.Q5_1):
        # Q8_1's s = fp16(d * sum(q)) is rounded too: |s| <= 32 * amax, relative error 2^-11.
        type_size = GGML_QUANT_SIZES[weight.ggml_type][1]
        minimums = weight.data.reshape(weight.n_out, -1, type_size)[..., 2:4].copy().view(np.float16)[..., 0]
        bound += (32 * amax * 2.0**-11) @ np.abs(minimums.astype(np.float64)).T
    return bound


def check_against_references(weight: WeightView, x: np.ndarray, y: np.ndarray) -> None:
    scale = np.abs(x).astype(np.float64) @ np.abs(dequantize_weight(weight).astype(np.float64)).T
    exact = reference_matmul(weight, x, quantize_activations=True)
    assert np.all(np.abs(y - exact) <= 1e-5 * scale + 1e-30), np.abs(y - exact).max()
    plain = reference_matmul(weight, x)
    if weight.ggml_type in QUANT_TYPES:
        assert np.all(np.abs(y - plain) <= activation_error_bound(weight, x) + 1e-5 * scale)
    else:
        assert np.all(np.abs(y - plain) <= 1e-5 * scale)


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("n_out,n_in", SHAPES)
def test_matvec_matches_references(qtype, n_out, n_in):
    rng = np.random.default_rng(n_out * 1000 + n_in)
    weight = make_weight(qtype, n_out, n_in, rng)
    x = rng.standard_normal(n_in, dtype=np.float32)
    y = matvec(weight, x)
    assert y.shape == (n_out,) and y.dtype == np.float32
    check_against_references(weight, x[None], y[None])


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_matmul_matches_references_and_matvec(qtype):
    rng = np.random.default_rng(int(qtype))
    n_out, n_in, n_tok = 37, 128, 7  # rows: two full tasks of 16 and a ragged one; tokens: 4 + 3
    weight = make_weight(qtype, n_out, n_in, rng)
    x = rng.standard_normal((n_tok, n_in), dtype=np.float32) * np.float32(3)
    y = matmul(weight, x)
    assert y.shape == (n_tok, n_out) and y.dtype == np.float32
    check_against_references(weight, x, y)
    rows = np.stack([matvec(weight, x[t]) for t in range(n_tok)])
    if qtype in QUANT_TYPES and qtype not in (T.Q4_0, T.Q8_0):
        np.testing.assert_array_equal(y, rows)  # same integer sums, same float order
    else:  # float dots, or SIMD tiles that add the same integer block sums in another order
        scale = np.abs(x).astype(np.float64) @ np.abs(dequantize_weight(weight).astype(np.float64)).T
        assert np.all(np.abs(y - rows) <= 1e-5 * scale)


@pytest.mark.parametrize("path", KERNEL_PATHS)
@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q8_0], ids=lambda t: t.name)
@pytest.mark.parametrize("n_out,n_in", SHAPES)
def test_every_kernel_path_matches_references(path, qtype, n_out, n_in):
    """The SIMD (host ISA), portable-IR and plain-loop paths behind matvec/matmul all agree with ggml's math."""
    rng = np.random.default_rng(n_out * n_in)
    weight = make_weight(qtype, n_out, n_in, rng)
    x = rng.standard_normal((9, n_in), dtype=np.float32)
    previous = set_kernel_path(path)
    try:
        check_against_references(weight, x, matmul(weight, x))
        check_against_references(weight, x[:1], matvec(weight, x[0])[None])
    finally:
        set_kernel_path(previous)


def test_kernel_path_is_validated_and_described():
    with pytest.raises(HalfbyteError, match="expected one of"):
        set_kernel_path("fastest")
    previous = set_kernel_path("reference")
    try:
        assert kernel_description() == "reference"
        set_kernel_path("portable")
        assert kernel_description() == "simd-generic"
    finally:
        set_kernel_path(previous)


@pytest.mark.parametrize("qtype", [T.F32, T.F16, T.BF16], ids=lambda t: t.name)
def test_float_types_take_any_row_length(qtype):
    rng = np.random.default_rng(11)
    weight = make_weight(qtype, 23, 50, rng)
    x = rng.standard_normal((5, 50), dtype=np.float32)
    check_against_references(weight, x, matmul(weight, x))
    check_against_references(weight, x[:1], matvec(weight, x[0])[None])


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_one_and_two_threads_agree_bit_for_bit(qtype):
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("Numba runs with a single thread here")
    rng = np.random.default_rng(7)
    weight = make_weight(qtype, 45, 256, rng)
    x = rng.standard_normal((6, 256), dtype=np.float32)
    with threads(1):
        one = matvec(weight, x[0]), matmul(weight, x)
    with threads(2):
        two = matvec(weight, x[0]), matmul(weight, x)
    np.testing.assert_array_equal(one[0], two[0])
    np.testing.assert_array_equal(one[1], two[1])


@pytest.mark.parametrize("qtype", list(QUANT_TYPES), ids=lambda t: t.name)
def test_random_block_bytes(qtype):
    """Every bit pattern of the quant bytes decodes like gguf.quants (only the scales kept finite)."""
    rng = np.random.default_rng(100 + int(qtype))
    n_out, n_in = 9, 96
    type_size = GGML_QUANT_SIZES[qtype][1]
    raw = rng.integers(0, 256, (n_out, n_in // 32, type_size), dtype=np.uint8)
    n_halves = 2 if qtype in (T.Q4_1, T.Q5_1) else 1  # d (and m)
    halves = rng.uniform(-0.1, 0.1, (n_out, n_in // 32, n_halves)).astype(np.float16)
    raw[..., : 2 * n_halves] = halves.view(np.uint8).reshape(n_out, n_in // 32, 2 * n_halves)
    weight = WeightView.from_raw(qtype, (n_in, n_out), raw.reshape(n_out, -1))
    x = rng.standard_normal((3, n_in), dtype=np.float32)
    check_against_references(weight, x, matmul(weight, x))
    check_against_references(weight, x[:1], matvec(weight, x[0])[None])


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_zero_weights_and_activations(qtype):
    weight = make_weight(qtype, 3, 64, np.random.default_rng(0))
    zero = WeightView.from_raw(qtype, (64, 3), np.zeros(weight.nbytes, np.uint8))
    np.testing.assert_array_equal(matvec(zero, np.ones(64, np.float32)), 0)
    np.testing.assert_array_equal(matvec(weight, np.zeros(64, np.float32)), 0)
    np.testing.assert_array_equal(matmul(weight, np.zeros((2, 64), np.float32)), 0)


def test_out_parameters_are_filled_and_returned():
    rng = np.random.default_rng(1)
    weight = make_weight(T.Q4_0, 21, 64, rng)
    x = rng.standard_normal((3, 64), dtype=np.float32)
    out = np.full(21, np.nan, np.float32)
    assert matvec(weight, x[0], out=out) is out
    np.testing.assert_array_equal(out, matvec(weight, x[0]))
    out2 = np.full((3, 21), np.nan, np.float32)
    assert matmul(weight, x, out=out2) is out2
    np.testing.assert_array_equal(out2, matmul(weight, x))
    with pytest.raises(HalfbyteError, match="out must be"):
        matvec(weight, x[0], out=np.empty(20, np.float32))
    with pytest.raises(HalfbyteError, match="out must be"):
        matmul(weight, x, out=np.empty((3, 21), np.float64))
    assert matmul(weight, np.zeros((0, 64), np.float32)).shape == (0, 21)


def test_activation_quantization_is_byte_identical_to_gguf():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 256), dtype=np.float32) * np.float32(10) ** rng.integers(-4, 4, (4, 256))
    x[0, :32] = 0.0  # a zero block: d = 0, all q = 0
    x[1, :32] = np.arange(32, dtype=np.float32) - 15.5  # halves: roundf rounds away from zero
    x[1, 32:64] = np.float32(127.0) / (np.arange(32, dtype=np.float32) + 1)
    x = x.astype(np.float32)
    act = quantize_activations(x)
    expected = quants.quantize(x, T.Q8_0).reshape(4, -1, 34)
    ours = np.concatenate([act.d.astype(np.float16)[..., None].view(np.uint8),
                           act.qs.reshape(4, -1, 32).view(np.uint8)], axis=-1)
    np.testing.assert_array_equal(ours, expected)
    # Q8_1 block sums: fp16(d * sum(q)) with the unrounded float32 d.
    d32 = np.abs(x.reshape(4, -1, 32)).max(-1) / np.float32(127)
    q_sum = act.qs.reshape(4, -1, 32).astype(np.int32).sum(-1)
    np.testing.assert_array_equal(act.s, (q_sum.astype(np.float32) * d32).astype(np.float16).astype(np.float32))


def test_engine_quants_dequantize_agrees_when_available():
    engine_quants = pytest.importorskip("engine.quants")
    rng = np.random.default_rng(3)
    for qtype in (T.Q4_0, T.Q5_1):  # one _0 and one _1 type: each type costs a compilation
        weight = make_weight(qtype, 4, 64, rng)
        ours = np.asarray(engine_quants.dequantize(weight.data.view(np.uint8), qtype), np.float32).reshape(4, 64)
        np.testing.assert_array_equal(ours, dequantize_weight(weight))


def test_weight_view_from_raw():
    rng = np.random.default_rng(4)
    raw = quants.quantize(rng.standard_normal((3, 64), dtype=np.float32), T.Q4_0)
    view = WeightView.from_raw(T.Q4_0, (64, 3, 1, 1), raw.reshape(-1))  # flat bytes, trailing 1 dims
    assert (view.n_in, view.n_out, view.data.shape) == (64, 3, (3, 36))
    assert not view.data.flags.writeable and np.shares_memory(view.data, raw)
    f16 = WeightView.from_raw(int(T.F16), [64, 3], rng.standard_normal((3, 64)).astype(np.float16))
    assert f16.data.dtype == np.uint16 and f16.ggml_type == T.F16
    readonly = raw.copy()
    readonly.flags.writeable = False
    assert WeightView.from_raw(T.Q4_0, (64, 3), readonly).data.base is not None

    with pytest.raises(HalfbyteError, match="do not support ggml type Q8_K"):  # activations only
        WeightView.from_raw(T.Q8_K, (256, 3), np.zeros((3, 292), np.uint8))
    with pytest.raises(HalfbyteError, match="unknown ggml type"):
        WeightView.from_raw(12345, (64, 3), raw)
    with pytest.raises(HalfbyteError, match="multiple of 32"):
        WeightView.from_raw(T.Q8_0, (48, 3), np.zeros(3 * 51, np.uint8))
    with pytest.raises(HalfbyteError, match="needs 108 bytes"):
        WeightView.from_raw(T.Q4_0, (64, 3), raw[:2])
    with pytest.raises(HalfbyteError, match="2-D"):
        WeightView.from_raw(T.F32, (64,), np.zeros(64, np.float32))
    with pytest.raises(HalfbyteError, match="must be one of"):
        WeightView.from_raw(T.F32, (4, 2), np.zeros(8, np.int32))
    with pytest.raises(HalfbyteError, match="C-contiguous"):
        WeightView.from_raw(T.F32, (4, 2), np.zeros((2, 8), np.float32)[:, ::2])
    with pytest.raises(HalfbyteError, match="do not fit"):
        matvec(view, np.zeros(32, np.float32))
    with pytest.raises(HalfbyteError, match="do not fit"):
        matmul(view, np.zeros(64, np.float32))


# --------------------------------------------------------------------------------------------
# K-quants (files from llama-quantize): dequantized bit for bit like gguf.quants, float products
# --------------------------------------------------------------------------------------------


def random_k_weight(qtype, n_out, n_in, rng):
    """Random K-quant blocks with finite fp16 super-block scales (gguf-py cannot quantize them)."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (n_out, n_in // block_size * type_size), dtype=np.uint8)
    blocks = raw.reshape(n_out, -1, type_size)
    scales = (rng.uniform(0.2, 1.0, blocks.shape[:2] + (2,)) / 64).astype(np.float16).view(np.uint8)
    if qtype == T.Q6_K:
        blocks[..., 208:210] = scales.reshape(*blocks.shape[:2], 4)[..., :2]
    else:
        blocks[..., 0:4] = scales.reshape(*blocks.shape[:2], 4)
    return WeightView.from_raw(qtype, (n_in, n_out), raw)


@pytest.mark.parametrize("path", KERNEL_PATHS)
@pytest.mark.parametrize("qtype", K_QUANT_TYPES, ids=lambda t: t.name)
def test_k_quants_dequantize_like_gguf_and_multiply(qtype, path):
    """The reference path takes float dots with the float activations (to float rounding); the
    SIMD paths quantize the activations to Q8_K first, as llama.cpp does, so they match the
    dequantized weights times the dequantized activations (to float rounding) and the float
    product within the activations' 8-bit rounding."""
    from engine import quants as our_quants
    from engine.kernels.kquant_simd import quantize_activations_q8_k

    rng = np.random.default_rng(int(qtype))
    weight = random_k_weight(qtype, 21, 512, rng)
    expected = quants.dequantize(weight.data, qtype)
    np.testing.assert_array_equal(our_quants.dequantize(weight.data, qtype).view(np.uint32), expected.view(np.uint32))
    x = rng.standard_normal((5, 512), dtype=np.float32)
    w64 = expected.astype(np.float64)
    scale = np.abs(x).astype(np.float64) @ np.abs(w64).T
    previous = set_kernel_path(path)
    try:
        batch, single = matmul(weight, x), matvec(weight, x[0])
    finally:
        set_kernel_path(previous)
    if path == "reference":
        reference, tolerance = x.astype(np.float64) @ w64.T, 1e-5
    else:
        xq, xd, _ = quantize_activations_q8_k(x)
        x_used = (xq.reshape(5, -1, 256) * xd[:, :, None].astype(np.float64)).reshape(5, -1)
        reference, tolerance = x_used @ w64.T, 1e-5
        # and the activations' own rounding: at most half a step (d / 2) per value
        step = np.abs(xd).max(axis=1, keepdims=True) / 2
        float_product = x.astype(np.float64) @ w64.T
        assert np.all(np.abs(batch - float_product) <= step * np.abs(w64).sum(axis=1) + tolerance * scale)
    assert np.all(np.abs(batch - reference) <= tolerance * scale)
    assert np.all(np.abs(single - reference[0]) <= tolerance * scale[0])
    if path != "reference":
        # one token alone and the same token in a batch: the same integers, the same floats
        np.testing.assert_array_equal(single, batch[0])


def test_k_quant_rows_must_be_whole_super_blocks():
    with pytest.raises(HalfbyteError, match="multiple of 256"):
        WeightView.from_raw(T.Q6_K, (128, 2), np.zeros(2 * 105, np.uint8))
