"""Causal attention over the KV cache against numpy and torch scaled_dot_product_attention."""

from __future__ import annotations

import contextlib

import numba
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

from engine.errors import HalfbyteError
from engine.kernels.attention import KVCache, attend, reference_attention
from engine.kernels.ops import alibi_slopes

HEAD_LAYOUTS = [(8, 8), (8, 2), (8, 1)]  # (n_head, n_kv_head): multi-head, grouped-query, multi-query


@contextlib.contextmanager
def threads(n: int):
    previous = numba.get_num_threads()
    numba.set_num_threads(n)
    try:
        yield
    finally:
        numba.set_num_threads(previous)


def fill_cache(rng, n_layer, n_ctx, n_kv_head, head_dim, n_keys, dtype, layer=0):
    cache = KVCache(n_layer, n_ctx, n_kv_head, head_dim, dtype)
    k = rng.standard_normal((n_keys, n_kv_head, head_dim), dtype=np.float32)
    v = rng.standard_normal((n_keys, n_kv_head, head_dim), dtype=np.float32)
    cache.store(layer, k, v, 0)
    return cache, k, v


def torch_attention(q, k, v, n_past, scale, bias=None):
    """q (n_tok, n_head, hd); k, v (n_keys, n_kv_head, hd) float32 -> (n_tok, n_head, hd)."""
    n_tok, n_head, _ = q.shape
    n_keys = n_past + n_tok
    group = n_head // k.shape[1]
    qt = torch.from_numpy(q).transpose(0, 1)  # (n_head, n_tok, hd)
    kt = torch.from_numpy(k[:n_keys]).transpose(0, 1).repeat_interleave(group, dim=0)
    vt = torch.from_numpy(v[:n_keys]).transpose(0, 1).repeat_interleave(group, dim=0)
    allowed = torch.arange(n_keys)[None, :] <= (n_past + torch.arange(n_tok))[:, None]
    mask = torch.zeros(n_tok, n_keys).masked_fill(~allowed, float("-inf"))
    if bias is not None:
        mask = mask + bias  # (n_head, n_tok, n_keys)
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale)
    return out.transpose(0, 1).numpy()


@pytest.mark.parametrize("n_head,n_kv_head", HEAD_LAYOUTS)
@pytest.mark.parametrize("n_past,n_tok", [(0, 9), (13, 6), (40, 1)])  # prompt, continued prompt, decode
def test_attend_matches_torch_sdpa(n_head, n_kv_head, n_past, n_tok):
    rng = np.random.default_rng(n_head * 100 + n_kv_head * 10 + n_past)
    head_dim = 32
    cache, k, v = fill_cache(rng, 2, 64, n_kv_head, head_dim, n_past + n_tok, np.float32, layer=1)
    q = rng.standard_normal((n_tok, n_head, head_dim), dtype=np.float32)
    scale = 1 / np.sqrt(head_dim)
    out = attend(q, cache.keys(1), cache.values(1), n_past, scale)
    assert out.shape == q.shape and out.dtype == np.float32
    np.testing.assert_allclose(out, torch_attention(q, k, v, n_past, scale), atol=2e-6)
    np.testing.assert_allclose(out, reference_attention(q, cache.keys(1), cache.values(1), n_past, scale), atol=1e-6)


@pytest.mark.parametrize("n_head", [4, 6])
def test_attend_with_alibi_matches_mpt_bias(n_head):
    rng = np.random.default_rng(n_head)
    n_past, n_tok, head_dim = 5, 7, 16
    n_keys = n_past + n_tok
    cache, k, v = fill_cache(rng, 1, 32, n_head, head_dim, n_keys, np.float32)
    q = rng.standard_normal((n_tok, n_head, head_dim), dtype=np.float32)
    scale = 1 / np.sqrt(head_dim)
    out = attend(q, cache.keys(0), cache.values(0), n_past, scale, alibi_slopes(n_head, 8.0))
    # transformers' MPT adds slope * (j - (n_keys - 1)) to every query row; softmax ignores the
    # per-row constant, so this equals our slope * (j - i).
    bias = build_mpt_alibi_tensor(n_head, n_keys, 8.0).expand(n_head, n_tok, n_keys)
    np.testing.assert_allclose(out, torch_attention(q, k, v, n_past, scale, bias), atol=2e-6)
    np.testing.assert_allclose(
        out, reference_attention(q, cache.keys(0), cache.values(0), n_past, scale, alibi_slopes(n_head, 8.0)),
        atol=1e-6)


