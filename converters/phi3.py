"""Phi-3 (``Phi3ForCausalLM``: Phi-3-mini/medium 4k) -> GGUF ``phi3``.

The fused ``qkv_proj`` ([q | k | v] rows) and ``gate_up_proj`` ([gate | up] rows) stay fused, as
llama.cpp's converter writes them (``attn_qkv``, and ``ffn_up`` with 2 * intermediate_size rows);
Q and K keep HF's rotate_half order (neox RoPE) on ``partial_rotary_factor`` of each head. The
sliding window is written as llama.cpp does (0 when there is none). LongRoPE (the 128k models:
``rope_scaling`` with long/short factors) as llama.cpp writes it: ``rope_factors_long.weight`` and
``rope_factors_short.weight`` and ``rope.scaling.attn_factor`` = sqrt(1 + ln(s) / ln(original
context)), s = max_position_embeddings / original_max_position_embeddings. Tokenizer:
SentencePiece tokenizer.model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gguf import MODEL_TENSOR, Keys

from converters.base import (
    MAX_LAYERS,
    MAX_VOCAB,
    ConfigReader,
    ConversionPlan,
    PlannedTensor,
    f32,
    tensor_name,
    u32,
)
from converters.vocab import apply_added_tokens, sentencepiece_vocab

ARCH = "phi3"
HF_ARCHITECTURES = ("Phi3ForCausalLM",)
MODEL_TYPES = ("phi3",)


def plan(config: Mapping[str, Any], config_path: Path, names: set[str]) -> ConversionPlan:
    cfg = ConfigReader(config, config_path)
    n_embd = cfg.require_int("hidden_size")
    n_layer = cfg.require_int("num_hidden_layers", maximum=MAX_LAYERS)
    cfg.check_layers("num_hidden_layers", n_layer, names, "model.layers.")
    n_head = cfg.require_int("num_attention_heads", maximum=n_embd)
    n_head_kv = cfg.int_value("num_key_value_heads", default=n_head, minimum=1, maximum=n_head)
    n_ff = cfg.require_int("intermediate_size")
    n_vocab = cfg.require_int("vocab_size", maximum=MAX_VOCAB)
    n_ctx = cfg.int_value("max_position_embeddings", default=4096, minimum=1)
    if n_embd % n_head or n_head % n_head_kv:
        raise cfg.fail(f"hidden_size {n_embd}, heads {n_head}, kv heads {n_head_kv} do not divide")
    head_dim = n_embd // n_head
    act = cfg.str_value("hidden_act", default="silu")
    if act != "silu":
        raise cfg.fail(f"hidden_act {act!r} is not supported for Phi-3 (supported: silu)")
    theta, scaling, params = cfg.rope_scaling()
    longrope = scaling in ("longrope", "su") or params.has("long_factor", "short_factor")
    if scaling is not None and not longrope:
        raise cfg.fail(f"rope scaling {scaling!r} is not supported for Phi-3 (supported: longrope)")
    rope = cfg.section("rope_parameters")
    factor = rope.float_value("partial_rotary_factor",
                              default=cfg.float_value("partial_rotary_factor", default=1.0, minimum=0.0, maximum=1.0),
                              minimum=0.0, maximum=1.0)
    n_rot = int(factor * n_embd) // n_head  # llama.cpp's rounding
    if n_rot < 2 or n_rot % 2:
        raise cfg.fail(f"partial_rotary_factor {factor:g} gives {n_rot} rotary dimensions (must be even and >= 2)")
    n_ctx_orig = rope.int_value("original_max_position_embeddings",
                                default=cfg.int_value("original_max_position_embeddings", default=n_ctx, minimum=1),
                                minimum=1)
    window = cfg.int_value("sliding_window", default=0, minimum=0)
    rope_tensors = []
    if longrope:
        long, short = params.float_list("long_factor", n_rot // 2), params.float_list("short_factor", n_rot // 2)
        scale = n_ctx / n_ctx_orig
        attn_factor = math.sqrt(1 + math.log(scale) / math.log(n_ctx_orig)) if scale > 1.0 else 1.0
        rope_tensors = [
            PlannedTensor(tensor_name(MODEL_TENSOR.ROPE_FACTORS_LONG), "<rope_scaling long_factor>", (n_rot // 2,),
                          generate=lambda: long),
            PlannedTensor(tensor_name(MODEL_TENSOR.ROPE_FACTORS_SHORT), "<rope_scaling short_factor>",
                          (n_rot // 2,), generate=lambda: short),
        ]

    metadata = [
        u32(Keys.LLM.CONTEXT_LENGTH.format(arch=ARCH), n_ctx),
        u32(Keys.Rope.SCALING_ORIG_CTX_LEN.format(arch=ARCH), n_ctx_orig),
        u32(Keys.LLM.EMBEDDING_LENGTH.format(arch=ARCH), n_embd),
        u32(Keys.LLM.FEED_FORWARD_LENGTH.format(arch=ARCH), n_ff),
        u32(Keys.LLM.BLOCK_COUNT.format(arch=ARCH), n_layer),
        u32(Keys.Attention.HEAD_COUNT.format(arch=ARCH), n_head),
        u32(Keys.Attention.HEAD_COUNT_KV.format(arch=ARCH), n_head_kv),
        f32(Keys.Attention.LAYERNORM_RMS_EPS.format(arch=ARCH),
            cfg.float_value("rms_norm_eps", default=1e-5, positive=True)),
        u32(Keys.Rope.DIMENSION_COUNT.format(arch=ARCH), n_rot),
        f32(Keys.Rope.FREQ_BASE.format(arch=ARCH), theta),
        u32(Keys.Attention.SLIDING_WINDOW.format(arch=ARCH), window),
    ]
    if longrope:
        metadata.append(f32(Keys.Rope.SCALING_ATTN_FACTOR.format(arch=ARCH), attn_factor))

    def name(kind: MODEL_TENSOR, block: int | None = None) -> str:
        return tensor_name(kind, block=block)

    n_qkv = (n_head + 2 * n_head_kv) * head_dim
    tensors = [*rope_tensors,
               PlannedTensor(name(MODEL_TENSOR.TOKEN_EMBD), "model.embed_tokens.weight", (n_vocab, n_embd))]
    for i in range(n_layer):
        hf = f"model.layers.{i}"
        tensors += [
            PlannedTensor(name(MODEL_TENSOR.ATTN_NORM, i), f"{hf}.input_layernorm.weight", (n_embd,)),
            PlannedTensor(name(MODEL_TENSOR.ATTN_QKV, i), f"{hf}.self_attn.qkv_proj.weight", (n_qkv, n_embd)),
            PlannedTensor(name(MODEL_TENSOR.ATTN_OUT, i), f"{hf}.self_attn.o_proj.weight", (n_embd, n_embd)),
            PlannedTensor(name(MODEL_TENSOR.FFN_NORM, i), f"{hf}.post_attention_layernorm.weight", (n_embd,)),
            PlannedTensor(name(MODEL_TENSOR.FFN_UP, i), f"{hf}.mlp.gate_up_proj.weight", (2 * n_ff, n_embd)),
            PlannedTensor(name(MODEL_TENSOR.FFN_DOWN, i), f"{hf}.mlp.down_proj.weight", (n_embd, n_ff)),
        ]
    tensors.append(PlannedTensor(name(MODEL_TENSOR.OUTPUT_NORM), "model.norm.weight", (n_embd,)))
    if "lm_head.weight" in names and not cfg.bool_value("tie_word_embeddings", default=False):
        tensors.append(PlannedTensor(name(MODEL_TENSOR.OUTPUT), "lm_head.weight", (n_vocab, n_embd)))

    def ignored(name: str) -> bool:
        return name.endswith("rotary_emb.inv_freq") or name == "lm_head.weight"

    return ConversionPlan(ARCH, metadata, tensors, ignored)


def vocab(directory: Path, config: Mapping[str, Any]) -> list:
    # As llama.cpp's Phi-3 converter: the chat tokens (<|user|>, <|end|>, ...) listed as special in
    # tokenizer_config.json / tokenizer.json become CONTROL tokens (so <|end|> ends a turn).
    entries = sentencepiece_vocab(directory, config)
    apply_added_tokens(directory, entries, looks_special_too=False, spaces=False, tokenizer_json=True)
    return entries
