"""Falcon (`FalconForCausalLM`, and the original "RefinedWebModel" / "RefinedWeb" layouts) -> GGUF.

Two block styles share one set of names:
- 7B style: multi-query attention (one KV head), one LayerNorm feeding attention and
  MLP in parallel (`input_layernorm`).
- 40B style (`new_decoder_architecture`): `num_kv_heads` KV groups and two LayerNorms.
  llama.cpp (gguf-py's tensor map) names `ln_mlp` attn_norm and `ln_attn` attn_norm_2: in its
  graph attn_norm always feeds the MLP and attn_norm_2, when present, feeds attention.

The fused `query_key_value` rows are stored per KV group as (q heads of the group, k, v);
llama.cpp wants all q heads, then all k heads, then all v heads (its "jploski" layout),
so the rows are regrouped here.
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
from converters.vocab import bpe_vocab

ARCH = "falcon"
HF_ARCHITECTURES = ("FalconForCausalLM", "RWForCausalLM")
MODEL_TYPES = ("falcon", "RefinedWebModel", "RefinedWeb")
CONTEXT_LENGTH = 2048  # Falcon's training context; config.json does not store it


def regroup_qkv(weight: np.ndarray, n_head: int, n_head_kv: int, head_dim: int) -> np.ndarray:
    """(kv groups x [q.., k, v]) rows -> [all q; all k; all v] rows (llama.cpp's layout)."""
    grouped = weight.reshape(n_head_kv, n_head // n_head_kv + 2, head_dim, *weight.shape[1:])
    q = grouped[:, :-2].reshape(n_head * head_dim, *weight.shape[1:])
    k = grouped[:, -2].reshape(n_head_kv * head_dim, *weight.shape[1:])
    v = grouped[:, -1].reshape(n_head_kv * head_dim, *weight.shape[1:])
    return np.concatenate([q, k, v])


def kv_head_count(cfg: ConfigReader, n_head: int, new_decoder: bool) -> int:
    if new_decoder:
        return cfg.require_int("num_kv_heads", "n_head_kv", maximum=n_head)
    if cfg.bool_value("multi_query", default=True):
        return 1
    return n_head


def plan(config: Mapping[str, Any], config_path: Path, names: set[str]) -> ConversionPlan:
    cfg = ConfigReader(config, config_path)
    n_embd = cfg.require_int("hidden_size")
    n_layer = cfg.require_int("num_hidden_layers", "n_layer", maximum=MAX_LAYERS)
    cfg.check_layers("num_hidden_layers", n_layer, names, "transformer.h.")
    n_head = cfg.require_int("num_attention_heads", "n_head", maximum=n_embd)
    n_vocab = cfg.require_int("vocab_size", maximum=MAX_VOCAB)
    # The original "RefinedWeb" (40B) layout implies the new decoder architecture.
    new_decoder = cfg.bool_value("new_decoder_architecture",
                                 default=cfg.str_value("model_type", default="") == "RefinedWeb")
    n_head_kv = kv_head_count(cfg, n_head, new_decoder)
    if cfg.bool_value("alibi", default=False):
        raise cfg.fail("Falcon with ALiBi (falcon-rw) is not supported")
    if cfg.bool_value("bias", default=False):
        raise cfg.fail("Falcon with linear biases (falcon-rw) is not supported")
    if not new_decoder and not cfg.bool_value("parallel_attn", default=True):
        raise cfg.fail("Falcon with sequential attention/MLP (parallel_attn=false) is not supported")
    if n_embd % n_head or n_head % n_head_kv:
        raise cfg.fail(f"hidden_size {n_embd}, heads {n_head}, kv heads {n_head_kv} do not divide")
    head_dim = n_embd // n_head
    n_ff = cfg.int_value("ffn_hidden_size", default=4 * n_embd, minimum=1, maximum=MAX_DIM)

    metadata = [
        u32(Keys.LLM.CONTEXT_LENGTH.format(arch=ARCH), CONTEXT_LENGTH),
        string(Keys.LLM.TENSOR_DATA_LAYOUT.format(arch=ARCH), "jploski"),
        u32(Keys.LLM.EMBEDDING_LENGTH.format(arch=ARCH), n_embd),
        u32(Keys.LLM.FEED_FORWARD_LENGTH.format(arch=ARCH), n_ff),
        u32(Keys.LLM.BLOCK_COUNT.format(arch=ARCH), n_layer),
        u32(Keys.Attention.HEAD_COUNT.format(arch=ARCH), n_head),
        u32(Keys.Attention.HEAD_COUNT_KV.format(arch=ARCH), n_head_kv),
        f32(Keys.Attention.LAYERNORM_EPS.format(arch=ARCH), cfg.float_value("layer_norm_epsilon", default=1e-5,
                                                                                     positive=True)),
    ]
    rope_theta, scaling_type, _ = cfg.rope()
    if scaling_type is not None:
        raise cfg.fail(f"rope scaling {scaling_type!r} is not supported for Falcon")
    if rope_theta != 10000.0:
        metadata.append(f32(Keys.Rope.FREQ_BASE.format(arch=ARCH), rope_theta))

    def qkv_layout(w: np.ndarray) -> np.ndarray:
        return regroup_qkv(w, n_head, n_head_kv, head_dim)

    def norm(kind: MODEL_TENSOR, source: str, block: int | None) -> list[PlannedTensor]:
        return [
            PlannedTensor(tensor_name(kind, block=block), f"{source}.weight", (n_embd,)),
            PlannedTensor(tensor_name(kind, "bias", block=block), f"{source}.bias", (n_embd,)),
        ]

    n_qkv = (n_head + 2 * n_head_kv) * head_dim
    tensors = [
        PlannedTensor(tensor_name(MODEL_TENSOR.TOKEN_EMBD), "transformer.word_embeddings.weight", (n_vocab, n_embd))
    ]
    for i in range(n_layer):
        hf = f"transformer.h.{i}"
        if new_decoder:
            tensors += norm(MODEL_TENSOR.ATTN_NORM, f"{hf}.ln_mlp", i)
            tensors += norm(MODEL_TENSOR.ATTN_NORM_2, f"{hf}.ln_attn", i)
        else:
            tensors += norm(MODEL_TENSOR.ATTN_NORM, f"{hf}.input_layernorm", i)
        tensors += [
            PlannedTensor(tensor_name(MODEL_TENSOR.ATTN_QKV, block=i), f"{hf}.self_attention.query_key_value.weight",
                          (n_qkv, n_embd), qkv_layout),
            PlannedTensor(tensor_name(MODEL_TENSOR.ATTN_OUT, block=i), f"{hf}.self_attention.dense.weight",
                          (n_embd, n_embd)),
            PlannedTensor(tensor_name(MODEL_TENSOR.FFN_UP, block=i), f"{hf}.mlp.dense_h_to_4h.weight", (n_ff, n_embd)),
            PlannedTensor(tensor_name(MODEL_TENSOR.FFN_DOWN, block=i), f"{hf}.mlp.dense_4h_to_h.weight",
                          (n_embd, n_ff)),
        ]
    tensors += norm(MODEL_TENSOR.OUTPUT_NORM, "transformer.ln_f", None)
    tied = cfg.bool_value("tie_word_embeddings", default=True)
    if "lm_head.weight" in names and not tied:
        tensors.append(PlannedTensor(tensor_name(MODEL_TENSOR.OUTPUT), "lm_head.weight", (n_vocab, n_embd)))

    def ignored(name: str) -> bool:
        return name == "lm_head.weight"

    return ConversionPlan(ARCH, metadata, tensors, ignored)


def vocab(directory: Path, config: Mapping[str, Any]) -> list:
    return bpe_vocab(directory, config, pre="falcon")
