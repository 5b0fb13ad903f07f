"""Embeddings from a decoder model, as llama.cpp's embedding mode with pooling (``llama-embedding``,
llama-cpp-python's ``Llama.embed`` / ``create_embedding``, llama-server's ``/v1/embeddings``).

    vectors = model.embed(["first text", "second text"], pooling="mean", normalize=True)

Each text is its own sequence from position 0 (the model's own context is left as it is: every
text gets a scratch KV cache of its length); several texts go through the weights in one batched
forward pass. A text's vector is its final hidden states, after the output norm (what the output
projection would read), pooled over its tokens: ``mean``, ``cls`` (the first token) or ``last``
(the last token, as llama.cpp's LAST pooling for decoder embedding models), then by default
divided by its Euclidean norm (llama.cpp's ``--embd-normalize 2``).

The hidden states come from ``arch.forward(batch, all_logits=True, hidden_only=True)``: every
architecture stops there before its output projection when asked.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

import click
import numpy as np

from engine.errors import HalfbyteError

POOLINGS = ("mean", "cls", "last")
BATCH_TOKENS = 512  # tokens per forward pass (several short texts share one, as llama.cpp's n_batch)


def hidden_states(arch: Any, batch: Any) -> np.ndarray:
    """Final hidden states (after the output norm) of every row of ``batch``, ``(n_tok, n_embd)``."""
    return arch.forward(batch, all_logits=True, hidden_only=True)


def pool(rows: np.ndarray, pooling: str, normalize: bool) -> list[float]:
    if pooling == "mean":
        vector = rows.astype(np.float64).mean(axis=0)
    elif pooling == "cls":
        vector = rows[0].astype(np.float64)
    else:
        vector = rows[-1].astype(np.float64)
    if normalize:
        norm = np.sqrt(np.sum(vector * vector))
        vector = vector / norm if norm > 0 else vector
    return [float(v) for v in vector]


def _inputs(model: Any, texts: Any, truncate: bool) -> tuple[list[list[int]], bool]:
    """Token ids of each input (text, or token ids as OpenAI's API allows), and whether one was given."""
    from engine.model import check_token_ids

    single = isinstance(texts, (str, bytes)) or (
        isinstance(texts, Sequence) and len(texts) > 0 and all(isinstance(t, (int, np.integer)) for t in texts))
    items = [texts] if single else texts
    if not isinstance(items, Sequence) or isinstance(items, (str, bytes)) or not items:
        raise HalfbyteError("input must be a str, a non-empty list of str, or token ids")
    ids: list[list[int]] = []
    for item in items:
        if isinstance(item, (str, bytes)):
            tokens = model.tokenize(item)
        else:
            tokens = check_token_ids(item, "input").tolist()
            model._check_range(np.asarray(tokens, dtype=np.int64))
        if not tokens:
            raise HalfbyteError("cannot embed an empty input (no tokens)")
        if len(tokens) > model.n_ctx:
            if not truncate:
                raise HalfbyteError(f"input of {len(tokens)} tokens does not fit in the context of {model.n_ctx} "
                                    "tokens (use a larger -c / n_ctx, or truncate=True)")
            tokens = tokens[: model.n_ctx]
        ids.append(tokens)
    return ids, single


def embed_tokens(model: Any, ids: list[list[int]], pooling: str = "mean", normalize: bool = True) -> list[list[float]]:
    """One pooled vector per token list; batched, each list a sequence of its own."""
    from engine.batch import Batch, SequenceSlice
    from engine.model import _set_kernel_threads, check_bool, deferred_interrupts

    if pooling not in POOLINGS:
        raise HalfbyteError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    normalize = check_bool("normalize", normalize)
    vectors: list[list[float]] = []
    start = 0
    while start < len(ids):
        group = [ids[start]]
        total = len(ids[start])
        while start + len(group) < len(ids) and total + len(ids[start + len(group)]) <= BATCH_TOKENS:
            total += len(ids[start + len(group)])
            group.append(ids[start + len(group)])
        start += len(group)
        caches = [model.new_cache(len(tokens)) for tokens in group]
        batch = Batch(np.concatenate([np.asarray(t, np.int64) for t in group]),
                      [SequenceSlice(cache, 0, len(tokens)) for cache, tokens in zip(caches, group)])
        with model._exclusive():
            _set_kernel_threads(model.thread_policy.threads())
            with deferred_interrupts():
                hidden = hidden_states(model.arch, batch)
        for lo, hi in zip(batch.starts[:-1], batch.starts[1:]):
            vectors.append(pool(hidden[lo:hi], pooling, normalize))
    return vectors


def embed(model: Any, texts: Any, pooling: str = "mean", normalize: bool = True,
          truncate: bool = False) -> list[list[float]]:
    """``Model.embed``: a vector per text (a list of one for a single str)."""
    ids, _ = _inputs(model, texts, truncate)
    return embed_tokens(model, ids, pooling, normalize)


def create_embedding(model: Any, input: Any, model_name: str | None = None, pooling: str = "mean",
                     normalize: bool = True, truncate: bool = False) -> dict:
    """``Model.create_embedding``: OpenAI's embeddings response (``object: list``, ``data``, ``usage``)."""
    ids, _ = _inputs(model, input, truncate)
    vectors = embed_tokens(model, ids, pooling, normalize)
    n_tokens = sum(len(t) for t in ids)
    return {
        "object": "list",
        "data": [{"object": "embedding", "embedding": v, "index": i} for i, v in enumerate(vectors)],
        "model": model_name or model.name,
        "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
    }


# -- halfbyte embed ------------------------------------------------------------------------------------


@click.command("embed")
@click.argument("model_path", metavar="MODEL")
@click.argument("texts", nargs=-1)
@click.option("-f", "--file", "text_file", metavar="FILE", help="Embed each non-empty line of this file (UTF-8).")
@click.option("--pooling", type=click.Choice(POOLINGS), default="mean", show_default=True,
              help="Pool the tokens' final hidden states: mean, cls (first token) or last (last token).")
@click.option("--no-normalize", is_flag=True, help="Do not divide each vector by its Euclidean norm.")
@click.option("-c", "--ctx-size", "n_ctx", type=int, default=0, show_default=True,
              help="Context size: the longest text (0 = the model's training context).")
@click.option("-t", "--threads", type=int, default=None, help="Threads (0 or negative: the free cores).")
@click.option("-hff", "--hf-file", "hf_file", metavar="NAME", help="With MODEL = org/repo: this .gguf file.")
def embed_command(model_path: str, texts: tuple[str, ...], text_file: str | None, pooling: str, no_normalize: bool,
                  n_ctx: int, threads: int | None, hf_file: str | None) -> None:
    """Print the embedding of each TEXT (or of each line of -f FILE) as one JSON list per line, like
    llama-embedding with pooling: the final hidden states after the output norm, pooled, normalized."""
    from engine.run_cli import check_option, compile_notices, load_model, read_text_file

    check_option("-c", n_ctx, 0, " (0 = the model's training context)")
    if text_file is not None:
        if texts:
            raise HalfbyteError("give either TEXT... or -f FILE, not both")
        texts = tuple(line for line in read_text_file(text_file).splitlines() if line.strip())
    if not texts:
        raise HalfbyteError("give some TEXT to embed, or -f FILE")
    compile_notices()
    model = load_model(model_path, n_ctx, threads, hf_file)
    for vector in model.embed(list(texts), pooling=pooling, normalize=not no_normalize):
        sys.stdout.write(json.dumps(vector) + "\n")
