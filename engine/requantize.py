"""`halfbyte quantize`: quantize the tensors of a GGUF file, like llama-quantize.

Rules: tensors of two or more dimensions stored as F32/F16/BF16 become the target
type (F16 when their rows do not split into the target's blocks, as llama.cpp does);
1-D float tensors (norms, biases) are stored as F32; integer tensors are copied.
Tensors of two or more dimensions that are already quantized to another type are
refused unless ``allow_requantize`` (llama-quantize's ``--allow-requantize``): then they
are dequantized and quantized again. Metadata is kept with its exact types;
``general.file_type`` is set to the requested type's ``LlamaFileType`` (what llama.cpp
writes), which is then what the file holds. Tensors are converted in row chunks, so
memory stays bounded by one chunk whatever the model size.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType

from engine import quants
from engine.errors import HalfbyteError, file_error
from engine.filetypes import FILE_TYPES
from engine.gguf_file import GGUFFile, GGUFWriter, TensorInfo, refuse_overwriting_inputs
from engine.progress import progress_bar

FLOAT_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)
INTEGER_TYPES = tuple(getattr(GGMLQuantizationType, name) for name in ("I8", "I16", "I32", "I64", "F64")
                      if hasattr(GGMLQuantizationType, name))  # copied as they are
CHUNK_ELEMENTS = 1 << 22  # ~16 MiB of float32 per chunk


def to_float32(array: np.ndarray, ggml_type: GGMLQuantizationType) -> np.ndarray:
    """Widen an F32/F16/BF16 view (BF16 as uint16 bits) to a float32 array."""
    if ggml_type == GGMLQuantizationType.BF16:
        return (array.astype(np.uint32) << 16).view(np.float32)
    return np.asarray(array, dtype=np.float32)


def is_quantized(ggml_type: GGMLQuantizationType) -> bool:
    return ggml_type not in FLOAT_TYPES and ggml_type not in INTEGER_TYPES


def target_type(info: TensorInfo, requested: GGMLQuantizationType) -> GGMLQuantizationType:
    """What a tensor becomes when the file is quantized to ``requested`` (a quantized tensor of
    another type becomes ``requested`` too: that is a requantization, see ``quantize_gguf``)."""
    if info.ggml_type in INTEGER_TYPES:
        return info.ggml_type
    if len(info.shape) < 2:
        return GGMLQuantizationType.F32 if info.ggml_type in FLOAT_TYPES else info.ggml_type
    block_size = quants.block_size(requested)
    if info.shape[-1] % block_size:
        # llama.cpp falls back too: a row that does not split into blocks stays F16.
        return GGMLQuantizationType.F16
    return requested


def to_float_rows(rows: np.ndarray, source: GGMLQuantizationType) -> np.ndarray:
    """float32 values of ``rows`` (one ggml row each) stored as ``source``."""
    if source in FLOAT_TYPES:
        return to_float32(rows, source)
    return quants.dequantize(rows, source)


def convert_rows(
    rows: np.ndarray, source: GGMLQuantizationType, target: GGMLQuantizationType
) -> Iterator[np.ndarray]:
    """Yield the bytes of ``rows`` (a 2-D view, one ggml row each) converted chunk by chunk."""
    from engine.model import check_interrupt

    if source == target:
        yield rows
        return
    row_elements = rows.shape[-1] if source in FLOAT_TYPES else rows.shape[-1] // quants.type_bytes(source) * \
        quants.block_size(source)
    per_chunk = max(1, CHUNK_ELEMENTS // max(1, row_elements))
    for start in range(0, rows.shape[0], per_chunk):
        check_interrupt()
        floats = to_float_rows(rows[start : start + per_chunk], source)
        yield quants.quantize(floats, target)


def _plan(src: GGUFFile, requested: GGMLQuantizationType,
          allow_requantize: bool) -> list[tuple[TensorInfo, GGMLQuantizationType]]:
    plan = []
    for info in src.tensors.values():
        new_type = target_type(info, requested)
        if new_type != info.ggml_type and is_quantized(info.ggml_type):
            if not allow_requantize:
                raise file_error(
                    src.path, f"tensor {info.name!r} is already quantized ({info.ggml_type.name}); "
                    f"re-quantizing it to {new_type.name} loses quality: pass --allow-requantize to do it anyway"
                )
            if info.ggml_type not in quants.SUPPORTED_TYPES:
                raise file_error(src.path, f"tensor {info.name!r}: cannot dequantize {info.ggml_type.name}")
        plan.append((info, new_type))
    return plan


def quantize_gguf(
    src_path: str | os.PathLike, dst_path: str | os.PathLike, requested: GGMLQuantizationType,
    progress: bool = True, allow_requantize: bool = False,
) -> None:
    """Write ``dst_path``: ``src_path`` with its tensors quantized to ``requested``; tensors already
    quantized to another type need ``allow_requantize`` (else a HalfbyteError names one)."""
    from engine.model import deferred_interrupts

    # Same file through any path, symlink or hard link: refused before anything is opened.
    refuse_overwriting_inputs(dst_path, [src_path])
    with GGUFFile(src_path) as src:
        plan = _plan(src, requested, allow_requantize)
        with GGUFWriter(dst_path, alignment=src.alignment, inputs=[src_path]) as out:
            out.copy_metadata(src)
            # Overwrites the copied key in place, so the output keeps the input's key order.
            out.add("general.file_type", int(FILE_TYPES[requested]), GGUFValueType.UINT32)
            for info, new_type in plan:
                out.add_tensor_info(info.name, info.shape, new_type)
            total = sum(info.nbytes for info, _ in plan)
            try:
                with deferred_interrupts(), \
                        progress_bar(total, f"quantize {os.path.basename(dst_path)}", progress) as bar:
                    for info, new_type in plan:
                        array = src.tensor_array(info.name)
                        if info.ggml_type == new_type:
                            out.write_tensor(info.name, src.tensor_bytes(info.name))
                        else:
                            rows = array.reshape(-1, array.shape[-1]) if array.ndim else array.reshape(1, -1)
                            out.write_tensor(info.name, convert_rows(rows, info.ggml_type, new_type))
                        bar.update(info.nbytes)
                out.finish()
            except OSError as exc:
                raise file_error(dst_path, f"cannot write: {exc.strerror or exc}") from None
            except HalfbyteError:
                raise
