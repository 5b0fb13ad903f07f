"""The library API: load a GGUF file, tokenize, evaluate, generate.

    from engine import Model
    model = Model.load("model.gguf", n_ctx=2048, threads=4)
    for piece in model.generate("Once upon a time", max_tokens=64, stream=True):
        print(piece, end="", flush=True)

A ``Model`` holds one KV cache, so it runs one evaluation at a time: calls from other
Python threads wait for the running one; a call from the thread that is in the middle
of a streaming generation is refused (it would corrupt that generation's state).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine.errors import HalfbyteError, file_error
from engine.gguf_file import GGUFFile
from engine.sampling import SamplingParams, sample_token
from engine.tokenizer import Tokenizer

STOP_EOS = "eos"  # the model produced its end-of-sequence token
STOP_LENGTH = "length"  # max_tokens were generated
STOP_STRING = "stop"  # a stop string appeared in the output
STOP_CONTEXT = "context"  # the context window is full (and context shifting is off)
STOP_INTERRUPTED = "interrupted"


@dataclass
class GenerationStats:
    """Timings of the last generation, like llama.cpp's end-of-run summary."""

    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    generated_tokens: int = 0
    generation_seconds: float = 0.0
    stop_reason: str = ""
    tokens: list[int] = field(default_factory=list)

    @property
    def prompt_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def generation_tokens_per_second(self) -> float:
        return self.generated_tokens / self.generation_seconds if self.generation_seconds > 0 else 0.0


def _default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


