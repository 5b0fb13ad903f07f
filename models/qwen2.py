"""Qwen2 / Qwen2.5 (GGUF ``qwen2``): the LLaMA decoder (models/blocks.py) with q/k/v biases and
HF's rotate_half RoPE (ggml "neox" pairs (i, i + n_rot/2); the converter keeps HF's rows)."""

from __future__ import annotations

from models.blocks import PreNormDecoder


class Qwen2(PreNormDecoder):
    ARCH = "qwen2"
    NEOX = True
    REQUIRE_QKV_BIAS = True
