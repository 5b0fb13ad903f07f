"""Phi-3 (GGUF ``phi3``: Phi-3-mini/medium 4k): the shared pre-norm decoder (models/blocks.py) with
a fused ``attn_qkv`` ([q | k | v] rows), a fused ``ffn_up`` ([gate | up], 2 * n_ff rows, no
``ffn_gate``), neox RoPE on ``rope.dimension_count`` dims, and the sliding window of
``phi3.attention.sliding_window`` (transformers applies it; llama.cpp currently ignores it, which
only matters past the window, 2047 positions for Phi-3-mini-4k).

The 128k models' LongRoPE: ``rope_factors_short`` divide the frequencies, ``rope_factors_long``
when the context is longer than ``rope.scaling.original_context_length`` (as llama.cpp, which
decides by the context size; transformers decides by the length of the sequence so far, which
agrees while a sequence stays within the original context, and for a context longer than it once a
pass reaches past it), and ``rope.scaling.attn_factor`` scales the rotated dims.
"""

from __future__ import annotations

from models.blocks import PreNormDecoder


class Phi3(PreNormDecoder):
    ARCH = "phi3"
    NEOX = True
    FUSED_GATE_UP = True

