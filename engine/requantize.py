"""`halfbyte quantize`: quantize the tensors of a GGUF file, as llama-quantize does.

TYPE is one of llama-quantize's mixes (q4_0 ... q8_0, q2_k, q3_k_s/m/l, q4_k_s/m, q5_k_s/m, q6_k,
iq4_nl, iq4_xs) or a float type (f16, bf16, f32). Every tensor gets the type llama-quantize gives it
(``engine.quant_recipes``: its per-tensor rules for the mix, from the tensor's name, shape and layer
and the model's head counts; ``pure`` is llama-quantize's ``--pure``: the mix's default type for every
quantized tensor, still falling back where a row does not split into its blocks), and the bytes are
llama-quantize's too (halfbyte's quantizers are byte-identical to ggml's reference quantizers, which
llama-quantize runs without an importance matrix). Tensors llama-quantize never quantizes (1-D
tensors, norms, names not ending in ``weight``, integer tensors) are copied as they are.

``output_tensor_type`` / ``token_embedding_type`` are ``--output-tensor-type`` /
``--token-embedding-type``: that type for output.weight / token_embd.weight whatever the mix says
(when the model ties its embeddings, token_embd.weight takes the output type as with llama-quantize).

``imatrix`` is ``--imatrix`` (``engine.imatrix``): tensors the importance matrix has an entry for are
quantized with its per-column weights (``engine.kernels.kquant_imatrix``: llama-quantize --imatrix's bytes
for the K-quants, IQ4_NL/IQ4_XS and Q4_0..Q5_1; Q8_0 and the float types ignore them, as ggml does), the
others as without one; two ffn_down type rules change (``_imatrix_rules``) and the quantize.imatrix.* keys
are added, as llama-quantize does.

Tensors already quantized to another type than their target are refused unless
``allow_requantize`` (``--allow-requantize``): then they are dequantized and quantized again.
Metadata is kept with its exact types and order; ``general.file_type`` is set to llama.cpp's number
for the mix and ``general.quantization_version`` to 2, as llama-quantize writes them. Tensors are
converted in row chunks, so memory stays bounded by one chunk whatever the model size.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Sequence

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from engine import quant_recipes, quants
from engine.errors import HalfbyteError, file_error
from engine.filetypes import QUANTIZE_MIXES
from engine.gguf_file import GGUFFile, GGUFWriter, TensorInfo, refuse_overwriting_inputs
from engine.kernels import dequant_any
from engine.progress import progress_bar

QT = GGMLQuantizationType
FLOAT_TYPES = (QT.F32, QT.F16, QT.BF16)
INTEGER_TYPES = tuple(getattr(QT, name) for name in ("I8", "I16", "I32", "I64", "F64")
                      if hasattr(QT, name))  # copied as they are
CHUNK_ELEMENTS = 1 << 22  # ~16 MiB of float32 per chunk
QUANTIZATION_VERSION = 2  # ggml's GGML_QNT_VERSION, written by llama-quantize

# a type -> the mix whose default it is (old callers pass a ggml type)
_MIX_OF_TYPE = {QT.F32: "f32", QT.F16: "f16", QT.BF16: "bf16", QT.Q4_0: "q4_0", QT.Q4_1: "q4_1",
                QT.Q5_0: "q5_0", QT.Q5_1: "q5_1", QT.Q8_0: "q8_0"}
# llama-quantize's fallback where a row does not split into a type's blocks (then F16)
_FALLBACK = {QT.IQ4_XS: QT.IQ4_NL, QT.Q2_K: QT.Q4_0, QT.Q3_K: QT.Q4_0, QT.Q4_K: QT.Q5_0, QT.Q5_K: QT.Q5_1,
             QT.Q6_K: QT.Q8_0}


def to_float32(array: np.ndarray, ggml_type: GGMLQuantizationType) -> np.ndarray:
    """Widen an F32/F16/BF16 view (BF16 as uint16 bits) to a float32 array."""
    if ggml_type == QT.BF16:
        return (array.astype(np.uint32) << 16).view(np.float32)
    return np.asarray(array, dtype=np.float32)


def is_quantized(ggml_type: GGMLQuantizationType) -> bool:
    return ggml_type not in FLOAT_TYPES and ggml_type not in INTEGER_TYPES


def fallback(qtype: GGMLQuantizationType, ncols: int) -> GGMLQuantizationType:
    """``qtype``, or what llama-quantize uses instead when rows of ``ncols`` do not split into its blocks."""
    if ncols % GGML_QUANT_SIZES[qtype][0] == 0:
        return qtype
    qtype = _FALLBACK.get(qtype, qtype)
    return qtype if ncols % GGML_QUANT_SIZES[qtype][0] == 0 else QT.F16


def _hparam(src: GGUFFile, key: str, default: int) -> int:
    arch = src.metadata.get("general.architecture", "llama")
    value = src.metadata.get(f"{arch}.{key}", default)
    if isinstance(value, (list, tuple, np.ndarray)):  # per-layer values: llama.cpp's n_gqa() uses layer 0
        value = value[0] if len(value) else default
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def plan_types(
    src: GGUFFile, mix: str, *, pure: bool = False, output_tensor_type: GGMLQuantizationType | None = None,
    token_embedding_type: GGMLQuantizationType | None = None, imatrix: bool = False,
) -> dict[str, GGMLQuantizationType]:
    """The type of every tensor of ``src`` after ``halfbyte quantize ... mix`` (llama-quantize's choice;
    ``imatrix``: with an importance matrix, which changes two ffn_down rules, ``_imatrix_rules``)."""
    _, default = QUANTIZE_MIXES[mix]
    infos = list(src.tensors.values())
    arch = str(src.metadata.get("general.architecture", "llama"))
    n_head = _hparam(src, "attention.head_count", 1)
    hparams = dict(n_head=n_head, n_head_kv=_hparam(src, "attention.head_count_kv", n_head),
                   n_expert=_hparam(src, "expert_count", 0), arch=arch)
    n_layer = _hparam(src, "block_count", 0)
    quantizable = {i.name for i in infos
                   if i.ggml_type not in INTEGER_TYPES and quant_recipes.allows_quantization(i.name, i.shape)}
    recipe: dict[str, GGMLQuantizationType] = {}
    if default not in FLOAT_TYPES and not pure:
        try:
            recipe = quant_recipes.tensor_types([(i.name, i.shape) for i in infos if i.name in quantizable], mix,
                                                n_layer, **hparams)
        except ValueError as exc:  # e.g. an expert tensor without a layer number
            raise HalfbyteError(str(exc)) from None
        if imatrix:
            _imatrix_rules(recipe, {i.name: int(i.shape[-1]) for i in infos}, mix, n_layer, hparams["n_expert"])
    tied = "output.weight" not in src.tensors
    types = {}
    for info in infos:
        if info.name not in quantizable:
            types[info.name] = info.ggml_type
            continue
        ncols = int(info.shape[-1])
        category = quant_recipes._category(info.name)
        if token_embedding_type is not None and category == "token_embd":
            new = token_embedding_type
        elif output_tensor_type is not None and category == "output":
            new = output_tensor_type
        elif default in FLOAT_TYPES:
            new = default
        elif pure:
            new = fallback(default, ncols)
        elif output_tensor_type is not None and tied and category == "token_embd":
            new = fallback(output_tensor_type, ncols)  # the tied embedding takes the output's type
        else:
            new = recipe[info.name]
        if ncols % GGML_QUANT_SIZES[new][0]:
            raise HalfbyteError(f"tensor {info.name!r}: rows of {ncols} do not split into {new.name} blocks "
                                f"of {GGML_QUANT_SIZES[new][0]}")
        types[info.name] = new
    return types


def _imatrix_rules(recipe: dict[str, GGMLQuantizationType], ncols: dict[str, int], mix: str, n_layer: int,
                   n_expert: int) -> None:
    """llama_tensor_get_type's rules that look at the importance matrix, for our mixes: ffn_down of the
    first n_layer / 8 layers (counted as llama-quantize counts them) is Q5_K in iq4_nl / iq4_xs only
    WITHOUT one (with one: the mix's type), and Q4_1 / Q5_1 in q4_0 / q5_0 only WITH one."""
    if mix not in ("iq4_nl", "iq4_xs", "q4_0", "q5_0"):
        return
    _, default = QUANTIZE_MIXES[mix]
    new = {"q4_0": QT.Q4_1, "q5_0": QT.Q5_1}.get(mix, default)
    i_ffn_down = 0
    for name in sorted(recipe, key=llama_order):
        if quant_recipes._category(name) != "ffn_down":
            continue
        layer = quant_recipes._layer_of(name)
        i = (layer if layer is not None else -1) if n_expert > 1 else i_ffn_down
        i_ffn_down += 1
        if i < n_layer // 8:
            recipe[name] = fallback(new, ncols[name])


def to_float_rows(rows: np.ndarray, source: GGMLQuantizationType) -> np.ndarray:
    """float32 values of ``rows`` (one ggml row each) stored as ``source``."""
    if source in FLOAT_TYPES:
        return to_float32(rows, source)
    return dequant_any.dequantize_rows(rows, source)


def convert_rows(
    rows: np.ndarray, source: GGMLQuantizationType, target: GGMLQuantizationType,
    weights: np.ndarray | None = None, rows_per_mat: int | None = None,
) -> Iterator[np.ndarray]:
    """Yield the bytes of ``rows`` (a 2-D view, one ggml row each) converted chunk by chunk; ``weights``:
    importance weights ``(n_mat, n)``, ``rows_per_mat`` rows each (llama-quantize --imatrix's bytes,
    engine.kernels.kquant_imatrix; types ggml quantizes without weights, e.g. Q8_0, ignore them)."""
    from engine.kernels import kquant_imatrix
    from engine.model import check_interrupt

    if source == target:
        yield rows
        return
    if target not in kquant_imatrix.TYPES:
        weights = None
    row_elements = rows.shape[-1] if source in FLOAT_TYPES else rows.shape[-1] // quants.type_bytes(source) * \
        quants.block_size(source)
    per_chunk = max(1, CHUNK_ELEMENTS // max(1, row_elements))
    for start in range(0, rows.shape[0], per_chunk):
        check_interrupt()
        floats = to_float_rows(rows[start : start + per_chunk], source)
        if weights is None:
            yield quants.quantize(floats, target)
        else:
            yield kquant_imatrix.quantize(floats, target, weights, first_row=start,
                                          rows_per_mat=rows_per_mat or rows.shape[0])


def llama_order(name: str) -> tuple[int, str]:
    """llama-quantize writes tensors sorted by layer (``blk.N.``; others first), then by name."""
    match = re.match(r"blk\.(-?\d+)", name)
    return (int(match.group(1)) if match else -1, name)


def _plan(src: GGUFFile, mix: str, allow_requantize: bool,
          **options) -> list[tuple[TensorInfo, GGMLQuantizationType]]:
    types = plan_types(src, mix, **options)
    plan = []
    for info in sorted(src.tensors.values(), key=lambda i: llama_order(i.name)):
        new_type = types[info.name]
        if new_type != info.ggml_type and is_quantized(info.ggml_type):
            if not allow_requantize:
                raise file_error(
                    src.path, f"tensor {info.name!r} is already quantized ({info.ggml_type.name}); "
                    f"re-quantizing it to {new_type.name} loses quality: pass --allow-requantize to do it anyway"
                )
            if not dequant_any.can_dequantize(info.ggml_type):
                raise file_error(src.path, f"tensor {info.name!r}: cannot dequantize {info.ggml_type.name}")
        plan.append((info, new_type))
    return plan


def quantize_gguf(
    src_path: str | os.PathLike, dst_path: str | os.PathLike, requested: str | GGMLQuantizationType,
    progress: bool = True, allow_requantize: bool = False, *, pure: bool = False,
    output_tensor_type: GGMLQuantizationType | None = None,
    token_embedding_type: GGMLQuantizationType | None = None,
    imatrix: str | os.PathLike | None = None, include_weights: Sequence[str] = (),
    exclude_weights: Sequence[str] = (), report: Callable[[str], None] | None = None,
) -> None:
    """Write ``dst_path``: ``src_path`` quantized to mix ``requested`` (a key of
    ``engine.filetypes.QUANTIZE_MIXES``, e.g. ``"q4_k_m"``, or a float/legacy ggml type) as
    llama-quantize would; tensors already quantized to another type need ``allow_requantize``
    (else a HalfbyteError names one). Options: see the module doc.

    ``imatrix``: an importance matrix file (GGUF or legacy .dat, engine.imatrix), as llama-quantize's
    ``--imatrix``: the same bytes, its two imatrix-dependent type rules, its quantize.imatrix.* keys;
    ``include_weights`` / ``exclude_weights``: its ``--include-weights`` / ``--exclude-weights`` (entries
    whose name contains one of these strings); ``report``: called with a line about tensors the
    imatrix has no entry for (quantized without weights)."""
    from engine.model import deferred_interrupts

    mix = _MIX_OF_TYPE.get(requested) if isinstance(requested, QT) else str(requested).lower()
    if mix not in QUANTIZE_MIXES:
        raise HalfbyteError(f"unknown output type {requested!r} (supported: {', '.join(QUANTIZE_MIXES)})")
    # Same file through any path, symlink or hard link: refused before anything is opened.
    refuse_overwriting_inputs(dst_path, [src_path] + ([imatrix] if imatrix is not None else []))
    weights, extra_keys = _load_imatrix(imatrix, include_weights, exclude_weights)
    with GGUFFile(src_path) as src:
        plan = _plan(src, mix, allow_requantize, pure=pure, output_tensor_type=output_tensor_type,
                     token_embedding_type=token_embedding_type, imatrix=weights is not None)
        per_tensor = {}
        if weights is not None:
            from engine.imatrix import tensor_weights

            per_tensor = tensor_weights(plan, weights, os.fspath(imatrix), os.fspath(src_path), src.tensors, report)
        with GGUFWriter(dst_path, alignment=src.alignment, inputs=[src_path]) as out:
            # llama-quantize's order: the input's keys, then these two (moved to the end if present), then
            # with an imatrix its quantize.imatrix.* keys (likewise)
            out.copy_metadata(src, skip=("general.quantization_version", "general.file_type",
                                         *(key for key, _, _ in extra_keys)))
            out.add("general.quantization_version", QUANTIZATION_VERSION, GGUFValueType.UINT32)
            out.add("general.file_type", QUANTIZE_MIXES[mix][0], GGUFValueType.UINT32)
            for key, value, value_type in extra_keys:
                out.add(key, value, value_type)
            for info, new_type in plan:
                out.add_tensor_info(info.name, info.shape, new_type)
            total = sum(info.nbytes for info, _ in plan)
            try:
                with deferred_interrupts(), \
                        progress_bar(total, f"quantize {os.path.basename(dst_path)}", progress) as bar:
                    for info, new_type in plan:
                        if info.ggml_type == new_type:
                            out.write_tensor(info.name, src.tensor_bytes(info.name))
                        else:
                            array = src.tensor_array(info.name)
                            rows = array.reshape(-1, array.shape[-1]) if array.ndim else array.reshape(1, -1)
                            importance, rows_per_mat = per_tensor.get(info.name, (None, None))
                            out.write_tensor(info.name, convert_rows(rows, info.ggml_type, new_type, importance,
                                                                     rows_per_mat))
                        bar.update(info.nbytes)
                out.finish()
            except OSError as exc:
                raise file_error(dst_path, f"cannot write: {exc.strerror or exc}") from None
            except HalfbyteError:
                raise


def _load_imatrix(path: str | os.PathLike | None, include: Sequence[str], exclude: Sequence[str],
                  ) -> tuple[dict[str, np.ndarray] | None, list]:
    """llama-quantize's imatrix weights by tensor name and the metadata keys it adds (None, [] without a
    file, or when --include-weights / --exclude-weights leave no entry: then no imatrix is used at all)."""
    if path is None:
        if include or exclude:
            raise HalfbyteError("--include-weights / --exclude-weights need --imatrix")
        return None, []
    from engine.imatrix import importance, quantize_metadata, read_imatrix

    loaded = read_imatrix(path)
    weights = importance(loaded, include, exclude, path=os.fspath(path))
    if not weights:
        return None, []
    return weights, quantize_metadata(loaded, weights, path)
