"""The samplers of engine.sampling, each against a direct numpy / Python implementation of its
definition (llama.cpp's), their order in the chain, and the library options that reach them."""

from __future__ import annotations

import math

import numpy as np
import pytest

from engine.errors import HalfbyteError
from engine.sampling import (
    Sampler,
    SamplingParams,
    apply_penalties,
    check_logit_bias,
    dry_penalties,
    mirostat_v1_k,
    sample_token,
    top_n_sigma,
    typical,
    xtc,
)


def softmax(x):
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def test_defaults_are_llama_cpp_s():
    p = SamplingParams()
    assert (p.temperature, p.top_k, p.top_p, p.min_p) == (0.8, 40, 0.95, 0.05)
    assert (p.repeat_penalty, p.repeat_last_n, p.frequency_penalty, p.presence_penalty) == (1.0, 64, 0.0, 0.0)
    assert (p.typical_p, p.mirostat, p.mirostat_tau, p.mirostat_eta) == (1.0, 0, 5.0, 0.1)
    assert (p.dry_multiplier, p.dry_base, p.dry_allowed_length, p.dry_penalty_last_n) == (0.0, 1.75, 2, 64)
    assert p.dry_sequence_breakers == ("\n", ":", '"', "*")
    assert (p.xtc_probability, p.xtc_threshold, p.top_n_sigma) == (0.0, 0.1, -1.0)


@pytest.mark.parametrize("bad", [dict(typical_p=0.0), dict(mirostat=3), dict(dry_base=0.5), dict(xtc_probability=2),
                                 dict(dry_multiplier=-1), dict(top_k=-1), dict(presence_penalty=float("nan"))])
def test_bad_values_are_refused(bad):
    with pytest.raises(HalfbyteError):
        SamplingParams(**bad)


def test_penalties_match_their_definition(rng):
    logits = rng.normal(size=50).astype(np.float32) * 3
    recent = list(rng.integers(0, 50, size=30))
    out = apply_penalties(logits, recent, repeat=1.3, frequency=0.4, presence=0.7)
    ref = logits.astype(np.float64).copy()
    for t in set(recent):
        c = recent.count(t)
        v = ref[t] / 1.3 if ref[t] > 0 else ref[t] * 1.3
        ref[t] = v - c * 0.4 - 0.7
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)


def test_penalties_use_the_last_n_window(rng):
    logits = np.zeros(10, np.float32)
    params = SamplingParams(temperature=0, presence_penalty=5.0, repeat_last_n=2, top_k=0, top_p=1, min_p=0)
    # token 0 is outside the window of 2, so it keeps the top logit (ties -> lowest id)
    assert Sampler(params, rng).sample(logits, [0, 1, 2]) == 0
    assert Sampler(params, rng).sample(logits, [1, 0, 2]) == 1


def dry_reference(history, multiplier, base, allowed, breakers=frozenset()):
    """DRY by its definition: the longest suffix of the history that occurred before, followed by t."""
    n = len(history)
    if n <= allowed:
        return {}
    limit = n
    for back in range(n):  # tokens after the most recent breaker
        if history[n - 1 - back] in breakers:
            limit = back
            break
    if limit < allowed:
        return {}
    best = {}
    for j in range(n - 1):  # an earlier end position; the token that followed it is history[j + 1]
        m = 0
        while m < limit and j - m >= 0 and history[j - m] == history[n - 1 - m]:
            m += 1
        if m >= allowed:
            t = history[j + 1]
            best[t] = max(best.get(t, 0), m)
    return {t: multiplier * base ** (m - allowed) for t, m in best.items() if t not in breakers}


@pytest.mark.parametrize("seed", range(12))
def test_dry_matches_its_definition(seed):
    r = np.random.default_rng(seed)
    pattern = list(r.integers(0, 6, size=r.integers(3, 8)))
    history = (pattern * 6)[: r.integers(10, 40)] + list(r.integers(0, 6, size=r.integers(0, 4)))
    history = [int(t) for t in history]
    allowed = int(r.integers(1, 4))
    breakers = {5} if seed % 3 == 0 else set()
    got = dry_penalties(history, 0.8, 1.75, allowed, {b: [()] for b in breakers})
    ref = dry_reference(history, 0.8, 1.75, allowed, breakers)
    assert got.keys() == ref.keys()
    for t in ref:
        assert math.isclose(got[t], ref[t], rel_tol=1e-9)


