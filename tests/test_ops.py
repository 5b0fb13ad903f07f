"""Per-token ops against their numpy references and against torch / transformers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import FalconConfig, LlamaConfig, MptConfig
from transformers.models.falcon.modeling_falcon import FalconMLP
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb
from transformers.models.mpt.modeling_mpt import MptMLP, build_mpt_alibi_tensor

from engine.errors import HalfbyteError
from engine.kernels import ops


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a64 - b64).max() / max(np.abs(b64).max(), 1e-30))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


# -- norms -------------------------------------------------------------------------------------


def test_rms_norm_matches_reference_and_llama(rng):
    x = rng.standard_normal((6, 320), dtype=np.float32) * np.float32(5)
    w = rng.standard_normal(320, dtype=np.float32)
    y = ops.rms_norm(x, w, 1e-6)
    assert y.dtype == np.float32 and y.shape == x.shape
    assert rel_err(y, ops.reference_rms_norm(x, w, 1e-6)) < 1e-6
    hf = LlamaRMSNorm(320, eps=1e-6)
    with torch.no_grad():
        hf.weight.copy_(torch.from_numpy(w))
        expected = hf(torch.from_numpy(x)).numpy()
    assert rel_err(y, expected) < 2e-6
    np.testing.assert_allclose(ops.rms_norm(x[0], w, 1e-6), y[0], rtol=0, atol=0)  # 1-D input
    out = np.empty_like(x)
    assert ops.rms_norm(x, w, 1e-6, out=out) is out
    np.testing.assert_array_equal(out, y)
    with pytest.raises(HalfbyteError, match="out must be"):
        ops.rms_norm(x, w, 1e-6, out=np.empty((320, 6), np.float32).T)  # right shape, strided


@pytest.mark.parametrize("with_bias", [True, False])
def test_layer_norm_matches_reference_and_torch(rng, with_bias):
    x = rng.standard_normal((5, 192), dtype=np.float32) * np.float32(3) + np.float32(7)  # non-zero mean
    w = rng.standard_normal(192, dtype=np.float32)
    b = rng.standard_normal(192, dtype=np.float32) if with_bias else None
    y = ops.layer_norm(x, w, b, 1e-5)
    assert rel_err(y, ops.reference_layer_norm(x, w, b, 1e-5)) < 2e-6
    expected = F.layer_norm(torch.from_numpy(x), (192,), torch.from_numpy(w),
                            None if b is None else torch.from_numpy(b), 1e-5).numpy()
    assert rel_err(y, expected) < 5e-6


def test_norms_reject_wrong_weight_length(rng):
    x = rng.standard_normal((2, 8), dtype=np.float32)
    with pytest.raises(HalfbyteError, match="expected 8"):
        ops.rms_norm(x, np.ones(7, np.float32), 1e-5)
    with pytest.raises(HalfbyteError, match="expected 8"):
        ops.layer_norm(x, np.ones(8, np.float32), np.ones(9, np.float32), 1e-5)


# -- RoPE --------------------------------------------------------------------------------------


def permute_for_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter: interleave each head's rotate_half halves into adjacent pairs."""
    n_out = w.shape[0]
    return w.reshape(n_head, 2, n_out // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_cos_sin(head_dim: int, positions: np.ndarray, theta: float, factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    rope = {"rope_type": "default", "rope_theta": theta} if factor == 1.0 else \
        {"rope_type": "linear", "factor": factor, "rope_theta": theta}
    config = LlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2, rope_parameters=rope)
    embedding = LlamaRotaryEmbedding(config)
    return embedding(torch.zeros(1), torch.from_numpy(positions)[None])  # (1, n_tok, head_dim) each


