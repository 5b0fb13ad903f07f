"""The operations architecture files are written in, over the Numba kernels in engine/kernels/.

Activations are float32 ``(n_tok, n)`` arrays. Everything here is architecture-neutral.
"""

from __future__ import annotations

import os

import numpy as np

from engine.errors import file_error
from engine.gguf_file import GGUFFile
from engine.kernels import decode_step as _decode_step
from engine.kernels import matmul as _matmul
from engine.kernels import ops as _ops
from engine.weights import Weight

rms_norm = _ops.rms_norm
alibi_slopes = _ops.alibi_slopes
swiglu = _ops.swiglu
# MPT, Falcon and GPT-NeoX use the exact (erf) GELU in transformers.
gelu = _ops.gelu_erf
# GPT-2's gelu_new and Gemma's gelu_pytorch_tanh: the tanh approximation (ggml_gelu's formula).
gelu_tanh = _ops.gelu_tanh


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, eps: float) -> np.ndarray:
    return _ops.layer_norm(x, weight, bias, eps)


def embed(weight: Weight, tokens: np.ndarray) -> np.ndarray:
    return weight.rows(tokens)


def linear(x: np.ndarray, weight: Weight) -> np.ndarray:
    """``x W^T``: (n_tok, n_in) -> (n_tok, n_out); plus ``s (x A^T) B^T`` per run-time LoRA adapter
    (``s`` = its scale in effect times alpha / r, engine/lora.py)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    return _add_lora(x, weight, _matmul.matmul(weight, x))


_LINEAR = linear


def linears(x: np.ndarray, *weights: Weight) -> list[np.ndarray]:
    """``[linear(x, w) for w in weights]``, bit for bit, quantizing ``x`` once for them all where
    their kernels take the same activations (a layer's q, k, v; gate and up). While ``linear`` is
    wrapped (engine/imatrix.py observes every product that way), each goes through it."""
    if linear is not _LINEAR:
        return [linear(x, w) for w in weights]
    x = np.ascontiguousarray(x, dtype=np.float32)
    return [_add_lora(x, w, y) for w, y in zip(weights, _matmul.matmul_many(weights, x))]


# Off (or HALFBYTE_COMPILED_DECODE=0): every decode step runs the layer code (benchmarks and tests
# compare the two).
COMPILED_DECODE = os.environ.get("HALFBYTE_COMPILED_DECODE", "1") != "0"


def compiled_decode_stack(layers: list, n_embd: int, n_head: int, n_kv_head: int, head_dim: int, n_ff: int,
                          eps: float) -> _decode_step.DecodeStack | None:
    """A pre-norm gated decoder stack's one-token step as one compiled function
    (engine/kernels/decode_step.py: the same kernels and bits as its layer code, without the Python
    between them), or None when these layers' products cannot run there (types without a
    matrix-vector driver, LoRA adapters) or products are being observed (``linear`` wrapped)."""
    if not COMPILED_DECODE or linear is not _LINEAR:
        return None
    try:
        return _decode_step.DecodeStack(layers, n_embd, n_head, n_kv_head, head_dim, n_ff, eps)
    except _decode_step.Unsupported:
        return None


def kernel_path() -> str:
    """What the products run on now (matmul.kernel_description): a compiled step is built per path."""
    return _matmul.kernel_description()


def _add_lora(x: np.ndarray, weight: Weight, y: np.ndarray) -> np.ndarray:
    terms = getattr(weight, "lora", ())
    if terms:
        from engine.lora import active_scale

        for a_t, b_t, unit, index, default in terms:
            scale = active_scale(index, default)
            if scale:
                _ops.add_lora(x, a_t, b_t, scale * unit, y)
    return y


def rope(x: np.ndarray, positions: np.ndarray, n_rot: int, theta: float, scale: float, neox: bool,
         freq_factors: np.ndarray | None = None, magnitude: float = 1.0) -> None:
    """Rotate ``x`` (n_tok, n_head, head_dim) in place; ``freq_factors`` (n_rot/2,) divide the
    frequencies (``rope_freqs.weight``: Llama 3.1's scaling; YaRN and LongRoPE, engine/rope.py);
    ``magnitude`` multiplies the rotated dims (ggml's mscale on cos and sin)."""
    _ops.rope(x, positions, n_rot, theta, scale, neox, freq_factors=freq_factors)
    if magnitude != 1.0:
        x[..., :n_rot] *= np.float32(magnitude)


def check_heads(file: GGUFFile, n_embd: int, n_head: int, n_head_kv: int, n_rot: int) -> None:
    """Head counts must divide the embedding and each other, or attention is undefined."""
    if n_embd % n_head or n_head % n_head_kv or n_rot > n_embd // n_head or n_rot % 2:
        raise file_error(
            file.path, f"inconsistent attention shape: {n_embd} dims, {n_head} heads, {n_head_kv} KV heads, "
            f"{n_rot} rotary dims"
        )
