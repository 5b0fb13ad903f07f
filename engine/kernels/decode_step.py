"""One decode step (one token of one sequence) through a stack of pre-norm gated decoder layers, as
one compiled function: the same kernels, in the same order, as the layer code of models/blocks.py
runs from Python, so the same bits, without the Python between them.

    for each layer:
        h = rms_norm(x) ; q, k, v = h Wq (+ bq), ... ; [q, k = per-head rms_norm] ; rope(q, k) ; cache[pos] = k, v
        x = x + attention(q, cache) Wo
        h = rms_norm(x) ; x = x + (silu(h Wgate) * h Wup) Wdown

Why: a generated token makes about 20 kernel calls per layer, and the Python around them (argument
checks, dispatch, allocation) cost 2-5 ms of a 1.1B Q4_0 token's 22-27 ms on a Zen 4 EPYC, where
the products alone stream the weights in about 20 ms (bench/bench_decode_step.py measures both).

Every kernel is called through its compiled code's address (``call_address``), not by name: a
jitted call links the callee into the caller, where LLVM optimizes it all over again (about 10 s
for this function), and Numba's cache would not notice a change in the callee's module (it tracks
the caller's file only). The addresses come from the dispatchers at run time, so they are always
the current code. The layers' weights and norms travel as addresses too (``_array_at``), so
one compilation serves every model; it still takes 6.5-8.4 s (a Zen 4 EPYC VM, 2026-12-04), done once
per machine by a child process while the first run generates on the layer code (``_compiled``).

Layers may have q/k/v biases (Qwen2) and per-head q/k norms (Qwen3). Weights: any type with an
integer matrix-vector driver, per product (Q4_0, Q8_0, IQ4_NL against Q8_0 activations; the
K-quants, IQ4_XS and the grid types against Q8_K ones: each weight's driver chosen in Python by
engine/kernels/matmul.py, as the layer code's), KV cache F16 or F32. Anything else (float or
legacy types, fused projections, LoRA, a Q8_0 cache...) runs the layer code (models/blocks.py
decides).
"""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np
from numba import njit, typeof, types
from numba.core import cgutils
from numba.extending import intrinsic

from engine.kernels import attention, kquant_simd, matmul, ops, simd
from engine.kernels.matmul import f32_to_f16, slp_scope


@intrinsic
def call_address(typingctx, address, args):
    """Call the compiled function at ``address`` (Numba's calling convention, no return value) with
    the tuple ``args``, whose types must be those it was compiled for; its exceptions propagate."""
    if not isinstance(address, types.Integer) or not isinstance(args, types.BaseTuple):
        return None
    arg_types = tuple(args.types)

    def codegen(context, builder, sig, llargs):
        values = cgutils.unpack_tuple(builder, llargs[1], len(arg_types))
        fn_type = context.call_conv.get_function_type(types.none, arg_types)
        callee = builder.inttoptr(llargs[0], fn_type.as_pointer())
        status, _ = context.call_conv.call_function(builder, callee, types.none, arg_types, values)
        with cgutils.if_unlikely(builder, status.is_error):
            context.call_conv.return_status_propagate(builder, status)
        return context.get_dummy_value()

    return types.none(address, args), codegen


@intrinsic
def _array_at(typingctx, address, rows, cols, like):
    """A C-contiguous (rows, cols) array at ``address`` (memory owned elsewhere: DecodeStack keeps the
    arrays) of ``like``'s dtype, read-only if ``like`` is: the kernels' argument types as the layer
    code passes them (weights from the read-only file mapping, norms as writable float32 copies), so
    their compiled code serves both. The layers' weights and norms travel as
    addresses, not as a tuple per layer: indexing a tuple by the layer number compiles a switch over
    every layer at each use (3.7 s for this function) and one specialization per layer count."""
    if not isinstance(like, types.Array):
        return None
    array_type = types.Array(like.dtype, 2, "C", readonly=not like.mutable)

    def codegen(context, builder, sig, args):
        ary = context.make_array(array_type)(context, builder)
        item = context.get_abi_sizeof(context.get_data_type(array_type.dtype))
        itemsize = context.get_constant(types.intp, item)
        shape = cgutils.pack_array(builder, [args[1], args[2]])
        strides = cgutils.pack_array(builder, [builder.mul(args[2], itemsize), itemsize])
        data = builder.inttoptr(args[0], context.get_data_type(array_type.dtype).as_pointer())
        context.populate_array(ary, data=data, shape=shape, strides=strides, itemsize=itemsize, meminfo=None)
        return ary._getvalue()

    return array_type(address, rows, cols, like), codegen