def test_dry_breakers_limit_the_match():
    history = [5, 1, 2, 3, 4, 5, 1, 2, 3]
    assert dry_penalties(history, 1.0, 2.0, 2) == {4: 4.0}  # "5 1 2 3" seen before, followed by 4
    assert dry_penalties(history, 1.0, 2.0, 2, {5: [()]}) == {4: 2.0}  # the match stops at the breaker 5
    assert dry_penalties(history, 1.0, 2.0, 2, {5: [(1,)]}) == {4: 1.0}  # breaker "5 1": only "2 3" counts
    assert dry_penalties(history, 1.0, 2.0, 2, {2: [()]}) == {}  # one token after the breaker < allowed


def test_dry_breakers_from_a_vocabulary(demo_model):
    from engine.sampling import dry_breakers

    table = dry_breakers(demo_model.tokenizer, ("\n", ":"))
    newline = [t for t in range(demo_model.n_vocab) if demo_model.tokenizer.token_bytes(t) == b"\n"]
    assert newline and all(() in table[t] for t in newline)
    colon_words = [t for t in range(demo_model.n_vocab) if b":" in demo_model.tokenizer.token_bytes(t)]
    assert all(() in table[t] for t in colon_words)


def test_top_n_sigma_matches_its_definition(rng):
    logits = rng.normal(size=200).astype(np.float32) * 2
    logits[[3, 9]] = -np.inf
    for n in (0.5, 1.0, 2.5):
        out = top_n_sigma(logits, n)
        finite = logits[np.isfinite(logits)].astype(np.float64)
        cut = finite.max() - n * np.sqrt(((finite - finite.mean()) ** 2).mean())
        assert np.array_equal(np.isfinite(out), np.isfinite(logits) & (logits >= cut))
    assert top_n_sigma(logits, -1) is logits


def test_typical_matches_its_definition(rng):
    for p in (0.2, 0.5, 0.9):
        logits = np.sort(rng.normal(size=40) * 2)[::-1]
        probs = softmax(logits)
        entropy = -(probs * np.log(probs)).sum()
        order = sorted(range(40), key=lambda i: abs(-math.log(probs[i]) - entropy))
        kept, total = [], 0.0
        for i in order:
            kept.append(i)
            total += probs[i]
            if total > p:
                break
        assert list(typical(logits, p)) == kept


def test_xtc_matches_its_definition():
    probs = np.array([0.4, 0.3, 0.15, 0.1, 0.05])
    assert xtc(probs, 0.1) == 3  # 0.4, 0.3, 0.15 go; 0.1 (the least likely above) stays
    assert xtc(probs, 0.35) == 0  # one above the threshold: nothing removed
    assert xtc(probs, 0.3) == 1


def test_xtc_in_the_chain_removes_top_choices(rng):
    logits = np.log(np.array([0.4, 0.3, 0.15, 0.1, 0.05], np.float32))
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, xtc_probability=1.0, xtc_threshold=0.09)
    ids, weights = Sampler(params, rng).distribution(logits)
    assert list(ids) == [3, 4]
    np.testing.assert_allclose(weights, [2 / 3, 1 / 3])


def test_mirostat_v1_k_matches_its_formula(rng):
    probs = np.sort(softmax(rng.normal(size=500) * 3))[::-1]
    mu, n_vocab = 10.0, 500
    t = [math.log((i + 2) / (i + 1)) for i in range(99)]
    b = [math.log(probs[i] / probs[i + 1]) for i in range(99)]
    s_hat = sum(x * y for x, y in zip(t, b)) / sum(x * x for x in t)
    eps = s_hat - 1
    k = ((eps * 2 ** mu) / (1 - n_vocab ** -eps)) ** (1 / s_hat)
    assert mirostat_v1_k(probs, mu, n_vocab) == max(int(k), 1)


@pytest.mark.parametrize("mode", [1, 2])
def test_mirostat_draws_within_its_truncation_and_updates_mu(mode, rng):
    logits = (rng.normal(size=300) * 3).astype(np.float32)
    params = SamplingParams(temperature=0.7, mirostat=mode, mirostat_tau=3.0, mirostat_eta=0.2)
    sampler = Sampler(params, np.random.default_rng(5))
    assert sampler.mu == 6.0
    for _ in range(20):
        mu = sampler.mu
        order = np.argsort(-logits, kind="stable")
        probs = softmax(logits[order].astype(np.float64) / 0.7)
        if mode == 2:
            keep = max(int(np.count_nonzero(-np.log2(probs) <= mu)), 1)
        else:
            keep = mirostat_v1_k(probs, mu, logits.size)
        allowed = order[:keep]
        token = sampler.sample(logits)
        assert token in allowed
        p = softmax(logits[allowed].astype(np.float64) / 0.7)[list(allowed).index(token)]
        assert math.isclose(sampler.mu, mu - 0.2 * (-math.log2(p) - 3.0), rel_tol=1e-9)


