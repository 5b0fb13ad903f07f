"""Numba kernels for ggml's 32-element block formats Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and for BF16.

Every kernel repeats, operation for operation in float32, what ``gguf.quants`` (the Python
port of ggml-quants.c) computes, so the bytes are identical; ``engine.quants`` is the API.

Kernels take contiguous 1-D float32 values and a 2-D ``(n_blocks, type_size)`` uint8 view
of the packed blocks (or the reverse to dequantize); blocks are independent, so the block
loop is a ``prange`` and the result does not depend on the thread count.

Details that decide bytes (all from the gguf reference):

* The scale is computed in float32 (``max / -8``, ``(max - min) / 15``, ``amax / 127``),
  its inverse is ``0 if d == 0 else 1 / d`` and the stored scale is ``d`` rounded to fp16
  (round-to-nearest-even, overflow to inf), exactly numpy's ``astype(np.float16)``.
* Codes are ``trunc(x * id + 8.5)`` (Q4_0), ``trunc((x - min) * id + 0.5)`` (Q4_1) and
  C ``roundf`` (half away from zero) of ``x * id`` (Q8_0), then a float -> 8-bit cast,
  then the clamp to the top code.
* That cast, for values outside the 8-bit range, is numpy's on x86-64: a C cast through
  int32 keeping the low byte, where NaN, +-inf and anything beyond int32 give 0.  It is
  reached by NaN/inf input and by blocks whose scale is subnormal (``1 / d`` overflows).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

QK = 32  # elements per block of every Q* format here
_TWO_POW_31 = np.float32(2147483648.0)
_CANONICAL_NAN = np.uint32(0x7FC00000).view(np.float32)  # what numpy's max()/min() return on NaN
_ABS_MASK = np.int32(0x7FFFFFFF)  # float32 bits without the sign
_INF_BITS = np.int32(0x7F800000)  # |x| bits above this are NaN


@njit(cache=True, inline="always")
def _cast_low_byte(value):
    """numpy's float32 -> uint8/int8 cast on x86-64, as an int in 0..255 (see module doc)."""
    if abs(value) < _TWO_POW_31:  # False for NaN
        return np.int32(value) & 0xFF
    return 0  # int32 "indefinite" 0x80000000, or a multiple of 256: low byte 0


@njit(cache=True, inline="always")
def _roundf_low_byte(value):
    """Low byte of C ``roundf(value)`` (half away from zero) cast like ``_cast_low_byte``.
    Written with selects, not branches, so that LLVM vectorizes the loop around it."""
    magnitude = abs(value)
    in_range = magnitude < _TWO_POW_31  # False for NaN
    whole = np.int32(value) if in_range else np.int32(0)  # truncation toward zero
    step = np.int32(1) if value > 0 else np.int32(-1)
    rounded = whole + step if magnitude - abs(np.float32(whole)) >= np.float32(0.5) else whole
    return (rounded if in_range else np.int32(0)) & 0xFF


@njit(cache=True)
def f32_to_f16_bits(value):
    """Bits of ``np.float32(value).astype(np.float16)``: numpy's own (software) conversion,
    round-to-nearest-even, overflow to +-inf, NaN payload kept (``>> 13``), never turned into inf."""
    bits = np.uint32(np.float32(value).view(np.uint32))
    sign = (bits >> 16) & 0x8000
    exponent = bits & 0x7F800000
    mantissa = bits & 0x007FFFFF
    if exponent >= 0x47800000:  # |value| >= 2**16: inf, NaN or overflow
        if exponent == 0x7F800000 and mantissa != 0:
            half = 0x7C00 + (mantissa >> 13)
            return sign | (half + 1 if half == 0x7C00 else half)
        return sign | 0x7C00
    if exponent <= 0x38000000:  # |value| < 2**-14: fp16 subnormal or zero
        biased = exponent >> 23
        if biased < 102:  # below half of the smallest fp16 subnormal
            return sign
        significand = mantissa | 0x00800000
        shift = 126 - biased
        half = significand >> shift
        rest = significand & ((1 << shift) - 1)
        tie = 1 << (shift - 1)
        if rest > tie or (rest == tie and (half & 1) == 1):
            half += 1
        return sign | half
    half = ((exponent - 0x38000000) >> 13) + (mantissa >> 13)  # rebias 127 -> 15
    rest = mantissa & 0x1FFF
    if rest > 0x1000 or (rest == 0x1000 and (half & 1) == 1):
        half += 1  # a carry into the exponent is right, up to 0x7C00 = inf
    return sign | half