@pytest.mark.parametrize("n_head,n_kv_head", HEAD_LAYOUTS)
def test_fp16_cache(n_head, n_kv_head):
    rng = np.random.default_rng(5)
    n_past, n_tok, head_dim = 20, 4, 64
    cache, k, v = fill_cache(rng, 1, 32, n_kv_head, head_dim, n_past + n_tok, np.float16)
    assert cache.k.dtype == np.float16
    q = rng.standard_normal((n_tok, n_head, head_dim), dtype=np.float32)
    out = attend(q, cache.keys(0), cache.values(0), n_past, 0.125)
    # Exact on the values the cache holds (fp16 widens exactly) ...
    rounded = reference_attention(q, cache.keys(0).astype(np.float32), cache.values(0).astype(np.float32),
                                  n_past, 0.125)
    np.testing.assert_allclose(out, rounded, atol=1e-6)
    # ... and within fp16 storage error (2^-11 relative per element) of the float32 inputs.
    np.testing.assert_allclose(out, torch_attention(q, k, v, n_past, 0.125), atol=3e-3)


def test_one_and_two_threads_agree_bit_for_bit():
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("Numba runs with a single thread here")
    rng = np.random.default_rng(6)
    for dtype in (np.float32, np.float16):
        cache, _, _ = fill_cache(rng, 1, 48, 2, 32, 30, dtype)
        q = rng.standard_normal((11, 6, 32), dtype=np.float32)
        with threads(1):
            one = attend(q, cache.keys(0), cache.values(0), 19, 0.2, alibi_slopes(6, 8.0))
        with threads(2):
            two = attend(q, cache.keys(0), cache.values(0), 19, 0.2, alibi_slopes(6, 8.0))
        np.testing.assert_array_equal(one, two)


@pytest.mark.parametrize("dtype", [np.float16, np.float32], ids=["f16", "f32"])
@pytest.mark.parametrize("head_dim, window, softcap, alibi", [(64, 0, 0.0, False), (80, 37, 0.0, False),
                                                              (128, 0, 30.0, False), (64, 0, 0.0, True)])
def test_prompt_tiles_match_one_token_at_a_time_bit_for_bit(dtype, head_dim, window, softcap, alibi, monkeypatch):
    """A prompt's tiles of 8 tokens x 8 query heads take their scores with the keys in the vector
    lanes (and F16 values widened once per chunk); one token at a time (8 queries) does not. The
    same bits either way: a prompt and its token-by-token decode agree exactly."""
    from engine.kernels import attention

    n_head, n_kv_head, n_past, n_tok = 32, 4, 150, 40
    monkeypatch.setattr(attention, "_LANE_KEYS", 0)  # the lanes from the first key (1024 in use)
    assert attention._TILE_TOKENS * n_head // n_kv_head >= attention._LANE_QUERIES  # the lanes run
    rng = np.random.default_rng(head_dim + window)
    cache, _, _ = fill_cache(rng, 1, n_past + n_tok, n_kv_head, head_dim, n_past + n_tok, dtype)
    q = rng.standard_normal((n_tok, n_head, head_dim), dtype=np.float32) * 2
    slopes = alibi_slopes(n_head, 8.0) if alibi else None
    keys, values = cache.keys(0), cache.values(0)
    prompt = attend(q, keys, values, n_past, 0.125, slopes, window=window, softcap=softcap)
    for t in range(n_tok):
        one = attend(q[t : t + 1], keys, values, n_past + t, 0.125, slopes, window=window, softcap=softcap)
        np.testing.assert_array_equal(one[0].view(np.uint32), prompt[t].view(np.uint32))


