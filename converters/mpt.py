"""MPT (MosaicML; `MptForCausalLM` and the original `MPTForCausalLM` layout) -> GGUF.

Both layouts name tensors `transformer.blocks.N.attn.Wqkv` and so on, and keep the
fused QKV projection, which llama.cpp keeps fused too. Positions come from ALiBi;
embeddings are tied (no output tensor: the runtime reuses token_embd).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

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
from converters.vocab import bpe_vocab

ARCH = "mpt"
HF_ARCHITECTURES = ("MptForCausalLM", "MPTForCausalLM")
MODEL_TYPES = ("mpt",)
LAYER_NORM_EPS = 1e-5  # MPT's LayerNorm default; original configs do not store it


def plan(config: Mapping[str, Any], config_path: Path, names: set[str]) -> ConversionPlan:
    cfg = ConfigReader(config, config_path)
    n_embd = cfg.require_int("d_model", "hidden_size")
    n_layer = cfg.require_int("n_layers", "num_hidden_layers", maximum=MAX_LAYERS)
    cfg.check_layers("n_layers", n_layer, names, "transformer.blocks.")
    n_head = cfg.require_int("n_heads", "num_attention_heads", maximum=n_embd)
    n_vocab = cfg.require_int("vocab_size", maximum=MAX_VOCAB)
    expansion = cfg.float_value("expansion_ratio", default=4, positive=True, maximum=MAX_DIM)
    n_ff = int(expansion * n_embd)
    if not 1 <= n_ff <= MAX_DIM:
        raise cfg.fail(f"expansion_ratio {expansion} x d_model {n_embd} gives an FFN size of {n_ff} "
                       f"(must be in [1, {MAX_DIM}])")
    n_ctx = cfg.int_value("max_seq_len", default=2048, minimum=1)
    attn = cfg.section("attn_config")
    n_head_kv = attn.int_value("kv_n_heads", default=n_head, minimum=1, maximum=n_head)
    if n_embd % n_head or n_head % n_head_kv:
        raise cfg.fail(f"d_model {n_embd}, n_heads {n_head}, kv_n_heads {n_head_kv} do not divide")
    if attn.bool_value("qk_ln", default=False) or attn.bool_value("qk_gn", default=False):
        raise cfg.fail("MPT with qk_ln/qk_gn is not supported")
    if not attn.bool_value("alibi", default=False):
        raise cfg.fail("MPT without ALiBi (learned positions) is not supported")
    head_dim = n_embd // n_head

    metadata = [
        u32(Keys.LLM.CONTEXT_LENGTH.format(arch=ARCH), n_ctx),
        u32(Keys.LLM.EMBEDDING_LENGTH.format(arch=ARCH), n_embd),
        u32(Keys.LLM.BLOCK_COUNT.format(arch=ARCH), n_layer),
        u32(Keys.LLM.FEED_FORWARD_LENGTH.format(arch=ARCH), n_ff),
        u32(Keys.Attention.HEAD_COUNT.format(arch=ARCH), n_head),
        u32(Keys.Attention.HEAD_COUNT_KV.format(arch=ARCH), n_head_kv),
        f32(Keys.Attention.LAYERNORM_EPS.format(arch=ARCH),
            cfg.float_value("layer_norm_epsilon", default=LAYER_NORM_EPS, positive=True)),
        f32(Keys.Attention.MAX_ALIBI_BIAS.format(arch=ARCH), attn.float_value("alibi_bias_max", default=8)),
    ]
    if attn.has("clip_qkv"):
        metadata.append(f32(Keys.Attention.CLAMP_KQV.format(arch=ARCH),
                            attn.float_value("clip_qkv", default=0.0, positive=True)))

    n_qkv = n_embd + 2 * n_head_kv * head_dim
    tensors = [PlannedTensor(tensor_name(MODEL_TENSOR.TOKEN_EMBD), "transformer.wte.weight", (n_vocab, n_embd))]

    def with_bias(kind: MODEL_TENSOR, source: str, shape: tuple[int, ...], block: int | None) -> list[PlannedTensor]:
        # MPT ships without biases (no_bias=True); keep them if a checkpoint has them.
        planned = [PlannedTensor(tensor_name(kind, block=block), f"{source}.weight", shape)]
        if f"{source}.bias" in names:
            planned.append(PlannedTensor(tensor_name(kind, "bias", block=block), f"{source}.bias", shape[:1]))
        return planned

    for i in range(n_layer):
        hf = f"transformer.blocks.{i}"
        tensors += with_bias(MODEL_TENSOR.ATTN_NORM, f"{hf}.norm_1", (n_embd,), i)
        tensors += with_bias(MODEL_TENSOR.ATTN_QKV, f"{hf}.attn.Wqkv", (n_qkv, n_embd), i)
        tensors += with_bias(MODEL_TENSOR.ATTN_OUT, f"{hf}.attn.out_proj", (n_embd, n_embd), i)
        tensors += with_bias(MODEL_TENSOR.FFN_NORM, f"{hf}.norm_2", (n_embd,), i)
        tensors += with_bias(MODEL_TENSOR.FFN_UP, f"{hf}.ffn.up_proj", (n_ff, n_embd), i)
        tensors += with_bias(MODEL_TENSOR.FFN_DOWN, f"{hf}.ffn.down_proj", (n_embd, n_ff), i)
    tensors += with_bias(MODEL_TENSOR.OUTPUT_NORM, "transformer.norm_f", (n_embd,), None)
    tied = cfg.bool_value("tie_word_embeddings", default=True)
    if "lm_head.weight" in names and not tied:
        tensors.append(PlannedTensor(tensor_name(MODEL_TENSOR.OUTPUT), "lm_head.weight", (n_vocab, n_embd)))

    def ignored(name: str) -> bool:
        return name == "lm_head.weight"

    return ConversionPlan(ARCH, metadata, tensors, ignored)


def vocab(directory: Path, config: Mapping[str, Any]) -> list:
    return bpe_vocab(directory, config, pre="mpt")
