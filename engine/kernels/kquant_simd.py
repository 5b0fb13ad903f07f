"""Integer SIMD products for ggml's K-quants (Q4_K, Q5_K, Q6_K) against Q8_K activations.

The same method as the Q4_0/Q8_0 kernels of simd.py (explicit LLVM vector IR through
``numba.extending.intrinsic``), following ggml's ``ggml_vec_dot_q*_K_q8_K``:

* activations are quantized once per product to ggml's ``block_q8_K``, 256 values per block:
  int8 values in [-127, 127], one float32 scale ``d`` and, per 16 values, the int16 sum
  ``bsums`` (:func:`quantize_activations_q8_k`, bit for bit ``quantize_row_q8_K_ref``);
* per 256-weight super-block, every product of a weight code with an activation, times the
  sub-block's integer scale, is summed exactly in 8 int32 lanes, lane i holding the products of
  elements 4i..4i+3 of every 32-weight group (the lanes of x86's ``pmaddubsw`` + ``pmaddwd``); the
  Q6_K's ``-32`` offsets are taken off with the activation sums, also as 8 lanes
  (``32 * scale_j * bsum_j``);
* only then floats, lane by lane: ``acc += (d_w * d_x) * float(isum)``, and for Q4_K/Q5_K
  ``acc -= (dmin_w * min_j) * (d_x * bsum32_j)`` in lane j, where ``d_x * bsum32_j`` is computed
  once per product (:func:`activations_for`), not per row; multiplies and adds, never fused; one
  fixed 8 -> 1 tree at the end of the row.

Every ISA fills the lanes with the same products (x86 ``pmaddubsw`` + ``pmaddwd`` with the scales,
two tokens per instruction on AVX-512; arm64 ``sdot``; the portable IR sums its products into the
same lanes), so the floats and the results are bit-identical on every path; the tests hold them
to that.

Weight layouts (ggml-quants.c, ``block_q*_K``; all little-endian, read in place)::

    Q4_K (144 bytes): d:f16, dmin:f16, scales[12] (8 x 6-bit scale, 8 x 6-bit min), qs[128]
    Q5_K (176 bytes): d, dmin, scales[12], qh[32] (the 5th bits), qs[128]
    Q6_K (210 bytes): ql[128] (low 4 bits), qh[64] (high 2 bits), scales[16] (int8), d:f16
"""

from __future__ import annotations

import types as types_module

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from engine.kernels.simd import (
    _F32,
    _I8,
    _I16,
    _I32,
    _I64,
    _V8F32,
    _V8I32,
    _V16I8,
    _V16I16,
    _V32I8,
    _V32I16,
    X86_ISAS,
    _as_i8_ptr,
    _check_array,
    _Loop,
    _mask,
    _row_ptr,
    _vconst,
    emit_f16_bits_to_f32,
    emit_prefetch,
    kernel_isa,
)

QK_K = 256
BLOCK_BYTES = {"q2_k": 84, "q3_k": 110, "q4_k": 144, "q5_k": 176, "q6_k": 210, "iq4_xs": 136}
# IQ4_NL/IQ4_XS's 16 non-linear values (ggml's kvalues_iq4nl)
KVALUES_IQ4NL = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
# types whose drivers take float32 ``d * (sum of 32 activations)`` (their mins multiply it); every
# other type takes the int16 sums of 16 activations (offsets such as Q6_K's -32; IQ4_XS ignores them)
SUMS32_TYPES = ("q4_k", "q5_k")
# where each type keeps its fp16 super-block scale d and, with mins, dmin
FP16_OFFSETS = {"q4_k": (0, 2), "q5_k": (0, 2), "q6_k": (208, None), "iq4_xs": (0, None), "q2_k": (80, 82),
                "q3_k": (108, None)}

# Software prefetch distance for the weight stream, bytes ahead of the super-block being read (rows
# are contiguous, so near a row's end this fetches the next row's start). Every cache line of a
# super-block is prefetched (144-210 bytes span 3-4 lines): with one prefetch per super-block at
# 1024 bytes, the Q6_K file's generation measured 75 ms/token on the Intel Xeon; with every line,
# 64 ms at 1024 bytes, 60 ms at 2048, 62 ms at 4096.
_PREFETCH_BYTES = 2048
_V4I32 = ir.VectorType(_I32, 4)
_V16I32 = ir.VectorType(_I32, 16)


# --------------------------------------------------------------------------------------------
# Activations: ggml's quantize_row_q8_K_ref
# --------------------------------------------------------------------------------------------


