"""`halfbyte convert`: a Hugging Face checkpoint -> one GGUF file, in one streaming pass.

Memory stays bounded by the largest tensor (as float32) plus the quantized copy of one
chunk: tensors are read one at a time straight from the checkpoint files, transformed
(row permutations), quantized and appended to the output, which is renamed into place
only when complete.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, Keys

from converters import falcon, gemma, gemma2, gpt2, gptneox, llama, mpt, phi3, qwen2, qwen3, stablelm
from converters.base import ConfigReader, ConversionPlan, PlannedTensor, read_json
from converters.lora import merge as lora_merge
from converters.vocab import TOKENIZER_FILES, check_vocab_fits
from engine import quants
from engine.errors import HalfbyteError, file_error
from engine.filetypes import FILE_TYPES, QUANTIZE_MIXES
from engine.gguf_file import GGUFWriter, refuse_overwriting_inputs
from engine.progress import progress_bar

ARCHITECTURES: tuple[ModuleType, ...] = (llama, mpt, falcon, qwen2, qwen3, gptneox, gpt2, stablelm, phi3, gemma,
                                         gemma2)
QUANTIZATION_VERSION = 2  # ggml's current block layouts (general.quantization_version)
CHUNK_ROWS_ELEMENTS = 1 << 22


def read_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    if not path.is_file():
        raise file_error(path, "missing (a Hugging Face checkpoint directory has a config.json)")
    try:
        config = read_json(path, "JSON")
    except FileNotFoundError:
        raise file_error(path, "missing (a Hugging Face checkpoint directory has a config.json)") from None
    if not isinstance(config, dict):
        raise file_error(path, "expected a JSON object")
    return config


def supported_names() -> str:
    return ", ".join(name for module in ARCHITECTURES for name in module.HF_ARCHITECTURES)


def pick_architecture(config: dict[str, Any], config_path: Path) -> ModuleType:
    """The architecture module for a config: by `architectures`, else by `model_type`."""
    cfg = ConfigReader(config, config_path)
    declared = cfg.str_list("architectures")
    model_type = cfg.str_value("model_type")
    for module in ARCHITECTURES:
        if any(name in module.HF_ARCHITECTURES for name in declared):
            return module
    for module in ARCHITECTURES:
        if model_type in module.MODEL_TYPES:
            return module
    what = declared[0] if declared else model_type or "<none>"
    raise file_error(config_path, f"unsupported architecture {what!r} (supported: {supported_names()})")


def input_files(directory: Path) -> list[Path]:
    """Every file of the checkpoint that conversion may read: config, tokenizer files, weights
    (an index and its shards). The output must not be any of them."""
    from converters.checkpoint import pick_weight_layout, read_index

    files = [directory / "config.json", *(directory / name for name in TOKENIZER_FILES)]
    try:
        entries = [entry.name for entry in directory.iterdir() if entry.is_file()]
    except OSError:
        return files
    layout = pick_weight_layout(entries)
    if layout is not None:
        files += [directory / name for name in layout.files]
        if layout.index is not None:
            files.append(directory / layout.index)
            try:
                files += [directory / shard for shard in sorted(set(read_index(directory / layout.index).values()))]
            except HalfbyteError:
                pass  # a bad index is reported when the checkpoint is opened; nothing is written before
    return files


def output_type(planned: PlannedTensor, requested: GGMLQuantizationType) -> GGMLQuantizationType:
    """1-D tensors (norms, biases) and norm weights of any shape (StableLM's per-head q/k norms)
    stay F32, as in llama.cpp; rows that do not split into blocks fall back to F16."""
    if len(planned.shape) < 2 or planned.name.endswith("_norm.weight"):
        return GGMLQuantizationType.F32
    if planned.shape[-1] % quants.block_size(requested):
        return GGMLQuantizationType.F16
    return requested


def encode_rows(array: np.ndarray, ggml_type: GGMLQuantizationType) -> Iterator[np.ndarray]:
    """Yield the stored bytes of a float32 tensor, converted a chunk of rows at a time."""
    if ggml_type == GGMLQuantizationType.F32:
        yield np.ascontiguousarray(array, dtype=np.float32)
        return
    rows = array.reshape(-1, array.shape[-1])
    per_chunk = max(1, CHUNK_ROWS_ELEMENTS // rows.shape[1])
    for start in range(0, rows.shape[0], per_chunk):
        chunk = rows[start : start + per_chunk]
        if ggml_type == GGMLQuantizationType.F16:
            yield chunk.astype(np.float16)
        else:
            yield quants.quantize(np.ascontiguousarray(chunk), ggml_type)


def check_plan(plan: ConversionPlan, checkpoint: Any, config_path: Path) -> None:
    """Every planned tensor exists with the shape the config implies; warn about leftovers."""
    available = set(checkpoint.names())
    for planned in plan.tensors:
        if planned.generate is not None:
            continue
        for source, expected in planned.sources():
            if source not in available:
                raise file_error(config_path.parent, f"checkpoint has no tensor {source!r} (required by config.json)")
            meta = checkpoint.info(source)
            if tuple(meta.shape) != expected:
                raise file_error(
                    meta.file, f"tensor {source!r} has shape {tuple(meta.shape)}, config.json implies {expected}"
                )
    used = {source for p in plan.tensors for source, _ in p.sources()}
    leftovers = [n for n in checkpoint.names() if n not in used and not plan.ignored(n)]
    if leftovers:
        more = f" and {len(leftovers) - 3} more" if len(leftovers) > 3 else ""
        print(f"halfbyte: warning: ignoring checkpoint tensors {', '.join(leftovers[:3])}{more}", file=sys.stderr)


def default_output_name(model_name: str, requested: GGMLQuantizationType | str, vocab_only: bool) -> str:
    suffix = "vocab" if vocab_only else requested if isinstance(requested, str) else requested.name.lower()
    return f"{model_name}-{suffix}.gguf"


def mix_types(plan: ConversionPlan, mix: str) -> dict[str, GGMLQuantizationType]:
    """Per-tensor types of llama-quantize's ``mix`` (e.g. ``"q4_k_m"``) for the converted tensors:
    exactly what ``convert --f32`` then ``halfbyte quantize ... mix`` (or llama-quantize) gives."""
    from types import SimpleNamespace

    from engine.requantize import plan_types

    as_f32 = {p.name: SimpleNamespace(name=p.name, shape=tuple(p.shape),
                                      ggml_type=output_type(p, GGMLQuantizationType.F32)) for p in plan.tensors}
    metadata = {"general.architecture": plan.arch, **{entry.key: entry.value for entry in plan.metadata}}
    return plan_types(SimpleNamespace(tensors=as_f32, metadata=metadata), mix)


def convert_directory(
    directory: Path,
    output: Path,
    requested: GGMLQuantizationType | str,
    model_name: str,
    vocab_only: bool = False,
    progress: bool = True,
    lora: Sequence[tuple[str | os.PathLike, float]] = (),
) -> Path:
    """Convert a local checkpoint directory to ``output``; returns the written path. ``lora``:
    PEFT adapter directories with their scales, merged into the weights (converters/lora.py)."""
    from converters import lora as lora_module
    from converters.checkpoint import open_checkpoint

    config = read_config(directory)
    config_path = directory / "config.json"
    refuse_overwriting_inputs(output, input_files(directory) + lora_module.input_files([d for d, _ in lora]))
    module = pick_architecture(config, config_path)

    checkpoint = None if vocab_only else open_checkpoint(directory)
    adapters: list = []
    try:
        if vocab_only and lora:
            raise HalfbyteError("--lora needs the weights (not --vocab-only)")
        for adapter_dir, scale in lora:
            adapters.append(lora_module.open_adapter(adapter_dir, scale))
        names = set(checkpoint.names()) if checkpoint is not None else set()
        # The plan first: it validates config.json (and, with weights, checks every size against the
        # checkpoint) before the tokenizer is padded to vocab_size.
        plan = module.plan(config, config_path, names)
        if checkpoint is not None:
            check_plan(plan, checkpoint, config_path)
        for adapter in adapters:
            lora_module.check_against(adapter, plan, checkpoint)
        vocab_entries = module.vocab(directory, config)
        vocab_rows = next(p.shape[0] for p in plan.tensors if p.name.startswith("token_embd."))
        check_vocab_fits(vocab_entries, vocab_rows, config_path)
        return _write(plan, vocab_entries, checkpoint, output, requested, model_name, vocab_only, progress,
                      adapters)
    finally:
        for adapter in adapters:
            adapter.close()
        if checkpoint is not None:
            checkpoint.close()


def _write(
    plan: ConversionPlan, vocab_entries: list, checkpoint: Any, output: Path,
    requested: GGMLQuantizationType | str, model_name: str, vocab_only: bool, progress: bool,
    adapters: Sequence = (),
) -> Path:
    if isinstance(requested, str):  # a llama-quantize mix (K-quants, IQ4): per-tensor types
        types = {} if vocab_only else mix_types(plan, requested)
        tensors = [(p, types[p.name]) for p in plan.tensors] if not vocab_only else []
        file_type = QUANTIZE_MIXES[requested][0]
    else:
        tensors = [] if vocab_only else [(p, output_type(p, requested)) for p in plan.tensors]
        file_type = int(FILE_TYPES[requested])
    with GGUFWriter(output) as writer:  # inputs were checked by convert_directory
        writer.add_string(Keys.General.ARCHITECTURE, plan.arch)
        writer.add_string(Keys.General.NAME, model_name)
        writer.add_uint32(Keys.General.FILE_TYPE, file_type)
        writer.add_uint32(Keys.General.QUANTIZATION_VERSION, QUANTIZATION_VERSION)
        for entry in [*plan.metadata, *vocab_entries]:
            writer.add(entry.key, entry.value, entry.value_type, entry.elem_type)
        for planned, ggml_type in tensors:
            writer.add_tensor_info(planned.name, planned.shape, ggml_type)
        try:
            writer.write_header()
            total = sum(int(np.prod(p.shape)) * 4 for p, _ in tensors)
            with progress_bar(total, f"convert {output.name}", progress) as bar:
                for planned, ggml_type in tensors:
                    bar.set_postfix_str(planned.name, refresh=False)
                    if planned.generate is not None:
                        array = np.asarray(planned.generate(), np.float32).reshape(planned.shape)
                    elif planned.parts:
                        array = np.stack([checkpoint.load(part) for part in planned.parts])
                    else:
                        array = checkpoint.load(planned.source)
                        if adapters:  # merged in float32, in the checkpoint's layout, before any transform
                            array = lora_merge(adapters, planned.source, array)
                    if planned.transform is not None:
                        array = planned.transform(array)
                    writer.write_tensor(planned.name, encode_rows(array, ggml_type))
                    del array
                    bar.update(int(np.prod(planned.shape)) * 4)
            writer.finish()
        except OSError as exc:
            if exc.errno == 28:  # ENOSPC
                raise file_error(output, "no space left on device") from None
            raise file_error(exc.filename or output, f"cannot write: {exc.strerror or exc}") from None
    return output


def convert(
    source: str,
    output: str | os.PathLike | None,
    requested: GGMLQuantizationType | str,
    revision: str | None = None,
    vocab_only: bool = False,
    progress: bool = True,
    lora: Sequence[tuple[str | os.PathLike, float]] = (),
    base: str | None = None,
) -> Path:
    """`halfbyte convert SOURCE`: alias, repo id or local directory -> GGUF file.

    ``requested``: one ggml type for every weight matrix (F32, F16, Q8_0 ... Q4_0), or the name of
    one of llama-quantize's mixes (``"q4_k_m"``, ``"q6_k"``, ``"iq4_xs"``...): its type per tensor.

    ``lora``: (PEFT adapter directory, scale) pairs merged into the weights. ``base``: SOURCE is
    then a PEFT adapter directory, written as llama.cpp's LoRA adapter GGUF for that base model."""
    from converters.sources import resolve_source

    if base is not None:
        if lora or vocab_only:
            raise HalfbyteError("--base (an adapter GGUF) does not go with --lora or --vocab-only")
        return convert_adapter(source, base, output, requested, revision=revision, progress=progress)
    directory = resolve_source(source, revision=revision, progress=progress)
    model_name = Path(source.rstrip("/")).name if Path(source).is_dir() else source.rstrip("/").split("/")[-1]
    target = Path(output) if output is not None else Path.cwd() / default_output_name(model_name, requested, vocab_only)
    if target.is_dir():
        raise file_error(target, "is a directory (give a file name with -o)")
    if not target.parent.is_dir():
        raise file_error(target.parent, "output directory does not exist")
    try:
        return convert_directory(directory, target, requested, model_name, vocab_only, progress, lora)
    except MemoryError:
        raise HalfbyteError(f"{directory}: out of memory while converting") from None


def convert_adapter(adapter_dir: str | os.PathLike, base: str, output: str | os.PathLike | None,
                    requested: GGMLQuantizationType, scale: float = 1.0, revision: str | None = None,
                    progress: bool = True) -> Path:
    """`halfbyte convert ADAPTER --base BASE`: a PEFT LoRA adapter -> llama.cpp's LoRA GGUF
    (F16 when F16 is requested, else F32), checked against the base checkpoint's tensors."""
    from converters import lora as lora_module
    from converters.checkpoint import open_checkpoint
    from converters.sources import resolve_source

    directory = resolve_source(base, revision=revision, progress=progress)
    adapter_path = Path(adapter_dir)
    ftype = GGMLQuantizationType.F16 if requested == GGMLQuantizationType.F16 else GGMLQuantizationType.F32
    name = adapter_path.resolve().name
    target = Path(output) if output is not None else Path.cwd() / f"{name}-lora-{ftype.name.lower()}.gguf"
    if target.is_dir():
        raise file_error(target, "is a directory (give a file name with -o)")
    if not target.parent.is_dir():
        raise file_error(target.parent, "output directory does not exist")
    refuse_overwriting_inputs(target, input_files(directory) + lora_module.input_files([adapter_path]))
    config = read_config(directory)
    config_path = directory / "config.json"
    module = pick_architecture(config, config_path)
    with open_checkpoint(directory) as checkpoint, lora_module.open_adapter(adapter_path, scale) as adapter:
        plan = module.plan(config, config_path, set(checkpoint.names()))
        check_plan(plan, checkpoint, config_path)
        lora_module.check_against(adapter, plan, checkpoint)
        try:
            return lora_module.write_adapter_gguf(adapter, plan, checkpoint, target, ftype, name)
        except OSError as exc:
            raise file_error(exc.filename or target, f"cannot write: {exc.strerror or exc}") from None
