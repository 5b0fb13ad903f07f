"""engine.quants against gguf.quants (the Python port of ggml-quants.c): same bytes, same floats."""

from __future__ import annotations

import numba
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf import quants as reference
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from engine import quants
from engine.errors import HalfbyteError
from engine.kernels.quant import f32_to_f16_bits_array

BLOCK_TYPES = [QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1]
ALL_TYPES = [QT.F32, QT.F16, QT.BF16, *BLOCK_TYPES]
F32_MAX = np.finfo(np.float32).max
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def reference_quantize(data: np.ndarray, qtype: QT) -> np.ndarray:
    with np.errstate(all="ignore"):  # the reference warns on NaN/inf casts; we only want its bytes
        return reference.quantize(data, qtype)


def reference_dequantize(raw: np.ndarray, qtype: QT) -> np.ndarray:
    with np.errstate(all="ignore"):
        return reference.dequantize(raw, qtype)


def canonical_scales(raw: np.ndarray, qtype: QT) -> np.ndarray:
    """Packed blocks with the fp16 scale (and min) of Q8_0/Q4_1/Q5_1 made canonical where the
    reference leaves them to numpy's SIMD min/max reduction order: any NaN -> 0x7E00 and, for
    Q4_1/Q5_1, -0.0 -> +0.0 (see the module doc of engine.quants). Codes are left untouched."""
    blocks = raw.reshape(-1, quants.type_bytes(qtype)).copy()
    fields = {QT.Q8_0: 1, QT.Q4_1: 2, QT.Q5_1: 2}.get(qtype, 0)
    if fields:
        halves = blocks[:, : 2 * fields].copy().view(np.uint16)
        halves[((halves & 0x7C00) == 0x7C00) & ((halves & 0x03FF) != 0)] = 0x7E00
        if qtype != QT.Q8_0:
            halves[(halves & 0x7FFF) == 0] = 0
        blocks[:, : 2 * fields] = halves.view(np.uint8)
    return blocks


def assert_same_as_reference(data: np.ndarray, qtype: QT) -> np.ndarray:
    ours, theirs = quants.quantize(data, qtype), reference_quantize(data, qtype)
    assert (ours.dtype, ours.shape) == (theirs.dtype, theirs.shape)
    if qtype in (QT.F32, QT.F16):
        np.testing.assert_array_equal(ours.view(np.uint8), theirs.view(np.uint8))
        return ours
    np.testing.assert_array_equal(canonical_scales(ours, qtype), canonical_scales(theirs, qtype))
    assert_same_floats(quants.dequantize(ours, qtype), reference_dequantize(ours, qtype))
    return ours


def assert_same_floats(ours: np.ndarray, theirs: np.ndarray, nan_payloads: bool = True) -> None:
    assert (ours.dtype, ours.shape) == (np.float32, theirs.shape)
    if not nan_payloads:
        np.testing.assert_array_equal(np.isnan(ours), np.isnan(theirs))
        ours, theirs = ours[~np.isnan(ours)], theirs[~np.isnan(theirs)]
    np.testing.assert_array_equal(ours.view(np.uint32), theirs.view(np.uint32))  # bit for bit, NaNs too


# ------------------------------------------------------------------------- hostile data

HOSTILE_BLOCKS = (
    "normal", "zeros", "signed_zeros", "equal_pos", "equal_neg", "huge", "max_magnitude", "subnormal",
    "tiny_normal", "half_steps", "outlier", "neg_max", "pos_max", "tie_max", "nan", "inf", "mixed",
)


