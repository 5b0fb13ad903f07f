"""Choosing the next token from logits, in llama.cpp's order.

The chain is: repetition penalty -> top-k -> top-p -> min-p -> temperature -> draw.
A temperature of 0 (or below a tiny epsilon) means greedy: the highest logit wins,
ties going to the lowest id. Draws come from one ``numpy.random.Generator`` seeded
by the caller, so a seed makes a whole generation reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from engine.errors import HalfbyteError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.1
    repeat_last_n: int = 64

    def __post_init__(self) -> None:
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise HalfbyteError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise HalfbyteError(f"top-k must be >= 0 (0 = off), got {self.top_k}")
        if not (0 < self.top_p <= 1):
            raise HalfbyteError(f"top-p must be in (0, 1], got {self.top_p}")
        if not (0 <= self.min_p <= 1):
            raise HalfbyteError(f"min-p must be in [0, 1], got {self.min_p}")
        if not math.isfinite(self.repeat_penalty) or self.repeat_penalty <= 0:
            raise HalfbyteError(f"repeat penalty must be > 0, got {self.repeat_penalty}")
        if self.repeat_last_n < 0:
            raise HalfbyteError(f"repeat-last-n must be >= 0, got {self.repeat_last_n}")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-6


def apply_repeat_penalty(logits: np.ndarray, recent: Sequence[int], penalty: float) -> np.ndarray:
    """llama.cpp / CTRL penalty: positive logits of recent tokens divided, negative multiplied."""
    if penalty == 1.0 or not len(recent):
        return logits
    ids = np.unique(np.asarray(recent, dtype=np.int64))
    ids = ids[(ids >= 0) & (ids < logits.shape[0])]
    values = logits[ids]
    logits = logits.copy()
    logits[ids] = np.where(values > 0, values / penalty, values * penalty)
    return logits


def sample_token(
    logits: np.ndarray, params: SamplingParams, rng: np.random.Generator, recent: Sequence[int] = ()
) -> int:
    """One token id from a 1-D logits vector."""
    logits = np.asarray(logits, dtype=np.float32)
    if params.repeat_penalty != 1.0 and params.repeat_last_n:
        logits = apply_repeat_penalty(logits, list(recent)[-params.repeat_last_n :], params.repeat_penalty)
    if params.greedy:
        return int(np.argmax(logits))

    # Candidates sorted by logit, highest first; stable so equal logits keep id order.
    n_vocab = logits.shape[0]
    k = n_vocab if params.top_k <= 0 else min(params.top_k, n_vocab)
    if k < n_vocab:
        candidates = np.argpartition(-logits, k - 1)[:k]
    else:
        candidates = np.arange(n_vocab)
    candidates = candidates[np.argsort(-logits[candidates], kind="stable")]
    chosen = logits[candidates].astype(np.float64)

    probs = np.exp(chosen - chosen[0])
    probs /= probs.sum()
    if params.top_p < 1.0:
        # Keep the smallest prefix whose mass reaches top_p (at least one token).
        keep = int(np.searchsorted(np.cumsum(probs), params.top_p) + 1)
        chosen, candidates, probs = chosen[:keep], candidates[:keep], probs[:keep]
    if params.min_p > 0.0:
        keep = int(np.count_nonzero(probs >= params.min_p * probs[0]))
        chosen, candidates = chosen[: max(keep, 1)], candidates[: max(keep, 1)]

    scaled = (chosen - chosen[0]) / params.temperature
    weights = np.exp(scaled)
    weights /= weights.sum()
    return int(candidates[rng.choice(len(candidates), p=weights)])
