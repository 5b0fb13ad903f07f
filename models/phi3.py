"""Phi-3 (GGUF ``phi3``: Phi-3-mini/medium 4k): the shared pre-norm decoder (models/blocks.py) with
a fused ``attn_qkv`` ([q | k | v] rows), a fused ``ffn_up`` ([gate | up], 2 * n_ff rows, no
``ffn_gate``), neox RoPE on ``rope.dimension_count`` dims, and the sliding window of
``phi3.attention.sliding_window`` (transformers applies it; llama.cpp currently ignores it, which
only matters past the window, 2047 positions for Phi-3-mini-4k).

The 128k models' LongRoPE (``rope_factors_long`` / ``rope_factors_short``) is refused.
"""

from __future__ import annotations

from engine.errors import file_error
from engine.gguf_file import GGUFFile
from models.blocks import PreNormDecoder


class Phi3(PreNormDecoder):
    ARCH = "phi3"
    NEOX = True
    FUSED_GATE_UP = True

    def __init__(self, file: GGUFFile) -> None:
        for name in ("rope_factors_long.weight", "rope_factors_short.weight"):
            if name in file.tensors:
                raise file_error(file.path, f"tensor {name!r}: Phi-3's LongRoPE scaling (128k context models) "
                                            "is not supported")
        super().__init__(file)
