"""Causal attention over a KV cache: multi-head, grouped-query and multi-query.

The cache holds, per layer, keys and values for positions ``0 .. n_ctx-1`` as
``(n_ctx, n_kv_head, head_dim)`` float16 (default, half the memory; what llama.cpp
uses) or float32. ``attend`` runs ``n_tok`` new queries at positions
``n_past .. n_past+n_tok-1``, whose keys/values must already be stored: query ``t``
sees keys ``0 .. n_past+t``. Query head ``h`` reads KV head ``h // (n_head / n_kv_head)``,
the grouping of transformers' ``repeat_kv`` and llama.cpp. ALiBi adds
``slope[h] * (j - i)`` to the score of key ``j`` for the query at position ``i``.
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from engine.errors import HalfbyteError
from engine.kernels.matmul import _call, to_f32
from engine.kernels.simd import _F16, _F32, _I16, _I64, _V8F32, _Loop, _mask, _vconst

# Float math here never reassociates: with "reassoc" LLVM picks a reduction's vector width and
# interleave from the CPU's cost model, and the same file gave other logits (and other sampled
# text) on a Sapphire Rapids than on a Zen 5 with the same kernels. "contract" (FMA) is kept:
# every x86 kernel target and arm64 have FMA, so the rounding is the same on all of them.
_FLOAT_DOT = {"contract", "nsz"}
_V8I16 = ir.VectorType(_I16, 8)


class KVCache:
    """Preallocated keys and values of every layer: ``k``, ``v`` ``(n_layer, n_ctx, n_kv_head, head_dim)``.

    ``n_past`` is the number of positions holding data: ``store`` at ``pos`` sets it to
    ``pos + n_tok`` (storing below ``n_past`` rewinds; later positions become stale),
    ``reset`` empties the cache without touching memory.
    """

    def __init__(self, n_layer: int, n_ctx: int, n_kv_head: int, head_dim: int,
                 dtype: type[np.floating] | np.dtype = np.float16) -> None:
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.dtype(np.float16), np.dtype(np.float32)):
            raise HalfbyteError(f"KV cache dtype must be float16 or float32, got {self.dtype}")
        if min(n_layer, n_ctx, n_kv_head, head_dim) < 1:
            raise HalfbyteError(f"KV cache dimensions must be positive, got layers={n_layer} ctx={n_ctx} "
                                f"kv_heads={n_kv_head} head_dim={head_dim}")
        shape = (n_layer, n_ctx, n_kv_head, head_dim)
        self.k = np.zeros(shape, self.dtype)
        self.v = np.zeros(shape, self.dtype)
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
        expected = self.k.shape[2:]
        if np.shape(k)[1:] != expected or np.shape(v) != np.shape(k):
            raise HalfbyteError(f"KV cache stores (n_tok, {expected[0]}, {expected[1]}) keys and values, "
                                f"got {np.shape(k)} and {np.shape(v)}")
        n_tok = np.shape(k)[0]
        if not 0 <= layer < self.n_layer:
            raise HalfbyteError(f"layer {layer} is out of range (the cache has {self.n_layer})")
        if pos < 0 or pos + n_tok > self.n_ctx:
            raise HalfbyteError(f"positions {pos}..{pos + n_tok - 1} do not fit in the context of {self.n_ctx}")
        self.k[layer, pos:pos + n_tok] = k  # numpy rounds float32 -> float16 to nearest even
        self.v[layer, pos:pos + n_tok] = v
        self.n_past = pos + n_tok

    def keys(self, layer: int) -> np.ndarray:
        return self.k[layer]

    def values(self, layer: int) -> np.ndarray:
        return self.v[layer]

    def reset(self) -> None:
        self.n_past = 0


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
          and k.dtype in (types.float32, types.uint16))
    if not ok:
        return None
    half_keys = k.dtype == types.uint16

    def codegen(context, builder, sig, args):
        b = builder
        qa = context.make_array(sig.args[0])(context, b, args[0])
        ka = context.make_array(sig.args[1])(context, b, args[1])
        n = b.extract_value(qa.shape, 0)
        n_k = b.extract_value(ka.shape, 0)
        n = b.select(b.icmp_unsigned("<", n, n_k), n, n_k)
        q_ptr, k_ptr = qa.data, ka.data
        fma = cgutils.get_or_insert_function(b.module, ir.FunctionType(_V8F32, [_V8F32] * 3), "llvm.fma.v8f32")

        def load8(at: ir.Value) -> tuple[ir.Value, ir.Value]:
            qv = b.load(b.bitcast(b.gep(q_ptr, [at]), _V8F32.as_pointer()), align=4)
            if half_keys:
                bits = b.load(b.bitcast(b.gep(k_ptr, [at]), _V8I16.as_pointer()), align=2)
                kv = b.fpext(b.bitcast(bits, ir.VectorType(_F16, 8)), _V8F32)
            else:
                kv = b.load(b.bitcast(b.gep(k_ptr, [at]), _V8F32.as_pointer()), align=4)
            return qv, kv

        zero = _vconst(_V8F32, 0.0)
        loop = _Loop(b, b.lshr(n, ir.Constant(_I64, 4)), [zero, zero], "score")
        base = b.shl(loop.index, ir.Constant(_I64, 4))
        acc_a, acc_b = loop.values
        acc_a = b.call(fma, [*load8(base), acc_a])
        acc_b = b.call(fma, [*load8(b.add(base, ir.Constant(_I64, 8))), acc_b])
        acc_a, acc_b = loop.close([acc_a, acc_b])
        # a last group of 8 (n % 16 >= 8) into A
        done16 = b.shl(b.lshr(n, ir.Constant(_I64, 4)), ir.Constant(_I64, 4))
        has8 = b.icmp_unsigned(">=", b.sub(n, done16), ir.Constant(_I64, 8))
        skip_block = b.basic_block
        with b.if_then(has8):
            extra = b.call(fma, [*load8(done16), acc_a])
            extra_block = b.basic_block
        merged = b.phi(_V8F32)
        merged.add_incoming(extra, extra_block)
        merged.add_incoming(acc_a, skip_block)
        acc_a = merged
        total = b.fadd(acc_a, acc_b)
        v4 = b.fadd(b.shuffle_vector(total, total, _mask(range(4))), b.shuffle_vector(total, total, _mask(range(4, 8))))
        v2 = b.fadd(b.shuffle_vector(v4, v4, _mask(range(2))), b.shuffle_vector(v4, v4, _mask(range(2, 4))))
        result = b.fadd(b.extract_element(v2, ir.Constant(ir.IntType(32), 0)),
                        b.extract_element(v2, ir.Constant(ir.IntType(32), 1)))
        # scalar tail: elements from (n // 8) * 8
        start = b.shl(b.lshr(n, ir.Constant(_I64, 3)), ir.Constant(_I64, 3))
        tail = _Loop(b, b.sub(n, start), [ir.Constant(_F32, 0.0)], "score_tail")
        at = b.add(start, tail.index)
        qs = b.load(b.gep(q_ptr, [at]))
        ks = b.load(b.gep(k_ptr, [at]))
        if half_keys:
            ks = b.fpext(b.bitcast(ks, _F16), _F32)
        f32_fma = cgutils.get_or_insert_function(b.module, ir.FunctionType(_F32, [_F32] * 3), "llvm.fma.f32")
        [tail_sum] = tail.close([b.call(f32_fma, [qs, ks, tail.values[0]])])
        return b.fadd(result, tail_sum)

    return types.float32(q, k), codegen


@njit(cache=True, fastmath=_FLOAT_DOT)
def _accumulate(acc, p, v):
    for d in range(acc.size):
        acc[d] += p * to_f32(v[d])


@njit(cache=True, parallel=True)
def _attend_kernel(q, k, v, n_past, scale, slopes, use_alibi, window, out):
    n_tok, n_head, head_dim = q.shape
    group = n_head // k.shape[1]
    # Head-major task order: with a static split of tasks over threads each thread gets
    # whole heads, so the causal triangle's uneven work per token is shared evenly.
    for task in prange(n_head * n_tok):
        h = task // n_tok
        t = task % n_tok
        kv_head = h // group
        query_pos = n_past + t
        # a sliding window of `window` positions ends at the query's own (0: no window)
        first = max(0, query_pos + 1 - window) if window > 0 else 0
        n_keys = query_pos + 1 - first
        qv = q[t, h]
        scores = np.empty(n_keys, np.float32)
        peak = -np.inf
        for j in range(n_keys):
            s = _score(qv, k[first + j, kv_head]) * scale
            if use_alibi:
                s += slopes[h] * np.float32(first + j - query_pos)
            scores[j] = s
            peak = max(peak, s)
        total = 0.0  # float64, like ggml's softmax sum
        for j in range(n_keys):
            e = np.exp(scores[j] - peak)
            scores[j] = e
            total += e
        acc = out[t, h]
        acc[:] = 0.0
        for j in range(n_keys):
            _accumulate(acc, scores[j], v[first + j, kv_head])
        inv = np.float32(1.0 / total)
        for d in range(head_dim):
            acc[d] *= inv


def _cache_array(cache: np.ndarray, name: str) -> np.ndarray:
    if cache.ndim != 3 or cache.dtype not in (np.float16, np.float32) or not cache.flags.c_contiguous:
        raise HalfbyteError(f"{name} cache must be a C-contiguous float16/float32 (n_ctx, n_kv_head, head_dim) "
                            f"array, got {cache.dtype} {cache.shape}")
    # Numba has no float16: hand it the bits, which the kernel widens with F16C.
    return cache.view(np.uint16) if cache.dtype == np.float16 else cache


def attend(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, n_past: int, scale: float,
           alibi_slopes: np.ndarray | None = None, out: np.ndarray | None = None, window: int = 0) -> np.ndarray:
    """Causal attention of ``q`` ``(n_tok, n_head, head_dim)`` float32 over one layer's cache.

    ``k_cache``/``v_cache`` ``(n_ctx, n_kv_head, head_dim)`` must already hold the new
    tokens' keys and values at ``n_past .. n_past+n_tok-1``. Scores are ``scale * q.k``
    (plus ALiBi). Returns float32 ``(n_tok, n_head, head_dim)``, into ``out`` if given.
    ``window`` > 0 is a sliding window (Mistral's ``sliding_window``): the query at position
    ``i`` sees keys ``i-window+1 .. i`` only, as transformers' and llama.cpp's masks.
    """
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 0:
        raise HalfbyteError(f"attention window must be an integer >= 0, got {window!r}")
    q = np.ascontiguousarray(q, dtype=np.float32)
    if q.ndim != 3:
        raise HalfbyteError(f"queries must be (n_tok, n_head, head_dim), got shape {q.shape}")
    n_tok, n_head, head_dim = q.shape
    k = _cache_array(k_cache, "key")
    v = _cache_array(v_cache, "value")
    if k.shape != v.shape or k.shape[2] != head_dim:
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
        _call(_attend_kernel, q, k, v, n_past, np.float32(scale), slopes, alibi_slopes is not None, int(window), out)
    return out


def reference_attention(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, n_past: int, scale: float,
                        alibi_slopes: np.ndarray | None = None, window: int = 0) -> np.ndarray:
    """Plain float64 version of ``attend`` (KV heads repeated, full masked score matrix)."""
    n_tok, n_head, _ = q.shape
    n_keys = n_past + n_tok
    group = n_head // k_cache.shape[1]
    k = np.repeat(np.asarray(k_cache[:n_keys], np.float64), group, axis=1)  # (n_keys, n_head, hd)
    v = np.repeat(np.asarray(v_cache[:n_keys], np.float64), group, axis=1)
    scores = np.einsum("thd,jhd->htj", np.asarray(q, np.float64), k) * scale
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
