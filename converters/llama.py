"""LLaMA (LLaMA 1/2, OpenLLaMA, Vicuna-style fine-tunes): HF names and config -> GGUF.

Q and K rows are permuted the way llama.cpp's converter does: HF stores each head's
rotary pairs as (first half, second half) of the head ("rotate_half"); ggml's
"normal" RoPE rotates adjacent pairs (2i, 2i+1). Interleaving the two halves makes the
two conventions compute the same thing, and makes our files interchangeable with
llama.cpp's.
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
    string,
    tensor_name,
    u32,
)
from converters.vocab import sentencepiece_vocab

ARCH = "llama"
HF_ARCHITECTURES = ("LlamaForCausalLM", "LLaMAForCausalLM")
MODEL_TYPES = ("llama",)


def permute_for_rope(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Interleave each head's two rotary halves: HF rotate_half layout -> ggml adjacent pairs."""
    n_out = weight.shape[0]
    return (
        weight.reshape(n_head, 2, n_out // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def plan(config: Mapping[str, Any], config_path: Path, names: set[str]) -> ConversionPlan:
    cfg = ConfigReader(config, config_path)
    n_embd = cfg.require_int("hidden_size")
    n_layer = cfg.require_int("num_hidden_layers", maximum=MAX_LAYERS)
    cfg.check_layers("num_hidden_layers", n_layer, names, "model.layers.")
    n_head = cfg.require_int("num_attention_heads", maximum=n_embd)
    n_head_kv = cfg.int_value("num_key_value_heads", default=n_head, minimum=1, maximum=n_head)
    n_ff = cfg.require_int("intermediate_size")
    n_vocab = cfg.require_int("vocab_size", maximum=MAX_VOCAB)
    head_dim = cfg.int_value("head_dim", default=n_embd // n_head, minimum=1, maximum=MAX_DIM)
    n_ctx = cfg.int_value("max_position_embeddings", "max_sequence_length", default=2048, minimum=1)
    if n_head % n_head_kv:
        raise cfg.fail(f"num_attention_heads {n_head} is not a multiple of num_key_value_heads {n_head_kv}")
    if head_dim * n_head != n_embd or head_dim % 2:
        raise cfg.fail(f"head_dim {head_dim} x {n_head} heads does not match hidden_size {n_embd}")

    metadata = [
        u32(Keys.LLM.VOCAB_SIZE.format(arch=ARCH), n_vocab),
        u32(Keys.LLM.CONTEXT_LENGTH.format(arch=ARCH), n_ctx),
        u32(Keys.LLM.EMBEDDING_LENGTH.format(arch=ARCH), n_embd),
        u32(Keys.LLM.BLOCK_COUNT.format(arch=ARCH), n_layer),
        u32(Keys.LLM.FEED_FORWARD_LENGTH.format(arch=ARCH), n_ff),
        u32(Keys.Attention.HEAD_COUNT.format(arch=ARCH), n_head),
        u32(Keys.Attention.HEAD_COUNT_KV.format(arch=ARCH), n_head_kv),
        f32(Keys.Attention.LAYERNORM_RMS_EPS.format(arch=ARCH),
            cfg.float_value("rms_norm_eps", default=1e-6, positive=True)),
        u32(Keys.Rope.DIMENSION_COUNT.format(arch=ARCH), head_dim),
    ]
    rope_theta, scaling_type, scaling_factor = cfg.rope()
    metadata.append(f32(Keys.Rope.FREQ_BASE.format(arch=ARCH), rope_theta))
    if scaling_type == "linear":
        metadata.append(string(Keys.Rope.SCALING_TYPE.format(arch=ARCH), "linear"))
        metadata.append(f32(Keys.Rope.SCALING_FACTOR.format(arch=ARCH), scaling_factor))
    elif scaling_type is not None:
        raise cfg.fail(f"rope scaling {scaling_type!r} is not supported (supported: linear)")

    def q_permute(w: np.ndarray) -> np.ndarray:
        return permute_for_rope(w, n_head)

    def k_permute(w: np.ndarray) -> np.ndarray:
        return permute_for_rope(w, n_head_kv)

    n_kv = head_dim * n_head_kv
    tensors = [PlannedTensor(tensor_name(MODEL_TENSOR.TOKEN_EMBD), "model.embed_tokens.weight", (n_vocab, n_embd))]
    for i in range(n_layer):
        hf = f"model.layers.{i}"
        tensors += [
            PlannedTensor(tensor_name(MODEL_TENSOR.ATTN_NORM, block=i), f"{hf}.input_layernorm.weight", (n_embd,)),
            PlannedTensor(tensor_name(MODEL_TENSOR.ATTN_Q, block=i), f"{hf}.self_attn.q_proj.weight",
                          (n_embd, n_embd), q_permute),
            PlannedTensor(tensor_name(MODEL_TENSOR.ATTN_K, block=i), f"{hf}.self_attn.k_proj.weight",
                          (n_kv, n_embd), k_permute),
            PlannedTensor(tensor_name(MODEL_TENSOR.ATTN_V, block=i), f"{hf}.self_attn.v_proj.weight", (n_kv, n_embd)),
            PlannedTensor(tensor_name(MODEL_TENSOR.ATTN_OUT, block=i), f"{hf}.self_attn.o_proj.weight",
                          (n_embd, n_embd)),
            PlannedTensor(tensor_name(MODEL_TENSOR.FFN_NORM, block=i), f"{hf}.post_attention_layernorm.weight",
                          (n_embd,)),
            PlannedTensor(tensor_name(MODEL_TENSOR.FFN_GATE, block=i), f"{hf}.mlp.gate_proj.weight", (n_ff, n_embd)),
            PlannedTensor(tensor_name(MODEL_TENSOR.FFN_DOWN, block=i), f"{hf}.mlp.down_proj.weight", (n_embd, n_ff)),
            PlannedTensor(tensor_name(MODEL_TENSOR.FFN_UP, block=i), f"{hf}.mlp.up_proj.weight", (n_ff, n_embd)),
        ]
    tensors.append(PlannedTensor(tensor_name(MODEL_TENSOR.OUTPUT_NORM), "model.norm.weight", (n_embd,)))
    # Tied embeddings: no lm_head in the checkpoint; llama.cpp then reuses token_embd.
    tied = cfg.bool_value("tie_word_embeddings", default=False)
    if "lm_head.weight" in names and not tied:
        tensors.append(PlannedTensor(tensor_name(MODEL_TENSOR.OUTPUT), "lm_head.weight", (n_vocab, n_embd)))

    def ignored(name: str) -> bool:
        return name.endswith("rotary_emb.inv_freq") or name == "lm_head.weight"

    return ConversionPlan(ARCH, metadata, tensors, ignored)


def vocab(directory: Path, config: Mapping[str, Any]) -> list:
    return sentencepiece_vocab(directory, config)
