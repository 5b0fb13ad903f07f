"""The output types halfbyte writes, and how their names map onto ggml/GGUF numbers."""

from __future__ import annotations

from gguf import GGMLQuantizationType, LlamaFileType

from engine import quant_recipes
from engine.errors import HalfbyteError

QT = GGMLQuantizationType

# Types a user can ask `convert` for, by the names llama.cpp uses.
OUTPUT_TYPES: dict[str, GGMLQuantizationType] = {
    "f32": GGMLQuantizationType.F32,
    "f16": GGMLQuantizationType.F16,
    "q8_0": GGMLQuantizationType.Q8_0,
    "q5_1": GGMLQuantizationType.Q5_1,
    "q5_0": GGMLQuantizationType.Q5_0,
    "q4_1": GGMLQuantizationType.Q4_1,
    "q4_0": GGMLQuantizationType.Q4_0,
}

# `general.file_type`: the "mostly" type of a file (1-D tensors stay F32).
FILE_TYPES: dict[GGMLQuantizationType, LlamaFileType] = {
    GGMLQuantizationType.F32: LlamaFileType.ALL_F32,
    GGMLQuantizationType.F16: LlamaFileType.MOSTLY_F16,
    GGMLQuantizationType.BF16: LlamaFileType.MOSTLY_BF16,
    GGMLQuantizationType.Q8_0: LlamaFileType.MOSTLY_Q8_0,
    GGMLQuantizationType.Q5_1: LlamaFileType.MOSTLY_Q5_1,
    GGMLQuantizationType.Q5_0: LlamaFileType.MOSTLY_Q5_0,
    GGMLQuantizationType.Q4_1: LlamaFileType.MOSTLY_Q4_1,
    GGMLQuantizationType.Q4_0: LlamaFileType.MOSTLY_Q4_0,
}

# `halfbyte quantize` TYPE: llama-quantize's mixes (engine.quant_recipes) and the float types,
# name -> (general.file_type llama.cpp writes, the mix's default tensor type).
QUANTIZE_MIXES: dict[str, tuple[int, GGMLQuantizationType]] = {
    **quant_recipes.MIXES, "f16": (1, QT.F16), "bf16": (32, QT.BF16), "f32": (0, QT.F32),
}
# ggml types halfbyte writes (for --output-tensor-type / --token-embedding-type), by ggml's names.
WRITABLE_TYPES: dict[str, GGMLQuantizationType] = {
    t.name.lower(): t for t in (QT.F32, QT.F16, QT.BF16, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0, QT.Q2_K,
                                QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.IQ4_NL, QT.IQ4_XS)
}


def parse_output_type(name: str) -> GGMLQuantizationType:
    """``"q4_0"``/``"Q4_0"`` -> the ggml type; unknown names list the supported ones."""
    try:
        return OUTPUT_TYPES[name.lower()]
    except KeyError:
        raise HalfbyteError(
            f"unknown output type {name!r} (supported: {', '.join(OUTPUT_TYPES)})"
        ) from None


def parse_quantize_mix(name: str) -> str:
    """``"Q4_K_M"`` -> ``"q4_k_m"`` (a key of QUANTIZE_MIXES); unknown names list the supported ones."""
    key = name.lower()
    if key not in QUANTIZE_MIXES:
        raise HalfbyteError(f"unknown output type {name!r} (supported: {', '.join(QUANTIZE_MIXES)})")
    return key


def parse_ggml_type(name: str) -> GGMLQuantizationType:
    """A ggml type name halfbyte writes (``"q6_k"``, ``"Q8_0"``, ``"f16"``) -> the type."""
    try:
        return WRITABLE_TYPES[name.lower()]
    except KeyError:
        raise HalfbyteError(f"unknown ggml type {name!r} (supported: {', '.join(WRITABLE_TYPES)})") from None


def file_type_name(file_type: int) -> str:
    """``2`` -> ``"MOSTLY_Q4_0"``; unknown numbers are shown as numbers."""
    try:
        return LlamaFileType(file_type).name
    except ValueError:
        return str(file_type)
