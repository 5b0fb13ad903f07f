"""Per-token operations of a transformer layer: norms, rotary and ALiBi positions, activations.

Every kernel has a plain numpy ``reference_*`` twin that the tests compare it with. The
kernels work on float32 and follow ggml's arithmetic where it matters (norm statistics
summed in float64, ALiBi slopes computed with ggml's float32 formulas). They are serial:
next to the matrix products they cost little, and a parallel kernel would cost more to
launch than it saves on one token.

Activations: transformers' ``MptMLP`` uses ``nn.GELU(approximate="none")`` and
``FalconMLP`` uses ``get_activation("gelu")`` (also ``F.gelu`` with the exact erf), so
MPT and Falcon need ``gelu_erf``; ``gelu_tanh`` is the approximation llama.cpp's
``ggml_gelu`` computes (through an fp16 lookup table), kept for comparison with it.
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from engine.errors import HalfbyteError


def _rows(x: np.ndarray, n: int | None = None, name: str = "x") -> np.ndarray:
    """``x`` as a C-contiguous float32 2-D array of rows (a vector is one row)."""
    arr = np.ascontiguousarray(x, dtype=np.float32)
    if arr.ndim == 1:
        arr = arr.reshape(1, -1)
    elif arr.ndim != 2:
        arr = arr.reshape(-1, arr.shape[-1])
    if n is not None and arr.shape[1] != n:
        raise HalfbyteError(f"{name} has rows of {arr.shape[1]} values, expected {n}")
    return arr


def _output(out: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    """``out`` checked to be a writable C-contiguous float32 array of ``shape``, or a new one."""
    if out is None:
        return np.empty(shape, np.float32)
    if out.shape != shape or out.dtype != np.float32 or not out.flags.c_contiguous or not out.flags.writeable:
        raise HalfbyteError(f"out must be a writable C-contiguous float32 array of shape {shape}, "
                            f"got {out.dtype} {out.shape}")
    return out


def _row_output(out: np.ndarray | None, x_shape: tuple[int, ...], rows: np.ndarray) -> np.ndarray:
    """The ``(n_rows, n)`` array a row kernel writes: ``out`` (shaped like ``x``) viewed as rows."""
    return _output(out, x_shape).reshape(rows.shape)


# ---------------------------------------------------------------------------------------------
# Norms
# ---------------------------------------------------------------------------------------------


@njit(cache=True)
def _rms_norm_kernel(x, weight, eps, out):
    n_tok, n = x.shape
    for t in range(n_tok):
        total = 0.0  # float64, like ggml's ggml_float sum
        for i in range(n):
            total += np.float64(x[t, i]) * np.float64(x[t, i])
        mean = np.float32(total / n)
        scale = np.float32(1.0) / np.sqrt(mean + eps)
        for i in range(n):
            out[t, i] = (x[t, i] * scale) * weight[i]


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float, out: np.ndarray | None = None) -> np.ndarray:
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last axis of ``x`` ``(n_tok, n)`` or ``(n,)``."""
    shape = np.shape(x)
    rows = _rows(x)
    w = _rows(weight, rows.shape[1], "weight")[0]
    result = _row_output(out, shape, rows)
    _rms_norm_kernel(rows, w, np.float32(eps), result)
    return result.reshape(shape) if out is None else out


def reference_rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    x64 = np.asarray(x, np.float64)
    return x64 / np.sqrt(np.mean(x64 * x64, axis=-1, keepdims=True) + eps) * np.asarray(weight, np.float64)


@njit(cache=True)
def _layer_norm_kernel(x, weight, bias, has_bias, eps, out):
    n_tok, n = x.shape
    for t in range(n_tok):
        total = 0.0
        for i in range(n):
            total += x[t, i]
        mean = np.float32(total / n)
        total_sq = 0.0
        for i in range(n):
            centered = x[t, i] - mean
            out[t, i] = centered
            total_sq += np.float64(centered) * np.float64(centered)
        scale = np.float32(1.0) / np.sqrt(np.float32(total_sq / n) + eps)
        for i in range(n):
            value = (out[t, i] * scale) * weight[i]
            out[t, i] = value + bias[i] if has_bias else value


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, eps: float,
               out: np.ndarray | None = None) -> np.ndarray:
    """``(x - mean) / sqrt(var + eps) * weight (+ bias)`` over the last axis (biased variance)."""
    shape = np.shape(x)
    rows = _rows(x)
    w = _rows(weight, rows.shape[1], "weight")[0]
    b = w if bias is None else _rows(bias, rows.shape[1], "bias")[0]
    result = _row_output(out, shape, rows)
    _layer_norm_kernel(rows, w, b, bias is not None, np.float32(eps), result)
    return result.reshape(shape) if out is None else out


