"""Weight-matrix products, computed on the memory-mapped weights in place.

A weight of ggml type T and ggml shape ``ne = [n_in, n_out]`` stays in its file layout:
``n_out`` rows of ``n_in / block_size`` ggml blocks. Two products are provided:

* ``matvec(w, x)``: ``y = W x`` for one token (the decode step), parallel over rows;
* ``matmul(w, X)``: ``Y = X W^T`` for a batch of tokens (prompt processing). Each
  task unpacks (or widens) 16 weight rows once and dots them with every token, so the
  weights are read from memory once per batch instead of once per token. A batch of
  one token goes through ``matvec``.

Quantized weights follow ggml: the activations are quantized once per call to 8 bits
per 32-block (Q8_0 for Q4_0/Q5_0/Q8_0; Q8_1, i.e. with the block sum ``s = d * sum(q)``,
for Q4_1/Q5_1), every block's dot product is an exact integer, and the float scales
are applied per block::

    Q4_0/Q5_0/Q8_0:  y += (d_w * d_x) * sum_j(q_w[j] * q_x[j])
    Q4_1/Q5_1:       y += (d_w * d_x) * sum_j(q_w[j] * q_x[j]) + m_w * s_x

(``q_w`` is the signed ``q - 8`` / ``q - 16`` for Q4_0/Q5_0 and the unsigned ``q`` for
the ``_1`` types.) F32/F16/BF16 weights use float dots with float32 accumulation on
float32 activations.

The per-type block code (``_row_dot_<type>`` for matvec, ``_unpack_<type>`` for
matmul, selected by the ``kind`` branches in ``_matvec_quant``/``_matmul_quant``) is the
single dispatch point per type and the plain reference an explicit-SIMD version must
reproduce. Plain Numba code only vectorizes well with LLVM's SLP
vectorizer, which Numba leaves off by default, so the kernels are compiled with it
switched on (``_call``); see the notes there.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numba
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload

from engine.errors import HalfbyteError
from engine.kernels import dequant_any, iquant_simd, kquant_gemm, kquant_simd, kquants, simd

QK = 32  # elements per block of every type handled here (and of the Q8_0/Q8_1 activations)

# Type codes passed into kernels (plain ints, so one compiled kernel serves every type).
F32 = int(GGMLQuantizationType.F32)
F16 = int(GGMLQuantizationType.F16)
BF16 = int(GGMLQuantizationType.BF16)
Q4_0 = int(GGMLQuantizationType.Q4_0)
Q4_1 = int(GGMLQuantizationType.Q4_1)
Q5_0 = int(GGMLQuantizationType.Q5_0)
Q5_1 = int(GGMLQuantizationType.Q5_1)
Q8_0 = int(GGMLQuantizationType.Q8_0)
IQ4_NL = int(GGMLQuantizationType.IQ4_NL)

FLOAT_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)
QUANT_TYPES = (
    GGMLQuantizationType.Q4_0,
    GGMLQuantizationType.Q4_1,
    GGMLQuantizationType.Q5_0,
    GGMLQuantizationType.Q5_1,
    GGMLQuantizationType.Q8_0,
)
# K-quants: integer SIMD products in engine/kernels/kquant_simd.py (IQ4_XS, Q2_K, Q3_K too),
# float reference products in engine/kernels/kquants.py.
K_QUANT_TYPES = (GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q5_K, GGMLQuantizationType.Q6_K)
# Types multiplied by dequantizing a chunk of rows to float32 (bounded scratch) and taking float dots:
# halfbyte's own dequantizers for these (engine.kernels.kquant_quantize) ...
DEQUANT_TYPES = (GGMLQuantizationType.Q2_K, GGMLQuantizationType.Q3_K, GGMLQuantizationType.IQ4_NL,
                 GGMLQuantizationType.IQ4_XS)
# ... and gguf.quants' numpy dequantizers for the types only llama.cpp writes (slow but correct): the
# "reference" path of the grid and ternary types (integer products in engine/kernels/iquant_simd.py),
# and the whole path of MXFP4/NVFP4.
GGUF_DEQUANT_TYPES = tuple(
    t for t in (getattr(GGMLQuantizationType, name, None) for name in (
        "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M", "TQ1_0", "TQ2_0", "MXFP4", "NVFP4"))
    if t is not None and dequant_any.can_dequantize(t))
SUPPORTED_TYPES = FLOAT_TYPES + QUANT_TYPES + K_QUANT_TYPES + DEQUANT_TYPES + GGUF_DEQUANT_TYPES

# Weight rows unpacked together by one matmul task: 16 rows of int8 for n_in = 11008
# is 176 KiB, which stays in L2 while every token of the batch is dotted with them.
ROWS_PER_TASK = 16

# ---------------------------------------------------------------------------------------------
# Number formats Numba lacks: IEEE half (ggml's scales, F16 weights, the fp16 KV cache) and
# bfloat16. These compile to single instructions (vcvtph2ps / vcvtps2ph with F16C) and vectorize.
# ---------------------------------------------------------------------------------------------


def _as_int16(builder: Any, value: Any, bitwidth: int) -> Any:
    if bitwidth > 16:
        return builder.trunc(value, ir.IntType(16))
    if bitwidth < 16:
        return builder.zext(value, ir.IntType(16))
    return value


@intrinsic
def f16_to_f32(typingctx, bits):
    """IEEE half given as its 16 bits (any integer type; low 16 bits used) -> float32, exactly."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        half = builder.bitcast(_as_int16(builder, args[0], bits.bitwidth), ir.HalfType())
        return builder.fpext(half, ir.FloatType())

    return types.float32(bits), codegen


@intrinsic
def f32_to_f16(typingctx, value):
    """float32 -> IEEE half bits (uint16), rounding to nearest even like ggml and numpy."""
    if not isinstance(value, types.Float):
        return None

    def codegen(context, builder, signature, args):
        v = args[0]
        if value.bitwidth == 64:
            v = builder.fptrunc(v, ir.FloatType())
        return builder.bitcast(builder.fptrunc(v, ir.HalfType()), ir.IntType(16))

    return types.uint16(value), codegen