@njit(cache=True, parallel=True)
def f32_to_f16_bits_array(values, out):
    """Vector form of ``f32_to_f16_bits`` (tests check it against numpy)."""
    for i in prange(values.size):
        out[i] = f32_to_f16_bits(values[i])


@njit(cache=True, inline="always")
def _store_f16(blocks, block, offset, value):
    bits = f32_to_f16_bits(value)
    blocks[block, offset] = bits & 0xFF
    blocks[block, offset + 1] = bits >> 8


@njit(cache=True, inline="always")
def _load_f16(blocks, block, offset, f16_to_f32):
    return f16_to_f32[np.int64(blocks[block, offset]) | (np.int64(blocks[block, offset + 1]) << 8)]


@njit(cache=True, inline="always")
def _signed_absmax(values, bits, base):
    """``values[argmax(abs(block))]`` like numpy: the first maximum, or the first NaN if any.

    Branch-free for speed: for non-NaN floats the order of |x| is the order of the integer
    ``bits & 0x7FFFFFFF``, so one integer max over ``(|x| bits << 5) | (31 - j)`` finds the
    largest |x| and, on ties, the smallest j."""
    key = np.int64(0)
    for j in range(QK):
        key = max(key, (np.int64(bits[base + j] & _ABS_MASK) << 5) | (QK - 1 - j))
    if (key >> 5) <= _INF_BITS:
        return values[base + QK - 1 - (key & (QK - 1))]
    for j in range(base, base + QK):  # a NaN: numpy's argmax returns the first one
        if values[j] != values[j]:
            return values[j]
    return values[base]  # unreachable


@njit(cache=True, inline="always")
def _absmax(bits, base):
    """``max(abs(block))``; the canonical NaN if the block holds a NaN (numpy's usual answer,
    see ``engine.quants``). Integer max of the |x| bits: branch-free and vectorizable."""
    top = np.int32(0)
    for j in range(base, base + QK):
        top = max(top, bits[j] & _ABS_MASK)
    return np.int32(top).view(np.float32) if top <= _INF_BITS else _CANONICAL_NAN


@njit(cache=True, inline="always")
def _min_max(values, base):
    """Block min and max. Any NaN gives the canonical NaN for both (numpy's usual answer);
    ties between -0.0 and +0.0 keep the first, as ggml's C loop (numpy's depends on its SIMD
    reduction order)."""
    low = values[base]
    high = low
    seen_nan = low != low
    for j in range(base + 1, base + QK):
        value = values[j]
        seen_nan |= value != value
        if value < low:
            low = value
        if value > high:
            high = value
    if seen_nan:
        return _CANONICAL_NAN, _CANONICAL_NAN
    return low, high


@njit(cache=True, inline="always")
def _inverse(scale):
    return np.float32(0.0) if scale == 0 else np.float32(1.0) / scale


# ---------------------------------------------------------------------------- quantize


@njit(cache=True, parallel=True)
def quantize_q8_0(values, blocks):
    """block_q8_0: fp16 d, then 32 int8 ``roundf(x / d)``."""
    bits = values.view(np.int32)
    for block in prange(blocks.shape[0]):
        base = block * QK
        amax = _absmax(bits, base)
        scale = amax / np.float32(127.0)
        inverse = _inverse(scale)
        _store_f16(blocks, block, 0, scale)
        for j in range(QK):
            blocks[block, 2 + j] = _roundf_low_byte(values[base + j] * inverse)


