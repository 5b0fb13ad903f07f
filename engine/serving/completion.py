"""One generation, token by token, and its OpenAI-shaped results (shared by ``Model.create_*`` and the server).

``Settings`` is a checked request (sampling, stop strings, limits, logprobs); ``SequenceState``
takes the logits of each step and decides the next token: it samples with the sequence's own
generator, stops at an end-of-generation token, ``max_tokens``, a stop string (not included in
the text) or a full context, and turns tokens into text pieces that never split a UTF-8
character or show the beginning of a stop string. The response builders make the dicts of
llama-cpp-python / the OpenAI API (``text_completion``, ``chat.completion`` and their chunks).

Log-probabilities are those of the model's distribution (log-softmax of the raw logits, before
penalties and temperature), as OpenAI and llama.cpp's server report them.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine.errors import HalfbyteError
from engine.sampling import Sampler, SamplingParams, check_logit_bias

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
MAX_LOGPROBS = 20
MAX_STOPS = 16


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def check_stops(stop: Any) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) for s in stops):
        raise HalfbyteError("stop must be a string or a list of strings")
    if len(stops) > MAX_STOPS:
        raise HalfbyteError(f"at most {MAX_STOPS} stop strings, got {len(stops)}")
    return [s for s in stops if s]  # OpenAI ignores empty ones


@dataclass
class Settings:
    """A checked completion request. ``max_tokens`` None: until the end of text or a full context."""

    max_tokens: int | None = 16
    params: SamplingParams = field(default_factory=SamplingParams)
    seed: int | None = None
    stops: list[str] = field(default_factory=list)
    logprobs: int | None = None  # None: no logprobs; k >= 0: the chosen token's and the top k
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logits_processor: list = field(default_factory=list)
    grammar: Any = None  # an engine.grammar.Grammar

    @classmethod
    def build(cls, max_tokens: Any = 16, temperature: Any = 0.8, top_p: Any = 0.95, top_k: Any = 40,
              min_p: Any = 0.05, repeat_penalty: Any = 1.0, repeat_last_n: Any = 64, stop: Any = None,
              seed: Any = None, logprobs: Any = None, presence_penalty: Any = 0.0,
              frequency_penalty: Any = 0.0, *, logit_bias: Any = None, logits_processor: Any = None,
              grammar: Any = None, **sampling: Any) -> Settings:
        """Every argument checked (``HalfbyteError`` names the bad one). ``sampling``: the other
        ``SamplingParams`` fields by name (``typical_p``, ``mirostat``, ``dry_multiplier``, ...)."""
        if max_tokens is not None:
            if not _is_int(max_tokens):
                raise HalfbyteError(f"max_tokens must be an integer or null, got {type(max_tokens).__name__}")
            if max_tokens == -1:  # llama.cpp's "no limit"
                max_tokens = None
            elif max_tokens < 1:
                raise HalfbyteError(f"max_tokens must be >= 1 (or null for no limit), got {max_tokens}")
        unknown = set(sampling) - set(SamplingParams.__dataclass_fields__)
        if unknown:
            raise HalfbyteError(f"unknown sampling option {sorted(unknown)[0]!r}")
        sampling = {k: v for k, v in sampling.items() if v is not None}
        if logits_processor is not None and not callable(logits_processor) and not (
                isinstance(logits_processor, (list, tuple)) and all(callable(f) for f in logits_processor)):
            raise HalfbyteError("logits_processor must be a callable or a list of callables fn(ids, logits)")
        processors = [] if logits_processor is None else (
            [logits_processor] if callable(logits_processor) else list(logits_processor))
        if seed is not None:
            if not _is_int(seed):
                raise HalfbyteError(f"seed must be an integer, got {type(seed).__name__}")
            seed = None if seed == -1 else int(seed) % 2**64
        if logprobs is not None:
            if not _is_int(logprobs) or not 0 <= logprobs <= MAX_LOGPROBS:
                raise HalfbyteError(f"logprobs must be an integer in 0..{MAX_LOGPROBS}, got {logprobs!r}")
            logprobs = int(logprobs)
        penalties = []
        for name, value in (("presence_penalty", presence_penalty), ("frequency_penalty", frequency_penalty)):
            value = 0.0 if value is None else value
            if not _is_number(value) or not math.isfinite(value) or not -2.0 <= value <= 2.0:
                raise HalfbyteError(f"{name} must be a number in [-2, 2], got {value!r}")
            penalties.append(float(value))
        params = SamplingParams(temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n,
                                presence_penalty=penalties[0], frequency_penalty=penalties[1], **sampling)
        return cls(None if max_tokens is None else int(max_tokens), params, seed, check_stops(stop), logprobs,
                   *penalties, check_logit_bias(logit_bias), processors, grammar)


@dataclass
class TokenRecord:
    """A generated token with what logprobs report about it."""

    token: int
    text: str
    data: bytes
    logprob: float | None = None
    top: list[tuple[int, float]] = field(default_factory=list)
    offset: int = 0  # characters of completion text before it


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    shifted = x - x.max()
    return shifted - math.log(np.exp(shifted).sum())


def token_record(tokenizer: Any, logits: np.ndarray, token: int, k: int) -> TokenRecord:
    """``token`` with its log-probability under ``logits`` (the raw distribution) and the ``k``
    most likely tokens."""
    lp = log_softmax(logits)
    top: list[tuple[int, float]] = []
    if k:
        k = min(k, lp.size)
        best = np.argpartition(-lp, k - 1)[:k]
        best = best[np.argsort(-lp[best], kind="stable")]
        top = [(int(i), float(lp[i])) for i in best]
    data = tokenizer.token_bytes(token)
    return TokenRecord(token, data.decode("utf-8", "replace"), data, float(lp[token]), top)


class SequenceState:
    """The generation of one sequence: feed it each step's logits with ``step(logits)``."""

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int], settings: Settings, n_ctx: int,
                 extra_stops: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.settings = settings
        self.n_ctx = n_ctx
        self.prompt_ids = list(prompt_ids)
        self.stops = list(dict.fromkeys([*settings.stops, *[s for s in extra_stops if s]]))
        self.rng = np.random.default_rng(settings.seed)
        self.generated: list[int] = []
        self.records: list[TokenRecord] = []
        self.text = ""  # emitted so far
        self.finish_reason: str | None = None
        self._decoder = tokenizer.stream_decoder()
        self._held = ""
        grammar = settings.grammar.matcher(tokenizer) if settings.grammar is not None else None
        self.sampler = Sampler(settings.params, self.rng, tokenizer, settings.logit_bias, settings.logits_processor,
                               grammar)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def n_tokens(self) -> int:
        """Tokens of the sequence: the KV cache holds all but the last one (evaluated next)."""
        return len(self.prompt_ids) + len(self.generated)

    def step(self, logits: np.ndarray) -> tuple[int | None, str]:
        """Choose the next token from ``logits`` (1-D). Returns the token (None once finished:
        nothing more to evaluate) and the text that became final with it."""
        if self.done:
            return None, ""
        s = self.settings
        if s.max_tokens is not None and len(self.generated) >= s.max_tokens:
            return None, self._finish(FINISH_LENGTH)
        token = self.sampler.sample(logits, self.prompt_ids + self.generated)
        if token in self.tokenizer.eog_ids:
            return None, self._finish(FINISH_STOP)
        self.sampler.accept(token)
        self.generated.append(token)
        if s.logprobs is not None:
            self.records.append(token_record(self.tokenizer, logits, token, s.logprobs))
        self._held += self._decoder.feed(token)
        ready = ""
        if self.stops:
            cut = min((i for i in (self._held.find(stop) for stop in self.stops) if i >= 0), default=-1)
            if cut >= 0:
                ready, self._held = self._held[:cut], ""
                self._emit(ready)
                self.finish_reason = FINISH_STOP
                return None, ready
            # all but the longest tail that could still begin a stop string
            keep = max((k for stop in self.stops for k in range(1, len(stop)) if self._held.endswith(stop[:k])),
                       default=0)
            ready, self._held = self._held[: len(self._held) - keep], self._held[len(self._held) - keep:]
        else:
            ready, self._held = self._held, ""
        self._emit(ready)
        if s.max_tokens is not None and len(self.generated) >= s.max_tokens:
            return None, ready + self._finish(FINISH_LENGTH)
        if self.n_tokens > self.n_ctx:  # no room to evaluate this token: the context is full
            return None, ready + self._finish(FINISH_LENGTH)
        return token, ready

    def _emit(self, text: str) -> None:
        self.text += text

    def _finish(self, reason: str) -> str:
        self.finish_reason = reason
        rest = self._held + self._decoder.flush()
        self._held = ""
        if self.stops:  # a stop string completed by the flush
            cut = min((i for i in (rest.find(stop) for stop in self.stops) if i >= 0), default=-1)
            if cut >= 0:
                rest = rest[:cut]
        self.text += rest
        return rest

    def fill_offsets(self, base: int = 0) -> None:
        """Text offsets of the records: ``base`` + characters generated before each token."""
        position = 0
        for record in self.records:
            record.offset = base + position
            position += len(record.text)