def hostile_block(kind: str, rng: np.random.Generator, qtype: QT) -> np.ndarray:
    """32 float32 values of one kind of trouble."""
    normal = rng.standard_normal(32).astype(np.float32)
    if kind == "normal":
        return normal * np.float32(10.0 ** rng.integers(-3, 4))
    if kind == "zeros":
        return np.zeros(32, np.float32)
    if kind == "signed_zeros":
        return np.where(rng.random(32) < 0.5, np.float32(0.0), np.float32(-0.0)).astype(np.float32)
    if kind in ("equal_pos", "equal_neg"):
        value = np.float32(rng.choice([1.0, 0.1, 7.5, 1e-3, 3e4]))
        return np.full(32, value if kind == "equal_pos" else -value, np.float32)
    if kind == "huge":
        return normal * np.float32(1e30)
    if kind == "max_magnitude":
        return np.where(rng.random(32) < 0.5, F32_MAX, -F32_MAX) * rng.uniform(0.5, 1, 32).astype(np.float32)
    if kind == "subnormal":
        bits = rng.integers(-(1 << 23), 1 << 23, 32) >> rng.integers(0, 23)
        return bits.astype(np.int32).view(np.float32)
    if kind == "tiny_normal":
        return normal * np.float32(1e-36)
    if kind == "half_steps":
        # Scales of exactly 1 (amax 127, max -8 / -16, range 15 / 31) put x * id on k + 0.5.
        top = {QT.Q8_0: 127.0, QT.Q4_0: -8.0, QT.Q5_0: -16.0}.get(qtype, 15.0 if qtype == QT.Q4_1 else 31.0)
        values = rng.integers(-16, 16, 32) + rng.choice([0.0, 0.5, -0.5], 32)
        if qtype in (QT.Q4_1, QT.Q5_1):
            values = np.abs(values) % top
            values[:2] = 0.0, top
        else:
            values = np.clip(values, -abs(top), abs(top))
            values[rng.integers(32)] = top
        return (values * np.float32(2.0 ** rng.integers(-3, 4))).astype(np.float32)
    if kind == "outlier":
        normal[rng.integers(32)] = np.float32(rng.choice([-1, 1]) * 10.0 ** rng.integers(2, 6))
        return normal
    if kind in ("neg_max", "pos_max", "tie_max"):
        position = rng.integers(32)
        normal[position] = 50.0 if kind == "pos_max" else -50.0
        if kind == "tie_max":
            normal[(position + rng.integers(1, 32)) % 32] = 50.0
        return normal
    if kind == "nan":
        normal[rng.integers(32, size=rng.integers(1, 4))] = np.float32(rng.choice([np.nan, -np.nan]))
        return normal
    if kind == "inf":
        normal[rng.integers(32, size=rng.integers(1, 4))] = rng.choice([np.inf, -np.inf], 1).astype(np.float32)
        return normal
    return np.concatenate([hostile_block(k, rng, qtype)[:8] for k in rng.choice(HOSTILE_BLOCKS[:-1], 4)])


shapes = st.one_of(
    st.tuples(st.integers(1, 6)),
    st.tuples(st.integers(1, 5), st.integers(1, 4)),
    st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3)),
).map(lambda dims: (*dims[:-1], 32 * dims[-1]))


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
@SETTINGS
@given(shape=shapes, seed=st.integers(0, 2**32 - 1), kinds=st.lists(st.sampled_from(HOSTILE_BLOCKS), min_size=1))
def test_quantize_matches_reference_on_hostile_blocks(qtype: QT, shape: tuple, seed: int, kinds: list) -> None:
    rng = np.random.default_rng(seed)
    n_blocks = int(np.prod(shape)) // 32
    data = np.concatenate([hostile_block(kinds[i % len(kinds)], rng, qtype) for i in range(n_blocks)])
    assert_same_as_reference(data.reshape(shape), qtype)


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
@SETTINGS
@given(data=hnp.arrays(np.float32, shapes, elements=st.floats(width=32, allow_nan=True, allow_infinity=True)))
def test_quantize_matches_reference_on_any_floats(qtype: QT, data: np.ndarray) -> None:
    assert_same_as_reference(data, qtype)


@pytest.mark.parametrize("qtype", [QT.BF16, *BLOCK_TYPES], ids=lambda t: t.name)
@SETTINGS
@given(rows=st.integers(1, 4), blocks_per_row=st.integers(1, 4), seed=st.integers(0, 2**32 - 1))
def test_dequantize_arbitrary_bytes_matches_reference(qtype: QT, rows: int, blocks_per_row: int, seed: int) -> None:
    # Random bytes hit every fp16 scale: subnormal, inf, NaN payloads of either sign.
    raw = np.random.default_rng(seed).integers(0, 256, (rows, blocks_per_row * quants.type_bytes(qtype)), np.uint8)
    # A lone Q4_1/Q5_1 block with NaN d and m: numpy's vector + scalar add loop returns m's NaN
    # where any bigger tensor gets d * q's (see engine.quants); only there NaN payloads may differ.
    lone_affine_block = qtype in (QT.Q4_1, QT.Q5_1) and rows * blocks_per_row == 1
    assert_same_floats(quants.dequantize(raw, qtype), reference_dequantize(raw, qtype), not lone_affine_block)


