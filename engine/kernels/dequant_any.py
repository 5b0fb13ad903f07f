"""Dequantize rows of any ggml block type: halfbyte's Numba kernels where it has them
(``engine.quants``), else ``gguf.quants.dequantize`` (numpy; slow but correct) for the types only
llama.cpp writes (IQ2_*, IQ3_*, IQ1_*, TQ1_0, TQ2_0, MXFP4, ...)."""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from engine import quants
from engine.errors import HalfbyteError

QT = GGMLQuantizationType
_NOT_BLOCKS = (QT.F32, QT.F16, QT.BF16, QT.F64, QT.I8, QT.I16, QT.I32, QT.I64)


def _gguf_can(qtype: GGMLQuantizationType) -> bool:
    from gguf import quants as gq

    cls = getattr(gq, qtype.name, None)
    return isinstance(cls, type) and "dequantize_blocks" in cls.__dict__


def can_dequantize(qtype: GGMLQuantizationType | int) -> bool:
    """Whether rows of this block type can be turned into floats here."""
    qtype = QT(int(qtype))
    if qtype in _NOT_BLOCKS:
        return False
    return qtype in quants.SUPPORTED_TYPES or _gguf_can(qtype)


def native(qtype: GGMLQuantizationType | int) -> bool:
    """Dequantized by halfbyte's own kernels (fast), not gguf's numpy code."""
    return QT(int(qtype)) in quants.SUPPORTED_TYPES


def dequantize_rows(raw: np.ndarray, qtype: GGMLQuantizationType | int) -> np.ndarray:
    """uint8 rows ``(n_rows, row_bytes)`` of ``qtype`` blocks -> float32 ``(n_rows, n)``."""
    qtype = QT(int(qtype))
    raw = np.ascontiguousarray(raw).view(np.uint8)
    if qtype in quants.SUPPORTED_TYPES:
        return quants.dequantize(raw, qtype)
    if not can_dequantize(qtype):
        raise HalfbyteError(f"cannot dequantize ggml type {qtype.name}")
    from gguf import quants as gq

    size, nbytes = GGML_QUANT_SIZES[qtype]
    if raw.shape[-1] % nbytes:
        raise HalfbyteError(f"row of {raw.shape[-1]} bytes is not a whole number of {qtype.name} blocks")
    with np.errstate(all="ignore"):
        return np.ascontiguousarray(gq.dequantize(raw, qtype), dtype=np.float32)