@njit(cache=True, parallel=True)
def quantize_q4_0(values, blocks):
    """block_q4_0: fp16 d, then 16 bytes: element j in the low nibble, j + 16 in the high one."""
    bits = values.view(np.int32)
    for block in prange(blocks.shape[0]):
        base = block * QK
        scale = _signed_absmax(values, bits, base) / np.float32(-8.0)
        inverse = _inverse(scale)
        _store_f16(blocks, block, 0, scale)
        for j in range(QK // 2):
            low = min(_cast_low_byte(values[base + j] * inverse + np.float32(8.5)), 15)
            high = min(_cast_low_byte(values[base + j + 16] * inverse + np.float32(8.5)), 15)
            blocks[block, 2 + j] = low | (high << 4)


@njit(cache=True, parallel=True)
def quantize_q4_1(values, blocks):
    """block_q4_1: fp16 d, fp16 m (the block min), then 16 nibble bytes as in Q4_0."""
    for block in prange(blocks.shape[0]):
        base = block * QK
        low_value, high_value = _min_max(values, base)
        scale = (high_value - low_value) / np.float32(15.0)
        inverse = _inverse(scale)
        _store_f16(blocks, block, 0, scale)
        _store_f16(blocks, block, 2, low_value)
        for j in range(QK // 2):
            low = min(_cast_low_byte((values[base + j] - low_value) * inverse + np.float32(0.5)), 15)
            high = min(_cast_low_byte((values[base + j + 16] - low_value) * inverse + np.float32(0.5)), 15)
            blocks[block, 4 + j] = low | (high << 4)


@njit(cache=True, inline="always")
def _store_q5_codes(blocks, block, offset, j, low, high, high_bits):
    """Nibbles of codes j and j + 16 into qs, their 5th bits into the qh word; returns qh."""
    blocks[block, offset + 4 + j] = (low & 0x0F) | ((high & 0x0F) << 4)
    return high_bits | ((low >> 4) << j) | ((high >> 4) << (j + 16))


@njit(cache=True, inline="always")
def _store_u32(blocks, block, offset, word):
    for k in range(4):
        blocks[block, offset + k] = (word >> (8 * k)) & 0xFF


@njit(cache=True, parallel=True)
def quantize_q5_0(values, blocks):
    """block_q5_0: fp16 d, uint32 qh (bit j = 5th bit of code j), then 16 nibble bytes."""
    bits = values.view(np.int32)
    for block in prange(blocks.shape[0]):
        base = block * QK
        scale = _signed_absmax(values, bits, base) / np.float32(-16.0)
        inverse = _inverse(scale)
        _store_f16(blocks, block, 0, scale)
        high_bits = 0
        for j in range(QK // 2):
            low = min(_cast_low_byte(values[base + j] * inverse + np.float32(16.5)), 31)
            high = min(_cast_low_byte(values[base + j + 16] * inverse + np.float32(16.5)), 31)
            high_bits = _store_q5_codes(blocks, block, 2, j, low, high, high_bits)
        _store_u32(blocks, block, 2, high_bits)


@njit(cache=True, parallel=True)
def quantize_q5_1(values, blocks):
    """block_q5_1: fp16 d, fp16 m, uint32 qh, then 16 nibble bytes."""
    for block in prange(blocks.shape[0]):
        base = block * QK
        low_value, high_value = _min_max(values, base)
        scale = (high_value - low_value) / np.float32(31.0)
        inverse = _inverse(scale)
        _store_f16(blocks, block, 0, scale)
        _store_f16(blocks, block, 2, low_value)
        high_bits = 0
        for j in range(QK // 2):
            low = min(_cast_low_byte((values[base + j] - low_value) * inverse + np.float32(0.5)), 31)
            high = min(_cast_low_byte((values[base + j + 16] - low_value) * inverse + np.float32(0.5)), 31)
            high_bits = _store_q5_codes(blocks, block, 4, j, low, high, high_bits)
        _store_u32(blocks, block, 4, high_bits)


@njit(cache=True, parallel=True)
def quantize_bf16(values, blocks):
    """ggml_compute_fp32_to_bf16: NaN -> quiet NaN (top bits | 0x40), else round to nearest even."""
    for i in prange(values.size):
        bits = np.uint32(np.float32(values[i]).view(np.uint32))
        if (bits & 0x7FFFFFFF) > 0x7F800000:
            half = (bits >> 16) | 0x40
        else:
            half = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16  # at most 0xFF80: fits
        blocks[i, 0] = half & 0xFF
        blocks[i, 1] = (half >> 8) & 0xFF


# -------------------------------------------------------------------------- dequantize


@njit(cache=True, parallel=True)
def dequantize_q8_0(blocks, f16_to_f32, values):
    for block in prange(blocks.shape[0]):
        base = block * QK
        scale = _load_f16(blocks, block, 0, f16_to_f32)
        for j in range(QK):
            values[base + j] = np.float32(np.int8(blocks[block, 2 + j])) * scale


@njit(cache=True, parallel=True)
def dequantize_q4_0(blocks, f16_to_f32, values):
    for block in prange(blocks.shape[0]):
        base = block * QK
        scale = _load_f16(blocks, block, 0, f16_to_f32)
        for j in range(QK // 2):
            packed = np.int32(blocks[block, 2 + j])
            values[base + j] = scale * np.float32((packed & 0x0F) - 8)
            values[base + j + 16] = scale * np.float32((packed >> 4) - 8)


@njit(cache=True, inline="always")
def _affine(scale, code, offset):
    """``scale * code + offset`` with numpy's NaN: when both terms are NaN, x86 returns the first
    operand's, but LLVM may swap the operands of a (commutative) fadd, so pick it explicitly."""
    product = scale * np.float32(code)
    return product + offset if product == product else product


@njit(cache=True, parallel=True)
def dequantize_q4_1(blocks, f16_to_f32, values):
    for block in prange(blocks.shape[0]):
        base = block * QK
        scale = _load_f16(blocks, block, 0, f16_to_f32)
        offset = _load_f16(blocks, block, 2, f16_to_f32)
        for j in range(QK // 2):
            packed = np.int32(blocks[block, 4 + j])
            values[base + j] = _affine(scale, packed & 0x0F, offset)
            values[base + j + 16] = _affine(scale, packed >> 4, offset)


@njit(cache=True, inline="always")
def _load_u32(blocks, block, offset):
    word = np.int64(0)
    for k in range(4):
        word |= np.int64(blocks[block, offset + k]) << (8 * k)
    return word


@njit(cache=True, parallel=True)
def dequantize_q5_0(blocks, f16_to_f32, values):
    for block in prange(blocks.shape[0]):
        base = block * QK
        scale = _load_f16(blocks, block, 0, f16_to_f32)
        high_bits = _load_u32(blocks, block, 2)
        for j in range(QK // 2):
            packed = np.int64(blocks[block, 6 + j])
            low = (packed & 0x0F) | (((high_bits >> j) & 1) << 4)
            high = (packed >> 4) | (((high_bits >> (j + 16)) & 1) << 4)
            values[base + j] = scale * np.float32(low - 16)
            values[base + j + 16] = scale * np.float32(high - 16)


@njit(cache=True, parallel=True)
def dequantize_q5_1(blocks, f16_to_f32, values):
    for block in prange(blocks.shape[0]):
        base = block * QK
        scale = _load_f16(blocks, block, 0, f16_to_f32)
        offset = _load_f16(blocks, block, 2, f16_to_f32)
        high_bits = _load_u32(blocks, block, 4)
        for j in range(QK // 2):
            packed = np.int64(blocks[block, 8 + j])
            low = (packed & 0x0F) | (((high_bits >> j) & 1) << 4)
            high = (packed >> 4) | (((high_bits >> (j + 16)) & 1) << 4)
            values[base + j] = _affine(scale, low, offset)
            values[base + j + 16] = _affine(scale, high, offset)


@njit(cache=True, parallel=True)
def dequantize_bf16(blocks, f16_to_f32, values):
    """bf16 bits are the top half of the float32 bits (``f16_to_f32`` unused: same signature)."""
    for i in prange(blocks.shape[0]):
        bits = (np.uint32(blocks[i, 0]) | (np.uint32(blocks[i, 1]) << 8)) << 16
        values[i] = np.uint32(bits).view(np.float32)