# ---------------------------------------------------------------------------- NaN / inf


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_dequantize_inf_and_nan_scales_matches_reference(qtype: QT) -> None:
    # Exponent bits forced on in many fp16 scales/mins: inf, quiet and signalling NaNs, both
    # NaN at once (whose payload wins in d * q + m is an operand-order question).
    raw = np.random.default_rng(11).integers(0, 256, (512, quants.type_bytes(qtype)), np.uint8)
    raw[::3, 1] |= 0x7C
    raw[::2, 3] |= 0x7C
    assert_same_floats(quants.dequantize(raw, qtype), reference_dequantize(raw, qtype))


def unpack_codes(block: np.ndarray, qtype: QT) -> np.ndarray:
    """The 32 integer codes of one packed block (header skipped)."""
    if qtype == QT.Q8_0:
        return block[2:].view(np.int8).astype(int)
    header = {QT.Q4_0: 2, QT.Q4_1: 4, QT.Q5_0: 6, QT.Q5_1: 8}[qtype]
    nibbles = block[header:].astype(int)
    codes = np.concatenate([nibbles & 15, nibbles >> 4])
    if qtype in (QT.Q5_0, QT.Q5_1):
        high_bits = int.from_bytes(block[header - 4 : header].tobytes(), "little")
        codes |= ((high_bits >> np.arange(32)) & 1) << 4
    return codes


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("special", [np.nan, -np.nan, np.inf, -np.inf], ids=["nan", "-nan", "inf", "-inf"])
def test_nan_and_inf_blocks_give_the_documented_bytes(qtype: QT, special: float) -> None:
    data = np.linspace(-1, 1, 64, dtype=np.float32)
    data[[3, 40, 41]] = special
    for block, values in zip(assert_same_as_reference(data, qtype).reshape(2, -1), data.reshape(2, 32)):
        scale = block[:2].copy().view(np.float16)[0]
        codes = unpack_codes(block, qtype)
        if np.isnan(special):
            assert np.isnan(scale) and not codes.any()
            if qtype in (QT.Q8_0, QT.Q4_1, QT.Q5_1):  # numpy's canonical NaN, for scale and min
                assert block[:2].tobytes() == b"\x00\x7e"
            if qtype in (QT.Q4_1, QT.Q5_1):
                assert block[2:4].tobytes() == b"\x00\x7e"
        else:
            assert np.isinf(scale)
            zero_code = {QT.Q4_0: 8, QT.Q5_0: 16}.get(qtype, 0)  # finite x * (1 / inf) = 0
            np.testing.assert_array_equal(codes, np.where(np.isinf(values), 0, zero_code))  # inf * 0 = NaN -> 0


def test_bf16_rounding_and_nan_like_ggml() -> None:
    bits = np.array([0x3F808000, 0x3F818000, 0x3F808001, 0x7F7FFFFF, 0xFF7FFFFF, 0x7F800000,
                     0x7F800001, 0xFFC00000, 0x7FFFFFFF, 0x00000001, 0x80000000], np.uint32)
    expected = np.array([0x3F80, 0x3F82, 0x3F81, 0x7F80, 0xFF80, 0x7F80,
                         0x7FC0, 0xFFC0, 0x7FFF, 0x0000, 0x8000], np.uint16)
    ours = quants.quantize(bits.view(np.float32), QT.BF16)
    np.testing.assert_array_equal(ours.view(np.uint16), expected)
    np.testing.assert_array_equal(ours, reference_quantize(bits.view(np.float32), QT.BF16))


def test_signed_zero_ties_keep_the_first_like_ggml() -> None:
    for qtype in (QT.Q4_1, QT.Q5_1):
        block = np.ones(32, np.float32)
        block[[5, 9]] = -0.0, 0.0
        assert quants.quantize(block, qtype)[2:4].view(np.uint16)[0] == 0x8000  # min = -0.0
        block[[5, 9]] = 0.0, -0.0
        assert quants.quantize(block, qtype)[2:4].view(np.uint16)[0] == 0x0000


