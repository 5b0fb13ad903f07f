"""Causal attention over a KV cache: multi-head, grouped-query and multi-query.

The cache holds, per layer, keys and values for positions ``0 .. n_ctx-1`` as
``(n_ctx, n_kv_head, head_dim)`` float16 (default, half the memory; what llama.cpp
uses) or float32. ``attend`` runs ``n_tok`` new queries at positions
``n_past .. n_past+n_tok-1``, whose keys/values must already be stored: query ``t``
sees keys ``0 .. n_past+t``. Query head ``h`` reads KV head ``h // (n_head / n_kv_head)``,
the grouping of transformers' ``repeat_kv`` and llama.cpp. ALiBi adds
``slope[h] * (j - i)`` to the score of key ``j`` for the query at position ``i``. Gemma 2's
soft-capping (``softcap`` > 0) maps each scaled score ``s`` to ``softcap * tanh(s / softcap)``
before the softmax (and before ALiBi, as llama.cpp orders them).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time

import numpy as np
from gguf import GGMLQuantizationType
from llvmlite import ir
from numba import njit, prange, typeof, types
from numba.core import cgutils, event
from numba.extending import intrinsic, overload

from engine.errors import HalfbyteError
from engine.kernels import simd
from engine.kernels.matmul import _call, f16_to_f32, slp_scope, to_f32
from engine.kernels.simd import _F16, _F32, _I16, _I64, _V8F32, _Loop, _mask, _vconst
from engine.threads import available_cores

# Float math here never reassociates: with "reassoc" LLVM picks a reduction's vector width and
# interleave from the CPU's cost model, and the same file gave other logits (and other sampled
# text) on a Sapphire Rapids than on a Zen 5 with the same kernels. "contract" (FMA) is kept:
# every x86 kernel target and arm64 have FMA, so the rounding is the same on all of them.
_FLOAT_DOT = {"contract", "nsz"}
_V8I16 = ir.VectorType(_I16, 8)


_EXP_FLOOR = np.float32(-44.0)  # softmax weights below exp(_EXP_FLOOR) are 0 (see _attend_kernel)
# exp on [-44, 0] in float64 without a libm call, so that a query's weights vectorize (libm's scalar
# exp was 27% of a 4000-key prompt's attention; this one takes 44.7 ms where libm's took 57.6 and
# the same loop without any exp 39.5, Intel Xeon, 2 threads): x = k ln2 + r with k rounded to
# nearest by the 1.5 * 2**52 trick (Cody-Waite: ln2's high part has trailing zero bits, so
# k * _LN2_HI is exact), e^r by its Taylor series to r^13 (|r| <= ln2/2: truncation below 1e-17),
# times 2^k from a table. Plain multiplies and adds, no FMA contraction: the same bits on every
# CPU. Within 2 ulp of float64 exp, so the float32 weights almost never differ from libm's.
_LN2_HI = 6.93147180369123816490e-01
_LN2_LO = 1.90821492927058770002e-10
_ROUNDING = 6755399441055744.0  # 1.5 * 2**52
_POW2 = np.array([2.0**k for k in range(-64, 1)])  # 2^k, k = -64..0
_T2, _T3, _T4, _T5, _T6, _T7, _T8, _T9, _T10, _T11, _T12, _T13 = (1.0 / math.factorial(n) for n in range(2, 14))

Q8_0_BLOCK = 32  # values per Q8_0 block (ggml's block_q8_0: fp16 scale + 32 int8)
Q8_0_BLOCK_BYTES = 34
CACHE_TYPES = {"f16": np.dtype(np.float16), "f32": np.dtype(np.float32), "q8_0": np.dtype(np.uint8)}


def cache_type_name(kind: str | type | np.dtype) -> str:
    """"f16", "f32" or "q8_0" for a cache type given by name (llama.cpp's -ctk/-ctv) or numpy dtype."""
    if isinstance(kind, str):
        name = kind.lower()
    else:
        try:
            name = {np.dtype(np.float16): "f16", np.dtype(np.float32): "f32"}.get(np.dtype(kind), "")
        except TypeError:
            name = ""
    if name not in CACHE_TYPES:
        raise HalfbyteError(f"KV cache type must be one of f16, f32, q8_0, got {kind!r}")
    return name


class KVCache:
    """Preallocated keys and values of every layer, ``k`` and ``v`` indexed ``[layer, position, kv_head]``.

    Each holds F16 (the default, what llama.cpp uses), F32 or Q8_0 (llama.cpp's ``-ctk/-ctv q8_0``:
    ggml's Q8_0 blocks of each head's vector, 34 bytes per 32 values, about half of F16; quantized
    with the same bit-exact quantizer as weights, so the head size must be a multiple of 32).
    ``n_past`` is the number of positions holding data: ``store`` at ``pos`` sets it to
    ``pos + n_tok`` (storing below ``n_past`` rewinds; later positions become stale),
    ``reset`` empties the cache without touching memory.
    """

    def __init__(self, n_layer: int, n_ctx: int, n_kv_head: int, head_dim: int,
                 dtype: str | type | np.dtype = np.float16, v_dtype: str | type | np.dtype | None = None) -> None:
        self.type_k = cache_type_name(dtype)
        self.type_v = cache_type_name(dtype if v_dtype is None else v_dtype)
        if min(n_layer, n_ctx, n_kv_head, head_dim) < 1:
            raise HalfbyteError(f"KV cache dimensions must be positive, got layers={n_layer} ctx={n_ctx} "
                                f"kv_heads={n_kv_head} head_dim={head_dim}")
        if "q8_0" in (self.type_k, self.type_v) and head_dim % Q8_0_BLOCK:
            raise HalfbyteError(f"a q8_0 KV cache needs a head size that is a multiple of 32, got {head_dim}")
        self.head_dim = head_dim

        def storage(kind: str) -> np.ndarray:
            width = head_dim // Q8_0_BLOCK * Q8_0_BLOCK_BYTES if kind == "q8_0" else head_dim
            return np.zeros((n_layer, n_ctx, n_kv_head, width), CACHE_TYPES[kind])

        self.k = storage(self.type_k)
        self.v = storage(self.type_v)
        self.dtype = self.k.dtype  # kept for callers that look at it; type_k / type_v say what it holds
        self.n_past = 0

    @property
    def n_layer(self) -> int:
        return self.k.shape[0]

    @property
    def n_ctx(self) -> int:
        return self.k.shape[1]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def store(self, layer: int, k: np.ndarray, v: np.ndarray, pos: int) -> None:
        """Write ``k``, ``v`` ``(n_tok, n_kv_head, head_dim)`` of ``layer`` at positions ``pos..pos+n_tok-1``."""
        expected = (self.k.shape[2], self.head_dim)
        if np.shape(k)[1:] != expected or np.shape(v) != np.shape(k):
            raise HalfbyteError(f"KV cache stores (n_tok, {expected[0]}, {expected[1]}) keys and values, "
                                f"got {np.shape(k)} and {np.shape(v)}")
        n_tok = np.shape(k)[0]
        if not 0 <= layer < self.n_layer:
            raise HalfbyteError(f"layer {layer} is out of range (the cache has {self.n_layer})")
        if pos < 0 or pos + n_tok > self.n_ctx:
            raise HalfbyteError(f"positions {pos}..{pos + n_tok - 1} do not fit in the context of {self.n_ctx}")
        for kind, cache, values in ((self.type_k, self.k, k), (self.type_v, self.v, v)):
            if kind == "q8_0":
                from engine import quants  # here: quants imports the kernels

                rows = np.ascontiguousarray(values, dtype=np.float32).reshape(-1, self.head_dim)
                blocks = quants.quantize(rows, GGMLQuantizationType.Q8_0)
                cache[layer, pos:pos + n_tok] = blocks.reshape(n_tok, cache.shape[2], -1)
            else:
                cache[layer, pos:pos + n_tok] = values  # numpy rounds float32 -> float16 to nearest even
        self.n_past = pos + n_tok

    def keys(self, layer: int) -> np.ndarray:
        return self.k[layer]

    def values(self, layer: int) -> np.ndarray:
        return self.v[layer]

    def dequantized(self, which: str, layer: int) -> np.ndarray:
        """One layer's keys ("k") or values ("v") as float32 (n_ctx, n_kv_head, head_dim): for references."""
        cache, kind = (self.k, self.type_k) if which == "k" else (self.v, self.type_v)
        if kind != "q8_0":
            return cache[layer].astype(np.float32)
        from engine import quants

        flat = cache[layer].reshape(-1, cache.shape[-1])
        return quants.dequantize(flat, GGMLQuantizationType.Q8_0).reshape(cache.shape[1], cache.shape[2], -1)

    def reset(self) -> None:
        self.n_past = 0


def _score_q8_0_codegen(context, builder, sig, args):
    """``sum(q[d] * k[d])`` for a key stored as Q8_0 blocks (``k`` uint8: fp16 d + 32 int8 per block).

    Per block: the 32 int8 values widened to 4 x <8 x float>, multiplied into one block sum by a
    fixed FMA chain (q0*k0, then + q1*k1, + q2*k2, + q3*k3), scaled by d into the accumulator (one
    more FMA); then the same fixed 8 -> 1 tree as the float keys. Fixed order: the same bits on every
    CPU with FMA."""
    b = builder
    qa = context.make_array(sig.args[0])(context, b, args[0])
    ka = context.make_array(sig.args[1])(context, b, args[1])
    n_blocks = b.udiv(b.extract_value(qa.shape, 0), ir.Constant(_I64, Q8_0_BLOCK))
    k_blocks = b.udiv(b.extract_value(ka.shape, 0), ir.Constant(_I64, Q8_0_BLOCK_BYTES))
    n_blocks = b.select(b.icmp_unsigned("<", n_blocks, k_blocks), n_blocks, k_blocks)
    fma = cgutils.get_or_insert_function(b.module, ir.FunctionType(_V8F32, [_V8F32] * 3), "llvm.fma.v8f32")
    v8i8 = ir.VectorType(ir.IntType(8), 8)
    v8i32 = ir.VectorType(ir.IntType(32), 8)
    loop = _Loop(b, n_blocks, [_vconst(_V8F32, 0.0)], "score_q8")
    block = b.gep(ka.data, [b.mul(loop.index, ir.Constant(_I64, Q8_0_BLOCK_BYTES))])
    d_bits = b.load(b.bitcast(block, _I16.as_pointer()), align=1)
    d = b.fpext(b.bitcast(d_bits, _F16), _F32)
    d_vec = b.shuffle_vector(b.insert_element(ir.Constant(_V8F32, ir.Undefined), d, ir.Constant(ir.IntType(32), 0)),
                             ir.Constant(_V8F32, ir.Undefined), _mask([0] * 8))
    base = b.mul(loop.index, ir.Constant(_I64, Q8_0_BLOCK))
    block_sum = _vconst(_V8F32, 0.0)
    for g in range(4):
        raw = b.load(b.bitcast(b.gep(block, [ir.Constant(_I64, 2 + 8 * g)]), v8i8.as_pointer()), align=1)
        kv = b.sitofp(b.sext(raw, v8i32), _V8F32)
        qv = b.load(b.bitcast(b.gep(qa.data, [b.add(base, ir.Constant(_I64, 8 * g))]), _V8F32.as_pointer()), align=4)
        block_sum = b.call(fma, [qv, kv, block_sum])
    [acc] = loop.close([b.call(fma, [block_sum, d_vec, loop.values[0]])])
    v4 = b.fadd(b.shuffle_vector(acc, acc, _mask(range(4))), b.shuffle_vector(acc, acc, _mask(range(4, 8))))
    v2 = b.fadd(b.shuffle_vector(v4, v4, _mask(range(2))), b.shuffle_vector(v4, v4, _mask(range(2, 4))))
    return b.fadd(b.extract_element(v2, ir.Constant(ir.IntType(32), 0)),
                  b.extract_element(v2, ir.Constant(ir.IntType(32), 1)))


@intrinsic
def _score(typingctx, q, k):
    """``sum(q[d] * k[d])`` as float32, where ``k`` is float32 or IEEE-half bits (uint16).

    Written as vector IR so the summation order is fixed by this code, not by the CPU's
    vectorizer: elements 16i..16i+7 go to accumulator A and 16i+8..16i+15 to B (two FMA chains
    hide the FMA latency), a last group of 8 to A, the rest to a scalar; then A + B, a fixed
    8 -> 1 tree, plus the scalar. The same bits on every CPU with FMA, at full vector speed.
    """
    ok = (isinstance(q, types.Array) and q.ndim == 1 and q.layout == "C" and q.dtype == types.float32
          and isinstance(k, types.Array) and k.ndim == 1 and k.layout == "C"
          and k.dtype in (types.float32, types.uint16, types.uint8))
    if not ok:
        return None
    if k.dtype == types.uint8:
        return types.float32(q, k), _score_q8_0_codegen
    half_keys = k.dtype == types.uint16

    def codegen(context, builder, sig, args):
        qa = context.make_array(sig.args[0])(context, builder, args[0])
        ka = context.make_array(sig.args[1])(context, builder, args[1])
        n = _shorter(builder, builder.extract_value(qa.shape, 0), ka)
        return _emit_scores(builder, [qa.data], ka.data, n, half_keys)[0]

    return types.float32(q, k), codegen


def _shorter(b: ir.IRBuilder, n_q: ir.Value, key) -> ir.Value:
    """Elements a dot reads: the query's length or the key array's, whichever is shorter."""
    n_k = b.extract_value(key.shape, 0)
    return b.select(b.icmp_unsigned("<", n_q, n_k), n_q, n_k)


def _emit_scores(b: ir.IRBuilder, q_ptrs: list, k_ptr: ir.Value, n: ir.Value, half_keys: bool) -> list:
    """The fixed-order dot of _score for each query pointer against one key (float32 or half bits):
    every query's operations are exactly the one-query ones; the key's loads and conversions are
    shared."""
    fma = cgutils.get_or_insert_function(b.module, ir.FunctionType(_V8F32, [_V8F32] * 3), "llvm.fma.v8f32")

    def key8(at: ir.Value) -> ir.Value:
        if half_keys:
            bits = b.load(b.bitcast(b.gep(k_ptr, [at]), _V8I16.as_pointer()), align=2)
            return b.fpext(b.bitcast(bits, ir.VectorType(_F16, 8)), _V8F32)
        return b.load(b.bitcast(b.gep(k_ptr, [at]), _V8F32.as_pointer()), align=4)

    def query8(q_ptr: ir.Value, at: ir.Value) -> ir.Value:
        return b.load(b.bitcast(b.gep(q_ptr, [at]), _V8F32.as_pointer()), align=4)

    zero = _vconst(_V8F32, 0.0)
    loop = _Loop(b, b.lshr(n, ir.Constant(_I64, 4)), [zero, zero] * len(q_ptrs), "score")
    base = b.shl(loop.index, ir.Constant(_I64, 4))
    k_a, k_b = key8(base), key8(b.add(base, ir.Constant(_I64, 8)))
    updated = []
    for i, q_ptr in enumerate(q_ptrs):
        acc_a, acc_b = loop.values[2 * i], loop.values[2 * i + 1]
        updated.append(b.call(fma, [query8(q_ptr, base), k_a, acc_a]))
        updated.append(b.call(fma, [query8(q_ptr, b.add(base, ir.Constant(_I64, 8))), k_b, acc_b]))
    accs = loop.close(updated)
    # a last group of 8 (n % 16 >= 8) into A
    done16 = b.shl(b.lshr(n, ir.Constant(_I64, 4)), ir.Constant(_I64, 4))
    has8 = b.icmp_unsigned(">=", b.sub(n, done16), ir.Constant(_I64, 8))
    skip_block = b.basic_block
    with b.if_then(has8):
        k_last = key8(done16)
        extras = [b.call(fma, [query8(q_ptr, done16), k_last, accs[2 * i]]) for i, q_ptr in enumerate(q_ptrs)]
        extra_block = b.basic_block
    merged = []
    for i in range(len(q_ptrs)):  # every phi first: LLVM wants them at the top of the block
        phi = b.phi(_V8F32)
        phi.add_incoming(extras[i], extra_block)
        phi.add_incoming(accs[2 * i], skip_block)
        merged.append(phi)
    results = []
    for i in range(len(q_ptrs)):
        total = b.fadd(merged[i], accs[2 * i + 1])
        v4 = b.fadd(b.shuffle_vector(total, total, _mask(range(4))), b.shuffle_vector(total, total, _mask(range(4, 8))))
        v2 = b.fadd(b.shuffle_vector(v4, v4, _mask(range(2))), b.shuffle_vector(v4, v4, _mask(range(2, 4))))
        results.append(b.fadd(b.extract_element(v2, ir.Constant(ir.IntType(32), 0)),
                              b.extract_element(v2, ir.Constant(ir.IntType(32), 1))))
    # scalar tail: elements from (n // 8) * 8
    start = b.shl(b.lshr(n, ir.Constant(_I64, 3)), ir.Constant(_I64, 3))
    tail = _Loop(b, b.sub(n, start), [ir.Constant(_F32, 0.0)] * len(q_ptrs), "score_tail")
    at = b.add(start, tail.index)
    ks = b.load(b.gep(k_ptr, [at]))
    if half_keys:
        ks = b.fpext(b.bitcast(ks, _F16), _F32)
    f32_fma = cgutils.get_or_insert_function(b.module, ir.FunctionType(_F32, [_F32] * 3), "llvm.fma.f32")
    tails = tail.close([b.call(f32_fma, [b.load(b.gep(q_ptr, [at])), ks, tail.values[i]])
                        for i, q_ptr in enumerate(q_ptrs)])
    return [b.fadd(result, tail_sum) for result, tail_sum in zip(results, tails)]


def _score_lanes_codegen(context, builder, sig, args):
    """dots[c] = _score(q, key c) for the keys of a transposed chunk ``kt`` (head_dim, KC), c < n
    rounded up to whole vectors: the keys in the vector lanes, the same operations per key as
    _emit_scores in the same order, so the same bits. _emit_scores keeps, per key, 16 running
    sums: lane l of A over d = 16i + l and of B over d = 16i + 8 + l (one FMA each per i), then
    T_l = A_l + B_l, T_l + T_(l+4), that + the one 2 lanes on, the two, + 0.0 (its empty tail).
    Here each of those 16 sums is a vector over keys, so no sum crosses lanes: a key costs
    head_dim / W FMAs and no shuffles. Head size a multiple of 16."""
    b = builder
    width = 16 if "avx512f" in simd._target_features() else 8
    vec = ir.VectorType(_F32, width)
    qa = context.make_array(sig.args[0])(context, b, args[0])
    kta = context.make_array(sig.args[1])(context, b, args[1])
    da = context.make_array(sig.args[3])(context, b, args[3])
    n = args[2]
    head_dim = b.extract_value(qa.shape, 0)
    kc = b.extract_value(kta.shape, 1)
    fma = cgutils.get_or_insert_function(b.module, ir.FunctionType(vec, [vec] * 3), f"llvm.fma.v{width}f32")
    zero = ir.Constant(vec, [0.0] * width)
    n_vecs = b.udiv(b.add(n, ir.Constant(_I64, width - 1)), ir.Constant(_I64, width))
    n_groups = b.udiv(head_dim, ir.Constant(_I64, 16))
    keys = _Loop(b, n_vecs, [], "lane_keys")
    col = b.mul(keys.index, ir.Constant(_I64, width))

    def sums(half: int) -> list:  # the 8 sums of A (half 0) or B (half 1) for these keys
        loop = _Loop(b, n_groups, [zero] * 8, f"lane_sums{half}")
        updated = []
        for lane in range(8):
            d = b.add(b.mul(loop.index, ir.Constant(_I64, 16)), ir.Constant(_I64, 8 * half + lane))
            qd = b.load(b.gep(qa.data, [d]))
            undefined = ir.Constant(vec, ir.Undefined)
            q_vec = b.shuffle_vector(b.insert_element(undefined, qd, ir.Constant(ir.IntType(32), 0)), undefined,
                                     _mask([0] * width))
            k_vec = b.load(b.bitcast(b.gep(kta.data, [b.add(b.mul(d, kc), col)]), vec.as_pointer()), align=4)
            updated.append(b.call(fma, [q_vec, k_vec, loop.values[lane]]))
        return loop.close(updated)

    a_sums = sums(0)
    b_sums = sums(1)
    t = [b.fadd(x, y) for x, y in zip(a_sums, b_sums)]
    v = [b.fadd(t[lane], t[lane + 4]) for lane in range(4)]
    u = [b.fadd(v[lane], v[lane + 2]) for lane in range(2)]
    dots = b.fadd(b.fadd(u[0], u[1]), zero)
    b.store(dots, b.bitcast(b.gep(da.data, [col]), vec.as_pointer()), align=4)
    keys.close([])
    return context.get_dummy_value()


@intrinsic
def _score_lanes(typingctx, q, kt, n, dots):
    ok = (isinstance(q, types.Array) and q.ndim == 1 and q.layout == "C" and q.dtype == types.float32
          and isinstance(kt, types.Array) and kt.ndim == 2 and kt.layout == "C" and kt.dtype == types.float32
          and isinstance(dots, types.Array) and dots.ndim == 1 and dots.layout == "C"
          and dots.dtype == types.float32)
    if not ok:
        return None
    return types.void(q, kt, types.intp, dots), _score_lanes_codegen


@intrinsic
def _score4_float(typingctx, q, h0, k):
    """(_score(q[h0], k), ..., _score(q[h0 + 3], k)) for float32 queries ``q`` (n_head, head_dim) and a
    float32 or half-bits key: the same four numbers, with the key read once."""
    ok = (isinstance(q, types.Array) and q.ndim == 2 and q.layout == "C" and q.dtype == types.float32
          and isinstance(k, types.Array) and k.ndim == 1 and k.layout == "C"
          and k.dtype in (types.float32, types.uint16))
    if not ok:
        return None
    half_keys = k.dtype == types.uint16

    def codegen(context, builder, sig, args):
        qa = context.make_array(sig.args[0])(context, builder, args[0])
        ka = context.make_array(sig.args[2])(context, builder, args[2])
        head_dim = builder.extract_value(qa.shape, 1)
        n = _shorter(builder, head_dim, ka)
        q_ptrs = [builder.gep(qa.data, [builder.mul(builder.add(args[1], ir.Constant(_I64, i)), head_dim)])
                  for i in range(4)]
        scores = _emit_scores(builder, q_ptrs, ka.data, n, half_keys)
        return context.make_tuple(builder, sig.return_type, scores)

    return types.UniTuple(types.float32, 4)(q, types.intp, k), codegen


def _score4(q, h0, k):  # pragma: no cover - the overload runs
    raise NotImplementedError


@overload(_score4, inline="always")
def _score4_overload(q, h0, k):
    if k.dtype == types.uint8:  # Q8_0 keys: one query at a time
        return lambda q, h0, k: (_score(q[h0], k), _score(q[h0 + 1], k), _score(q[h0 + 2], k), _score(q[h0 + 3], k))
    return lambda q, h0, k: _score4_float(q, h0, k)


@njit(cache=True, fastmath=_FLOAT_DOT)
def _accumulate_float(acc, p, v):
    for d in range(acc.size):
        acc[d] += p * to_f32(v[d])


@njit(cache=True, fastmath=_FLOAT_DOT)
def _accumulate_q8_0(acc, p, v):
    """acc += p * value, for a value vector stored as Q8_0 blocks: p * d once per block, then
    element-wise (no sum, so no order to fix)."""
    for blk in range(acc.size // Q8_0_BLOCK):
        at = blk * Q8_0_BLOCK_BYTES
        pd = p * f16_to_f32(np.uint16(v[at]) | (np.uint16(v[at + 1]) << np.uint16(8)))
        for i in range(Q8_0_BLOCK):
            acc[blk * Q8_0_BLOCK + i] += pd * np.float32(np.int8(v[at + 2 + i]))


def _accumulate_keys_codegen(context, builder, sig, args):
    """``acc += p_j * v[j, kv_head]`` for j = j0 .. j1-1 in order, p_j = probs[j - p_off], skipping
    p_j == 0; head size a multiple of 32. Per 32 output values, four <8 x float> accumulators stay
    in registers across the keys (one FMA per element and key, as the element-wise loop does: the
    same bits), instead of a load and a store of the output per key."""
    b = builder
    acc_a = context.make_array(sig.args[0])(context, b, args[0])
    probs_a = context.make_array(sig.args[1])(context, b, args[1])
    v_a = context.make_array(sig.args[3])(context, b, args[3])
    p_off, kv_head, j0, j1 = args[2], args[4], args[5], args[6]
    half_values = sig.args[3].dtype == types.uint16
    n_kv = b.extract_value(v_a.shape, 1)
    head_dim = b.extract_value(v_a.shape, 2)
    row_stride = b.mul(n_kv, head_dim)
    v_base = b.gep(v_a.data, [b.mul(kv_head, head_dim)])
    fma = cgutils.get_or_insert_function(b.module, ir.FunctionType(_V8F32, [_V8F32] * 3), "llvm.fma.v8f32")
    n_keys = b.sub(j1, j0)
    n_keys = b.select(b.icmp_signed("<", n_keys, ir.Constant(_I64, 0)), ir.Constant(_I64, 0), n_keys)
    blocks = _Loop(b, b.sdiv(head_dim, ir.Constant(_I64, 32)), [], "acc_blocks")
    d0 = b.mul(blocks.index, ir.Constant(_I64, 32))
    acc_ptrs = [b.bitcast(b.gep(acc_a.data, [b.add(d0, ir.Constant(_I64, 8 * k))]), _V8F32.as_pointer())
                for k in range(4)]
    start = [b.load(ptr, align=4) for ptr in acc_ptrs]
    keys = _Loop(b, n_keys, start, "acc_keys")
    j = b.add(j0, keys.index)
    p = b.load(b.gep(probs_a.data, [b.sub(j, p_off)]))
    entry = b.basic_block
    with b.if_then(b.fcmp_unordered("!=", p, ir.Constant(_F32, 0.0))):
        p_vec = b.shuffle_vector(b.insert_element(ir.Constant(_V8F32, ir.Undefined), p, ir.Constant(ir.IntType(32), 0)),
                                 ir.Constant(_V8F32, ir.Undefined), _mask([0] * 8))
        row = b.gep(v_base, [b.add(b.mul(j, row_stride), d0)])
        updated = []
        for k, acc in enumerate(keys.values):
            at = b.gep(row, [ir.Constant(_I64, 8 * k)])
            if half_values:
                bits = b.load(b.bitcast(at, _V8I16.as_pointer()), align=2)
                values = b.fpext(b.bitcast(bits, ir.VectorType(_F16, 8)), _V8F32)
            else:
                values = b.load(b.bitcast(at, _V8F32.as_pointer()), align=4)
            updated.append(b.call(fma, [p_vec, values, acc]))
        done = b.basic_block
    merged = []
    for acc, new in zip(keys.values, updated):
        phi = b.phi(_V8F32)
        phi.add_incoming(new, done)
        phi.add_incoming(acc, entry)
        merged.append(phi)
    finals = keys.close(merged)
    for ptr, value in zip(acc_ptrs, finals):
        b.store(value, ptr, align=4)
    blocks.close([])
    return context.get_dummy_value()


@intrinsic
def _accumulate_keys(typingctx, acc, probs, p_off, v, kv_head, j0, j1):
    ok = (isinstance(acc, types.Array) and acc.ndim == 1 and acc.layout == "C" and acc.dtype == types.float32
          and isinstance(probs, types.Array) and probs.ndim == 1 and probs.layout == "C"
          and probs.dtype == types.float32
          and isinstance(v, types.Array) and v.ndim == 3 and v.layout == "C"
          and v.dtype in (types.float32, types.uint16))
    if not ok:
        return None
    return types.void(acc, probs, types.intp, v, types.intp, types.intp, types.intp), _accumulate_keys_codegen


def _accumulate_run(acc, probs, p_off, v, kv_head, j0, j1):  # pragma: no cover - the overload runs
    raise NotImplementedError


@overload(_accumulate_run, inline="always")
def _accumulate_run_overload(acc, probs, p_off, v, kv_head, j0, j1):
    """``acc += probs[j - p_off] * v[j, kv_head]`` for j in j0..j1-1, zero weights skipped: the
    register-blocked intrinsic for float caches whose head size is a multiple of 32, else key by key."""
    if v.dtype == types.uint8:
        def by_key_q8(acc, probs, p_off, v, kv_head, j0, j1):
            for j in range(j0, j1):
                p = probs[j - p_off]
                if p != 0.0:
                    _accumulate_q8_0(acc, p, v[j, kv_head])
        return by_key_q8

    def float_values(acc, probs, p_off, v, kv_head, j0, j1):
        if v.shape[2] % 32 == 0:
            _accumulate_keys(acc, probs, p_off, v, kv_head, j0, j1)
            return
        for j in range(j0, j1):
            p = probs[j - p_off]
            if p != 0.0:
                _accumulate_float(acc, p, v[j, kv_head])
    return float_values


def _transpose_keys(k, kv_head, c0, c1, kt):  # pragma: no cover - the overload runs
    raise NotImplementedError


@overload(_transpose_keys, inline="always")
def _transpose_keys_overload(k, kv_head, c0, c1, kt):
    """kt[d, j - c0] = key j's element d as float32 (exact), for float caches; Q8_0 keys never
    take the lanes (their dot has its own order)."""
    if k.dtype == types.uint8:
        return lambda k, kv_head, c0, c1, kt: None

    def transpose(k, kv_head, c0, c1, kt):
        for j in range(c0, c1):
            key = k[j, kv_head]
            for d in range(key.size):
                kt[d, j - c0] = to_f32(key[d])
    return transpose


def _half_values(v):  # pragma: no cover - the overload runs
    raise NotImplementedError


@overload(_half_values, inline="always")
def _half_values_overload(v):
    """Whether a cache holds F16 bits (uint16), as a constant of the compiled kernel."""
    half = v.dtype == types.uint16
    return lambda v: half


def _widen_values(v, kv_head, c0, c1, vc):  # pragma: no cover - the overload runs
    raise NotImplementedError


@overload(_widen_values, inline="always")
def _widen_values_overload(v, kv_head, c0, c1, vc):
    """vc[j - c0, 0] = value row j as float32 (exact), for F16 caches; others are read as they are."""
    if v.dtype != types.uint16:
        return lambda v, kv_head, c0, c1, vc: None

    def widen(v, kv_head, c0, c1, vc):
        for j in range(c0, c1):
            row = v[j, kv_head]
            for d in range(row.size):
                vc[j - c0, 0, d] = to_f32(row[d])
    return widen


# Query tokens per tile. A tile is one KV head's queries (its `group` query heads) for this many
# tokens: each key and value row is read once per tile instead of once per query. Measured (Intel
# Xeon, 1.1B shape: 32 heads over 4 KV heads, 512 tokens after 4000): per-query tasks streamed the
# layer's keys from L2/L3 once per query and ran at ~14 ns per (query, key). With the lanes, 8
# tokens (64 queries) repay each chunk's transposition better than 4: that layer took 574 -> 520
# ms on one thread (16 tokens: 504-540, within the noise).
_TILE_TOKENS = 8
_KEY_CHUNK = 64  # keys (and values) per L1-resident chunk: 64 x 64 float16 = 8 KiB
# A call whose tiles have at least this many queries takes _attend_tile_lanes (the keys in the
# vector lanes, the same bits), after transposing each chunk of keys once; fewer queries (a
# token's decode: one token's heads) would not repay the transposition. And only once its last
# query sees this many keys: below that attention is a small part of a prompt, and the lanes
# tile's first use compiles for seconds, which a short prompt would not repay.
_LANE_QUERIES = 32
_LANE_KEYS = 1024


@njit(cache=True, inline="always")
def _exp_weight(x: float) -> float:
    """e^x for float64 x in [-44, 0] (see _LN2_HI)."""
    k = (x * 1.4426950408889634 + _ROUNDING) - _ROUNDING
    r = (x - k * _LN2_HI) - k * _LN2_LO
    p = _T13 * r + _T12
    p = p * r + _T11
    p = p * r + _T10
    p = p * r + _T9
    p = p * r + _T8
    p = p * r + _T7
    p = p * r + _T6
    p = p * r + _T5
    p = p * r + _T4
    p = p * r + _T3
    p = p * r + _T2
    p = p * r + 1.0
    p = p * r + 1.0
    return p * _POW2[int(k) + 64]


@njit(cache=True, inline="always")
def _adjusted(dot, scale, softcap, use_alibi, slope, distance):
    """A score from its dot: scaled, capped (Gemma 2), ALiBi's bias added."""
    s = dot * scale
    if softcap > 0:
        s = softcap * np.tanh(s / softcap)
    if use_alibi:
        s += slope * np.float32(distance)
    return s


@njit(cache=True)
def _exp_weights(scores, peak, weights):
    """weights[j] = e^(scores[j] - peak), 0 below e^_EXP_FLOOR (a loop LLVM vectorizes)."""
    for j in range(scores.shape[0]):
        diff = np.float64(scores[j]) - peak
        weights[j] = _exp_weight(max(diff, -44.0)) if diff >= _EXP_FLOOR else 0.0


# The tile functions' scalar parameters, as the kernel passes them (see _call_tile).
_TILE_SCALARS = {3: types.int64, 4: types.float32, 6: types.boolean, 7: types.int64, 8: types.float32,
                 10: types.int64, 11: types.int64}


@intrinsic
def _call_tile(typingctx, address, q, k, v, n_past, scale, slopes, use_alibi, window, softcap, out, kv_head, tile):
    """Call the compiled tile function at ``address`` (an _attend_tile or _attend_tile_lanes
    specialization, Numba's calling convention) with the other arguments.

    Through a pointer, not by name: a jitted call links the callee's code into the caller's
    module, and LLVM optimizes it all over again there, once per parallel kernel. That was 2.5 s
    of the demo model's first run (a Zen 4 EPYC: the tile 2.85 s on its own, the parallel kernel
    5.4 s with it). This way the tile is compiled (and cached) once by itself, the kernel stays
    small, and one kernel serves both tiles."""
    given = (q, k, v, n_past, scale, slopes, use_alibi, window, softcap, out, kv_head, tile)
    wanted = tuple(_TILE_SCALARS.get(i, ty) for i, ty in enumerate(given))

    def codegen(context, builder, sig, args):
        values = [context.cast(builder, val, have, want) for val, have, want in zip(args[1:], sig.args[1:], wanted)]
        fn_type = context.call_conv.get_function_type(types.none, wanted)
        callee = builder.inttoptr(args[0], fn_type.as_pointer())
        status, _ = context.call_conv.call_function(builder, callee, types.none, wanted, values)
        with cgutils.if_unlikely(builder, status.is_error):
            context.call_conv.return_status_propagate(builder, status)
        return context.get_dummy_value()

    return types.none(address, *given), codegen


@njit(cache=True, parallel=True)
def _attend_kernel(tile_address, q, k, v, n_past, scale, slopes, use_alibi, window, softcap, out):
    n_tiles = (q.shape[0] + _TILE_TOKENS - 1) // _TILE_TOKENS
    # KV-head-major task order, and within a head the tiles from both ends of the prompt in turn
    # (first, last, second, second to last...): a static split over threads then gives each
    # thread a fair share of the causal triangle. The tile's work is a function of its own, called
    # through its address (_call_tile).
    for task in prange(k.shape[1] * n_tiles):
        turn = task % n_tiles
        tile = turn // 2 if turn % 2 == 0 else n_tiles - 1 - turn // 2
        _call_tile(tile_address, q, k, v, n_past, scale, slopes, use_alibi, window, softcap, out, task // n_tiles,
                   tile)


_TILE_ADDRESSES: dict = {}
_BACKGROUND: dict = {}  # tile signature -> the child process compiling it (compile_in_background)


def _tile_signature(args: tuple):
    given = tuple(typeof(arg) for arg in args) + (types.int64, types.int64)
    return types.none(*(_TILE_SCALARS.get(i, ty) for i, ty in enumerate(given)))


def _tile_address(tile_fn, args: tuple) -> int:
    """The address of ``tile_fn`` compiled for the kernel's ``args`` (compiled or loaded from the
    cache on first use, with SLP on as every kernel here)."""
    # What the arrays' Numba types depend on (the scalars' are fixed), far cheaper than typeof:
    # this runs once per layer and token.
    quick = (tile_fn, *((a.dtype, a.ndim, a.flags.writeable, a.flags.aligned, a.flags.c_contiguous) for a in args if
                        isinstance(a, np.ndarray)))
    known = _TILE_ADDRESSES.get(quick)
    if known is not None:
        return known[0]
    signature = _tile_signature(args)
    key = (tile_fn, signature)
    known = _TILE_ADDRESSES.get(key)
    if known is None:
        child = _BACKGROUND.pop(key, None)
        if child is not None:  # a child is compiling it into the on-disk cache: load it from there
            # announced as a compilation (engine/jit_cache.py counts it and tells the user)
            with event.trigger_event("numba:compile", data={"dispatcher": tile_fn, "args": signature.args,
                                                            "return_type": types.none}):
                _wait_for_child(child)
        with slp_scope():
            result = tile_fn.get_compile_result(signature)
        # the compile result stays referenced beside its address: it owns the code
        known = _TILE_ADDRESSES[key] = (result.library.get_pointer_to_function(result.fndesc.llvm_func_name), result)
    _TILE_ADDRESSES[quick] = known
    return known[0]


# Compiling the attention tile in a child process, beside the kernels this process compiles.
_BACKGROUND_TIMEOUT = 900.0  # seconds to wait for the child before compiling here after all (emulators are slow)


def _wait_for_child(child: subprocess.Popen) -> None:
    """Wait for the compiling child, but let a Ctrl-C through at once: one the forward pass held
    before the wait (engine.model.deferred_interrupts) would otherwise wait for the whole
    compilation, seconds on a loaded machine (one during the wait raises by itself: the wait is
    announced as a compilation, engine.jit_cache). The child is left to finish (it fills the
    on-disk cache for the next run)."""
    from engine.model import check_interrupt

    deadline = time.monotonic() + _BACKGROUND_TIMEOUT
    while True:
        try:
            child.wait(timeout=0.05)
            return
        except subprocess.TimeoutExpired:
            check_interrupt()
            if time.monotonic() > deadline:
                child.kill()
                return


def _sample_args(type_k: str, type_v: str) -> tuple:
    """Kernel arguments (tiny arrays) of the types a cache of ``type_k`` / ``type_v`` gives: the
    tile's signature depends on the arrays' types only, not on their shapes."""
    def cache(kind: str) -> np.ndarray:
        return np.zeros((1, 1, Q8_0_BLOCK_BYTES), np.uint8) if kind == "q8_0" else _cache_array(
            np.zeros((1, 1, Q8_0_BLOCK), CACHE_TYPES[kind]), kind)

    q = np.zeros((1, 1, Q8_0_BLOCK), np.float32)
    return q, cache(type_k), cache(type_v), 0, np.float32(1.0), np.zeros(1, np.float32), False, 0, np.float32(0.0), q


def load_cached(tile_fn, signature) -> bool:
    """Load ``tile_fn``'s ``signature`` from Numba's on-disk cache, without compiling: whether it
    was there (what Dispatcher.compile does before it compiles)."""
    from numba.core.compiler_lock import global_compiler_lock

    with global_compiler_lock:
        if tuple(signature.args) in tile_fn.overloads:
            return True
        result = tile_fn._cache.load_overload(signature, tile_fn.targetctx)
        if result is None:
            return False
        tile_fn.targetctx.insert_user_function(result.entry_point, result.fndesc, [result.library])
        tile_fn.add_overload(result)
        return True


def background_compiles() -> bool:
    """Whether kernels may compile in a child process beside this one: only with a core to spare
    (on one core it would only compete); ``HALFBYTE_BACKGROUND_COMPILE=0`` turns it off."""
    return available_cores() >= 2 and os.environ.get("HALFBYTE_BACKGROUND_COMPILE", "1") != "0"


def start_compiling_child(code: str, data: bytes = b"") -> subprocess.Popen | None:
    """A child Python running ``code`` (which compiles kernels into Numba's on-disk cache) with
    ``data`` on its standard input, or None if none can start (an embedded Python)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    try:
        child = subprocess.Popen([sys.executable, "-c", code], env=env, stdin=subprocess.PIPE,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except OSError:
        return None
    try:
        child.stdin.write(data)
        child.stdin.close()
    except OSError:  # the child is gone already: it compiled nothing, the caller will compile
        pass
    return child


def compile_in_background(type_k: str = "f16", type_v: str = "f16") -> bool:
    """Start compiling the attention tile for a cache of these types in a child process, unless
    it is in Numba's on-disk cache already; returns whether a child was started.

    The tile and its parallel kernel are the largest part of a model's first run (3.6 of the demo
    model's 7.7 s of compiling, Zen 4 EPYC), and attention comes only after the embedding, norm
    and products, whose kernels this process compiles meanwhile on one core: the other core
    compiles attention. The first attention call waits for the child, then loads both from the
    cache (or compiles them itself if the child failed). Only where background_compiles()."""
    if not background_compiles():
        return False
    signature = _tile_signature(_sample_args(cache_type_name(type_k), cache_type_name(type_v)))
    key = (_attend_tile, signature)
    if key in _TILE_ADDRESSES or key in _BACKGROUND:
        return False
    try:
        if load_cached(_attend_tile, signature):
            return False
    except Exception:  # Numba's internals moved: compile in this process, as without the child
        return False
    child = start_compiling_child(
        f"from engine.kernels.attention import _compile_tile; _compile_tile({type_k!r}, {type_v!r})")
    if child is None:  # no interpreter to start: compile here, as without the child
        return False
    _BACKGROUND[key] = child
    return True


def _compile_tile(type_k: str, type_v: str) -> None:
    """The child of compile_in_background: the tile and the parallel kernel into the on-disk
    cache (the kernel by a call on one token)."""
    args = _sample_args(type_k, type_v)
    _call(_attend_kernel, _tile_address(_attend_tile, args), *args)


@njit(cache=True, inline="always")
def _tile_span(n_tok, group, n_past, window, tile):
    """(first token, tokens, queries, first key, end of keys) of a tile: query i is token
    t0 + i // group, head kv_head * group + i % group; its keys run from the first query's window
    start to the last query's position."""
    t0 = tile * _TILE_TOKENS
    n_t = min(_TILE_TOKENS, n_tok - t0)
    key_lo = max(0, n_past + t0 + 1 - window) if window > 0 else 0
    return t0, n_t, n_t * group, key_lo, n_past + t0 + n_t


@njit(cache=True)
def _attend_tile(q, k, v, n_past, scale, slopes, use_alibi, window, softcap, out, kv_head, tile):
    """Queries of tokens ``tile * _TILE_TOKENS ...`` sharing KV head ``kv_head``, over their keys.

    Per query, every number is computed exactly as a query-at-a-time loop would: the same
    fixed-order dot per key, the keys in order for the float64 sum and for each output element.
    Only the loops are blocked, so that a chunk of keys (or values) stays in L1 while every query
    of the tile reads it."""
    n_tok, n_head, head_dim = q.shape
    group = n_head // k.shape[1]
    t0, n_t, n_q, key_lo, key_hi = _tile_span(n_tok, group, n_past, window, tile)
    scores = np.empty((n_q, key_hi - key_lo), np.float32)
    peaks = np.full(n_q, -np.inf)  # float64: the softmax's differences and exps are float64
    # four query heads of a token at a time when the group allows: one key read, four dots
    step = 4 if group % 4 == 0 else 1
    for c0 in range(key_lo, key_hi, _KEY_CHUNK):
        c1 = min(key_hi, c0 + _KEY_CHUNK)
        for i0 in range(0, n_q, step):
            t = t0 + i0 // group
            h0 = kv_head * group + i0 % group
            query_pos = n_past + t
            first = max(c0, query_pos + 1 - window) if window > 0 else c0
            # The running maxima stay in registers across the keys (in the array, each key's
            # max waited on the last one's store).
            if step == 4:
                m0, m1, m2, m3 = peaks[i0], peaks[i0 + 1], peaks[i0 + 2], peaks[i0 + 3]
                for j in range(first, min(c1, query_pos + 1)):
                    d0, d1, d2, d3 = _score4(q[t], h0, k[j, kv_head])
                    s0 = _adjusted(d0, scale, softcap, use_alibi, slopes[h0], j - query_pos)
                    s1 = _adjusted(d1, scale, softcap, use_alibi, slopes[h0 + 1], j - query_pos)
                    s2 = _adjusted(d2, scale, softcap, use_alibi, slopes[h0 + 2], j - query_pos)
                    s3 = _adjusted(d3, scale, softcap, use_alibi, slopes[h0 + 3], j - query_pos)
                    scores[i0, j - key_lo] = s0
                    scores[i0 + 1, j - key_lo] = s1
                    scores[i0 + 2, j - key_lo] = s2
                    scores[i0 + 3, j - key_lo] = s3
                    m0, m1, m2, m3 = max(m0, s0), max(m1, s1), max(m2, s2), max(m3, s3)
                peaks[i0], peaks[i0 + 1], peaks[i0 + 2], peaks[i0 + 3] = m0, m1, m2, m3
            else:
                m0 = peaks[i0]
                for j in range(first, min(c1, query_pos + 1)):
                    s0 = _adjusted(_score(q[t, h0], k[j, kv_head]), scale, softcap, use_alibi, slopes[h0],
                                   j - query_pos)
                    scores[i0, j - key_lo] = s0
                    m0 = max(m0, s0)
                peaks[i0] = m0
    totals = _softmax_tile(scores, peaks, out, kv_head, group, n_past, window, t0, n_q, key_lo)
    for c0 in range(key_lo, key_hi, _KEY_CHUNK):
        c1 = min(key_hi, c0 + _KEY_CHUNK)
        for i in range(n_q):
            t = t0 + i // group
            query_pos = n_past + t
            first = max(c0, query_pos + 1 - window) if window > 0 else c0
            _accumulate_run(out[t, kv_head * group + i % group], scores[i], key_lo, v, kv_head, first,
                            min(c1, query_pos + 1))
    _normalize_tile(out, totals, group, kv_head, t0, n_q)


@njit(cache=True)
def _attend_tile_lanes(q, k, v, n_past, scale, slopes, use_alibi, window, softcap, out, kv_head, tile):
    """_attend_tile for float keys (head size a multiple of 16), with the same bits: each chunk of
    keys transposed once, then every query's scores with the keys in the vector lanes
    (_score_lanes); F16 values widened once per chunk, not once per query."""
    n_tok, n_head, head_dim = q.shape
    group = n_head // k.shape[1]
    t0, n_t, n_q, key_lo, key_hi = _tile_span(n_tok, group, n_past, window, tile)
    scores = np.empty((n_q, key_hi - key_lo), np.float32)
    peaks = np.full(n_q, -np.inf)
    kt = np.zeros((head_dim, _KEY_CHUNK), np.float32)  # a chunk's keys, transposed
    dots = np.empty(_KEY_CHUNK, np.float32)
    for c0 in range(key_lo, key_hi, _KEY_CHUNK):
        c1 = min(key_hi, c0 + _KEY_CHUNK)
        _transpose_keys(k, kv_head, c0, c1, kt)
        for i in range(n_q):
            t = t0 + i // group
            h = kv_head * group + i % group
            query_pos = n_past + t
            first = max(c0, query_pos + 1 - window) if window > 0 else c0
            last = min(c1, query_pos + 1)
            if first >= last:
                continue
            _score_lanes(q[t, h], kt, last - c0, dots)
            # four running maxima (one would wait on each key's max): the same largest score
            m0 = m1 = m2 = m3 = peaks[i]
            j = first
            while j + 4 <= last:
                s0 = _adjusted(dots[j - c0], scale, softcap, use_alibi, slopes[h], j - query_pos)
                s1 = _adjusted(dots[j + 1 - c0], scale, softcap, use_alibi, slopes[h], j + 1 - query_pos)
                s2 = _adjusted(dots[j + 2 - c0], scale, softcap, use_alibi, slopes[h], j + 2 - query_pos)
                s3 = _adjusted(dots[j + 3 - c0], scale, softcap, use_alibi, slopes[h], j + 3 - query_pos)
                scores[i, j - key_lo] = s0
                scores[i, j + 1 - key_lo] = s1
                scores[i, j + 2 - key_lo] = s2
                scores[i, j + 3 - key_lo] = s3
                m0, m1, m2, m3 = max(m0, s0), max(m1, s1), max(m2, s2), max(m3, s3)
                j += 4
            while j < last:
                s0 = _adjusted(dots[j - c0], scale, softcap, use_alibi, slopes[h], j - query_pos)
                scores[i, j - key_lo] = s0
                m0 = max(m0, s0)
                j += 1
            peaks[i] = max(max(m0, m1), max(m2, m3))
    totals = _softmax_tile(scores, peaks, out, kv_head, group, n_past, window, t0, n_q, key_lo)
    widened = _half_values(v) and head_dim % 32 == 0  # _accumulate_keys' whole 32s
    vc = np.empty((_KEY_CHUNK if widened else 0, 1, head_dim), np.float32)
    for c0 in range(key_lo, key_hi, _KEY_CHUNK):
        c1 = min(key_hi, c0 + _KEY_CHUNK)
        if widened:
            _widen_values(v, kv_head, c0, c1, vc)
        for i in range(n_q):
            t = t0 + i // group
            query_pos = n_past + t
            first = max(c0, query_pos + 1 - window) if window > 0 else c0
            last = min(c1, query_pos + 1)
            if widened:
                _accumulate_run(out[t, kv_head * group + i % group], scores[i], key_lo - c0, vc, 0, first - c0,
                                last - c0)
            else:
                _accumulate_run(out[t, kv_head * group + i % group], scores[i], key_lo, v, kv_head, first, last)
    _normalize_tile(out, totals, group, kv_head, t0, n_q)


@njit(cache=True, inline="always")
def _softmax_tile(scores, peaks, out, kv_head, group, n_past, window, t0, n_q, key_lo):
    """Each query's scores -> its softmax weights (float32, in place, unnormalized) and its output
    row zeroed; returns the float64 totals, which _normalize_tile divides by once the values are
    summed."""
    totals = np.zeros(n_q)  # float64, like ggml's softmax sum
    weights = np.empty((4, scores.shape[1]))  # up to four queries' float64 softmax weights
    step = 4 if group % 4 == 0 else 1
    for i0 in range(0, n_q, step):  # `step` query heads of one token: the same keys
        t = t0 + i0 // group
        query_pos = n_past + t
        first = max(0, query_pos + 1 - window) if window > 0 else 0
        # Weights below exp(-44) (~2**-63, of the largest weight's 1) are 0 and their values
        # skipped: otherwise peaked softmaxes give subnormal weights (or weight * Q8_0 scale
        # products), each costing a microcode assist per multiply on Intel cores (the prompt
        # ran 2-7x slower), for a share of the output far below float32's 2**-24 resolution.
        # The weights first (a loop LLVM vectorizes), then their float64 sums in key order:
        # four queries' sums side by side, each its own chain (one chain waited on every add).
        for u in range(step):
            _exp_weights(scores[i0 + u, first - key_lo : query_pos + 1 - key_lo], peaks[i0 + u], weights[u])
            out[t, kv_head * group + (i0 + u) % group, :] = 0.0
        if step == 4:
            total0 = total1 = total2 = total3 = 0.0
            for j in range(first, query_pos + 1):
                at = j - first
                w0, w1, w2, w3 = weights[0, at], weights[1, at], weights[2, at], weights[3, at]
                total0 += w0
                total1 += w1
                total2 += w2
                total3 += w3
                scores[i0, j - key_lo] = w0
                scores[i0 + 1, j - key_lo] = w1
                scores[i0 + 2, j - key_lo] = w2
                scores[i0 + 3, j - key_lo] = w3
            totals[i0], totals[i0 + 1], totals[i0 + 2], totals[i0 + 3] = total0, total1, total2, total3
        else:
            total = 0.0
            for j in range(first, query_pos + 1):
                total += weights[0, j - first]
                scores[i0, j - key_lo] = weights[0, j - first]
            totals[i0] = total
    return totals


@njit(cache=True, inline="always")
def _normalize_tile(out, totals, group, kv_head, t0, n_q):
    for i in range(n_q):
        acc = out[t0 + i // group, kv_head * group + i % group]
        inv = np.float32(1.0 / totals[i])
        for d in range(acc.size):
            acc[d] *= inv


def _cache_array(cache: np.ndarray, name: str) -> np.ndarray:
    if cache.ndim != 3 or cache.dtype not in (np.float16, np.float32, np.uint8) or not cache.flags.c_contiguous:
        raise HalfbyteError(f"{name} cache must be a C-contiguous float16/float32 (n_ctx, n_kv_head, head_dim) "
                            f"array or uint8 Q8_0 blocks, got {cache.dtype} {cache.shape}")
    # Numba has no float16: hand it the bits, which the kernel widens with F16C.
    return cache.view(np.uint16) if cache.dtype == np.float16 else cache


def _cache_head_dim(cache: np.ndarray) -> int:
    """Values per head of one cache row (uint8 rows are Q8_0 blocks)."""
    if cache.dtype == np.uint8:
        if cache.shape[2] % Q8_0_BLOCK_BYTES:
            raise HalfbyteError(f"a Q8_0 cache row is whole 34-byte blocks, got {cache.shape[2]} bytes")
        return cache.shape[2] // Q8_0_BLOCK_BYTES * Q8_0_BLOCK
    return cache.shape[2]


def attend(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, n_past: int, scale: float,
           alibi_slopes: np.ndarray | None = None, out: np.ndarray | None = None, window: int = 0,
           softcap: float = 0.0) -> np.ndarray:
    """Causal attention of ``q`` ``(n_tok, n_head, head_dim)`` float32 over one layer's cache.

    ``k_cache``/``v_cache`` ``(n_ctx, n_kv_head, head_dim)`` must already hold the new
    tokens' keys and values at ``n_past .. n_past+n_tok-1``. Scores are ``scale * q.k``
    (plus ALiBi). Returns float32 ``(n_tok, n_head, head_dim)``, into ``out`` if given.
    ``window`` > 0 is a sliding window (Mistral's ``sliding_window``): the query at position
    ``i`` sees keys ``i-window+1 .. i`` only, as transformers' and llama.cpp's masks.
    ``softcap`` > 0 caps the scores: ``softcap * tanh(score / softcap)`` (Gemma 2's
    ``attn_logit_softcapping``); 0 leaves them as they are.
    """
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 0:
        raise HalfbyteError(f"attention window must be an integer >= 0, got {window!r}")
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float, np.number)) or not 0 <= softcap < math.inf:
        raise HalfbyteError(f"attention softcap must be a finite number >= 0, got {softcap!r}")
    q = np.ascontiguousarray(q, dtype=np.float32)
    if q.ndim != 3:
        raise HalfbyteError(f"queries must be (n_tok, n_head, head_dim), got shape {q.shape}")
    n_tok, n_head, head_dim = q.shape
    k = _cache_array(k_cache, "key")
    v = _cache_array(v_cache, "value")
    if k.shape[:2] != v.shape[:2] or _cache_head_dim(k) != head_dim or _cache_head_dim(v) != head_dim:
        raise HalfbyteError(f"key/value caches {k_cache.shape}/{v_cache.shape} do not fit queries {q.shape}")
    n_kv_head = k.shape[1]
    if n_head % n_kv_head:
        raise HalfbyteError(f"{n_head} query heads cannot share {n_kv_head} KV heads evenly")
    if n_past < 0 or n_past + n_tok > k.shape[0]:
        raise HalfbyteError(f"positions {n_past}..{n_past + n_tok - 1} do not fit in the cache of {k.shape[0]}")
    if alibi_slopes is None:
        slopes = np.zeros(n_head, np.float32)
    else:
        slopes = np.ascontiguousarray(alibi_slopes, dtype=np.float32)
        if slopes.shape != (n_head,):
            raise HalfbyteError(f"ALiBi needs one slope per head ({n_head}), got shape {slopes.shape}")
    if out is None:
        out = np.empty_like(q)
    elif out.shape != q.shape or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise HalfbyteError(f"out must be a C-contiguous float32 array of shape {q.shape}")
    if n_tok:
        args = (q, k, v, int(n_past), np.float32(scale), slopes, alibi_slopes is not None, int(window),
                np.float32(softcap), out)
        tile_fn = tile_function(n_tok, n_head, n_kv_head, head_dim, k.dtype, n_past)
        _call(_attend_kernel, _tile_address(tile_fn, args), *args)
    return out


def tile_function(n_tok: int, n_head: int, n_kv_head: int, head_dim: int, key_dtype: np.dtype, n_past: int):
    """The tile that attends ``n_tok`` queries at ``n_past`` over keys of ``key_dtype``: the lanes for
    float keys (head size a multiple of 16) when a tile has the queries to repay transposing the
    keys; the same bits either way."""
    lanes = (key_dtype != np.uint8 and head_dim % 16 == 0 and n_past + n_tok >= _LANE_KEYS
             and min(n_tok, _TILE_TOKENS) * (n_head // n_kv_head) >= _LANE_QUERIES)
    return _attend_tile_lanes if lanes else _attend_tile


def reference_attention(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, n_past: int, scale: float,
                        alibi_slopes: np.ndarray | None = None, window: int = 0, softcap: float = 0.0) -> np.ndarray:
    """Plain float64 version of ``attend`` (KV heads repeated, full masked score matrix)."""
    n_tok, n_head, _ = q.shape
    n_keys = n_past + n_tok
    group = n_head // k_cache.shape[1]
    k = np.repeat(np.asarray(k_cache[:n_keys], np.float64), group, axis=1)  # (n_keys, n_head, hd)
    v = np.repeat(np.asarray(v_cache[:n_keys], np.float64), group, axis=1)
    scores = np.einsum("thd,jhd->htj", np.asarray(q, np.float64), k) * scale
    if softcap > 0:
        scores = softcap * np.tanh(scores / softcap)
    query_pos = n_past + np.arange(n_tok)
    key_pos = np.arange(n_keys)
    if alibi_slopes is not None:
        distance = (key_pos[None, :] - query_pos[:, None]).astype(np.float64)
        scores += np.asarray(alibi_slopes, np.float64)[:, None, None] * distance[None]
    visible = key_pos[None, :] <= query_pos[:, None]
    if window > 0:
        visible &= key_pos[None, :] > query_pos[:, None] - window
    scores = np.where(visible[None], scores, -math.inf)
    scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs = scores / scores.sum(axis=-1, keepdims=True)
    return np.einsum("htj,jhd->thd", probs, v)
