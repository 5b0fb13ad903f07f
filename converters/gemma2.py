"""Gemma 2 (``Gemma2ForCausalLM``) -> GGUF ``gemma2``: Gemma's plan (converters/gemma.py) with a
norm after the attention and after the MLP (``post_attention_norm``, ``post_ffw_norm``; the pre-MLP
norm is ``ffn_norm``), and the keys llama.cpp's converter writes:

- ``gemma2.attn_logit_softcapping`` and ``gemma2.final_logit_softcapping`` (50 and 30 on every
  released model); ``null`` in config.json (no capping in transformers) is refused: llama.cpp's
  ``gemma2`` graph always caps, with those defaults when the keys are missing;
- ``gemma2.attention.sliding_window``: the window of the sliding layers. llama.cpp makes every
  even layer (0, 2, ...) a sliding one, as transformers' default ``layer_types``; other
  ``layer_types`` are written as ``attention.sliding_window_pattern`` (one bool per layer), which
  llama.cpp reads too.

The query scale is not written: llama.cpp derives it from the shape, 1/sqrt(n_embd / n_head) for the
46-layer model (Gemma 2 27B) and 1/sqrt(head_dim) otherwise. transformers scales by
``query_pre_attn_scalar ** -0.5``, so a config whose scalar is not that value is refused rather
than written into a file llama.cpp would run differently.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gguf import GGUFValueType, Keys

from converters.base import ConfigReader, ConversionPlan, MetadataEntry, f32, u32
from converters.gemma import TANH_GELU, check_activation, explicit_null, gemma_plan, gemma_vocab

ARCH = "gemma2"
HF_ARCHITECTURES = ("Gemma2ForCausalLM",)
MODEL_TYPES = ("gemma2",)
LAYER_TYPES = ("sliding_attention", "full_attention")


def query_scalar(n_embd: int, n_layer: int, n_head: int, head_dim: int) -> int:
    """The ``query_pre_attn_scalar`` llama.cpp's ``gemma2`` graph assumes (its f_attention_scale)."""
    return n_embd // n_head if n_layer == 46 else head_dim


def sliding_layers(n_layer: int) -> list[bool]:
    """llama.cpp's default pattern for gemma2 (set_swa_pattern(2)): every even layer slides."""
    return [i % 2 == 0 for i in range(n_layer)]


def _metadata(cfg: ConfigReader, n_embd: int, n_layer: int, n_head: int, head_dim: int) -> list[MetadataEntry]:
    expected = query_scalar(n_embd, n_layer, n_head, head_dim)
    scalar = cfg.float_value("query_pre_attn_scalar", default=256.0, positive=True)
    if scalar != expected:
        raise cfg.fail(f"query_pre_attn_scalar {scalar:g} is not supported: llama.cpp's gemma2 scales queries by "
                       f"1/sqrt({expected}) for this shape ({n_layer} layers, head_dim {head_dim}, "
                       f"hidden_size / heads {n_embd // n_head})")
    explicit_null(cfg, "attn_logit_softcapping", "no attention soft-capping")
    explicit_null(cfg, "final_logit_softcapping", "no final soft-capping")
    explicit_null(cfg, "sliding_window", "no sliding window")
    metadata = [
        f32(Keys.LLM.ATTN_LOGIT_SOFTCAPPING.format(arch=ARCH),
            cfg.float_value("attn_logit_softcapping", default=50.0, positive=True)),
        f32(Keys.LLM.FINAL_LOGIT_SOFTCAPPING.format(arch=ARCH),
            cfg.float_value("final_logit_softcapping", default=30.0, positive=True)),
        u32(Keys.Attention.SLIDING_WINDOW.format(arch=ARCH), cfg.int_value("sliding_window", default=4096, minimum=1)),
    ]
    layer_types = cfg.config.get("layer_types")
    if layer_types is not None:
        if (not isinstance(layer_types, list) or len(layer_types) != n_layer
                or any(kind not in LAYER_TYPES for kind in layer_types)):
            raise cfg.fail(f"'layer_types' must list {n_layer} of {', '.join(LAYER_TYPES)}, got "
                           f"{str(layer_types)[:80]}")
        sliding = [kind == "sliding_attention" for kind in layer_types]
        if sliding != sliding_layers(n_layer):
            metadata.append(MetadataEntry(Keys.Attention.SLIDING_WINDOW_PATTERN.format(arch=ARCH), sliding,
                                          GGUFValueType.ARRAY, GGUFValueType.BOOL))
    return metadata


def plan(config: Mapping[str, Any], config_path: Path, names: set[str]) -> ConversionPlan:
    # transformers 5's Gemma 2 reads hidden_activation (its exact "gelu" is not llama.cpp's GELU).
    check_activation(ConfigReader(config, config_path), ("hidden_activation",), TANH_GELU)
    return gemma_plan(config, config_path, names, ARCH, extra_metadata=_metadata, post_norms=True)


def vocab(directory: Path, config: Mapping[str, Any]) -> list[MetadataEntry]:
    return gemma_vocab(directory, config, eot=False)
