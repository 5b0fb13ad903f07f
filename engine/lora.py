"""Run-time LoRA adapters: llama.cpp's LoRA GGUF files applied on top of a (quantized) base.

An adapter GGUF (``general.type = "adapter"``, ``adapter.type = "lora"``, written by
``halfbyte convert ADAPTER --base BASE`` or llama.cpp's convert_lora_to_gguf.py) holds, for each
adapted weight ``W`` of the base, ``<name>.lora_a`` (r, n_in) and ``<name>.lora_b`` (n_out, r).
Nothing is merged: each adapted weight's products become ``x W^T + s (x A^T) B^T`` (two thin
float matmuls, ``engine.ops.linear``), with ``s = scale * alpha / r`` (``scale`` when
``adapter.lora.alpha`` is 0), as llama.cpp's ``llama_adapter_lora_weight::get_scale``.

Scales can change per evaluation without reloading, as llama-server's per-request ``lora`` field:
each adapted weight carries ``(A, B, alpha / r, adapter index, load-time scale)`` and
``ops.linear`` takes the adapter's scale from ``active_scales`` (set with ``scales_in_effect``
around a forward pass) or, outside one, the load-time scale.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import HalfbyteError, file_error
from engine.gguf_file import GGUFFile
from engine.weights import Weight

LoraSpec = tuple[str | os.PathLike, float]
_MAX_DEPTH = 4
# Scales of the adapters, by index, for the forward pass running in this context (None: load-time).
_active_scales: ContextVar[tuple[float, ...] | None] = ContextVar("halfbyte_lora_scales", default=None)


def active_scale(index: int, default: float) -> float:
    scales = _active_scales.get()
    return default if scales is None or index >= len(scales) else scales[index]


@contextmanager
def scales_in_effect(scales: Sequence[float] | None) -> Iterator[None]:
    """Run-time adapters at ``scales`` (one per adapter, in load order) inside the block."""
    token = _active_scales.set(None if scales is None else tuple(float(s) for s in scales))
    try:
        yield
    finally:
        _active_scales.reset(token)


def check_scale(scale: object, where: str) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.integer, np.floating)) \
            or not np.isfinite(scale):
        raise HalfbyteError(f"{where}: LoRA scale must be a finite number, got {scale!r}")
    return float(scale)


def _float_array(file: GGUFFile, name: str) -> np.ndarray:
    info = file.tensors[name]
    if len(info.ne) != 2:
        raise file_error(file.path, f"tensor {name!r} has shape {info.ne}, expected 2-D")
    return np.ascontiguousarray(Weight.from_file(file, name).dequantize(), dtype=np.float32)


def read_adapter(path: str | os.PathLike, base: GGUFFile) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """``{base tensor name: (A^T, B^T, alpha / r)}`` of a LoRA GGUF (1 where alpha is 0), as float32
    (n_in, r) and (r, n_out) arrays, checked
    against ``base``'s file: same architecture, every adapted tensor in the base with matching shapes."""
    file = GGUFFile(Path(path))
    try:
        meta = file.metadata
        kind, adapter_type = meta.get("general.type"), meta.get("adapter.type")
        if kind != "adapter" or adapter_type != "lora":
            raise file_error(file.path, f"not a LoRA adapter GGUF (general.type {kind!r}, adapter.type "
                                        f"{adapter_type!r}; expected 'adapter' and 'lora')")
        arch, base_arch = file.architecture, base.architecture
        if arch != base_arch:
            raise file_error(file.path, f"adapter is for architecture {arch!r}, base model {base.path} is "
                                        f"{base_arch!r}")
        alpha = meta.get("adapter.lora.alpha", 0.0)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not np.isfinite(alpha):
            raise file_error(file.path, f"metadata adapter.lora.alpha must be a number, got {alpha!r}")
        result: dict[str, tuple[np.ndarray, np.ndarray, float]] = {}
        names = set(file.tensors)
        for name in sorted(names):
            if name.endswith(".lora_b") and name[: -len(".lora_b")] + ".lora_a" not in names:
                raise file_error(file.path, f"tensor {name!r} has no matching .lora_a")
            if not name.endswith(".lora_a"):
                if not name.endswith(".lora_b"):
                    raise file_error(file.path, f"tensor {name!r} is not a .lora_a / .lora_b pair (not supported)")
                continue
            target = name[: -len(".lora_a")]
            if target + ".lora_b" not in names:
                raise file_error(file.path, f"tensor {name!r} has no matching .lora_b")
            info = base.tensors.get(target)
            if info is None:
                raise file_error(file.path, f"adapts {target!r}, which base model {base.path} does not have")
            a_info, b_info = file.tensors[name], file.tensors[target + ".lora_b"]
            # ggml order: W ne = [n_in, n_out], A ne = [n_in, r], B ne = [r, n_out]
            if (len(info.ne) != 2 or len(a_info.ne) != 2 or len(b_info.ne) != 2 or a_info.ne[0] != info.ne[0]
                    or b_info.ne[1] != info.ne[1] or a_info.ne[1] != b_info.ne[0] or a_info.ne[1] < 1):
                raise file_error(file.path, f"{target!r}: lora_a {a_info.ne} and lora_b {b_info.ne} do not fit "
                                            f"base model {base.path}'s {info.ne} (ggml order)")
            rank = int(b_info.ne[0])
            unit = float(alpha) / rank if alpha else 1.0
            # transposed once here: the product's loops run along their rows (engine.kernels.ops.add_lora)
            result[target] = (np.ascontiguousarray(_float_array(file, name).T),
                              np.ascontiguousarray(_float_array(file, target + ".lora_b").T), unit)
        if not result:
            raise file_error(file.path, "has no .lora_a / .lora_b tensors")
        return result
    finally:
        file.close()


