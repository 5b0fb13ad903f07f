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

import ctypes
import functools
import os
import signal
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine import jit_cache
from engine.errors import HalfbyteError, file_error
from engine.gguf_file import GGUFFile
from engine.sampling import Sampler, SamplingParams, check_logit_bias
from engine.threads import ThreadPolicy
from engine.tokenizer import Tokenizer

STOP_EOS = "eos"  # the model produced an end-of-generation token (EOS, <|eot_id|>, ...: Tokenizer.eog_ids)
STOP_LENGTH = "length"  # max_tokens were generated
STOP_STRING = "stop"  # a stop string appeared in the output
STOP_CONTEXT = "context"  # the context window is full (and context shifting is off)
STOP_INTERRUPTED = "interrupted"


# -- Ctrl-C while kernels run -------------------------------------------------------------------
#
# Python runs a signal handler between bytecodes, and inside Numba's C call machinery that is a
# place where a raised KeyboardInterrupt gets lost and resurfaces as "SystemError: ... returned a
# result with an exception set". So while kernels run, SIGINT only sets a flag; the forward pass
# checks it between layers (``check_interrupt``) and raises KeyboardInterrupt there, in Python.
# A second Ctrl-C before that check raises at once (a kernel that takes too long).

_interrupt_pending = False
_deferring = False


def _deferred_sigint(signum: int, frame: object) -> None:
    global _interrupt_pending
    if _interrupt_pending:
        raise KeyboardInterrupt
    _interrupt_pending = True


# engine.jit_cache raises a Ctrl-C at once during a kernel's compilation (Python code, and seconds
# long) instead of deferring it, then puts this handler back
_deferred_sigint.defers_ctrl_c = True


def check_interrupt() -> None:
    """Raise KeyboardInterrupt here if a Ctrl-C arrived while ``deferred_interrupts`` was on."""
    global _interrupt_pending
    if _interrupt_pending:
        _interrupt_pending = False
        raise KeyboardInterrupt


@contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Within this block a Ctrl-C is held until ``check_interrupt()`` or the end of the block.

    Only in the main thread and only when SIGINT has Python's default handler (a program that
    installed its own handler keeps it)."""
    global _deferring, _interrupt_pending
    if (_deferring or threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    signal.signal(signal.SIGINT, _deferred_sigint)
    _deferring = True
    try:
        yield
    finally:
        _deferring = False
        signal.signal(signal.SIGINT, signal.default_int_handler)
    check_interrupt()  # a Ctrl-C after the last check is not lost


# -- argument checks ----------------------------------------------------------------------------


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_real(value: object) -> bool:
    return (isinstance(value, (int, float, np.integer, np.floating))
            and not isinstance(value, (bool, np.bool_)))


def _type_name(value: object) -> str:
    return "None" if value is None else type(value).__name__


def check_int(name: str, value: object, minimum: int | None = None, hint: str = "") -> int:
    if not _is_int(value):
        raise HalfbyteError(f"{name} must be an integer, got {_type_name(value)} {value!r}")
    if minimum is not None and value < minimum:
        raise HalfbyteError(f"{name} must be >= {minimum}{hint}, got {value}")
    return int(value)


def check_real(name: str, value: object) -> float:
    if not _is_real(value):
        raise HalfbyteError(f"{name} must be a number, got {_type_name(value)} {value!r}")
    return float(value)


def check_bool(name: str, value: object, allow_none: bool = False) -> bool | None:
    if value is None and allow_none:
        return None
    if not isinstance(value, (bool, np.bool_)):
        expected = "True, False or None" if allow_none else "True or False"
        raise HalfbyteError(f"{name} must be {expected}, got {_type_name(value)} {value!r}")
    return bool(value)


def check_token_ids(tokens: object, name: str = "tokens") -> np.ndarray:
    """A 1-D int64 array from a sequence of ints; anything else is a HalfbyteError."""
    if tokens is None or isinstance(tokens, (str, bytes)):
        raise HalfbyteError(f"{name} must be a sequence of token ids (ints), got {_type_name(tokens)}")
    try:
        items = tokens if isinstance(tokens, np.ndarray) else list(tokens)
        ids = np.asarray(items)
    except (TypeError, ValueError, OverflowError):
        raise HalfbyteError(f"{name} must be a sequence of token ids (ints), got {_type_name(tokens)}") from None
    if ids.size == 0:
        return np.zeros(0, np.int64)
    if ids.ndim != 1 or ids.dtype.kind not in "iu":
        bad = [t for t in items if not _is_int(t)][:1] if ids.ndim == 1 else []
        what = f"{_type_name(bad[0])} {bad[0]!r}" if bad else f"an array of shape {ids.shape}"
        raise HalfbyteError(f"{name} must be a sequence of token ids (ints), got {what}")
    return ids.astype(np.int64, copy=False)


def check_seed(seed: object) -> int | None:
    """``None`` or -1: a random seed (as llama.cpp's -1); otherwise an integer >= 0."""
    if seed is None:
        return None
    seed = check_int("seed", seed)
    if seed == -1:
        return None
    if seed < 0:
        raise HalfbyteError(f"seed must be >= 0, or -1 for a random seed, got {seed}")
    return seed


@dataclass
class GenerationStats:
    """Timings of the last generation, like llama.cpp's end-of-run summary."""

    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    generated_tokens: int = 0
    generation_seconds: float = 0.0
    stop_reason: str = ""
    tokens: list[int] = field(default_factory=list)
    # Seconds spent compiling kernels (first use, cold Numba cache), left out of the two timings above.
    prompt_compile_seconds: float = 0.0
    generation_compile_seconds: float = 0.0
    # generate(logprobs=k): per token, an engine.serving.completion.TokenRecord (logprob, top k)
    logprobs: list = field(default_factory=list)

    @property
    def prompt_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def generation_tokens_per_second(self) -> float:
        return self.generated_tokens / self.generation_seconds if self.generation_seconds > 0 else 0.0


class ContextOverflowWarning(UserWarning):
    """n_ctx is larger than the context the model was trained with."""


def _set_kernel_threads(n: int) -> None:
    import numba  # here, not at import: `from engine import Model` stays light

    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))


