"""Small pieces the LayerNorm-style architectures share (GPT-NeoX, GPT-2, StableLM, Phi-3)."""

from __future__ import annotations

import numpy as np


def add_bias(x: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    if bias is not None:
        x += bias
    return x


def split_qkv(qkv: np.ndarray, n_head: int, n_head_kv: int, head_dim: int) -> tuple[np.ndarray, ...]:
    """[q | k | v] columns of a fused projection -> q, k, v ``(n_tok, heads, head_dim)``; q and k
    contiguous (RoPE rotates them in place)."""
    n = qkv.shape[0]
    n_q, n_kv = n_head * head_dim, n_head_kv * head_dim
    q = np.ascontiguousarray(qkv[:, :n_q]).reshape(n, n_head, head_dim)
    k = np.ascontiguousarray(qkv[:, n_q : n_q + n_kv]).reshape(n, n_head_kv, head_dim)
    v = qkv[:, n_q + n_kv :].reshape(n, n_head_kv, head_dim)
    return q, k, v
