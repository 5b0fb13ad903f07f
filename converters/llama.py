"""LLaMA 1/2/3 (3.1, 3.2), Mistral and their fine-tunes: HF names and config -> GGUF.

Q and K rows are permuted the way llama.cpp's converter does: HF stores each head's
rotary pairs as (first half, second half) of the head ("rotate_half"); ggml's
"normal" RoPE rotates adjacent pairs (2i, 2i+1). Interleaving the two halves makes the
two conventions compute the same thing, and makes our files interchangeable with
llama.cpp's.

``decoder_plan`` is the pre-norm decoder that Qwen2 and Qwen3 (converters/qwen2.py, qwen3.py)
share: they keep HF's rotate_half layout (ggml's "neox" RoPE) and add q/k/v biases or per-head
q/k norms.

Also handled, as llama.cpp's converter does:
- ``head_dim`` that is not hidden_size / heads (Mistral-Nemo): ``attention.key_length`` and
  ``value_length``;
- tied embeddings (Llama 3.2 1B/3B): no ``output.weight``;
- RoPE scaling: ``linear`` (``rope.scaling.type/factor``) and Llama 3.1's ``llama3``, whose
  per-frequency factors are written as the ``rope_freqs.weight`` tensor;
- Mistral's ``sliding_window``: ``attention.sliding_window`` (llama.cpp's ``llama`` graph ignores
  it; halfbyte applies it, as transformers does, once the context is longer than the window).
"""

from __future__ import annotations

import math
import sys
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
    f32,
    string,
    tensor_name,
    u32,
)
from converters.vocab import hf_bpe_vocab, sentencepiece_vocab

ARCH = "llama"
HF_ARCHITECTURES = ("LlamaForCausalLM", "LLaMAForCausalLM", "MistralForCausalLM")
MODEL_TYPES = ("llama", "mistral")


