"""Weights used in place from the memory-mapped file (no copy of the model is ever made)."""

from __future__ import annotations

import numpy as np

from engine.gguf_file import GGUFFile
from engine.kernels import dequant_any
from engine.kernels.matmul import WeightView


class Weight(WeightView):
    """A weight matrix view with the file tensor it came from.

    ``name``: that tensor's GGUF name (None for weights not read from a file). ``lora``: run-time
    LoRA adapters, ``(A^T (n_in, r), B^T (r, n_out), alpha / r, adapter index, scale)`` entries that
    ``ops.linear`` adds as ``scale * alpha / r * (x A^T) B^T`` (engine/lora.py attaches them with ``with_lora``)."""

    name: str | None = None
    lora: tuple[tuple[np.ndarray, np.ndarray, float, int, float], ...] = ()

    @classmethod
    def from_file(cls, file: GGUFFile, name: str) -> Weight:
        info = file.tensors[name]
        view = WeightView.from_raw(info.ggml_type, list(info.ne) if len(info.ne) > 1 else [info.ne[0], 1],
                                   file.tensor_bytes(name))
        weight = cls(view.ggml_type, view.n_in, view.n_out, view.data)
        object.__setattr__(weight, "name", name)  # a frozen dataclass
        return weight

    def with_lora(self, adapters: tuple[tuple[np.ndarray, np.ndarray, float, int, float], ...]) -> Weight:
        """The same weight (same data, no copy) with LoRA adapters added to its products."""
        weight = type(self)(self.ggml_type, self.n_in, self.n_out, self.data)
        object.__setattr__(weight, "name", self.name)
        object.__setattr__(weight, "lora", tuple(self.lora) + tuple(adapters))
        return weight

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Rows ``ids`` as float32 (embedding lookup): only those rows are dequantized."""
        selected = self.data[np.asarray(ids, dtype=np.int64)]
        if self.ggml_type.name == "F32":
            return np.array(selected, dtype=np.float32)
        if self.ggml_type.name == "F16":
            return selected.view(np.float16).astype(np.float32)
        if self.ggml_type.name == "BF16":
            return (selected.astype(np.uint32) << 16).view(np.float32)
        return dequant_any.dequantize_rows(selected, self.ggml_type).reshape(len(selected), self.n_in)

    def dequantize(self) -> np.ndarray:
        return self.rows(np.arange(self.n_out))