@pytest.mark.parametrize("theta,factor", [(10000.0, 1.0), (500000.0, 1.0), (10000.0, 4.0)])
def test_rope_normal_on_permuted_weights_equals_hf_rotate_half(rng, theta, factor):
    n_tok, n_head, n_kv_head, head_dim, n_in = 5, 4, 2, 16, 48
    positions = np.array([0, 1, 7, 30, 99], dtype=np.int64)
    x = rng.standard_normal((n_tok, n_in), dtype=np.float32)
    wq = rng.standard_normal((n_head * head_dim, n_in), dtype=np.float32)
    wk = rng.standard_normal((n_kv_head * head_dim, n_in), dtype=np.float32)

    # transformers: original weights, rotate_half RoPE.
    cos, sin = hf_cos_sin(head_dim, positions, theta, factor)
    q_hf = torch.from_numpy(x @ wq.T).view(1, n_tok, n_head, head_dim).transpose(1, 2)
    k_hf = torch.from_numpy(x @ wk.T).view(1, n_tok, n_kv_head, head_dim).transpose(1, 2)
    q_hf, k_hf = apply_rotary_pos_emb(q_hf, k_hf, cos, sin)
    q_hf = q_hf.transpose(1, 2)[0].numpy()  # (n_tok, n_head, head_dim)
    k_hf = k_hf.transpose(1, 2)[0].numpy()

    # halfbyte: converter-permuted weights, adjacent-pair ("normal") RoPE.
    q = np.ascontiguousarray((x @ permute_for_rope(wq, n_head).T).reshape(n_tok, n_head, head_dim))
    k = np.ascontiguousarray((x @ permute_for_rope(wk, n_kv_head).T).reshape(n_tok, n_kv_head, head_dim))
    ops.rope(q, positions, head_dim, theta, factor, neox=False)
    ops.rope(k, positions, head_dim, theta, factor, neox=False)

    # Same vectors up to the permutation within each head ...
    interleave = permute_for_rope(np.arange(head_dim)[:, None], 1)[:, 0]
    scale = np.abs(q_hf).max()
    np.testing.assert_allclose(q, q_hf[..., interleave], atol=2e-5 * scale)
    np.testing.assert_allclose(k, k_hf[..., interleave], atol=2e-5 * scale)
    # ... hence the same attention scores (GQA: query head h uses KV head h // 2).
    scores = np.einsum("thd,shd->hts", q, np.repeat(k, 2, axis=1))
    scores_hf = np.einsum("thd,shd->hts", q_hf, np.repeat(k_hf, 2, axis=1))
    np.testing.assert_allclose(scores, scores_hf, atol=1e-4 * np.abs(scores_hf).max())


@pytest.mark.parametrize("n_rot", [32, 16, 8])
def test_rope_neox_equals_hf_rotate_half_with_partial_rotary(rng, n_rot):
    n_tok, n_head, head_dim = 4, 3, 32
    positions = np.array([2, 3, 4, 60], dtype=np.int64)
    q = rng.standard_normal((n_tok, n_head, head_dim), dtype=np.float32)
    cos, sin = hf_cos_sin(n_rot, positions, 10000.0, 1.0)
    rotated = torch.from_numpy(q[..., :n_rot].copy()).transpose(0, 1)[None]  # (1, n_head, n_tok, n_rot)
    rotated, _ = apply_rotary_pos_emb(rotated, rotated, cos, sin)
    expected = np.concatenate([rotated[0].transpose(0, 1).numpy(), q[..., n_rot:]], axis=-1)
    ours = ops.rope(q, positions, n_rot, neox=True, out=np.empty_like(q))
    np.testing.assert_allclose(ours, expected, atol=2e-5 * np.abs(q).max())
    np.testing.assert_array_equal(ours[..., n_rot:], q[..., n_rot:])


@pytest.mark.parametrize("neox", [False, True])
def test_rope_matches_float64_reference_at_long_positions(rng, neox):
    q = rng.standard_normal((6, 2, 64), dtype=np.float32)
    positions = np.array([0, 1, 1000, 4095, 16000, 100000])
    for n_rot, theta, factor in [(64, 10000.0, 1.0), (48, 1e6, 1.0), (32, 10000.0, 2.5)]:
        expected = ops.reference_rope(q, positions, n_rot, theta, factor, neox)
        ours = ops.rope(q.copy(), positions, n_rot, theta, factor, neox)
        np.testing.assert_allclose(ours, expected, atol=1e-6 * np.abs(q).max() * 4)


