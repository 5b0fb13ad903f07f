"""`halfbyte perplexity`: the statistic llama.cpp's llama-perplexity reports, so numbers compare.

The text is tokenized once (with BOS when the model adds one) and cut into chunks of ``n_ctx``
tokens (a trailing partial chunk is dropped). Each chunk is evaluated on an empty context with
its first token replaced by BOS, and only the second half of the window is scored, so every
scored token has at least ``n_ctx / 2`` tokens of context::

    nll = -sum log p(t[j+1] | t[..j]) over j in [n_ctx/2, n_ctx - 2] of every chunk
    PPL = exp(nll / count) +- PPL * standard error of the mean token NLL
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from engine.errors import HalfbyteError

MIN_CTX = 4  # half the window is context, and at least one token is scored

@dataclass
class PerplexityResult:
    ppl: float
    ppl_error: float
    n_chunks: int
    n_ctx: int
    tokens_scored: int
    chunk_ppl: list[float] = field(default_factory=list)  # running estimate after each chunk, like llama.cpp


def _log_softmax_at(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """log p(target) per row, in float64."""
    rows = logits.astype(np.float64)
    peak = rows.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(rows - peak).sum(axis=1)) + peak[:, 0]
    return rows[np.arange(len(targets)), targets] - log_norm


def perplexity(model, text: str, n_ctx: int = 512, max_chunks: int | None = None,
               on_chunk: Callable[[int, int, float], None] | None = None) -> PerplexityResult:
    """Perplexity of ``model`` (an engine.model.Model) over ``text`` in windows of ``n_ctx`` tokens."""
    from engine.model import check_int

    n_ctx = check_int("context size for perplexity", n_ctx)
    if n_ctx < MIN_CTX:
        raise HalfbyteError(f"context size for perplexity must be at least {MIN_CTX}, got {n_ctx}")
    if max_chunks is not None and check_int("chunks", max_chunks) < 1:
        raise HalfbyteError(f"chunks must be >= 1, got {max_chunks}")
    if not isinstance(text, str):
        raise HalfbyteError(f"text must be a str, got {type(text).__name__}")
    if n_ctx > model.n_ctx:
        raise HalfbyteError(f"context size {n_ctx} is larger than the model's context ({model.n_ctx})")
    tokens = np.asarray(model.tokenize(text), dtype=np.int64)
    n_chunks = len(tokens) // n_ctx
    if max_chunks is not None:
        n_chunks = min(n_chunks, max_chunks)
    if n_chunks < 1:
        raise HalfbyteError(f"the text has {len(tokens)} tokens: need at least {n_ctx} (one window); "
                            "use a longer text or a smaller -c")
    bos = model.tokenizer.bos_id if model.tokenizer.add_bos else None
    first = n_ctx // 2
    nll = nll2 = 0.0
    count = 0
    running: list[float] = []
    for chunk in range(n_chunks):
        window = tokens[chunk * n_ctx : (chunk + 1) * n_ctx].copy()
        if bos is not None:
            window[0] = bos
        model.reset()
        logits = model.eval(window)
        # logits[j] predicts window[j + 1]
        logp = _log_softmax_at(logits[first : n_ctx - 1], window[first + 1 : n_ctx])
        nll -= float(logp.sum())
        nll2 += float((logp * logp).sum())
        count += len(logp)
        running.append(math.exp(nll / count))
        if on_chunk is not None:
            on_chunk(chunk + 1, n_chunks, running[-1])
    mean = nll / count
    variance = nll2 / count - mean * mean
    error = math.sqrt(max(variance, 0.0) / (count - 1)) if count > 1 else 0.0
    ppl = math.exp(mean)
    return PerplexityResult(ppl, ppl * error, n_chunks, n_ctx, count, running)
