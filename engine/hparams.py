"""Typed access to a GGUF file's hyper-parameters and weights, with errors that name the file.

Architecture files (models/) read everything they need through these two helpers,
so a missing key, a missing tensor or a wrong shape is reported the same way for
every architecture, before any computation starts.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType

from engine.errors import file_error
from engine.gguf_file import GGUFFile
from engine.weights import Weight


class HParams:
    """``{arch}.*`` metadata of one file, e.g. ``hp.int("block_count")`` for ``llama.block_count``."""

    def __init__(self, file: GGUFFile, arch: str) -> None:
        self.file = file
        self.arch = arch

    def _value(self, key: str, default: Any) -> Any:
        full = f"{self.arch}.{key}"
        if full in self.file.metadata:
            return self.file.metadata[full]
        if default is None:
            raise file_error(self.file.path, f"missing metadata key {full!r}")
        return default

    def int(self, key: str, default: int | None = None, minimum: int = 1) -> int:
        value = self._value(key, default)
        if isinstance(value, (bool, float, str)) or not isinstance(value, (int, np.integer)) or value < minimum:
            raise file_error(
                self.file.path, f"metadata {self.arch}.{key} must be an integer >= {minimum}, got {value!r}"
            )
        return int(value)

    def float(self, key: str, default: float | None = None, *, minimum: float | None = None,
              positive: bool = False, finite: bool = True) -> float:
        """A number; NaN/inf are refused unless ``finite=False``, and so are values below
        ``minimum`` or, with ``positive=True``, values <= 0 (a nonsense value would run to garbage)."""
        value = self._value(key, default)
        name = f"{self.arch}.{key}"
        if isinstance(value, (bool, str)) or not isinstance(value, (int, float, np.number)):
            raise file_error(self.file.path, f"metadata {name} must be a number, got {value!r}")
        value = float(value)
        if math.isnan(value) or (finite and math.isinf(value)):
            raise file_error(self.file.path, f"metadata {name} must be a finite number, got {value}")
        if positive and value <= 0:
            raise file_error(self.file.path, f"metadata {name} must be > 0, got {value:g}")
        if minimum is not None and value < minimum:
            raise file_error(self.file.path, f"metadata {name} must be >= {minimum:g}, got {value:g}")
        return value

    def str(self, key: str, default: str | None = None) -> str:
        value = self._value(key, default)
        if not isinstance(value, str):
            raise file_error(self.file.path, f"metadata {self.arch}.{key} must be a string, got {value!r}")
        return value

    def vocab_size(self) -> int:
        """Rows of the token embedding (what logits index), from the tensor itself; a
        ``{arch}.vocab_size`` key that disagrees with it is refused."""
        info = self.file.tensors.get("token_embd.weight")
        if info is None:
            raise file_error(self.file.path, "missing tensor 'token_embd.weight'")
        if len(info.shape) != 2 or info.shape[0] < 1:
            raise file_error(self.file.path, f"tensor 'token_embd.weight' has shape {info.ne}, expected 2-D")
        rows = info.shape[0]
        key = f"{self.arch}.vocab_size"
        if key in self.file.metadata:
            stated = self.int("vocab_size")
            if stated != rows:
                raise file_error(
                    self.file.path, f"metadata {key} = {stated} disagrees with the {rows} rows of 'token_embd.weight'"
                )
        return rows


class Tensors:
    """The weights of one file, validated against the shapes the hyper-parameters imply."""

    def __init__(self, file: GGUFFile) -> None:
        self.file = file

    def has(self, name: str) -> bool:
        return name in self.file.tensors

    def matrix(self, name: str, n_out: int, n_in: int) -> Weight:
        """A 2-D weight used in place (memory-mapped), ggml shape ne = [n_in, n_out]."""
        info = self.file.tensors.get(name)
        if info is None:
            raise file_error(self.file.path, f"missing tensor {name!r}")
        if info.shape != (n_out, n_in):
            raise file_error(
                self.file.path, f"tensor {name!r} has shape {info.ne}, expected {(n_in, n_out)} (ggml order)"
            )
        return Weight.from_file(self.file, name)

    def vector(self, name: str, n: int) -> np.ndarray:
        """A 1-D tensor (norm weight, bias) as a float32 copy: small, and read every token."""
        info = self.file.tensors.get(name)
        if info is None:
            raise file_error(self.file.path, f"missing tensor {name!r}")
        if info.shape != (n,):
            raise file_error(self.file.path, f"tensor {name!r} has shape {info.ne}, expected ({n},)")
        if info.ggml_type == GGMLQuantizationType.F32:
            return np.array(self.file.tensor_array(name), dtype=np.float32)
        return Weight.from_file(self.file, name).dequantize().reshape(n)

    def optional_vector(self, name: str, n: int) -> np.ndarray | None:
        return self.vector(name, n) if self.has(name) else None
