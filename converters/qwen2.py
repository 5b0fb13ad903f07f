"""Qwen2 / Qwen2.5 (``Qwen2ForCausalLM``) -> GGUF ``qwen2``: the LLaMA layout (converters/llama.py's
``decoder_plan``) plus q/k/v biases; Q and K rows stay in HF's rotate_half order (ggml's neox RoPE),
as llama.cpp's converter leaves them. Tokenizer: byte-level BPE tokenizer.json (``qwen2``)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from converters.base import ConversionPlan
from converters.llama import decoder_plan
from converters.vocab import hf_bpe_vocab

ARCH = "qwen2"
HF_ARCHITECTURES = ("Qwen2ForCausalLM",)
MODEL_TYPES = ("qwen2",)


def plan(config: Mapping[str, Any], config_path: Path, names: set[str]) -> ConversionPlan:
    return decoder_plan(config, config_path, names, ARCH, permute=False, qkv_bias=True)


def vocab(directory: Path, config: Mapping[str, Any]) -> list:
    return hf_bpe_vocab(directory, config, "Qwen2")
