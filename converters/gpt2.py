"""GPT-2 (``GPT2LMHeadModel``: OpenAI GPT-2, Cerebras-GPT) -> GGUF ``gpt2``.

Learned absolute positions (``position_embd``), LayerNorms and linears with biases, a GELU MLP,
the fused ``c_attn`` projection ([q | k | v] columns) and a head tied to the token embedding.
transformers' ``Conv1D`` layers store weights as (in, out): they are transposed here to the
(out, in) rows every other linear has, as llama.cpp's converter does.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from gguf import MODEL_TENSOR, Keys

from converters.base import (
    MAX_DIM,
    MAX_LAYERS,
    MAX_VOCAB,
    ConfigReader,
    ConversionPlan,
    PlannedTensor,
    f32,
    tensor_name,
    u32,
)
from converters.vocab import hf_bpe_vocab

ARCH = "gpt2"
HF_ARCHITECTURES = ("GPT2LMHeadModel",)
MODEL_TYPES = ("gpt2",)
# The runtime computes GELU with the tanh formula (ggml_gelu, llama.cpp's graph): GPT-2's gelu_new.
# Cerebras-GPT's exact "gelu" differs from it by less than 5e-4 per activation.
ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu")


def transpose(w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(w.T)


def plan(config: Mapping[str, Any], config_path: Path, names: set[str]) -> ConversionPlan:
    cfg = ConfigReader(config, config_path)
    n_embd = cfg.require_int("n_embd", "hidden_size")
    n_layer = cfg.require_int("n_layer", "num_hidden_layers", maximum=MAX_LAYERS)
    cfg.check_layers("n_layer", n_layer, names, "transformer.h.")
    n_head = cfg.require_int("n_head", "num_attention_heads", maximum=n_embd)
    n_vocab = cfg.require_int("vocab_size", maximum=MAX_VOCAB)
    n_ctx = cfg.require_int("n_positions", "n_ctx", "max_position_embeddings")
    n_ff = cfg.int_value("n_inner", default=4 * n_embd, minimum=1, maximum=MAX_DIM)
    if n_embd % n_head:
        raise cfg.fail(f"n_embd {n_embd} is not a multiple of n_head {n_head}")
    act = cfg.str_value("activation_function", default="gelu_new")
    if act not in ACTIVATIONS:
        raise cfg.fail(f"activation_function {act!r} is not supported for GPT-2 (supported: {', '.join(ACTIVATIONS)})")
    if not cfg.bool_value("scale_attn_weights", default=True):
        raise cfg.fail("scale_attn_weights = false is not supported")
    if cfg.bool_value("scale_attn_by_inverse_layer_idx", default=False):
        raise cfg.fail("scale_attn_by_inverse_layer_idx = true is not supported")

    metadata = [
        u32(Keys.LLM.BLOCK_COUNT.format(arch=ARCH), n_layer),
        u32(Keys.LLM.CONTEXT_LENGTH.format(arch=ARCH), n_ctx),
        u32(Keys.LLM.EMBEDDING_LENGTH.format(arch=ARCH), n_embd),
        u32(Keys.LLM.FEED_FORWARD_LENGTH.format(arch=ARCH), n_ff),
        u32(Keys.Attention.HEAD_COUNT.format(arch=ARCH), n_head),
        f32(Keys.Attention.LAYERNORM_EPS.format(arch=ARCH),
            cfg.float_value("layer_norm_epsilon", default=1e-5, positive=True)),
    ]

    def layer(kind: MODEL_TENSOR, source: str, shape: tuple[int, ...], block: int | None,
              conv1d: bool = False) -> list[PlannedTensor]:
        return [
            PlannedTensor(tensor_name(kind, block=block), f"{source}.weight", shape, transpose if conv1d else None,
                          source_shape=shape[::-1] if conv1d else None),  # Conv1D: (in, out) in the checkpoint
            PlannedTensor(tensor_name(kind, "bias", block=block), f"{source}.bias", shape[:1]),
        ]

    tensors = [
        PlannedTensor(tensor_name(MODEL_TENSOR.TOKEN_EMBD), "transformer.wte.weight", (n_vocab, n_embd)),
        PlannedTensor(tensor_name(MODEL_TENSOR.POS_EMBD), "transformer.wpe.weight", (n_ctx, n_embd)),
    ]
    for i in range(n_layer):
        hf = f"transformer.h.{i}"
        tensors += layer(MODEL_TENSOR.ATTN_NORM, f"{hf}.ln_1", (n_embd,), i)
        tensors += layer(MODEL_TENSOR.ATTN_QKV, f"{hf}.attn.c_attn", (3 * n_embd, n_embd), i, conv1d=True)
        tensors += layer(MODEL_TENSOR.ATTN_OUT, f"{hf}.attn.c_proj", (n_embd, n_embd), i, conv1d=True)
        tensors += layer(MODEL_TENSOR.FFN_NORM, f"{hf}.ln_2", (n_embd,), i)
        tensors += layer(MODEL_TENSOR.FFN_UP, f"{hf}.mlp.c_fc", (n_ff, n_embd), i, conv1d=True)
        tensors += layer(MODEL_TENSOR.FFN_DOWN, f"{hf}.mlp.c_proj", (n_embd, n_ff), i, conv1d=True)
    tensors += layer(MODEL_TENSOR.OUTPUT_NORM, "transformer.ln_f", (n_embd,), None)
    if "lm_head.weight" in names and not cfg.bool_value("tie_word_embeddings", default=True):
        tensors.append(PlannedTensor(tensor_name(MODEL_TENSOR.OUTPUT), "lm_head.weight", (n_vocab, n_embd)))

    def ignored(name: str) -> bool:
        # The causal-mask buffers of older checkpoints, and a tied head.
        return name.endswith((".attn.bias", ".attn.masked_bias")) or name == "lm_head.weight"

    return ConversionPlan(ARCH, metadata, tensors, ignored)


def vocab(directory: Path, config: Mapping[str, Any]) -> list:
    """GPT-2's byte-level BPE tokenizer.json (``gpt-2``); Cerebras-GPT uses the same vocabulary."""
    return hf_bpe_vocab(directory, config, "GPT-2")
