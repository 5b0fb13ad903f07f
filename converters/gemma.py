"""Gemma (``GemmaForCausalLM``) -> GGUF ``gemma``; the plan and tokenizer that Gemma 2
(converters/gemma2.py) shares.

As llama.cpp's converter (``GemmaModel`` / ``Gemma2Model``):
- RMSNorm weights are stored with 1 added: transformers' Gemma norms compute
  ``norm(x) * (1 + w)``, ggml's ``rms_norm(x) * w``. The sum is taken in float32, as transformers'
  ``1 + w.float()`` (and llama.cpp's converter: the same bits, bfloat16 checkpoints included);
- Q and K keep HF's rotate_half order (llama.cpp runs Gemma with neox RoPE);
- ``head_dim`` is written as ``attention.key_length`` / ``value_length`` (256 on Gemma 2B/7B,
  wider than hidden_size / heads on 7B); ``rope.dimension_count`` is left to default to it;
- the output is tied to ``token_embd`` (llama.cpp's Gemma graphs never read ``output.weight``): an
  untied ``lm_head`` is refused rather than dropped;
- the embedding scale sqrt(hidden_size) and the GeGLU MLP (tanh GELU) are implied by the
  architecture, not written;
- tokenizer: the SentencePiece ``tokenizer.model`` with ``add_space_prefix`` false, the tokens of
  tokenizer_config.json's ``added_tokens_decoder`` applied (special ones become CONTROL tokens:
  ``<start_of_turn>``, ``<end_of_turn>``), and for Gemma ``<end_of_turn>`` as the EOT token
  (llama.cpp writes id 107, which is that token in Gemma's vocabulary).

``rope.freq_base`` is written only when ``rope_theta`` is not llama.cpp's default 10000 (llama.cpp's
converter never writes it for Gemma; every released Gemma uses 10000).
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
    MetadataEntry,
    PlannedTensor,
    boolean,
    f32,
    tensor_name,
    u32,
)
from converters.vocab import apply_added_tokens, metadata_entry, sentencepiece_vocab

ARCH = "gemma"
HF_ARCHITECTURES = ("GemmaForCausalLM",)
MODEL_TYPES = ("gemma",)
# The runtime's GELU is the tanh approximation (llama.cpp's ggml_gelu). Gemma's legacy "gelu" means
# it too (transformers maps it to gelu_pytorch_tanh with a warning).
TANH_GELU = ("gelu_pytorch_tanh", "gelu_new")
DEFAULT_ROPE_THETA = 10000.0


def plus_one(weight: np.ndarray) -> np.ndarray:
    """A Gemma RMSNorm weight ``w`` (the norm scales by ``1 + w``) as ggml's multiplier."""
    return np.asarray(weight, np.float32) + np.float32(1.0)


def check_activation(cfg: ConfigReader, keys: tuple[str, ...], accepted: tuple[str, ...]) -> None:
    for key in keys:
        act = cfg.str_value(key)
        if act is not None and act not in accepted:
            raise cfg.fail(f"{key} {act!r} is not supported for {cfg.config.get('model_type', 'Gemma')} "
                           f"(supported: {', '.join(accepted)}: the tanh GELU llama.cpp computes)")


def explicit_null(cfg: ConfigReader, key: str, meaning: str) -> None:
    """Refuse ``key: null`` where transformers reads null as "off" but llama.cpp cannot turn it off."""
    if key in cfg.config and cfg.config[key] is None:
        raise cfg.fail(f"{key!r} is null ({meaning}), which llama.cpp's GGUF for this architecture cannot express")