@functools.cache
def _keep_freed_heap_pages() -> None:
    """Let glibc's malloc keep and reuse freed blocks up to 32 MiB instead of unmapping them.

    A prompt's layer allocates a few MB per activation (128 tokens x 5632 floats is 2.9 MB) and frees
    them again; above glibc's mmap threshold each one was a fresh mapping whose every page faulted
    in on first touch. Measured (Intel Xeon, 1.1B-shape Q6_K file, pp128 on 2 threads): 0.91 s ->
    0.84 s per prompt, SwiGLU 2.1 -> 0.8 ms per call. The pages stay with the process up to the
    peak it used (llama.cpp keeps its compute buffers too). Linux glibc only; elsewhere nothing.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, 32 << 20)
    mallopt(m_trim_threshold, 256 << 20)


class Model:
    """A GGUF model ready to run: weights memory-mapped, tokenizer and KV cache built."""

    def __init__(self, path: str | os.PathLike, n_ctx: int | None = None, threads: int | None = None,
                 kv_type: str = "f16", chat_template: str | None = None, type_k: str | None = None,
                 type_v: str | None = None, lora: Sequence = ()) -> None:
        from engine.kernels.attention import cache_type_name, compile_in_background

        if not isinstance(path, (str, os.PathLike)):
            raise HalfbyteError(f"path must be a str or os.PathLike, got {_type_name(path)} {path!r}")
        if n_ctx is not None:
            n_ctx = check_int("n_ctx", n_ctx, 0, " (0 = the model's training context)")
        if threads is not None:
            threads = check_int("threads", threads)
        # llama.cpp's -ctk / -ctv: f16 (default), f32 or q8_0, for keys and values apart
        type_k = cache_type_name(kv_type if type_k is None else type_k)
        type_v = cache_type_name(kv_type if type_v is None else type_v)
        self.path = Path(path)
        _keep_freed_heap_pages()
        self.file = GGUFFile(self.path)
        try:
            self.metadata = self.file.metadata
            if "tokenizer.ggml.model" not in self.metadata:
                raise file_error(self.path, "has no tokenizer (tokenizer.ggml.* metadata)")
            try:
                self.tokenizer = Tokenizer.from_metadata(self.metadata)
            except HalfbyteError as exc:
                if str(self.path) in str(exc):
                    raise
                raise file_error(self.path, str(exc)) from None
            self.type_k, self.type_v = type_k, type_v
            self.lora_adapters: list[dict[str, Any]] = []  # [{"id", "path", "scale"}] (engine/lora.py)
            with deferred_interrupts():  # may dequantize small tensors with kernels
                self.arch = self._load_architecture()
            if lora:  # run-time LoRA adapter GGUFs, [(path, scale), ...] (engine/lora.py)
                from engine.lora import apply_adapters

                self.lora_adapters = apply_adapters(self.arch, self.file, lora)
            n_ctx_train = self.arch.params.n_ctx_train
            self.n_ctx = n_ctx or n_ctx_train  # None / 0: the training context, as llama.cpp
            if self.n_ctx > n_ctx_train:
                # Honoured, as llama.cpp does, with its warning: positions past training may degrade.
                warnings.warn(f"n_ctx ({self.n_ctx}) > n_ctx_train ({n_ctx_train}) -- possible training context "
                              "overflow", ContextOverflowWarning, stacklevel=3)
            self.cache = self.new_cache(self.n_ctx)
            # the attention tile compiles on a spare core while this one compiles the rest
            compile_in_background(type_k, type_v)
        except BaseException:
            self.file.close()  # not left open until garbage collection
            raise
        # As llama.cpp's -t: 0 or negative means the default: here the cores this process may use
        # that other processes leave free, sampled while it runs (engine/threads.py).
        self.thread_policy = ThreadPolicy(threads if threads is not None and threads > 0 else None)
        self.threads = self.thread_policy.max_threads
        self.tokens: list[int] = []  # what the KV cache holds, in order
        self.last_stats = GenerationStats()
        self._lock = threading.Lock()
        self._owner: int | None = None
        self._chat_template_spec = chat_template
        self._chat_template = None
        if chat_template is not None:
            try:
                self._chat_template = self._resolve_chat_template()
            except BaseException:
                self.file.close()
                raise

    @classmethod
    def load(cls, path: str | os.PathLike, n_ctx: int | None = None, threads: int | None = None,
             kv_type: str = "f16", chat_template: str | None = None, type_k: str | None = None,
             type_v: str | None = None, lora: Sequence = ()) -> Model:
        """Open ``path`` (GGUF).

        ``n_ctx``: context size; None or 0 = the model's training context; larger than that is
        honoured with a ``ContextOverflowWarning``. ``threads``: None, 0 or negative = all the
        cores this process may use. ``chat_template``: None = the file's own (ChatML if it has
        none), or a built-in name (``chatml``, ``llama2``, ``llama3``, ``mistral``, ``zephyr``,
        ``gemma``, ``phi3``), a named template of the file, a Jinja file or Jinja text.
        ``kv_type``: the KV cache's type, ``f16``, ``f32`` or ``q8_0`` (about half of f16; the head
        size must be a multiple of 32); ``type_k`` / ``type_v`` set keys and values apart (-ctk/-ctv).
        ``lora``: LoRA adapter GGUFs applied at run time, ``[(path, scale), ...]`` (or paths, scale 1)."""
        return cls(path, n_ctx=n_ctx, threads=threads, kv_type=kv_type, chat_template=chat_template,
                   type_k=type_k, type_v=type_v, lora=lora)

    @classmethod
    def from_pretrained(cls, repo_id: str, filename: str | None = None, quant: str | None = None,
                        revision: str | None = None, progress: bool = True, **load_kwargs) -> Model:
        """A GGUF model from the Hugging Face Hub, as llama-cpp-python's ``Llama.from_pretrained``:
        ``filename`` (a name or a glob, e.g. ``"*q4_k_m.gguf"``) or ``quant`` (a tag such as
        ``"Q4_K_M"``, matched case-insensitively against the repo's .gguf names, as llama.cpp's
        ``-hf org/repo:Q4_K_M``); neither: the repo's only model file, else its Q4_K_M. Only that
        file (all parts of a split GGUF) is downloaded, into huggingface_hub's cache (``HF_TOKEN``,
        ``HF_HUB_OFFLINE=1``: the cache only). ``load_kwargs`` go to ``Model.load``."""
        from engine.hub import download_gguf

        if filename is not None and quant is not None:
            raise HalfbyteError("give either filename or quant, not both")
        path = download_gguf(repo_id, filename=filename, quant=quant, revision=revision, progress=progress)
        return cls.load(path, **load_kwargs)

    def _load_architecture(self) -> Any:
        """The forward pass (models/); a pipeline (engine/distributed) puts its stages here."""
        from models import load_architecture

        return load_architecture(self.file)

    def new_cache(self, n_ctx: int, type_k: str | None = None, type_v: str | None = None) -> Any:
        """An empty KV cache of ``n_ctx`` positions for this model's layers (the model's cache types
        unless given): one per sequence, e.g. a server slot's."""
        from engine.kernels.attention import KVCache

        p = self.arch.params
        return KVCache(p.n_layer, n_ctx, p.n_head_kv, p.head_dim, type_k or self.type_k, type_v or self.type_v)

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

    @property
    def name(self) -> str:
        """The model's id in API results: the file name."""
        return self.path.name

    @property
    def chat_template(self):  # -> engine.chat.ChatTemplate
        """The chat template in use (``Model.load(chat_template=...)``, else the file's, else ChatML)."""
        if self._chat_template is None:
            self._chat_template = self._resolve_chat_template()
        return self._chat_template

    def _resolve_chat_template(self):  # -> engine.chat.ChatTemplate
        from engine.chat import resolve_template

        return resolve_template(self.metadata, self.tokenizer, self._chat_template_spec)

    # -- state -------------------------------------------------------------------------------------

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        me = threading.get_ident()
        if getattr(self, "_closed", False):
            raise HalfbyteError("this model is closed")
        if self._owner == me:
            raise HalfbyteError("this model is already generating in this thread (finish or close that stream first)")
        with self._lock:
            self._owner = me
            try:

                from engine.kernels.matmul import slp_scope

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
        """Token ids of ``text``; ``add_bos=None`` follows the file's default; ``special=True``
        also parses control-token text such as ``<s>``."""
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        if not isinstance(text, str):
            raise HalfbyteError(f"text must be a str or bytes, got {_type_name(text)}")
        add_bos = check_bool("add_bos", add_bos, allow_none=True)
        special = check_bool("special", special)
        return self.tokenizer.encode(text, add_bos=add_bos, parse_special=special)

    def detokenize(self, tokens: Sequence[int], special: bool = False) -> str:
        """Text of ``tokens``; ``special=True`` renders control tokens as their text (``<s>``)."""
        ids = check_token_ids(tokens)
        special = check_bool("special", special)
        self._check_range(ids)
        return self.tokenizer.decode(ids.tolist(), special=special)

    def token_text(self, token: int) -> str:
        """One token's text as llama-tokenize shows it: control tokens by their name (``<s>``)."""
        token = check_int("token", token)
        self._check_range(np.asarray([token]))
        return self.tokenizer.token_piece(token)

    # -- evaluation --------------------------------------------------------------------------------

    def _check_range(self, ids: np.ndarray) -> None:
        if ids.size and (ids.min() < 0 or ids.max() >= self.n_vocab):
            bad = int(ids[(ids < 0) | (ids >= self.n_vocab)][0])
            raise HalfbyteError(f"token id {bad} is out of range (vocabulary has {self.n_vocab} tokens)")

    def _check_tokens(self, tokens: Sequence[int] | np.ndarray) -> np.ndarray:
        ids = check_token_ids(tokens)
        self._check_range(ids)
        if self.n_past + ids.size > self.n_ctx:
            raise HalfbyteError(
                f"{self.n_past + ids.size} tokens do not fit in the context of {self.n_ctx} "
                f"({self.n_past} already in it); use a larger -c / n_ctx or a shorter prompt"
            )
        return ids

    def _forward(self, ids: np.ndarray, all_logits: bool) -> np.ndarray:
        from engine.batch import Batch  # here, not at import: it loads the kernels

        # The thread count is chosen per evaluation: a core that another process takes during a
        # long generation is given up (and taken back) within the policy's sampling interval.
        _set_kernel_threads(self.thread_policy.threads())
        with deferred_interrupts():
            logits = self.arch.forward(Batch.single(ids, self.n_past, self.cache), all_logits=all_logits)
        self.tokens.extend(int(t) for t in ids)
        return logits

    def eval(self, tokens: Sequence[int], last_only: bool = False) -> np.ndarray:
        """Append ``tokens`` to the context; returns their logits, shape (len(tokens), n_vocab),
        or with ``last_only=True`` only the last token's, shape (1, n_vocab) (cheaper: the output
        projection runs once)."""
        last_only = check_bool("last_only", last_only)
        with self._exclusive():
            ids = self._check_tokens(tokens)
            if not ids.size:
                return np.zeros((0, self.n_vocab), np.float32)
            return self._forward(ids, all_logits=not last_only)

    # -- generation --------------------------------------------------------------------------------

    def generate(
        self,
        prompt: str | Sequence[int],
        max_tokens: int | None = 128,
        temperature: float = 0.8,
        top_k: int = 40,
        top_p: float = 0.95,
        min_p: float = 0.05,
        repeat_penalty: float = 1.0,
        repeat_last_n: int = 64,
        seed: int | None = None,
        stop: str | Sequence[str] | None = (),
        stream: bool = False,
        add_bos: bool | None = None,
        reset: bool = True,
        context_shift: bool = False,
        *,
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        typical_p: float = 1.0,
        mirostat_mode: int = 0,
        mirostat_tau: float = 5.0,
        mirostat_eta: float = 0.1,
        dry_multiplier: float = 0.0,
        dry_base: float = 1.75,
        dry_allowed_length: int = 2,
        dry_penalty_last_n: int = 64,
        dry_sequence_breakers: Sequence[str] | None = None,
        xtc_probability: float = 0.0,
        xtc_threshold: float = 0.1,
        top_n_sigma: float = -1.0,
        logit_bias: dict[int, float] | None = None,
        logits_processor=None,
        grammar=None,
        logprobs: int | None = None,
    ) -> str | Iterator[str]:
        """Continue ``prompt`` (text or token ids). Returns the generated text, or with
        ``stream=True`` an iterator of text pieces as they are produced.

        ``reset=True`` starts from an empty context; ``reset=False`` continues the
        current one (chat-style). Stops at EOS, ``max_tokens`` (-1 or None: no limit, as
        llama.cpp's ``-n -1``), a stop string (not included in the output) or a full context;
        ``last_stats.stop_reason`` says which. Sampling defaults are llama.cpp's (the repetition
        penalty is off: 1.0). ``seed``: None or -1 = random.

        ``context_shift=True`` keeps generating when the context is full, like llama.cpp's
        context shift: the first token (BOS) and the newer half of the rest are kept, the older
        half is dropped, and the kept tokens are evaluated again (one prompt-sized pass).

        More samplers, with llama-cpp-python's names and llama.cpp's defaults and order
        (engine.sampling): ``frequency_penalty``, ``presence_penalty`` (over the last
        ``repeat_last_n`` tokens), ``typical_p``, ``mirostat_mode`` 1/2 with ``mirostat_tau`` and
        ``mirostat_eta``, ``dry_*``, ``xtc_*``, ``top_n_sigma``, ``logit_bias`` ({id: bias}),
        ``logits_processor`` (fn(ids, logits) -> logits, or a list of them), ``grammar`` (GBNF text
        or an ``engine.grammar.Grammar``). ``logprobs=k``: ``last_stats.logprobs`` gets each token's
        log-probability and the k most likely alternatives.
        """
        params = SamplingParams(
            temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, frequency_penalty=frequency_penalty,
            presence_penalty=presence_penalty, typical_p=typical_p, mirostat=mirostat_mode, mirostat_tau=mirostat_tau,
            mirostat_eta=mirostat_eta, dry_multiplier=dry_multiplier, dry_base=dry_base,
            dry_allowed_length=dry_allowed_length, dry_penalty_last_n=dry_penalty_last_n,
            dry_sequence_breakers=(SamplingParams.dry_sequence_breakers if dry_sequence_breakers is None
                                   else tuple(dry_sequence_breakers)),
            xtc_probability=xtc_probability, xtc_threshold=xtc_threshold, top_n_sigma=top_n_sigma)
        from engine.serving.completion import MAX_LOGPROBS

        if logprobs is not None:
            logprobs = check_int("logprobs", logprobs, 0)
            if logprobs > MAX_LOGPROBS:
                raise HalfbyteError(f"logprobs must be in 0..{MAX_LOGPROBS}, got {logprobs}")
        sampler = Sampler(params, np.random.default_rng(), self.tokenizer, check_logit_bias(logit_bias, self.n_vocab),
                          logits_processor, self._grammar_matcher(grammar))
        if max_tokens is None:
            max_tokens = -1
        max_tokens = check_int("max_tokens", max_tokens, -1, " (-1 = until end of text or a full context)")
        seed = check_seed(seed)
        if stop is None:
            stop = ()
        if isinstance(stop, str):
            stops = [stop]
        elif isinstance(stop, (bytes, dict)) or not isinstance(stop, (Sequence, set, frozenset)):
            raise HalfbyteError(f"stop must be a str or a list of str, got {_type_name(stop)}")
        else:
            stops = list(stop)
        if any(not isinstance(s, str) for s in stops):
            bad = next(s for s in stops if not isinstance(s, str))
            raise HalfbyteError(f"stop strings must be str, got {_type_name(bad)} {bad!r}")
        if any(not s for s in stops):
            raise HalfbyteError("stop strings must not be empty")
        stream = check_bool("stream", stream)
        add_bos = check_bool("add_bos", add_bos, allow_none=True)
        reset = check_bool("reset", reset)
        context_shift = check_bool("context_shift", context_shift)
        if isinstance(prompt, (str, bytes)):
            if isinstance(prompt, bytes):
                prompt = prompt.decode("utf-8", errors="replace")
            if not prompt and not (self.tokenizer.add_bos if add_bos is None else add_bos):
                raise HalfbyteError("empty prompt: give some text (or a model that adds a BOS token)")
            prompt_ids = self.tokenize(prompt, add_bos=add_bos)
        else:
            prompt_ids = check_token_ids(prompt, "prompt").tolist()
        if not prompt_ids:
            raise HalfbyteError("empty prompt: no tokens to start from")
        if len(prompt_ids) + (0 if reset else self.n_past) > self.n_ctx:
            raise HalfbyteError(
                f"prompt of {len(prompt_ids)} tokens does not fit in the context of {self.n_ctx} tokens "
                "(use a larger -c / n_ctx or a shorter prompt)"
            )
        pieces = self._generate(prompt_ids, max_tokens, params, seed, stops, reset, context_shift, sampler, logprobs)
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

    def _grammar_matcher(self, grammar):  # -> engine.grammar.GrammarMatcher | None
        if grammar is None:
            return None
        from engine.grammar import as_grammar

        return as_grammar(grammar).matcher(self.tokenizer)

    def _generate(self, prompt_ids: list[int], max_tokens: int, params: SamplingParams, seed: int | None,
                  stops: list[str], reset: bool, context_shift: bool = False, sampler: Sampler | None = None,
                  logprobs: int | None = None) -> Iterator[str]:
        rng = np.random.default_rng(seed)
        if sampler is None:
            sampler = Sampler(params, rng, self.tokenizer)
        sampler.rng = rng
        with self._exclusive():
            stats = GenerationStats()
            self.last_stats = stats
            if reset:  # the prompt's prefix already in the context is kept (its KV entries reused)
                keep = self._common_prefix(prompt_ids)
                self.tokens = self.tokens[:keep]
                self.cache.n_past = keep
                prompt_ids = prompt_ids[keep:]
            ids = self._check_tokens(prompt_ids)
            compiled = jit_cache.compile_seconds()
            start = time.perf_counter()
            logits = self._forward(ids, all_logits=False)[-1]
            stats.prompt_tokens = len(ids)
            stats.prompt_compile_seconds = jit_cache.compile_seconds() - compiled
            stats.prompt_seconds = max(0.0, time.perf_counter() - start - stats.prompt_compile_seconds)
            decoder = self.tokenizer.stream_decoder()
            held = ""  # text kept back because it might be the start of a stop string
            compiled = jit_cache.compile_seconds()
            gen_start = time.perf_counter()
            try:
                while True:
                    if 0 <= max_tokens <= stats.generated_tokens:
                        stats.stop_reason = STOP_LENGTH
                        break
                    token = sampler.sample(logits, self.tokens)
                    if token in self.tokenizer.eog_ids:
                        stats.stop_reason = STOP_EOS
                        break
                    sampler.accept(token)
                    if logprobs is not None:
                        from engine.serving.completion import token_record

                        stats.logprobs.append(token_record(self.tokenizer, logits, token, logprobs))
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
            except (GeneratorExit, KeyboardInterrupt):
                stats.stop_reason = stats.stop_reason or STOP_INTERRUPTED
                raise
            finally:
                stats.generation_compile_seconds = jit_cache.compile_seconds() - compiled
                stats.generation_seconds = max(
                    0.0, time.perf_counter() - gen_start - stats.generation_compile_seconds)

    # -- llama-cpp-python-style API ------------------------------------------------------------------

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True,
                            tools: Sequence[dict] | None = None, **template_kwargs) -> str:
        """The prompt text of ``messages`` ([{"role", "content"}, ...]) under this model's chat
        template, as transformers' ``apply_chat_template(..., tokenize=False)``."""
        add_generation_prompt = check_bool("add_generation_prompt", add_generation_prompt)
        return self.chat_template.render(messages, add_generation_prompt=add_generation_prompt, tools=tools,
                                         **template_kwargs)

    def _common_prefix(self, prompt_ids: list[int]) -> int:
        """Tokens at the start of the context that the prompt repeats (their KV entries are reused;
        at least the last prompt token is evaluated again, for its logits)."""
        common = 0
        for cached, new in zip(self.tokens, prompt_ids):
            if cached != new:
                break
            common += 1
        return min(common, len(prompt_ids) - 1)

    def _new_state(self, prompt_ids: list[int], settings, extra_stops: Sequence[str] = ()):
        from engine.serving.completion import SequenceState

        if len(prompt_ids) >= self.n_ctx:
            raise HalfbyteError(f"prompt of {len(prompt_ids)} tokens does not fit in the context of "
                                f"{self.n_ctx} tokens (use a larger -c / n_ctx or a shorter prompt)")
        return SequenceState(self.tokenizer, prompt_ids, settings, self.n_ctx, extra_stops)

    def _completion_steps(self, state, cache_prompt: bool = True) -> Iterator[tuple[str, list]]:
        """Generate for ``state`` (a ``SequenceState``): yields (text, new token records) per step.
        With ``cache_prompt`` the part of the context the prompt repeats is kept
        (llama-cpp-python's prefix reuse)."""
        prompt_ids = state.prompt_ids
        with self._exclusive():
            stats = GenerationStats()
            self.last_stats = stats
            keep = self._common_prefix(prompt_ids) if cache_prompt else 0
            self.tokens = self.tokens[:keep]
            self.cache.n_past = keep
            ids = self._check_tokens(prompt_ids[keep:])
            compiled = jit_cache.compile_seconds()
            start = time.perf_counter()
            logits = self._forward(ids, all_logits=False)[-1]
            stats.prompt_tokens = len(ids)
            stats.prompt_compile_seconds = jit_cache.compile_seconds() - compiled
            stats.prompt_seconds = max(0.0, time.perf_counter() - start - stats.prompt_compile_seconds)
            compiled = jit_cache.compile_seconds()
            gen_start = time.perf_counter()
            try:
                while True:
                    n_records = len(state.records)
                    token, text = state.step(logits)
                    stats.generated_tokens = len(state.generated)
                    stats.tokens = state.generated
                    if text or len(state.records) > n_records:
                        yield text, state.records[n_records:]
                    if token is None:
                        break
                    logits = self._forward(np.asarray([token]), all_logits=False)[-1]
                stats.stop_reason = state.finish_reason or ""
            except (GeneratorExit, KeyboardInterrupt):
                stats.stop_reason = stats.stop_reason or STOP_INTERRUPTED
                raise
            finally:
                stats.generation_compile_seconds = jit_cache.compile_seconds() - compiled
                stats.generation_seconds = max(
                    0.0, time.perf_counter() - gen_start - stats.generation_compile_seconds)

    def _prompt_ids(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, (str, bytes)):
            if isinstance(prompt, bytes):
                prompt = prompt.decode("utf-8", errors="replace")
            ids = self.tokenize(prompt)
        else:
            ids = check_token_ids(prompt, "prompt").tolist()
            self._check_range(np.asarray(ids, dtype=np.int64))
        if not ids:
            raise HalfbyteError("empty prompt: no tokens to start from")
        return ids

    def _sampling_extras(self, typical_p, mirostat_mode, mirostat_tau, mirostat_eta, logit_bias, logits_processor,
                         grammar, response_format, dry_multiplier, dry_base, dry_allowed_length, dry_penalty_last_n,
                         dry_sequence_breakers, xtc_probability, xtc_threshold, top_n_sigma) -> dict:
        """The Settings.build keywords of create_completion / create_chat_completion's sampling
        options: llama-cpp-python's names, llama.cpp's samplers; ``grammar`` (GBNF text or a
        Grammar) or ``response_format`` (OpenAI's json_object / json_schema) constrain the output."""
        from engine.grammar import grammar_for_request

        return dict(typical_p=typical_p, mirostat=mirostat_mode, mirostat_tau=mirostat_tau, mirostat_eta=mirostat_eta,
                    logit_bias=check_logit_bias(logit_bias, self.n_vocab), logits_processor=logits_processor,
                    grammar=grammar_for_request(grammar, response_format), dry_multiplier=dry_multiplier,
                    dry_base=dry_base, dry_allowed_length=dry_allowed_length, dry_penalty_last_n=dry_penalty_last_n,
                    dry_sequence_breakers=None if dry_sequence_breakers is None else tuple(dry_sequence_breakers),
                    xtc_probability=xtc_probability, xtc_threshold=xtc_threshold, top_n_sigma=top_n_sigma)

    def create_completion(
        self,
        prompt: str | Sequence[int],
        max_tokens: int | None = 16,
        temperature: float = 0.8,
        top_p: float = 0.95,
        top_k: int = 40,
        min_p: float = 0.05,
        repeat_penalty: float = 1.0,
        repeat_last_n: int = 64,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        typical_p: float = 1.0,
        mirostat_mode: int = 0,
        mirostat_tau: float = 5.0,
        mirostat_eta: float = 0.1,
        logit_bias: dict[int, float] | None = None,
        logits_processor=None,
        grammar=None,
        response_format: dict | None = None,
        dry_multiplier: float = 0.0,
        dry_base: float = 1.75,
        dry_allowed_length: int = 2,
        dry_penalty_last_n: int = 64,
        dry_sequence_breakers: Sequence[str] | None = None,
        xtc_probability: float = 0.0,
        xtc_threshold: float = 0.1,
        top_n_sigma: float = -1.0,
        stop: str | Sequence[str] | None = None,
        seed: int | None = None,
        stream: bool = False,
        logprobs: int | None = None,
        cache_prompt: bool = True,
    ) -> dict | Iterator[dict]:
        """Continue ``prompt`` (text or token ids); an OpenAI ``text_completion`` dict, or with
        ``stream=True`` an iterator of its chunks (llama-cpp-python's shapes).

        ``max_tokens`` None or -1: until an end-of-generation token or a full context.
        ``logprobs=k``: each token's log-probability and the k most likely alternatives.
        ``finish_reason`` is "stop" (end of generation, a stop string) or "length" (``max_tokens``,
        or the context is full). Defaults are llama-cpp-python's."""
        from engine.serving.completion import Settings

        extra = self._sampling_extras(typical_p, mirostat_mode, mirostat_tau, mirostat_eta, logit_bias,
                                      logits_processor, grammar, response_format, dry_multiplier, dry_base,
                                      dry_allowed_length, dry_penalty_last_n, dry_sequence_breakers,
                                      xtc_probability, xtc_threshold, top_n_sigma)
        settings = Settings.build(max_tokens, temperature, top_p, top_k, min_p, repeat_penalty, repeat_last_n,
                                  stop, seed, logprobs, presence_penalty, frequency_penalty,
                                  **extra)
        stream = check_bool("stream", stream)
        cache_prompt = check_bool("cache_prompt", cache_prompt)
        prompt_ids = self._prompt_ids(prompt)
        prompt_text = prompt if isinstance(prompt, str) else self.detokenize(prompt_ids)
        state = self._new_state(prompt_ids, settings)
        steps = self._completion_steps(state, cache_prompt)
        if stream:
            return self._completion_chunks(steps, state, len(prompt_text))
        return self._completion_result(steps, state, len(prompt_text))

    def _completion_result(self, steps, state, prompt_chars: int) -> dict:
        from engine.serving import completion as c

        text = "".join(piece for piece, _ in steps)
        settings, prompt_ids = state.settings, state.prompt_ids
        state.fill_offsets(prompt_chars)
        logprobs = c.completion_logprobs(self.tokenizer, state.records) if settings.logprobs is not None else None
        return c.completion_response(c.new_id("cmpl"), c.now(), self.name, text, state.finish_reason, logprobs,
                                     len(prompt_ids), len(state.generated))

    def _completion_chunks(self, steps, state, prompt_chars: int) -> Iterator[dict]:
        from engine.serving import completion as c

        settings = state.settings
        cid, created = c.new_id("cmpl"), c.now()
        position = prompt_chars
        pending: list = []
        for piece, records in steps:
            pending += records
            if not piece:
                continue
            for record in pending:
                record.offset, position = position, position + len(record.text)
            logprobs = c.completion_logprobs(self.tokenizer, pending) if settings.logprobs is not None else None
            pending = []
            yield c.completion_chunk(cid, created, self.name, piece, None, logprobs)
        logprobs = c.completion_logprobs(self.tokenizer, pending) if settings.logprobs is not None else None
        yield c.completion_chunk(cid, created, self.name, "", state.finish_reason, logprobs)

    def create_chat_completion(
        self,
        messages: Sequence[dict],
        tools: Sequence[dict] | None = None,
        max_tokens: int | None = None,
        temperature: float = 0.2,
        top_p: float = 0.95,
        top_k: int = 40,
        min_p: float = 0.05,
        repeat_penalty: float = 1.0,
        repeat_last_n: int = 64,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        typical_p: float = 1.0,
        mirostat_mode: int = 0,
        mirostat_tau: float = 5.0,
        mirostat_eta: float = 0.1,
        logit_bias: dict[int, float] | None = None,
        logits_processor=None,
        grammar=None,
        response_format: dict | None = None,
        dry_multiplier: float = 0.0,
        dry_base: float = 1.75,
        dry_allowed_length: int = 2,
        dry_penalty_last_n: int = 64,
        dry_sequence_breakers: Sequence[str] | None = None,
        xtc_probability: float = 0.0,
        xtc_threshold: float = 0.1,
        top_n_sigma: float = -1.0,
        stop: str | Sequence[str] | None = None,
        seed: int | None = None,
        stream: bool = False,
        logprobs: bool = False,
        top_logprobs: int | None = None,
        cache_prompt: bool = True,
        chat_template_kwargs: dict | None = None,
    ) -> dict | Iterator[dict]:
        """Answer a conversation: the messages rendered with the chat template, then generated
        until an end-of-generation token (or the template's turn-end text, a stop string,
        ``max_tokens``, a full context). An OpenAI ``chat.completion`` dict, or with
        ``stream=True`` an iterator of ``chat.completion.chunk`` dicts (the first carries the
        role, the last the finish reason). Defaults are llama-cpp-python's."""
        from engine.chat import prompt_tokens
        from engine.serving.completion import Settings

        logprobs = check_bool("logprobs", logprobs)
        if top_logprobs is not None and not logprobs:
            raise HalfbyteError("top_logprobs needs logprobs=True")
        extra = self._sampling_extras(typical_p, mirostat_mode, mirostat_tau, mirostat_eta, logit_bias,
                                      logits_processor, grammar, response_format, dry_multiplier, dry_base,
                                      dry_allowed_length, dry_penalty_last_n, dry_sequence_breakers,
                                      xtc_probability, xtc_threshold, top_n_sigma)
        settings = Settings.build(max_tokens, temperature, top_p, top_k, min_p, repeat_penalty, repeat_last_n,
                                  stop, seed, (top_logprobs or 0) if logprobs else None, presence_penalty,
                                  frequency_penalty, **extra)
        stream = check_bool("stream", stream)
        cache_prompt = check_bool("cache_prompt", cache_prompt)
        if chat_template_kwargs is not None and not isinstance(chat_template_kwargs, dict):
            raise HalfbyteError("chat_template_kwargs must be a dict")
        template = self.chat_template
        text = template.render(messages, add_generation_prompt=True, tools=tools, **(chat_template_kwargs or {}))
        prompt_ids = prompt_tokens(self.tokenizer, text)
        state = self._new_state(prompt_ids, settings, template.stop_texts)
        steps = self._completion_steps(state, cache_prompt)
        if stream:
            return self._chat_chunks(steps, state)
        return self._chat_result(steps, state)

    def _chat_result(self, steps, state) -> dict:
        from engine.serving import completion as c

        text = "".join(piece for piece, _ in steps)
        settings, prompt_ids = state.settings, state.prompt_ids
        logprobs = c.chat_logprobs(self.tokenizer, state.records) if settings.logprobs is not None else None
        return c.chat_response(c.new_id("chatcmpl"), c.now(), self.name, text, state.finish_reason, logprobs,
                               len(prompt_ids), len(state.generated))

    def _chat_chunks(self, steps, state) -> Iterator[dict]:
        from engine.serving import completion as c

        settings = state.settings
        cid, created = c.new_id("chatcmpl"), c.now()
        yield c.chat_chunk(cid, created, self.name, {"role": "assistant", "content": ""}, None)
        pending: list = []
        for piece, records in steps:
            pending += records
            if not piece:
                continue
            logprobs = c.chat_logprobs(self.tokenizer, pending) if settings.logprobs is not None else None
            pending = []
            yield c.chat_chunk(cid, created, self.name, {"content": piece}, None, logprobs)
        logprobs = (c.chat_logprobs(self.tokenizer, pending) if settings.logprobs is not None and pending
                    else None)
        yield c.chat_chunk(cid, created, self.name, {}, state.finish_reason, logprobs)

    # -- embeddings (engine/embeddings.py) -----------------------------------------------------------

    def embed(self, texts: str | Sequence[str], pooling: str = "mean", normalize: bool = True,
              truncate: bool = False) -> list[list[float]]:
        """One vector per text (a list of one for a str), like llama-cpp-python's ``embed`` and
        llama.cpp's embedding mode: the final hidden states after the output norm, pooled over the
        text's tokens (``mean``, ``cls``: the first token, ``last``: the last one) and divided by
        their Euclidean norm unless ``normalize=False``. Each text is evaluated from position 0 in
        a scratch KV cache: the model's context (``tokens``) is left as it was. A text longer than
        ``n_ctx`` is an error, or cut to it with ``truncate=True``."""
        from engine.embeddings import embed

        return embed(self, texts, pooling=pooling, normalize=normalize, truncate=truncate)

    def create_embedding(self, input: str | Sequence[str], model: str | None = None, pooling: str = "mean",
                         normalize: bool = True, truncate: bool = False) -> dict:
        """OpenAI's embeddings response for ``input`` (a str, a list of str, or token ids), as
        llama-cpp-python's ``create_embedding``: ``{"object": "list", "data": [{"object": "embedding",
        "embedding": [...], "index": i}], "model": ..., "usage": {...}}``."""
        from engine.embeddings import create_embedding

        return create_embedding(self, input, model_name=model, pooling=pooling, normalize=normalize,
                                truncate=truncate)

    # -- state, prefix cache, closing (engine/state.py) ------------------------------------------------

    def save_state(self, path: str | os.PathLike | None = None) -> bytes:
        """The context (tokens and the used part of the KV cache) as bytes, also written to ``path``
        when given (atomically); like llama-cpp-python's ``save_state`` / llama.cpp's
        ``llama_state_save_file``. ``load_state`` restores it into this model (same file, ``n_ctx``
        and KV cache types; anything else is an error naming both)."""
        from engine.state import save_state, write_state_file

        data = save_state(self)
        if path is not None:
            write_state_file(path, data)
        return data

    def load_state(self, state: bytes | str | os.PathLike) -> None:
        """Restore a context from ``save_state``'s bytes, or from a file it wrote. The next
        ``generate``/``create_completion`` with a prompt that starts with the restored tokens
        evaluates only the rest."""
        from engine.state import load_state, read_state_file

        if isinstance(state, (bytes, bytearray, memoryview)):
            load_state(self, bytes(state))
        elif isinstance(state, (str, os.PathLike)):
            load_state(self, read_state_file(state), where=str(state))
        else:
            raise HalfbyteError(f"state must be bytes or a path, got {_type_name(state)}")

    def close(self) -> None:
        """Release the KV cache and the file's memory map now (not at garbage collection); the model
        cannot be used afterwards. Also what ``with Model.load(...) as model:`` does at the end."""
        from engine.state import Closed

        with self._lock:
            if getattr(self, "_closed", False):
                return
            self._closed = True
            file = self.file
            self.arch = self.cache = self.file = Closed()  # any later use: "this model is closed"
            self.tokens = []
            file.close()

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
