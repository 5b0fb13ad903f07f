"""Writers for llama.cpp's K-quants (Q2_K..Q6_K) and 4-bit non-linear quants (IQ4_NL, IQ4_XS).

Bytes are identical to what ``llama-quantize`` writes without an importance matrix, i.e. to
ggml-quants.c's functions with ``quant_weights == NULL``:

    Q2_K..Q6_K  quantize_q*_K -> quantize_row_q*_K_ref  (the *_impl variants run only with an imatrix)
    IQ4_NL      quantize_iq4_nl: per 32-block search, ntry = 7, weights x^2   (NOT quantize_row_iq4_nl_ref,
                which uses ntry = -1 and is what ggml's CPU backend uses for activations)
    IQ4_XS      quantize_iq4_xs: the same search per 32-block, then 6-bit block scales under one fp16 scale

ggml-base is compiled with ``-O3`` and no ``-ffast-math``/``-march``: every operation is a float32
IEEE operation in source order (no FMA contraction, sums accumulated left to right).  Both
implementations here repeat that order: the Numba kernels (``@njit``, no fastmath, so LLVM neither
reassociates nor fuses) and the numpy references (``reference_quantize``), which vectorize over
blocks but keep each sum sequential (``np.cumsum``, a left fold) and each scalar operation float32.

Details that decide bytes:

* ``nearest_int(f)`` is ggml's bit trick ``bits(f + 12582912.f) & 0x7fffff - 0x400000``: round half to
  even for |f| < 2**22, defined (and repeated here) for larger values too.
* Integers stored into 8-bit fields keep their low byte (C conversion of ``int`` to ``uint8_t``/``int8_t``).
* fp16 conversion is ggml's ``GGML_FP32_TO_FP16``: round to nearest even, overflow to inf, NaN -> 0x7E00
  with the sign kept.  IQ4_XS with an all-zero super-block stores d = -0.0 (0x8000), as ggml does.
* Input with NaN or inf: the bytes are deterministic but not promised equal to ggml's (llama-quantize's
  row validation rejects such rows anyway).

Block layouts (bytes): Q2_K 84 = scales[16] qs[64] d dmin; Q3_K 110 = hmask[32] qs[64] scales[12] d;
Q4_K 144 = d dmin scales[12] qs[128]; Q5_K 176 = d dmin scales[12] qh[32] qs[128];
Q6_K 210 = ql[128] qh[64] scales[16] d; IQ4_NL 18 = d qs[16]; IQ4_XS 136 = d scales_h:u16 scales_l[4] qs[128].

Kernels take contiguous 1-D float32 values (whole blocks) and a 2-D ``(n_blocks, type_size)`` uint8
output (dequantize: the reverse, plus the fp16 table), the contract of ``engine.kernels.quant``;
blocks are independent, so the result does not depend on the thread count.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from numba import njit, prange

QT = GGMLQuantizationType
QK_K = 256
QK4_NL = 32
GROUP_MAX_EPS = np.float32(1e-15)
KVALUES_IQ4NL = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.int8)
BLOCK = {QT.Q2_K: (256, 84), QT.Q3_K: (256, 110), QT.Q4_K: (256, 144), QT.Q5_K: (256, 176),
         QT.Q6_K: (256, 210), QT.IQ4_NL: (32, 18), QT.IQ4_XS: (256, 136)}
TYPES = tuple(BLOCK)

_MAGIC = np.float32(12582912.0)
_F0 = np.float32(0.0)
_F1 = np.float32(1.0)
_TENTH = np.float32(0.1)
_BLOCKS_PER_TASK = 32


# ---------------------------------------------------------------------------------------------
# Numba kernels
# ---------------------------------------------------------------------------------------------


@njit(cache=True, inline="always")
def _nearest_int(f):
    v = np.float32(np.float32(f) + _MAGIC)
    return np.int64((v.view(np.int32) & 0x7FFFFF) - 0x400000)


@njit(cache=True)
def _f16_bits(value):
    """ggml's fp32 -> fp16 (round to nearest even; NaN -> sign | 0x7E00), as an int."""
    bits = np.float32(value).view(np.uint32)
    sign = np.int64((bits >> 16) & 0x8000)
    if (bits & 0x7FFFFFFF) > 0x7F800000:
        return sign | 0x7E00
    exponent = np.int64(bits & 0x7F800000)
    mantissa = np.int64(bits & 0x007FFFFF)
    if exponent >= 0x47800000:  # |value| >= 2**16: overflow (or inf)
        return sign | 0x7C00
    if exponent <= 0x38000000:  # |value| < 2**-14: fp16 subnormal or zero
        biased = exponent >> 23
        if biased < 102:
            return sign
        significand = mantissa | 0x00800000
        shift = 126 - biased
        half = significand >> shift
        rest = significand & ((np.int64(1) << shift) - 1)
        tie = np.int64(1) << (shift - 1)
        if rest > tie or (rest == tie and (half & 1) == 1):
            half += 1
        return sign | half
    half = ((exponent - 0x38000000) >> 13) + (mantissa >> 13)
    rest = mantissa & 0x1FFF
    if rest > 0x1000 or (rest == 0x1000 and (half & 1) == 1):
        half += 1
    return sign | half


@njit(cache=True, inline="always")
def _f16_value(bits):
    """fp16 bits -> float32 (exact)."""
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
def _put_f16(out, offset, bits):
    out[offset] = bits & 0xFF
    out[offset + 1] = (bits >> 8) & 0xFF


