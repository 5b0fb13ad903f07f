"""A batch: the tokens of one or more sequences evaluated in one forward pass (llama.cpp's ``llama_batch``).

Architecture files are written against a ``Batch``, never against one sequence: the weights are
read once for every token of the batch (the matrix products take all rows at once), while the
parts that belong to a sequence, its positions and its KV cache, come from the batch::

    x = ops.embed(tok_embd, batch.tokens)
    ...
    ops.rope(q, batch.positions, ...)
    attn = batch.attention(layer_index, q, k, v, scale)   # stores k, v, then attends, per sequence
    ...
    x = batch.output_rows(x, all_logits)                  # every row, or each sequence's last one

A single sequence (``Batch.single``) is the common case; a server's continuous batching puts the
next token of every active sequence, each at its own position in its own cache, into one batch.
"""

from __future__ import annotations

from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass

import numpy as np

from engine.errors import HalfbyteError
from engine.kernels.attention import KVCache, attend


@dataclass(frozen=True)
class SequenceSlice:
    """``n_tok`` consecutive rows of a batch that continue one sequence at position ``n_past``."""

    cache: KVCache
    n_past: int
    n_tok: int


class Batch:
    """Token ids of one or more sequences, concatenated in the order of ``sequences``."""

    def __init__(self, tokens: np.ndarray | SequenceOf[int], sequences: SequenceOf[SequenceSlice],
                 first_layer: int = 0) -> None:
        # A pipeline stage's caches hold only its layers: layer i is entry i - first_layer.
        self.first_layer = first_layer
        self.tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        self.sequences = list(sequences)
        if not self.sequences or sum(s.n_tok for s in self.sequences) != self.tokens.size:
            raise HalfbyteError(f"batch of {self.tokens.size} tokens does not match its sequences "
                                f"({[s.n_tok for s in self.sequences]})")
        if any(s.n_tok < 1 or s.n_past < 0 for s in self.sequences):
            raise HalfbyteError("every sequence of a batch needs at least one token and n_past >= 0")
        if len({id(s.cache) for s in self.sequences}) != len(self.sequences):
            raise HalfbyteError("two sequences of one batch cannot share a KV cache")
        self.starts = np.cumsum([0] + [s.n_tok for s in self.sequences])
        self.positions = np.concatenate([np.arange(s.n_past, s.n_past + s.n_tok, dtype=np.int64)
                                         for s in self.sequences])

    @classmethod
    def single(cls, tokens: np.ndarray | SequenceOf[int], n_past: int, cache: KVCache) -> Batch:
        """``tokens`` continuing the one sequence held in ``cache`` at position ``n_past``."""
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        return cls(tokens, [SequenceSlice(cache, n_past, tokens.size)])

    @property
    def n_tok(self) -> int:
        return int(self.tokens.size)

    def attention(self, layer: int, q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float,
                  alibi: np.ndarray | None = None, window: int = 0, softcap: float = 0.0) -> np.ndarray:
        """Store each sequence's keys and values ``(n_tok, n_kv_head, head_dim)`` in its cache, then
        causal attention of its queries ``(n_tok, n_head, head_dim)`` over that cache (over the last
        ``window`` positions only, when > 0: sliding-window attention; scores soft-capped to
        ``softcap * tanh(score / softcap)`` when ``softcap`` > 0: Gemma 2)."""
        layer -= self.first_layer
        if len(self.sequences) == 1:
            seq = self.sequences[0]
            seq.cache.store(layer, k, v, seq.n_past)
            return attend(q, seq.cache.keys(layer), seq.cache.values(layer), seq.n_past, scale, alibi, window=window,
                          softcap=softcap)
        out = np.empty(q.shape, np.float32)
        for seq, start, end in zip(self.sequences, self.starts[:-1], self.starts[1:]):
            seq.cache.store(layer, k[start:end], v[start:end], seq.n_past)
            attend(np.ascontiguousarray(q[start:end]), seq.cache.keys(layer), seq.cache.values(layer),
                   seq.n_past, scale, alibi, out=out[start:end], window=window, softcap=softcap)
        return out

    def output_rows(self, x: np.ndarray, all_logits: bool) -> np.ndarray:
        """The rows whose logits are wanted: all, or the last row of each sequence."""
        if all_logits:
            return x
        return x[self.starts[1:] - 1]
