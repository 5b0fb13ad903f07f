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


# Up to this many weights (a prompt's embedding rows: 128 tokens of 2048 are 262,144), halfbyte's own
# types are dequantized by gguf's numpy code too, which gives the same bits (tests/test_quants.py)
# and needs no compiling: the kernels' first use cost 0.6 s (Q8_0) and 2.1 s (the K-quants' shared
# dequantizer) of a model's first run (AMD EPYC Zen 4). It costs 20-50 us more per generated token's
# row (35-62 against 6-14 us), and 0.9 ms for 128 rows of 2048.
NUMPY_ROWS_WEIGHTS = 1 << 19


def dequantize_rows(raw: np.ndarray, qtype: GGMLQuantizationType | int) -> np.ndarray:
    """uint8 rows ``(n_rows, row_bytes)`` of ``qtype`` blocks -> float32 ``(n_rows, n)``."""
    qtype = QT(int(qtype))
    raw = np.ascontiguousarray(raw).view(np.uint8)
    if qtype in quants.SUPPORTED_TYPES:
        n_weights = raw.size // GGML_QUANT_SIZES[qtype][1] * GGML_QUANT_SIZES[qtype][0]
        if n_weights > NUMPY_ROWS_WEIGHTS or not _gguf_can(qtype):
            return quants.dequantize(raw, qtype)
    if not can_dequantize(qtype):
        raise HalfbyteError(f"cannot dequantize ggml type {qtype.name}")
    from gguf import quants as gq

    size, nbytes = GGML_QUANT_SIZES[qtype]
    if raw.shape[-1] % nbytes:
        raise HalfbyteError(f"row of {raw.shape[-1]} bytes is not a whole number of {qtype.name} blocks")
    with np.errstate(all="ignore"):
        return np.ascontiguousarray(gq.dequantize(raw, qtype), dtype=np.float32)