def test_f32_to_f16_matches_numpy_on_every_exponent_and_rounding_edge() -> None:
    # Checked once on all 2**32 inputs; here every sign/exponent/top-mantissa with the low bits
    # that decide rounding (below, at and above the tie, odd and even).
    low_bits = np.array([0, 1, 0x0FFF, 0x1000, 0x1001, 0x1FFF, 0x2000, 0x3000, 0xFFFF, 0x8000], np.uint32)
    bits = ((np.arange(1 << 16, dtype=np.uint32)[:, None] << 16) | low_bits).ravel()
    values = bits.view(np.float32)
    ours = np.empty(values.size, np.uint16)
    f32_to_f16_bits_array(values, ours)
    with np.errstate(all="ignore"):
        np.testing.assert_array_equal(ours, values.astype(np.float16).view(np.uint16))


# ---------------------------------------------------------------------- round trip


ROUND_TRIP_ERROR = {  # worst |x - dequantize(quantize(x))| per block, in units of the block's spread
    QT.Q8_0: 0.5 / 127, QT.Q4_0: 1 / 8, QT.Q5_0: 1 / 16, QT.Q4_1: 0.5 / 15, QT.Q5_1: 0.5 / 31,
}


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_round_trip_error_bounds(qtype: QT) -> None:
    rng = np.random.default_rng(7)
    data = (rng.standard_normal((64, 256)) * rng.uniform(0.1, 100, (64, 1))).astype(np.float32)
    back = quants.dequantize(quants.quantize(data, qtype), qtype)
    error = np.abs(back - data)
    if qtype == QT.F32:
        assert not error.any()
    elif qtype in (QT.F16, QT.BF16):
        assert (error <= np.abs(data) * (2.0**-11 if qtype == QT.F16 else 2.0**-8)).all()
    else:
        blocks, error = data.reshape(-1, 32), error.reshape(-1, 32)
        if qtype in (QT.Q4_1, QT.Q5_1):
            spread = blocks.max(axis=1) - blocks.min(axis=1)
            fp16_slack = (spread + np.abs(blocks.min(axis=1))) * 2.0**-10  # rounding of d and m to fp16
        else:
            spread = np.abs(blocks).max(axis=1)
            fp16_slack = spread * 2.0**-10
        assert (error.max(axis=1) <= spread * ROUND_TRIP_ERROR[qtype] + fp16_slack).all()


# ------------------------------------------------------------------- API contract


def test_thread_count_does_not_change_bytes() -> None:
    data = np.random.default_rng(3).standard_normal((33, 96)).astype(np.float32)
    threads = numba.get_num_threads()
    results = []
    for count in sorted({1, threads}):
        numba.set_num_threads(count)
        try:
            results.append([quants.quantize(data, qtype).tobytes() for qtype in BLOCK_TYPES])
        finally:
            numba.set_num_threads(threads)
    assert all(result == results[0] for result in results)


