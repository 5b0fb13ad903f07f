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


def _number(name: str, value: object) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise HalfbyteError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise HalfbyteError(f"{name} must be a finite number, got {value}")
    return float(value)


def _integer(name: str, value: object) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise HalfbyteError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    return int(value)


@dataclass(frozen=True)
class SamplingParams:
    """llama.cpp's defaults: temperature 0.8, top-k 40, top-p 0.95, min-p 0.05, repetition
    penalty 1.0 (off) over the last 64 tokens (-1: the whole context)."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64

    def __post_init__(self) -> None:
        temperature = _number("temperature", self.temperature)
        top_k = _integer("top-k", self.top_k)
        top_p = _number("top-p", self.top_p)
        min_p = _number("min-p", self.min_p)
        repeat_penalty = _number("repeat penalty", self.repeat_penalty)
        repeat_last_n = _integer("repeat-last-n", self.repeat_last_n)
        if temperature < 0:
            raise HalfbyteError(f"temperature must be >= 0, got {temperature}")
        if top_k < 0:
            raise HalfbyteError(f"top-k must be >= 0 (0 = off), got {top_k}")
        if not (0 < top_p <= 1):
            raise HalfbyteError(f"top-p must be in (0, 1], got {top_p}")
        if not (0 <= min_p <= 1):
            raise HalfbyteError(f"min-p must be in [0, 1], got {min_p}")
        if repeat_penalty <= 0:
            raise HalfbyteError(f"repeat penalty must be > 0, got {repeat_penalty}")
        if repeat_last_n < -1:
            raise HalfbyteError(f"repeat-last-n must be >= 0, or -1 for the whole context, got {repeat_last_n}")
        for name, value in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p), ("min_p", min_p),
                            ("repeat_penalty", repeat_penalty), ("repeat_last_n", repeat_last_n)):
            object.__setattr__(self, name, value)  # plain Python numbers from here on

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
        window = list(recent) if params.repeat_last_n < 0 else list(recent)[-params.repeat_last_n :]
        logits = apply_repeat_penalty(logits, window, params.repeat_penalty)
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
