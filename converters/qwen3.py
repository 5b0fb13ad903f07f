"""Qwen3 (``Qwen3ForCausalLM``) -> GGUF ``qwen3``: the LLaMA layout (converters/llama.py's
``decoder_plan``) plus per-head q/k RMSNorm weights (``attn_q_norm``, ``attn_k_norm``) and an explicit
``head_dim``; Q and K rows stay in HF's rotate_half order (ggml's neox RoPE)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from converters.base import ConversionPlan
from converters.llama import decoder_plan
from converters.vocab import hf_bpe_vocab

ARCH = "qwen3"
HF_ARCHITECTURES = ("Qwen3ForCausalLM",)
MODEL_TYPES = ("qwen3",)


def plan(config: Mapping[str, Any], config_path: Path, names: set[str]) -> ConversionPlan:
    return decoder_plan(config, config_path, names, ARCH, permute=False, qk_norm=True)


def vocab(directory: Path, config: Mapping[str, Any]) -> list:
    return hf_bpe_vocab(directory, config, "Qwen3")