class Model:
    """A GGUF model ready to run: weights memory-mapped, tokenizer and KV cache built."""

    def __init__(self, path: str | os.PathLike, n_ctx: int | None = None, threads: int | None = None,
                 kv_type: str = "f16") -> None:
        from engine.kernels.attention import KVCache
        from models import load_architecture

        self.path = Path(path)
        self.file = GGUFFile(self.path)
        self.metadata = self.file.metadata
        self.tokenizer = Tokenizer.from_metadata(self.metadata) if "tokenizer.ggml.model" in self.metadata else None
        if self.tokenizer is None:
            raise file_error(self.path, "has no tokenizer (tokenizer.ggml.* metadata)")
        self.arch = load_architecture(self.file)
        n_ctx_train = self.arch.params.n_ctx_train
        if n_ctx is not None and n_ctx <= 0:
            raise HalfbyteError(f"context size must be positive, got {n_ctx}")
        self.n_ctx = min(n_ctx, n_ctx_train) if n_ctx else n_ctx_train
        if kv_type not in ("f16", "f32"):
            raise HalfbyteError(f"KV cache type must be f16 or f32, got {kv_type!r}")
        self.threads = threads or _default_threads()
        if self.threads < 1:
            raise HalfbyteError(f"threads must be >= 1, got {self.threads}")
        self.cache = KVCache(
            self.arch.params.n_layer, self.n_ctx, self.arch.params.n_head_kv, self.arch.params.head_dim,
            np.float16 if kv_type == "f16" else np.float32,
        )
        self.tokens: list[int] = []  # what the KV cache holds, in order
        self.last_stats = GenerationStats()
        self._lock = threading.Lock()
        self._owner: int | None = None

    @classmethod
    def load(cls, path: str | os.PathLike, n_ctx: int | None = None, threads: int | None = None,
             kv_type: str = "f16") -> Model:
        """Open ``path`` (GGUF). ``n_ctx`` defaults to the model's training context."""
        return cls(path, n_ctx=n_ctx, threads=threads, kv_type=kv_type)

    # -- properties --------------------------------------------------------------------------------

    @property
    def n_vocab(self) -> int:
        return self.arch.params.n_vocab

    @property
    def n_past(self) -> int:
        return len(self.tokens)

    @property
    def architecture(self) -> str:
        return self.file.architecture or ""

    # -- state -------------------------------------------------------------------------------------

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        me = threading.get_ident()
        if self._owner == me:
            raise HalfbyteError("this model is already generating in this thread (finish or close that stream first)")
        with self._lock:
            self._owner = me
            try:
                import numba

                from engine.kernels.matmul import slp_scope

                numba.set_num_threads(min(self.threads, numba.config.NUMBA_NUM_THREADS))
                with slp_scope():
                    yield
            finally:
                self._owner = None

    def reset(self) -> None:
        """Forget the context: the next evaluation starts from position 0."""
        with self._exclusive():
            self.tokens = []
            self.cache.reset()

    # -- tokens ------------------------------------------------------------------------------------

    def tokenize(self, text: str | bytes, add_bos: bool | None = None, special: bool = False) -> list[int]:
        """Token ids of ``text``; ``add_bos=None`` follows the file's default."""
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self.tokenizer.encode(text, add_bos=add_bos, parse_special=special)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens))

    # -- evaluation --------------------------------------------------------------------------------

    def _check_tokens(self, tokens: Sequence[int]) -> np.ndarray:
        ids = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.n_vocab):
            bad = int(ids[(ids < 0) | (ids >= self.n_vocab)][0])
            raise HalfbyteError(f"token id {bad} is out of range (vocabulary has {self.n_vocab} tokens)")
        if self.n_past + ids.size > self.n_ctx:
            raise HalfbyteError(
                f"{self.n_past + ids.size} tokens do not fit in the context of {self.n_ctx} "
                f"({self.n_past} already in it); use a larger -c / n_ctx or a shorter prompt"
            )
        return ids

    def _forward(self, ids: np.ndarray, all_logits: bool) -> np.ndarray:
        logits = self.arch.forward(ids, self.n_past, self.cache, all_logits=all_logits)
        self.tokens.extend(int(t) for t in ids)
        return logits

    def eval(self, tokens: Sequence[int], last_only: bool = False) -> np.ndarray:
        """Append ``tokens`` to the context; returns their logits, shape (len(tokens), n_vocab),
        or with ``last_only=True`` only the last token's, shape (1, n_vocab) (cheaper: the output
        projection runs once)."""
        with self._exclusive():
            ids = self._check_tokens(tokens)
            if not ids.size:
                return np.zeros((0, self.n_vocab), np.float32)
            return self._forward(ids, all_logits=not last_only)

    # -- generation --------------------------------------------------------------------------------

    def generate(
        self,
        prompt: str | Sequence[int],
        max_tokens: int = 128,
        temperature: float = 0.8,
        top_k: int = 40,
        top_p: float = 0.95,
        min_p: float = 0.05,
        repeat_penalty: float = 1.1,
        repeat_last_n: int = 64,
        seed: int | None = None,
        stop: str | Sequence[str] = (),
        stream: bool = False,
        add_bos: bool | None = None,
        reset: bool = True,
        context_shift: bool = False,
    ) -> str | Iterator[str]:
        """Continue ``prompt`` (text or token ids). Returns the generated text, or with
        ``stream=True`` an iterator of text pieces as they are produced.

        ``reset=True`` starts from an empty context; ``reset=False`` continues the
        current one (chat-style). Stops at EOS, ``max_tokens``, a stop string (not
        included in the output) or a full context; ``last_stats.stop_reason`` says which.

        ``context_shift=True`` keeps generating when the context is full, like llama.cpp's
        context shift: the first token (BOS) and the newer half of the rest are kept, the older
        half is dropped, and the kept tokens are evaluated again (one prompt-sized pass).
        """
        params = SamplingParams(temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n)
        if max_tokens < 0:
            raise HalfbyteError(f"max_tokens must be >= 0, got {max_tokens}")
        stops = [stop] if isinstance(stop, str) else list(stop)
        if any(not s for s in stops):
            raise HalfbyteError("stop strings must not be empty")
        if isinstance(prompt, str):
            if not prompt and not (self.tokenizer.add_bos if add_bos is None else add_bos):
                raise HalfbyteError("empty prompt: give some text (or a model that adds a BOS token)")
            prompt_ids = self.tokenize(prompt, add_bos=add_bos)
        else:
            prompt_ids = [int(t) for t in prompt]
        if not prompt_ids:
            raise HalfbyteError("empty prompt: no tokens to start from")
        if len(prompt_ids) + (0 if reset else self.n_past) > self.n_ctx:
            raise HalfbyteError(
                f"prompt of {len(prompt_ids)} tokens does not fit in the context of {self.n_ctx} tokens "
                "(use a larger -c / n_ctx or a shorter prompt)"
            )
        pieces = self._generate(prompt_ids, max_tokens, params, seed, stops, reset, context_shift)
        if stream:
            return pieces
        return "".join(pieces)

    def _shift_context(self) -> None:
        """Drop the older half of the context after the first token and re-evaluate the rest."""
        keep_first = self.tokens[:1]
        rest = self.tokens[1:]
        kept = keep_first + rest[len(rest) // 2 :]
        self.tokens = []
        self.cache.reset()
        self._forward(np.asarray(kept, dtype=np.int64), all_logits=False)

    def _generate(self, prompt_ids: list[int], max_tokens: int, params: SamplingParams, seed: int | None,
                  stops: list[str], reset: bool, context_shift: bool = False) -> Iterator[str]:
        rng = np.random.default_rng(seed)
        with self._exclusive():
            stats = GenerationStats()
            self.last_stats = stats
            if reset:
                self.tokens = []
                self.cache.reset()
            ids = self._check_tokens(prompt_ids)
            start = time.perf_counter()
            logits = self._forward(ids, all_logits=False)[-1]
            stats.prompt_tokens = len(ids)
            stats.prompt_seconds = time.perf_counter() - start
            decoder = self.tokenizer.stream_decoder()
            held = ""  # text kept back because it might be the start of a stop string
            gen_start = time.perf_counter()
            try:
                while True:
                    if stats.generated_tokens >= max_tokens:
                        stats.stop_reason = STOP_LENGTH
                        break
                    token = sample_token(logits, params, rng, self.tokens)
                    if token == self.tokenizer.eos_id:
                        stats.stop_reason = STOP_EOS
                        break
                    stats.generated_tokens += 1
                    stats.tokens.append(token)
                    held += decoder.feed(token)
                    if stops:
                        cut = min((i for i in (held.find(s) for s in stops) if i >= 0), default=-1)
                        if cut >= 0:
                            if held[:cut]:
                                yield held[:cut]
                            held = ""
                            stats.stop_reason = STOP_STRING
                            break
                        # Emit all but the longest tail that could still begin a stop string.
                        keep = max((k for s in stops for k in range(1, len(s)) if held.endswith(s[:k])), default=0)
                        ready, held = held[: len(held) - keep], held[len(held) - keep :]
                    else:
                        ready, held = held, ""
                    if ready:
                        yield ready
                    if self.n_past >= self.n_ctx:
                        if not context_shift or self.n_ctx < 4:
                            stats.stop_reason = STOP_CONTEXT
                            break
                        self._shift_context()
                    logits = self._forward(np.asarray([token]), all_logits=False)[-1]
                if stats.stop_reason != STOP_STRING:
                    held += decoder.flush()
                    if held:
                        yield held
            except GeneratorExit:
                stats.stop_reason = stats.stop_reason or STOP_INTERRUPTED
                raise
            finally:
                stats.generation_seconds = time.perf_counter() - gen_start