def reference_layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, eps: float) -> np.ndarray:
    x64 = np.asarray(x, np.float64)
    mean = x64.mean(axis=-1, keepdims=True)
    var = ((x64 - mean) ** 2).mean(axis=-1, keepdims=True)
    y = (x64 - mean) / np.sqrt(var + eps) * np.asarray(weight, np.float64)
    return y if bias is None else y + np.asarray(bias, np.float64)


# ---------------------------------------------------------------------------------------------
# Rotary position embedding
# ---------------------------------------------------------------------------------------------
#
# Dimension pair i (0 <= i < n_rot/2) of a head at position p turns by the angle
# (p / scale) * theta^(-2i/n_rot) / factor[i]. "normal" (ggml rope type 0, LLaMA GGUF files) pairs the
# adjacent dimensions (2i, 2i+1); "neox" (type 2, Falcon, HF rotate_half) pairs (i, i+n_rot/2).
# Dimensions from n_rot on are left alone. Angles are computed in float64. ``factor`` is
# ggml_rope_ext's freq_factors (a ``rope_freqs.weight`` tensor: Llama 3.1's frequency-dependent
# scaling); 1 everywhere without one.


@njit(cache=True)
def _rope_kernel(x, positions, n_rot, theta, scale, neox, factors, out):
    n_tok, n_head, head_dim = x.shape
    half = n_rot // 2
    cos = np.empty(half, np.float32)
    sin = np.empty(half, np.float32)
    for t in range(n_tok):
        position = positions[t] / scale
        for i in range(half):
            angle = position * theta ** (-2.0 * i / n_rot) / np.float64(factors[i])
            cos[i] = math.cos(angle)
            sin[i] = math.sin(angle)
        for h in range(n_head):
            src = x[t, h]
            dst = out[t, h]
            for i in range(half):
                a = 2 * i if not neox else i
                b = a + 1 if not neox else i + half
                x0 = src[a]
                x1 = src[b]
                dst[a] = x0 * cos[i] - x1 * sin[i]
                dst[b] = x0 * sin[i] + x1 * cos[i]
            for d in range(n_rot, head_dim):
                dst[d] = src[d]