def permute_for_rope(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Interleave each head's two rotary halves: HF rotate_half layout -> ggml adjacent pairs."""
    n_out = weight.shape[0]
    return (
        weight.reshape(n_head, 2, n_out // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def llama3_rope_factors(head_dim: int, theta: float, factor: float, low_freq_factor: float,
                        high_freq_factor: float, original_context: float) -> np.ndarray:
    """Llama 3.1's frequency-dependent RoPE scaling as per-pair divisors of the frequencies
    (``rope_freqs.weight``), computed as llama.cpp's converter does, in float32: wavelengths
    shorter than ``original_context / high_freq_factor`` keep their frequency (1), longer than
    ``original_context / low_freq_factor`` are slowed by ``factor``, and those between are
    interpolated smoothly."""
    f = np.float32
    freqs = f(1.0) / (f(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32) / f(head_dim)))
    low_wavelen = original_context / low_freq_factor
    high_wavelen = original_context / high_freq_factor
    factors = np.empty(freqs.size, np.float32)
    for i, freq in enumerate(freqs):
        wavelen = f(2 * math.pi) / freq
        if wavelen < f(high_wavelen):
            factors[i] = 1.0
        elif wavelen > f(low_wavelen):
            factors[i] = factor
        else:
            smooth = (f(original_context) / wavelen - f(low_freq_factor)) / (f(high_freq_factor) - f(low_freq_factor))
            factors[i] = f(1.0) / ((f(1.0) - smooth) / f(factor) + smooth)
    return factors


def rope_metadata(cfg: ConfigReader, arch: str, head_dim: int, n_ctx: int) -> tuple[list[MetadataEntry],
                                                                                      list[PlannedTensor]]:
    """``rope.freq_base`` and the scaling keys, plus ``rope_freqs.weight`` for ``llama3`` scaling."""
    theta, kind, scaling = cfg.rope_scaling()
    metadata = [f32(Keys.Rope.FREQ_BASE.format(arch=arch), theta)]
    tensors: list[PlannedTensor] = []
    where = f"{scaling.prefix or 'rope_scaling.'}rope_type"
    if kind == "linear":
        factor = scaling.float_value("factor", default=1.0, positive=True)
        metadata.append(string(Keys.Rope.SCALING_TYPE.format(arch=arch), "linear"))
        metadata.append(f32(Keys.Rope.SCALING_FACTOR.format(arch=arch), factor))
    elif kind == "llama3":
        factor = scaling.float_value("factor", default=8.0, positive=True)
        low = scaling.float_value("low_freq_factor", default=1.0, positive=True)
        high = scaling.float_value("high_freq_factor", default=4.0, positive=True)
        original = scaling.float_value("original_max_position_embeddings", default=8192, positive=True)
        if high <= low:
            raise cfg.fail(f"{scaling.prefix}high_freq_factor {high:g} must be greater than low_freq_factor {low:g}")
        factors = llama3_rope_factors(head_dim, theta, factor, low, high, original)
        tensors.append(PlannedTensor(tensor_name(MODEL_TENSOR.ROPE_FREQS), f"<{where} llama3>", (head_dim // 2,),
                                     generate=lambda: factors))
    elif kind == "yarn":  # as llama.cpp's converter: the factor, the original context, the optional knobs
        factor = scaling.float_value("factor", default=1.0, positive=True)
        if not scaling.has("factor"):
            raise cfg.fail(f"{scaling.prefix or 'rope_scaling.'}factor is required for yarn")
        original = scaling.int_value("original_max_position_embeddings", default=n_ctx, minimum=1)
        metadata += [string(Keys.Rope.SCALING_TYPE.format(arch=arch), "yarn"),
                     f32(Keys.Rope.SCALING_FACTOR.format(arch=arch), factor),
                     u32(Keys.Rope.SCALING_ORIG_CTX_LEN.format(arch=arch), original)]
        for key, gguf_key in (("extrapolation_factor", Keys.Rope.SCALING_YARN_EXT_FACTOR),
                              ("beta_fast", Keys.Rope.SCALING_YARN_BETA_FAST),
                              ("beta_slow", Keys.Rope.SCALING_YARN_BETA_SLOW)):
            if scaling.has(key):
                metadata.append(f32(gguf_key.format(arch=arch), scaling.float_value(key, default=0.0, minimum=0.0)))
        if scaling.has("attention_factor", "mscale", "mscale_all_dim"):
            # llama.cpp sets YaRN's magnitude from the factor alone; a file could not say otherwise.
            raise cfg.fail(f"{scaling.prefix or 'rope_scaling.'}attention_factor / mscale with yarn is not "
                           "supported (llama.cpp derives the magnitude from the factor)")
    elif kind == "dynamic":
        # Dynamic NTK changes nothing within the training context and has no GGUF key: llama.cpp's
        # converter writes no scaling for it either.
        print(f"halfbyte: warning: {where} 'dynamic' (NTK) is written without scaling, as llama.cpp does: "
              "it only matters past the training context", file=sys.stderr)
    elif kind is not None:
        raise cfg.fail(f"{where} {kind!r} is not supported (supported: linear, llama3, yarn, dynamic)")
    return metadata, tensors


def decoder_plan(config: Mapping[str, Any], config_path: Path, names: set[str], arch: str, *,
                 permute: bool, qkv_bias: bool = False, qk_norm: bool = False) -> ConversionPlan:
    """The plan of a LLaMA-style pre-norm decoder (RMSNorm, RoPE, GQA, SwiGLU) named as in
    transformers' ``LlamaForCausalLM``: ``permute`` turns rotate_half rows into ggml's adjacent
    pairs (``llama``); without it the file uses the neox rotation (``qwen2``, ``qwen3``)."""
    cfg = ConfigReader(config, config_path)
    n_embd = cfg.require_int("hidden_size")
    n_layer = cfg.require_int("num_hidden_layers", maximum=MAX_LAYERS)
    cfg.check_layers("num_hidden_layers", n_layer, names, "model.layers.")
    n_head = cfg.require_int("num_attention_heads", maximum=n_embd)
    n_head_kv = cfg.int_value("num_key_value_heads", default=n_head, minimum=1, maximum=n_head)
    n_ff = cfg.require_int("intermediate_size")
    n_vocab = cfg.require_int("vocab_size", maximum=MAX_VOCAB)
    explicit_head_dim = cfg.has("head_dim")
    if not explicit_head_dim and n_embd % n_head:
        raise cfg.fail(f"hidden_size {n_embd} is not a multiple of num_attention_heads {n_head} (and no head_dim)")
    head_dim = cfg.int_value("head_dim", default=n_embd // n_head, minimum=2, maximum=MAX_DIM)
    n_ctx = cfg.int_value("max_position_embeddings", "max_sequence_length", default=2048, minimum=1)
    if n_head % n_head_kv:
        raise cfg.fail(f"num_attention_heads {n_head} is not a multiple of num_key_value_heads {n_head_kv}")
    if head_dim % 2:
        raise cfg.fail(f"head_dim {head_dim} must be even (rotary pairs)")
    if head_dim * n_head > MAX_DIM:
        raise cfg.fail(f"head_dim {head_dim} x {n_head} heads is too large")

    metadata = [
        u32(Keys.LLM.VOCAB_SIZE.format(arch=arch), n_vocab),
        u32(Keys.LLM.CONTEXT_LENGTH.format(arch=arch), n_ctx),
        u32(Keys.LLM.EMBEDDING_LENGTH.format(arch=arch), n_embd),
        u32(Keys.LLM.BLOCK_COUNT.format(arch=arch), n_layer),
        u32(Keys.LLM.FEED_FORWARD_LENGTH.format(arch=arch), n_ff),
        u32(Keys.Attention.HEAD_COUNT.format(arch=arch), n_head),
        u32(Keys.Attention.HEAD_COUNT_KV.format(arch=arch), n_head_kv),
        f32(Keys.Attention.LAYERNORM_RMS_EPS.format(arch=arch),
            cfg.float_value("rms_norm_eps", default=1e-6, positive=True)),
        u32(Keys.Rope.DIMENSION_COUNT.format(arch=arch), head_dim),
    ]
    if explicit_head_dim:  # as llama.cpp's converter: written whenever config.json states it
        metadata.append(u32(Keys.Attention.KEY_LENGTH.format(arch=arch), head_dim))
        metadata.append(u32(Keys.Attention.VALUE_LENGTH.format(arch=arch), head_dim))
    rope_entries, extra_tensors = rope_metadata(cfg, arch, head_dim, n_ctx)
    metadata += rope_entries
    window = cfg.int_value("sliding_window", default=0, minimum=0)
    if window and cfg.bool_value("use_sliding_window", default=True):
        if "use_sliding_window" in config:  # Qwen2's per-layer windows (max_window_layers)
            raise cfg.fail("use_sliding_window = true is not supported (Qwen2's per-layer sliding windows)")
        metadata.append(u32(Keys.Attention.SLIDING_WINDOW.format(arch=arch), window))

    def q_permute(w: np.ndarray) -> np.ndarray:
        return permute_for_rope(w, n_head)

    def k_permute(w: np.ndarray) -> np.ndarray:
        return permute_for_rope(w, n_head_kv)

    n_q = head_dim * n_head
    n_kv = head_dim * n_head_kv
    tensors = [PlannedTensor(tensor_name(MODEL_TENSOR.TOKEN_EMBD), "model.embed_tokens.weight", (n_vocab, n_embd))]
    tensors += extra_tensors
    for i in range(n_layer):
        hf = f"model.layers.{i}"
        attn = f"{hf}.self_attn"

        def name(kind: MODEL_TENSOR, suffix: str = "weight", block: int = i) -> str:
            return tensor_name(kind, suffix, block=block)

        tensors += [
            PlannedTensor(name(MODEL_TENSOR.ATTN_NORM), f"{hf}.input_layernorm.weight", (n_embd,)),
            PlannedTensor(name(MODEL_TENSOR.ATTN_Q), f"{attn}.q_proj.weight", (n_q, n_embd),
                          q_permute if permute else None),
            PlannedTensor(name(MODEL_TENSOR.ATTN_K), f"{attn}.k_proj.weight", (n_kv, n_embd),
                          k_permute if permute else None),
            PlannedTensor(name(MODEL_TENSOR.ATTN_V), f"{attn}.v_proj.weight", (n_kv, n_embd)),
        ]
        if qkv_bias:
            tensors += [
                PlannedTensor(name(MODEL_TENSOR.ATTN_Q, "bias"), f"{attn}.q_proj.bias", (n_q,),
                              q_permute if permute else None),
                PlannedTensor(name(MODEL_TENSOR.ATTN_K, "bias"), f"{attn}.k_proj.bias", (n_kv,),
                              k_permute if permute else None),
                PlannedTensor(name(MODEL_TENSOR.ATTN_V, "bias"), f"{attn}.v_proj.bias", (n_kv,)),
            ]
        if qk_norm:
            tensors += [
                PlannedTensor(name(MODEL_TENSOR.ATTN_Q_NORM), f"{attn}.q_norm.weight", (head_dim,)),
                PlannedTensor(name(MODEL_TENSOR.ATTN_K_NORM), f"{attn}.k_norm.weight", (head_dim,)),
            ]
        tensors += [
            PlannedTensor(name(MODEL_TENSOR.ATTN_OUT), f"{attn}.o_proj.weight", (n_embd, n_q)),
            PlannedTensor(name(MODEL_TENSOR.FFN_NORM), f"{hf}.post_attention_layernorm.weight", (n_embd,)),
            PlannedTensor(name(MODEL_TENSOR.FFN_GATE), f"{hf}.mlp.gate_proj.weight", (n_ff, n_embd)),
            PlannedTensor(name(MODEL_TENSOR.FFN_DOWN), f"{hf}.mlp.down_proj.weight", (n_embd, n_ff)),
            PlannedTensor(name(MODEL_TENSOR.FFN_UP), f"{hf}.mlp.up_proj.weight", (n_ff, n_embd)),
        ]
    tensors.append(PlannedTensor(tensor_name(MODEL_TENSOR.OUTPUT_NORM), "model.norm.weight", (n_embd,)))
    # Tied embeddings: no lm_head in the checkpoint; llama.cpp then reuses token_embd.
    tied = cfg.bool_value("tie_word_embeddings", default=False)
    if "lm_head.weight" in names and not tied:
        tensors.append(PlannedTensor(tensor_name(MODEL_TENSOR.OUTPUT), "lm_head.weight", (n_vocab, n_embd)))

    def ignored(name: str) -> bool:
        return name.endswith("rotary_emb.inv_freq") or name == "lm_head.weight"

    return ConversionPlan(arch, metadata, tensors, ignored)


def plan(config: Mapping[str, Any], config_path: Path, names: set[str]) -> ConversionPlan:
    return decoder_plan(config, config_path, names, ARCH, permute=True)


def vocab(directory: Path, config: Mapping[str, Any]) -> list:
    """SentencePiece ``tokenizer.model`` (LLaMA 1/2, Mistral v0.x) when present, else the
    byte-level BPE ``tokenizer.json`` (Llama 3)."""
    if (directory / "tokenizer.model").is_file() or not (directory / "tokenizer.json").is_file():
        return sentencepiece_vocab(directory, config)
    return hf_bpe_vocab(directory, config, "LLaMA")
