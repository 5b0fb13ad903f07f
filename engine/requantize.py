"""`halfbyte quantize`: re-quantize the float tensors of a GGUF file, like llama-quantize.

Rules: tensors of two or more dimensions stored as F32/F16/BF16 become the target
type; 1-D float tensors (norms, biases) are stored as F32; everything else (already
quantized tensors, integer tensors) is copied byte for byte. Metadata is kept with
its exact types; ``general.file_type`` is set to the target. Tensors are converted
in row chunks, so memory stays bounded by one chunk whatever the model size.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType

from engine import quants
from engine.errors import HalfbyteError, file_error
from engine.filetypes import FILE_TYPES
from engine.gguf_file import GGUFFile, GGUFWriter, TensorInfo
from engine.progress import progress_bar

FLOAT_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)
CHUNK_ELEMENTS = 1 << 22  # ~16 MiB of float32 per chunk


def to_float32(array: np.ndarray, ggml_type: GGMLQuantizationType) -> np.ndarray:
    """Widen an F32/F16/BF16 view (BF16 as uint16 bits) to a float32 array."""
    if ggml_type == GGMLQuantizationType.BF16:
        return (array.astype(np.uint32) << 16).view(np.float32)
    return np.asarray(array, dtype=np.float32)


def target_type(info: TensorInfo, requested: GGMLQuantizationType) -> GGMLQuantizationType:
    """What a tensor becomes when the file is quantized to ``requested``."""
    if info.ggml_type not in FLOAT_TYPES:
        return info.ggml_type
    if len(info.shape) < 2:
        return GGMLQuantizationType.F32
    block_size = quants.block_size(requested)
    if info.shape[-1] % block_size:
        # llama.cpp falls back too: a row that does not split into blocks stays F16.
        return GGMLQuantizationType.F16
    return requested


def convert_rows(
    rows: np.ndarray, source: GGMLQuantizationType, target: GGMLQuantizationType
) -> Iterator[np.ndarray]:
    """Yield the bytes of ``rows`` (a 2-D view, one ggml row each) converted chunk by chunk."""
    if source == target:
        yield rows
        return
    per_chunk = max(1, CHUNK_ELEMENTS // max(1, rows.shape[-1]))
    for start in range(0, rows.shape[0], per_chunk):
        floats = to_float32(rows[start : start + per_chunk], source)
        yield quants.quantize(floats, target)


def quantize_gguf(
    src_path: str | os.PathLike, dst_path: str | os.PathLike, requested: GGMLQuantizationType,
    progress: bool = True,
) -> None:
    """Write ``dst_path``: ``src_path`` with its float tensors quantized to ``requested``."""
    if os.path.abspath(src_path) == os.path.abspath(dst_path):
        raise file_error(dst_path, "output would overwrite the input")
    with GGUFFile(src_path) as src:
        plan = [(info, target_type(info, requested)) for info in src.tensors.values()]
        with GGUFWriter(dst_path, alignment=src.alignment) as out:
            out.copy_metadata(src)
            # Overwrites the copied key in place, so the output keeps the input's key order.
            out.add("general.file_type", int(FILE_TYPES[requested]), GGUFValueType.UINT32)
            for info, new_type in plan:
                out.add_tensor_info(info.name, info.shape, new_type)
            total = sum(info.nbytes for info, _ in plan)
            try:
                with progress_bar(total, f"quantize {os.path.basename(dst_path)}", progress) as bar:
                    for info, new_type in plan:
                        array = src.tensor_array(info.name)
                        if info.ggml_type == new_type:
                            out.write_tensor(info.name, src.tensor_bytes(info.name))
                        else:
                            rows = array.reshape(-1, info.shape[-1]) if info.shape else array.reshape(1, -1)
                            out.write_tensor(info.name, convert_rows(rows, info.ggml_type, new_type))
                        bar.update(info.nbytes)
                out.finish()
            except OSError as exc:
                raise file_error(dst_path, f"cannot write: {exc.strerror or exc}") from None
            except HalfbyteError:
                raise