def test_parallel_kernel_calls_the_tiles_through_their_address_without_their_code(monkeypatch):
    """The parallel kernel calls a tile by address: its module holds no copy of either tile (a
    linked copy is optimized again in every caller, which doubled attention's first-use compile),
    and one kernel specialization serves both tiles with the same bits."""
    from engine.kernels import attention

    rng = np.random.default_rng(3)
    cache, _, _ = fill_cache(rng, 1, 48, 4, 64, 48, np.float16)
    q = rng.standard_normal((40, 32, 64), dtype=np.float32)
    plain = attend(q, cache.keys(0), cache.values(0), 8, 0.125)
    monkeypatch.setattr(attention, "_LANE_KEYS", 0)
    lanes = attend(q, cache.keys(0), cache.values(0), 8, 0.125)
    np.testing.assert_array_equal(plain.view(np.uint32), lanes.view(np.uint32))
    tiles = {key[0] for key in attention._TILE_ADDRESSES}
    assert {attention._attend_tile, attention._attend_tile_lanes} <= tiles
    # a fresh, uncached copy of the kernel (Numba cannot show the IR of code loaded from its cache)
    kernel = numba.njit(parallel=True)(attention._attend_kernel.py_func)
    args = (q, cache.keys(0).view(np.uint16), cache.values(0).view(np.uint16), 8, np.float32(0.125),
            np.zeros(32, np.float32), False, 0, np.float32(0.0), np.empty_like(q))
    kernel(attention._tile_address(attention._attend_tile, args), *args)
    np.testing.assert_array_equal(args[-1].view(np.uint32), plain.view(np.uint32))
    kernel_ir = "".join(kernel.inspect_llvm().values())
    assert "inttoptr" in kernel_ir and "_attend_tile" not in kernel_ir and "_exp_weights" not in kernel_ir


def test_first_token_attends_only_to_itself():
    rng = np.random.default_rng(7)
    cache, _, v = fill_cache(rng, 1, 8, 1, 8, 1, np.float32)
    out = attend(rng.standard_normal((1, 4, 8), dtype=np.float32), cache.keys(0), cache.values(0), 0, 1.0)
    np.testing.assert_allclose(out, np.repeat(v, 4, axis=1), rtol=1e-6)


def test_kv_cache_bookkeeping():
    cache = KVCache(n_layer=2, n_ctx=8, n_kv_head=2, head_dim=4)
    assert cache.dtype == np.float16 and cache.k.shape == (2, 8, 2, 4) and cache.n_past == 0
    assert cache.nbytes == 2 * 2 * 8 * 2 * 4 * 2
    k = np.full((3, 2, 4), 1.5, np.float32)
    cache.store(0, k, -k, 0)
    cache.store(1, k, -k, 0)
    assert cache.n_past == 3
    np.testing.assert_array_equal(cache.keys(1)[:3], 1.5)
    np.testing.assert_array_equal(cache.values(0)[:3], -1.5)
    cache.store(0, k[:1] * 2, k[:1], 3)
    assert cache.n_past == 4 and cache.keys(0)[3, 0, 0] == 3.0
    cache.reset()
    assert cache.n_past == 0
    with pytest.raises(HalfbyteError, match="do not fit"):
        cache.store(0, k, k, 6)
    with pytest.raises(HalfbyteError, match="out of range"):
        cache.store(2, k, k, 0)
    with pytest.raises(HalfbyteError, match="keys and values"):
        cache.store(0, k[:, :1], k[:, :1], 0)
    with pytest.raises(HalfbyteError, match="f16, f32, q8_0"):
        KVCache(1, 4, 1, 4, np.float64)
    assert KVCache(1, 4, 1, 4, np.float32).k.dtype == np.float32