def reference_chain(logits, p: SamplingParams):
    """top-k -> typical -> top-p -> min-p -> temperature, written from the definitions."""
    order = sorted(range(len(logits)), key=lambda i: (-logits[i], i))
    if p.top_k > 0:
        order = order[: p.top_k]
    if p.typical_p < 1:
        order = sorted(order[i] for i in typical(np.asarray([logits[i] for i in order]), p.typical_p))
        order = sorted(order, key=lambda i: (-logits[i], i))
    probs = softmax([logits[i] for i in order])
    cum, keep = 0.0, len(order)
    for j, q in enumerate(probs):
        cum += q
        if cum >= p.top_p:
            keep = j + 1
            break
    order, probs = order[:keep], probs[:keep]
    order = [i for i, q in zip(order, probs) if q >= p.min_p * probs[0]] or order[:1]
    weights = softmax([logits[i] / p.temperature for i in order])
    return order, weights


@pytest.mark.parametrize("seed", range(6))
def test_the_chain_in_llama_cpp_s_order(seed):
    r = np.random.default_rng(seed)
    logits = (r.normal(size=100) * 2).astype(np.float32)
    p = SamplingParams(temperature=float(r.uniform(0.3, 1.5)), top_k=int(r.integers(0, 60)),
                       top_p=float(r.uniform(0.5, 1.0)), min_p=float(r.uniform(0, 0.2)),
                       typical_p=float(r.choice([1.0, 0.7])))
    ids, weights = Sampler(p, r).distribution(logits)
    ref_ids, ref_w = reference_chain(logits.astype(np.float64), p)
    assert list(ids) == ref_ids
    np.testing.assert_allclose(weights, ref_w, rtol=1e-6)


def test_penalties_come_before_top_k(rng):
    logits = np.array([5.0, 4.0, 0.0, -1.0], np.float32)
    p = SamplingParams(temperature=1.0, top_k=1, presence_penalty=2.0)
    ids, _ = Sampler(p, rng).distribution(logits, [0])
    assert list(ids) == [1]  # token 0 penalized to 3.0 before top-k keeps one


def test_logit_bias_and_processors(rng):
    logits = np.zeros(8, np.float32)
    seen = []

    def processor(ids, scores):
        seen.append((ids.dtype, list(ids)))
        out = scores.copy()
        out[6] += 10
        return out

    params = SamplingParams(temperature=0)
    assert Sampler(params, rng, logit_bias={3: 5.0}).sample(logits) == 3
    assert Sampler(params, rng, logit_bias={3: 5.0}, logits_processor=[processor]).sample(logits, [1, 2]) == 6
    assert seen == [(np.intc, [1, 2])]
    assert Sampler(params, rng, logit_bias={0: -math.inf}).sample(logits) == 1
    assert check_logit_bias({"12": -1, 5: False}) == {12: -1.0, 5: -math.inf}
    with pytest.raises(HalfbyteError):
        check_logit_bias({"x": 1})
    with pytest.raises(HalfbyteError):
        check_logit_bias({99: 1}, n_vocab=10)


def test_sample_token_greedy_ties_go_to_the_lowest_id(rng):
    logits = np.array([1.0, 3.0, 3.0, 2.0], np.float32)
    assert sample_token(logits, SamplingParams(temperature=0), rng) == 1


# -- through the library ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_model():
    from engine.default_model import default_model_path
    from engine.model import Model

    return Model.load(default_model_path(), n_ctx=256)


def test_generate_takes_the_new_samplers(demo_model):
    base = dict(max_tokens=12, seed=7)
    for extra in (dict(typical_p=0.5), dict(mirostat_mode=2), dict(mirostat_mode=1, mirostat_tau=3.0),
                  dict(dry_multiplier=0.8), dict(xtc_probability=0.5), dict(top_n_sigma=1.0),
                  dict(presence_penalty=0.5, frequency_penalty=0.5)):
        a = demo_model.generate("And the LORD said", **base, **extra)
        b = demo_model.generate("And the LORD said", **base, **extra)
        assert a == b and a  # a seed makes every chain reproducible


