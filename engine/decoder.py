"""The shape every architecture's forward pass has, whatever its blocks:

    x = embed(batch)                      # (n_tok, n_embd) float32
    for i in layers: x = layer(i, x, batch)
    out = head(output_rows(x), ...)       # final norm, then the output projection (or the hidden states)

Architecture files (models/) subclass ``Decoder`` and write ``embed``, ``layer`` and ``head``;
``forward`` composes them. Splitting the pass this way lets a pipeline (engine/distributed)
run a contiguous range of layers in each process with exactly the code and the order of a
single process: stage 0 embeds and runs its layers, the next stages take the activations, the
last one applies the head.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from engine.batch import Batch
from engine.errors import HalfbyteError
from engine.model import check_interrupt


class Decoder:
    """Base of the architectures: ``params`` (with ``n_layer``, ``n_embd``, ``n_vocab``...) and ``layers``."""

    params: Any
    layers: list

    def embed(self, batch: Batch) -> np.ndarray:
        """The input rows of the first layer, ``(batch.n_tok, n_embd)`` float32 (a fresh array)."""
        raise NotImplementedError

    def layer(self, i: int, x: np.ndarray, batch: Batch) -> np.ndarray:
        """Layer ``i`` applied to ``x`` (which it may update in place); returns the new rows."""
        raise NotImplementedError

    def head(self, x: np.ndarray, hidden_only: bool = False) -> np.ndarray:
        """The final norm of ``x``, then the logits (``hidden_only``: the normed rows, for embeddings)."""
        raise NotImplementedError

    def forward(self, batch: Batch, all_logits: bool = False, hidden_only: bool = False) -> np.ndarray:
        """Logits of every row (``all_logits``) or of each sequence's last row, ``(rows, n_vocab)``."""
        x = self.run_layers(self.embed(batch), batch, 0, len(self.layers))
        return self.head(batch.output_rows(x, all_logits), hidden_only)

    def run_layers(self, x: np.ndarray, batch: Batch, first: int, last: int) -> np.ndarray:
        """Layers ``first .. last - 1`` in order; the batch's caches hold layers from ``batch.first_layer``."""
        for i in range(first, last):
            check_interrupt()  # a deferred Ctrl-C stops here, between kernel calls
            if self.layers[i] is None:
                raise HalfbyteError(f"layer {i} is not held by this process (it keeps layers "
                                    f"{self.kept_layers.start}..{self.kept_layers.stop - 1})")
            x = self.layer(i, x, batch)
        return x

    @property
    def kept_layers(self) -> range:
        held = [i for i, layer in enumerate(self.layers) if layer is not None]
        return range(held[0], held[-1] + 1) if held else range(0)

    def keep_only(self, first: int, last: int, embed: bool, head: bool) -> None:
        """Forget every weight outside layers ``first .. last - 1`` (and the embedding / head unless
        kept): those tensors are never read, so their pages of the mapped file never become resident."""
        if not 0 <= first < last <= len(self.layers):
            raise HalfbyteError(f"layer range {first}..{last - 1} is outside the model's {len(self.layers)} layers")
        for i in range(len(self.layers)):
            if not first <= i < last:
                self.layers[i] = None
        for name, keep in (("tok_embd", embed), ("pos_embd", embed), ("output", head)):
            if not keep and hasattr(self, name):
                setattr(self, name, None)