def test_attend_rejects_bad_shapes():
    cache = KVCache(1, 8, 2, 4, np.float32)
    q = np.zeros((2, 3, 4), np.float32)
    with pytest.raises(HalfbyteError, match="evenly"):
        attend(q, cache.keys(0), cache.values(0), 0, 1.0)
    q = np.zeros((2, 4, 4), np.float32)
    with pytest.raises(HalfbyteError, match="do not fit"):
        attend(q, cache.keys(0), cache.values(0), 7, 1.0)
    with pytest.raises(HalfbyteError, match="one slope per head"):
        attend(q, cache.keys(0), cache.values(0), 0, 1.0, np.ones(3, np.float32))
    with pytest.raises(HalfbyteError, match="C-contiguous"):
        attend(q, cache.keys(0)[:, :, :2], cache.values(0), 0, 1.0)
    assert attend(np.zeros((0, 4, 4), np.float32), cache.keys(0), cache.values(0), 0, 1.0).shape == (0, 4, 4)


@pytest.mark.parametrize("type_k,type_v", [("q8_0", "q8_0"), ("f16", "q8_0"), ("q8_0", "f32")])
def test_q8_0_cache_matches_the_reference_on_its_own_values(type_k: str, type_v: str) -> None:
    """llama.cpp's -ctk/-ctv q8_0: keys/values stored as ggml Q8_0 blocks (gguf's exact quantizer);
    attention over them equals the float64 reference over the dequantized cache."""
    import gguf

    rng = np.random.default_rng(5)
    cache = KVCache(2, 48, 2, 64, type_k, type_v)
    k = rng.standard_normal((40, 2, 64)).astype(np.float32)
    v = rng.standard_normal((40, 2, 64)).astype(np.float32)
    cache.store(1, k, v, 0)
    expected_k = gguf.quants.quantize(k.reshape(-1, 64), gguf.GGMLQuantizationType.Q8_0)
    if type_k == "q8_0":
        assert cache.k.dtype == np.uint8 and cache.keys(1)[:40].tobytes() == expected_k.tobytes()
    q = rng.standard_normal((5, 4, 64)).astype(np.float32)
    ours = attend(q, cache.keys(1), cache.values(1), 35, 0.125)
    ref = reference_attention(q, cache.dequantized("k", 1), cache.dequantized("v", 1), 35, 0.125)
    assert np.abs(ours - ref).max() < 1e-5


def test_q8_0_cache_needs_whole_blocks_per_head() -> None:
    with pytest.raises(HalfbyteError, match="multiple of 32"):
        KVCache(1, 8, 2, 48, "q8_0")
    with pytest.raises(HalfbyteError, match="f16, f32, q8_0"):
        KVCache(1, 8, 2, 64, "q4_0")


@pytest.mark.parametrize("type_k,type_v", [("f16", "f16"), ("q8_0", "q8_0")])
def test_peaked_softmax_drops_only_negligible_weights(type_k: str, type_v: str) -> None:
    """Scores tens of units apart (a trained model's peaked attention; synthetic weights make them
    routinely): weights below exp(-44) are dropped, which must stay invisible next to the float64
    reference, including values whose scales are fp16 subnormals."""
    rng = np.random.default_rng(11)
    n_head, n_kv_head, hd, n_keys = 4, 2, 64, 70
    cache = KVCache(1, n_keys, n_kv_head, hd, type_k, type_v)
    k = rng.standard_normal((n_keys, n_kv_head, hd)).astype(np.float32)
    v = (rng.standard_normal((n_keys, n_kv_head, hd)) * 1e-6).astype(np.float32)  # Q8_0 scales ~1e-8
    cache.store(0, k, v, 0)
    q = (rng.standard_normal((n_keys, n_head, hd)) * 4).astype(np.float32)  # scores spread over ~+-100
    got = attend(q, cache.keys(0), cache.values(0), 0, 0.5)
    want = reference_attention(q, cache.dequantized("k", 0), cache.dequantized("v", 0), 0, 0.5)
    scores = np.einsum("thd,jhd->htj", q, np.repeat(cache.dequantized("k", 0), 2, axis=1)) * 0.5
    assert (scores.max(-1) - scores.min(-1)).min() > 44  # some weights are really dropped
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(v).max())