@njit(cache=True)
def _make_qkx2(x, w, L, Laux, nmax, rmin, rdelta, nstep, use_mad):
    """ggml make_qkx2_quants: codes 0..nmax with a scale and a (non-positive) min, searched over
    nstep + 1 trial scales by weighted least squares.  Returns (scale, -min)."""
    n = x.size
    lo = x[0]
    hi = x[0]
    sum_w = w[0]
    sum_x = sum_w * x[0]
    for i in range(1, n):
        if x[i] < lo:
            lo = x[i]
        if x[i] > hi:
            hi = x[i]
        sum_w += w[i]
        sum_x += w[i] * x[i]
    if lo > _F0:
        lo = _F0
    if hi == lo:
        for i in range(n):
            L[i] = 0
        return _F0, -lo
    fmax = np.float32(nmax)
    iscale = fmax / (hi - lo)
    scale = _F1 / iscale
    best = _F0
    for i in range(n):
        q = min(max(_nearest_int(iscale * (x[i] - lo)), 0), nmax)
        L[i] = q
        diff = scale * np.float32(q) + lo - x[i]
        diff = abs(diff) if use_mad else diff * diff
        best += w[i] * diff
    if nstep < 1:
        return scale, -lo
    for step in range(nstep + 1):
        iscale = (rmin + rdelta * np.float32(step) + fmax) / (hi - lo)
        sum_l = _F0
        sum_l2 = _F0
        sum_xl = _F0
        for i in range(n):
            q = min(max(_nearest_int(iscale * (x[i] - lo)), 0), nmax)
            Laux[i] = q
            fq = np.float32(q)
            sum_l += w[i] * fq
            sum_l2 += w[i] * fq * fq
            sum_xl += w[i] * fq * x[i]
        D = sum_w * sum_l2 - sum_l * sum_l
        if D > _F0:
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            if this_min > _F0:
                this_min = _F0
                this_scale = sum_xl / sum_l2
            err = _F0
            for i in range(n):
                diff = this_scale * np.float32(Laux[i]) + this_min - x[i]
                diff = abs(diff) if use_mad else diff * diff
                err += w[i] * diff
            if err < best:
                for i in range(n):
                    L[i] = Laux[i]
                best = err
                scale = this_scale
                lo = this_min
    return scale, -lo


@njit(cache=True)
def _make_q3(x, L, nmax):
    """ggml make_q3_quants(do_rmse=true): codes -nmax..nmax-1 (stored + nmax), refined one weight at
    a time (weights x^2) for up to 5 passes.  Returns the scale."""
    n = x.size
    amax = _F0
    vmax = _F0
    for i in range(n):
        ax = abs(x[i])
        if ax > amax:
            amax = ax
            vmax = x[i]
    if amax < GROUP_MAX_EPS:
        for i in range(n):
            L[i] = 0
        return _F0
    iscale = np.float32(-nmax) / vmax
    sumlx = _F0
    suml2 = _F0
    for i in range(n):
        q = min(max(_nearest_int(iscale * x[i]), -nmax), nmax - 1)
        L[i] = q
        w = x[i] * x[i]
        sumlx += w * x[i] * np.float32(q)
        suml2 += w * np.float32(q) * np.float32(q)
    for _ in range(5):
        changed = 0
        for i in range(n):
            w = x[i] * x[i]
            fl = np.float32(L[i])
            slx = sumlx - w * x[i] * fl
            if slx > _F0:
                sl2 = suml2 - w * fl * fl
                new_l = min(max(_nearest_int(x[i] * sl2 / slx), -nmax), nmax - 1)
                if new_l != L[i]:
                    fn = np.float32(new_l)
                    slx += w * x[i] * fn
                    sl2 += w * fn * fn
                    if sl2 > _F0 and slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = new_l
                        sumlx = slx
                        suml2 = sl2
                        changed += 1
        if changed == 0:
            break
    for i in range(n):
        L[i] += nmax
    return sumlx / suml2 if suml2 > _F0 else _F0


@njit(cache=True)
def _make_qx(x, L, nmax):
    """ggml make_qx_quants(rmse_type=1, qw=NULL): codes -nmax..nmax-1 (stored + nmax), best of 19
    trial scales by x^2-weighted least squares.  Returns the scale."""
    n = x.size
    amax = _F0
    vmax = _F0
    for i in range(n):
        ax = abs(x[i])
        if ax > amax:
            amax = ax
            vmax = x[i]
    if amax < GROUP_MAX_EPS:
        for i in range(n):
            L[i] = 0
        return _F0
    iscale = np.float32(-nmax) / vmax
    sumlx = _F0
    suml2 = _F0
    for i in range(n):
        q = min(max(_nearest_int(iscale * x[i]), -nmax), nmax - 1)
        L[i] = q + nmax
        w = x[i] * x[i]
        fq = np.float32(q)
        sumlx += w * x[i] * fq
        suml2 += w * fq * fq
    scale = sumlx / suml2 if suml2 != _F0 else _F0
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(np.float32(nmax) + _TENTH * np.float32(step)) / vmax
        sumlx = _F0
        suml2 = _F0
        for i in range(n):
            fq = np.float32(min(max(_nearest_int(iscale * x[i]), -nmax), nmax - 1))
            w = x[i] * x[i]
            sumlx += w * x[i] * fq
            suml2 += w * fq * fq
        if suml2 > _F0 and sumlx * sumlx > best * suml2:
            for i in range(n):
                L[i] = nmax + min(max(_nearest_int(iscale * x[i]), -nmax), nmax - 1)
            scale = sumlx / suml2
            best = scale * sumlx
    return scale


@njit(cache=True, inline="always")
def _best_index(values, v):
    """ggml best_index_int8: index of the nearest of the 16 sorted values (ties to the upper one)."""
    if v <= np.float32(values[0]):
        return 0
    if v >= np.float32(values[15]):
        return 15
    ml = 0
    mu = 15
    while mu - ml > 1:
        mid = (ml + mu) // 2
        if v < np.float32(values[mid]):
            mu = mid
        else:
            ml = mid
    return mu - 1 if v - np.float32(values[mu - 1]) < np.float32(values[mu]) - v else mu


_KVALUES_F32 = KVALUES_IQ4NL.astype(np.float32)


@njit(cache=True, inline="always")
def _nearest_value(v):
    """``_best_index`` without branches (what the IQ4 search spends its time on): with c = the number of
    values[1:] <= v, v lies in [values[c], values[c + 1]); the same tie rule, the same ends, NaN -> 15."""
    c = 0
    for k in range(1, 16):
        c += 1 if v >= _KVALUES_F32[k] else 0
    lo = min(c, 14)
    pick = lo if v - _KVALUES_F32[lo] < _KVALUES_F32[lo + 1] - v else lo + 1
    pick = 0 if v <= _KVALUES_F32[0] else pick
    return 15 if v != v else pick


@njit(cache=True, inline="always")
def _iq4_sums(x, inv, idx):
    """Weighted sums of the codes of ``inv * x`` (weights x^2): the indices first (a loop without
    dependencies), then the sums in order, as ggml's loop adds them."""
    n = x.size
    for j in range(n):
        idx[j] = _nearest_value(inv * x[j])
    sumqx = _F0
    sumq2 = _F0
    for j in range(n):
        q = _KVALUES_F32[idx[j]]
        w = x[j] * x[j]
        sumqx += w * q * x[j]
        sumq2 += w * q * q
    return sumqx, sumq2