@intrinsic
def _largest_magnitude(typingctx, x, base):
    """The first of x[base : base + 256] (float32, contiguous) whose magnitude is the largest, sign
    kept (0 if all are 0), as vector IR: 16 loads, a maxnum tree, then the first lane equal to the
    maximum. Plain loops ran a scalar chain, ~40% of the Q8_K quantizer's time."""
    v16f = ir.VectorType(_F32, 16)

    def codegen(context, b, sig, args):
        row = context.make_array(sig.args[0])(context, b, args[0])
        ptr = b.gep(row.data, [args[1]])
        fabs = cgutils.get_or_insert_function(b.module, ir.FunctionType(v16f, [v16f]), "llvm.fabs.v16f32")
        vmax = cgutils.get_or_insert_function(b.module, ir.FunctionType(v16f, [v16f, v16f]), "llvm.maxnum.v16f32")
        chunks = [b.load(b.bitcast(b.gep(ptr, [ir.Constant(_I64, 16 * i)]), v16f.as_pointer()), align=4)
                  for i in range(QK_K // 16)]
        mags = [b.call(fabs, [c]) for c in chunks]
        level = mags
        while len(level) > 1:
            level = [b.call(vmax, [level[i], level[i + 1]]) for i in range(0, len(level), 2)]
        top = level[0]
        for n in (8, 4, 2, 1):
            top = b.call(vmax, [top, b.shuffle_vector(top, top, _mask(list(range(n, 2 * n)) + [0] * (16 - n)))])
        amax = b.extract_element(top, ir.Constant(_I32, 0))
        splat = b.shuffle_vector(top, top, _mask([0] * 16))
        i16 = ir.IntType(16)
        cttz = cgutils.get_or_insert_function(b.module, ir.FunctionType(i16, [i16, ir.IntType(1)]), "llvm.cttz.i16")
        index = ir.Constant(_I64, 0)
        for i in reversed(range(QK_K // 16)):  # the first chunk holding it wins
            hits = b.bitcast(b.fcmp_ordered("==", mags[i], splat), i16)
            here = b.add(ir.Constant(_I64, 16 * i), b.zext(b.call(cttz, [hits, ir.Constant(ir.IntType(1), 1)]), _I64))
            index = b.select(b.icmp_unsigned("!=", hits, ir.Constant(i16, 0)), here, index)
        value = b.load(b.gep(ptr, [index]))
        return b.select(b.fcmp_ordered("==", amax, ir.Constant(_F32, 0.0)), ir.Constant(_F32, 0.0), value)

    return types.float32(x, types.intp), codegen


@njit(cache=True)
def _quantize_q8_k_rows(x, qs, d, bsums) -> None:
    # One function, no jitted helper for a row: a helper is compiled, then linked into this and
    # optimized again (0.7-0.9 s on first use against 0.45-0.55, Zen 4 EPYC). One thread: a parallel
    # version halved the time (0.5 -> 0.2 ms for 128 x 2048) but compiled 1 s longer. Every loop but
    # the search vectorizes (the search is vector IR).
    scratch = np.empty(QK_K, np.float32)
    rounded = scratch.view(np.int32)
    for t in range(x.shape[0]):
        row = x[t]
        for blk in range(x.shape[1] // QK_K):
            base = blk * QK_K
            vmax = _largest_magnitude(row, base)
            if vmax == 0:
                d[t, blk] = 0.0
                qs[t, base : base + QK_K] = 0
                bsums[t, blk * 16 : blk * 16 + 16] = 0
                continue
            iscale = np.float32(-127.0) / vmax
            # ggml's nearest_int: adding 1.5 * 2**23 rounds to an integer, half to even, in the low bits
            for j in range(QK_K):
                scratch[j] = iscale * row[base + j] + np.float32(12582912.0)
            for j in range(QK_K):
                qs[t, base + j] = min(127, rounded[j] - 0x4B400000)
            for g in range(16):
                total = np.int32(0)
                for j in range(16):
                    total += np.int32(qs[t, base + 16 * g + j])
                bsums[t, blk * 16 + g] = total
            d[t, blk] = np.float32(1.0) / iscale


def quantize_activations_q8_k(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float32 ``(n_tok, n)`` (n a multiple of 256) -> int8 values, float32 scales, int16 bsums,
    each with a leading token axis: ggml's ``block_q8_K`` split into three arrays."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n_tok, n = x.shape
    if n % QK_K:
        raise ValueError(f"Q8_K activations: {n} values is not a multiple of {QK_K}")
    qs = np.empty((n_tok, n), np.int8)
    d = np.empty((n_tok, n // QK_K), np.float32)
    bsums = np.empty((n_tok, n // 16), np.int16)
    _quantize_q8_k_rows(x, qs, d, bsums)
    return qs, d, bsums


@njit(cache=True)
def _scaled_sums32_into(d, bsums, out) -> None:
    for t in range(out.shape[0]):
        for i in range(out.shape[1]):
            total = np.int32(bsums[t, 2 * i]) + np.int32(bsums[t, 2 * i + 1])
            out[t, i] = d[t, i // 8] * np.float32(total)


def activations_for(qtype: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The activation arrays the ``qtype`` drivers take: Q8_K values and scales, then for Q6_K the
    int16 sums of 16 values, for Q4_K/Q5_K the float32 ``d * (sum of 32 values)`` per 32-value
    sub-block (their mins multiply it: computed once per product instead of per row)."""
    qs, d, bsums = quantize_activations_q8_k(x)
    if qtype not in SUMS32_TYPES:
        return qs, d, bsums
    sums32 = np.empty((qs.shape[0], qs.shape[1] // 32), np.float32)
    _scaled_sums32_into(d, bsums, sums32)
    return qs, d, sums32


# --------------------------------------------------------------------------------------------
# IR emission
# --------------------------------------------------------------------------------------------


class _KEmitter:
    """The super-block loop of one K-quant row against ``n_tok`` Q8_K activation rows. Subclasses
    add types through ``BLOCK_BYTES`` and :meth:`block_sums` (engine/kernels/iquant_simd.py)."""

    BLOCK_BYTES = BLOCK_BYTES

    def __init__(self, builder: ir.IRBuilder, isa: str, qtype: str, interleaved: bool = False):
        self.b = builder
        self.isa = isa
        self.qtype = qtype
        self.block_bytes = self.BLOCK_BYTES[qtype]
        self.paired = False  # set per super-block by _new_dots
        # interleaved: the activations of tokens 2p and 2p+1 alternate every 32 bytes in one row
        # (interleave_pairs), each token's pointer at its first group: every offset doubles.
        self.x_stride = 2 if interleaved else 1

    def _fn(self, name: str, ret: ir.Type, args: list[ir.Type]) -> ir.Function:
        return cgutils.get_or_insert_function(self.b.module, ir.FunctionType(ret, args), name)

    def _load(self, base: ir.Value, offset: int, ty: ir.Type) -> ir.Value:
        ptr = self.b.gep(base, [ir.Constant(_I64, offset)]) if offset else base
        return self.b.load(self.b.bitcast(ptr, ty.as_pointer()), align=1)

    def _splat(self, scalar: ir.Value, vec_type: ir.VectorType) -> ir.Value:
        one = self.b.insert_element(ir.Constant(vec_type, ir.Undefined), scalar, ir.Constant(_I32, 0))
        return self.b.shuffle_vector(one, ir.Constant(vec_type, ir.Undefined), _mask([0] * vec_type.count))

    def _slice(self, vec: ir.Value, indices) -> ir.Value:
        return self.b.shuffle_vector(vec, vec, _mask(indices))

    def _tree_sum(self, values: list[ir.Value]) -> ir.Value:
        """Sum as a balanced tree: a chain of 8 dependent adds per super-block (which LLVM fuses
        into 8 dependent vpdpwssd on AVX512-VNNI, 5 cycles each) made the Q6_K matvec
        latency-bound; a tree is 3 deep. Integers: any order gives the same sum."""
        while len(values) > 1:
            values = [self.b.add(values[i], values[i + 1]) if i + 1 < len(values) else values[i]
                      for i in range(0, len(values), 2)]
        return values[0]

    def _two_chains(self, values: list[ir.Value]) -> ir.Value:
        """Sum as two chains (even and odd items) and one add: each chain's adds of a pmaddwd
        become vpdpwssd on AVX512-VNNI (LLVM fuses an add into the pmaddwd before it; a tree's
        adds of two pmaddwd results it does not), and a batch tile's token pairs are chains enough
        to hide their latency. Measured (Intel Xeon, 1 thread, 5632x2048, 64 tokens): Q4_K 12.8 ->
        9.9 ms, Q6_K 11.8 -> 10.5 ms. Integers: the same sum in any order."""
        b = self.b
        chains = []
        for chain in (values[0::2], values[1::2]):
            if chain:
                total = chain[0]
                for v in chain[1:]:
                    total = b.add(total, v)
                chains.append(total)
        return chains[0] if len(chains) == 1 else b.add(chains[0], chains[1])

    def _quad_sums(self, vec: ir.Value) -> ir.Value:
        """<8 x i32> from <32 x i32> or <16 x i32>: lane i = the sum of the adjacent inputs that
        belong to it (4i..4i+3, or 2i, 2i+1). Every ISA's lanes hold the same products this way
        (as pmaddubsw + pmaddwd and sdot group them), so the lane floats are the same too."""
        b = self.b
        while vec.type.count > 8:
            n = vec.type.count
            vec = b.add(self._slice(vec, range(0, n, 2)), self._slice(vec, range(1, n, 2)))
        return vec

    def _weighted_bsums(self, weights: ir.Value, bsum_ptr: ir.Value) -> ir.Value:
        """<8 x i32>, lane i = w[2i] * bsum[2i] + w[2i+1] * bsum[2i+1] for 16 int32 weights in int16
        range (the sub-block scales or mins) and a token's 16 int16 bsums: one pmaddwd on x86
        (exact: |w * bsum| <= 128 * 2032), else the products and their pair sums."""
        b = self.b
        bsums = self._load(bsum_ptr, 0, _V16I16)
        if self.isa in X86_ISAS:
            maddwd = self._fn("llvm.x86.avx2.pmadd.wd", _V8I32, [_V16I16, _V16I16])
            return b.call(maddwd, [b.trunc(weights, _V16I16), bsums])
        return self._quad_sums(b.mul(weights, b.sext(bsums, _V16I32)))

    def _fp16(self, block: ir.Value, offset: int) -> ir.Value:
        """float32 value of the fp16 at block + offset (once per super-block: the scalar integer
        form costs nothing, and never touches a float subnormal, see emit_f16_bits_to_f32)."""
        return emit_f16_bits_to_f32(self.b, self._load(block, offset, _I16))

    def _sign_transfer(self, q: ir.Value, x: ir.Value) -> tuple[ir.Value, ir.Value]:
        """(|q|, x with q's sign): the same products, with the first factor unsigned for pmaddubsw
        (|q|, |x| <= 127, so a pair stays below 2**15). A lane with q = 0 keeps x: |q| = 0 anyway."""
        b = self.b
        zero = ir.Constant(q.type, [0] * q.type.count)
        negative = b.icmp_signed("<", q, zero)
        return b.select(negative, b.sub(zero, q), q), b.select(negative, b.sub(zero, x), x)

    def lookup16(self, codes: ir.Value, table) -> ir.Value:
        """<32 x i8> of table[code] for codes 0..15 (a 16-entry int8 table): one pshufb on x86, two
        tbl on arm64, a tree of 15 selects on the bits of the codes in the portable IR."""
        b = self.b
        if self.isa in X86_ISAS:
            pshufb = self._fn("llvm.x86.avx2.pshuf.b", _V32I8, [_V32I8, _V32I8])
            return b.call(pshufb, [ir.Constant(_V32I8, list(table) * 2), codes])
        if self.isa == "neon-dotprod":
            tbl = self._fn("llvm.aarch64.neon.tbl1.v16i8", _V16I8, [_V16I8, _V16I8])
            halves = [b.call(tbl, [ir.Constant(_V16I8, list(table)), self._slice(codes, part)])
                      for part in (range(16), range(16, 32))]
            return b.shuffle_vector(halves[0], halves[1], _mask(range(32)))
        level = [ir.Constant(_V32I8, [v] * 32) for v in table]
        for bit in range(4):
            set_ = b.icmp_unsigned("!=", b.and_(codes, _vconst(_V32I8, 1 << bit)), _vconst(_V32I8, 0))
            level = [b.select(set_, level[i + 1], level[i]) for i in range(0, len(level), 2)]
        return level[0]

    def group_dot(self, q: ir.Value, x: ir.Value, s_lo: ir.Value, s_hi: ir.Value, signed: bool = False) -> ir.Value:
        """<8 x i32> whose lane total is s_lo * dot(q[0:16], x[0:16]) + s_hi * dot(q[16:32], x[16:32]),
        exactly: q are codes 0..63 (as <32 x i8>), or with ``signed`` int8 values in [-127, 127], x int8
        activations, s_* i32 scales in [-128, 127]."""
        b = self.b
        if signed and self.isa in X86_ISAS:
            q, x = self._sign_transfer(q, x)
        if self.isa in X86_ISAS:
            maddubs = self._fn("llvm.x86.avx2.pmadd.ub.sw", _V16I16, [_V32I8, _V32I8])
            maddwd = self._fn("llvm.x86.avx2.pmadd.wd", _V8I32, [_V16I16, _V16I16])
            # u8 x s8 pairs into i16: |pair| <= 2 * 63 * 127 < 2**15, no saturation; i16 lanes 0-7
            # come from elements 0-15, 8-15 from 16-31, so pmaddwd applies each half's scale
            pairs = b.call(maddubs, [q, x])
            scales = b.shuffle_vector(self._splat(b.trunc(s_lo, _I16), _V16I16),
                                      self._splat(b.trunc(s_hi, _I16), _V16I16),
                                      _mask(list(range(8)) + list(range(24, 32))))
            return b.call(maddwd, [pairs, scales])
        if self.isa == "neon-dotprod":
            sdot = self._fn("llvm.aarch64.neon.sdot.v4i32.v16i8", _V4I32, [_V4I32, _V16I8, _V16I8])
            halves = []
            for part, scale in ((range(16), s_lo), (range(16, 32), s_hi)):
                dots = b.call(sdot, [_vconst(_V4I32, 0), self._slice(q, part), self._slice(x, part)])
                halves.append(b.mul(dots, self._splat(scale, _V4I32)))
            return b.shuffle_vector(halves[0], halves[1], _mask(range(8)))
        # portable: products in i16 (|63 * 127| fits, |127 * 127| too), adjacent pairs summed (still exact
        # in i16: 2 * 16129 < 2**15), widened and scaled in i32, then into the x86 lane order
        products = b.mul(b.sext(q, _V32I16) if signed else b.zext(q, _V32I16), b.sext(x, _V32I16))
        pairs = b.sext(b.add(self._slice(products, range(0, 32, 2)), self._slice(products, range(1, 32, 2))), _V16I32)
        scales = b.shuffle_vector(self._splat(s_lo, _V16I32), self._splat(s_hi, _V16I32),
                                  _mask(list(range(8)) + list(range(24, 32))))
        return self._quad_sums(b.mul(pairs, scales))

    # ---- the group dots of all tokens: one at a time, or two per 512-bit op ----------------------

    def _new_dots(self, tokens) -> list[list[ir.Value]]:
        """Per token (or, with AVX-512, per pair of tokens) the list of group dots to be summed."""
        self.paired = self.isa == "avx512-vnni" and len(tokens) % 2 == 0
        return [[] for _ in range(len(tokens) // 2 if self.paired else len(tokens))]

    def _token_dots(self, dots, tokens, q: ir.Value, x_offset: int, s_lo: ir.Value, s_hi: ir.Value,
                    signed: bool = False, sign_mask: ir.Value | None = None) -> None:
        """Each token's group dot with ``q`` (codes, or with ``signed`` int8 values). ``sign_mask``
        (<32 x i8>, -1 where the weight is negative) negates the products of unsigned magnitudes
        ``q``: on x86 the activations are negated, ``(x ^ m) - m`` (two ops, and pmaddubsw keeps
        its unsigned operand), elsewhere the weights, once for every token."""
        b = self.b
        if sign_mask is not None and self.isa not in X86_ISAS:
            q, signed, sign_mask = b.sub(b.xor(q, sign_mask), sign_mask), True, None
        if not self.paired:
            for t, (x_ptr, _, _) in enumerate(tokens):
                x = self._load(x_ptr, self.x_stride * x_offset, _V32I8)
                if sign_mask is not None:
                    x = b.sub(b.xor(x, sign_mask), sign_mask)
                dots[t].append(self.group_dot(q, x, s_lo, s_hi, signed))
            return
        # AVX-512BW: the codes twice in one zmm against two tokens' activations, so one
        # vpmaddubsw + vpmaddwd serves two tokens; the low 8 lanes are token 2p's, the high 8
        # token 2p+1's, each exactly the 256-bit kernels' lanes.
        v64i8, v32i16, v16i32 = ir.VectorType(_I8, 64), ir.VectorType(_I16, 32), ir.VectorType(_I32, 16)
        maddubs = self._fn("llvm.x86.avx512.pmaddubs.w.512", v32i16, [v64i8, v64i8])
        maddwd = self._fn("llvm.x86.avx512.pmaddw.d.512", v16i32, [v32i16, v32i16])
        q2 = b.shuffle_vector(q, q, _mask(list(range(32)) * 2))
        mask2 = None if sign_mask is None else b.shuffle_vector(sign_mask, sign_mask, _mask(list(range(32)) * 2))
        half = b.shuffle_vector(self._splat(b.trunc(s_lo, _I16), _V16I16), self._splat(b.trunc(s_hi, _I16), _V16I16),
                                _mask(list(range(8)) + list(range(24, 32))))
        scales = b.shuffle_vector(half, half, _mask(list(range(16)) * 2))
        for p in range(len(dots)):
            if self.x_stride == 2:  # the two tokens' 32 bytes are adjacent: one 64-byte load
                x = self._load(tokens[2 * p][0], 2 * x_offset, v64i8)
            else:
                x = b.shuffle_vector(self._load(tokens[2 * p][0], x_offset, _V32I8),
                                     self._load(tokens[2 * p + 1][0], x_offset, _V32I8), _mask(range(64)))
            q_used = q2
            if mask2 is not None:
                x = b.sub(b.xor(x, mask2), mask2)
            elif signed:
                q_used, x = self._sign_transfer(q2, x)
            dots[p].append(b.call(maddwd, [b.call(maddubs, [q_used, x]), scales]))

    def _finish_dots(self, dots) -> list[ir.Value]:
        """<8 x i32> per token: the tree sums, pairs split back into their two tokens."""
        if not self.paired:
            return [self._tree_sum(d) for d in dots]
        sums = [self._two_chains(d) for d in dots]
        return [self._slice(v, part) for v in sums for part in (range(8), range(8, 16))]

    # ---- one super-block: the weights' (codes, scales) once, then every token ----------------

    def q4_5_k_scales(self, block: ir.Value) -> tuple[ir.Value, ir.Value]:
        """A Q4_K/Q5_K super-block's 8 sub-block scales and 8 mins (6 bits each) as two <8 x i32>."""
        b = self.b
        # ggml's kmask shuffle of the 12 bytes, on three u32 words
        u0, u1, u2 = (self._load(block, 4 + 4 * i, _I32) for i in range(3))

        def c(v: int) -> ir.Constant:
            return ir.Constant(_I32, v)

        m1, m2, m3 = c(0x3F3F3F3F), c(0x0F0F0F0F), c(0x03030303)
        sc_lo = b.and_(u0, m1)
        sc_hi = b.or_(b.and_(u2, m2), b.shl(b.and_(b.lshr(u0, c(6)), m3), c(4)))
        mn_lo = b.and_(u1, m1)
        mn_hi = b.or_(b.and_(b.lshr(u2, c(4)), m2), b.shl(b.and_(b.lshr(u1, c(6)), m3), c(4)))
        words = ir.Constant(_V4I32, ir.Undefined)
        for i, w in enumerate((sc_lo, sc_hi, mn_lo, mn_hi)):
            words = b.insert_element(words, w, c(i))
        packed = b.bitcast(words, _V16I8)  # bytes 0-7 scales, 8-15 mins, all 0..63
        return b.zext(self._slice(packed, range(8)), _V8I32), b.zext(self._slice(packed, range(8, 16)), _V8I32)

    def unpack(self, block: ir.Value) -> tuple[list[tuple[ir.Value, ir.Value, ir.Value]], ir.Value | None,
                                               ir.Value | None]:
        """One super-block's weights: (groups, scales, mins). ``groups``: per 32 weights in element order,
        (<32 x i8> codes, i32 scale of the first 16, i32 scale of the last 16); codes are unsigned
        (Q6_K 0..63 = value + 32, Q3_K 0..7 = value + 4, Q4_K/Q5_K/Q2_K the value) except IQ4_XS's,
        which are its signed values. ``scales``: the per-16 scales as <16 x i32> (Q6_K, Q3_K, Q2_K: the
        activation sums weight them) or None; ``mins``: Q4_K/Q5_K's 8 or Q2_K's 16 as i32 vector, or None."""
        b = self.b

        def c(v: int) -> ir.Constant:
            return ir.Constant(_I32, v)

        def bits(v: ir.Value, shift: int, mask: int) -> ir.Value:
            return b.and_(b.lshr(v, _vconst(v.type, shift)) if shift else v, _vconst(v.type, mask))

        groups = []
        if self.qtype == "q6_k":
            scales = b.sext(self._load(block, 192, _V16I8), _V16I32)
            for half in range(2):
                ql = [self._load(block, 64 * half + 32 * i, _V32I8) for i in range(2)]
                qh = self._load(block, 128 + 32 * half, _V32I8)
                for k in range(4):  # elements 128 * half + 32k .. +31: bits 4-5 are qh's bits 2k, 2k+1
                    low = b.and_(ql[k % 2], _vconst(_V32I8, 0x0F)) if k < 2 else b.lshr(ql[k % 2], _vconst(_V32I8, 4))
                    code = b.or_(low, b.shl(bits(qh, 2 * k, 3), _vconst(_V32I8, 4)))
                    groups.append((code, b.extract_element(scales, c(8 * half + 2 * k)),
                                   b.extract_element(scales, c(8 * half + 2 * k + 1))))
            return groups, scales, None
        if self.qtype in SUMS32_TYPES:
            scales, mins = self.q4_5_k_scales(block)
            qs_offset = 16 if self.qtype == "q4_k" else 48
            qh = self._load(block, 16, _V32I8) if self.qtype == "q5_k" else None
            for j in range(4):  # 64 weights: low nibbles (sub-block 2j), then high nibbles (2j + 1)
                packed_q = self._load(block, qs_offset + 32 * j, _V32I8)
                nibbles = (b.and_(packed_q, _vconst(_V32I8, 0x0F)), b.lshr(packed_q, _vconst(_V32I8, 4)))
                for i, code in enumerate(nibbles):
                    if qh is not None:
                        code = b.or_(code, b.shl(bits(qh, 2 * j + i, 1), _vconst(_V32I8, 4)))
                    scale = b.extract_element(scales, c(2 * j + i))
                    groups.append((code, scale, scale))
            return groups, None, mins
        if self.qtype in ("q2_k", "q3_k"):
            q3 = self.qtype == "q3_k"
            if q3:
                # 16 scales of 6 bits: low 4 from bytes 96-103 (j < 8: low nibble of byte j, else high
                # nibble of byte j - 8), high 2 from bytes 104-107 (byte 104 + j % 4, bits 2 * (j // 4))
                low8 = self._load(block, 96, ir.VectorType(_I8, 8))
                lows = b.shuffle_vector(b.and_(low8, ir.Constant(low8.type, [0xF] * 8)),
                                        b.lshr(low8, ir.Constant(low8.type, [4] * 8)), _mask(range(16)))
                high4 = self._load(block, 104, ir.VectorType(_I8, 4))
                highs = b.shuffle_vector(high4, high4, _mask([j % 4 for j in range(16)]))
                shifts = ir.Constant(_V16I8, [2 * (j // 4) for j in range(16)])
                highs = b.and_(b.lshr(highs, shifts), _vconst(_V16I8, 3))
                packed = b.or_(lows, b.shl(highs, _vconst(_V16I8, 4)))
                scales = b.sub(b.zext(packed, _V16I32), ir.Constant(_V16I32, [32] * 16))
                hmask = self._load(block, 0, _V32I8)
                qs_base, mins = 32, None
            else:
                raw = self._load(block, 0, _V16I8)
                scales = b.zext(b.and_(raw, _vconst(_V16I8, 0xF)), _V16I32)
                mins = b.zext(b.lshr(raw, _vconst(_V16I8, 4)), _V16I32)
                qs_base = 16
            for g in range(8):  # values 32g .. 32g + 31: sub-blocks 2g, 2g + 1
                packed_q = self._load(block, qs_base + 32 * (g // 4), _V32I8)
                code = bits(packed_q, 2 * (g % 4), 3)
                if q3:  # the hmask bit set means +4 (code 4..7 = value + 4)
                    code = b.or_(code, b.shl(bits(hmask, 4 * (g // 4) + g % 4, 1), _vconst(_V32I8, 2)))
                groups.append((code, b.extract_element(scales, c(2 * g)), b.extract_element(scales, c(2 * g + 1))))
            return groups, scales, mins
        if self.qtype == "iq4_xs":
            scales_h = b.zext(self._load(block, 2, _I16), _I32)
            scales_l = self._load(block, 4, _I32)  # 4 bytes, two 4-bit fields each: sub-block ib at bits 4ib
            for ib in range(8):
                low = b.and_(b.lshr(scales_l, c(4 * ib)) if ib else scales_l, c(0xF))
                high = b.and_(b.lshr(scales_h, c(2 * ib)) if ib else scales_h, c(3))
                scale = b.sub(b.or_(low, b.shl(high, c(4))), c(32))
                packed = self._load(block, 8 + 16 * ib, _V16I8)
                # elements 0-15 are the low nibbles of the 16 bytes, 16-31 their high nibbles
                nibbles = b.shuffle_vector(b.and_(packed, _vconst(_V16I8, 0xF)),
                                           b.lshr(packed, _vconst(_V16I8, 4)), _mask(range(32)))
                groups.append((self.lookup16(nibbles, KVALUES_IQ4NL), scale, scale))
            return groups, None, None
        raise NotImplementedError(self.qtype)

    def _scaled_code_sums(self, block: ir.Value, tokens) -> tuple[list[ir.Value], ir.Value | None, list | None]:
        """(<8 x i32> scaled code sums per token with the code offsets taken off, Q4_K/Q5_K's mins,
        Q2_K's <8 x i32> per token of the sums min_j * bsum_j) of one super-block."""
        b = self.b
        groups, scales, mins = self.unpack(block)
        dots = self._new_dots(tokens)
        for g, (code, s_lo, s_hi) in enumerate(groups):
            self._token_dots(dots, tokens, code, 32 * g, s_lo, s_hi, signed=self.qtype == "iq4_xs")
        isums = self._finish_dots(dots)
        offset_bits = {"q6_k": 5, "q3_k": 2}.get(self.qtype)  # codes are value + 32 / value + 4
        if offset_bits is not None:
            # take 2**offset_bits * sum_j scale_j * bsum_j off
            isums = [b.sub(isum, b.shl(self._weighted_bsums(scales, bsum_ptr), _vconst(_V8I32, offset_bits)))
                     for isum, (_, _, bsum_ptr) in zip(isums, tokens)]
        if self.qtype == "q2_k":
            return isums, None, [self._weighted_bsums(mins, bsum_ptr) for _, _, bsum_ptr in tokens]
        return isums, mins, None

    def row(self, w_row: ir.Value, tokens, n_blocks: ir.Value) -> list[ir.Value]:
        """The loop over super-blocks; tokens: (i8* values, float* scales, i16* bsums) per token.
        Returns one float32 dot per token."""
        b = self.b
        loop = _Loop(b, n_blocks, [_vconst(_V8F32, 0.0)] * len(tokens), "kdot")
        index, accs = loop.index, loop.values
        block = b.gep(w_row, [b.mul(index, ir.Constant(_I64, self.block_bytes))])
        # The 1-token tile streams rows from memory: every line ahead. A batch's first tile on a
        # row reads it from memory, the others from L1: one prefetch per super-block.
        for line in range(0, self.block_bytes if len(tokens) == 1 else 1, 64):
            emit_prefetch(b, block, _PREFETCH_BYTES + line)
        sums_per_block = 8 if self.qtype in SUMS32_TYPES else 16  # bsums of 16 values / scaled sums of 32
        here = [
            (b.gep(x, [b.mul(index, ir.Constant(_I64, self.x_stride * QK_K))]), b.gep(d, [index]),
             b.gep(s, [b.mul(index, ir.Constant(_I64, sums_per_block))]))
            for x, d, s in tokens
        ]
        if self.qtype in FP16_OFFSETS:
            d_offset, dmin_offset = FP16_OFFSETS[self.qtype]
            isums, mins, min_sums = self._scaled_code_sums(block, here)
            d_w = self._fp16(block, d_offset)
            mins_f = None
            if mins is not None:  # Q4_K/Q5_K, once per row and block
                mins_f = b.fmul(self._splat(self._fp16(block, dmin_offset), _V8F32), b.uitofp(mins, _V8F32))
            if min_sums is not None:  # Q2_K
                dmin_w = self._fp16(block, dmin_offset)
                new_accs = []
                for acc, (_, d_ptr, _), isum, msum in zip(accs, here, isums, min_sums):
                    d_x = b.load(d_ptr, align=4)
                    acc = b.fadd(acc, b.fmul(self._splat(b.fmul(d_w, d_x), _V8F32), b.sitofp(isum, _V8F32)))
                    # lane j: (dmin_w * d_x) * sum of min_i * bsum_i over its sub-blocks
                    acc = b.fsub(acc, b.fmul(self._splat(b.fmul(dmin_w, d_x), _V8F32), b.sitofp(msum, _V8F32)))
                    new_accs.append(acc)
                loop.close(new_accs)
                return [self._horizontal_sum(acc) for acc in accs]
        else:
            d_w, isums = self.block_sums(block, here)
            mins_f = None
        new_accs = []
        for acc, (_, d_ptr, s_ptr), isum in zip(accs, here, isums):
            d_x = b.load(d_ptr, align=4)
            acc = b.fadd(acc, b.fmul(self._splat(b.fmul(d_w, d_x), _V8F32), b.sitofp(isum, _V8F32)))
            if mins_f is not None:
                # lane j: (dmin_w * min_j) * (d_x * sum of sub-block j's activations)
                acc = b.fsub(acc, b.fmul(mins_f, self._load(s_ptr, 0, _V8F32)))
            new_accs.append(acc)
        loop.close(new_accs)
        return [self._horizontal_sum(acc) for acc in accs]

    def block_sums(self, block: ir.Value, tokens) -> tuple[ir.Value, list[ir.Value]]:
        """A subclass's type: (float32 factor, <8 x i32> per token) of one super-block, the
        super-block's dot with a token being ``factor * d_x * (sum of the lanes)``."""
        raise NotImplementedError(self.qtype)

    def _horizontal_sum(self, acc: ir.Value) -> ir.Value:
        # a fixed tree (8 -> 4 -> 2 -> 1): the result depends on nothing but the lanes
        b = self.b
        while acc.type.count > 1:
            n = acc.type.count
            acc = b.fadd(self._slice(acc, range(n // 2)), self._slice(acc, range(n // 2, n)))
        return b.extract_element(acc, ir.Constant(_I32, 0))


def make_tile(qtype: str, isa_mode: str, n_tok: int, interleaved: bool = False, emitter=_KEmitter):
    """Intrinsic ``(w, row, xq, xd, xs, tok0) -> UniTuple(float32, n_tok)``: row ``row`` of the
    2-D K-quant weights against activation rows tok0..tok0+n_tok-1 (the caller checks bounds);
    ``xs`` as :func:`activations_for` makes it (int16 bsums for Q6_K, float32 sums for Q4_K/Q5_K).
    ``interleaved``: ``xq`` is :func:`interleave_pairs` of the activations (tok0 even)."""
    ret = types.UniTuple(types.float32, n_tok)
    block_bytes = emitter.BLOCK_BYTES[qtype]
    sums_type, sums_elem, sums_per_block = (
        (types.float32, _F32, 8) if qtype in SUMS32_TYPES else (types.int16, _I16, 16))

    def codegen(context, builder, sig, args):
        isa = kernel_isa() if isa_mode == "host" else "generic"
        w = context.make_array(sig.args[0])(context, builder, args[0])
        xq = context.make_array(sig.args[2])(context, builder, args[2])
        xd = context.make_array(sig.args[3])(context, builder, args[3])
        xs = context.make_array(sig.args[4])(context, builder, args[4])
        row, tok0 = args[1], args[5]
        # super-blocks: the fewest any operand holds, so nothing is read out of bounds
        w_blocks = builder.udiv(builder.extract_value(w.shape, 1), ir.Constant(_I64, block_bytes))
        x_blocks = builder.udiv(builder.extract_value(xq.shape, 1), ir.Constant(_I64, QK_K * (1 + interleaved)))
        d_blocks = builder.extract_value(xd.shape, 1)
        s_blocks = builder.udiv(builder.extract_value(xs.shape, 1), ir.Constant(_I64, sums_per_block))
        n_blocks = w_blocks
        for other in (x_blocks, d_blocks, s_blocks):
            n_blocks = builder.select(builder.icmp_unsigned("<", other, n_blocks), other, n_blocks)
        tokens = []
        for t in range(n_tok):
            tok = builder.add(tok0, ir.Constant(_I64, t))
            if interleaved:  # pair row tok // 2, token 2p + 1's groups 32 bytes after 2p's
                pair_row = _row_ptr(builder, xq, builder.lshr(tok, ir.Constant(_I64, 1)), _I8)
                x_ptr = builder.gep(pair_row, [ir.Constant(_I64, 32 * (t % 2))])
            else:
                x_ptr = _row_ptr(builder, xq, tok, _I8)
            tokens.append((x_ptr, _row_ptr(builder, xd, tok, _F32), _row_ptr(builder, xs, tok, sums_elem)))
        w_row = _as_i8_ptr(builder, _row_ptr(builder, w, row, _I8))
        dots = emitter(builder, isa, qtype, interleaved).row(w_row, tokens, n_blocks)
        return context.make_tuple(builder, ret, dots)

    def typer(typingctx, w, row, xq, xd, xs, tok0):
        _check_array(w, 2, types.uint8, "w")
        _check_array(xq, 2, types.int8, "xq")
        _check_array(xd, 2, types.float32, "xd")
        _check_array(xs, 2, sums_type, "xs")
        return ret(w, types.intp, xq, xd, xs, types.intp), codegen

    typer.__name__ = typer.__qualname__ = f"{qtype}_tile_1x{n_tok}_{isa_mode}{'_pairs' if interleaved else ''}"
    return intrinsic(typer)


@njit(cache=True)
def interleave_pairs(xq: np.ndarray, n_tok: int) -> np.ndarray:
    """int8 ``(n_tok // 2, 2 * n)`` from activation rows ``xq[:n_tok]``: row p holds tokens 2p and 2p+1
    alternating every 32 values, so the AVX-512 tiles load both tokens' group with one 64-byte
    load (two loads and a vinserti64x4 before: ~30% of a Q4_K batch's time)."""
    n = xq.shape[1]
    out = np.empty((n_tok // 2, 2 * n), np.int8)
    for p in range(n_tok // 2):
        for g in range(n // 32):
            out[p, 64 * g : 64 * g + 32] = xq[2 * p, 32 * g : 32 * g + 32]
            out[p, 64 * g + 32 : 64 * g + 64] = xq[2 * p + 1, 32 * g : 32 * g + 32]
    return out


# Tokens per batched tile: one row's super-blocks unpacked once for 8 tokens. Measured (1 thread,
# 128 tokens, tokens/s): Q4_K 5632x2048 5,007 with 4-token tiles, 5,551 with 8.
_TILE_TOKENS = 8
_ROW_CHUNK = 16  # rows per parallel work item of the batched drivers (as simd.py)
# Types whose unpacking is dear take 16-token tiles first ("wide", iquant_simd's grid types). Measured
# when Q6_K still used these tiles (Intel Xeon, `bench/bench_kquants.py --threads 1`, tokens/s): Q6_K
# 32000x2048 at 32 tokens 995 with 8-token tiles, 1,075-1,306 with 16; Q4_K lost 4-11% with 16.
_WIDE_TOKENS = 2 * _TILE_TOKENS

# Driver templates. Each type's drivers are these functions compiled under their own names with that
# type's tiles as the globals ``_one`` (1 token), ``_tile`` (8) and ``_wide`` (16). Not closures:
# Numba keys a closure's disk cache by its pickled cells, and an intrinsic pickles differently in
# every process (a miss on every start). Not one driver with a type flag: that compiles every
# type's IR into each specialization (simd.py measured 2-4 s per driver). The matrix-vector driver
# is its own function: with the one-token tile in the same function as the 8-token loop, the Q6_K
# matvec ran at 22 GB/s instead of 43 (1 thread, 4096x4096: LLVM optimizes the shared one worse).
_one = _tile = _wide = None


def _matvec(w, xq, xd, xs, out):
    """out[0, r] = dot(row r of w, the activation row as activations_for makes it); rows over threads."""
    for r in prange(w.shape[0]):
        out[0, r] = _one(w, r, xq, xd, xs, 0)[0]


def _matmul_wide(w, xq, xd, xs, out):
    """out[t, r] = dot(row r, activation row t): 16-row chunks over threads, 16-token tiles on the
    activations' interleaved pairs first, then one 8-token tile, then single tokens."""
    n_wide = xq.shape[0] - xq.shape[0] % _WIDE_TOKENS
    n_tiled = xq.shape[0] - xq.shape[0] % _TILE_TOKENS
    pairs = interleave_pairs(xq, n_tiled)
    for chunk in prange((w.shape[0] + _ROW_CHUNK - 1) // _ROW_CHUNK):
        for r in range(chunk * _ROW_CHUNK, min(w.shape[0], (chunk + 1) * _ROW_CHUNK)):
            for t in range(0, n_wide, _WIDE_TOKENS):
                wide = _wide(w, r, pairs, xd, xs, t)
                for i in range(_WIDE_TOKENS):
                    out[t + i, r] = wide[i]
            for t in range(n_wide, n_tiled, _TILE_TOKENS):
                dots = _tile(w, r, pairs, xd, xs, t)
                for i in range(_TILE_TOKENS):
                    out[t + i, r] = dots[i]
            for t in range(n_tiled, xq.shape[0]):
                out[t, r] = _one(w, r, xq, xd, xs, t)[0]


def _matmul_portable(w, xq, xd, xs, out):
    """_matmul_wide with the portable IR's 8-token tiles (plain activation rows, no pairs)."""
    n_tiled = xq.shape[0] - xq.shape[0] % _TILE_TOKENS
    for chunk in prange((w.shape[0] + _ROW_CHUNK - 1) // _ROW_CHUNK):
        for r in range(chunk * _ROW_CHUNK, min(w.shape[0], (chunk + 1) * _ROW_CHUNK)):
            for t in range(0, n_tiled, _TILE_TOKENS):
                dots = _tile(w, r, xq, xd, xs, t)
                for i in range(_TILE_TOKENS):
                    out[t + i, r] = dots[i]
            for t in range(n_tiled, xq.shape[0]):
                out[t, r] = _one(w, r, xq, xd, xs, t)[0]


def _rows(w, xq, xd, xs, out):
    """out[t, r] = dot(row r, activation row t), one token at a time, rows over threads, so a row is
    read from memory once for every token: the one-token products and the small batches of the types
    whose larger ones take engine/kernels/kquant_gemm.py's lane products. One function for both, so a
    type's first use compiles one driver, not two (0.5-0.7 s each, Zen 4 EPYC); for one token it
    streams as _matvec (Q4_K/Q6_K 5632x2048 from memory, 1 and 2 threads: 17.7/23.0 and 30.9/31.3
    GB/s against 17.7/22.7 and 29.8/31.7), and as the 16-row chunks it replaced for 4 tokens."""
    for r in prange(w.shape[0]):
        for t in range(xq.shape[0]):
            out[t, r] = _one(w, r, xq, xd, xs, t)[0]


def _bind(template, name: str, **tiles):
    """``template`` compiled as its own function ``name``, with ``tiles`` as its globals."""
    function = types_module.FunctionType(template.__code__, dict(template.__globals__, **tiles), name)
    function.__qualname__ = name
    function.__doc__ = template.__doc__
    return njit(parallel=True, cache=True)(function)


def make_drivers(qtype: str, emitter=_KEmitter, tiles: bool = False) -> tuple:
    """(matvec, matmul, portable matvec, portable matmul) of ``qtype``, each ``(w, xq, xd, xs, out)``
    with the activations of :func:`activations_for`. Batches: with ``tiles`` 16-token tiles first (the
    grid types), else one token at a time by the matrix-vector driver itself (_rows: the types whose
    batches of 8 and more take kquant_gemm's lane products; no tile compiled that would never run)."""
    one, one_p = make_tile(qtype, "host", 1, emitter=emitter), make_tile(qtype, "generic", 1, emitter=emitter)
    if not tiles:
        rows, rows_p = _bind(_rows, f"matvec_{qtype}", _one=one), _bind(_rows, f"matvec_{qtype}_generic", _one=one_p)
        return rows, rows, rows_p, rows_p
    matmul = _bind(_matmul_wide, f"matmul_{qtype}", _one=one,
                   _tile=make_tile(qtype, "host", _TILE_TOKENS, interleaved=True, emitter=emitter),
                   _wide=make_tile(qtype, "host", _WIDE_TOKENS, interleaved=True, emitter=emitter))
    matmul_p = _bind(_matmul_portable, f"matmul_{qtype}_generic", _one=one_p,
                     _tile=make_tile(qtype, "generic", _TILE_TOKENS, emitter=emitter))
    return (_bind(_matvec, f"matvec_{qtype}", _one=one), matmul,
            _bind(_matvec, f"matvec_{qtype}_generic", _one=one_p), matmul_p)


# qtype -> (matvec, matmul, portable matvec, portable matmul)
TYPES = ("q4_k", "q5_k", "q6_k", "iq4_xs", "q2_k", "q3_k")
# every one of them has lane products for batches of 8 and more (engine/kernels/kquant_gemm.py)
DRIVERS = {qtype: make_drivers(qtype) for qtype in TYPES}


def standalone_row_dot_ir(qtype: str, isa: str, emitter=_KEmitter) -> str:
    """LLVM IR text of a free-standing one-token row dot, for cross-target checks (e.g. compile
    for aarch64 on x86): ``float {qtype}_row_dot(i8* w_row, i8* xq, float* xd, i16* xs,
    i64 n_blocks)``, the same loop the intrinsics emit."""
    module = ir.Module(name=f"{qtype}_{isa}")
    fn_type = ir.FunctionType(_F32, [_I8.as_pointer(), _I8.as_pointer(), _F32.as_pointer(), _I16.as_pointer(), _I64])
    fn = ir.Function(module, fn_type, name=f"{qtype}_row_dot")
    builder = ir.IRBuilder(fn.append_basic_block("entry"))
    w_row, xq, xd, xs, n_blocks = fn.args
    [dot] = emitter(builder, isa, qtype).row(w_row, [(xq, xd, xs)], n_blocks)
    builder.ret(dot)
    return str(module)
