"""PEFT LoRA adapters: merged into a base checkpoint at convert time, or written as llama.cpp's
LoRA GGUF (``general.type = "adapter"``) for run-time application.

An adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` (or
``adapter_model.bin``, read through the same restricted unpickler as checkpoints). Its tensors are
named after the base model's modules, prefixed ``base_model.model.``:

- ``<module>.lora_A.weight`` (r, n_in) and ``<module>.lora_B.weight`` (n_out, r): the update of
  ``<module>.weight`` is ``scaling * B @ A`` (transposed with ``fan_in_fan_out``), where
  ``scaling = alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``) and ``r`` / ``alpha`` come
  from ``rank_pattern`` / ``alpha_pattern`` when a pattern matches the module (as PEFT's
  ``get_pattern_key``);
- ``<module>.lora_embedding_A`` (r, n_vocab) and ``lora_embedding_B`` (n_embd, r): an embedding's
  update ``scaling * (B @ A)^T``;
- any other tensor (``modules_to_save``, trained biases) replaces the base tensor of that name.

Tensors are read one at a time, when the base tensor they modify is converted: merging costs one
adapter pair, as float32, on top of the base tensor.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from converters.base import ConfigReader, ConversionPlan, describe_value, read_json
from engine.errors import HalfbyteError, file_error

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
PREFIX = "base_model.model."
MAX_RANK = 1 << 16


@dataclass
class LoraPair:
    """One adapted base tensor: its A and B tensor names in the adapter file and its scaling."""

    target: str  # the base checkpoint tensor, e.g. model.layers.0.self_attn.q_proj.weight
    a: str
    b: str
    rank: int
    alpha: float
    scaling: float
    embedding: bool = False


@dataclass
class Adapter:
    """An opened PEFT LoRA adapter directory (use as a context manager, or ``close()``)."""

    directory: Path
    weights: Path
    checkpoint: Any
    alpha: float
    fan_in_fan_out: bool
    scale: float = 1.0  # the user's multiplier (--lora-scale)
    pairs: dict[str, LoraPair] = field(default_factory=dict)  # by target
    replaced: dict[str, str] = field(default_factory=dict)  # target -> adapter tensor

    def close(self) -> None:
        self.checkpoint.close()

    def __enter__(self) -> Adapter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def delta(self, target: str, shape: tuple[int, ...]) -> np.ndarray | None:
        """``scale * scaling * B @ A`` in the base tensor's (checkpoint) layout, float32."""
        pair = self.pairs.get(target)
        if pair is None:
            return None
        a, b = self.checkpoint.load(pair.a), self.checkpoint.load(pair.b)
        update = b @ a
        if pair.embedding or self.fan_in_fan_out:
            update = update.T
        update *= np.float32(self.scale * pair.scaling)
        if update.shape != shape:  # checked by check_against, kept as a guard
            raise file_error(self.weights, f"update of {target!r} has shape {update.shape}, the base tensor {shape}")
        return update


def _match_pattern(patterns: dict[str, Any], module: str) -> Any:
    """PEFT's get_pattern_key: the first key matching the end of the module name."""
    for key, value in patterns.items():
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return value
        except re.error:
            continue
    return None


def _targeted(target_modules: Any, module: str) -> bool:
    if target_modules is None or target_modules == "all-linear":
        return True
    if isinstance(target_modules, str):
        try:
            return re.fullmatch(target_modules, module) is not None
        except re.error:
            return False
    return module in target_modules or any(module.endswith(f".{name}") for name in target_modules)


def _open_weights(directory: Path) -> tuple[Path, Any]:
    from converters.checkpoint import Checkpoint, _index_safetensors, _index_torch_zip

    for name in WEIGHT_FILES:
        path = directory / name
        if path.is_file():
            sources: list = []
            try:
                if name.endswith(".safetensors"):
                    locations = _index_safetensors(path, sources)
                else:
                    locations = _index_torch_zip(path, sources)
            except BaseException:
                for source in sources:
                    source.close()
                raise
            return path, Checkpoint(directory, locations, sources)
    raise file_error(directory, f"no adapter weights ({' or '.join(WEIGHT_FILES)})")


