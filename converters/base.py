"""What every architecture mapping provides, and the small helpers they share.

An architecture module (converters/llama.py, mpt.py, falcon.py) turns a Hugging Face
``config.json`` into GGUF metadata and a plan: for each GGUF tensor, the checkpoint
tensor it comes from, the shape the config implies, and an optional transform (a row
permutation or re-layout). The driver (converters/convert.py) does the rest: checks
the plan against the checkpoint, streams tensors through the transform and the
quantizer into the file.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from gguf import MODEL_TENSOR, TENSOR_NAMES, GGUFValueType

from engine.errors import HalfbyteError, file_error

Transform = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class PlannedTensor:
    """One GGUF tensor: where it comes from and what shape it must have (numpy order)."""

    name: str
    source: str
    shape: tuple[int, ...]
    transform: Transform | None = None


@dataclass
class MetadataEntry:
    key: str
    value: Any
    value_type: GGUFValueType
    elem_type: GGUFValueType | None = None


@dataclass
class ConversionPlan:
    arch: str
    metadata: list[MetadataEntry]
    tensors: list[PlannedTensor]
    # Checkpoint tensors that are expected but not written (tied heads, rotary caches).
    ignored: Callable[[str], bool] = field(default=lambda name: False)


class Architecture(Protocol):
    """The interface of an architecture module."""

    ARCH: str
    HF_ARCHITECTURES: tuple[str, ...]
    MODEL_TYPES: tuple[str, ...]

    def plan(self, config: Mapping[str, Any], config_path: Path, names: set[str]) -> ConversionPlan: ...

    def vocab(self, directory: Path, config: Mapping[str, Any]) -> list[MetadataEntry]: ...


def tensor_name(kind: MODEL_TENSOR, suffix: str = "weight", block: int | None = None) -> str:
    """The GGUF (llama.cpp) name of a tensor, from gguf-py's table: ``blk.3.attn_q.weight``."""
    base = TENSOR_NAMES[kind]
    if block is not None:
        base = base.format(bid=block)
    return f"{base}.{suffix}"


class ConfigReader:
    """Typed, validated access to config.json: errors name the file and the key."""

    def __init__(self, config: Mapping[str, Any], path: Path) -> None:
        self.config = config
        self.path = path

    def get(self, *keys: str, default: Any = None) -> Any:
        """The first of ``keys`` present (configs renamed keys over time), else ``default``."""
        for key in keys:
            if key in self.config and self.config[key] is not None:
                return self.config[key]
        return default

    def require_int(self, *keys: str, minimum: int = 1) -> int:
        value = self.get(*keys)
        if value is None:
            raise file_error(self.path, f"missing {' / '.join(repr(k) for k in keys)}")
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise file_error(self.path, f"{keys[0]!r} must be an integer >= {minimum}, got {value!r}")
        return value

    def float_value(self, *keys: str, default: float) -> float:
        value = self.get(*keys, default=default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise file_error(self.path, f"{keys[0]!r} must be a number, got {value!r}")
        return float(value)

    def rope(self) -> tuple[float, str | None, float]:
        """(theta, scaling type, scaling factor): transformers 5 keeps these in
        ``rope_parameters``, older configs in ``rope_theta`` and ``rope_scaling``."""
        params = self.get("rope_parameters", default={}) or {}
        scaling = self.get("rope_scaling", default=None) or params
        theta = params.get("rope_theta", self.get("rope_theta", default=10000.0))
        kind = scaling.get("rope_type", scaling.get("type"))
        factor = float(scaling.get("factor", 1.0) or 1.0)
        if kind in (None, "default"):
            return float(theta), None, 1.0
        return float(theta), kind, factor

    def fail(self, reason: str) -> HalfbyteError:
        return file_error(self.path, reason)


def u32(key: str, value: int) -> MetadataEntry:
    return MetadataEntry(key, int(value), GGUFValueType.UINT32)


def f32(key: str, value: float) -> MetadataEntry:
    return MetadataEntry(key, float(value), GGUFValueType.FLOAT32)


def string(key: str, value: str) -> MetadataEntry:
    return MetadataEntry(key, value, GGUFValueType.STRING)


def boolean(key: str, value: bool) -> MetadataEntry:
    return MetadataEntry(key, bool(value), GGUFValueType.BOOL)