@intrinsic
def bf16_to_f32(typingctx, bits):
    """bfloat16 given as its 16 bits -> float32 (exact: the bits are the float's top half)."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        word = builder.zext(_as_int16(builder, args[0], bits.bitwidth), ir.IntType(32))
        return builder.bitcast(builder.shl(word, ir.Constant(ir.IntType(32), 16)), ir.FloatType())

    return types.float32(bits), codegen


def to_f32(value):  # pragma: no cover - only the overload below runs, inside jitted code
    """An element of a float array, or of a uint16 array of IEEE half bits, as float32."""
    raise NotImplementedError


@overload(to_f32, inline="always")
def _to_f32_overload(value):
    if isinstance(value, types.Float):
        return lambda value: np.float32(value)
    if isinstance(value, types.Integer):
        return lambda value: f16_to_f32(value)
    return None


# ---------------------------------------------------------------------------------------------
# Compiling with the SLP vectorizer
# ---------------------------------------------------------------------------------------------
#
# The per-block integer dots below are short fixed-length loops that LLVM fully unrolls;
# only the SLP ("straight-line") vectorizer turns them into SIMD code (vpmaddwd & co.),
# 5-10x faster than scalar. Numba disables SLP by default (numba#8705, a miscompile with
# LLVM 11; Numba 0.68 runs LLVM 22 through llvmlite 0.50) and reads the setting each time it builds an
# optimization pipeline, so we switch it on around our own kernel calls, where any
# compilation of our kernels happens, and restore it afterwards. The tests compare every
# kernel against a plain reference, which is what guards against miscompilation.


_slp_lock = threading.Lock()
_slp_users = 0  # kernel calls in progress (any thread) that asked for SLP
_slp_saved = 0  # the setting to restore when the last of them returns


_slp_scope = threading.local()  # .depth > 0: this thread holds SLP on (see slp_scope)


def _slp_enter() -> None:
    global _slp_users, _slp_saved
    with _slp_lock:
        if _slp_users == 0:
            _slp_saved = numba.core.config.SLP_VECTORIZE
            numba.core.config.SLP_VECTORIZE = 1
        _slp_users += 1


def _slp_exit() -> None:
    global _slp_users
    with _slp_lock:
        _slp_users -= 1
        if _slp_users == 0:
            numba.core.config.SLP_VECTORIZE = _slp_saved


@contextlib.contextmanager
def slp_scope() -> Iterator[None]:
    """Keep SLP on for a whole evaluation (a model's forward pass makes hundreds of kernel
    calls): inside, ``_call`` skips its per-call bookkeeping."""
    depth = getattr(_slp_scope, "depth", 0)
    if depth == 0:
        _slp_enter()
    _slp_scope.depth = depth + 1
    try:
        yield
    finally:
        _slp_scope.depth = depth
        if depth == 0:
            _slp_exit()


def _call(kernel: Callable[..., Any], *args: Any) -> Any:
    """Run ``kernel(*args)`` with SLP vectorization on for any compilation it triggers.

    Kernels must only be called through here: a kernel first compiled without SLP would
    be cached on disk (``cache=True``) in its slow form.
    """
    if getattr(_slp_scope, "depth", 0):
        return kernel(*args)
    _slp_enter()
    try:
        return kernel(*args)
    finally:
        _slp_exit()


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightView:
    """A weight matrix in its file layout: ``n_out`` rows of ``n_in`` inputs.

    ``data`` is a read-only view, never a copy: uint8 ``(n_out, row_bytes)`` for block
    types, float32 ``(n_out, n_in)`` for F32, uint16 bits ``(n_out, n_in)`` for F16/BF16.
    """

    ggml_type: GGMLQuantizationType
    n_in: int
    n_out: int
    data: np.ndarray

    @classmethod
    def from_raw(cls, ggml_type: GGMLQuantizationType | int, ne: tuple[int, ...] | list[int],
                 raw: np.ndarray) -> WeightView:
        """Wrap ``raw`` (as the GGUF reader returns it) of ggml type/shape ``ne = [n_in, n_out]``."""
        try:
            qtype = GGMLQuantizationType(int(ggml_type))
        except ValueError:
            raise HalfbyteError(f"unknown ggml type {ggml_type!r}") from None
        if qtype not in SUPPORTED_TYPES:
            names = ", ".join(t.name for t in SUPPORTED_TYPES)
            raise HalfbyteError(f"matrix products do not support ggml type {qtype.name} (supported: {names})")
        dims = [int(n) for n in ne]
        while len(dims) > 2 and dims[-1] == 1:
            dims.pop()
        if len(dims) != 2 or min(dims) < 1:
            raise HalfbyteError(f"a weight matrix needs a 2-D ggml shape [n_in, n_out], got {list(ne)}")
        n_in, n_out = dims
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        if n_in % block_size:
            raise HalfbyteError(f"{qtype.name} rows must be a multiple of {block_size} long, got n_in={n_in}")
        row_bytes = n_in // block_size * type_size
        raw = np.asarray(raw)
        if raw.nbytes != n_out * row_bytes:
            raise HalfbyteError(
                f"{qtype.name} weight of shape {[n_in, n_out]} needs {n_out * row_bytes} bytes, got {raw.nbytes}"
            )
        if not raw.flags.c_contiguous:
            raise HalfbyteError("weight data must be C-contiguous (a view of the file, not a strided slice)")
        if qtype == GGMLQuantizationType.F32:
            dtype = np.float32
        elif qtype in (GGMLQuantizationType.F16, GGMLQuantizationType.BF16):
            dtype = np.uint16
        else:
            dtype = np.uint8
        expected = {np.dtype(np.uint8), np.dtype(dtype)}
        if qtype == GGMLQuantizationType.F16:
            expected.add(np.dtype(np.float16))
        if raw.dtype not in expected:
            raise HalfbyteError(f"{qtype.name} weight data must be one of {sorted(str(d) for d in expected)}, "
                                f"got {raw.dtype}")
        data = raw.reshape(-1).view(dtype).reshape(n_out, -1)
        # Always read-only (the mmap is): one compiled kernel specialization for files and tests.
        data = data.view()
        data.flags.writeable = False
        return cls(qtype, n_in, n_out, data)

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)


# ---------------------------------------------------------------------------------------------
# Activation quantization (ggml quantize_row_q8_0 / quantize_row_q8_1, reference versions)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantizedActivations:
    """Activations as Q8_0 / Q8_1 blocks, unpacked: ``qs`` int8 ``(n_tok, n_in)``, per-block
    fp16 scales ``d`` and Q8_1 sums ``s = fp16(d * sum(qs))`` (both as float32, ``(n_tok, n_in/32)``).
    """

    qs: np.ndarray
    d: np.ndarray
    s: np.ndarray


@njit(cache=True, inline="always")
def _roundf(v):
    """C ``roundf`` (half away from zero) on float32, exactly, like ggml's reference quantizer."""
    a = abs(v)
    r = np.floor(a)
    r += np.floor(np.float32(2.0) * (a - r))
    return -r if v < 0 else r