def test_rope_position_zero_is_identity_and_linear_scaling_divides_positions(rng):
    q = rng.standard_normal((2, 2, 8), dtype=np.float32)
    np.testing.assert_array_equal(ops.rope(q.copy(), np.array([0, 0]), 8), q)
    scaled = ops.rope(q.copy(), np.array([10, 30]), 8, scale=2.0)
    plain = ops.rope(q.copy(), np.array([5, 15]), 8)
    np.testing.assert_allclose(scaled, plain, rtol=0, atol=1e-6)


def test_rope_in_place_on_a_strided_view(rng):
    """Falcon-style fused QKV: q is a strided view into the projection output."""
    qkv = rng.standard_normal((3, 3 * 2 * 8), dtype=np.float32)
    q = qkv[:, :16].reshape(3, 2, 8)
    assert not q.flags.c_contiguous
    expected = ops.rope(np.ascontiguousarray(q), np.arange(3), 8, neox=True, out=np.empty((3, 2, 8), np.float32))
    before = qkv[:, 16:].copy()
    assert ops.rope(q, np.arange(3), 8, neox=True) is q
    np.testing.assert_array_equal(qkv[:, :16].reshape(3, 2, 8), expected)
    np.testing.assert_array_equal(qkv[:, 16:], before)


def test_rope_rejects_bad_arguments(rng):
    q = rng.standard_normal((2, 2, 8), dtype=np.float32)
    with pytest.raises(HalfbyteError, match="even n_rot"):
        ops.rope(q, np.arange(2), 7)
    with pytest.raises(HalfbyteError, match="even n_rot"):
        ops.rope(q, np.arange(2), 10)
    with pytest.raises(HalfbyteError, match="positions"):
        ops.rope(q, np.arange(3), 8)
    with pytest.raises(HalfbyteError, match="in-place"):
        ops.rope(q.astype(np.float64), np.arange(2), 8)
    with pytest.raises(HalfbyteError, match="out must be"):
        ops.rope(q, np.arange(2), 8, out=np.empty((2, 2, 7), np.float32))


# -- ALiBi -------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_head", [4, 6, 8, 12, 32])
@pytest.mark.parametrize("max_bias", [8.0, 16.0])
def test_alibi_slopes_match_transformers_mpt(n_head, max_bias):
    length = 5
    alibi = build_mpt_alibi_tensor(n_head, length, alibi_bias_max=max_bias)  # (n_head, 1, length)
    # MPT's bias for key j is slope * (j - (length - 1)); one step back gives -slope.
    expected = -alibi[:, 0, length - 2].double().numpy()
    slopes = ops.alibi_slopes(n_head, max_bias)
    assert slopes.dtype == np.float32 and slopes.shape == (n_head,)
    np.testing.assert_allclose(slopes, expected, rtol=1e-6)


def test_alibi_slopes_follow_ggml_formula_for_non_power_of_two():
    slopes = ops.alibi_slopes(12, 8.0)  # n_head_log2_floor = 8
    m0, m1 = 2.0 ** (-8.0 / 8), 2.0 ** (-4.0 / 8)
    expected = [m0 ** (h + 1) for h in range(8)] + [m1 ** (2 * (h - 8) + 1) for h in range(8, 12)]
    np.testing.assert_allclose(slopes, expected, rtol=1e-6)
    with pytest.raises(HalfbyteError):
        ops.alibi_slopes(0, 8.0)


# -- softmax and activations -------------------------------------------------------------------


def test_softmax_is_stable_and_matches_torch(rng):
    x = rng.standard_normal((4, 50), dtype=np.float32) * np.float32(30)
    x[0, 0] = 1e4  # would overflow exp without the max shift
    x[1, ::2] = -np.inf
    x[2, :] = -np.inf  # fully masked row
    y = ops.softmax(x)
    expected = torch.softmax(torch.from_numpy(x[:2]), dim=-1).numpy()
    np.testing.assert_allclose(y[:2], expected, atol=1e-6)
    np.testing.assert_allclose(y[3], ops.reference_softmax(x[3]), atol=1e-7)
    np.testing.assert_array_equal(y[2], 0)
    assert np.all(np.isfinite(y))


