"""StableLM (``StableLmForCausalLM``, the original ``StableLMEpochForCausalLM``: stablelm-3b-4e1t,
StableLM-2) -> GGUF ``stablelm``.

A LLaMA-like decoder with LayerNorms (weight and bias), partial neox rotary
(``partial_rotary_factor``, ``rope.dimension_count``), optional q/k/v biases (``use_qkv_bias``),
optional per-head q/k LayerNorms (``qk_layernorm``, StableLM-2-12B: one checkpoint tensor per head,
stacked into ``attn_q_norm`` / ``attn_k_norm`` of shape (heads, head_dim) as llama.cpp's converter
does), a SwiGLU MLP and, with ``use_parallel_residual``, attention and MLP both fed by the input
LayerNorm (no ``ffn_norm``).
"""

from __future__ import annotations

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
    boolean,
    f32,
    tensor_name,
    u32,
)
from converters.gptneox import partial_rotary
from converters.vocab import hf_bpe_vocab

ARCH = "stablelm"
HF_ARCHITECTURES = ("StableLmForCausalLM", "StableLMEpochForCausalLM")
MODEL_TYPES = ("stablelm", "stablelm_epoch")


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
    n_rot = partial_rotary(cfg, head_dim, ("partial_rotary_factor", "rope_pct"), 0.25)
    act = cfg.str_value("hidden_act", default="silu")
    if act != "silu":
        raise cfg.fail(f"hidden_act {act!r} is not supported for StableLM (supported: silu)")
    theta, scaling, _ = cfg.rope_scaling()
    if scaling is not None:
        raise cfg.fail(f"rope scaling {scaling!r} is not supported for StableLM")
    parallel = cfg.bool_value("use_parallel_residual", default=False)
    qkv_bias = cfg.bool_value("use_qkv_bias", default=False)
    qk_norm = cfg.bool_value("qk_layernorm", default=False)

    metadata = [
        u32(Keys.LLM.CONTEXT_LENGTH.format(arch=ARCH), n_ctx),
        u32(Keys.LLM.EMBEDDING_LENGTH.format(arch=ARCH), n_embd),
        u32(Keys.LLM.BLOCK_COUNT.format(arch=ARCH), n_layer),
        u32(Keys.LLM.FEED_FORWARD_LENGTH.format(arch=ARCH), n_ff),
        u32(Keys.Rope.DIMENSION_COUNT.format(arch=ARCH), n_rot),
        u32(Keys.Attention.HEAD_COUNT.format(arch=ARCH), n_head),
        u32(Keys.Attention.HEAD_COUNT_KV.format(arch=ARCH), n_head_kv),
        boolean(Keys.LLM.USE_PARALLEL_RESIDUAL.format(arch=ARCH), parallel),
        f32(Keys.Attention.LAYERNORM_EPS.format(arch=ARCH),
            cfg.float_value("layer_norm_eps", "norm_eps", default=1e-5, positive=True)),
    ]
    if theta != 10000.0:  # llama.cpp's converter leaves it out (released models use 10000)
        metadata.append(f32(Keys.Rope.FREQ_BASE.format(arch=ARCH), theta))

    def name(kind: MODEL_TENSOR, block: int | None, suffix: str = "weight") -> str:
        return tensor_name(kind, suffix, block=block)

    def layer_norm(kind: MODEL_TENSOR, source: str, block: int | None) -> list[PlannedTensor]:
        return [PlannedTensor(name(kind, block), f"{source}.weight", (n_embd,)),
                PlannedTensor(name(kind, block, "bias"), f"{source}.bias", (n_embd,))]

    n_kv = n_head_kv * head_dim
    tensors = [PlannedTensor(tensor_name(MODEL_TENSOR.TOKEN_EMBD), "model.embed_tokens.weight", (n_vocab, n_embd))]
    for i in range(n_layer):
        hf = f"model.layers.{i}"
        attn = f"{hf}.self_attn"
        tensors += layer_norm(MODEL_TENSOR.ATTN_NORM, f"{hf}.input_layernorm", i)
        for kind, proj, rows in ((MODEL_TENSOR.ATTN_Q, "q_proj", n_embd), (MODEL_TENSOR.ATTN_K, "k_proj", n_kv),
                                 (MODEL_TENSOR.ATTN_V, "v_proj", n_kv)):
            tensors.append(PlannedTensor(name(kind, i), f"{attn}.{proj}.weight", (rows, n_embd)))
            if qkv_bias:
                tensors.append(PlannedTensor(name(kind, i, "bias"), f"{attn}.{proj}.bias", (rows,)))
        if qk_norm:
            for kind, which, heads in ((MODEL_TENSOR.ATTN_Q_NORM, "q", n_head),
                                       (MODEL_TENSOR.ATTN_K_NORM, "k", n_head_kv)):
                parts = tuple(f"{attn}.{which}_layernorm.norms.{h}.weight" for h in range(heads))
                tensors.append(PlannedTensor(name(kind, i), f"{attn}.{which}_layernorm.norms.*.weight",
                                             (heads, head_dim), parts=parts))
        tensors.append(PlannedTensor(name(MODEL_TENSOR.ATTN_OUT, i), f"{attn}.o_proj.weight", (n_embd, n_embd)))
        if not parallel:
            tensors += layer_norm(MODEL_TENSOR.FFN_NORM, f"{hf}.post_attention_layernorm", i)
        tensors += [
            PlannedTensor(name(MODEL_TENSOR.FFN_GATE, i), f"{hf}.mlp.gate_proj.weight", (n_ff, n_embd)),
            PlannedTensor(name(MODEL_TENSOR.FFN_DOWN, i), f"{hf}.mlp.down_proj.weight", (n_embd, n_ff)),
            PlannedTensor(name(MODEL_TENSOR.FFN_UP, i), f"{hf}.mlp.up_proj.weight", (n_ff, n_embd)),
        ]
    tensors += layer_norm(MODEL_TENSOR.OUTPUT_NORM, "model.norm", None)
    # llama.cpp's stablelm graph requires output.weight: a tied model gets a copy of the embedding.
    tied = cfg.bool_value("tie_word_embeddings", default=False)
    head = "model.embed_tokens.weight" if tied else "lm_head.weight"
    tensors.append(PlannedTensor(tensor_name(MODEL_TENSOR.OUTPUT), head, (n_vocab, n_embd)))

    def ignored(name: str) -> bool:
        return name.endswith("rotary_emb.inv_freq") or name == "lm_head.weight"

    return ConversionPlan(ARCH, metadata, tensors, ignored)


def vocab(directory: Path, config: Mapping[str, Any]) -> list:
    """A byte-level BPE tokenizer.json: GPT-NeoX-20B's (stablelm-3b-4e1t, llama.cpp's ``olmo``) or
    StableLM-2's Arcade100k (``stablelm2``)."""
    return hf_bpe_vocab(directory, config, "StableLM")