def rope(x: np.ndarray, positions: np.ndarray, n_rot: int, theta: float = 10000.0, scale: float = 1.0,
         neox: bool = False, out: np.ndarray | None = None, freq_factors: np.ndarray | None = None) -> np.ndarray:
    """Rotate ``x`` ``(n_tok, n_head, head_dim)`` float32 for tokens at ``positions`` ``(n_tok,)``.

    In place by default (``out=None`` writes into ``x``, which must then be a writable
    float32 array, strided views included). ``scale`` is the linear RoPE scaling factor:
    positions are divided by it. ``freq_factors`` ``(n_rot/2,)`` divides each pair's frequency
    (ggml's ``rope_ext`` freq_factors, from a ``rope_freqs.weight`` tensor).
    """
    if x.ndim != 3:
        raise HalfbyteError(f"rope needs (n_tok, n_head, head_dim), got shape {x.shape}")
    head_dim = x.shape[2]
    if n_rot <= 0 or n_rot % 2 or n_rot > head_dim:
        raise HalfbyteError(f"rope needs an even n_rot in [2, head_dim={head_dim}], got {n_rot}")
    if scale <= 0:
        raise HalfbyteError(f"rope scaling factor must be positive, got {scale}")
    pos = np.ascontiguousarray(positions, dtype=np.float64).reshape(-1)
    if pos.size != x.shape[0]:
        raise HalfbyteError(f"rope got {pos.size} positions for {x.shape[0]} tokens")
    if freq_factors is None:
        factors = np.ones(n_rot // 2, np.float32)
    else:
        factors = np.ascontiguousarray(freq_factors, dtype=np.float32).reshape(-1)
        if factors.size != n_rot // 2 or not np.all(factors > 0) or not np.all(np.isfinite(factors)):
            raise HalfbyteError(f"rope frequency factors must be {n_rot // 2} positive finite numbers, "
                                f"got {factors.size} values")
    src = np.ascontiguousarray(x, dtype=np.float32)
    if out is not None:
        _rope_kernel(src, pos, n_rot, float(theta), float(scale), bool(neox), factors, _output(out, src.shape))
        return out
    if x.dtype != np.float32 or not x.flags.writeable:
        raise HalfbyteError("in-place rope needs a writable float32 array (or pass out=)")
    _rope_kernel(src, pos, n_rot, float(theta), float(scale), bool(neox), factors, src)
    if src is not x:  # a strided view (e.g. q of a fused QKV projection): write the result back
        x[...] = src
    return x


def reference_rope(x: np.ndarray, positions: np.ndarray, n_rot: int, theta: float = 10000.0,
                   scale: float = 1.0, neox: bool = False, freq_factors: np.ndarray | None = None) -> np.ndarray:
    x64 = np.array(x, dtype=np.float64)
    half = n_rot // 2
    inv_freq = theta ** (-2.0 * np.arange(half) / n_rot)
    if freq_factors is not None:
        inv_freq = inv_freq / np.asarray(freq_factors, np.float64)
    angles = (np.asarray(positions, np.float64) / scale)[:, None] * inv_freq[None, :]  # (n_tok, half)
    cos = np.cos(angles)[:, None, :]
    sin = np.sin(angles)[:, None, :]
    if neox:
        first, second = x64[..., :half].copy(), x64[..., half:n_rot].copy()
        x64[..., :half] = first * cos - second * sin
        x64[..., half:n_rot] = first * sin + second * cos
    else:
        even, odd = x64[..., 0:n_rot:2].copy(), x64[..., 1:n_rot:2].copy()
        x64[..., 0:n_rot:2] = even * cos - odd * sin
        x64[..., 1:n_rot:2] = even * sin + odd * cos
    return x64


# ---------------------------------------------------------------------------------------------
# ALiBi
# ---------------------------------------------------------------------------------------------


def alibi_slopes(n_head: int, max_bias: float) -> np.ndarray:
    """Per-head ALiBi slopes, float32, computed like ggml (``ggml_soft_max_ext``'s max_bias).

    With ``n = 2^floor(log2(n_head))``: ``m0 = 2^(-max_bias/n)``, ``m1 = 2^(-max_bias/2/n)``;
    head ``h < n`` gets ``m0^(h+1)``, the heads beyond get the odd powers ``m1^(2(h-n)+1)``.
    (For MPT, ``max_bias`` is ``alibi_bias_max``; the attention score of key j for the query
    at position i gets ``+ slope * (j - i)``.)
    """
    if n_head < 1:
        raise HalfbyteError(f"ALiBi needs at least one head, got {n_head}")
    n_log2 = 1 << int(math.floor(math.log2(n_head)))
    # ggml: m0 = powf(2.0f, -max_bias / n_head_log2) -- float32 exponent, float32 result.
    m0 = np.float32(2.0 ** float(np.float32(-max_bias) / np.float32(n_log2)))
    m1 = np.float32(2.0 ** float(np.float32(-max_bias / 2.0) / np.float32(n_log2)))
    slopes = np.empty(n_head, np.float32)
    for h in range(n_head):
        if h < n_log2:
            slopes[h] = np.float32(float(m0) ** (h + 1))
        else:
            slopes[h] = np.float32(float(m1) ** (2 * (h - n_log2) + 1))
    return slopes


# ---------------------------------------------------------------------------------------------
# Softmax and activations (element-wise kernels work on the flattened array)
# ---------------------------------------------------------------------------------------------


@njit(cache=True, error_model="numpy")  # no ZeroDivisionError branch: lets the loop vectorize
def _softmax_kernel(x, out):
    n_rows, n = x.shape
    for r in range(n_rows):
        peak = -np.inf
        for i in range(n):
            peak = max(peak, x[r, i])
        if peak == -np.inf:  # every entry masked: define the result as all zeros
            for i in range(n):
                out[r, i] = 0.0
            continue
        total = 0.0
        for i in range(n):
            out[r, i] = _expf(x[r, i] - peak)
        for i in range(n):
            total += out[r, i]
        inv = np.float32(1.0 / total)
        for i in range(n):
            out[r, i] *= inv


def softmax(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Numerically stable softmax over the last axis (max subtracted; ``-inf`` entries give 0)."""
    shape = np.shape(x)
    rows = _rows(x)
    result = _row_output(out, shape, rows)
    _softmax_kernel(rows, result)
    return result.reshape(shape) if out is None else out


def reference_softmax(x: np.ndarray) -> np.ndarray:
    x64 = np.asarray(x, np.float64)
    e = np.exp(x64 - x64.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


_SQRT_2_OVER_PI = np.float32(0.7978845608028654)
_GELU_COEF_A = np.float32(0.044715)
_INV_SQRT_2 = 0.7071067811865476


@njit(cache=True)
def _gelu_tanh_kernel(x, out):
    for i in range(x.size):
        v = x[i]
        out[i] = np.float32(0.5) * v * (np.float32(1.0) + np.tanh(_SQRT_2_OVER_PI * v * (np.float32(1.0)
                                                                                     + _GELU_COEF_A * v * v)))


@njit(cache=True)
def _gelu_erf_kernel(x, out):
    for i in range(x.size):
        v = np.float64(x[i])
        out[i] = 0.5 * v * (1.0 + math.erf(v * _INV_SQRT_2))


@intrinsic
def _f32_from_bits(typingctx, bits):
    """The float32 whose IEEE bits are the int32 ``bits`` (a register move; vectorizes)."""
    if not isinstance(bits, types.Integer) or bits.bitwidth != 32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(bits), codegen


_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693145751953125)  # ln 2 split so that n * _LN2_HI is exact for |n| < 2**8
_LN2_LO = np.float32(1.428606765330187e-06)


@njit(cache=True, inline="always", error_model="numpy")
def _expf(x):
    """exp(x) for float32 in straight-line arithmetic, so loops around it vectorize (libm's expf
    is a call per element: 5x slower here). exp(x) = 2**n * exp(r), n = round(x / ln 2),
    |r| <= ln(2) / 2, exp(r) by its degree-7 Taylor polynomial (truncation < 3e-9 relative);
    measured within 1e-7 relative (2 ulp) of exp in float64. Below -87.33, where float32 results
    turn subnormal, it returns 0 (and -inf gives 0); the input is capped at 88.37, where 2**n
    still fits (exp(88.37) = 2.5e38)."""
    c = min(x, np.float32(88.37))
    n = np.floor(c * _LOG2E + np.float32(0.5))
    r = c - n * _LN2_HI - n * _LN2_LO
    p = np.float32(1.0 / 5040.0)
    p = p * r + np.float32(1.0 / 720.0)
    p = p * r + np.float32(1.0 / 120.0)
    p = p * r + np.float32(1.0 / 24.0)
    p = p * r + np.float32(1.0 / 6.0)
    p = p * r + np.float32(0.5)
    p = p * r + np.float32(1.0)
    p = p * r + np.float32(1.0)
    # 2**n as float bits; n + 127 stays in [1, 254] for c in [-87.33, 88.37]
    scale = _f32_from_bits(np.int32((np.int32(max(n, np.float32(-126.0))) + np.int32(127)) << np.int32(23)))
    return p * scale if x >= np.float32(-87.33) else np.float32(0.0)


@njit(cache=True, error_model="numpy")  # no ZeroDivisionError branch: lets the loop vectorize
def _expf_kernel(x, out):
    for i in range(x.size):
        out[i] = _expf(x[i])


def expf(x: np.ndarray) -> np.ndarray:
    """Element-wise float32 exp with the kernels' vectorizable routine (for tests)."""
    src = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty_like(src)
    _expf_kernel(src.reshape(-1), out.reshape(-1))
    return out


@njit(cache=True, error_model="numpy")  # no ZeroDivisionError branch: lets the loop vectorize
def _silu_kernel(x, out):
    for i in range(x.size):
        v = x[i]
        out[i] = v / (np.float32(1.0) + _expf(-v))


@njit(cache=True, error_model="numpy")  # no ZeroDivisionError branch: lets the loop vectorize
def _swiglu_kernel(gate, up, out):
    for i in range(gate.size):
        g = gate[i]
        out[i] = g / (np.float32(1.0) + _expf(-g)) * up[i]


@njit(cache=True)
def _clamp_kernel(x, limit, out):
    for i in range(x.size):
        out[i] = min(max(x[i], -limit), limit)


def _elementwise(kernel, x: np.ndarray, out: np.ndarray | None, *extra: object) -> np.ndarray:
    src = np.ascontiguousarray(x, dtype=np.float32)
    result = _output(out, src.shape)
    kernel(src.reshape(-1), *extra, result.reshape(-1))
    return result


def gelu_tanh(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """GELU, tanh approximation: ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`` (ggml_gelu)."""
    return _elementwise(_gelu_tanh_kernel, x, out)


def gelu_erf(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Exact GELU ``0.5 x (1 + erf(x / sqrt(2)))``: what MPT and Falcon use."""
    return _elementwise(_gelu_erf_kernel, x, out)


def silu(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``x * sigmoid(x)``."""
    return _elementwise(_silu_kernel, x, out)


def swiglu(gate: np.ndarray, up: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """LLaMA's gated MLP activation ``silu(gate) * up``."""
    if np.shape(gate) != np.shape(up):
        raise HalfbyteError(f"swiglu needs gate and up of one shape, got {np.shape(gate)} and {np.shape(up)}")
    return _elementwise(_swiglu_kernel, gate, out, np.ascontiguousarray(up, dtype=np.float32).reshape(-1))


def clamp(x: np.ndarray, limit: float, out: np.ndarray | None = None) -> np.ndarray:
    """Clip to ``[-limit, limit]`` (MPT's ``clip_qkv``); ``out=x`` clamps in place."""
    if not limit > 0:
        raise HalfbyteError(f"clamp limit must be positive, got {limit}")
    return _elementwise(_clamp_kernel, x, out, np.float32(limit))


@njit(cache=True)
def _lora_kernel(x, a_t, b_t, factor, y):
    """y[t] += factor * ((x[t] A^T) B^T) with A^T = a_t (n_in, r) and B^T = b_t (r, n_out): every sum
    in input order, then rank order, one multiply and one add per term (no fast-math: no FMA, no
    reassociation), so the bits are the same on every CPU. The loops run along a_t's and b_t's rows,
    which LLVM vectorizes without changing any element's order."""
    n_tok, n_in = x.shape
    rank, n_out = b_t.shape
    s = np.empty(rank, np.float32)
    u = np.empty(n_out, np.float32)
    for t in range(n_tok):
        s[:] = 0.0
        for k in range(n_in):
            xk = x[t, k]
            for j in range(rank):
                s[j] += xk * a_t[k, j]
        u[:] = 0.0
        for j in range(rank):
            sj = s[j]
            for o in range(n_out):
                u[o] += sj * b_t[j, o]
        for o in range(n_out):
            y[t, o] += factor * u[o]


def add_lora(x: np.ndarray, a_t: np.ndarray, b_t: np.ndarray, factor: float, y: np.ndarray) -> None:
    """``y += factor * (x A^T) B^T`` in place, for ``a_t`` = A^T (n_in, r) and ``b_t`` = B^T (r, n_out), the
    same bits on every CPU (a BLAS product's sums follow the CPU's kernel: greedy text with an adapter
    differed between AVX2 and AVX-512 machines)."""
    _lora_kernel(_rows(x, a_t.shape[0]), a_t, b_t, np.float32(factor), y)


def reference_add_lora(x: np.ndarray, a_t: np.ndarray, b_t: np.ndarray, factor: float) -> np.ndarray:
    """``factor * (x A^T) B^T`` in float64."""
    return float(factor) * ((np.asarray(x, np.float64) @ a_t) @ b_t)


def reference_gelu_tanh(x: np.ndarray) -> np.ndarray:
    x64 = np.asarray(x, np.float64)
    return 0.5 * x64 * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x64 + 0.044715 * x64**3)))


def reference_gelu_erf(x: np.ndarray) -> np.ndarray:
    x64 = np.asarray(x, np.float64)
    return 0.5 * x64 * (1.0 + np.vectorize(math.erf, otypes=[np.float64])(x64 / math.sqrt(2.0)))


def reference_silu(x: np.ndarray) -> np.ndarray:
    x64 = np.asarray(x, np.float64)
    return x64 / (1.0 + np.exp(-x64))


def reference_swiglu(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    return reference_silu(gate) * np.asarray(up, np.float64)