def open_adapter(directory: str | Path, scale: float = 1.0) -> Adapter:
    """Read and check a PEFT LoRA adapter directory (its config and tensor headers)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise file_error(directory, "not a directory (a PEFT adapter is a directory with adapter_config.json)"
                         if directory.exists() else "no such adapter directory")
    config_path = directory / CONFIG_FILE
    try:
        config = read_json(config_path, "JSON")
    except FileNotFoundError:
        raise file_error(config_path, "missing (a PEFT adapter directory has an adapter_config.json)") from None
    cfg = ConfigReader(config, config_path)
    peft_type = cfg.str_value("peft_type", default="LORA")
    if peft_type != "LORA":
        raise file_error(config_path, f"peft_type {peft_type!r} is not supported (only LORA adapters)")
    if cfg.bool_value("use_dora", default=False):
        raise file_error(config_path, "DoRA adapters (use_dora) are not supported")
    rank = cfg.int_value("r", default=8, minimum=0, maximum=MAX_RANK)
    if rank == 0:
        raise file_error(config_path, "'r' is 0: a LoRA rank must be at least 1")
    alpha = cfg.float_value("lora_alpha", default=8.0)
    rslora = cfg.bool_value("use_rslora", default=False)
    fan_in_fan_out = cfg.bool_value("fan_in_fan_out", default=False)
    patterns = {}
    for key in ("rank_pattern", "alpha_pattern"):
        value = config.get(key) or {}
        if not isinstance(value, dict) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value.values()):
            raise file_error(config_path, f"{key!r} must be an object of numbers, got {describe_value(value)}")
        patterns[key] = value
    target_modules = config.get("target_modules")
    if target_modules is not None and not isinstance(target_modules, str) and not (
            isinstance(target_modules, list) and all(isinstance(t, str) for t in target_modules)):
        raise file_error(config_path, f"'target_modules' must be a string or a list of strings, got "
                                      f"{describe_value(target_modules)}")
    if isinstance(target_modules, str) and target_modules != "all-linear":
        try:
            re.compile(target_modules)
        except re.error as exc:
            raise file_error(config_path, f"'target_modules' is not a valid regular expression: {exc}") from None
    try:
        scale = float(scale)
    except (TypeError, ValueError):
        raise HalfbyteError(f"LoRA scale must be a number, got {describe_value(scale)}") from None
    if not math.isfinite(scale):
        raise HalfbyteError(f"LoRA scale must be finite, got {scale}")

    weights, checkpoint = _open_weights(directory)
    adapter = Adapter(directory, weights, checkpoint, alpha, fan_in_fan_out, scale)
    try:
        _index_pairs(adapter, config_path, rank, alpha, rslora, patterns, target_modules)
    except BaseException:
        checkpoint.close()
        raise
    return adapter


def _index_pairs(adapter: Adapter, config_path: Path, rank: int, alpha: float, rslora: bool,
                 patterns: dict[str, dict], target_modules: Any) -> None:
    path = adapter.weights
    halves: dict[str, dict[str, str]] = {}
    for name in adapter.checkpoint.names():
        key = name[len(PREFIX):] if name.startswith(PREFIX) else name
        found = re.fullmatch(r"(.+)\.(lora_A|lora_B)(\.[^.]+)?\.weight|(.+)\.(lora_embedding_A|lora_embedding_B)"
                             r"(\.[^.]+)?", key)
        if "lora_magnitude_vector" in key:
            raise file_error(path, f"tensor {name!r}: DoRA adapters are not supported")
        if found is None:
            if ".lora_" in key:
                raise file_error(path, f"tensor {name!r} is not a LoRA A/B weight this converter knows")
            adapter.replaced[key.replace(".modules_to_save", "")] = name
            continue
        module = found.group(1) or found.group(4)
        half = found.group(2) or found.group(5)
        halves.setdefault(module, {})[half[-1]] = name
        halves[module]["embedding"] = "embedding" if found.group(4) else ""
    for module, parts in halves.items():
        if "A" not in parts or "B" not in parts:
            missing = "lora_B" if "A" in parts else "lora_A"
            raise file_error(path, f"module {module!r} has no {missing} tensor")
        if not _targeted(target_modules, module):
            raise file_error(path, f"module {module!r} has LoRA tensors but is not in target_modules of "
                                   f"{config_path.name}")
        a, b = adapter.checkpoint.info(parts["A"]), adapter.checkpoint.info(parts["B"])
        if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1]:
            raise file_error(path, f"module {module!r}: lora_A {a.shape} and lora_B {b.shape} do not form a "
                                   "rank-r product")
        r = a.shape[0]
        expected = _match_pattern(patterns["rank_pattern"], module)
        expected = rank if expected is None else int(expected)
        if r == 0 or r != expected:
            raise file_error(path, f"module {module!r} has rank {r}, {config_path.name} says {expected}")
        module_alpha = _match_pattern(patterns["alpha_pattern"], module)
        module_alpha = alpha if module_alpha is None else float(module_alpha)
        scaling = module_alpha / (math.sqrt(r) if rslora else r)
        target = f"{module}.weight"
        adapter.pairs[target] = LoraPair(target, parts["A"], parts["B"], r, module_alpha, scaling,
                                         embedding=bool(parts["embedding"]))


def check_against(adapter: Adapter, plan: ConversionPlan, checkpoint: Any) -> None:
    """Every tensor the adapter changes is a tensor of the base that is converted, with the shape
    the update has; otherwise one error naming both."""
    shapes: dict[str, tuple[int, ...]] = {}
    for planned in plan.tensors:
        if planned.generate is None and not planned.parts:
            shapes[planned.source] = planned.source_shape or planned.shape
    base = checkpoint.directory
    for target, pair in adapter.pairs.items():
        shape = shapes.get(target)
        if shape is None:
            raise file_error(adapter.weights, f"adapts {target!r}, which base model {base} does not have "
                                              "(or does not convert)")
        a, b = adapter.checkpoint.info(pair.a).shape, adapter.checkpoint.info(pair.b).shape
        update = (b[0], a[1])
        if pair.embedding or adapter.fan_in_fan_out:
            update = update[::-1]
        if len(shape) != 2 or tuple(shape) != update:
            raise file_error(adapter.weights, f"LoRA update of {target!r} has shape {update}, base model {base} "
                                              f"has {tuple(shape)}")
    for target, name in adapter.replaced.items():
        shape = shapes.get(target)
        if shape is None:
            raise file_error(adapter.weights, f"tensor {name!r} replaces {target!r}, which base model {base} "
                                              "does not have (or does not convert)")
        own = adapter.checkpoint.info(name).shape
        if tuple(own) != tuple(shape):
            raise file_error(adapter.weights, f"tensor {name!r} has shape {tuple(own)}, base model {base}'s "
                                              f"{target!r} has {tuple(shape)}")


def merge(adapters: Sequence[Adapter], source: str, array: np.ndarray) -> np.ndarray:
    """The base tensor ``source`` (float32, checkpoint layout) with every adapter applied in order."""
    for adapter in adapters:
        replacement = adapter.replaced.get(source)
        if replacement is not None:
            array = adapter.checkpoint.load(replacement)
        update = adapter.delta(source, tuple(array.shape))
        if update is not None:
            array = np.asarray(array, dtype=np.float32)
            if not array.flags.writeable:
                array = array.copy()
            array += update
    return array


def input_files(adapter_dirs: Sequence[str | Path]) -> list[Path]:
    return [Path(d) / name for d in adapter_dirs for name in (CONFIG_FILE, *WEIGHT_FILES)]


# --------------------------------------------------------------------------------------------
# llama.cpp's LoRA GGUF


def row_permutation(planned: Any, n_out: int) -> np.ndarray | None:
    """The row order the plan's transform gives a (n_out, n_in) weight (the Q/K RoPE permutation),
    as an index array; None when there is no transform. A transform that is not a permutation of
    rows (a transpose) cannot be carried by B alone: an error."""
    if planned.transform is None:
        return None
    probe = np.arange(n_out, dtype=np.float32).reshape(n_out, 1)
    try:
        moved = np.asarray(planned.transform(probe))
    except (ValueError, IndexError):
        moved = None
    if moved is None or moved.shape != (n_out, 1):
        raise HalfbyteError(f"{planned.name}: this tensor's conversion is not a row permutation; a LoRA adapter "
                            "GGUF cannot carry it (merge the adapter with convert --lora instead)")
    order = moved.reshape(-1).astype(np.int64)
    if not np.array_equal(np.sort(order), np.arange(n_out)):
        raise HalfbyteError(f"{planned.name}: conversion is not a row permutation")
    return order


def write_adapter_gguf(adapter: Adapter, plan: ConversionPlan, checkpoint: Any, output: Path, ftype: Any,
                       model_name: str) -> Path:
    """llama.cpp's LoRA GGUF: ``<gguf name>.lora_a`` (r, n_in) and ``.lora_b`` (n_out, r), B's rows
    in the order the base conversion gives the weight's rows; ``adapter.lora.alpha``. llama.cpp
    scales by ``alpha / r`` with ``r`` from each B; a module whose scaling differs (rsLoRA,
    rank_pattern / alpha_pattern, the --lora-scale multiplier) has its B scaled to make up for it."""
    from gguf import GGMLQuantizationType, GGUFValueType, Keys

    from engine.gguf_file import GGUFWriter

    if adapter.replaced:
        first = next(iter(adapter.replaced.values()))
        raise file_error(adapter.weights, f"tensor {first!r} (modules_to_save or a bias) cannot be stored in a LoRA "
                                          "adapter GGUF; merge the adapter with convert --lora instead")
    if adapter.fan_in_fan_out:
        raise file_error(adapter.directory / CONFIG_FILE, "fan_in_fan_out adapters cannot be written as a LoRA GGUF; "
                                                          "merge them with convert --lora instead")
    by_source = {p.source: p for p in plan.tensors if p.generate is None and not p.parts}
    items = []
    for target, pair in adapter.pairs.items():
        if pair.embedding:
            raise file_error(adapter.weights, f"{target!r}: LoRA on embeddings cannot be written as a LoRA GGUF "
                                              "here; merge it with convert --lora instead")
        planned = by_source[target]
        if planned.source_shape is not None:
            raise HalfbyteError(f"{planned.name}: this tensor is re-laid out by the conversion; merge the adapter "
                                "with convert --lora instead")
        items.append((planned, pair, row_permutation(planned, planned.shape[0])))
    items.sort(key=lambda item: [p.name for p in plan.tensors].index(item[0].name))
    alpha = float(adapter.alpha)
    out_type = GGMLQuantizationType.F16 if ftype == GGMLQuantizationType.F16 else GGMLQuantizationType.F32
    np_type = np.float16 if out_type == GGMLQuantizationType.F16 else np.float32
    with GGUFWriter(output) as writer:
        writer.add_string(Keys.General.ARCHITECTURE, plan.arch)
        writer.add_string(Keys.General.TYPE, "adapter")
        writer.add_string(Keys.General.NAME, model_name)
        writer.add_string(Keys.Adapter.TYPE, "lora")
        writer.add(Keys.Adapter.LORA_ALPHA, alpha, GGUFValueType.FLOAT32)
        for planned, pair, _ in items:
            writer.add_tensor_info(planned.name + ".lora_a", (pair.rank, planned.shape[1]), out_type)
            writer.add_tensor_info(planned.name + ".lora_b", (planned.shape[0], pair.rank), out_type)
        writer.write_header()
        for planned, pair, order in items:
            a = adapter.checkpoint.load(pair.a)
            b = adapter.checkpoint.load(pair.b)
            implied = alpha / pair.rank if alpha else 1.0
            wanted = adapter.scale * pair.scaling
            if wanted != implied:
                b = b * np.float32(wanted / implied) if implied else b * np.float32(0.0)
            if order is not None:
                b = b[order]
            writer.write_tensor(planned.name + ".lora_a", [np.ascontiguousarray(a, dtype=np_type)])
            writer.write_tensor(planned.name + ".lora_b", [np.ascontiguousarray(b, dtype=np_type)])
        writer.finish()
    return output
