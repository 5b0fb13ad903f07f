"""The output types halfbyte writes, and how their names map onto ggml/GGUF numbers."""

from __future__ import annotations

from gguf import GGMLQuantizationType, LlamaFileType

from engine.errors import HalfbyteError

# Types a user can ask `convert` / `quantize` for, by the names llama.cpp uses.
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


def parse_output_type(name: str) -> GGMLQuantizationType:
    """``"q4_0"``/``"Q4_0"`` -> the ggml type; unknown names list the supported ones."""
    try:
        return OUTPUT_TYPES[name.lower()]
    except KeyError:
        raise HalfbyteError(
            f"unknown output type {name!r} (supported: {', '.join(OUTPUT_TYPES)})"
        ) from None


def file_type_name(file_type: int) -> str:
    """``2`` -> ``"MOSTLY_Q4_0"``; unknown numbers are shown as numbers."""
    try:
        return LlamaFileType(file_type).name
    except ValueError:
        return str(file_type)