def test_softmax_exp_is_within_one_ulp_of_libm() -> None:
    """The attention's own float64 exp (vectorizable, no libm call) on [-44, 0]: within 1 ulp of
    numpy's exp, and the same float32 weights, on a grid and on random points (measured: 0 of 2e6
    differ in float32); below the floor, 0."""
    from engine.kernels.attention import _exp_weights

    x = np.concatenate([np.linspace(-44, 0, 200_001), -np.random.default_rng(0).uniform(0, 44, 200_000),
                        [0.0, -44.0, -1e-30]]).astype(np.float32)
    weights = np.empty(x.size)
    _exp_weights(x, 0.0, weights)
    reference = np.exp(x.astype(np.float64))
    assert np.all(np.abs(weights - reference) <= np.spacing(reference))
    np.testing.assert_array_equal(weights.astype(np.float32), reference.astype(np.float32))
    below = np.empty(3)
    _exp_weights(np.float32([-44.01, -100.0, -np.inf]), 0.0, below)
    assert not below.any()


BACKGROUND_SCRIPT = """
import sys
import numpy as np
from engine.kernels import attention
started = attention.compile_in_background("f16", "f32")
print("started", started, attention.compile_in_background("f16", "f32"))
if started:
    rng = np.random.default_rng(0)
    cache = attention.KVCache(1, 64, 2, 32, "f16", "f32")
    k, v = rng.standard_normal((2, 5, 2, 32)).astype(np.float32)
    cache.store(0, k, v, 0)
    q = rng.standard_normal((5, 4, 32)).astype(np.float32)
    out = attention.attend(q, cache.keys(0), cache.values(0), 0, 0.2)
    want = attention.reference_attention(q, cache.keys(0), cache.values(0), 0, 0.2)
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-5)
    tile, kernel = attention._attend_tile.stats, attention._attend_kernel.stats
    print("misses", sum(tile.cache_misses.values()) + sum(kernel.cache_misses.values()),
          "hits", sum(tile.cache_hits.values()), sum(kernel.cache_hits.values()))
"""


@pytest.mark.slow
def test_attention_compiles_in_a_child_process_and_loads_from_its_cache(tmp_path):
    """compile_in_background: a child compiles the tile and the parallel kernel into the on-disk
    cache; this process's first attention waits for it and loads both (no compilation of its own,
    the same results). With both cached, nothing is started."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"), PYTHONPATH=str(repo))
    env.pop("HALFBYTE_BACKGROUND_COMPILE", None)
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one core: nothing compiles in the background")
    runs = [subprocess.run([sys.executable, "-c", BACKGROUND_SCRIPT], env=env, capture_output=True, text=True,
                           timeout=600, cwd=tmp_path) for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr[-3000:]
    assert runs[0].stdout.split() == ["started", "True", "False", "misses", "0", "hits", "1", "1"]
    assert runs[1].stdout.split() == ["started", "False", "False"]


def test_ctrl_c_does_not_wait_for_the_compiling_child():
    """A Ctrl-C held by the forward pass while it waits for the background compile is raised within
    a poll, not when the child is done; the child is left to finish its cache."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from engine.kernels.attention import _wait_for_child
    from engine.model import deferred_interrupts

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        start = time.monotonic()
        with pytest.raises(KeyboardInterrupt), deferred_interrupts():
            os.kill(os.getpid(), signal.SIGINT)
            _wait_for_child(child)
        assert time.monotonic() - start < 5 and child.poll() is None
    finally:
        child.kill()
        child.wait()