# -- response shapes (llama-cpp-python / OpenAI) ----------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_logprobs(tokenizer: Any, records: Sequence[TokenRecord]) -> dict[str, Any]:
    """The legacy completions ``logprobs`` object: tokens, text_offset, token_logprobs, top_logprobs."""
    return {
        "tokens": [r.text for r in records],
        "text_offset": [r.offset for r in records],
        "token_logprobs": [r.logprob for r in records],
        "top_logprobs": [{tokenizer.token_bytes(i).decode("utf-8", "replace"): lp for i, lp in r.top}
                         for r in records],
    }


def chat_logprobs(tokenizer: Any, records: Sequence[TokenRecord]) -> dict[str, Any]:
    """The chat ``logprobs`` object: ``content`` = [{token, logprob, bytes, top_logprobs}]."""
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        data = tokenizer.token_bytes(token_id)
        return {"token": data.decode("utf-8", "replace"), "logprob": logprob, "bytes": list(data)}

    return {"content": [{**entry(r.token, r.logprob), "top_logprobs": [entry(i, lp) for i, lp in r.top]}
                        for r in records], "refusal": None}


def completion_response(cid: str, created: int, model: str, text: str, finish_reason: str | None,
                        logprobs: dict | None, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "id": cid, "object": "text_completion", "created": created, "model": model,
        "choices": [{"text": text, "index": 0, "logprobs": logprobs, "finish_reason": finish_reason}],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def completion_chunk(cid: str, created: int, model: str, text: str, finish_reason: str | None,
                     logprobs: dict | None = None) -> dict[str, Any]:
    return {
        "id": cid, "object": "text_completion", "created": created, "model": model,
        "choices": [{"text": text, "index": 0, "logprobs": logprobs, "finish_reason": finish_reason}],
    }


def chat_response(cid: str, created: int, model: str, text: str, finish_reason: str | None,
                  logprobs: dict | None, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "id": cid, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                     "finish_reason": finish_reason}],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chat_chunk(cid: str, created: int, model: str, delta: dict[str, Any], finish_reason: str | None,
               logprobs: dict | None = None) -> dict[str, Any]:
    return {
        "id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}],
    }


def now() -> int:
    return int(time.time())