def test_gelu_variants_match_torch(rng):
    x = np.concatenate([rng.standard_normal(1000, dtype=np.float32) * np.float32(4),
                        np.array([0, -20, 20, -1e4, 1e4, 1e-7], np.float32)])
    t = torch.from_numpy(x)
    np.testing.assert_allclose(ops.gelu_tanh(x), F.gelu(t, approximate="tanh").numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ops.gelu_erf(x), F.gelu(t).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ops.gelu_tanh(x), ops.reference_gelu_tanh(x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ops.gelu_erf(x), ops.reference_gelu_erf(x), rtol=1e-6, atol=1e-7)
    # The two differ by up to ~5e-4: enough that a model must use the one it was trained with.
    assert np.abs(ops.gelu_tanh(x) - ops.gelu_erf(x)).max() > 1e-4


def test_mpt_and_falcon_mlps_use_exact_erf_gelu(rng):
    x = rng.standard_normal((3, 40), dtype=np.float32) * np.float32(3)
    mpt_act = MptMLP(MptConfig(d_model=8, n_heads=2)).act
    falcon_act = FalconMLP(FalconConfig(hidden_size=8, num_attention_heads=2)).act
    for act in (mpt_act, falcon_act):
        with torch.no_grad():
            expected = act(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(ops.gelu_erf(x), expected, rtol=1e-5, atol=1e-6)
        assert np.abs(ops.gelu_tanh(x) - expected).max() > 1e-5  # not the tanh approximation


def test_silu_and_swiglu_match_torch(rng):
    gate = rng.standard_normal((3, 64), dtype=np.float32) * np.float32(6)
    gate[0, :3] = [-100.0, 100.0, 0.0]
    up = rng.standard_normal((3, 64), dtype=np.float32)
    np.testing.assert_allclose(ops.silu(gate), F.silu(torch.from_numpy(gate)).numpy(), rtol=1e-6, atol=1e-7)
    expected = (F.silu(torch.from_numpy(gate)) * torch.from_numpy(up)).numpy()
    np.testing.assert_allclose(ops.swiglu(gate, up), expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ops.swiglu(gate, up), ops.reference_swiglu(gate, up), rtol=1e-6, atol=1e-7)
    with pytest.raises(HalfbyteError, match="one shape"):
        ops.swiglu(gate, up[:, :3])


def test_clamp_for_clip_qkv(rng):
    x = rng.standard_normal((4, 24), dtype=np.float32) * np.float32(10)
    expected = torch.clamp(torch.from_numpy(x), -6.0, 6.0).numpy()
    np.testing.assert_array_equal(ops.clamp(x, 6.0), expected)
    in_place = x.copy()
    assert ops.clamp(in_place, 6.0, out=in_place) is in_place
    np.testing.assert_array_equal(in_place, expected)
    with pytest.raises(HalfbyteError):
        ops.clamp(x, 0.0)


def test_elementwise_ops_keep_shape_and_write_out(rng):
    x = rng.standard_normal((2, 3, 4), dtype=np.float32)
    out = np.empty_like(x)
    assert ops.silu(x, out=out) is out
    assert ops.gelu_erf(x).shape == (2, 3, 4)
    assert math.isclose(float(ops.gelu_erf(np.array([1.0], np.float32))[0]), 0.8413447460685429, rel_tol=1e-6)


def test_vectorized_expf_is_within_two_ulp():
    x = np.concatenate([np.linspace(-87.33, 88.37, 1_000_001, dtype=np.float32), np.float32([0, -1e-30, 1e-30])])
    reference = np.exp(x.astype(np.float64))
    assert np.max(np.abs(ops.expf(x) - reference) / reference) <= 2 * 2.0**-24
    edges = ops.expf(np.float32([-np.inf, -1000.0, -87.5, 1000.0]))
    assert edges[:3].tolist() == [0.0, 0.0, 0.0] and np.isfinite(edges[3])