@njit(cache=True)
def _iq4_scale(x, values, ntry):
    """Scale of one 32-block in ggml quantize_row_iq4_nl_impl without quant_weights (weights x^2):
    the least-squares scale for the codes of d = max/127, then of 2*ntry+1 trial scales."""
    n = x.size
    amax = _F0
    vmax = _F0
    for j in range(n):
        ax = abs(x[j])
        if ax > amax:
            amax = ax
            vmax = x[j]
    if amax < GROUP_MAX_EPS:
        return _F0, False
    idx = np.empty(n, np.int64)
    v0 = np.float32(values[0])
    d = -vmax / v0 if ntry > 0 else vmax / v0
    sumqx, sumq2 = _iq4_sums(x, _F1 / d, idx)
    d = sumqx / sumq2 if sumq2 > _F0 else _F0
    best = d * sumqx
    for itry in range(-ntry, ntry + 1):
        sumqx, sumq2 = _iq4_sums(x, np.float32(itry + values[0]) / vmax, idx)
        if sumq2 > _F0 and sumqx * sumqx > best * sumq2:
            d = sumqx / sumq2
            best = d * sumqx
    return d, True


@njit(cache=True, inline="always")
def _pack_2bit(L, out, o):
    """qs[j/4 + l] = L[j+l] | L[j+l+32] << 2 | L[j+l+64] << 4 | L[j+l+96] << 6 for j = 0, 128."""
    for j in range(0, QK_K, 128):
        for l in range(32):
            out[o + j // 4 + l] = L[j + l] | (L[j + l + 32] << 2) | (L[j + l + 64] << 4) | (L[j + l + 96] << 6)


@njit(cache=True)
def _q2_k_block(x, out, L, Laux, w, scales, mins):
    for j in range(16):
        xs = x[16 * j : 16 * j + 16]
        for l in range(16):
            w[l] = abs(xs[l])
        scales[j], mins[j] = _make_qkx2(xs, w[:16], L[16 * j : 16 * j + 16], Laux[:16], 3,
                                        np.float32(-0.5), _TENTH, 15, True)
    max_scale = _F0
    max_min = _F0
    for j in range(16):
        if scales[j] > max_scale:
            max_scale = scales[j]
        if mins[j] > max_min:
            max_min = mins[j]
    q4scale = np.float32(15.0)
    if max_scale > _F0:
        iscale = q4scale / max_scale
        for j in range(16):
            out[j] = _nearest_int(iscale * scales[j]) & 0xFF
        d_bits = _f16_bits(max_scale / q4scale)
    else:
        for j in range(16):
            out[j] = 0
        d_bits = _f16_bits(_F0)
    if max_min > _F0:
        iscale = q4scale / max_min
        for j in range(16):
            out[j] = (np.int64(out[j]) | (_nearest_int(iscale * mins[j]) << 4)) & 0xFF
        m_bits = _f16_bits(max_min / q4scale)
    else:
        m_bits = _f16_bits(_F0)
    _put_f16(out, 80, d_bits)
    _put_f16(out, 82, m_bits)
    d_all = _f16_value(d_bits)
    m_all = _f16_value(m_bits)
    for j in range(16):
        sc = np.int64(out[j])
        d = d_all * np.float32(sc & 0xF)
        if d == _F0:
            continue
        dm = m_all * np.float32(sc >> 4)
        for i in range(16):
            L[16 * j + i] = min(max(_nearest_int((x[16 * j + i] + dm) / d), 0), 3)
    _pack_2bit(L, out, 16)


@njit(cache=True)
def _q3_k_block(x, out, L, scales):
    max_scale = _F0
    amax = _F0
    for j in range(16):
        scales[j] = _make_q3(x[16 * j : 16 * j + 16], L[16 * j : 16 * j + 16], 4)
        a = abs(scales[j])
        if a > amax:
            amax = a
            max_scale = scales[j]
    for k in range(96, 108):
        out[k] = 0
    if max_scale != _F0:
        iscale = np.float32(-32.0) / max_scale
        for j in range(16):
            l8 = _nearest_int(iscale * scales[j]) & 0xFF  # stored in an int8_t
            if l8 >= 128:
                l8 -= 256
            code = min(max(l8, -32), 31) + 32
            if j < 8:
                out[96 + j] = code & 0xF
            else:
                out[96 + j - 8] = np.int64(out[96 + j - 8]) | ((code & 0xF) << 4)
            out[104 + j % 4] = np.int64(out[104 + j % 4]) | ((code >> 4) << (2 * (j // 4)))
        d_bits = _f16_bits(_F1 / iscale)
    else:
        d_bits = _f16_bits(_F0)
    _put_f16(out, 108, d_bits)
    d_all = _f16_value(d_bits)
    for j in range(16):
        low = np.int64(out[96 + j]) & 0xF if j < 8 else np.int64(out[96 + j - 8]) >> 4
        sc = (low | (((np.int64(out[104 + j % 4]) >> (2 * (j // 4))) & 3) << 4)) - 32
        d = d_all * np.float32(sc)
        if d == _F0:
            continue
        for i in range(16):
            L[16 * j + i] = min(max(_nearest_int(x[16 * j + i] / d), -4), 3) + 4
    for k in range(32):
        out[k] = 0
    for j in range(QK_K):
        if L[j] > 3:
            out[j % 32] = np.int64(out[j % 32]) | (1 << (j // 32))
            L[j] -= 4
    _pack_2bit(L, out, 32)


@njit(cache=True)
def _pack_scales_k4(out, o, ls, lm, j):
    """6-bit scale ls and min lm of sub-block j into the 12 bytes at out[o:] (get_scale_min_k4's inverse)."""
    if j < 4:
        out[o + j] = ls
        out[o + j + 4] = lm
    else:
        out[o + j + 4] = (ls & 0xF) | ((lm & 0xF) << 4)
        out[o + j - 4] = np.int64(out[o + j - 4]) | ((ls >> 4) << 6)
        out[o + j] = np.int64(out[o + j]) | ((lm >> 4) << 6)


@njit(cache=True)
def _scale_min_k4(out, o, j):
    a = np.int64(out[o + j])
    b = np.int64(out[o + j + 4])
    if j < 4:
        return a & 63, b & 63
    c = np.int64(out[o + j - 4])
    return (b & 0xF) | ((c >> 6) << 4), (b >> 4) | ((a >> 6) << 4)


@njit(cache=True)
def _q45_k_block(x, out, L, Laux, w, scales, mins, five):
    nmax = 31 if five else 15
    rmin = np.float32(-0.5) if five else np.float32(-1.0)
    nstep = 15 if five else 20
    for j in range(8):
        xs = x[32 * j : 32 * j + 32]
        sum_x2 = _F0
        for l in range(32):
            sum_x2 += xs[l] * xs[l]
        av_x = np.sqrt(sum_x2 / np.float32(32.0))
        for l in range(32):
            w[l] = av_x + abs(xs[l])
        scales[j], mins[j] = _make_qkx2(xs, w, L[32 * j : 32 * j + 32], Laux, nmax, rmin, _TENTH, nstep, False)
    max_scale = _F0
    max_min = _F0
    for j in range(8):
        if scales[j] > max_scale:
            max_scale = scales[j]
        if mins[j] > max_min:
            max_min = mins[j]
    f63 = np.float32(63.0)
    inv_scale = f63 / max_scale if max_scale > _F0 else _F0
    inv_min = f63 / max_min if max_min > _F0 else _F0
    for k in range(4, 16):
        out[k] = 0
    for j in range(8):
        ls = min(_nearest_int(inv_scale * scales[j]) & 0xFF, 63)
        lm = min(_nearest_int(inv_min * mins[j]) & 0xFF, 63)
        _pack_scales_k4(out, 4, ls, lm, j)
    d_bits = _f16_bits(max_scale / f63)
    m_bits = _f16_bits(max_min / f63)
    _put_f16(out, 0, d_bits)
    _put_f16(out, 2, m_bits)
    d_all = _f16_value(d_bits)
    m_all = _f16_value(m_bits)
    for j in range(8):
        sc, m = _scale_min_k4(out, 4, j)
        d = d_all * np.float32(sc)
        if d == _F0:
            continue
        dm = m_all * np.float32(m)
        for i in range(32):
            L[32 * j + i] = min(max(_nearest_int((x[32 * j + i] + dm) / d), 0), nmax)
    if five:
        for k in range(32):
            out[16 + k] = 0
        for n in range(4):
            for j in range(32):
                l1 = L[64 * n + j]
                if l1 > 15:
                    l1 -= 16
                    out[16 + j] = np.int64(out[16 + j]) | (1 << (2 * n))
                l2 = L[64 * n + j + 32]
                if l2 > 15:
                    l2 -= 16
                    out[16 + j] = np.int64(out[16 + j]) | (2 << (2 * n))
                out[48 + 32 * n + j] = l1 | (l2 << 4)
    else:
        for n in range(4):
            for j in range(32):
                out[16 + 32 * n + j] = L[64 * n + j] | (L[64 * n + j + 32] << 4)


@njit(cache=True)
def _q6_k_block(x, out, L, scales):
    max_scale = _F0
    max_abs = _F0
    for j in range(16):
        scales[j] = _make_qx(x[16 * j : 16 * j + 16], L[16 * j : 16 * j + 16], 32)
        a = abs(scales[j])
        if a > max_abs:
            max_abs = a
            max_scale = scales[j]
    if max_abs < GROUP_MAX_EPS:
        for k in range(210):
            out[k] = 0
        return
    iscale = np.float32(-128.0) / max_scale
    _put_f16(out, 208, _f16_bits(_F1 / iscale))
    d_all = _f16_value(np.int64(out[208]) | (np.int64(out[209]) << 8))
    for j in range(16):
        out[192 + j] = min(127, _nearest_int(iscale * scales[j])) & 0xFF
    for j in range(16):
        sc = np.int64(out[192 + j])
        if sc >= 128:
            sc -= 256
        d = d_all * np.float32(sc)
        if d == _F0:
            continue
        for i in range(16):
            L[16 * j + i] = min(max(_nearest_int(x[16 * j + i] / d), -32), 31) + 32
    for half in range(2):
        j = 128 * half
        for l in range(32):
            a, b, c, e = L[j + l], L[j + l + 32], L[j + l + 64], L[j + l + 96]
            out[64 * half + l] = (a & 0xF) | ((c & 0xF) << 4)
            out[64 * half + l + 32] = (b & 0xF) | ((e & 0xF) << 4)
            out[128 + 32 * half + l] = (a >> 4) | ((b >> 4) << 2) | ((c >> 4) << 4) | ((e >> 4) << 6)


@njit(cache=True)
def _iq4_nl_block(x, out, values):
    d, _ = _iq4_scale(x, values, 7)
    _put_f16(out, 0, _f16_bits(d))
    inv = _F1 / d if d != _F0 else _F0
    for j in range(16):
        out[2 + j] = _best_index(values, inv * x[j]) | (_best_index(values, inv * x[16 + j]) << 4)


@njit(cache=True)
def _iq4_xs_block(x, out, values, scales):
    max_scale = _F0
    amax = _F0
    for ib in range(8):
        scales[ib], nonzero = _iq4_scale(x[32 * ib : 32 * ib + 32], values, 7)
        if nonzero and abs(scales[ib]) > amax:
            amax = abs(scales[ib])
            max_scale = scales[ib]
    d = -max_scale / np.float32(32.0)
    _put_f16(out, 0, _f16_bits(d))
    inv = _F1 / d if d != _F0 else _F0
    scales_h = 0
    for ib in range(8):
        l = min(max(_nearest_int(inv * scales[ib]), -32), 31)
        dl = d * np.float32(l)
        idl = _F1 / dl if dl != _F0 else _F0
        for j in range(16):
            lo = _best_index(values, idl * x[32 * ib + j])
            hi = _best_index(values, idl * x[32 * ib + 16 + j])
            out[8 + 16 * ib + j] = lo | (hi << 4)
        l += 32
        if ib % 2 == 0:
            out[4 + ib // 2] = l & 0xF
        else:
            out[4 + ib // 2] = np.int64(out[4 + ib // 2]) | ((l & 0xF) << 4)
        scales_h |= (l >> 4) << (2 * ib)
    out[2] = scales_h & 0xFF
    out[3] = scales_h >> 8


@njit(cache=True, parallel=True)
def _quantize(kind, values, blocks):
    """All blocks of ``values`` (1-D float32, whole blocks) into ``blocks`` (n_blocks, type_size)."""
    n_blocks = blocks.shape[0]
    size = values.size // n_blocks if n_blocks else 0
    n_tasks = (n_blocks + _BLOCKS_PER_TASK - 1) // _BLOCKS_PER_TASK
    values_iq4 = KVALUES_IQ4NL.astype(np.int64)
    for task in prange(n_tasks):
        L = np.empty(QK_K, np.int64)
        Laux = np.empty(32, np.int64)
        w = np.empty(32, np.float32)
        scales = np.empty(16, np.float32)
        mins = np.empty(16, np.float32)
        for b in range(task * _BLOCKS_PER_TASK, min(n_blocks, (task + 1) * _BLOCKS_PER_TASK)):
            x = values[b * size : (b + 1) * size]
            out = blocks[b]
            if kind == 10:
                _q2_k_block(x, out, L, Laux, w, scales, mins)
            elif kind == 11:
                _q3_k_block(x, out, L, scales)
            elif kind == 12:
                _q45_k_block(x, out, L, Laux, w, scales, mins, False)
            elif kind == 13:
                _q45_k_block(x, out, L, Laux, w, scales, mins, True)
            elif kind == 14:
                _q6_k_block(x, out, L, scales)
            elif kind == 20:
                _iq4_nl_block(x, out, values_iq4)
            else:
                _iq4_xs_block(x, out, values_iq4, scales)


def _quantizer(qtype):
    kind = int(qtype)

    def kernel(values: np.ndarray, blocks: np.ndarray) -> None:
        _quantize(kind, values, blocks)

    kernel.__name__ = f"quantize_{qtype.name.lower()}"
    kernel.__doc__ = f"1-D float32 values (whole blocks) -> {qtype.name} blocks (n_blocks, {BLOCK[qtype][1]})."
    return kernel


quantize_q2_k = _quantizer(QT.Q2_K)
quantize_q3_k = _quantizer(QT.Q3_K)
quantize_q4_k = _quantizer(QT.Q4_K)
quantize_q5_k = _quantizer(QT.Q5_K)
quantize_q6_k = _quantizer(QT.Q6_K)
quantize_iq4_nl = _quantizer(QT.IQ4_NL)
quantize_iq4_xs = _quantizer(QT.IQ4_XS)


# ---- dequantization (Q2_K, Q3_K, IQ4_NL, IQ4_XS; Q4_K..Q6_K live in kquants.py), operation for
# operation as gguf.quants: Q2_K (d*sc)*q - dmin*m, Q3_K (d*sc)*q, IQ4_NL d*v, IQ4_XS (d*sc)*v.


@njit(cache=True, inline="always")
def _load_f16(blocks, b, o, f16_to_f32):
    return f16_to_f32[np.int64(blocks[b, o]) | (np.int64(blocks[b, o + 1]) << 8)]


@njit(cache=True, parallel=True)
def dequantize_q2_k(blocks, f16_to_f32, out):
    for b in prange(blocks.shape[0]):
        d = _load_f16(blocks, b, 80, f16_to_f32)
        dmin = _load_f16(blocks, b, 82, f16_to_f32)
        for j in range(16):
            sc = np.int64(blocks[b, j])
            dl = d * np.float32(sc & 0xF)
            ml = dmin * np.float32(sc >> 4)
            half, sub = j // 8, j % 8  # 16-weight group j: 2-bit field (sub // 2), bytes 16 * (sub % 2)
            shift = 2 * (sub // 2)
            q0 = 16 + 32 * half + 16 * (sub % 2)
            for i in range(16):
                out[b * QK_K + 16 * j + i] = dl * np.float32((np.int64(blocks[b, q0 + i]) >> shift) & 3) - ml


@njit(cache=True, parallel=True)
def dequantize_q3_k(blocks, f16_to_f32, out):
    for b in prange(blocks.shape[0]):
        d = _load_f16(blocks, b, 108, f16_to_f32)
        for j in range(16):
            low = np.int64(blocks[b, 96 + j]) & 0xF if j < 8 else np.int64(blocks[b, 96 + j - 8]) >> 4
            sc = (low | (((np.int64(blocks[b, 104 + j % 4]) >> (2 * (j // 4))) & 3) << 4)) - 32
            dl = d * np.float32(sc)
            half, sub = j // 8, j % 8
            shift = 2 * (sub // 2)
            q0 = 32 + 32 * half + 16 * (sub % 2)
            h0 = 16 * (sub % 2)
            bit = 4 * half + sub // 2
            for i in range(16):
                q = (np.int64(blocks[b, q0 + i]) >> shift) & 3
                if not (np.int64(blocks[b, h0 + i]) >> bit) & 1:
                    q -= 4
                out[b * QK_K + 16 * j + i] = dl * np.float32(q)


@njit(cache=True, parallel=True)
def dequantize_iq4_nl(blocks, f16_to_f32, out):
    for b in prange(blocks.shape[0]):
        d = _load_f16(blocks, b, 0, f16_to_f32)
        for j in range(16):
            q = np.int64(blocks[b, 2 + j])
            out[b * 32 + j] = d * np.float32(KVALUES_IQ4NL[q & 0xF])
            out[b * 32 + 16 + j] = d * np.float32(KVALUES_IQ4NL[q >> 4])


@njit(cache=True, parallel=True)
def dequantize_iq4_xs(blocks, f16_to_f32, out):
    for b in prange(blocks.shape[0]):
        d = _load_f16(blocks, b, 0, f16_to_f32)
        scales_h = np.int64(blocks[b, 2]) | (np.int64(blocks[b, 3]) << 8)
        for ib in range(8):
            low = (np.int64(blocks[b, 4 + ib // 2]) >> (4 * (ib % 2))) & 0xF
            sc = (low | (((scales_h >> (2 * ib)) & 3) << 4)) - 32
            dl = d * np.float32(sc)
            for j in range(16):
                q = np.int64(blocks[b, 8 + 16 * ib + j])
                out[b * QK_K + 32 * ib + j] = dl * np.float32(KVALUES_IQ4NL[q & 0xF])
                out[b * QK_K + 32 * ib + 16 + j] = dl * np.float32(KVALUES_IQ4NL[q >> 4])


QUANTIZERS = {QT.Q2_K: quantize_q2_k, QT.Q3_K: quantize_q3_k, QT.Q4_K: quantize_q4_k, QT.Q5_K: quantize_q5_k,
              QT.Q6_K: quantize_q6_k, QT.IQ4_NL: quantize_iq4_nl, QT.IQ4_XS: quantize_iq4_xs}
DEQUANTIZERS = {QT.Q2_K: dequantize_q2_k, QT.Q3_K: dequantize_q3_k, QT.IQ4_NL: dequantize_iq4_nl,
                QT.IQ4_XS: dequantize_iq4_xs}


# ---------------------------------------------------------------------------------------------
# Plain numpy references: the same algorithms, vectorized over blocks, sums kept sequential.
# Slower, written for reading; the tests compare the Numba kernels and llama-quantize with them.
# ---------------------------------------------------------------------------------------------

_f32 = np.float32


def _np_nearest_int(f: np.ndarray) -> np.ndarray:
    """ggml nearest_int, elementwise: low mantissa bits of f + 1.5 * 2**23."""
    v = np.asarray(f, dtype=np.float32) + _MAGIC
    return ((v.view(np.int32) & 0x7FFFFF) - 0x400000).astype(np.int64)


def _np_f16_bits(v) -> np.ndarray:
    """GGML_FP32_TO_FP16: numpy's rounding (nearest even, overflow to inf); NaN -> sign | 0x7E00."""
    v = np.asarray(v, dtype=np.float32)
    with np.errstate(over="ignore"):
        bits = v.astype(np.float16).view(np.uint16).astype(np.int64)
    return np.where(np.isnan(v), (v.view(np.uint32).astype(np.int64) >> 16) & 0x8000 | 0x7E00, bits)


def _np_f16_value(bits) -> np.ndarray:
    return np.asarray(bits, dtype=np.uint16).view(np.float16).astype(np.float32)


def _seq_sum(terms: np.ndarray) -> np.ndarray:
    """``float s = 0; for (...) s += t;`` over the last axis: a left fold in float32 (np.cumsum),
    the + 0 turns an all -0.0 sum into +0.0 as the C loop starting from 0 does."""
    return np.cumsum(terms, axis=-1, dtype=np.float32)[..., -1] + _f32(0)


def _first_absmax(x: np.ndarray) -> np.ndarray:
    """``x[i]`` at the first largest |x[i]| of each row, 0 if no |x[i]| > 0: the C loops
    ``amax = max = 0; if (fabsf(x[i]) > amax) {amax = fabsf(x[i]); max = x[i];}`` (NaN never taken)."""
    a = np.abs(x)
    a = np.where(np.isnan(a), np.float32(-1), a)
    i = np.argmax(a, axis=-1)[..., None]
    return np.where(np.take_along_axis(a, i, axis=-1)[..., 0] > 0, np.take_along_axis(x, i, axis=-1)[..., 0], _f32(0))


def _positive_max(x: np.ndarray) -> np.ndarray:
    """``m = 0; if (x[i] > m) m = x[i];`` over the last axis (NaN never taken)."""
    return np.where(x > 0, x, _f32(0)).max(axis=-1)


def ref_make_qkx2(x, w, nmax, rmin, rdelta, nstep, use_mad):
    """make_qkx2_quants for every row of x (B, n): returns scale (B,), -min (B,), codes (B, n)."""
    nmax_f, rmin, rdelta = _f32(nmax), _f32(rmin), _f32(rdelta)
    sum_w = np.cumsum(w, axis=1, dtype=np.float32)[:, -1]
    sum_x = np.cumsum(w * x, axis=1, dtype=np.float32)[:, -1]
    lo = np.minimum(x.min(axis=1), _f32(0))
    hi = x.max(axis=1)
    flat = hi == lo

    def codes(iscale):
        return np.clip(_np_nearest_int(iscale * (x - lo[:, None])), 0, nmax)

    def error(scale, mins, L):
        diff = scale[:, None] * L.astype(np.float32) + mins[:, None] - x
        return _seq_sum(w * (np.abs(diff) if use_mad else diff * diff))

    iscale = (nmax_f / (hi - lo))[:, None]
    scale = (_f32(1) / iscale)[:, 0]
    L = codes(iscale)
    best = error(scale, lo, L)
    for step in range(nstep + 1) if nstep >= 1 else ():
        Laux = codes(((rmin + rdelta * _f32(step) + nmax_f) / (hi - lo))[:, None])  # lo: the best min so far
        fl = Laux.astype(np.float32)
        sum_l = _seq_sum(w * fl)
        sum_l2 = _seq_sum(w * fl * fl)
        sum_xl = _seq_sum(w * fl * x)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        clamp = this_min > 0
        this_min = np.where(clamp, _f32(0), this_min)
        this_scale = np.where(clamp, sum_xl / sum_l2, this_scale)
        err = error(this_scale, this_min, Laux)
        better = (D > 0) & (err < best)
        L = np.where(better[:, None], Laux, L)
        best = np.where(better, err, best)
        scale = np.where(better, this_scale, scale)
        lo = np.where(better, this_min, lo)
    L[flat] = 0
    scale = np.where(flat, _f32(0), scale)
    return scale.astype(np.float32), (-lo).astype(np.float32), L


def ref_make_q3(x, nmax):
    """make_q3_quants(do_rmse=true) for every row of x (B, n): scale (B,), codes (B, n) in 0..2*nmax-1."""
    vmax = _first_absmax(x)
    zero = np.abs(vmax) < GROUP_MAX_EPS
    iscale = (_f32(-nmax) / vmax)[:, None]
    L = np.clip(_np_nearest_int(iscale * x), -nmax, nmax - 1)
    w = x * x
    sumlx = _seq_sum(w * x * L.astype(np.float32))
    suml2 = _seq_sum(w * L.astype(np.float32) * L.astype(np.float32))
    for _ in range(5):  # a pass that changes nothing in a block would change nothing there again
        changed = False
        for i in range(x.shape[1]):
            wi, xi, fl = w[:, i], x[:, i], L[:, i].astype(np.float32)
            slx = sumlx - wi * xi * fl
            sl2 = suml2 - wi * fl * fl
            new_l = np.clip(_np_nearest_int(xi * sl2 / slx), -nmax, nmax - 1)
            fn = new_l.astype(np.float32)
            slx_new = slx + wi * xi * fn
            sl2_new = sl2 + wi * fn * fn
            take = ((slx > 0) & (new_l != L[:, i]) & (sl2_new > 0)
                    & (slx_new * slx_new * suml2 > sumlx * sumlx * sl2_new))
            L[:, i] = np.where(take, new_l, L[:, i])
            sumlx = np.where(take, slx_new, sumlx)
            suml2 = np.where(take, sl2_new, suml2)
            changed |= bool(take.any())
        if not changed:
            break
    scale = np.where(suml2 > 0, sumlx / suml2, _f32(0))
    L = np.where(zero[:, None], 0, L + nmax)
    return np.where(zero, _f32(0), scale).astype(np.float32), L


def ref_make_qx(x, nmax):
    """make_qx_quants(rmse_type=1, qw=NULL) for every row of x (B, n): scale (B,), codes in 0..2*nmax-1."""
    vmax = _first_absmax(x)
    zero = np.abs(vmax) < GROUP_MAX_EPS
    w = x * x

    def trial(iscale):
        L = np.clip(_np_nearest_int(iscale[:, None] * x), -nmax, nmax - 1)
        fl = L.astype(np.float32)
        return L, _seq_sum(w * x * fl), _seq_sum(w * fl * fl)

    L, sumlx, suml2 = trial(_f32(-nmax) / vmax)
    scale = np.where(suml2 != 0, sumlx / suml2, _f32(0))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        Ls, sumlx, suml2 = trial(-(_f32(nmax) + _TENTH * _f32(step)) / vmax)
        take = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        L = np.where(take[:, None], Ls, L)
        scale = np.where(take, sumlx / suml2, scale)
        best = np.where(take, scale * sumlx, best)
    L = np.where(zero[:, None], 0, L + nmax)
    return np.where(zero, _f32(0), scale).astype(np.float32), L


def ref_best_index(v) -> np.ndarray:
    """best_index_int8 over kvalues_iq4nl: nearest value, ties to the upper one; beyond the ends the end."""
    table = KVALUES_IQ4NL.astype(np.float32)
    v = np.asarray(v, dtype=np.float32)
    mu = np.clip(np.searchsorted(table, v, side="right"), 1, 15)
    pick = np.where(v - table[mu - 1] < table[mu] - v, mu - 1, mu)
    return np.where(v <= table[0], 0, np.where(v >= table[15], 15, pick))


def ref_iq4_scale(x, ntry=7):
    """Block scales of quantize_row_iq4_nl_impl without quant_weights, for every row of x (B, 32);
    also whether the block is non-zero (zero blocks are skipped and get scale 0)."""
    table = KVALUES_IQ4NL.astype(np.float32)
    vmax = _first_absmax(x)
    nonzero = np.abs(vmax) >= GROUP_MAX_EPS
    w = x * x

    def sums(inv):
        q = table[ref_best_index(inv[:, None] * x)]
        return _seq_sum(w * q * x), _seq_sum(w * q * q)

    d = -vmax / table[0] if ntry > 0 else vmax / table[0]
    sumqx, sumq2 = sums(_f32(1) / d)
    d = np.where(sumq2 > 0, sumqx / sumq2, _f32(0))
    best = d * sumqx
    for itry in range(-ntry, ntry + 1):
        sumqx, sumq2 = sums(_f32(itry + int(KVALUES_IQ4NL[0])) / vmax)
        take = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        d = np.where(take, sumqx / sumq2, d)
        best = np.where(take, d * sumqx, best)
    return np.where(nonzero, d, _f32(0)).astype(np.float32), nonzero


def _ref_pack_2bit(L):
    """(B, 256) codes 0..3 -> (B, 64): byte j/4 + l of half j holds L[j+l], L[j+l+32], L[j+l+64], L[j+l+96]."""
    q = L.reshape(-1, 2, 4, 32)
    return (q[:, :, 0] | q[:, :, 1] << 2 | q[:, :, 2] << 4 | q[:, :, 3] << 6).reshape(-1, 64)


def _ref_f16_bytes(bits):
    bits = np.asarray(bits, dtype=np.int64)
    return np.stack([bits & 0xFF, bits >> 8], axis=-1)


def _ref_q2_k(x):
    B = x.shape[0]
    sub = x.reshape(-1, 16)
    scales, mins, L = ref_make_qkx2(sub, np.abs(sub), 3, -0.5, 0.1, 15, True)
    scales, mins, L = scales.reshape(B, 16), mins.reshape(B, 16), L.reshape(B, QK_K)
    max_scale = _positive_max(scales)
    max_min = _positive_max(mins)
    q4 = _f32(15)
    sc = np.where(max_scale[:, None] > 0, _np_nearest_int((q4 / max_scale)[:, None] * scales) & 0xFF, 0)
    m = np.where(max_min[:, None] > 0, _np_nearest_int((q4 / max_min)[:, None] * mins), 0)
    sc = (sc | (m << 4)) & 0xFF
    d_bits = np.where(max_scale > 0, _np_f16_bits(max_scale / q4), 0)
    m_bits = np.where(max_min > 0, _np_f16_bits(max_min / q4), 0)
    d = _np_f16_value(d_bits)[:, None] * (sc & 0xF).astype(np.float32)
    dm = _np_f16_value(m_bits)[:, None] * (sc >> 4).astype(np.float32)
    requant = np.clip(_np_nearest_int((x.reshape(B, 16, 16) + dm[:, :, None]) / d[:, :, None]), 0, 3)
    L = np.where((d != 0)[:, :, None], requant, L.reshape(B, 16, 16)).reshape(B, QK_K)
    return np.concatenate([sc, _ref_pack_2bit(L), _ref_f16_bytes(d_bits), _ref_f16_bytes(m_bits)], axis=1)


def _ref_q3_k(x):
    B = x.shape[0]
    scales, L = ref_make_q3(x.reshape(-1, 16), 4)
    scales, L = scales.reshape(B, 16), L.reshape(B, 16, 16)
    max_scale = _first_absmax(scales)
    has = max_scale != 0
    iscale = _f32(-32) / max_scale
    l8 = (_np_nearest_int(iscale[:, None] * scales) & 0xFF).astype(np.uint8).view(np.int8).astype(np.int64)
    codes = np.where(has[:, None], np.clip(l8, -32, 31) + 32, 0)  # 6-bit codes, 0 when unused
    packed = np.zeros((B, 12), np.int64)
    if has.any():
        packed[:, :8] = (codes[:, :8] & 0xF) | ((codes[:, 8:] & 0xF) << 4)
        high = (codes >> 4).reshape(B, 4, 4)  # [j // 4, j % 4]
        packed[:, 8:] = high[:, 0] | high[:, 1] << 2 | high[:, 2] << 4 | high[:, 3] << 6
        packed[~has] = 0
    d_bits = np.where(has, _np_f16_bits(_f32(1) / iscale), 0)
    d = _np_f16_value(d_bits)[:, None] * (codes - 32).astype(np.float32)
    d = np.where(has[:, None], d, _f32(0))
    requant = np.clip(_np_nearest_int(x.reshape(B, 16, 16) / d[:, :, None]), -4, 3) + 4
    L = np.where((d != 0)[:, :, None], requant, L).reshape(B, QK_K)
    high = (L > 3).reshape(B, 8, 32)  # element 32 * k + m -> bit k of hmask byte m
    hmask = np.zeros((B, 32), np.int64)
    for k in range(8):
        hmask |= high[:, k].astype(np.int64) << k
    L = np.where(L > 3, L - 4, L)
    return np.concatenate([hmask, _ref_pack_2bit(L), packed, _ref_f16_bytes(d_bits)], axis=1)


def _ref_q45_k(x, five):
    B = x.shape[0]
    nmax = 31 if five else 15
    sub = x.reshape(-1, 32)
    av_x = np.sqrt(np.cumsum(sub * sub, axis=1, dtype=np.float32)[:, -1] / _f32(32))
    w = av_x[:, None] + np.abs(sub)
    scales, mins, L = ref_make_qkx2(sub, w, nmax, -0.5 if five else -1.0, 0.1, 15 if five else 20, False)
    scales, mins, L = scales.reshape(B, 8), mins.reshape(B, 8), L.reshape(B, 8, 32)
    max_scale = _positive_max(scales)
    max_min = _positive_max(mins)
    f63 = _f32(63)
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, f63 / max_scale, _f32(0))
        inv_min = np.where(max_min > 0, f63 / max_min, _f32(0))
    ls = np.minimum(_np_nearest_int(inv_scale[:, None] * scales) & 0xFF, 63)
    lm = np.minimum(_np_nearest_int(inv_min[:, None] * mins) & 0xFF, 63)
    packed = np.concatenate([ls[:, :4] | (ls[:, 4:] >> 4) << 6,  # low 6 bits + top bits of 4..7
                             lm[:, :4] | (lm[:, 4:] >> 4) << 6,
                             (ls[:, 4:] & 0xF) | (lm[:, 4:] & 0xF) << 4], axis=1)
    d_bits = _np_f16_bits(max_scale / f63)
    m_bits = _np_f16_bits(max_min / f63)
    d = _np_f16_value(d_bits)[:, None] * ls.astype(np.float32)
    dm = _np_f16_value(m_bits)[:, None] * lm.astype(np.float32)
    requant = np.clip(_np_nearest_int((x.reshape(B, 8, 32) + dm[:, :, None]) / d[:, :, None]), 0, nmax)
    L = np.where((d != 0)[:, :, None], requant, L).reshape(B, 4, 2, 32)  # [pair, low/high nibble, l]
    head = [_ref_f16_bytes(d_bits), _ref_f16_bytes(m_bits), packed]
    if not five:
        return np.concatenate([*head, (L[:, :, 0] | L[:, :, 1] << 4).reshape(B, 128)], axis=1)
    qh = np.zeros((B, 32), np.int64)
    for n in range(4):
        qh |= (L[:, n, 0] >> 4) << (2 * n) | (L[:, n, 1] >> 4) << (2 * n + 1)
    ql = ((L[:, :, 0] & 0xF) | (L[:, :, 1] & 0xF) << 4).reshape(B, 128)
    return np.concatenate([*head, qh, ql], axis=1)


def _ref_q6_k(x):
    B = x.shape[0]
    scales, L = ref_make_qx(x.reshape(-1, 16), 32)
    scales, L = scales.reshape(B, 16), L.reshape(B, 16, 16)
    max_scale = _first_absmax(scales)
    zero = np.abs(max_scale) < GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = _f32(-128) / max_scale
        d_bits = _np_f16_bits(_f32(1) / iscale)
        sc = (np.minimum(127, _np_nearest_int(iscale[:, None] * scales)) & 0xFF).astype(np.uint8).view(np.int8)
        d = _np_f16_value(d_bits)[:, None] * sc.astype(np.float32)
        requant = np.clip(_np_nearest_int(x.reshape(B, 16, 16) / d[:, :, None]), -32, 31) + 32
    L = np.where((d != 0)[:, :, None], requant, L).reshape(B, 2, 4, 32)  # [half, quarter, l]
    ql = np.concatenate([(L[:, :, 0] & 0xF) | (L[:, :, 2] & 0xF) << 4,
                         (L[:, :, 1] & 0xF) | (L[:, :, 3] & 0xF) << 4], axis=2).reshape(B, 128)
    qh = (L[:, :, 0] >> 4 | (L[:, :, 1] >> 4) << 2 | (L[:, :, 2] >> 4) << 4 | (L[:, :, 3] >> 4) << 6).reshape(B, 64)
    out = np.concatenate([ql, qh, sc.view(np.uint8), _ref_f16_bytes(d_bits)], axis=1)
    out[zero] = 0
    return out


def _ref_iq4_nl(x):
    d, _ = ref_iq4_scale(x)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, _f32(1) / d, _f32(0))
    L = ref_best_index(inv[:, None] * x)
    return np.concatenate([_ref_f16_bytes(_np_f16_bits(d)), L[:, :16] | L[:, 16:] << 4], axis=1)


def _ref_iq4_xs(x):
    B = x.shape[0]
    scales, nonzero = ref_iq4_scale(x.reshape(-1, 32))
    scales = scales.reshape(B, 8)
    max_scale = _first_absmax(np.where(nonzero.reshape(B, 8), scales, _f32(0)))
    d = -max_scale / _f32(32)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, _f32(1) / d, _f32(0))
        l = np.clip(_np_nearest_int(inv[:, None] * scales), -32, 31)
        dl = d[:, None] * l.astype(np.float32)
        idl = np.where(dl != 0, _f32(1) / dl, _f32(0))
    L = ref_best_index(idl[:, :, None] * x.reshape(B, 8, 32))
    qs = (L[:, :, :16] | L[:, :, 16:] << 4).reshape(B, 128)
    code = l + 32
    scales_l = (code[:, 0::2] & 0xF) | (code[:, 1::2] & 0xF) << 4
    scales_h = np.zeros(B, np.int64)
    for ib in range(8):
        scales_h |= (code[:, ib] >> 4) << (2 * ib)
    return np.concatenate([_ref_f16_bytes(_np_f16_bits(d)), _ref_f16_bytes(scales_h), scales_l, qs], axis=1)


_REFERENCES = {QT.Q2_K: _ref_q2_k, QT.Q3_K: _ref_q3_k, QT.Q4_K: lambda x: _ref_q45_k(x, False),
               QT.Q5_K: lambda x: _ref_q45_k(x, True), QT.Q6_K: _ref_q6_k, QT.IQ4_NL: _ref_iq4_nl,
               QT.IQ4_XS: _ref_iq4_xs}


def reference_quantize(values: np.ndarray, qtype) -> np.ndarray:
    """numpy reference: float32 ``(..., n)`` -> uint8 ``(..., n / block * type_size)``."""
    qtype = QT(qtype)
    size, nbytes = BLOCK[qtype]
    values = np.asarray(values, dtype=np.float32)
    blocks = values.reshape(-1, size)
    with np.errstate(all="ignore"):
        out = _REFERENCES[qtype](blocks).astype(np.uint8)
    return out.reshape(*values.shape[:-1], values.shape[-1] // size * nbytes)