def test_chunked_strided_and_non_float32_input(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(quants, "_CHUNK_ITEMS", 64)  # many chunks, and rows longer than a chunk
    rng = np.random.default_rng(5)
    cases = [
        rng.standard_normal((96, 10)).astype(np.float32).T,  # transposed rows
        rng.standard_normal((3, 4, 160)).astype(np.float32)[:, ::2, ::-1],  # non-contiguous 3-D
        rng.standard_normal((2, 320)),  # float64: cast to float32 first, as gguf does
        rng.standard_normal((7, 32)).astype(np.float16),
        np.frombuffer(rng.standard_normal(256).astype(np.float32).tobytes(), np.float32).reshape(2, 128),  # read-only
    ]
    for data in cases:
        for qtype in (QT.BF16, *BLOCK_TYPES):
            raw = assert_same_as_reference(data, qtype)
            read_only = np.frombuffer(raw.tobytes(), np.uint8).reshape(raw.shape)  # like a mmap'd GGUF
            assert_same_floats(quants.dequantize(read_only, qtype), reference_dequantize(raw, qtype))


def test_plain_types_are_numpy_casts_like_gguf() -> None:
    data = np.arange(64, dtype=np.float32).reshape(2, 32)
    assert quants.quantize(data, QT.F32) is data
    assert quants.quantize(data, QT.F16).dtype == np.float16
    raw = data.view(np.uint8)
    assert_same_floats(quants.dequantize(raw, QT.F32), reference_dequantize(raw, QT.F32))
    half = data.astype(np.float16).view(np.uint8)
    assert_same_floats(quants.dequantize(half, QT.F16), reference_dequantize(half, QT.F16))


@pytest.mark.parametrize("qtype", [QT.F32, QT.F16, QT.BF16, QT.Q4_0, QT.Q5_1], ids=lambda t: t.name)
def test_dequantize_into_out(qtype: QT) -> None:
    raw = quants.quantize(np.random.default_rng(2).standard_normal((3, 64)).astype(np.float32), qtype).view(np.uint8)
    out = np.full((3, 64), np.nan, np.float32)
    assert quants.dequantize(raw, qtype, out=out) is out
    assert_same_floats(out, reference_dequantize(raw, qtype))
    for bad in (np.empty((3, 32), np.float32), np.empty((3, 64), np.float64), np.empty((64, 3), np.float32).T):
        with pytest.raises(HalfbyteError):
            quants.dequantize(raw, qtype, out=bad)


def test_sizes() -> None:
    assert (quants.block_size(QT.Q4_0), quants.type_bytes(QT.Q4_0)) == (32, 18)
    assert quants.row_bytes(QT.Q5_1, 4096) == 128 * 24
    assert quants.row_bytes(QT.BF16, 3) == 6
    assert quants.tensor_nbytes(QT.Q8_0, (3, 2, 64)) == 6 * 2 * 34
    assert quants.tensor_nbytes(QT.Q4_K, (2, 256)) == 2 * 144  # sizes for every ggml type
    assert quants.tensor_nbytes(int(QT.F16), (5,)) == 10
    k_and_iq4 = {QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.IQ4_NL, QT.IQ4_XS}  # tests/test_kquant_quantize.py
    assert quants.QUANTIZE_TYPES == {QT.F32, QT.F16, QT.BF16, *BLOCK_TYPES, *k_and_iq4}
    assert quants.SUPPORTED_TYPES == quants.QUANTIZE_TYPES


@pytest.mark.parametrize(
    "call",
    [
        lambda: quants.quantize(np.zeros((2, 48), np.float32), QT.Q4_0),
        lambda: quants.quantize(np.zeros(32, np.float32), QT.Q4_K),  # not a whole super-block
        lambda: quants.dequantize(np.zeros(145, np.uint8), QT.Q4_K),  # not whole super-blocks
        lambda: quants.dequantize(np.zeros(66, np.uint8), QT.IQ2_XXS),  # a type we do not read
        lambda: quants.dequantize(np.zeros(35, np.uint8), QT.Q8_0),
        lambda: quants.row_bytes(QT.Q5_0, 33),
        lambda: quants.block_size(12345),
    ],
)
def test_clear_errors(call) -> None:
    with pytest.raises(HalfbyteError):
        call()


@pytest.mark.parametrize("qtype", sorted((t for t in quants.SUPPORTED_TYPES if t.name not in ("F32", "F16", "BF16")),
                                         key=int), ids=lambda t: t.name)
def test_embedding_rows_take_ggufs_numpy_dequantizer_with_the_kernels_bits(qtype) -> None:
    """A prompt's embedding rows are dequantized by gguf's numpy code (no compiling on a model's first
    run): the same bits as halfbyte's kernels, which whole tensors still take."""
    from gguf import GGML_QUANT_SIZES

    from engine.kernels import dequant_any
    from engine.weights import Weight

    block, _ = GGML_QUANT_SIZES[qtype]
    n = 2048 if 2048 % block == 0 else 8 * block
    rng = np.random.default_rng(int(qtype))
    x = (rng.standard_normal((300, n)) * rng.uniform(0.001, 4, (300, 1))).astype(np.float32)
    x[7] = 0  # all-zero blocks: zero scales
    raw = quants.quantize(x, qtype)
    kernels = quants.dequantize(raw, qtype).reshape(300, n)
    weight = Weight(qtype, n, 300, raw.reshape(300, -1))
    ids = np.array([7, 0, 299, 5, 5, 123])
    assert len(ids) * n <= dequant_any.NUMPY_ROWS_WEIGHTS < 300 * n or n < 2048
    np.testing.assert_array_equal(weight.rows(ids).view(np.uint32), kernels[ids].view(np.uint32))
    np.testing.assert_array_equal(weight.dequantize().view(np.uint32), kernels.view(np.uint32))