_ADDRESSES: dict = {}  # (dispatcher, signature) -> (address, compile result that owns the code)


def kernel_address(dispatcher: Any, args: tuple) -> int:
    """The address of ``dispatcher`` compiled for arguments of the types of ``args`` (compiled, or
    loaded from Numba's cache, on first use, with SLP on as every kernel)."""
    signature = types.none(*(typeof(arg) for arg in args))
    key = (dispatcher, signature)
    known = _ADDRESSES.get(key)
    if known is None:
        with slp_scope():
            # by the argument types alone: Numba's on-disk cache keys what it compiles by the
            # signature it was given, and a kernel's calls give argument types (a full signature
            # would miss their entries, and compile the kernel again in each new process)
            dispatcher.compile(tuple(signature.args))
            result = dispatcher.get_compile_result(signature)
        known = _ADDRESSES[key] = (result.library.get_pointer_to_function(result.fndesc.llvm_func_name), result)
    return known[0]


# activations[i, j]: what product j of layer i takes (matmul.matvec_driver's kinds), in this order
Q8_0, Q8_0_SUMS, Q8_K_BSUMS, Q8_K_SUMS32 = range(4)
_ACTIVATIONS = {"q8_0": Q8_0, "q8_0+sums": Q8_0_SUMS, "q8_k+bsums": Q8_K_BSUMS, "q8_k+sums32": Q8_K_SUMS32}