def gemma_plan(config: Mapping[str, Any], config_path: Path, names: set[str], arch: str,
               extra_metadata: Any = None, post_norms: bool = False) -> ConversionPlan:
    """The plan of Gemma (``post_norms=False``) and Gemma 2 (``post_norms=True``: a norm after the
    attention and after the MLP, and the pre-MLP norm named ``pre_feedforward_layernorm``).
    ``extra_metadata(cfg, n_embd, n_layer, n_head, head_dim)`` returns the architecture's own keys."""
    cfg = ConfigReader(config, config_path)
    n_embd = cfg.require_int("hidden_size")
    n_layer = cfg.require_int("num_hidden_layers", maximum=MAX_LAYERS)
    cfg.check_layers("num_hidden_layers", n_layer, names, "model.layers.")
    n_head = cfg.require_int("num_attention_heads", maximum=n_embd)
    n_head_kv = cfg.int_value("num_key_value_heads", default=n_head, minimum=1, maximum=n_head)
    n_ff = cfg.require_int("intermediate_size")
    n_vocab = cfg.require_int("vocab_size", maximum=MAX_VOCAB)
    head_dim = cfg.int_value("head_dim", default=256, minimum=2, maximum=MAX_DIM)  # transformers' default
    n_ctx = cfg.int_value("max_position_embeddings", default=8192, minimum=1)
    if n_head % n_head_kv:
        raise cfg.fail(f"num_attention_heads {n_head} is not a multiple of num_key_value_heads {n_head_kv}")
    if head_dim % 2:
        raise cfg.fail(f"head_dim {head_dim} must be even (rotary pairs)")
    if head_dim * n_head > MAX_DIM:
        raise cfg.fail(f"head_dim {head_dim} x {n_head} heads is too large")
    if cfg.bool_value("attention_bias", default=False):
        raise cfg.fail("attention_bias = true is not supported (Gemma's projections have no biases)")
    if cfg.bool_value("use_bidirectional_attention", default=False):
        raise cfg.fail("use_bidirectional_attention = true is not supported (a causal decoder only)")
    theta, kind, scaling = cfg.rope_scaling()
    if kind is not None:
        raise cfg.fail(f"{scaling.prefix or 'rope_scaling.'}rope_type {kind!r} is not supported for Gemma")
    if "lm_head.weight" in names and not cfg.bool_value("tie_word_embeddings", default=True):
        raise cfg.fail("tie_word_embeddings = false with an lm_head is not supported (llama.cpp's Gemma ties "
                       "the output to token_embd)")

    metadata = [
        u32(Keys.LLM.CONTEXT_LENGTH.format(arch=arch), n_ctx),
        u32(Keys.LLM.EMBEDDING_LENGTH.format(arch=arch), n_embd),
        u32(Keys.LLM.BLOCK_COUNT.format(arch=arch), n_layer),
        u32(Keys.LLM.FEED_FORWARD_LENGTH.format(arch=arch), n_ff),
        u32(Keys.Attention.HEAD_COUNT.format(arch=arch), n_head),
        u32(Keys.Attention.HEAD_COUNT_KV.format(arch=arch), n_head_kv),
        f32(Keys.Attention.LAYERNORM_RMS_EPS.format(arch=arch),
            cfg.float_value("rms_norm_eps", default=1e-6, positive=True)),
        u32(Keys.Attention.KEY_LENGTH.format(arch=arch), head_dim),
        u32(Keys.Attention.VALUE_LENGTH.format(arch=arch), head_dim),
    ]
    if extra_metadata is not None:
        metadata += extra_metadata(cfg, n_embd, n_layer, n_head, head_dim)
    if theta != DEFAULT_ROPE_THETA:
        metadata.append(f32(Keys.Rope.FREQ_BASE.format(arch=arch), theta))

    def name(kind: MODEL_TENSOR, block: int | None = None) -> str:
        return tensor_name(kind, block=block)

    def norm(kind: MODEL_TENSOR, source: str, block: int | None = None) -> PlannedTensor:
        return PlannedTensor(name(kind, block), source, (n_embd,), plus_one)

    n_q, n_kv = head_dim * n_head, head_dim * n_head_kv
    tensors = [PlannedTensor(name(MODEL_TENSOR.TOKEN_EMBD), "model.embed_tokens.weight", (n_vocab, n_embd))]
    for i in range(n_layer):
        hf = f"model.layers.{i}"
        attn = f"{hf}.self_attn"
        tensors += [
            norm(MODEL_TENSOR.ATTN_NORM, f"{hf}.input_layernorm.weight", i),
            PlannedTensor(name(MODEL_TENSOR.ATTN_Q, i), f"{attn}.q_proj.weight", (n_q, n_embd)),
            PlannedTensor(name(MODEL_TENSOR.ATTN_K, i), f"{attn}.k_proj.weight", (n_kv, n_embd)),
            PlannedTensor(name(MODEL_TENSOR.ATTN_V, i), f"{attn}.v_proj.weight", (n_kv, n_embd)),
            PlannedTensor(name(MODEL_TENSOR.ATTN_OUT, i), f"{attn}.o_proj.weight", (n_embd, n_q)),
        ]
        if post_norms:
            tensors += [
                norm(MODEL_TENSOR.ATTN_POST_NORM, f"{hf}.post_attention_layernorm.weight", i),
                norm(MODEL_TENSOR.FFN_PRE_NORM, f"{hf}.pre_feedforward_layernorm.weight", i),
            ]
        else:
            tensors.append(norm(MODEL_TENSOR.FFN_NORM, f"{hf}.post_attention_layernorm.weight", i))
        tensors += [
            PlannedTensor(name(MODEL_TENSOR.FFN_GATE, i), f"{hf}.mlp.gate_proj.weight", (n_ff, n_embd)),
            PlannedTensor(name(MODEL_TENSOR.FFN_UP, i), f"{hf}.mlp.up_proj.weight", (n_ff, n_embd)),
            PlannedTensor(name(MODEL_TENSOR.FFN_DOWN, i), f"{hf}.mlp.down_proj.weight", (n_embd, n_ff)),
        ]
        if post_norms:
            tensors.append(norm(MODEL_TENSOR.FFN_POST_NORM, f"{hf}.post_feedforward_layernorm.weight", i))
    tensors.append(norm(MODEL_TENSOR.OUTPUT_NORM, "model.norm.weight"))

    def ignored(name: str) -> bool:
        return name.endswith("rotary_emb.inv_freq") or name == "lm_head.weight"

    return ConversionPlan(arch, metadata, tensors, ignored)


def plan(config: Mapping[str, Any], config_path: Path, names: set[str]) -> ConversionPlan:
    cfg = ConfigReader(config, config_path)
    check_activation(cfg, ("hidden_act", "hidden_activation"), (*TANH_GELU, "gelu"))
    return gemma_plan(config, config_path, names, ARCH)


def gemma_vocab(directory: Path, config: Mapping[str, Any], eot: bool) -> list[MetadataEntry]:
    """The SentencePiece vocabulary as llama.cpp writes it for Gemma (``eot``: the EOT id of
    ``<end_of_turn>``, Gemma 1) and Gemma 2."""
    entries = sentencepiece_vocab(directory, config)
    apply_added_tokens(directory, entries, looks_special_too=True, spaces=True)
    entries = [entry for entry in entries if entry.key != Keys.Tokenizer.ADD_PREFIX]
    entries.append(boolean(Keys.Tokenizer.ADD_PREFIX, False))
    tokens = metadata_entry(entries, Keys.Tokenizer.LIST).value
    if eot and metadata_entry(entries, Keys.Tokenizer.EOT_ID) is None and "<end_of_turn>" in tokens:
        entries.append(u32(Keys.Tokenizer.EOT_ID, tokens.index("<end_of_turn>")))
    return entries


def vocab(directory: Path, config: Mapping[str, Any]) -> list[MetadataEntry]:
    return gemma_vocab(directory, config, eot=True)

