"""Qwen3 (GGUF ``qwen3``): the LLaMA decoder (models/blocks.py) with an RMSNorm over each head of
q and k before RoPE (``attn_q_norm``, ``attn_k_norm``), neox RoPE pairs, no biases, and an explicit
head size (``qwen3.attention.key_length``, e.g. 128 with hidden_size 1024 and 16 heads)."""

from __future__ import annotations

from models.blocks import PreNormDecoder


class Qwen3(PreNormDecoder):
    ARCH = "qwen3"
    NEOX = True
    REQUIRE_QK_NORM = True