def _walk(obj: Any, replace: dict[int, Weight], seen: set[int], depth: int = 0) -> None:
    """Replace, inside ``obj``'s attributes, lists and dataclasses, every Weight in ``replace``."""
    if depth > _MAX_DEPTH or id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, list):
        for i, item in enumerate(obj):
            if isinstance(item, Weight):
                obj[i] = replace.get(id(item), item)
            else:
                _walk(item, replace, seen, depth + 1)
        return
    if isinstance(obj, (str, bytes, np.ndarray, int, float, tuple)) or obj is None:
        return
    attrs = [f.name for f in fields(obj)] if is_dataclass(obj) else list(getattr(obj, "__dict__", {}))
    for attr in attrs:
        value = getattr(obj, attr, None)
        if isinstance(value, Weight):
            if id(value) in replace:
                object.__setattr__(obj, attr, replace[id(value)])
        elif isinstance(value, list) or (is_dataclass(value) and not isinstance(value, type)):
            _walk(value, replace, seen, depth + 1)


def _weights(obj: Any, found: dict[int, Weight], seen: set[int], depth: int = 0) -> None:
    if depth > _MAX_DEPTH or id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, Weight):
        found[id(obj)] = obj
        return
    if isinstance(obj, list):
        for item in obj:
            _weights(item, found, seen, depth + 1)
        return
    if is_dataclass(obj) and not isinstance(obj, type):
        for f in fields(obj):
            _weights(getattr(obj, f.name, None), found, seen, depth + 1)
    elif hasattr(obj, "__dict__") and depth == 0:
        for value in vars(obj).values():
            _weights(value, found, seen, depth + 1)


def apply_adapters(arch: Any, base: GGUFFile, adapters: Iterable[LoraSpec]) -> list[dict[str, Any]]:
    """Attach LoRA adapter GGUFs ``[(path, scale), ...]`` to the weights of a loaded architecture
    (``models/*`` objects): each adapted Weight is swapped for a copy carrying its terms. Returns
    the adapters as llama-server lists them: ``[{"id": i, "path": ..., "scale": ...}]``."""
    specs = _check_specs(adapters)
    per_tensor: dict[str, list[tuple[np.ndarray, np.ndarray, float, int, float]]] = {}
    sources: dict[str, str] = {}
    listed = []
    for index, (path, scale) in enumerate(specs):
        scale = check_scale(scale, os.fspath(path))
        for target, (a, b, unit) in read_adapter(path, base).items():
            per_tensor.setdefault(target, []).append((a, b, unit, index, scale))
            sources.setdefault(target, os.fspath(path))
        listed.append({"id": index, "path": os.fspath(path), "scale": scale})
    found: dict[int, Weight] = {}
    _weights(arch, found, set())
    by_name: dict[str, list[Weight]] = {}
    for weight in found.values():
        if weight.name is not None:
            by_name.setdefault(weight.name, []).append(weight)
    replace: dict[int, Weight] = {}
    for target, triples in per_tensor.items():
        weights = by_name.get(target)
        if not weights:
            raise HalfbyteError(f"{sources[target]}: adapts {target!r}, which {base.path} does not use as a matrix "
                                "product (LoRA on embeddings is not supported at run time)")
        if target == "token_embd.weight":
            raise HalfbyteError(f"{sources[target]}: LoRA on token embeddings is not supported at run time")
        for weight in weights:
            replace[id(weight)] = weight.with_lora(tuple(triples))
    _walk(arch, replace, set())
    return listed


def _check_specs(adapters: Iterable[LoraSpec]) -> list[LoraSpec]:
    if isinstance(adapters, (str, os.PathLike)):
        return [(adapters, 1.0)]
    specs = []
    for item in adapters:
        if isinstance(item, (str, os.PathLike)):
            specs.append((item, 1.0))
        elif isinstance(item, Sequence) and len(item) == 2 and isinstance(item[0], (str, os.PathLike)):
            specs.append((item[0], item[1]))
        else:
            raise HalfbyteError(f"lora must be a list of (path, scale) pairs or paths, got {item!r}")
    return specs
