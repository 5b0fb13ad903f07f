"""Quantizers with importance weights: the bytes ``llama-quantize --imatrix`` writes.

With an importance matrix, llama-quantize hands each tensor's per-column weights (``in_sum2 / counts``
of the imatrix entry, ``engine.imatrix``) to ggml's ``quantize_<type>(..., quant_weights)``, which then
runs other code than the reference quantizers of ``engine.kernels.kquant_quantize``:

    Q2_K         quantize_row_q2_K_impl: make_qkx3_quants per 16 (weights qw * sqrt(sigma2 + x^2), sigma2 =
                 mean x^2 of the super-block), 4-bit scales and mins by make_qp_quants
    Q3_K         quantize_row_q3_K_impl: make_qx_quants per 16 (sigma2 = 2 mean x^2), 6-bit scales by
                 make_qx_quants weighted by the sub-block weight sums
    Q4_K, Q5_K   quantize_row_q{4,5}_K_impl: make_qkx3_quants per 32, 6-bit scales and mins by make_qp_quants
    Q6_K         quantize_row_q6_K_impl: make_qx_quants per 16 weighted by the raw imatrix values
    IQ4_NL/XS    quantize_row_iq4_nl_impl with quant_weights: the same search, weights qw * sqrt(sigma2 + x^2)
    Q4_0, Q5_0   quantize_row_q{4,5}_0_impl: make_qx_quants per 32, sigma2 = mean x^2 of the whole ROW
    Q4_1, Q5_1   quantize_row_q{4,5}_1_impl: make_qkx3_quants per 32, sigma2 of the whole row
    Q8_0         unweighted (quantize_q8_0 ignores quant_weights): not here

Operation order, float32 arithmetic and the storage rules (8-bit fields keep their low byte, fp16 by
``GGML_FP32_TO_FP16``) are those of ``kquant_quantize``, whose helpers are reused; make_qkx3_quants is
make_qkx2_quants with weights given (its ``max <= min`` test equals ``max == min`` there), so
``_make_qkx2`` serves both.  Checked byte for byte against llama-quantize (tests/fixtures/imatrix).

``quantize(values, qtype, weights)``: rows ``(n_rows, n)`` float32 with weights ``(n,)`` (or
``(n_mat, n)`` for expert tensors, ``rows_per_mat`` rows each) -> uint8 ``(n_rows, row_bytes)``.  Rows are
independent: parallel over rows, the bytes do not depend on the thread count.
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from numba import njit, prange

from engine.kernels.kquant_quantize import (
    _KVALUES_F32,
    GROUP_MAX_EPS,
    KVALUES_IQ4NL,
    QK_K,
    _best_index,
    _f16_bits,
    _f16_value,
    _make_qkx2,
    _nearest_int,
    _nearest_value,
    _pack_2bit,
    _put_f16,
    _scale_min_k4,
)

QT = GGMLQuantizationType
TYPES = (QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.IQ4_NL, QT.IQ4_XS, QT.Q4_0, QT.Q4_1, QT.Q5_0,
         QT.Q5_1)

_F0 = np.float32(0.0)
_F1 = np.float32(1.0)
_TENTH = np.float32(0.1)
_RMIN3 = np.float32(-0.9)  # make_qkx3_quants' rmin, rdelta, nstep in every caller
_RDELTA3 = np.float32(0.05)
_NSTEP3 = 36
_ROWS_PER_TASK = 4


@njit(cache=True)
def _make_qx_w(x, w, L, nmax):
    """ggml make_qx_quants(rmse_type=1) with weights ``w``: codes -nmax..nmax-1 stored + nmax (0 for an
    all-zero group), best of 19 trial scales by weighted least squares.  Returns the scale."""
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
        fq = np.float32(q)
        sumlx += w[i] * x[i] * fq
        suml2 += w[i] * fq * fq
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
            sumlx += w[i] * x[i] * fq
            suml2 += w[i] * fq * fq
        if suml2 > _F0 and sumlx * sumlx > best * suml2:
            for i in range(n):
                L[i] = nmax + min(max(_nearest_int(iscale * x[i]), -nmax), nmax - 1)
            scale = sumlx / suml2
            best = scale * sumlx
    return scale


@njit(cache=True)
def _make_qp(x, w, L, nmax):
    """ggml make_qp_quants: non-negative codes 0..nmax of the (non-negative) values ``x`` under one
    scale: 8 trial scales by weighted squared error, then up to 5 passes of one-code refinements.
    ``L`` holds uint8 values (a negative code keeps its low byte, as the C array does).  Returns the scale."""
    n = x.size
    vmax = _F0
    for i in range(n):
        vmax = vmax if vmax > x[i] else x[i]  # MAX(max, x[i])
    if vmax < GROUP_MAX_EPS:
        for i in range(n):
            L[i] = 0
        return _F0
    fmax = np.float32(nmax)
    iscale = fmax / vmax
    for i in range(n):
        L[i] = _nearest_int(iscale * x[i]) & 0xFF
    scale = _F1 / iscale
    best_mse = _F0
    for i in range(n):
        diff = x[i] - scale * np.float32(L[i])
        best_mse += w[i] * diff * diff
    for step in range(-4, 5):
        if step == 0:
            continue
        iscale_is = (_TENTH * np.float32(step) + fmax) / vmax
        scale_is = _F1 / iscale_is
        mse = _F0
        for i in range(n):
            q = min(nmax, _nearest_int(iscale_is * x[i]))
            diff = x[i] - scale_is * np.float32(q)
            mse += w[i] * diff * diff
        if mse < best_mse:
            best_mse = mse
            iscale = iscale_is
    sumlx = _F0
    suml2 = _F0
    for i in range(n):
        q = min(nmax, _nearest_int(iscale * x[i]))
        L[i] = q & 0xFF
        fq = np.float32(q)
        sumlx += w[i] * x[i] * fq
        suml2 += w[i] * fq * fq
    for _ in range(5):
        changed = 0
        for i in range(n):
            fl = np.float32(L[i])
            slx = sumlx - w[i] * x[i] * fl
            sl2 = suml2 - w[i] * fl * fl
            if slx > _F0 and sl2 > _F0:
                new_l = min(nmax, _nearest_int(x[i] * sl2 / slx))
                if new_l != L[i]:
                    fn = np.float32(new_l)
                    slx += w[i] * x[i] * fn
                    sl2 += w[i] * fn * fn
                    if slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = new_l & 0xFF
                        sumlx = slx
                        suml2 = sl2
                        changed += 1
        if changed == 0:
            break
    return sumlx / suml2 if suml2 > _F0 else _F0


@njit(cache=True, inline="always")
def _sum_squares(x):
    s = _F0
    for i in range(x.size):
        s += x[i] * x[i]
    return s


@njit(cache=True, inline="always")
def _weights(x, qw, sigma2, w):
    """weight[l] = qw[l] * sqrtf(sigma2 + x[l]*x[l]); returns their sum (in order)."""
    total = _F0
    for i in range(x.size):
        w[i] = qw[i] * np.sqrt(sigma2 + x[i] * x[i])
        total += w[i]
    return total


@njit(cache=True)
def _q2_k_block(x, qw, out, L, Laux, w, scales, mins, sw, Ls, Lm):
    sigma2 = _sum_squares(x) / np.float32(QK_K)
    for j in range(16):
        xs = x[16 * j : 16 * j + 16]
        sw[j] = _weights(xs, qw[16 * j : 16 * j + 16], sigma2, w[:16])
        scales[j], mins[j] = _make_qkx2(xs, w[:16], L[16 * j : 16 * j + 16], Laux[:16], 3, _RMIN3, _RDELTA3,
                                        _NSTEP3, False)
    dm = _make_qp(scales[:16], sw[:16], Ls[:16], 15)
    mm = _make_qp(mins[:16], sw[:16], Lm[:16], 15)
    d_bits = _f16_bits(dm)
    m_bits = _f16_bits(mm)
    _put_f16(out, 80, d_bits)
    _put_f16(out, 82, m_bits)
    dm = _f16_value(d_bits)
    mm = _f16_value(m_bits)
    for j in range(16):
        out[j] = (Ls[j] | (Lm[j] << 4)) & 0xFF
    for j in range(16):
        sc = np.int64(out[j])
        d = dm * np.float32(sc & 0xF)
        if d == _F0:
            continue
        m = mm * np.float32(sc >> 4)
        for i in range(16):
            L[16 * j + i] = min(max(_nearest_int((x[16 * j + i] + m) / d), 0), 3)
    _pack_2bit(L, out, 16)


@njit(cache=True)
def _q3_k_block(x, qw, out, L, w, scales, sw, Ls):
    sigma2 = np.float32(2.0) * _sum_squares(x) / np.float32(QK_K)
    for j in range(16):
        xs = x[16 * j : 16 * j + 16]
        sw[j] = _weights(xs, qw[16 * j : 16 * j + 16], sigma2, w[:16])
        scales[j] = _make_qx_w(xs, w[:16], L[16 * j : 16 * j + 16], 4)
    for k in range(96, 108):
        out[k] = 0
    d_block = _make_qx_w(scales[:16], sw[:16], Ls[:16], 32)
    for j in range(16):
        code = Ls[j]
        if j < 8:
            out[96 + j] = code & 0xF
        else:
            out[96 + j - 8] = (np.int64(out[96 + j - 8]) | ((code & 0xF) << 4)) & 0xFF
        code >>= 4
        out[104 + j % 4] = (np.int64(out[104 + j % 4]) | (code << (2 * (j // 4)))) & 0xFF
    d_bits = _f16_bits(d_block)
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
def _q45_k_block(x, qw, out, L, Laux, w, scales, mins, sw, Ls, Lm, five):
    nmax = 31 if five else 15
    sigma2 = np.float32(2.0) * _sum_squares(x) / np.float32(QK_K)
    for j in range(8):
        xs = x[32 * j : 32 * j + 32]
        sw[j] = _weights(xs, qw[32 * j : 32 * j + 32], sigma2, w)
        scales[j], mins[j] = _make_qkx2(xs, w, L[32 * j : 32 * j + 32], Laux, nmax, _RMIN3, _RDELTA3, _NSTEP3,
                                        False)
    d_block = _make_qp(scales[:8], sw[:8], Ls[:8], 63)
    m_block = _make_qp(mins[:8], sw[:8], Lm[:8], 63)
    for j in range(8):
        ls = Ls[j]
        lm = Lm[j]
        if five:
            ls = min(63, ls)
            lm = min(63, lm)
        if j < 4:
            out[4 + j] = ls
            out[4 + j + 4] = lm
        else:
            out[4 + j + 4] = ((ls & 0xF) | ((lm & 0xF) << 4)) & 0xFF
            out[4 + j - 4] = (np.int64(out[4 + j - 4]) | ((ls >> 4) << 6)) & 0xFF
            out[4 + j] = (np.int64(out[4 + j]) | ((lm >> 4) << 6)) & 0xFF
    d_bits = _f16_bits(d_block)
    m_bits = _f16_bits(m_block)
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
                out[48 + 32 * n + j] = (l1 | (l2 << 4)) & 0xFF
    else:
        for n in range(4):
            for j in range(32):
                out[16 + 32 * n + j] = (L[64 * n + j] | (L[64 * n + j + 32] << 4)) & 0xFF


@njit(cache=True)
def _q6_k_block(x, qw, out, L, scales):
    max_scale = _F0
    max_abs = _F0
    for j in range(16):
        scales[j] = _make_qx_w(x[16 * j : 16 * j + 16], qw[16 * j : 16 * j + 16], L[16 * j : 16 * j + 16], 32)
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
            out[64 * half + l] = ((a & 0xF) | ((c & 0xF) << 4)) & 0xFF
            out[64 * half + l + 32] = ((b & 0xF) | ((e & 0xF) << 4)) & 0xFF
            out[128 + 32 * half + l] = ((a >> 4) | ((b >> 4) << 2) | ((c >> 4) << 4) | ((e >> 4) << 6)) & 0xFF


@njit(cache=True, inline="always")
def _iq4_sums_w(x, w, inv, idx):
    n = x.size
    for j in range(n):
        idx[j] = _nearest_value(inv * x[j])
    sumqx = _F0
    sumq2 = _F0
    for j in range(n):
        q = _KVALUES_F32[idx[j]]
        sumqx += w[j] * q * x[j]
        sumq2 += w[j] * q * q
    return sumqx, sumq2


@njit(cache=True)
def _iq4_scale_w(x, w, values, idx):
    """One 32-block's scale in quantize_row_iq4_nl_impl with quant_weights (ntry = 7); (0, False) for
    an all-zero block, which ggml skips."""
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
    d = -vmax / np.float32(values[0])
    sumqx, sumq2 = _iq4_sums_w(x, w, _F1 / d, idx)
    d = sumqx / sumq2 if sumq2 > _F0 else _F0
    best = d * sumqx
    for itry in range(-7, 8):
        sumqx, sumq2 = _iq4_sums_w(x, w, np.float32(itry + values[0]) / vmax, idx)
        if sumq2 > _F0 and sumqx * sumqx > best * sumq2:
            d = sumqx / sumq2
            best = d * sumqx
    return d, True


@njit(cache=True)
def _iq4_nl_block(x, qw, out, values, w, idx):
    sigma2 = _sum_squares(x) * (np.float32(2.0) / np.float32(32.0))
    _weights(x, qw, sigma2, w)
    d, _ = _iq4_scale_w(x, w, values, idx)
    _put_f16(out, 0, _f16_bits(d))
    inv = _F1 / d if d != _F0 else _F0
    for j in range(16):
        out[2 + j] = _best_index(values, inv * x[j]) | (_best_index(values, inv * x[16 + j]) << 4)


@njit(cache=True)
def _iq4_xs_block(x, qw, out, values, w, idx, scales):
    sigma2 = _sum_squares(x) * (np.float32(2.0) / np.float32(QK_K))
    max_scale = _F0
    amax = _F0
    for ib in range(8):
        xs = x[32 * ib : 32 * ib + 32]
        _weights(xs, qw[32 * ib : 32 * ib + 32], sigma2, w)
        scales[ib], nonzero = _iq4_scale_w(xs, w, values, idx)
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


@njit(cache=True)
def _legacy_row(kind, x, qw, out, L, Laux, w):
    """One row of Q4_0 (2), Q4_1 (3), Q5_0 (6) or Q5_1 (7): sigma2 is the mean x^2 of the whole row."""
    n = x.size
    sigma2 = _sum_squares(x) / np.float32(n)
    nbytes = 18 if kind == 2 else 20 if kind == 3 else 22 if kind == 6 else 24
    for ib in range(n // 32):
        xb = x[32 * ib : 32 * ib + 32]
        o = nbytes * ib
        _weights(xb, qw[32 * ib : 32 * ib + 32], sigma2, w)
        if kind == 2 or kind == 6:
            d = _make_qx_w(xb, w, L, 8 if kind == 2 else 16)
            _put_f16(out, o, _f16_bits(d))
            q = o + 2
        else:
            d, the_min = _make_qkx2(xb, w, L, Laux, 15 if kind == 3 else 31, _RMIN3, _RDELTA3, _NSTEP3, False)
            _put_f16(out, o, _f16_bits(d))
            _put_f16(out, o + 2, _f16_bits(-the_min))
            q = o + 4
        if kind == 6 or kind == 7:
            qh = 0
            for j in range(16):
                qh |= ((L[j] & 0x10) >> 4) << j
                qh |= ((L[j + 16] & 0x10) >> 4) << (j + 16)
            for k in range(4):
                out[q + k] = (qh >> (8 * k)) & 0xFF
            q += 4
        for j in range(16):
            out[q + j] = ((L[j] & 0xF) | ((L[j + 16] & 0xF) << 4)) & 0xFF


@njit(cache=True, parallel=True)
def _quantize_rows(kind, rows, qw, first_row, rows_per_mat, out, block, nbytes):
    """Every row of ``rows`` (n_rows, n) into ``out`` (n_rows, row bytes); row r (global index
    first_row + r) uses the weights qw[(first_row + r) // rows_per_mat]."""
    n_rows, n = rows.shape
    n_tasks = (n_rows + _ROWS_PER_TASK - 1) // _ROWS_PER_TASK
    values_iq4 = KVALUES_IQ4NL.astype(np.int64)
    for task in prange(n_tasks):
        L = np.zeros(QK_K, np.int64)
        Laux = np.zeros(32, np.int64)
        w = np.zeros(32, np.float32)
        scales = np.zeros(16, np.float32)
        mins = np.zeros(16, np.float32)
        sw = np.zeros(16, np.float32)
        Ls = np.zeros(16, np.int64)
        Lm = np.zeros(16, np.int64)
        idx = np.zeros(32, np.int64)
        for r in range(task * _ROWS_PER_TASK, min(n_rows, (task + 1) * _ROWS_PER_TASK)):
            x = rows[r]
            weights = qw[(first_row + r) // rows_per_mat]
            row_out = out[r]
            if kind == 2 or kind == 3 or kind == 6 or kind == 7:
                _legacy_row(kind, x, weights, row_out, L, Laux, w)
                continue
            for b in range(n // block):
                xb = x[b * block : (b + 1) * block]
                wb = weights[b * block : (b + 1) * block]
                ob = row_out[b * nbytes : (b + 1) * nbytes]
                if kind == 10:
                    _q2_k_block(xb, wb, ob, L, Laux, w, scales, mins, sw, Ls, Lm)
                elif kind == 11:
                    _q3_k_block(xb, wb, ob, L, w, scales, sw, Ls)
                elif kind == 12:
                    _q45_k_block(xb, wb, ob, L, Laux, w, scales, mins, sw, Ls, Lm, False)
                elif kind == 13:
                    _q45_k_block(xb, wb, ob, L, Laux, w, scales, mins, sw, Ls, Lm, True)
                elif kind == 14:
                    _q6_k_block(xb, wb, ob, L, scales)
                elif kind == 20:
                    _iq4_nl_block(xb, wb, ob, values_iq4, w, idx)
                else:
                    _iq4_xs_block(xb, wb, ob, values_iq4, w, idx, scales)


def quantize(values: np.ndarray, qtype, weights: np.ndarray, first_row: int = 0,
             rows_per_mat: int | None = None) -> np.ndarray:
    """``values`` (n_rows, n) float32 quantized to ``qtype`` with importance ``weights`` (n,) — or
    (n_mat, n): row ``first_row + r`` takes ``weights[(first_row + r) // rows_per_mat]`` (expert tensors,
    as llama-quantize's ``nrows_per_expert``).  Returns uint8 (n_rows, row bytes): llama-quantize's bytes."""
    qtype = QT(qtype)
    if qtype not in TYPES:
        raise ValueError(f"no weighted quantizer for {qtype.name}")
    block, nbytes = GGML_QUANT_SIZES[qtype]
    rows = np.ascontiguousarray(values, dtype=np.float32)
    if rows.ndim == 1:
        rows = rows.reshape(1, -1)
    n = rows.shape[-1]
    if n % block:
        raise ValueError(f"rows of {n} do not split into {qtype.name} blocks of {block}")
    qw = np.ascontiguousarray(weights, dtype=np.float32)
    if qw.ndim == 1:
        qw = qw.reshape(1, -1)
    if qw.shape[-1] != n:
        raise ValueError(f"{qw.shape[-1]} importance weights for rows of {n}")
    per_mat = rows_per_mat if rows_per_mat is not None else max(1, first_row + rows.shape[0])
    if (first_row + rows.shape[0] - 1) // per_mat >= qw.shape[0]:
        raise ValueError(f"rows up to {first_row + rows.shape[0]} need more than {qw.shape[0]} weight vectors")
    out = np.empty((rows.shape[0], n // block * nbytes), np.uint8)
    if rows.shape[0]:
        _quantize_rows(int(qtype), rows, qw, int(first_row), int(per_mat), out, block, nbytes)
    return out