@njit(cache=True)
def _product(address, activations, w, buffers, n, y):
    """y = w x through the driver at ``address``, from x's activations of the kind it takes, which
    _quantize left in the first entries of ``buffers`` for x of length ``n``."""
    qs, scales, sums, k_qs, k_d, k_bsums, k_sums32 = buffers
    if activations == Q8_0:
        call_address(address, (w, qs[:n], scales[: n // 32], y))
    elif activations == Q8_0_SUMS:
        call_address(address, (w, qs[:n], scales[: n // 32], sums[: n // 32], y))
    elif activations == Q8_K_BSUMS:
        call_address(address, (w, k_qs[:n].reshape(1, n), k_d[: n // 256].reshape(1, n // 256),
                               k_bsums[: n // 16].reshape(1, n // 16), y.reshape(1, y.shape[0])))
    else:
        call_address(address, (w, k_qs[:n].reshape(1, n), k_d[: n // 256].reshape(1, n // 256),
                               k_sums32[: n // 32].reshape(1, n // 32), y.reshape(1, y.shape[0])))


@njit(cache=True)
def _quantize(kernels, x, activations, i, first, count, buffers) -> None:
    """x's activations of every kind products ``first`` to ``first + count - 1`` of layer ``i`` take,
    each once (they share x), into the first entries of ``buffers``, by the layer code's kernels."""
    q8_0 = q8_k = sums32 = False
    for j in range(first, first + count):
        kind = activations[i, j]
        q8_0 |= kind <= Q8_0_SUMS
        q8_k |= kind >= Q8_K_BSUMS
        sums32 |= kind == Q8_K_SUMS32
    qs, scales, sums, k_qs, k_d, k_bsums, k_sums32 = buffers
    n = x.shape[0]
    row = x.reshape(1, n)  # the quantizers take rows of tokens, as the layer code's batches
    if q8_0:
        call_address(kernels[QUANTIZE], (row, qs[:n].reshape(1, n), scales[: n // 32].reshape(1, n // 32),
                                         sums[: n // 32].reshape(1, n // 32)))
    if q8_k:
        k_scales, k_sums16 = k_d[: n // 256].reshape(1, n // 256), k_bsums[: n // 16].reshape(1, n // 16)
        call_address(kernels[QUANTIZE_K], (row, k_qs[:n].reshape(1, n), k_scales, k_sums16))
        if sums32:
            call_address(kernels[SUMS32], (k_scales, k_sums16, k_sums32[: n // 32].reshape(1, n // 32)))


@njit(cache=True)
def _scale_rotated(x, n_rot, magnitude):
    # ops.rope's x[..., :n_rot] *= magnitude, as a loop (the array expression took 4.7 s to compile)
    for t in range(x.shape[0]):
        for h in range(x.shape[1]):
            for e in range(n_rot):
                x[t, h, e] *= magnitude


@njit(cache=True)
def _store(cache, pos, values, as_f16):
    """cache[pos] = values (n_kv_head, head_dim) float32; an F16 cache holds the bits (uint16),
    rounded to nearest even as numpy's float32 -> float16 (KVCache.store)."""
    for h in range(values.shape[0]):
        for e in range(values.shape[1]):
            if as_f16:
                cache[pos, h, e] = f32_to_f16(values[h, e])
            else:
                cache[pos, h, e] = values[h, e]


@njit(cache=True)
def _add(y, bias):
    for e in range(y.shape[0]):  # numpy's y += bias: one float32 addition each
        y[e] += bias[e]


# vectors[i, ...]: the addresses of a layer's float32 vectors, in this order (0: the layer has none)
ATTN_NORM, FFN_NORM, BIAS_Q, BIAS_K, BIAS_V, Q_NORM, K_NORM = range(7)
# kernels[...]: the addresses of the small kernels, in this order
RMS_NORM, QUANTIZE, QUANTIZE_K, SUMS32, ROPE, SWIGLU, ATTEND = range(7)
_U8 = np.empty((0, 0), np.uint8)  # what _array_at's arrays are like: weights read-only, norms not
_U8.flags.writeable = False
_F32 = np.empty((0, 0), np.float32)


@njit(cache=True)
def decode_layers(x, vectors, weights, drivers, activations, k_cache, v_cache, as_f16, positions, n_rot, theta,
                  rope_scale, neox, factors, magnitude, kernels, tile, attn_scale, slopes, use_alibi, window, eps,
                  scratch, buffers):
    """Every layer of the stack for the token ``x`` (1, n_embd), updated in place, at ``positions[0]``.

    Per layer ``i``: ``vectors[i]`` the addresses of its float32 vectors (indices above: attention and
    FFN norm weights, n_embd; q, k, v biases; per-head q and k norm weights, head_dim), 0 for none;
    ``weights[i, j]`` (address, rows, row bytes) of its products' weights, j = q, k, v, o, gate, up,
    down, ``drivers[i, j]`` the addresses of their matrix-vector drivers and ``activations[i, j]``
    the kind of activations each takes (Q8_0 ...); ``k_cache[i]``/``v_cache[i]`` its (n_ctx,
    n_kv_head, head_dim) cache. ``kernels``: the addresses of RMSNorm, Q8_0 and Q8_K quantization,
    Q8_K sums of 32, RoPE, SwiGLU and attention (indices above), ``tile`` the attention tile's;
    ``use_alibi`` False (an argument: a literal would not have the kernel's type). ``scratch``: (h, q,
    k, v, attn, o, gate, up, act, down), the step's activations; ``buffers``: room for the longest
    one's quantized activations (Q8_0 values, scales, sums; Q8_K values, scales, sums of 16, scaled
    sums of 32)."""
    h, q, k, v, attn, o, gate, up, act, down = scratch
    pos = np.int64(positions[0])
    n_embd = x.shape[1]
    outputs = (q.reshape(-1), k.reshape(-1), v.reshape(-1))
    heads_q = q.reshape(q.shape[1], q.shape[2])  # (heads, head_dim): the per-head norms' rows
    heads_k = k.reshape(k.shape[1], k.shape[2])
    for i in range(weights.shape[0]):
        attn_norm = _array_at(vectors[i, ATTN_NORM], 1, n_embd, _F32)[0]
        ffn_norm = _array_at(vectors[i, FFN_NORM], 1, n_embd, _F32)[0]
        call_address(kernels[RMS_NORM], (x, attn_norm, eps, h))
        _quantize(kernels, h[0], activations, i, 0, 3, buffers)
        for j in range(3):
            _product(drivers[i, j], activations[i, j], _weight(weights, i, j), buffers, n_embd, outputs[j])
            if vectors[i, BIAS_Q + j]:
                _add(outputs[j], _array_at(vectors[i, BIAS_Q + j], 1, outputs[j].shape[0], _F32)[0])
        if vectors[i, Q_NORM]:
            call_address(kernels[RMS_NORM], (heads_q, _array_at(vectors[i, Q_NORM], 1, q.shape[2], _F32)[0],
                                             eps, heads_q))
        if vectors[i, K_NORM]:
            call_address(kernels[RMS_NORM], (heads_k, _array_at(vectors[i, K_NORM], 1, k.shape[2], _F32)[0],
                                             eps, heads_k))
        call_address(kernels[ROPE], (q, positions, n_rot, theta, rope_scale, neox, factors, q))
        call_address(kernels[ROPE], (k, positions, n_rot, theta, rope_scale, neox, factors, k))
        if magnitude != np.float32(1.0):
            _scale_rotated(q, n_rot, magnitude)
            _scale_rotated(k, n_rot, magnitude)
        _store(k_cache[i], pos, k[0], as_f16)
        _store(v_cache[i], pos, v[0], as_f16)
        call_address(kernels[ATTEND], (tile, q, k_cache[i], v_cache[i], pos, attn_scale, slopes, use_alibi,
                                       window, np.float32(0.0), attn))
        n_attn = attn.shape[1] * attn.shape[2]
        _quantize(kernels, attn.reshape(-1), activations, i, 3, 1, buffers)
        _product(drivers[i, 3], activations[i, 3], _weight(weights, i, 3), buffers, n_attn, o.reshape(-1))
        x += o
        call_address(kernels[RMS_NORM], (x, ffn_norm, eps, h))
        _quantize(kernels, h[0], activations, i, 4, 2, buffers)
        _product(drivers[i, 4], activations[i, 4], _weight(weights, i, 4), buffers, n_embd, gate)
        _product(drivers[i, 5], activations[i, 5], _weight(weights, i, 5), buffers, n_embd, up)
        call_address(kernels[SWIGLU], (gate, up, act))
        _quantize(kernels, act, activations, i, 6, 1, buffers)
        _product(drivers[i, 6], activations[i, 6], _weight(weights, i, 6), buffers, act.shape[0], down.reshape(-1))
        x += down


@njit(cache=True)
def _weight(weights, i, j):
    return _array_at(weights[i, j, 0], weights[i, j, 1], weights[i, j, 2], _U8)


class Unsupported(Exception):
    """The layers cannot run as a compiled step (a weight type without a matrix-vector driver, or
    arrays of differing kinds across layers): the caller runs its layer code instead."""


_PRODUCTS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


class DecodeStack:
    """decode_layers set up for a range of layers, each given as an object with ``attn_norm``,
    ``ffn_norm`` (float32 vectors) and the seven weights of ``_PRODUCTS`` (engine.weights.Weight);
    raises Unsupported for layers it cannot run. Built once per range and kernel path; a call
    runs one token."""

    def __init__(self, layers: list[Any], n_embd: int, n_head: int, n_kv_head: int, head_dim: int, n_ff: int,
                 eps: float) -> None:
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, head_dim
        self.eps = np.float32(eps)
        self.layers = list(layers)  # kept: callers may key this object by the layers' ids
        self.arrays: list[np.ndarray] = []  # what the addresses below point into, kept alive with this object
        self.vectors = np.zeros((len(layers), 7), np.int64)
        n_q, n_kv = n_head * head_dim, n_kv_head * head_dim
        for i, layer in enumerate(layers):
            for column, name, length in ((ATTN_NORM, "attn_norm", n_embd), (FFN_NORM, "ffn_norm", n_embd),
                                         (BIAS_Q, "bq", n_q), (BIAS_K, "bk", n_kv), (BIAS_V, "bv", n_kv),
                                         (Q_NORM, "q_norm", head_dim), (K_NORM, "k_norm", head_dim)):
                vector = getattr(layer, name, None)
                if vector is None:
                    continue
                vector = np.ascontiguousarray(vector, dtype=np.float32)
                if vector.shape != (length,):
                    raise Unsupported(f"{name} of shape {vector.shape}, not ({length},)")
                self.arrays.append(vector)
                self.vectors[i, column] = vector.ctypes.data
        if not self.vectors[:, ATTN_NORM].all() or not self.vectors[:, FFN_NORM].all():
            raise Unsupported("a layer without its norms")
        self.weights = np.zeros((len(layers), len(_PRODUCTS), 3), np.int64)
        f32 = np.float32
        self.scratch = (np.zeros((1, n_embd), f32), np.zeros((1, n_head, head_dim), f32),
                        np.zeros((1, n_kv_head, head_dim), f32), np.zeros((1, n_kv_head, head_dim), f32),
                        np.zeros((1, n_head, head_dim), f32), np.zeros((1, n_embd), f32),
                        np.zeros(n_ff, f32), np.zeros(n_ff, f32), np.zeros(n_ff, f32), np.zeros((1, n_embd), f32))
        longest = max(n_embd, n_head * head_dim, n_ff)
        self.buffers = (np.zeros(longest, np.int8), np.zeros(longest // 32, f32), np.zeros(longest // 32, np.int32),
                        np.zeros(longest, np.int8), np.zeros(longest // 256, f32), np.zeros(longest // 16, np.int16),
                        np.zeros(longest // 32, f32))
        self.drivers = np.zeros((len(layers), len(_PRODUCTS)), np.int64)
        self.activations = np.zeros((len(layers), len(_PRODUCTS)), np.int8)
        h, q, k, v, attn, o, gate, up, act, down = self.scratch
        outputs = (q.reshape(-1), k.reshape(-1), v.reshape(-1), o.reshape(-1), gate, up, down.reshape(-1))
        inputs = (n_embd, n_embd, n_embd, n_head * head_dim, n_embd, n_embd, n_ff)
        for i, layer in enumerate(layers):
            for j, name in enumerate(_PRODUCTS):
                weight = getattr(layer, name)
                chosen = matmul.matvec_driver(weight)
                if chosen is None or getattr(weight, "lora", ()) or weight.n_in != inputs[j]:
                    raise Unsupported(f"{name}: no matrix-vector driver for {weight.ggml_type.name}")
                driver, kind = chosen
                kind = _ACTIVATIONS[kind]
                if kind >= Q8_K_BSUMS and inputs[j] % 256:
                    raise Unsupported(f"{name}: Q8_K activations of {inputs[j]} values")
                data = weight.data
                if data.dtype != np.uint8 or data.ndim != 2 or not data.flags.c_contiguous:
                    raise Unsupported(f"{name}: weights not as C-contiguous rows of blocks")
                self.arrays.append(data)
                self.weights[i, j] = data.ctypes.data, data.shape[0], data.shape[1]
                data = data.view()
                data.flags.writeable = False  # the type of _array_at's uint8 arrays
                self.drivers[i, j] = kernel_address(driver, self._product_args(kind, data, inputs[j], outputs[j]))
                self.activations[i, j] = kind
        qs, scales, sums, k_qs, k_d, k_bsums, k_sums32 = self.buffers
        positions = np.zeros(1, np.float64)
        factors = np.ones(head_dim // 2, f32)
        self.kernels = np.zeros(7, np.int64)
        norm = np.zeros(n_embd, f32)  # of the type of _array_at's float32 arrays
        self.kernels[RMS_NORM] = kernel_address(ops._rms_norm_kernel, (h, norm, self.eps, h))
        self.kernels[QUANTIZE] = kernel_address(simd._quantize_rows_q8_0, (
            h, qs.reshape(1, -1), scales.reshape(1, -1), sums.reshape(1, -1)))
        if (self.activations >= Q8_K_BSUMS).any():  # (compiled only for the files that use them)
            self.kernels[QUANTIZE_K] = kernel_address(kquant_simd._quantize_q8_k_rows, (
                h, k_qs.reshape(1, -1), k_d.reshape(1, -1), k_bsums.reshape(1, -1)))
            self.kernels[SUMS32] = kernel_address(kquant_simd._scaled_sums32_into, (
                k_d.reshape(1, -1), k_bsums.reshape(1, -1), k_sums32.reshape(1, -1)))
        self.kernels[ROPE] = kernel_address(ops._rope_kernel, (q, positions, 2, 1.0, 1.0, False, factors, q))
        self.kernels[SWIGLU] = kernel_address(ops._swiglu_kernel, (gate, up, act))
        self._attend_addresses: dict = {}  # key cache type -> the attention kernel's address for it
        self._ready: set = set()  # key cache types whose decode_layers can run

    def _product_args(self, kind: int, data: np.ndarray, n: int, y: np.ndarray) -> tuple:
        """Arguments of the types _product passes a driver taking ``kind`` activations of ``n`` values."""
        qs, scales, sums, k_qs, k_d, k_bsums, k_sums32 = self.buffers
        if kind == Q8_0:
            return data, qs[:n], scales[: n // 32], y
        if kind == Q8_0_SUMS:
            return data, qs[:n], scales[: n // 32], sums[: n // 32], y
        k_sums = k_bsums[: n // 16] if kind == Q8_K_BSUMS else k_sums32[: n // 32]
        return data, k_qs[:n].reshape(1, -1), k_d[: n // 256].reshape(1, -1), k_sums.reshape(1, -1), y.reshape(1, -1)

    def __call__(self, x: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, pos: int, n_rot: int, theta: float,
                 rope_scale: float, neox: bool, freq_factors: np.ndarray | None, magnitude: float, window: int) -> bool:
        """Layers' update of the token ``x`` (1, n_embd) at ``pos``, in place; ``k_cache``/``v_cache``
        (n_layer, n_ctx, n_kv_head, head_dim): these layers' caches (float16 or float32). Returns
        False, having done nothing, while the step is being compiled in the background (the caller
        runs its layer code meanwhile)."""
        as_f16 = k_cache.dtype == np.float16
        if as_f16:  # Numba has no float16: the kernels take the bits
            k_cache, v_cache = k_cache.view(np.uint16), v_cache.view(np.uint16)
        q, attn = self.scratch[1], self.scratch[4]
        slopes = np.zeros(self.n_head, np.float32)
        scale = np.float32(1.0 / np.sqrt(self.head_dim))
        attend_args = (q, k_cache[0], v_cache[0], int(pos), scale, slopes, False, int(window), np.float32(0.0), attn)
        tile = attention._tile_address(attention.tile_function(1, self.n_head, self.n_kv_head, self.head_dim,
                                                               k_cache.dtype, pos), attend_args)
        kind = k_cache.dtype.str
        if kind not in self._attend_addresses:
            self._attend_addresses[kind] = kernel_address(attention._attend_kernel, (tile, *attend_args))
        self.kernels[ATTEND] = self._attend_addresses[kind]
        factors = (np.ones(n_rot // 2, np.float32) if freq_factors is None
                   else np.ascontiguousarray(freq_factors, dtype=np.float32))
        args = (x, self.vectors, self.weights, self.drivers, self.activations, k_cache, v_cache,
                as_f16, np.array([float(pos)]), int(n_rot), float(theta), float(rope_scale), bool(neox), factors,
                np.float32(magnitude), self.kernels, tile, scale, slopes, False, int(window), self.eps, self.scratch,
                self.buffers)
        if kind not in self._ready:
            signature = types.none(*(typeof(arg) for arg in args))
            if not _compiled(signature):
                return False
            self._ready.add(kind)
        with slp_scope():
            decode_layers(*args)
        return True


_BACKGROUND: dict = {}  # decode_layers signature -> the child compiling it, or None once it is over


def _compiled(signature: Any) -> bool:
    """Whether decode_layers can run for ``signature`` now: compiled, in Numba's on-disk cache, or
    compiled here when no child can do it. The first time otherwise, a child process compiles it
    (6.5-8.4 s on a Zen 4 EPYC VM) and this says False until the child is done, so that the first run's
    generation starts at once, on the layer code, instead of pausing for it."""
    if tuple(signature.args) in decode_layers.overloads:
        return True
    child = _BACKGROUND.get(signature)
    if child is not None and child.poll() is None:
        return False
    try:
        if attention.load_cached(decode_layers, signature):
            return True
    except Exception:  # Numba's internals moved: compile here
        return True
    if signature in _BACKGROUND or not attention.background_compiles():
        return True  # the child failed, or there is none: the call compiles it here
    _BACKGROUND[signature] = attention.start_compiling_child(
        "import pickle, sys; from engine.kernels.decode_step import _compile_in_child; "
        "_compile_in_child(pickle.load(sys.stdin.buffer))", pickle.dumps(signature))
    return _BACKGROUND[signature] is None


def _compile_in_child(signature: Any) -> None:
    """The child of _compiled: decode_layers for ``signature`` into Numba's on-disk cache."""
    with slp_scope():
        decode_layers.compile(signature)