@njit(cache=True)
def _quantize_q8_kernel(x, qs, d, s):
    n_tok, n_in = x.shape
    for t in range(n_tok):
        for b in range(n_in // QK):
            o = b * QK
            amax = np.float32(0.0)
            for j in range(QK):
                amax = max(amax, abs(x[t, o + j]))
            scale = amax / np.float32(127.0)
            inv = np.float32(1.0) / scale if scale != 0 else np.float32(0.0)
            total = 0
            for j in range(QK):
                q = np.int32(_roundf(x[t, o + j] * inv))
                qs[t, o + j] = q
                total += q
            # ggml stores d and s as fp16 and converts them back for the dot product.
            d[t, b] = f16_to_f32(f32_to_f16(scale))
            s[t, b] = f16_to_f32(f32_to_f16(np.float32(total) * scale))


def quantize_activations(x: np.ndarray) -> QuantizedActivations:
    """Quantize float32 activations ``(n_tok, n_in)`` (or ``(n_in,)``) to Q8_0/Q8_1 blocks, like ggml."""
    x2 = np.ascontiguousarray(x, dtype=np.float32)
    if x2.ndim == 1:
        x2 = x2.reshape(1, -1)
    n_tok, n_in = x2.shape
    if n_in % QK:
        raise HalfbyteError(f"activations to quantize must be a multiple of {QK} long, got {n_in}")
    qs = np.empty((n_tok, n_in), np.int8)
    d = np.empty((n_tok, n_in // QK), np.float32)
    s = np.empty((n_tok, n_in // QK), np.float32)
    _call(_quantize_q8_kernel, x2, qs, d, s)
    return QuantizedActivations(qs, d, s)


# ---------------------------------------------------------------------------------------------
# Per-type block code. Byte layouts (ggml): Q8_0 = d:f16, qs:i8[32]; Q4_0 = d, qs:u8[16]
# (element j < 16 is the low nibble of qs[j], element j+16 its high nibble); Q4_1 = d, m, qs;
# Q5_0 = d, qh:u32 (bit j is bit 4 of element j), qs; Q5_1 = d, m, qh, qs.
#
# Integer sums are truncated to int32 at the end: that is what lets LLVM narrow Numba's
# 64-bit integer arithmetic to 16/32-bit vector lanes. Every block sum fits easily
# (|sum| <= 32 * 128 * 128).
# ---------------------------------------------------------------------------------------------


@njit(cache=True, inline="always")
def _f16_at(row, o):
    return f16_to_f32(np.uint16(row[o]) | (np.uint16(row[o + 1]) << np.uint16(8)))


@njit(cache=True, inline="always")
def _u32_at(row, o):
    return (np.uint32(row[o]) | (np.uint32(row[o + 1]) << np.uint32(8))
            | (np.uint32(row[o + 2]) << np.uint32(16)) | (np.uint32(row[o + 3]) << np.uint32(24)))


@njit(cache=True)
def _row_dot_q8_0(row, xq, xd, nb):
    acc = np.float32(0.0)
    for b in range(nb):
        o = b * 34
        isum = 0
        for j in range(QK):
            isum += np.int8(row[o + 2 + j]) * xq[b * QK + j]
        acc += (_f16_at(row, o) * xd[b]) * np.float32(np.int32(isum))
    return acc


@njit(cache=True)
def _row_dot_q4_0(row, xq, xd, nb):
    acc = np.float32(0.0)
    for b in range(nb):
        o = b * 18
        isum = 0
        for j in range(16):
            q = row[o + 2 + j]
            isum += (np.int8(q & 15) - np.int8(8)) * xq[b * QK + j]
            isum += (np.int8(q >> 4) - np.int8(8)) * xq[b * QK + 16 + j]
        acc += (_f16_at(row, o) * xd[b]) * np.float32(np.int32(isum))
    return acc


@njit(cache=True)
def _row_dot_q4_1(row, xq, xd, xs, nb):
    acc = np.float32(0.0)
    for b in range(nb):
        o = b * 20
        isum = 0
        for j in range(16):
            q = row[o + 4 + j]
            isum += np.int8(q & 15) * xq[b * QK + j]
            isum += np.int8(q >> 4) * xq[b * QK + 16 + j]
        acc += (_f16_at(row, o) * xd[b]) * np.float32(np.int32(isum)) + _f16_at(row, o + 2) * xs[b]
    return acc


@njit(cache=True)
def _row_dot_q5_0(row, xq, xd, nb):
    acc = np.float32(0.0)
    for b in range(nb):
        o = b * 22
        qh = _u32_at(row, o + 2)
        isum = 0
        for j in range(16):
            q = row[o + 6 + j]
            lo = np.int8((q & 15) | ((qh >> j) & 1) << 4) - np.int8(16)
            hi = np.int8((q >> 4) | ((qh >> (j + 16)) & 1) << 4) - np.int8(16)
            isum += lo * xq[b * QK + j] + hi * xq[b * QK + 16 + j]
        acc += (_f16_at(row, o) * xd[b]) * np.float32(np.int32(isum))
    return acc


@njit(cache=True)
def _row_dot_q5_1(row, xq, xd, xs, nb):
    acc = np.float32(0.0)
    for b in range(nb):
        o = b * 24
        qh = _u32_at(row, o + 4)
        isum = 0
        for j in range(16):
            q = row[o + 8 + j]
            lo = np.int8((q & 15) | ((qh >> j) & 1) << 4)
            hi = np.int8((q >> 4) | ((qh >> (j + 16)) & 1) << 4)
            isum += lo * xq[b * QK + j] + hi * xq[b * QK + 16 + j]
        acc += (_f16_at(row, o) * xd[b]) * np.float32(np.int32(isum)) + _f16_at(row, o + 2) * xs[b]
    return acc


@njit(cache=True)
def _unpack_q8_0(row, nb, wq, wd, wm):
    for b in range(nb):
        o = b * 34
        wd[b] = _f16_at(row, o)
        for j in range(QK):
            wq[b * QK + j] = np.int8(row[o + 2 + j])


@njit(cache=True)
def _unpack_q4_0(row, nb, wq, wd, wm):
    for b in range(nb):
        o = b * 18
        wd[b] = _f16_at(row, o)
        for j in range(16):
            q = row[o + 2 + j]
            wq[b * QK + j] = np.int8(q & 15) - np.int8(8)
            wq[b * QK + 16 + j] = np.int8(q >> 4) - np.int8(8)


@njit(cache=True)
def _unpack_q4_1(row, nb, wq, wd, wm):
    for b in range(nb):
        o = b * 20
        wd[b] = _f16_at(row, o)
        wm[b] = _f16_at(row, o + 2)
        for j in range(16):
            q = row[o + 4 + j]
            wq[b * QK + j] = np.int8(q & 15)
            wq[b * QK + 16 + j] = np.int8(q >> 4)


@njit(cache=True)
def _unpack_q5_0(row, nb, wq, wd, wm):
    for b in range(nb):
        o = b * 22
        wd[b] = _f16_at(row, o)
        qh = _u32_at(row, o + 2)
        for j in range(16):
            q = row[o + 6 + j]
            wq[b * QK + j] = np.int8((q & 15) | ((qh >> j) & 1) << 4) - np.int8(16)
            wq[b * QK + 16 + j] = np.int8((q >> 4) | ((qh >> (j + 16)) & 1) << 4) - np.int8(16)


@njit(cache=True)
def _unpack_q5_1(row, nb, wq, wd, wm):
    for b in range(nb):
        o = b * 24
        wd[b] = _f16_at(row, o)
        wm[b] = _f16_at(row, o + 2)
        qh = _u32_at(row, o + 4)
        for j in range(16):
            q = row[o + 8 + j]
            wq[b * QK + j] = np.int8((q & 15) | ((qh >> j) & 1) << 4)
            wq[b * QK + 16 + j] = np.int8((q >> 4) | ((qh >> (j + 16)) & 1) << 4)


@njit(cache=True)
def _unpacked_dot(wq, wd, xq, xd, nb):
    acc = np.float32(0.0)
    for b in range(nb):
        isum = 0
        for j in range(QK):
            isum += wq[b * QK + j] * xq[b * QK + j]
        acc += (wd[b] * xd[b]) * np.float32(np.int32(isum))
    return acc


@njit(cache=True)
def _unpacked_dot_min(wq, wd, wm, xq, xd, xs, nb):
    acc = np.float32(0.0)
    for b in range(nb):
        isum = 0
        for j in range(QK):
            isum += wq[b * QK + j] * xq[b * QK + j]
        acc += (wd[b] * xd[b]) * np.float32(np.int32(isum)) + wm[b] * xs[b]
    return acc


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@njit(cache=True, parallel=True)
def _matvec_quant(kind, raw, xq, xd, xs, y):
    nb = xq.size // QK
    for r in prange(raw.shape[0]):
        row = raw[r]
        if kind == Q4_0:
            y[r] = _row_dot_q4_0(row, xq, xd, nb)
        elif kind == Q4_1:
            y[r] = _row_dot_q4_1(row, xq, xd, xs, nb)
        elif kind == Q5_0:
            y[r] = _row_dot_q5_0(row, xq, xd, nb)
        elif kind == Q5_1:
            y[r] = _row_dot_q5_1(row, xq, xd, xs, nb)
        else:
            y[r] = _row_dot_q8_0(row, xq, xd, nb)


@njit(cache=True, parallel=True)
def _matmul_quant(kind, raw, xq, xd, xs, y, rows_per_task):
    n_out = raw.shape[0]
    n_tok, n_in = xq.shape
    nb = n_in // QK
    has_min = kind == Q4_1 or kind == Q5_1
    n_tasks = (n_out + rows_per_task - 1) // rows_per_task
    for task in prange(n_tasks):
        r0 = task * rows_per_task
        n_rows = min(rows_per_task, n_out - r0)
        wq = np.empty((n_rows, n_in), np.int8)
        wd = np.empty((n_rows, nb), np.float32)
        wm = np.zeros((n_rows, nb), np.float32)
        for i in range(n_rows):
            # Row of blocks -> int8 values (signed for the _0 types), scales and minimums.
            if kind == Q4_0:
                _unpack_q4_0(raw[r0 + i], nb, wq[i], wd[i], wm[i])
            elif kind == Q4_1:
                _unpack_q4_1(raw[r0 + i], nb, wq[i], wd[i], wm[i])
            elif kind == Q5_0:
                _unpack_q5_0(raw[r0 + i], nb, wq[i], wd[i], wm[i])
            elif kind == Q5_1:
                _unpack_q5_1(raw[r0 + i], nb, wq[i], wd[i], wm[i])
            else:
                _unpack_q8_0(raw[r0 + i], nb, wq[i], wd[i], wm[i])
        for t in range(n_tok):
            xqt = xq[t]
            xdt = xd[t]
            xst = xs[t]
            for i in range(n_rows):
                if has_min:
                    y[t, r0 + i] = _unpacked_dot_min(wq[i], wd[i], wm[i], xqt, xdt, xst, nb)
                else:
                    y[t, r0 + i] = _unpacked_dot(wq[i], wd[i], xqt, xdt, nb)


_FLOAT_DOT = {"reassoc", "contract", "nsz"}  # lets LLVM split the float32 sums into vector lanes


@njit(cache=True, fastmath=_FLOAT_DOT)
def _dot_f32(w, x):
    acc = np.float32(0.0)
    for i in range(x.size):
        acc += w[i] * x[i]
    return acc


@njit(cache=True, fastmath=_FLOAT_DOT)
def _dot_f16(w, x):
    acc = np.float32(0.0)
    for i in range(x.size):
        acc += f16_to_f32(w[i]) * x[i]
    return acc


@njit(cache=True, fastmath=_FLOAT_DOT)
def _dot_bf16(w, x):
    acc = np.float32(0.0)
    for i in range(x.size):
        acc += bf16_to_f32(w[i]) * x[i]
    return acc


@njit(cache=True)
def _widen_f16(src, dst):
    for i in range(src.size):
        dst[i] = f16_to_f32(src[i])


@njit(cache=True)
def _widen_bf16(src, dst):
    for i in range(src.size):
        dst[i] = bf16_to_f32(src[i])


@njit(cache=True, parallel=True)
def _matvec_f32(w, x, y):
    for r in prange(w.shape[0]):
        y[r] = _dot_f32(w[r], x)


@njit(cache=True, parallel=True)
def _matvec_half(w, is_bf16, x, y):
    for r in prange(w.shape[0]):
        y[r] = _dot_bf16(w[r], x) if is_bf16 else _dot_f16(w[r], x)


@njit(cache=True, fastmath=_FLOAT_DOT)
def _dot_2x4(w0, w1, x0, x1, x2, x3):
    """Two rows times four tokens in one pass: each loaded weight feeds four FMAs."""
    a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = np.float32(0.0)
    for i in range(x0.size):
        u = w0[i]
        v = w1[i]
        c0 = x0[i]
        c1 = x1[i]
        c2 = x2[i]
        c3 = x3[i]
        a0 += u * c0
        a1 += u * c1
        a2 += u * c2
        a3 += u * c3
        b0 += v * c0
        b1 += v * c1
        b2 += v * c2
        b3 += v * c3
    return a0, a1, a2, a3, b0, b1, b2, b3


@njit(cache=True)
def _float_rows_times_tokens(rows, x, y, r0):
    """``y[:, r0 + i] = x @ rows[i]`` for float32 ``rows`` (a few weight rows) and all tokens."""
    n_rows = rows.shape[0]
    n_tok = x.shape[0]
    n_tok4 = n_tok - n_tok % 4
    n_rows2 = n_rows - n_rows % 2
    for i in range(0, n_rows2, 2):
        for t in range(0, n_tok4, 4):
            (y[t, r0 + i], y[t + 1, r0 + i], y[t + 2, r0 + i], y[t + 3, r0 + i],
             y[t, r0 + i + 1], y[t + 1, r0 + i + 1], y[t + 2, r0 + i + 1], y[t + 3, r0 + i + 1]) = _dot_2x4(
                rows[i], rows[i + 1], x[t], x[t + 1], x[t + 2], x[t + 3])
    for t in range(n_tok4, n_tok):
        for i in range(n_rows2):
            y[t, r0 + i] = _dot_f32(rows[i], x[t])
    if n_rows2 < n_rows:
        for t in range(n_tok):
            y[t, r0 + n_rows2] = _dot_f32(rows[n_rows2], x[t])


@njit(cache=True, parallel=True)
def _matmul_f32(w, x, y, rows_per_task):
    n_out = w.shape[0]
    n_tasks = (n_out + rows_per_task - 1) // rows_per_task
    for task in prange(n_tasks):
        r0 = task * rows_per_task
        _float_rows_times_tokens(w[r0:min(r0 + rows_per_task, n_out)], x, y, r0)


@njit(cache=True, parallel=True)
def _matmul_half(w, is_bf16, x, y, rows_per_task):
    n_out, n_in = w.shape
    n_tasks = (n_out + rows_per_task - 1) // rows_per_task
    for task in prange(n_tasks):
        r0 = task * rows_per_task
        n_rows = min(rows_per_task, n_out - r0)
        # Widen the rows once per batch, then multiply them like F32 rows.
        rows = np.empty((n_rows, n_in), np.float32)
        for i in range(n_rows):
            if is_bf16:
                _widen_bf16(w[r0 + i], rows[i])
            else:
                _widen_f16(w[r0 + i], rows[i])
        _float_rows_times_tokens(rows, x, y, r0)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def _check_out(out: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    if out is None:
        return np.empty(shape, np.float32)
    if out.shape != shape or out.dtype != np.float32 or not out.flags.c_contiguous or not out.flags.writeable:
        raise HalfbyteError(f"out must be a writable C-contiguous float32 array of shape {shape}, "
                            f"got {out.dtype} {out.shape}")
    return out


def _activations(weight: WeightView, x: np.ndarray, ndim: int) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != ndim or x.shape[-1] != weight.n_in:
        want = "(n_in,)" if ndim == 1 else "(n_tok, n_in)"
        raise HalfbyteError(f"activations of shape {x.shape} do not fit a {weight.ggml_type.name} weight with "
                            f"n_in={weight.n_in} (expected {want})")
    return x


# ---------------------------------------------------------------------------------------------
# Kernel paths. Q4_0 and Q8_0, the types people run, have explicit-SIMD kernels (kernels/simd.py);
# every other type, and every type under "reference", uses the plain per-type loops above.
# The choice is made here, in Python, and not inside a jitted function: Numba's on-disk cache
# does not notice when a jitted function in another module changes.
# ---------------------------------------------------------------------------------------------

KERNEL_PATHS = ("auto", "portable", "reference")


def _initial_kernel_path() -> str:
    import os

    path = os.environ.get("HALFBYTE_KERNELS", "auto").strip().lower() or "auto"
    if path not in KERNEL_PATHS:
        raise HalfbyteError(f"HALFBYTE_KERNELS={path!r}: expected one of {', '.join(KERNEL_PATHS)}")
    return path


_kernel_path = _initial_kernel_path()


def set_kernel_path(path: str) -> str:
    """Choose the Q4_0/Q8_0/IQ4_NL kernels: "auto" (SIMD IR for this CPU), "portable" (target-independent
    vector IR) or "reference" (plain Numba loops). Returns the previous choice. Also settable with
    the environment variable HALFBYTE_KERNELS."""
    global _kernel_path
    if path not in KERNEL_PATHS:
        raise HalfbyteError(f"kernel path {path!r}: expected one of {', '.join(KERNEL_PATHS)}")
    previous, _kernel_path = _kernel_path, path
    return previous


def kernel_description() -> str:
    """What the quantized products run on, e.g. "simd-avx2", "simd-generic" or "reference"."""
    if _kernel_path == "reference":
        return "reference"
    return "simd-" + (simd.kernel_isa() if _kernel_path == "auto" else "generic")


# Tokens from which the x8 prompt kernel beats the row-major tiles. Measured (5632x2048 Q4_0,
# 1 thread, ms): 4 tokens 1.5 vs 2.0, 8 tokens 3.0 vs 2.5, 16 tokens 6.1 vs 3.6, 64 tokens 24.3 vs 10.1.
X8_MIN_TOKENS = 8


def _simd_kernels(kind: int, n_tok: int = 1):
    """(matvec, matmul) SIMD drivers for this weight type and path, or None for the plain loops."""
    if _kernel_path == "reference" or kind not in (Q4_0, Q8_0, IQ4_NL):
        return None
    portable = _kernel_path == "portable"
    if kind == IQ4_NL:  # integer products against Q8_0 activations (ggml_vec_dot_iq4_nl_q8_0)
        return (simd.matvec_iq4_nl_generic, simd.matmul_iq4_nl_generic) if portable else (
            simd.matvec_iq4_nl, simd.matmul_iq4_nl)
    if kind == Q4_0:
        if portable:
            return simd.matvec_q4_0_generic, simd.matmul_q4_0_generic
        # Batches: the 8-row interleaved kernel where it exists (AVX2) and the batch pays for its
        # repacking, else the row-major tiles.
        x8 = simd.has_x8_kernels() and n_tok >= X8_MIN_TOKENS
        return simd.matvec_q4_0, (simd.matmul_q4_0_x8 if x8 else simd.matmul_q4_0)
    if portable:
        return simd.matvec_q8_0_generic, simd.matmul_q8_0_generic
    x8 = simd.has_x8_kernels() and n_tok >= X8_MIN_TOKENS
    return simd.matvec_q8_0, (simd.matmul_q8_0_x8 if x8 else simd.matmul_q8_0)


def _simd_product(kind: int, drivers, raw: np.ndarray, x: np.ndarray, y: np.ndarray, batch: bool,
                  quantized: dict | None = None) -> None:
    """``quantized``, a dict kept across products of the same ``x``, keeps its Q8_0 activations
    (a batch's under the key kquant_gemm.activations_for_lanes uses for the same quantization)."""
    key = "q8_0" if batch else "q8_0_one"
    if quantized is not None and key in quantized:
        xq, scales, sums = quantized[key]
    else:
        quantize = simd.quantize_activations_q8_0_batch if batch else simd.quantize_activations_q8_0
        xq, scales, sums = _call(quantize, x)
        if quantized is not None:
            quantized[key] = xq, scales, sums
    driver = drivers[1] if batch else drivers[0]
    if kind == Q4_0 or driver is simd.matmul_q8_0_x8:
        _call(driver, raw, xq, scales, sums, y)
    else:
        _call(driver, raw, xq, scales, y)


def matvec_driver(weight: WeightView) -> tuple[Callable[..., None], str] | None:
    """The SIMD matrix-vector driver of ``weight`` on the current kernel path and the activations it
    takes, or None when its products run another way (the compiled decode step's choice,
    engine/kernels/decode_step.py, the same as _matvec_into's). Activations: "q8_0" ``driver(w, xq,
    xscales, y)``, "q8_0+sums" (Q4_0) ``driver(w, xq, xscales, xsums, y)``, both 1-D Q8_0 arrays;
    the K-quant and grid types' ``driver(w, xq, xd, xs, y)`` take 2-D (one token) Q8_K arrays as
    kquant_simd.activations_for makes them: "q8_k+bsums" with int16 sums of 16 values, "q8_k+sums32"
    with float32 scaled sums of 32."""
    kind = int(weight.ggml_type)
    drivers = _simd_kernels(kind)
    if drivers is not None:
        return drivers[0], "q8_0+sums" if kind == Q4_0 else "q8_0"
    if kind not in _K_PRODUCTS or _kernel_path == "reference":
        return None
    name, host, _, portable, _ = _K_PRODUCTS[kind]
    return (portable if _kernel_path == "portable" else host), (
        "q8_k+sums32" if name in kquant_simd.SUMS32_TYPES else "q8_k+bsums")


# kind -> (name, host matvec, host matmul, portable matvec, portable matmul)
_K_PRODUCTS = {int(GGMLQuantizationType[name.upper()]): (name, *drivers)
               for name, drivers in (kquant_simd.DRIVERS | iquant_simd.DRIVERS).items()}


_LANE_TYPES = {int(GGMLQuantizationType[name.upper()]): name for name in kquant_gemm.TYPES}
_VNNI_ISAS = ("avx512-vnni", "avx2-vnni")


def _lane_driver(weight: WeightView, n_tok: int):
    """The lane-product driver (engine/kernels/kquant_gemm.py) for a batch of ``n_tok``, or None. The
    K-quants take it from kquant_gemm.MIN_TOKENS tokens on every path but "reference" (their row
    drivers have no batch tiles); Q8_0, Q4_0, IQ4_NL and the grid and ternary types on VNNI hosts
    ("auto" path; Q8_0/Q4_0/IQ4_NL rows of whole 256-value super-blocks), where it was measured
    faster than their own batch kernels (Intel Xeon, 1 thread, 5632x2048, 128 tokens: Q8_0 23.3 ->
    10.9 ms, Q4_0 14.2 -> 9.8, IQ4_NL 34.9 -> 8.9); elsewhere those stay."""
    name = _LANE_TYPES.get(int(weight.ggml_type))
    if name is None or n_tok < kquant_gemm.MIN_TOKENS or _kernel_path == "reference":
        return None
    host, portable = kquant_gemm.DRIVERS[name]
    if name in kquant_gemm.K_TYPES:
        return portable if _kernel_path == "portable" else host
    if _kernel_path == "auto" and weight.n_in % kquant_gemm.QK_K == 0 and simd.kernel_isa() in _VNNI_ISAS:
        return host
    return None


def _has_k_product(weight: WeightView) -> bool:
    """Integer products against Q8_K activations (Q4_K, Q5_K, Q6_K also have a float reference path;
    the other types on the "reference" path are dequantized like the rest)."""
    return weight.ggml_type in K_QUANT_TYPES or (int(weight.ggml_type) in _K_PRODUCTS and _kernel_path != "reference")


def _k_product(kind: int, raw: np.ndarray, x: np.ndarray, y: np.ndarray, quantized: dict | None = None) -> None:
    """K-quant products: integer SIMD against Q8_K activations (as llama.cpp), or on the
    "reference" path float dequant-dots against the float activations. ``quantized``, a dict kept
    across products of the same ``x``, keeps each type's activations."""
    if _kernel_path == "reference":
        _call(kquants.matmul, kind, raw, x, y)
        return
    name, *drivers = _K_PRODUCTS[kind]
    drivers = drivers[2:] if _kernel_path == "portable" else drivers[:2]
    key = ("k", name)
    if quantized is not None and key in quantized:
        xq, xd, xs = quantized[key]
    else:
        xq, xd, xs = _call(kquant_simd.activations_for, name, x)
        if quantized is not None:
            quantized[key] = xq, xd, xs
    _call(drivers[0] if x.shape[0] == 1 else drivers[1], raw, xq, xd, xs, y)


# Scratch of the dequantizing products: at most this many float32 weights (4 MiB) at a time.
DEQUANT_CHUNK_FLOATS = 1 << 20


@njit(cache=True, parallel=True)
def _float_chunk_times_tokens(rows, x, y, r0, rows_per_task):
    """``y[:, r0 + i] = x @ rows[i]`` for a chunk of float32 weight rows, parallel over row groups."""
    n_tasks = (rows.shape[0] + rows_per_task - 1) // rows_per_task
    for task in prange(n_tasks):
        first = task * rows_per_task
        _float_rows_times_tokens(rows[first:min(first + rows_per_task, rows.shape[0])], x, y, r0 + first)


def _dequant_product(weight: WeightView, x: np.ndarray, y: np.ndarray) -> None:
    """``y = x W^T`` by rows: a chunk of rows dequantized to float32 (halfbyte's dequantizers, or
    gguf's for the types only llama.cpp writes), then float dots with the float32 activations."""
    from engine import quants

    per_chunk = max(ROWS_PER_TASK, DEQUANT_CHUNK_FLOATS // weight.n_in // ROWS_PER_TASK * ROWS_PER_TASK)
    scratch = np.empty((min(per_chunk, weight.n_out), weight.n_in), np.float32)
    native = dequant_any.native(weight.ggml_type)
    for r0 in range(0, weight.n_out, per_chunk):
        rows = scratch[: min(per_chunk, weight.n_out - r0)]
        raw = weight.data[r0 : r0 + rows.shape[0]]
        if native:
            quants.dequantize(raw, weight.ggml_type, out=rows)
        else:
            rows[...] = dequant_any.dequantize_rows(raw, weight.ggml_type)
        _call(_float_chunk_times_tokens, rows, x, y, r0, ROWS_PER_TASK)


def matvec(weight: WeightView, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``y = W x``: float32 ``(n_in,)`` -> float32 ``(n_out,)``, written into ``out`` if given."""
    x = _activations(weight, x, 1)
    y = _check_out(out, (weight.n_out,))
    _matvec_into(weight, x, y)
    return y


def _matvec_into(weight: WeightView, x: np.ndarray, y: np.ndarray, quantized: dict | None = None) -> None:
    """matvec on checked arguments (the decode step's hot path: one call per weight per token);
    ``quantized`` as in _matmul_into."""
    kind = int(weight.ggml_type)
    drivers = _simd_kernels(kind)
    if drivers is not None:
        _simd_product(kind, drivers, weight.data, x, y, False, quantized)
    elif _has_k_product(weight):
        _k_product(kind, weight.data, x.reshape(1, -1), y.reshape(1, -1), quantized)
    elif weight.ggml_type in DEQUANT_TYPES or weight.ggml_type in GGUF_DEQUANT_TYPES:
        _dequant_product(weight, x.reshape(1, -1), y.reshape(1, -1))
    elif kind == F32:
        _call(_matvec_f32, weight.data, x, y)
    elif kind in (F16, BF16):
        _call(_matvec_half, weight.data, kind == BF16, x, y)
    else:
        act = quantize_activations(x)
        _call(_matvec_quant, kind, weight.data, act.qs[0], act.d[0], act.s[0], y)


def matmul(weight: WeightView, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``Y = X W^T``: float32 ``(n_tok, n_in)`` -> float32 ``(n_tok, n_out)``, into ``out`` if given.

    Row ``t`` of the result equals ``matvec(weight, X[t])`` up to float32 rounding: the integer
    block sums are identical, only the order of the float additions may differ.
    """
    x = _activations(weight, x, 2)
    y = _check_out(out, (x.shape[0], weight.n_out))
    _matmul_into(weight, x, y)
    return y


def _matmul_into(weight: WeightView, x: np.ndarray, y: np.ndarray, quantized: dict | None = None) -> None:
    """matmul on checked arguments. ``quantized``, a dict kept across products of the same ``x``,
    keeps what is computed from ``x`` alone (its Q8_0 / Q8_K quantizations, the lane layouts)."""
    if x.shape[0] <= 1:  # one token: the decode kernel, without unpacking rows for a batch
        if x.shape[0] == 1:
            _matvec_into(weight, x[0], y[0], quantized)
        return
    kind = int(weight.ggml_type)
    lanes = _lane_driver(weight, x.shape[0])
    if lanes is not None:
        name = _LANE_TYPES[kind]
        quantized = {} if quantized is None else quantized
        if ("lanes", name) not in quantized:
            quantized["lanes", name] = _call(kquant_gemm.activations_for_lanes, name, x, quantized)
        _call(lanes, weight.data, *quantized["lanes", name], x.shape[0], y)
        return
    drivers = _simd_kernels(kind, x.shape[0])
    if drivers is not None:
        _simd_product(kind, drivers, weight.data, x, y, True, quantized)
    elif _has_k_product(weight):
        _k_product(kind, weight.data, x, y, quantized)
    elif weight.ggml_type in DEQUANT_TYPES or weight.ggml_type in GGUF_DEQUANT_TYPES:
        _dequant_product(weight, x, y)
    elif kind == F32:
        _call(_matmul_f32, weight.data, x, y, ROWS_PER_TASK)
    elif kind in (F16, BF16):
        _call(_matmul_half, weight.data, kind == BF16, x, y, ROWS_PER_TASK)
    else:
        act = quantize_activations(x)
        _call(_matmul_quant, kind, weight.data, act.qs, act.d, act.s, y, ROWS_PER_TASK)


def matmul_many(weights: Sequence[WeightView], x: np.ndarray) -> list[np.ndarray]:
    """``[matmul(w, x) for w in weights]``, bit for bit, with what is computed from ``x`` alone done
    once for them all (a layer's q, k and v, or gate and up, share their input): one Q8_0 and one
    Q8_K quantization of ``x``, each lane layout once."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    quantized: dict = {}
    results = []
    for weight in weights:
        checked = _activations(weight, x, 2)
        y = np.empty((checked.shape[0], weight.n_out), np.float32)
        _matmul_into(weight, checked, y, quantized)
        results.append(y)
    return results


def dequantize_weight(weight: WeightView) -> np.ndarray:
    """The whole matrix as float32 ``(n_out, n_in)``, through ``gguf.quants`` (tests and references only)."""
    from gguf import quants

    if weight.ggml_type == GGMLQuantizationType.F32:
        return np.array(weight.data, dtype=np.float32)
    if weight.ggml_type == GGMLQuantizationType.F16:
        return weight.data.view(np.float16).astype(np.float32)
    return quants.dequantize(weight.data.view(np.uint8), weight.ggml_type).reshape(weight.n_out, weight.n_in)


def reference_matmul(weight: WeightView, x: np.ndarray, quantize_activations: bool = False) -> np.ndarray:
    """Plain float64 ``X W^T`` on the dequantized weight, for tests; float64 ``(n_tok, n_out)``.

    With ``quantize_activations=True`` (quantized weight types only) ``X`` is first rounded
    through Q8_0 by ``gguf.quants``, which is what ggml and the fast path compute on.
    """
    from gguf import quants

    x2 = np.asarray(x, dtype=np.float32)
    squeeze = x2.ndim == 1
    x2 = x2.reshape(-1, weight.n_in)
    correction = 0.0
    if quantize_activations and weight.ggml_type in QUANT_TYPES:
        q8 = GGMLQuantizationType.Q8_0
        blocks = quants.quantize(x2, q8).reshape(x2.shape[0], -1, 34)
        x_dq = quants.dequantize(blocks.reshape(x2.shape[0], -1), q8).reshape(x2.shape)
        if weight.ggml_type in (GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q5_1):
            # Q8_1: the minimum multiplies s = fp16(d * sum(q)) with the unrounded float32 d,
            # not the fp16 d the dequantized activations carry; add the difference.
            q_sum = blocks[..., 2:].view(np.int8).astype(np.int32).sum(-1)
            d32 = np.abs(x2.reshape(x2.shape[0], -1, QK)).max(-1) / np.float32(127)
            s = (q_sum.astype(np.float32) * d32).astype(np.float16).astype(np.float64)
            d16 = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float64)
            type_size = GGML_QUANT_SIZES[weight.ggml_type][1]
            minimums = weight.data.reshape(weight.n_out, -1, type_size)[..., 2:4].copy().view(np.float16)[..., 0]
            correction = (s - d16 * q_sum) @ minimums.astype(np.float64).T
        x2 = x_dq
    y = x2.astype(np.float64) @ dequantize_weight(weight).astype(np.float64).T + correction
    return y[0] if squeeze else y
