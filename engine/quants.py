"""ggml tensor types: sizes, and quantize/dequantize byte-identical to ``gguf.quants``.

``quantize(data, qtype)`` and ``dequantize(raw, qtype)`` have the contract of
``gguf.quants.quantize``/``dequantize`` (the Python port of ggml-quants.c, our reference):
quantized types give a uint8 array of shape ``(*data.shape[:-1], row_bytes)``, F32 and F16
give ``data.astype(np.float32 / np.float16, copy=False)``, and dequantize gives float32 of
shape ``(*raw.shape[:-1], n)``.  The block types run in the Numba kernels of
``engine.kernels.quant``; rows stream through them in chunks of about 16 MiB, so no second
full-size float32 copy of a big tensor is made (only non-float32 or non-contiguous input is
converted, one chunk at a time).

llama.cpp's K-quants Q2_K, Q3_K, Q4_K, Q5_K, Q6_K and IQ4_NL, IQ4_XS, for which ``gguf.quants`` has no
quantizer, are written byte-identical to ``llama-quantize`` without an importance matrix (ggml's
reference quantizers; ``engine.kernels.kquant_quantize``, checked against llama-quantize's own files in
tests/fixtures/kquants); their dequantization is bit-identical to ``gguf.quants.dequantize``.  For these
types NaN/inf input gives deterministic bytes that are not promised equal to ggml's.

NaN and inf input never raise; the bytes are the reference's wherever the reference's
result does not depend on numpy's implementation:

* BF16: NaN becomes a quiet NaN with its top bits kept (ggml_compute_fp32_to_bf16), +-inf
  stays +-inf, finite values past the largest bf16 round to +-inf.
* F16: numpy's ``astype`` (overflow to +-inf, NaN kept).
* Q8_0/Q4_1/Q5_1 block with a NaN: scale (and Q4_1/Q5_1 min) are the canonical NaN
  (fp16 0x7E00), all codes 0.  The reference stores whatever NaN numpy's SIMD max/min
  reduction returns, which depends on where the NaN sits in the block (a canonical NaN, or
  the NaN itself with its sign and payload); only those fp16 bits can differ from it.
  Q4_0/Q5_0 block with a NaN: like the reference (numpy's argmax is defined), the scale is
  the first NaN of the block divided by -8 / -16 (sign and payload kept), all codes 0.
* A block with +-inf: the scale is +-inf, finite elements get the zero code (8 or 16 for
  Q4_0/Q5_0, 0 for the others), the infinite ones code 0.  Finite values too large for
  fp16 (|d| >= 65520) likewise store an infinite scale, so they dequantize to +-inf/NaN.
* Codes of NaN/out-of-range intermediate values follow numpy's float -> uint8 cast on
  x86-64 (through int32, low byte; NaN/inf give 0): e.g. a block of subnormals whose
  inverse scale overflows to inf.  On other CPUs numpy's own result may differ; ours does not.
* Q4_1/Q5_1 only: when the block min (or max) is a zero present as both -0.0 and +0.0, we
  keep the first one, as ggml's C loop does; numpy's reduction order decides it in the
  reference, so there the sign bit of the stored fp16 min/scale may differ from gguf's.
* Dequantizing Q4_1/Q5_1 blocks whose d and m are both NaN gives d * q's NaN, as the
  reference does except for a tensor of exactly one block (numpy's vector + scalar loop
  then returns m's NaN).  Every other dequantized float, NaN or not, is bit-identical.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from engine.errors import HalfbyteError
from engine.kernels import kquant_quantize as kqq
from engine.kernels import quant

QT = GGMLQuantizationType

# (quantize kernel, dequantize kernel) per block type; F32/F16 are plain numpy casts.
_KERNELS = {
    QT.Q8_0: (quant.quantize_q8_0, quant.dequantize_q8_0),
    QT.Q4_0: (quant.quantize_q4_0, quant.dequantize_q4_0),
    QT.Q4_1: (quant.quantize_q4_1, quant.dequantize_q4_1),
    QT.Q5_0: (quant.quantize_q5_0, quant.dequantize_q5_0),
    QT.Q5_1: (quant.quantize_q5_1, quant.dequantize_q5_1),
    QT.BF16: (quant.quantize_bf16, quant.dequantize_bf16),
    # llama.cpp's K-quants and IQ4 (engine.kernels.kquant_quantize): bytes of llama-quantize without an
    # importance matrix; their blocks are independent too, so they stream through the same chunking.
    **{qtype: (kqq.QUANTIZERS[qtype], kqq.DEQUANTIZERS[qtype]) for qtype in kqq.DEQUANTIZERS},
}
# Q4_K/Q5_K/Q6_K are written by kquant_quantize and read by engine.kernels.kquants.
_KQUANT_WRITERS = {qtype: kqq.QUANTIZERS[qtype] for qtype in (QT.Q4_K, QT.Q5_K, QT.Q6_K)}
QUANTIZE_TYPES: frozenset[GGMLQuantizationType] = frozenset({QT.F32, QT.F16, *_KERNELS, *_KQUANT_WRITERS})
# Every type read is now written too (kept for callers of the old name).
DEQUANTIZE_ONLY_TYPES: frozenset[GGMLQuantizationType] = frozenset()
SUPPORTED_TYPES: frozenset[GGMLQuantizationType] = QUANTIZE_TYPES | DEQUANTIZE_ONLY_TYPES

# fp16 -> fp32 by table, like ggml's ggml_table_f32_f16; built by numpy so it is numpy's conversion.
_F16_TO_F32 = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)
_CHUNK_ITEMS = 1 << 22  # items (floats or bytes) handed to one kernel call


def _as_type(qtype: GGMLQuantizationType | int) -> GGMLQuantizationType:
    try:
        qtype = QT(qtype)
    except ValueError:
        raise HalfbyteError(f"unknown ggml type {qtype!r}") from None
    if qtype not in GGML_QUANT_SIZES:
        raise HalfbyteError(f"ggml type {qtype.name} has no known block size")
    return qtype


def block_size(qtype: GGMLQuantizationType | int) -> int:
    """Elements per block (1 for F32/F16/BF16)."""
    return GGML_QUANT_SIZES[_as_type(qtype)][0]


def type_bytes(qtype: GGMLQuantizationType | int) -> int:
    """Bytes per block."""
    return GGML_QUANT_SIZES[_as_type(qtype)][1]


def row_bytes(qtype: GGMLQuantizationType | int, n: int) -> int:
    """Bytes of a row of ``n`` elements; ``n`` must be a whole number of blocks."""
    qtype = _as_type(qtype)
    size, nbytes = GGML_QUANT_SIZES[qtype]
    if n < 0 or n % size:
        raise HalfbyteError(f"row of {n} elements is not a multiple of the {qtype.name} block size {size}")
    return n // size * nbytes


def tensor_nbytes(qtype: GGMLQuantizationType | int, shape: Sequence[int]) -> int:
    """Bytes of a tensor of numpy-order ``shape`` (last axis = the ggml row, ne[0])."""
    rows = 1
    for dim in shape[:-1]:
        rows *= int(dim)
    return rows * row_bytes(qtype, int(shape[-1]) if len(shape) else 1)


def _kernels(qtype: GGMLQuantizationType | int, action: str) -> tuple[GGMLQuantizationType, tuple]:
    qtype = _as_type(qtype)
    if action == "quantize" and qtype in _KQUANT_WRITERS:
        return qtype, (_KQUANT_WRITERS[qtype],)
    if qtype not in _KERNELS and qtype not in (QT.F32, QT.F16):
        allowed = SUPPORTED_TYPES if action == "dequantize" else QUANTIZE_TYPES
        supported = ", ".join(sorted(t.name for t in allowed))
        raise HalfbyteError(f"cannot {action} ggml type {qtype.name} (supported: {supported})")
    return qtype, _KERNELS.get(qtype, ())


def _chunks(array: np.ndarray, dtype: np.dtype, unit: int) -> Iterator[np.ndarray]:
    """``array`` in C order as contiguous 1-D ``dtype`` pieces of whole ``unit``s (blocks), each
    about ``_CHUNK_ITEMS`` long: views when ``array`` already is contiguous ``dtype``."""
    if array.ndim > 2 and not array.flags.c_contiguous:
        for sub in array:  # reshape(-1, n) would copy the whole tensor
            yield from _chunks(sub, dtype, unit)
        return
    rows = array.reshape(-1, array.shape[-1])
    n = rows.shape[1]
    if n == 0:
        return
    if n > _CHUNK_ITEMS:  # one huge row: split it at block boundaries
        step = max(unit, _CHUNK_ITEMS // unit * unit)
        for row in rows:
            for start in range(0, n, step):
                yield np.ascontiguousarray(row[start : start + step], dtype=dtype)
    else:
        per_chunk = _CHUNK_ITEMS // n
        for start in range(0, rows.shape[0], per_chunk):
            yield np.ascontiguousarray(rows[start : start + per_chunk], dtype=dtype).reshape(-1)


def quantize(data: np.ndarray, qtype: GGMLQuantizationType | int) -> np.ndarray:
    """``gguf.quants.quantize(data, qtype)``, byte for byte (see the module doc for NaN/inf)."""
    qtype, kernels = _kernels(qtype, "quantize")
    if qtype == QT.F32:
        return data.astype(np.float32, copy=False)
    if qtype == QT.F16:
        with np.errstate(over="ignore"):  # values beyond fp16 become +-inf: documented, not an error
            return data.astype(np.float16, copy=False)
    data = np.asarray(data)
    if data.ndim == 0:
        raise HalfbyteError(f"cannot quantize a 0-d array to {qtype.name}")
    size, nbytes = GGML_QUANT_SIZES[qtype]
    out = np.empty((*data.shape[:-1], row_bytes(qtype, data.shape[-1])), dtype=np.uint8)
    out_blocks = out.reshape(-1, nbytes)
    done = 0
    for values in _chunks(data, np.float32, size):
        n_blocks = values.size // size
        kernels[0](values, out_blocks[done : done + n_blocks])
        done += n_blocks
    return out


def dequantize(
    raw: np.ndarray, qtype: GGMLQuantizationType | int, out: np.ndarray | None = None
) -> np.ndarray:
    """``gguf.quants.dequantize(raw, qtype)``: float32 of shape ``(*raw.shape[:-1], n)``.

    ``out``, a C-contiguous float32 array of that shape, receives the result instead of a new
    array: reusing a buffer skips the page faults of fresh memory, which cost as much as the
    kernel itself for big tensors."""
    if _as_type(qtype) in _KQUANT_WRITERS:
        return _dequantize_k(np.asarray(raw), _as_type(qtype), out)
    qtype, kernels = _kernels(qtype, "dequantize")
    if qtype in (QT.F32, QT.F16):
        floats = raw.view(np.float32) if qtype == QT.F32 else raw.view(np.float16).astype(np.float32)
        if out is None:
            return floats
        _check_out(out, floats.shape)
        np.copyto(out, floats)
        return out
    raw = np.asarray(raw)
    if raw.ndim == 0:
        raise HalfbyteError(f"cannot dequantize a 0-d array as {qtype.name}")
    raw = raw.view(np.uint8)
    size, nbytes = GGML_QUANT_SIZES[qtype]
    if raw.shape[-1] % nbytes:
        raise HalfbyteError(f"row of {raw.shape[-1]} bytes is not a whole number of {qtype.name} blocks")
    shape = (*raw.shape[:-1], raw.shape[-1] // nbytes * size)
    if out is None:
        out = np.empty(shape, dtype=np.float32)
    else:
        _check_out(out, shape)
    out_values = out.reshape(-1)
    done = 0
    for chunk in _chunks(raw, np.uint8, nbytes):
        blocks = chunk.reshape(-1, nbytes)
        kernels[1](blocks, _F16_TO_F32, out_values[done : done + blocks.shape[0] * size])
        done += blocks.shape[0] * size
    return out


def _check_out(out: np.ndarray, shape: tuple[int, ...]) -> None:
    if out.dtype != np.float32 or out.shape != tuple(shape) or not out.flags.c_contiguous or not out.flags.writeable:
        raise HalfbyteError(f"out must be a writable C-contiguous float32 array of shape {tuple(shape)}")


def _dequantize_k(raw: np.ndarray, qtype: GGMLQuantizationType, out: np.ndarray | None) -> np.ndarray:
    from engine.kernels import kquants

    size, nbytes = GGML_QUANT_SIZES[qtype]
    raw = raw.view(np.uint8)
    if raw.ndim == 0 or raw.shape[-1] % nbytes:
        raise HalfbyteError(f"row of {raw.shape[-1] if raw.ndim else 0} bytes is not a whole number of "
                            f"{qtype.name} blocks")
    n = raw.shape[-1] // nbytes * size
    values = kquants.dequantize(raw.reshape(-1, raw.shape[-1]), int(qtype), n).reshape(*raw.shape[:-1], n)
    if out is None:
        return values
    _check_out(out, values.shape)
    np.copyto(out, values)
    return out
