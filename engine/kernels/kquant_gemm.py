"""Prompt products with the tokens in the vector lanes: the K-quants (Q4_K, Q5_K, Q6_K, IQ4_XS, Q3_K,
Q2_K) against Q8_K activations, and Q8_0, Q4_0, IQ4_NL against Q8_0 activations.

The row tiles (kquant_simd.py, simd.py) put 32 weights of one row in a vector and multiply them with
each token's activations: every sub-block scale then needs its own multiply (``pmaddubsw`` +
``pmaddwd`` with the scales: two multiply instructions per 64 products), and each activation load
feeds one row. They stopped at ~30 int8 products per cycle (Intel Xeon, 1 thread: 65-72 G/s), where
this core retires two ``vpdpbusd`` (128 products) per cycle.

Here 16 tokens share a vector. Four weight codes are broadcast to all 16 lanes and one ``vpdpbusd``
adds their products with 16 tokens' four activations (u8 codes x s8 activations, 64 products, exact in
i32); a sub-block's quads chain into one i32 per token, so its scale is applied once per sub-block and
token vector, in floats. Codes are unsigned: types with signed values store value + offset and start
each sub-block's dot at ``-offset * (sum of its activations)``. A chunk of 16 rows is unpacked once
per super-block into a small array of codes and float scales (:meth:`_LaneEmitter.decode`), then every
token vector runs against it, 4 rows x 2 vectors per call: each activation load and each code
broadcast feeds 8 ``vpdpbusd``. The activations are repacked once per product
(:func:`activations_for_lanes`): per 16 tokens and 4 values, the 16 tokens' 4 int8 side by side.

Per token and 256-weight super-block the float result is, in this order::

    f   = sum over sub-blocks j of (d_w * scale_j) * float(dot_j)       # dot_j exact in integers
    acc = acc + d_x * f
    acc = acc - sum over mins j of (dmin_w * min_j) * (d_x * bsum_j)     # Q4_K, Q5_K, Q2_K

(for the 32-blocks, each block its own activation scale: ``f += (d_w * d_x) * float(dot)``, then
``acc += f``). This is ggml's order (``sumf += d * sumi - dmin * summs``) with the sub-block sums in
floats. It is not the matrix-vector kernels' order (those keep 8 float lanes per row), so a prompt row
and a generated token differ in the last bits, as in llama.cpp; the portable IR computes the same
integers and floats as every ISA, so this product is bit-identical on every CPU and tested so.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from engine.kernels.cpu_target import is_arm64, numba_target_features
from engine.kernels.iquant_simd import _IQEmitter
from engine.kernels.kquant_simd import BLOCK_BYTES as _BLOCK_BYTES_ALL
from engine.kernels.kquant_simd import (
    FP16_OFFSETS,
    KVALUES_IQ4NL,
    QK_K,
    _bind,
    _KEmitter,
    quantize_activations_q8_k,
)
from engine.kernels.simd import (
    _F32,
    _I8,
    _I32,
    _I64,
    _as_i8_ptr,
    _check_array,
    _Loop,
    _mask,
    _row_ptr,
    _vconst,
    kernel_isa,
    quantize_activations_q8_0_batch,
)

LANES = 16  # tokens per vector
K_TYPES = ("q4_k", "q5_k", "q6_k", "iq4_xs", "q3_k", "q2_k")
# ggml's 32-value blocks against Q8_0 activations (each block's own activation scale), 8 blocks taken
# as one 256-value "super-block"
BLOCK32_TYPES = ("q8_0", "q4_0", "iq4_nl")
# iquant_simd's grid and ternary types (Q8_K activations): signed values (grid magnitudes with sign
# bits), or unsigned codes with an offset (IQ1: 8 * grid + delta - 9; TQ: trit + 1 - 1)
IQ_SIGNED = ("iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs", "iq3_s")
IQ_TYPES = IQ_SIGNED + ("iq1_s", "iq1_m", "tq1_0", "tq2_0")
TYPES = K_TYPES + BLOCK32_TYPES + IQ_TYPES
BLOCK_BYTES = ({qtype: _BLOCK_BYTES_ALL[qtype] for qtype in K_TYPES}
               | {"q8_0": 8 * 34, "q4_0": 8 * 18, "iq4_nl": 8 * 18} | _IQEmitter.BLOCK_BYTES)
# sub-blocks per super-block (one scale each)
SUB_BLOCKS = {"q4_k": 8, "q5_k": 8, "q6_k": 16, "iq4_xs": 8, "q3_k": 16, "q2_k": 16, "q8_0": 8, "q4_0": 8, "iq4_nl": 8,
              **{qtype: 16 for qtype in IQ_TYPES}}
# What the per-token sums are for. Codes stored as value + offset (Q6_K 32, Q3_K 4, IQ4_XS 128: its
# signed values made unsigned for vpdpbusd) start each sub-block's dot at -offset * (sum of its
# activations), int32; the types with mins (Q4_K/Q5_K per 32 values, Q2_K per 16) take the float32
# d_x * (sum of the activations under each min).
OFFSETS = {"q6_k": 32, "q3_k": 4, "iq4_xs": 128, "q8_0": 128, "q4_0": 8, "iq4_nl": 128,
           **{qtype: 128 for qtype in IQ_SIGNED}, "iq1_s": 9, "iq1_m": 9, "tq1_0": 1, "tq2_0": 1}
# codes above 127 (value + 128): no pmaddubsw (its pairs would saturate) and no sdot (signed bytes)
WIDE_CODES = ("iq4_xs", "q8_0", "iq4_nl") + IQ_SIGNED
# activation scales per super-block: one (Q8_K), or one per block (Q8_0)
TOKEN_SCALES = {qtype: 8 if qtype in BLOCK32_TYPES else 1 for qtype in TYPES}
MINS = {"q4_k": 8, "q5_k": 8, "q2_k": 16}
# AVX2 (pmaddubsw, no vpdpbusd): quads whose pair sums add up in int16 before they are widened. A pair
# sum is at most 2 * (largest code) * 128 in size, so this many stay below 2**15: Q4_K 8 * 2 * 15 * 128 =
# 30720, Q5_K 4 * 2 * 31 * 128, Q6_K 2 * 2 * 63 * 128, Q3_K 4 * 2 * 7 * 128, Q2_K 4 * 2 * 3 * 128
I16_QUADS = {"q4_k": 8, "q5_k": 4, "q6_k": 2, "q3_k": 4, "q2_k": 4}

_V16I32 = ir.VectorType(_I32, 16)
_V16F32 = ir.VectorType(_F32, 16)
_V64I8 = ir.VectorType(_I8, 64)


# --------------------------------------------------------------------------------------------
# Activations: Q8_K, repacked with the tokens in the lanes
# --------------------------------------------------------------------------------------------


@njit(cache=True)
def _lanes(qs, d, bsums, per, group, offset):
    """(values, scales, offset sums, min sums), 16 tokens side by side per vector (zeros past the last
    token): int8 ``(n_vec, 16 * n)`` with values 4q..4q+3 of token t at 64q + 4t; float32 scales; per
    scale ``per`` sums of the activations, each of ``group`` items of ``bsums``: ``offset`` given (not 0),
    int32 ``-offset * sum``, else float32 ``d_x * sum``; the other sums array is empty. One function,
    not four: each compiled one cost ~0.2 s on a type's first use."""
    n_tok, n = qs.shape
    n_vec = (n_tok + LANES - 1) // LANES
    n_sb = d.shape[1]
    values = np.zeros((n_vec, LANES * n), np.int8)
    scales = np.zeros((n_vec, LANES * n_sb), np.float32)
    n_sums = n_sb * per
    offset_sums = np.zeros((n_vec, LANES * n_sums if offset else 0), np.int32)
    min_sums = np.zeros((n_vec, 0 if offset else LANES * n_sums), np.float32)
    words = qs.view(np.int32)  # 4 values at a time
    packed = values.view(np.int32)
    for t in range(n_tok):
        v, lane = t // LANES, t % LANES
        for q in range(n // 4):
            packed[v, LANES * q + lane] = words[t, q]
        for i in range(n_sb):
            scales[v, LANES * i + lane] = d[t, i]
        for i in range(n_sums):
            total = np.int32(0)
            for k in range(group):
                total += np.int32(bsums[t, group * i + k])
            if offset:
                offset_sums[v, LANES * i + lane] = -offset * total
            else:
                min_sums[v, LANES * i + lane] = d[t, i // per] * np.float32(total)
    return values, scales, offset_sums, min_sums


def activations_for_lanes(qtype: str, x: np.ndarray, quantized: dict | None = None
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float32 ``(n_tok, n)`` -> (values, scales, sums), each ``(n_vec, ...)`` with 16 tokens per vector:
    the Q8_K values and scales of ``quantize_activations_q8_k``, and per sub-block (or min) the sums
    ``qtype`` takes (see OFFSETS and MINS); for BLOCK32_TYPES the Q8_0 values, a scale and an offset sum
    per 32 values. ``quantized``, a dict kept across calls on the same ``x``, keeps x's Q8_K or Q8_0
    quantization for the next type (products of one input, e.g. q, k and v, quantize it once)."""
    quantized = {} if quantized is None else quantized
    if qtype in BLOCK32_TYPES:  # per block: a scale, the sum of its 32 values
        if "q8_0" not in quantized:
            quantized["q8_0"] = quantize_activations_q8_0_batch(np.ascontiguousarray(x, dtype=np.float32))
        qs, d, block_sums = quantized["q8_0"]
        values, scales, offset_sums, _ = _lanes(qs, d, block_sums.astype(np.int16), 1, 1, OFFSETS[qtype])
        return values, scales, offset_sums
    if "q8_k" not in quantized:
        quantized["q8_k"] = quantize_activations_q8_k(x)
    qs, d, bsums = quantized["q8_k"]
    per = SUB_BLOCKS[qtype] if qtype in OFFSETS else MINS[qtype]  # sums per super-block, of 16 // per bsums
    values, scales, offset_sums, min_sums = _lanes(qs, d, bsums, per, 16 // per, OFFSETS.get(qtype, 0))
    return values, scales, offset_sums if qtype in OFFSETS else min_sums


# --------------------------------------------------------------------------------------------
# IR emission
# --------------------------------------------------------------------------------------------


class _LaneEmitter(_KEmitter):
    """One row's super-blocks against token vectors; the weights' helpers are _KEmitter's."""

    BLOCK_BYTES = BLOCK_BYTES

    def quad_dot(self, acc: ir.Value, codes: ir.Value, x: ir.Value) -> ir.Value:
        """acc (<16 x i32>) + per lane the 4 products of ``codes`` (<64 x i8>, unsigned) and ``x``
        (<64 x i8>, int8), exactly: vpdpbusd on AVX512-VNNI, two 256-bit ones on AVX-VNNI, pmaddubsw +
        pmaddwd with ones on AVX2 (pairs <= 2 * 63 * 127: no saturation), sdot on arm64, else the
        products in i32 summed by fours."""
        b = self.b
        # WIDE_CODES reach 255: pmaddubsw's pairs would saturate (255 * 127 * 2 > 2**15) and sdot
        # multiplies signed bytes, so arm64 takes the exact products below for them (AVX2 takes
        # signed_dot: dots() does not come here with them)
        exact = self.qtype in WIDE_CODES and self.isa in ("avx2", "neon-dotprod")
        if self.isa == "avx2" and not exact:
            return self.widen_pairs(acc, self.pair_sums(codes, x))
        if self.isa == "avx512-vnni":
            fn = self._fn("llvm.x86.avx512.vpdpbusd.512", _V16I32, [_V16I32] * 3)
            return b.call(fn, [acc, b.bitcast(codes, _V16I32), b.bitcast(x, _V16I32)])
        v8i32 = ir.VectorType(_I32, 8)
        halves = []
        for part in (range(8), range(8, 16)):
            a = self._slice(acc, part)
            c = b.bitcast(self._slice(b.bitcast(codes, _V16I32), part), ir.VectorType(_I8, 32))
            v = b.bitcast(self._slice(b.bitcast(x, _V16I32), part), ir.VectorType(_I8, 32))
            if self.isa == "avx2-vnni":
                fn = self._fn("llvm.x86.avx512.vpdpbusd.256", v8i32, [v8i32] * 3)
                halves.append(b.call(fn, [a, b.bitcast(c, v8i32), b.bitcast(v, v8i32)]))
            elif self.isa == "neon-dotprod" and not exact:
                v4i32, v16i8 = ir.VectorType(_I32, 4), ir.VectorType(_I8, 16)
                sdot = self._fn("llvm.aarch64.neon.sdot.v4i32.v16i8", v4i32, [v4i32, v16i8, v16i8])
                quarters = [b.call(sdot, [self._slice(a, range(4 * k, 4 * k + 4)),
                                          self._slice(c, range(16 * k, 16 * k + 16)),
                                          self._slice(v, range(16 * k, 16 * k + 16))]) for k in range(2)]
                halves.append(b.shuffle_vector(quarters[0], quarters[1], _mask(range(8))))
            else:
                # products in i16 (|255 * 127| < 2**15), pairs in i16 where codes stay below 64
                # (2 * 63 * 127 < 2**15), else in i32; then the quads in i32
                v32i16, v16i32 = ir.VectorType(ir.IntType(16), 32), ir.VectorType(_I32, 16)
                products = b.mul(b.zext(c, v32i16), b.sext(v, v32i16))
                even, odd = self._slice(products, range(0, 32, 2)), self._slice(products, range(1, 32, 2))
                if self.qtype in WIDE_CODES:
                    pairs = b.add(b.sext(even, v16i32), b.sext(odd, v16i32))
                else:
                    pairs = b.sext(b.add(even, odd), v16i32)
                halves.append(b.add(a, b.add(self._slice(pairs, range(0, 16, 2)), self._slice(pairs, range(1, 16, 2)))))
        return b.shuffle_vector(halves[0], halves[1], _mask(range(16)))

    def pair_sums(self, codes: ir.Value, x: ir.Value) -> ir.Value:
        """AVX2: <32 x i16>, per token lane the two sums of a pair of products of unsigned ``codes`` and
        ``x`` (pmaddubsw: exact where no pair passes 2**15, as for the codes that take it)."""
        b = self.b
        v16i16 = ir.VectorType(ir.IntType(16), 16)
        halves = []
        for part in (range(8), range(8, 16)):
            c = b.bitcast(self._slice(b.bitcast(codes, _V16I32), part), ir.VectorType(_I8, 32))
            v = b.bitcast(self._slice(b.bitcast(x, _V16I32), part), ir.VectorType(_I8, 32))
            halves.append(b.call(self._fn("llvm.x86.avx2.pmadd.ub.sw", v16i16, [c.type, v.type]), [c, v]))
        return b.shuffle_vector(halves[0], halves[1], _mask(range(32)))

    def signed_dot(self, acc: ir.Value, magnitudes: ir.Value, values: ir.Value, x: ir.Value) -> ir.Value:
        """AVX2: ``acc`` + per token lane the 4 products of signed ``values`` and ``x`` (<64 x i8> each), as
        pmaddubsw of their ``magnitudes`` and x with the values' signs (psign: exact, as the activations
        stay within +-127; a pair is at most 2 * 128 * 127)."""
        b = self.b
        v32i8 = ir.VectorType(_I8, 32)
        psign = self._fn("llvm.x86.avx2.psign.b", v32i8, [v32i8, v32i8])

        def half(vec: ir.Value, k: int) -> ir.Value:
            return b.bitcast(self._slice(b.bitcast(vec, _V16I32), range(8 * k, 8 * k + 8)), v32i8)

        signed_x = b.shuffle_vector(b.call(psign, [half(x, 0), half(values, 0)]),
                                    b.call(psign, [half(x, 1), half(values, 1)]), _mask(range(64)))
        return self.widen_pairs(acc, self.pair_sums(magnitudes, signed_x))

    def widen_pairs(self, acc: ir.Value, pairs: ir.Value) -> ir.Value:
        """AVX2: ``acc`` (<16 x i32>) + per token lane the sum of its pair sums ``pairs`` (pmaddwd with ones)."""
        b = self.b
        v16i16, v8i32 = ir.VectorType(ir.IntType(16), 16), ir.VectorType(_I32, 8)
        maddwd = self._fn("llvm.x86.avx2.pmadd.wd", v8i32, [v16i16, v16i16])
        halves = [b.add(self._slice(acc, range(8 * k, 8 * k + 8)),
                        b.call(maddwd, [self._slice(pairs, range(16 * k, 16 * k + 16)), _vconst(v16i16, 1)]))
                  for k in range(2)]
        return b.shuffle_vector(halves[0], halves[1], _mask(range(16)))

    def decode(self, block: ir.Value, codes: ir.Value, params: ir.Value) -> None:
        """One super-block, unpacked: its 256 codes as unsigned bytes in element order at ``codes``
        (value + OFFSETS[qtype]); at ``params`` the float32 sub-block scales ``d_w * scale_j`` (8 or
        16), then from float 16 on the ``dmin_w * min_j`` (8 or 16)."""
        b = self.b
        if self.qtype in BLOCK32_TYPES:
            self._decode_blocks32(block, codes, params)
            return
        d_w, groups, mins = self._unsigned_groups(block)
        scales = []
        for g, (code, s_lo, s_hi) in enumerate(groups):
            ptr = b.gep(codes, [ir.Constant(_I64, 32 * g)]) if g else codes
            b.store(code, b.bitcast(ptr, code.type.as_pointer()), align=1)
            scales += [s_lo, s_hi] if SUB_BLOCKS[self.qtype] == 16 else [s_lo]
        for j, scale in enumerate(scales):
            ptr = b.gep(params, [ir.Constant(_I64, 4 * j)]) if j else params
            b.store(b.fmul(d_w, b.sitofp(scale, _F32)), b.bitcast(ptr, _F32.as_pointer()), align=4)
        if mins is not None:
            vec = ir.VectorType(_F32, mins.type.count)
            mins_f = b.fmul(self._splat(self._fp16(block, FP16_OFFSETS[self.qtype][1]), vec), b.uitofp(mins, vec))
            b.store(mins_f, b.bitcast(b.gep(params, [ir.Constant(_I64, 64)]), vec.as_pointer()), align=4)

    def _unsigned_groups(self, block: ir.Value) -> tuple[ir.Value, list, ir.Value | None]:
        """(float32 d, per 32 weights (<32 x i8> unsigned codes, i32 scale of the first 16, of the last
        16), the mins or None) of one super-block, from ``_KEmitter.unpack``."""
        groups, _, mins = self.unpack(block)
        if self.qtype == "iq4_xs":  # signed values -> value + 128
            groups = [(self.b.xor(code, _vconst(code.type, 0x80)), s_lo, s_hi) for code, s_lo, s_hi in groups]
        return self._fp16(block, FP16_OFFSETS[self.qtype][0]), groups, mins

    def _decode_blocks32(self, block: ir.Value, codes: ir.Value, params: ir.Value) -> None:
        """8 ggml blocks of 32 (fp16 d, then 32 int8, or 16 bytes of nibbles: element j low, j + 16 high):
        codes value + offset in element order, params the 8 d."""
        b = self.b
        size = BLOCK_BYTES[self.qtype] // 8
        v16i8, v32i8 = ir.VectorType(_I8, 16), ir.VectorType(_I8, 32)
        for g in range(8):
            if self.qtype == "q8_0":
                code = b.xor(self._load(block, 34 * g + 2, v32i8), _vconst(v32i8, 0x80))
            else:
                packed = self._load(block, size * g + 2, v16i8)
                code = b.shuffle_vector(b.and_(packed, _vconst(v16i8, 0xF)), b.lshr(packed, _vconst(v16i8, 4)),
                                        _mask(range(32)))
                if self.qtype == "iq4_nl":
                    code = b.xor(self.lookup16(code, KVALUES_IQ4NL), _vconst(v32i8, 0x80))
            ptr = b.gep(codes, [ir.Constant(_I64, 32 * g)]) if g else codes
            b.store(code, b.bitcast(ptr, v32i8.as_pointer()), align=1)
            ptr = b.gep(params, [ir.Constant(_I64, 4 * g)]) if g else params
            b.store(self._fp16(block, size * g), b.bitcast(ptr, _F32.as_pointer()), align=4)

    def dots(self, rows, vecs, accs: list[list[ir.Value]]) -> list[list[ir.Value]]:
        """Unpacked super-blocks of ``rows`` (per row: i8* codes, i8* params as :meth:`decode` writes
        them) against token vectors ``vecs`` (per vector: i8* values, float* scales, i8* sums, at this
        super-block): the <16 x float> ``accs[row][vector]`` updated. Every activation load feeds one
        vpdpbusd per row, every broadcast of codes one per vector."""
        b = self.b
        n_sub = SUB_BLOCKS[self.qtype]
        quads_per_sub = QK_K // 4 // n_sub
        # A loop over the sub-blocks, not straight-line code: in one basic block LLVM hoisted the
        # activation loads of all sub-blocks and spilled them to the stack (Q4_K 16 ms -> 10 ms).
        loop = _Loop(b, ir.Constant(_I64, n_sub), [_vconst(_V16F32, 0.0)] * (len(rows) * len(vecs)), "sub")
        j = loop.index

        def at(ptr: ir.Value, step: int) -> ir.Value:
            return b.gep(ptr, [b.mul(j, ir.Constant(_I64, step))])

        scales = [self._splat(self._load(at(params, 4), 0, _F32), _V16F32) for _, params in rows]
        words = [[b.bitcast(self._splat(self._load(at(codes, 4 * quads_per_sub), 4 * m, _I32), _V16I32), _V64I8)
                  for m in range(quads_per_sub)] for codes, _ in rows]
        # AVX2 and codes that reach 255 (value + 128): |value| times the activations with value's sign
        # (signed_dot), so the dots start at 0
        signs = self.isa == "avx2" and self.qtype in WIDE_CODES
        if self.qtype in OFFSETS and not signs:  # codes are value + offset: start at -offset * (sum of the activations)
            starts = [self._load(at(s, 4 * LANES), 0, _V16I32) for _, _, s in vecs]
        else:
            starts = [_vconst(_V16I32, 0)] * len(vecs)
        dots = [list(starts) for _ in rows]
        x_sub = [at(x, 64 * quads_per_sub) for x, _, _ in vecs]
        # AVX2: the pair sums of I16_QUADS[qtype] quads added in int16, then widened once (one pmaddwd
        # for them all instead of one per quad)
        chain = I16_QUADS.get(self.qtype, 0) if self.isa == "avx2" else 0
        pairs = [[None] * len(vecs) for _ in rows]
        if signs:
            values = [[b.xor(w, _vconst(_V64I8, -128)) for w in row_words] for row_words in words]
            magnitudes = [[b.select(b.icmp_signed("<", v, _vconst(_V64I8, 0)), b.neg(v), v) for v in row_values]
                          for row_values in values]
        for m in range(quads_per_sub):
            for v, x in enumerate(x_sub):
                xv = self._load(x, 64 * m, _V64I8)
                for r in range(len(rows)):
                    if signs:
                        dots[r][v] = self.signed_dot(dots[r][v], magnitudes[r][m], values[r][m], xv)
                        continue
                    if not chain:
                        dots[r][v] = self.quad_dot(dots[r][v], words[r][m], xv)
                        continue
                    quad = self.pair_sums(words[r][m], xv)
                    pairs[r][v] = quad if m % chain == 0 else b.add(pairs[r][v], quad)
                    if m % chain == chain - 1 or m == quads_per_sub - 1:
                        dots[r][v] = self.widen_pairs(dots[r][v], pairs[r][v])
        if self.qtype in BLOCK32_TYPES:  # each block its own activation scale: (d_w * d_x) * dot, as ggml
            token_scales = [self._load(at(d, LANES), 0, _V16F32) for _, d, _ in vecs]  # d: float*
            factors = [[b.fmul(scale, ts) for ts in token_scales] for scale in scales]
        else:
            factors = [[scale] * len(vecs) for scale in scales]
        f = loop.close([b.fadd(loop.values[r * len(vecs) + v], b.fmul(factors[r][v], b.sitofp(dots[r][v], _V16F32)))
                        for r in range(len(rows)) for v in range(len(vecs))])
        new = []
        for r, (_, params) in enumerate(rows):
            row_accs = []
            for v, (_, d, s) in enumerate(vecs):
                if self.qtype in BLOCK32_TYPES:
                    acc = b.fadd(accs[r][v], f[r * len(vecs) + v])
                else:
                    acc = b.fadd(accs[r][v], b.fmul(self._load(d, 0, _V16F32), f[r * len(vecs) + v]))
                for k in range(MINS.get(self.qtype, 0)):
                    mins_f = self._splat(self._load(params, 64 + 4 * k, _F32), _V16F32)
                    acc = b.fsub(acc, b.fmul(mins_f, self._load(s, 4 * LANES * k, _V16F32)))
                row_accs.append(acc)
            new.append(row_accs)
        return new


class _IQLaneEmitter(_LaneEmitter, _IQEmitter):
    """_LaneEmitter with iquant_simd's decoders: their per-group products are recorded, not emitted."""

    def _token_dots(self, dots, tokens, q, x_offset, s_lo, s_hi, signed=False, sign_mask=None) -> None:
        self._groups.append((q, s_lo, s_hi, sign_mask))

    def _unsigned_groups(self, block: ir.Value) -> tuple[ir.Value, list, None]:
        b = self.b
        self._groups = []
        if self.qtype in IQ_SIGNED:
            self._signed_groups(block, [], [])
            d = self.scaled_d(self._fp16(block, 0))
        else:
            d = self.scaled_d(self._offset_groups(block, [], [])[0])
        groups = []
        for q, s_lo, s_hi, sign_mask in self._groups:
            if sign_mask is not None:  # value = +-magnitude, stored + 128
                q = b.xor(b.sub(b.xor(q, sign_mask), sign_mask), _vconst(q.type, 0x80))
            groups.append((q, s_lo, s_hi))
        return d, groups, None


def _emitter(builder: ir.IRBuilder, isa: str, qtype: str) -> _LaneEmitter:
    return (_IQLaneEmitter if qtype in IQ_TYPES else _LaneEmitter)(builder, isa, qtype)


PARAMS = 32  # float32 per unpacked super-block: 16 scales (or 8), then 16 mins (or 8, or none)


def make_decode(qtype: str, isa_mode: str):
    """Intrinsic ``(w, row, sb, codes, params, slot) -> none``: super-block ``sb`` of row ``row`` unpacked
    into ``codes[slot, :256]`` (uint8) and ``params[slot, :24]`` (float32), see ``_LaneEmitter.decode``.
    The caller checks the bounds."""
    block_bytes = BLOCK_BYTES[qtype]

    def codegen(context, builder, sig, args):
        isa = kernel_isa() if isa_mode == "host" else "generic"
        w, codes, params = (context.make_array(sig.args[i])(context, builder, args[i]) for i in (0, 3, 4))
        row, sb, slot = args[1], args[2], args[5]
        block = builder.gep(_as_i8_ptr(builder, _row_ptr(builder, w, row, _I8)),
                            [builder.mul(sb, ir.Constant(_I64, block_bytes))])
        _emitter(builder, isa, qtype).decode(
            block, _as_i8_ptr(builder, _row_ptr(builder, codes, slot, _I8)),
            _as_i8_ptr(builder, _row_ptr(builder, params, slot, _F32)))
        return context.get_dummy_value()

    def typer(typingctx, w, row, sb, codes, params, slot):
        _check_array(w, 2, types.uint8, "w")
        _check_array(codes, 2, types.uint8, "codes")
        _check_array(params, 2, types.float32, "params")
        return types.none(w, types.intp, types.intp, codes, params, types.intp), codegen

    typer.__name__ = typer.__qualname__ = f"{qtype}_decode_{isa_mode}"
    return intrinsic(typer)


def make_lane_tile(qtype: str, isa_mode: str, n_vec: int, n_rows: int = 1):
    """Intrinsic ``(codes, params, slot, xt, dt, st, vec0, sb, acc, acc_row, acc_col) -> none``: the
    unpacked super-blocks in ``codes[slot + i]``/``params[slot + i]`` (i < n_rows) against super-block
    ``sb`` of token vectors vec0 .. vec0 + n_vec - 1 of :func:`activations_for_lanes`'s arrays, added to
    ``acc[acc_row + i, acc_col : acc_col + 16 * n_vec]`` in place. The caller checks the bounds."""
    n_sums = SUB_BLOCKS[qtype] if qtype in OFFSETS else MINS[qtype]
    n_scales = TOKEN_SCALES[qtype]
    sums_dtype, sums_elem = (types.int32, _I32) if qtype in OFFSETS else (types.float32, _F32)

    def codegen(context, builder, sig, args):
        isa = kernel_isa() if isa_mode == "host" else "generic"
        codes, params, xt, dt, st, acc = (context.make_array(sig.args[i])(context, builder, args[i])
                                          for i in (0, 1, 3, 4, 5, 8))
        slot, vec0, sb, acc_row, acc_col = args[2], args[6], args[7], args[9], args[10]
        vecs = []
        for v in range(n_vec):
            vec = builder.add(vec0, ir.Constant(_I64, v))
            x = builder.gep(_row_ptr(builder, xt, vec, _I8), [builder.mul(sb, ir.Constant(_I64, LANES * QK_K))])
            d = builder.gep(_row_ptr(builder, dt, vec, _F32), [builder.mul(sb, ir.Constant(_I64, LANES * n_scales))])
            s = builder.gep(_row_ptr(builder, st, vec, sums_elem), [builder.mul(sb, ir.Constant(_I64, LANES * n_sums))])
            vecs.append((x, d, _as_i8_ptr(builder, s)))
        rows, acc_ptrs = [], []
        for r in range(n_rows):
            at = builder.add(slot, ir.Constant(_I64, r))
            rows.append((_as_i8_ptr(builder, _row_ptr(builder, codes, at, _I8)),
                         _as_i8_ptr(builder, _row_ptr(builder, params, at, _F32))))
            row = _row_ptr(builder, acc, builder.add(acc_row, ir.Constant(_I64, r)), _F32)
            acc_ptrs.append(_as_i8_ptr(builder, builder.gep(row, [acc_col])))
        emitter = _emitter(builder, isa, qtype)
        starts = [[emitter._load(ptr, 64 * v, _V16F32) for v in range(n_vec)] for ptr in acc_ptrs]
        finals = emitter.dots(rows, vecs, starts)
        for ptr, row_finals in zip(acc_ptrs, finals):
            for v, value in enumerate(row_finals):
                where = builder.gep(ptr, [ir.Constant(_I64, 64 * v)])
                builder.store(value, builder.bitcast(where, _V16F32.as_pointer()), align=4)
        return context.get_dummy_value()

    def typer(typingctx, codes, params, slot, xt, dt, st, vec0, sb, acc, acc_row, acc_col):
        _check_array(codes, 2, types.uint8, "codes")
        _check_array(params, 2, types.float32, "params")
        _check_array(xt, 2, types.int8, "xt")
        _check_array(dt, 2, types.float32, "dt")
        _check_array(st, 2, sums_dtype, "st")
        _check_array(acc, 2, types.float32, "acc")
        sig = types.none(codes, params, types.intp, xt, dt, st, types.intp, types.intp, acc, types.intp, types.intp)
        return sig, codegen

    typer.__name__ = typer.__qualname__ = f"{qtype}_lanes_{n_rows}x{n_vec}x{LANES}_{isa_mode}"
    return intrinsic(typer)


def tile_shape() -> tuple[int, int]:
    """(rows, token vectors) of a call's block. 4 x 2 with 32 vector registers (AVX-512; arm64 keeps
    it, not measured there): 8 vpdpbusd per activation vector and code broadcast loaded. Measured (Intel
    Xeon, 1 thread, 5632x2048, 128 tokens, G products/s; Q4_K / Q6_K): 1 row x 4 vectors 96 / 91, 2 x 4
    116 / 122, 3 x 4 116 / 128, 4 x 2 129 / 134, 8 x 1 138 / 142 (another run: 4 x 2 159 / 151, 8 x 1
    138 / 142, 6 x 2 139 / 132, 8 x 2 145 / 138). x86 without AVX-512 has 16 (256-bit) registers, which
    4 x 2's accumulators (two each) fill alone: 2 x 2 there. Measured (AMD EPYC Zen 3, AVX2, 1 thread, 128
    tokens, tokens/s; Q4_K 5632x2048 / Q4_K 4096x4096 / Q6_K 32000x2048): 4 x 2 4755 / 3391 / 770, 2 x 2
    6456 / 4293 / 959, 4 x 1 6328 / 4296 / 967, 2 x 4 4228 / 2974 / 722, 8 x 1 5514 / 3869 / 636. Every
    shape computes each output with the same operations in the same order: the bits do not depend on it."""
    if is_arm64() or "avx512f" in numba_target_features():
        return 4, 2
    return 2, 2


_ROW_CHUNK = 16  # rows per parallel work item (a multiple of the tile's rows)
# Fewer tokens take kquant_simd's tiles (16 lanes cost the same for 1 token as for 16). Measured (Intel
# Xeon, 1 thread, 5632x2048, ms, those tiles / these): 4 tokens Q4_K 1.46 / 1.52, Q6_K 2.40 / 1.56;
# 8 tokens Q4_K 1.40 / 1.49, Q6_K 1.67 / 1.63; 16 tokens Q4_K 2.54 / 1.51, Q6_K 2.69 / 1.69.
MIN_TOKENS = 8
_decode = _tile_vecs = _tile_vec = None
_BLOCK_BYTES = _SUMS = _SCALES = _TILE_ROWS = _TILE_VECS = 0


def _matmul_lanes(w, xt, dt, st, n_tok, out):
    """out[t, r] = dot(row r of w, token t) for t < n_tok: 16-row chunks over threads; per chunk and
    super-block, the 16 rows unpacked once, then every token vector against them (4 rows x 2
    vectors per call), the accumulators in a (16, tokens) array."""
    n_vec = xt.shape[0]
    n_rows = w.shape[0]
    n_sb = min(w.shape[1] // _BLOCK_BYTES, xt.shape[1] // (LANES * QK_K), dt.shape[1] // (LANES * _SCALES))
    n_sb = min(n_sb, st.shape[1] // (LANES * _SUMS))
    if xt.shape[0] > dt.shape[0] or xt.shape[0] > st.shape[0] or out.shape[1] < n_rows or out.shape[0] < n_tok:
        raise ValueError("lane product: operand shapes disagree")
    for chunk in prange((n_rows + _ROW_CHUNK - 1) // _ROW_CHUNK):
        r0 = chunk * _ROW_CHUNK
        rows = min(n_rows, r0 + _ROW_CHUNK) - r0
        acc = np.zeros((_ROW_CHUNK, n_vec * LANES), np.float32)
        # rows past the matrix's last stay zero codes and scales: the 4-row tiles run over them (one
        # tile shape compiled, not two) and their results are not written out
        codes = np.zeros((_ROW_CHUNK, QK_K), np.uint8)
        params = np.zeros((_ROW_CHUNK, PARAMS), np.float32)
        for sb in range(n_sb):
            for i in range(rows):
                _decode(w, r0 + i, sb, codes, params, i)
            for v in range(0, n_vec - n_vec % _TILE_VECS, _TILE_VECS):
                for i in range(0, rows, _TILE_ROWS):
                    _tile_vecs(codes, params, i, xt, dt, st, v, sb, acc, i, v * LANES)
            for v in range(n_vec - n_vec % _TILE_VECS, n_vec):
                for i in range(0, rows, _TILE_ROWS):
                    _tile_vec(codes, params, i, xt, dt, st, v, sb, acc, i, v * LANES)
        for i in range(rows):
            for t in range(n_tok):
                out[t, r0 + i] = acc[i, t]


def make_driver(qtype: str, isa_mode: str):
    """``(w, xt, dt, st, n_tok, out)``: the product of ``qtype`` rows ``w`` with :func:`activations_for_lanes`'s
    arrays of ``n_tok`` tokens into ``out`` (n_tok, n_rows); ``isa_mode`` "host" or "generic"."""
    suffix = "" if isa_mode == "host" else "_generic"
    rows, vecs = tile_shape()
    tiles = {"_tile_vecs": make_lane_tile(qtype, isa_mode, vecs, rows),
             "_tile_vec": make_lane_tile(qtype, isa_mode, 1, rows)}
    return _bind(_matmul_lanes, f"matmul_lanes_{qtype}{suffix}", _TILE_ROWS=rows, _TILE_VECS=vecs,
                 _BLOCK_BYTES=BLOCK_BYTES[qtype],
                 _SUMS=SUB_BLOCKS[qtype] if qtype in OFFSETS else MINS[qtype], _SCALES=TOKEN_SCALES[qtype],
                 _decode=make_decode(qtype, isa_mode),
                 **tiles)


# qtype -> (host driver, portable driver)
DRIVERS = {qtype: (make_driver(qtype, "host"), make_driver(qtype, "generic")) for qtype in TYPES}


def standalone_lanes_ir(qtype: str, isa: str) -> str:
    """LLVM IR text of a free-standing ``void {qtype}_lanes(i8* block, i8* codes, i8* params, i8* x,
    float* d, i8* sums, float* acc)``: one super-block unpacked, then its dots with one token vector
    added to ``acc``, the code the intrinsics emit, for cross-target checks (e.g. aarch64 on x86)."""
    module = ir.Module(name=f"{qtype}_lanes_{isa}")
    i8p = _I8.as_pointer()
    fn_type = ir.FunctionType(ir.VoidType(), [i8p, i8p, i8p, i8p, _F32.as_pointer(), i8p, _F32.as_pointer()])
    fn = ir.Function(module, fn_type, name=f"{qtype}_lanes")
    builder = ir.IRBuilder(fn.append_basic_block("entry"))
    block, codes, params, x, d, sums, acc = fn.args
    emitter = _emitter(builder, isa, qtype)
    emitter.decode(block, codes, params)
    acc_vec = builder.bitcast(acc, _V16F32.as_pointer())
    [[total]] = emitter.dots([(codes, params)], [(x, d, sums)], [[builder.load(acc_vec, align=4)]])
    builder.store(total, acc_vec, align=4)
    builder.ret_void()
    return str(module)