def test_generate_logits_processor_and_logprobs(demo_model):
    target = demo_model.tokenize(" the", add_bos=False)[-1]

    def only_the(ids, scores):
        out = np.full_like(scores, -np.inf)
        out[target] = 0
        return out

    text = demo_model.generate("And", max_tokens=4, seed=1, logits_processor=only_the, logprobs=3)
    assert text == " the" * 4
    records = demo_model.last_stats.logprobs
    assert [r.token for r in records] == [target] * 4
    assert all(len(r.top) == 3 and r.logprob <= r.top[0][1] for r in records)


def test_create_completion_passes_llama_cpp_python_names(demo_model):
    banned = demo_model.tokenize(",", add_bos=False)[-1]
    out = demo_model.create_completion("And the LORD said", max_tokens=20, seed=2, typical_p=0.9, mirostat_mode=0,
                                       logit_bias={banned: -math.inf}, temperature=0)
    assert "," not in out["choices"][0]["text"]
    chat = demo_model.create_chat_completion([{"role": "user", "content": "Hi"}], max_tokens=8, seed=1,
                                             mirostat_mode=2, mirostat_tau=4.0, mirostat_eta=0.2)
    assert chat["choices"][0]["finish_reason"] in ("stop", "length")


# -- command line and server ---------------------------------------------------------------------------


def run_cli(*args):
    from click.testing import CliRunner

    from engine.cli import main

    return CliRunner().invoke(main, ["run", *map(str, args)])


def test_run_takes_llama_cpp_s_sampler_flags(demo_model):
    from engine.default_model import default_model_path

    args = [default_model_path(), "-p", "And the LORD", "-n", 8, "-s", 3, "-c", 64, "--typical", 0.8, "--mirostat", 0,
            "--dry-multiplier", 0.8, "--dry-base", 1.75, "--dry-allowed-length", 2, "--dry-penalty-last-n", -1,
            "--dry-sequence-breaker", "\\n", "--xtc-probability", 0.5, "--xtc-threshold", 0.1, "--top-nsigma", 1.5,
            "--presence-penalty", 0.3, "--frequency-penalty", 0.2, "-l", "5+1", "-l", "6-inf"]
    first, second = run_cli(*args), run_cli(*args)
    assert first.exit_code == 0, first.output
    assert first.stdout == second.stdout
    miro = run_cli(default_model_path(), "-p", "And", "-n", 4, "--mirostat", 2, "--mirostat-lr", 0.2,
                   "--mirostat-ent", 4)
    assert miro.exit_code == 0, miro.output


@pytest.mark.parametrize("args, message", [
    (["-l", "abc"], "-l/--logit-bias must be TOKEN_ID(+/-)BIAS"),
    (["--mirostat", 3], "mirostat must be 0 (off), 1 or 2"),
    (["--typical", 0], "typical-p must be in (0, 1]"),
    (["--dry-base", 0.5], "DRY base must be >= 1"),
])
def test_run_refuses_bad_sampler_flags_in_one_line(args, message):
    result = run_cli("-p", "x", *args)
    assert result.exit_code == 1
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_server_fields_reach_the_settings():
    from types import SimpleNamespace

    from engine.server import ApiError, Service

    service = Service(SimpleNamespace(n_vocab=100), SimpleNamespace(n_ctx=64))
    body = {"prompt": "x", "typical_p": 0.5, "mirostat": 2, "mirostat_tau": 3.0, "mirostat_eta": 0.2,
            "dry_multiplier": 0.8, "dry_sequence_breakers": ["\n"], "xtc_probability": 0.1, "top_n_sigma": 1.0,
            "logit_bias": {"7": -100}, "presence_penalty": 0.5}
    settings = service.settings(body, chat=False)
    p = settings.params
    assert (p.typical_p, p.mirostat, p.mirostat_tau, p.mirostat_eta) == (0.5, 2, 3.0, 0.2)
    assert (p.dry_multiplier, p.dry_sequence_breakers, p.xtc_probability, p.top_n_sigma) == (0.8, ("\n",), 0.1, 1.0)
    assert p.presence_penalty == 0.5 and settings.logit_bias == {7: -100.0}
    with pytest.raises(ApiError):
        service.settings({"prompt": "x", "logit_bias": {"1000": 1}}, chat=False)
    with pytest.raises(ApiError):
        service.settings({"prompt": "x", "mirostat": 5}, chat=False)
