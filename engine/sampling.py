"""Choosing the next token from logits, in llama.cpp's order and with its defaults.

The chain (llama.cpp's ``common_sampler_init`` with its default ``--samplers``)::

    logits processors -> logit bias -> [grammar] -> penalties -> DRY -> top-n-sigma -> top-k
    -> typical-p -> top-p -> min-p -> XTC -> temperature -> draw

``--mirostat 1|2`` replaces everything after the logit bias (and the grammar) by temperature ->
mirostat, as in llama.cpp (so penalties and DRY do not run under mirostat there either). A
temperature of 0 (or below a tiny epsilon) means greedy: the highest logit that survives the
chain wins, ties going to the lowest id.

A grammar is used as llama.cpp uses it: the chain samples without it first; a token the grammar
accepts is kept, otherwise the grammar masks the logits and the chain samples again.

Draws come from one ``numpy.random.Generator`` seeded by the caller, so a seed makes a whole
generation reproducible here. It is not llama.cpp's generator (mt19937 behind
``std::discrete_distribution``), so the same seed gives other text than llama.cpp's.

Each sampler is also a plain function of numpy arrays (``apply_penalties``, ``apply_dry``,
``top_n_sigma``, ``typical``, ``xtc``, ``mirostat_v1``, ...) so it can be checked on its own.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.errors import HalfbyteError

DEFAULT_DRY_BREAKERS = ("\n", ":", '"', "*")  # llama.cpp's dry_sequence_breakers
MIROSTAT_M = 100  # llama.cpp's m for mirostat v1
_FLOAT_MAX_LOG = 88.7228391  # log(FLT_MAX): DRY's exponent cap


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
    """llama.cpp's names and defaults: temperature 0.8, top-k 40, top-p 0.95, min-p 0.05, repetition
    penalty 1.0 (off) over the last 64 tokens (-1: the whole context), frequency and presence
    penalties 0 (off, same window), typical-p 1.0 (off), mirostat 0 (off; tau 5.0, eta 0.1), DRY
    multiplier 0 (off; base 1.75, allowed length 2, last 64 tokens, breakers ``\\n : " *``), XTC
    probability 0 (off; threshold 0.1), top-n-sigma -1 (off)."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    typical_p: float = 1.0
    mirostat: int = 0
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    dry_multiplier: float = 0.0
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_penalty_last_n: int = 64
    dry_sequence_breakers: tuple[str, ...] = DEFAULT_DRY_BREAKERS
    xtc_probability: float = 0.0
    xtc_threshold: float = 0.1
    top_n_sigma: float = -1.0

    def __post_init__(self) -> None:
        values: dict[str, Any] = {}
        for name, label in (("temperature", "temperature"), ("top_p", "top-p"), ("min_p", "min-p"),
                            ("repeat_penalty", "repeat penalty"), ("frequency_penalty", "frequency penalty"),
                            ("presence_penalty", "presence penalty"), ("typical_p", "typical-p"),
                            ("mirostat_tau", "mirostat tau (--mirostat-ent)"),
                            ("mirostat_eta", "mirostat eta (--mirostat-lr)"), ("dry_multiplier", "DRY multiplier"),
                            ("dry_base", "DRY base"), ("xtc_probability", "XTC probability"),
                            ("xtc_threshold", "XTC threshold"), ("top_n_sigma", "top-n-sigma")):
            values[name] = _number(label, getattr(self, name))
        for name, label in (("top_k", "top-k"), ("repeat_last_n", "repeat-last-n"), ("mirostat", "mirostat"),
                            ("dry_allowed_length", "DRY allowed length"),
                            ("dry_penalty_last_n", "DRY penalty-last-n")):
            values[name] = _integer(label, getattr(self, name))
        breakers = self.dry_sequence_breakers
        if isinstance(breakers, str) or not all(isinstance(b, str) for b in breakers):
            raise HalfbyteError("DRY sequence breakers must be a list of strings")
        values["dry_sequence_breakers"] = tuple(b for b in breakers if b)
        v = values
        if v["temperature"] < 0:
            raise HalfbyteError(f"temperature must be >= 0, got {v['temperature']}")
        if v["top_k"] < 0:
            raise HalfbyteError(f"top-k must be >= 0 (0 = off), got {v['top_k']}")
        if not (0 < v["top_p"] <= 1):
            raise HalfbyteError(f"top-p must be in (0, 1], got {v['top_p']}")
        if not (0 <= v["min_p"] <= 1):
            raise HalfbyteError(f"min-p must be in [0, 1], got {v['min_p']}")
        if v["repeat_penalty"] <= 0:
            raise HalfbyteError(f"repeat penalty must be > 0, got {v['repeat_penalty']}")
        if v["repeat_last_n"] < -1:
            raise HalfbyteError(f"repeat-last-n must be >= 0, or -1 for the whole context, got {v['repeat_last_n']}")
        if not (0 < v["typical_p"] <= 1):
            raise HalfbyteError(f"typical-p must be in (0, 1] (1 = off), got {v['typical_p']}")
        if v["mirostat"] not in (0, 1, 2):
            raise HalfbyteError(f"mirostat must be 0 (off), 1 or 2, got {v['mirostat']}")
        if v["mirostat_tau"] < 0 or v["mirostat_eta"] < 0:
            raise HalfbyteError("mirostat tau and eta must be >= 0")
        if v["dry_multiplier"] < 0:
            raise HalfbyteError(f"DRY multiplier must be >= 0 (0 = off), got {v['dry_multiplier']}")
        if v["dry_base"] < 1:
            raise HalfbyteError(f"DRY base must be >= 1, got {v['dry_base']}")
        if v["dry_allowed_length"] < 0:
            raise HalfbyteError(f"DRY allowed length must be >= 0, got {v['dry_allowed_length']}")
        if v["dry_penalty_last_n"] < -1:
            raise HalfbyteError(f"DRY penalty-last-n must be >= 0, or -1 for the whole context, "
                                f"got {v['dry_penalty_last_n']}")
        if not (0 <= v["xtc_probability"] <= 1):
            raise HalfbyteError(f"XTC probability must be in [0, 1] (0 = off), got {v['xtc_probability']}")
        if v["xtc_threshold"] < 0:
            raise HalfbyteError(f"XTC threshold must be >= 0 (> 0.5 = off), got {v['xtc_threshold']}")
        for name, value in values.items():
            object.__setattr__(self, name, value)  # plain Python numbers from here on

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-6

    @property
    def penalties_on(self) -> bool:
        return bool(self.repeat_last_n) and (self.repeat_penalty != 1.0 or self.frequency_penalty != 0.0
                                             or self.presence_penalty != 0.0)

    @property
    def dry_on(self) -> bool:
        return self.dry_multiplier != 0.0 and self.dry_penalty_last_n != 0


# -- the samplers, one function each -----------------------------------------------------------------


def _window(history: Sequence[int], last_n: int) -> Sequence[int]:
    if last_n < 0:
        return history
    return history[len(history) - last_n:] if last_n else history[:0]


def apply_repeat_penalty(logits: np.ndarray, recent: Sequence[int], penalty: float) -> np.ndarray:
    """llama.cpp / CTRL penalty: positive logits of recent tokens divided, negative multiplied."""
    return apply_penalties(logits, recent, penalty)


def apply_penalties(logits: np.ndarray, recent: Sequence[int], repeat: float = 1.0, frequency: float = 0.0,
                    presence: float = 0.0) -> np.ndarray:
    """llama.cpp's penalties sampler over the tokens in ``recent`` (its window): a token seen c > 0
    times gets its logit divided by ``repeat`` (multiplied if <= 0), then ``c * frequency +
    presence`` subtracted."""
    if (repeat == 1.0 and frequency == 0.0 and presence == 0.0) or not len(recent):
        return logits
    ids, counts = np.unique(np.asarray(recent, dtype=np.int64), return_counts=True)
    keep = (ids >= 0) & (ids < logits.shape[0])
    ids, counts = ids[keep], counts[keep]
    logits = np.array(logits, dtype=np.float32)
    values = logits[ids]
    if repeat != 1.0:
        values = np.where(values <= 0, values * np.float32(repeat), values / np.float32(repeat))
    if frequency != 0.0 or presence != 0.0:
        values = values - (counts.astype(np.float32) * np.float32(frequency) + np.float32(presence))
    logits[ids] = values
    return logits


# DRY: sequence breakers as token sequences, per tokenizer (building them reads the vocabulary).
_breaker_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def dry_breakers(tokenizer: Any, breakers: Sequence[str], max_tail: int = 40) -> dict[int, list[tuple[int, ...]]]:
    """For each token that can start a sequence breaker: the token sequences that must follow it
    (``()`` when the token's text holds a whole breaker). A token whose text ends with the start of
    a breaker is followed by the tokenization of the breaker's rest (as llama.cpp does it)."""
    key = tuple(breakers)
    per_tokenizer = _breaker_cache.setdefault(tokenizer, {})
    if key in per_tokenizer:
        return per_tokenizer[key]
    result: dict[int, list[tuple[int, ...]]] = {}
    for token in range(tokenizer.vocab_size):
        word = tokenizer.token_bytes(token, render_special=True).decode("utf-8", "replace")
        if not word:
            continue
        for breaker in breakers:
            if breaker in word:
                tails = [()]
            else:
                tails = []
                for start in range(len(word)):  # a suffix of word that is a prefix of the breaker
                    suffix = word[start:]
                    if len(suffix) < len(breaker) and breaker.startswith(suffix):
                        rest = tuple(tokenizer.encode(breaker[len(suffix):], add_bos=False)[:max_tail])
                        tails.append(rest)
            for tail in tails:
                seqs = result.setdefault(token, [])
                if tail not in seqs:
                    seqs.append(tail)
    per_tokenizer[key] = result
    return result


def dry_penalties(history: Sequence[int], multiplier: float, base: float, allowed_length: int,
                  breakers: Mapping[int, Sequence[Sequence[int]]] | None = None) -> dict[int, float]:
    """DRY ("don't repeat yourself"): for each token t that followed an earlier occurrence of the
    last n tokens of ``history`` (n the longest such match, n >= ``allowed_length``, the match not
    reaching back past the latest sequence breaker), the penalty
    ``multiplier * base ** (n - allowed_length)``. Tokens that are whole breakers are exempt."""
    breakers = breakers or {}
    h = np.asarray(history, dtype=np.int64)
    n_hist = len(h)
    if multiplier == 0.0 or n_hist <= allowed_length:
        return {}
    # rep_limit: how far back a match may reach (tokens after the most recent breaker)
    rep_limit = n_hist
    for i in range(n_hist):  # i tokens back from the end
        token = int(h[n_hist - 1 - i])
        if token not in breakers:
            continue
        longest = -1
        for tail in breakers[token]:
            if longest < len(tail) <= i and all(tail[o] == h[n_hist - i + o] for o in range(len(tail))):
                longest = len(tail)
        if longest >= 0:
            rep_limit = i - longest
            break
    if rep_limit < allowed_length:
        return {}
    # match[j]: length of the common suffix of h[:j+1] and h (j < n_hist - 1), capped at rep_limit
    j = np.arange(n_hist - 1)
    match = np.zeros(n_hist - 1, dtype=np.int64)
    alive = np.ones(n_hist - 1, dtype=bool)
    for m in range(rep_limit):
        alive &= j - m >= 0
        if not alive.any():
            break
        alive[alive] = h[j[alive] - m] == h[n_hist - 1 - m]
        match += alive
    best: dict[int, int] = {}
    for pos in np.nonzero(match >= allowed_length)[0]:
        token = int(h[pos + 1])
        best[token] = max(best.get(token, 0), int(match[pos]))
    max_exponent = int(_FLOAT_MAX_LOG / math.log(base)) if base > 1.000001 else 0
    out = {}
    for token, length in best.items():
        if () in [tuple(t) for t in breakers.get(token, ())]:
            continue
        exponent = length - allowed_length
        if max_exponent > 0:
            exponent = min(exponent, max_exponent)
        out[token] = multiplier * base ** exponent
    return out


def _softmax(values: np.ndarray) -> np.ndarray:
    e = np.exp(values - values.max())
    return e / e.sum()


def top_n_sigma(logits: np.ndarray, n: float) -> np.ndarray:
    """Keep the logits within ``n`` standard deviations of the maximum (over the finite ones);
    the rest become -inf. ``n <= 0``: off."""
    finite = np.isfinite(logits)
    if n <= 0 or logits.size <= 1 or not finite.any():
        return logits
    vals = logits[finite].astype(np.float64)
    top, std = vals.max(), vals.std()
    return np.where(logits < top - n * std, -np.inf, logits).astype(logits.dtype)


def typical(values: np.ndarray, p: float, min_keep: int = 1) -> np.ndarray:
    """Locally typical sampling: indices (into ``values``, logits of the candidates) of the tokens
    whose surprise is closest to the entropy, fewest first, until their mass exceeds ``p``."""
    if p >= 1.0:
        return np.arange(values.size)
    probs = _softmax(values.astype(np.float64))
    logp = np.log(probs)
    entropy = -(probs * logp).sum()
    order = np.argsort(np.abs(-logp - entropy), kind="stable")
    cum = np.cumsum(probs[order])
    over = np.nonzero(cum > p)[0]
    keep = len(order) if not over.size else max(int(over[0]) + 1, min_keep)
    return order[:keep]


def xtc(probs: np.ndarray, threshold: float, min_keep: int = 1) -> int:
    """Exclude Top Choices: with candidates sorted by probability, the number of leading ones to
    drop (all above ``threshold`` but the least likely of them; 0 if fewer than two are above)."""
    above = int(np.count_nonzero(probs >= threshold))
    if above >= 2 and probs.size - (above - 1) >= min_keep:
        return above - 1
    return 0


def mirostat_v1_k(probs: np.ndarray, tau_mu: float, n_vocab: int, m: int = MIROSTAT_M) -> int:
    """Mirostat 1.0's top-k for the current ``mu`` from the sorted ``probs`` (Zipf exponent
    estimated over the ``m`` most likely tokens)."""
    n = min(m - 1, probs.size - 1)
    i = np.arange(n, dtype=np.float64)
    t = np.log((i + 2) / (i + 1))
    b = np.log(probs[:n] / probs[1:n + 1])
    s_hat = float((t * b).sum() / (t * t).sum()) if n > 0 else 1.0
    eps = s_hat - 1
    k = ((eps * 2.0 ** tau_mu) / (1 - n_vocab ** (-eps))) ** (1 / s_hat)
    return max(int(k) if math.isfinite(k) else probs.size, 1)


# -- the chain --------------------------------------------------------------------------------------

LogitsProcessor = Callable[[np.ndarray, np.ndarray], np.ndarray]


def check_logit_bias(logit_bias: Any, n_vocab: int | None = None) -> dict[int, float]:
    """``{token_id: bias}`` (keys may be strings of ids, as in OpenAI's JSON); ``-inf`` bans a token."""
    if logit_bias is None:
        return {}
    if isinstance(logit_bias, Mapping):
        items = list(logit_bias.items())
    elif isinstance(logit_bias, (list, tuple)):  # llama.cpp's server also takes [[id, bias], ...]
        items = [tuple(pair) for pair in logit_bias]
        if not all(len(pair) == 2 for pair in items):
            raise HalfbyteError("logit_bias must be a {token_id: bias} mapping or a list of [token_id, bias] pairs")
    else:
        raise HalfbyteError(f"logit_bias must be a {{token_id: bias}} mapping, got {type(logit_bias).__name__}")
    out = {}
    for key, value in items:
        try:
            token = int(key) if not isinstance(key, (bool, float)) else None
        except (TypeError, ValueError):
            token = None
        if token is None:
            raise HalfbyteError(f"logit_bias keys must be token ids, got {key!r}")
        if n_vocab is not None and not 0 <= token < n_vocab:
            raise HalfbyteError(f"logit_bias token id {token} is out of range (vocabulary has {n_vocab} tokens)")
        if value is False or value is None:
            value = -math.inf  # llama.cpp's server: false bans the token
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
                or math.isnan(value):
            raise HalfbyteError(f"logit_bias values must be numbers, got {value!r}")
        out[token] = float(value)
    return out


class Sampler:
    """The sampler chain of one generation: ``sample(logits, history)`` returns the next token.

    ``history``: the tokens of the context so far (prompt included, as llama.cpp's samplers see
    them), for the penalties, DRY and the logits processors. Mirostat keeps its ``mu`` here;
    ``grammar`` (an ``engine.grammar.GrammarMatcher``) is advanced by ``accept(token)``."""

    def __init__(self, params: SamplingParams, rng: np.random.Generator, tokenizer: Any = None,
                 logit_bias: Mapping[int, float] | None = None,
                 logits_processor: Sequence[LogitsProcessor] | LogitsProcessor | None = None,
                 grammar: Any = None) -> None:
        self.params = params
        self.rng = rng
        self.tokenizer = tokenizer
        self.logit_bias = dict(logit_bias or {})
        if logits_processor is None:
            processors: list = []
        elif callable(logits_processor):
            processors = [logits_processor]
        else:
            processors = list(logits_processor)
            if not all(callable(p) for p in processors):
                raise HalfbyteError("logits_processor must be a callable or a list of callables fn(ids, logits)")
        self.processors = processors
        self.grammar = grammar
        self.mu = 2.0 * params.mirostat_tau
        self._breakers = None

    # the logits before the chain: processors, then the logit bias
    def _prepare(self, logits: np.ndarray, history: Sequence[int]) -> np.ndarray:
        logits = np.asarray(logits, dtype=np.float32)
        if self.processors:
            ids = np.asarray(history, dtype=np.intc)
            logits = np.array(logits, dtype=np.float32)
            for processor in self.processors:
                out = processor(ids, logits)
                out = np.asarray(logits if out is None else out, dtype=np.float32)
                if out.shape != logits.shape:
                    raise HalfbyteError(f"a logits processor returned shape {out.shape}, expected {logits.shape}")
                logits = out
        if self.logit_bias:
            logits = np.array(logits, dtype=np.float32)
            for token, bias in self.logit_bias.items():
                if 0 <= token < logits.shape[0]:
                    logits[token] += np.float32(bias)
        return logits

    def sample(self, logits: np.ndarray, history: Sequence[int] = ()) -> int:
        logits = self._prepare(logits, history)
        if self.grammar is None:
            token, mu = self._chain(logits, history)
        else:
            token, mu = self._chain(logits, history)
            if not self.grammar.allows(token):
                masked = self.grammar.mask_logits(logits)
                if not np.isfinite(masked).any():
                    return self.grammar.fallback_token()
                token, mu = self._chain(masked, history)
        self.mu = mu
        return token

    def accept(self, token: int) -> None:
        if self.grammar is not None:
            self.grammar.accept(token)

    def _dry(self, logits: np.ndarray, history: Sequence[int]) -> np.ndarray:
        p = self.params
        window = _window(history, p.dry_penalty_last_n)
        if self._breakers is None:
            self._breakers = (dry_breakers(self.tokenizer, p.dry_sequence_breakers)
                              if self.tokenizer is not None and p.dry_sequence_breakers else {})
        penalties = dry_penalties(window, p.dry_multiplier, p.dry_base, p.dry_allowed_length, self._breakers)
        if not penalties:
            return logits
        logits = np.array(logits, dtype=np.float32)
        for token, penalty in penalties.items():
            if 0 <= token < logits.shape[0]:
                logits[token] -= np.float32(penalty)
        return logits

    def _chain(self, logits: np.ndarray, history: Sequence[int]) -> tuple[int, float]:
        """One pass of the chain: (token, mirostat's mu after it)."""
        p = self.params
        if p.mirostat:
            return self._mirostat(logits)
        candidates, weights = self.distribution(logits, history)
        if weights is None:
            return int(candidates[0]), self.mu
        return int(candidates[self.rng.choice(len(candidates), p=weights)]), self.mu

    def distribution(self, logits: np.ndarray, history: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray | None]:
        """What the chain (without mirostat) leaves to draw from: candidate ids, most likely first,
        and their probabilities (None when greedy: the first candidate wins). XTC's coin is thrown."""
        p = self.params
        logits = np.asarray(logits, dtype=np.float32)
        if p.penalties_on:
            logits = apply_penalties(logits, _window(history, p.repeat_last_n), p.repeat_penalty,
                                     p.frequency_penalty, p.presence_penalty)
        if p.dry_on:
            logits = self._dry(logits, history)
        if p.top_n_sigma > 0:
            logits = top_n_sigma(logits, p.top_n_sigma)
        if p.greedy and not p.xtc_probability:
            return np.asarray([int(np.argmax(logits))]), None

        # Candidates sorted by logit, highest first; stable so equal logits keep id order.
        n_vocab = logits.shape[0]
        n_finite = int(np.count_nonzero(logits > -np.inf))
        k = n_vocab if p.top_k <= 0 else min(p.top_k, n_vocab)
        if n_finite < k:  # masked (-inf) tokens never become candidates
            k = max(n_finite, 1)
        if k < n_vocab:
            candidates = np.argpartition(-logits, k - 1)[:k]
        else:
            candidates = np.arange(n_vocab)
        candidates = candidates[np.argsort(-logits[candidates], kind="stable")]
        chosen = logits[candidates].astype(np.float64)

        if p.typical_p < 1.0:
            keep = np.sort(typical(chosen, p.typical_p))  # back in logit order
            chosen, candidates = chosen[keep], candidates[keep]
        probs = np.exp(chosen - chosen[0])
        probs /= probs.sum()
        if p.top_p < 1.0:
            # Keep the smallest prefix whose mass reaches top_p (at least one token).
            keep = int(np.searchsorted(np.cumsum(probs), p.top_p) + 1)
            chosen, candidates, probs = chosen[:keep], candidates[:keep], probs[:keep]
        if p.min_p > 0.0:
            keep = max(int(np.count_nonzero(probs >= p.min_p * probs[0])), 1)
            chosen, candidates = chosen[:keep], candidates[:keep]
        if p.xtc_probability > 0.0 and p.xtc_threshold <= 0.5 and len(candidates) >= 2:
            if self.rng.random() <= p.xtc_probability:
                drop = xtc(_softmax(chosen), p.xtc_threshold)
                chosen, candidates = chosen[drop:], candidates[drop:]
        if p.greedy:
            return candidates[:1], None

        scaled = (chosen - chosen[0]) / p.temperature
        weights = np.exp(scaled)
        weights /= weights.sum()
        return candidates, weights

    def _mirostat(self, logits: np.ndarray) -> tuple[int, float]:
        p = self.params
        if p.greedy:
            return int(np.argmax(logits)), self.mu
        order = np.argsort(-logits, kind="stable")
        order = order[np.isfinite(logits[order])]
        scaled = logits[order].astype(np.float64) / p.temperature
        probs = _softmax(scaled)
        if p.mirostat == 1:
            k = mirostat_v1_k(probs, self.mu, logits.shape[0])
            order, scaled = order[:k], scaled[:k]
        else:
            # probabilities fall along the sorted list: keep those whose surprise is at most mu
            keep = max(int(np.count_nonzero(-np.log2(probs) <= self.mu)), 1)
            order, scaled = order[:keep], scaled[:keep]
        probs = _softmax(scaled)
        idx = int(self.rng.choice(len(order), p=probs))
        surprise = -math.log2(probs[idx])
        return int(order[idx]), self.mu - p.mirostat_eta * (surprise - p.mirostat_tau)


def sample_token(
    logits: np.ndarray, params: SamplingParams, rng: np.random.Generator, recent: Sequence[int] = ()
) -> int:
    """One token id from a 1-D logits vector (a chain without state: no mirostat memory, grammar,
    bias or processors; ``recent`` is the context for the penalties and DRY)."""
    return Sampler(params, rng).sample(logits, recent)


# -- command-line options (llama.cpp's flags), shared by `halfbyte run` (and any command that samples) --------


def parse_logit_bias_flags(values: Sequence[str]) -> dict[int, float]:
    """llama.cpp's ``-l TOKEN_ID(+/-)BIAS`` (``15043+1``, ``15043-inf``), repeatable."""
    out: dict[int, float] = {}
    for value in values:
        text = value.strip()
        cut = next((i for i in range(1, len(text)) if text[i] in "+-"), -1)
        try:
            if cut < 0:
                raise ValueError
            token, bias = int(text[:cut]), float(text[cut:])
            if token < 0 or math.isnan(bias):
                raise ValueError
        except ValueError:
            raise HalfbyteError(f"-l/--logit-bias must be TOKEN_ID(+/-)BIAS (e.g. 15043+1 or 15043-inf), "
                                f"got {value!r}") from None
        out[token] = bias
    return out


_CLI_OPTIONS = (
    # (flags, dest, type, default, help)
    (("--presence-penalty",), "presence_penalty", float, 0.0,
     "Presence penalty over the last --repeat-last-n tokens (0 = off)."),
    (("--frequency-penalty",), "frequency_penalty", float, 0.0,
     "Frequency penalty over the last --repeat-last-n tokens (0 = off)."),
    (("--typical", "--typical-p"), "typical_p", float, 1.0, "Locally typical sampling, parameter p (1 = off)."),
    (("--mirostat",), "mirostat_mode", int, 0,
     "Mirostat sampling: 0 off, 1 Mirostat, 2 Mirostat 2.0 (replaces top-k/top-p/min-p/typical/XTC and the "
     "penalties, as in llama.cpp)."),
    (("--mirostat-lr",), "mirostat_eta", float, 0.1, "Mirostat learning rate, eta."),
    (("--mirostat-ent",), "mirostat_tau", float, 5.0, "Mirostat target entropy, tau."),
    (("--dry-multiplier",), "dry_multiplier", float, 0.0, "DRY sampling multiplier (0 = off)."),
    (("--dry-base",), "dry_base", float, 1.75, "DRY sampling base."),
    (("--dry-allowed-length",), "dry_allowed_length", int, 2, "DRY: repetitions longer than this are penalized."),
    (("--dry-penalty-last-n",), "dry_penalty_last_n", int, 64,
     "DRY: tokens to scan for repetitions (0 = off, -1 = the whole context)."),
    (("--xtc-probability",), "xtc_probability", float, 0.0, "XTC probability (0 = off)."),
    (("--xtc-threshold",), "xtc_threshold", float, 0.1, "XTC threshold (> 0.5 = off)."),
    (("--top-nsigma", "--top-n-sigma"), "top_n_sigma", float, -1.0, "Top-n-sigma sampling (-1 = off)."),
)


def cli_sampling_options(command: Callable) -> Callable:
    """Click options for llama.cpp's other samplers, grammars and JSON schemas; the command takes
    them as keyword arguments and passes ``cli_sampling_kwargs(**them)`` to ``Model.generate``."""
    import click

    options = [click.option(*flags, dest, type=kind, default=default, show_default=True, help=text)
               for flags, dest, kind, default, text in _CLI_OPTIONS]
    options += [
        click.option("--dry-sequence-breaker", "dry_sequence_breaker", multiple=True, metavar="STRING",
                     help="DRY sequence breaker (repeatable; replaces the defaults \\n : \" *; \"none\" for none)."),
        click.option("-l", "--logit-bias", "logit_bias", multiple=True, metavar="TOKEN_ID(+/-)BIAS",
                     help="Add BIAS to a token's logit, e.g. 15043+1 or 15043-inf (repeatable)."),
        click.option("--grammar", "grammar", default=None, metavar="GRAMMAR",
                     help="Constrain the output with a GBNF grammar (llama.cpp's format)."),
        click.option("--grammar-file", "grammar_file", default=None, metavar="FILE",
                     help="Read the grammar from FILE."),
        click.option("-j", "--json-schema", "json_schema", default=None, metavar="SCHEMA",
                     help="Constrain the output to JSON valid for this JSON Schema ('{}' for any JSON object)."),
        click.option("-jf", "--json-schema-file", "json_schema_file", default=None, metavar="FILE",
                     help="Read the JSON Schema from FILE."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def cli_sampling_kwargs(dry_sequence_breaker: Sequence[str] = (), logit_bias: Sequence[str] = (),
                        grammar: str | None = None, grammar_file: str | None = None, json_schema: str | None = None,
                        json_schema_file: str | None = None, **values: Any) -> dict[str, Any]:
    """The ``Model.generate`` keywords of ``cli_sampling_options``' values, checked (before the model
    loads): a bad number, grammar or schema is a one-line ``HalfbyteError``."""
    mirostat = values.pop("mirostat_mode", 0)
    breakers = None
    if dry_sequence_breaker:
        breakers = () if list(dry_sequence_breaker) == ["none"] else tuple(
            b.encode().decode("unicode_escape") for b in dry_sequence_breaker if b != "none")
    SamplingParams(mirostat=mirostat, dry_sequence_breakers=breakers or (), **values)
    kwargs = dict(values, mirostat_mode=mirostat, logit_bias=parse_logit_bias_flags(logit_bias) or None)
    if breakers is not None:
        kwargs["dry_sequence_breakers"] = breakers
    sources = [s for s in (grammar, grammar_file, json_schema, json_schema_file) if s is not None]
    if len(sources) > 1:
        raise HalfbyteError("give one of --grammar, --grammar-file, -j/--json-schema, -jf/--json-schema-file")
    if sources:
        from engine.grammar import grammar_from_cli

        kwargs["grammar"] = grammar_from_cli(grammar, grammar_file, json_schema, json_schema_file)
    return kwargs
