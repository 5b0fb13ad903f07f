"""ggml's K-quants (Q4_K, Q5_K, Q6_K): read-only support, so files from llama-quantize run.

llama.cpp's own Q4_0 files keep ``output.weight`` in Q6_K, and its popular Q4_K_M / Q5_K_M
files mix Q4_K/Q5_K with Q6_K. halfbyte does not write these types; it reads them.

Super-blocks of 256 weights (ggml-quants.c, ``dequantize_row_q*_K``)::

    Q4_K (144 bytes): d:f16, dmin:f16, scales[12] (8 x 6-bit scale + 8 x 6-bit min), qs[128]
    Q5_K (176 bytes): d, dmin, scales[12], qh[32] (5th bits), qs[128]
    Q6_K (210 bytes): ql[128] (low 4 bits), qh[64] (high 2 bits), scales[16] (int8), d:f16

    Q4_K/Q5_K: w = d * scale_j * q - dmin * min_j   (j = 32-weight sub-block)
    Q6_K:      w = d * scale_j * (q - 32)            (j = 16-weight sub-block)

This module is the plain reference: dequantization (what ``engine.quants`` and the tests use) and
products that dequantize a few rows at a time into a float32 buffer and take float dots with the
float32 activations (no activation quantization): simple and exact to float rounding, 3.5-8.5x slower
than the integer SIMD products of kquant_simd.py (bench/bench_kquants.py), which run everywhere but on the
``HALFBYTE_KERNELS=reference`` path.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from numba import njit, prange

QK_K = 256
Q4_K = int(GGMLQuantizationType.Q4_K)
Q5_K = int(GGMLQuantizationType.Q5_K)
Q6_K = int(GGMLQuantizationType.Q6_K)
BLOCK_BYTES = {Q4_K: 144, Q5_K: 176, Q6_K: 210}
TYPES = (GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q5_K, GGMLQuantizationType.Q6_K)
ROWS_PER_TASK = 16


@njit(cache=True, inline="always")
def _f16(lo, hi) -> np.float32:
    """IEEE half from its two little-endian bytes (once per super-block, so scalar code is fine)."""
    bits = int(lo) | (int(hi) << 8)
    exponent = (bits >> 10) & 0x1F
    mantissa = bits & 0x3FF
    if exponent == 0:
        value = mantissa * 2.0**-24
    elif exponent == 31:
        value = np.inf if mantissa == 0 else np.nan
    else:
        value = (1024 + mantissa) * 2.0 ** (exponent - 25)
    return np.float32(-value if bits & 0x8000 else value)


@njit(cache=True, inline="always")
def _scale_min_k4(j, scales, o):
    """6-bit scale and min of sub-block j from the 12 packed bytes at scales[o:o+12]."""
    if j < 4:
        return scales[o + j] & 63, scales[o + j + 4] & 63
    sc = (scales[o + j + 4] & 0xF) | ((scales[o + j - 4] >> 6) << 4)
    mn = (scales[o + j + 4] >> 4) | ((scales[o + j] >> 6) << 4)
    return sc, mn


@njit(cache=True, fastmath={"reassoc", "contract"})
def _row_dot(kind, row, x, out, store):
    """One row of K-quant blocks: returns dot(row, x); with ``store`` also writes the dequantized
    row into ``out``. Inner loops run over 16 or 32 weights that share one scale, with the scale
    hoisted, so they vectorize (the plain per-element form ran at 0.6 GB/s, this at several)."""
    n_blocks = x.size // QK_K
    acc = np.float32(0.0)
    for b in range(n_blocks):
        y = b * QK_K
        if kind == Q6_K:
            o = b * 210
            d = _f16(row[o + 208], row[o + 209])
            for half in range(2):
                ql = o + 64 * half
                qh = o + 128 + 32 * half
                sc = o + 192 + 8 * half
                base = y + 128 * half
                for s in range(2):
                    d1 = d * np.float32(np.int8(row[sc + s]))
                    d2 = d * np.float32(np.int8(row[sc + s + 2]))
                    d3 = d * np.float32(np.int8(row[sc + s + 4]))
                    d4 = d * np.float32(np.int8(row[sc + s + 6]))
                    p1 = p2 = p3 = p4 = np.float32(0.0)
                    for l in range(16 * s, 16 * s + 16):
                        h = np.int32(row[qh + l])
                        a = np.int32(row[ql + l])
                        c = np.int32(row[ql + l + 32])
                        q1 = np.float32(((a & 0xF) | ((h & 3) << 4)) - 32)
                        q2 = np.float32(((c & 0xF) | (((h >> 2) & 3) << 4)) - 32)
                        q3 = np.float32(((a >> 4) | (((h >> 4) & 3) << 4)) - 32)
                        q4 = np.float32(((c >> 4) | (((h >> 6) & 3) << 4)) - 32)
                        if store:
                            out[base + l] = d1 * q1
                            out[base + l + 32] = d2 * q2
                            out[base + l + 64] = d3 * q3
                            out[base + l + 96] = d4 * q4
                        p1 += q1 * x[base + l]
                        p2 += q2 * x[base + l + 32]
                        p3 += q3 * x[base + l + 64]
                        p4 += q4 * x[base + l + 96]
                    acc += d1 * p1 + d2 * p2 + d3 * p3 + d4 * p4
        else:
            o = b * (144 if kind == Q4_K else 176)
            d = _f16(row[o], row[o + 1])
            dmin = _f16(row[o + 2], row[o + 3])
            qs = o + 16 if kind == Q4_K else o + 48
            qh = o + 16
            for pair in range(4):  # 64 weights: the low nibbles of 32 bytes, then their high nibbles
                sc1, m1 = _scale_min_k4(2 * pair, row, o + 4)
                sc2, m2 = _scale_min_k4(2 * pair + 1, row, o + 4)
                d1 = d * np.float32(sc1)
                d2 = d * np.float32(sc2)
                min1 = dmin * np.float32(m1)
                min2 = dmin * np.float32(m2)
                p1 = p2 = s1 = s2 = np.float32(0.0)
                base = y + 64 * pair
                for l in range(32):
                    q = np.int32(row[qs + 32 * pair + l])
                    lo = q & 0xF
                    hi = q >> 4
                    if kind == Q5_K:
                        h = np.int32(row[qh + l])
                        lo |= ((h >> (2 * pair)) & 1) << 4
                        hi |= ((h >> (2 * pair + 1)) & 1) << 4
                    flo = np.float32(lo)
                    fhi = np.float32(hi)
                    if store:
                        out[base + l] = d1 * flo - min1
                        out[base + 32 + l] = d2 * fhi - min2
                    p1 += flo * x[base + l]
                    p2 += fhi * x[base + 32 + l]
                    s1 += x[base + l]
                    s2 += x[base + 32 + l]
                acc += d1 * p1 - min1 * s1 + d2 * p2 - min2 * s2
    return acc


@njit(cache=True)
def _dequantize_row(kind, row, out):
    """One row of ggml blocks -> float32 ``out`` (its length = weights in the row)."""
    _row_dot(kind, row, out, out, True)  # x = out: the dot is thrown away, out is written first


@njit(cache=True)
def _dequantize_rows(kind, raw, out):
    for r in range(raw.shape[0]):
        _dequantize_row(kind, raw[r], out[r])


@njit(cache=True, parallel=True)
def _dequantize_rows_parallel(kind, raw, out):
    for r in prange(raw.shape[0]):
        _dequantize_row(kind, raw[r], out[r])


# Below this many weights, rows are dequantized on one thread: embedding lookups, whose first use
# then compiles in 1.3 s instead of the parallel version's 1.8 s (whole tensors, e.g. when
# requantizing, still take every thread).
SERIAL_DEQUANT_WEIGHTS = 1 << 22


@njit(cache=True, fastmath={"reassoc", "contract"})
def _dot(w, x):
    acc = np.float32(0.0)
    for i in range(x.size):
        acc += w[i] * x[i]
    return acc


@njit(cache=True, parallel=True)
def _matvec(kind, raw, x, y):
    empty = np.empty(0, np.float32)
    for r in prange(raw.shape[0]):
        y[r] = _row_dot(kind, raw[r], x, empty, False)


@njit(cache=True, parallel=True)
def _matmul(kind, raw, x, y, rows_per_task):
    """y[t, r] = dot(dequantized row r, x[t]) for x (n_tok, n_in): rows dequantized once per batch."""
    n_out = raw.shape[0]
    n_tok, n_in = x.shape
    n_tasks = (n_out + rows_per_task - 1) // rows_per_task
    for task in prange(n_tasks):
        r0 = task * rows_per_task
        n_rows = min(rows_per_task, n_out - r0)
        rows = np.empty((n_rows, n_in), np.float32)
        for i in range(n_rows):
            _dequantize_row(kind, raw[r0 + i], rows[i])
        for t in range(n_tok):
            for i in range(n_rows):
                y[t, r0 + i] = _dot(rows[i], x[t])


def dequantize(raw: np.ndarray, kind: int, n: int) -> np.ndarray:
    """Rows of ``raw`` (uint8 ``(n_rows, row_bytes)``) -> float32 ``(n_rows, n)``."""
    raw2 = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1, raw.shape[-1])
    out = np.empty((raw2.shape[0], n), np.float32)
    serial = raw2.shape[0] * n < SERIAL_DEQUANT_WEIGHTS
    (_dequantize_rows if serial else _dequantize_rows_parallel)(int(kind), raw2, out)
    return out


def matmul(kind: int, raw: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
    """``y = x W^T`` for K-quant weights ``raw`` (n_out, row_bytes), float32 x (n_tok, n_in)."""
    if x.shape[0] == 1:
        _matvec(int(kind), raw, x[0], y[0])
    else:
        _matmul(int(kind), raw, x, y, ROWS_PER_TASK)
