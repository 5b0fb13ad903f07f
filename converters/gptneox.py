"""GPT-NeoX (``GPTNeoXForCausalLM``: Pythia, Dolly-v2, RedPajama-INCITE, StableLM-alpha, Open
Assistant) -> GGUF ``gptneox``.

- LayerNorms and every linear with biases, GELU MLP, untied ``embed_out`` head.
- Rotary positions on the first ``rotary_pct`` of each head (``rope.dimension_count``), HF's
  rotate_half pairing (ggml's neox RoPE): Q and K rows are not permuted.
- ``use_parallel_residual`` (``x + attn(ln1(x)) + mlp(ln2(x))``) or sequential blocks.
- The fused ``query_key_value`` rows are stored per head as (q, k, v); llama.cpp's converter and
  graph want all q rows, then all k, then all v, so the rows are regrouped here (weight and bias).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from gguf import MODEL_TENSOR, Keys

from converters.base import (
    MAX_LAYERS,
    MAX_VOCAB,
    ConfigReader,
    ConversionPlan,
    PlannedTensor,
    boolean,
    f32,
    tensor_name,
    u32,
)
from converters.vocab import hf_bpe_vocab

ARCH = "gptneox"
HF_ARCHITECTURES = ("GPTNeoXForCausalLM",)
MODEL_TYPES = ("gpt_neox",)


def regroup_head_qkv(weight: np.ndarray, n_head: int, head_dim: int) -> np.ndarray:
    """(heads x [q, k, v]) rows -> [all q; all k; all v] rows (weights and biases alike)."""
    per_head = weight.reshape(n_head, 3, head_dim, *weight.shape[1:])
    return np.concatenate([per_head[:, j].reshape(n_head * head_dim, *weight.shape[1:]) for j in range(3)])


def partial_rotary(cfg: ConfigReader, head_dim: int, legacy_keys: tuple[str, ...], default: float) -> int:
    """Rotary dimensions per head: ``int(head_dim * factor)`` as transformers and llama.cpp compute
    it; the factor from transformers 5's ``rope_parameters.partial_rotary_factor`` or an older
    top-level key (``rotary_pct``, ``partial_rotary_factor``, ``rope_pct``)."""
    params = cfg.section("rope_parameters")
    factor = params.float_value("partial_rotary_factor",
                                default=cfg.float_value(*legacy_keys, default=default, minimum=0.0, maximum=1.0),
                                minimum=0.0, maximum=1.0)
    n_rot = int(head_dim * factor)
    if n_rot < 2 or n_rot % 2:
        raise cfg.fail(f"partial rotary factor {factor:g} x head size {head_dim} gives {n_rot} rotary dimensions "
                       "(must be even and >= 2)")
    return n_rot


def plan(config: Mapping[str, Any], config_path: Path, names: set[str]) -> ConversionPlan:
    cfg = ConfigReader(config, config_path)
    n_embd = cfg.require_int("hidden_size")
    n_layer = cfg.require_int("num_hidden_layers", maximum=MAX_LAYERS)
    cfg.check_layers("num_hidden_layers", n_layer, names, "gpt_neox.layers.")
    n_head = cfg.require_int("num_attention_heads", maximum=n_embd)
    n_ff = cfg.require_int("intermediate_size")
    n_vocab = cfg.require_int("vocab_size", maximum=MAX_VOCAB)
    n_ctx = cfg.int_value("max_position_embeddings", default=2048, minimum=1)
    if n_embd % n_head:
        raise cfg.fail(f"hidden_size {n_embd} is not a multiple of num_attention_heads {n_head}")
    head_dim = n_embd // n_head
    n_rot = partial_rotary(cfg, head_dim, ("rotary_pct",), 0.25)
    act = cfg.str_value("hidden_act", default="gelu")
    if act != "gelu":
        raise cfg.fail(f"hidden_act {act!r} is not supported for GPT-NeoX (supported: gelu)")
    theta, scaling, _ = cfg.rope_scaling()
    if scaling is not None:
        raise cfg.fail(f"rope scaling {scaling!r} is not supported for GPT-NeoX")
    if not cfg.has("rope_parameters"):  # older configs: rotary_emb_base
        theta = cfg.float_value("rotary_emb_base", default=theta, positive=True)
    parallel = cfg.bool_value("use_parallel_residual", default=True)
    bias = cfg.bool_value("attention_bias", default=True)

    metadata = [
        u32(Keys.LLM.CONTEXT_LENGTH.format(arch=ARCH), n_ctx),
        u32(Keys.LLM.EMBEDDING_LENGTH.format(arch=ARCH), n_embd),
        u32(Keys.LLM.BLOCK_COUNT.format(arch=ARCH), n_layer),
        u32(Keys.LLM.FEED_FORWARD_LENGTH.format(arch=ARCH), n_ff),
        u32(Keys.Rope.DIMENSION_COUNT.format(arch=ARCH), n_rot),
        u32(Keys.Attention.HEAD_COUNT.format(arch=ARCH), n_head),
        boolean(Keys.LLM.USE_PARALLEL_RESIDUAL.format(arch=ARCH), parallel),
        f32(Keys.Attention.LAYERNORM_EPS.format(arch=ARCH),
            cfg.float_value("layer_norm_eps", default=1e-5, positive=True)),
    ]
    if theta != 10000.0:  # llama.cpp's converter leaves it out (all released models use 10000)
        metadata.append(f32(Keys.Rope.FREQ_BASE.format(arch=ARCH), theta))

    def qkv_layout(w: np.ndarray) -> np.ndarray:
        return regroup_head_qkv(w, n_head, head_dim)

    def linear(kind: MODEL_TENSOR, source: str, shape: tuple[int, ...], block: int | None,
               with_bias: bool = True, transform: Any = None) -> list[PlannedTensor]:
        planned = [PlannedTensor(tensor_name(kind, block=block), f"{source}.weight", shape, transform)]
        if with_bias:
            planned.append(PlannedTensor(tensor_name(kind, "bias", block=block), f"{source}.bias", shape[:1],
                                         transform))
        return planned

    tensors = [PlannedTensor(tensor_name(MODEL_TENSOR.TOKEN_EMBD), "gpt_neox.embed_in.weight", (n_vocab, n_embd))]
    for i in range(n_layer):
        hf = f"gpt_neox.layers.{i}"
        tensors += linear(MODEL_TENSOR.ATTN_NORM, f"{hf}.input_layernorm", (n_embd,), i)
        tensors += linear(MODEL_TENSOR.ATTN_QKV, f"{hf}.attention.query_key_value", (3 * n_embd, n_embd), i,
                          bias, qkv_layout)
        tensors += linear(MODEL_TENSOR.ATTN_OUT, f"{hf}.attention.dense", (n_embd, n_embd), i, bias)
        tensors += linear(MODEL_TENSOR.FFN_NORM, f"{hf}.post_attention_layernorm", (n_embd,), i)
        tensors += linear(MODEL_TENSOR.FFN_UP, f"{hf}.mlp.dense_h_to_4h", (n_ff, n_embd), i)
        tensors += linear(MODEL_TENSOR.FFN_DOWN, f"{hf}.mlp.dense_4h_to_h", (n_embd, n_ff), i)
    tensors += linear(MODEL_TENSOR.OUTPUT_NORM, "gpt_neox.final_layer_norm", (n_embd,), None)
    # The head: `embed_out` in released checkpoints, `lm_head` as transformers 5 names it. llama.cpp's
    # gptneox graph requires output.weight, so a tied model gets a copy of the embedding.
    head = next((name for name in ("embed_out.weight", "lm_head.weight") if name in names), None)
    if cfg.bool_value("tie_word_embeddings", default=False):
        head = "gpt_neox.embed_in.weight"
    tensors.append(PlannedTensor(tensor_name(MODEL_TENSOR.OUTPUT), head or "embed_out.weight", (n_vocab, n_embd)))

    def ignored(name: str) -> bool:
        # Buffers of older checkpoints: the causal mask, its fill value, the rotary cache.
        return (name.endswith((".attention.bias", ".attention.masked_bias", ".rotary_emb.inv_freq"))
                or name in ("embed_out.weight", "lm_head.weight"))

    return ConversionPlan(ARCH, metadata, tensors, ignored)


def vocab(directory: Path, config: Mapping[str, Any]) -> list:
    """GPT-NeoX-20B's byte-level BPE tokenizer.json (NFC, GPT-2 split): llama.cpp names it ``olmo``
    (the fingerprint it shares with MPT's copy of that vocabulary)."""
    return hf_bpe_vocab(directory, config, "GPT-NeoX")
