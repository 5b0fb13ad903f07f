"""Architectures beyond test_runtime.py's four, each from a tiny random transformers checkpoint:
F32 logits for a prompt and token by token within 1e-3 of the logits' scale of transformers, the
greedy continuation identical, Q8_0 within test_runtime.py's LLaMA bound.

- Mistral (``llama`` in GGUF): explicit head_dim (Mistral-Nemo: head_dim x heads != hidden_size)
  and a sliding window shorter than the prompt.
- Qwen2 (``qwen2``): q/k/v biases, tied embeddings (Qwen2.5-0.5B), the real Qwen vocabulary.
- Qwen3 (``qwen3``): per-head q/k RMSNorm, explicit head_dim, the real Qwen vocabulary.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from test_runtime import PROMPT, QUANT_BOUNDS, hf_logits, round_trip_reference
from tiny_models import FIXTURES, build_model, load_reference, save_checkpoint

from converters.convert import convert
from engine.gguf_file import GGUFFile
from engine.model import Model

QWEN = FIXTURES / "tokenizers" / "qwen"
LONG_PROMPT = PROMPT + " a quiet old king who kept seven silver birds in a tall tower by the sea, and every night"


def mistral_config():
    from transformers import MistralConfig

    return MistralConfig(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
                         sliding_window=12, rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1,
                         eos_token_id=2)


def qwen2_config():
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
                       bos_token_id=151643, eos_token_id=151643)


def qwen3_config():
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
                       rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
                       bos_token_id=151643, eos_token_id=151645)


def qwen_tokenizer(directory):
    for name in ("tokenizer.model", "tokenizer_config.json"):
        (directory / name).unlink(missing_ok=True)
    shutil.copy(QWEN / "tokenizer.json", directory / "tokenizer.json")
    shutil.copy(QWEN / "tokenizer_config.json", directory / "tokenizer_config.json")


def with_bias_noise(model):
    """transformers initialises biases to zero: make them matter."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.2)
    return model


ARCHS = {
    # name: (config, tokenizer fix-up, GGUF architecture)
    "mistral": (mistral_config, None, "llama"),
    "qwen2": (qwen2_config, qwen_tokenizer, "qwen2"),
    "qwen3": (qwen3_config, qwen_tokenizer, "qwen3"),
}


def checkpoint(name, root):
    make_config, fix_tokenizer, _ = ARCHS[name]
    directory = save_checkpoint(with_bias_noise(build_model(make_config(), seed=3)), root / "hf", "llama")
    if fix_tokenizer is not None:
        fix_tokenizer(directory)
    return directory


@pytest.fixture(scope="module", params=list(ARCHS))
def arch_pair(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    directory = checkpoint(request.param, root)
    path = convert(str(directory), root / "m.gguf", GGMLQuantizationType.F32, progress=False)
    return request.param, directory, Model.load(path, threads=2, kv_type="f32"), load_reference(directory)


def test_metadata(arch_pair):
    name, directory, model, _ = arch_pair
    md = model.file.metadata
    arch = ARCHS[name][2]
    assert md["general.architecture"] == arch
    if name == "mistral":
        assert md["llama.attention.sliding_window"] == 12
        assert md["llama.attention.key_length"] == md["llama.attention.value_length"] == 32
        assert model.file.tensors["blk.0.attn_q.weight"].ne == (64, 128)
        assert model.file.tensors["blk.0.attn_output.weight"].ne == (128, 64)
    else:
        assert md["tokenizer.ggml.pre"] == "qwen2"
        assert md["tokenizer.ggml.eos_token_id"] == 151645  # <|im_end|>, from tokenizer_config.json
        template = json.loads((QWEN / "tokenizer_config.json").read_text())["chat_template"]
        assert md["tokenizer.chat_template"] == template
        assert md["tokenizer.ggml.add_bos_token"] is False
    if name == "qwen2":
        assert "blk.1.attn_k.bias" in model.file.tensors and "output.weight" not in model.file.tensors
    if name == "qwen3":
        assert model.file.tensors["blk.1.attn_q_norm.weight"].ne == (32,)
        assert md["qwen3.attention.key_length"] == 32


def test_prompt_and_token_by_token_match_transformers(arch_pair):
    name, _, model, reference = arch_pair
    ids = model.tokenize(LONG_PROMPT)
    if name == "mistral":
        assert len(ids) > 2 * 12  # the sliding window matters
    theirs = hf_logits(reference, ids)
    scale = np.abs(theirs).max()
    model.reset()
    assert np.abs(model.eval(ids) - theirs).max() <= 1e-3 * scale
    model.reset()
    assert np.abs(np.concatenate([model.eval([t]) for t in ids]) - theirs).max() <= 1e-3 * scale


def test_greedy_continuation_matches_transformers(arch_pair):
    _, _, model, reference = arch_pair
    ids = model.tokenize(PROMPT)
    model.generate(ids, max_tokens=32, temperature=0, repeat_penalty=1.0)
    ours = model.last_stats.tokens
    with torch.no_grad():
        out = reference.generate(torch.tensor([ids]), max_new_tokens=len(ours), do_sample=False,
                                 eos_token_id=None, pad_token_id=0)
    assert ours == out[0, len(ids):].tolist()


def test_mistral_sliding_window_matters(arch_pair):
    """Without the window the same file is far from transformers: the check above tests it."""
    from dataclasses import replace

    name, _, model, reference = arch_pair
    if name != "mistral":
        pytest.skip("Mistral only")
    ids = model.tokenize(LONG_PROMPT)
    theirs = hf_logits(reference, ids)
    params = model.arch.params
    model.arch.params = replace(params, sliding_window=0)
    try:
        model.reset()
        assert np.abs(model.eval(ids) - theirs).max() > 1e-2 * np.abs(theirs).max()
    finally:
        model.arch.params = params


@pytest.mark.parametrize("name", list(ARCHS))
def test_q8_0_matches_transformers_on_the_same_weights(name, tmp_path):
    qtype = GGMLQuantizationType.Q8_0
    directory = checkpoint(name, tmp_path)
    model = Model.load(convert(str(directory), tmp_path / "m.gguf", qtype, progress=False), threads=2)
    reference = round_trip_reference(directory, qtype)
    ids = model.tokenize(PROMPT)
    theirs = hf_logits(reference, ids)
    error = np.abs(model.eval(ids) - theirs).max() / np.abs(theirs).max()
    assert error <= QUANT_BOUNDS[qtype], error
    assert GGUFFile(model.path).tensors["blk.0.attn_q.weight"].ggml_type == qtype


def test_rope_freq_factors_and_attention_window_kernels():
    """The two kernel options against their plain numpy references."""
    from engine.kernels import attention, ops

    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 3, 16), dtype=np.float32)
    positions = np.array([0, 7, 300, 1500, 4000])
    factors = np.array([1, 1, 1.7, 3.2, 8, 8, 8, 8], np.float32)
    for neox in (False, True):
        ours = ops.rope(x.copy(), positions, 16, 500000.0, 2.0, neox, freq_factors=factors)
        np.testing.assert_allclose(ours, ops.reference_rope(x, positions, 16, 500000.0, 2.0, neox, factors),
                                   atol=2e-6)
    cache_k = rng.standard_normal((40, 2, 16), dtype=np.float32)
    cache_v = rng.standard_normal((40, 2, 16), dtype=np.float32)
    q = rng.standard_normal((9, 4, 16), dtype=np.float32)
    for window in (0, 1, 5, 30):
        ours = attention.attend(q, cache_k, cache_v, 31, 0.25, window=window)
        np.testing.assert_allclose(ours, attention.reference_attention(q, cache_k, cache_v, 31, 0.25, window=window),
                                   atol=2e-5)


def test_aliases():
    from converters.sources import ALIASES

    assert ALIASES["llama3-8b"] == "meta-llama/Meta-Llama-3-8B"
    assert ALIASES["llama3.2-1b"] == "meta-llama/Llama-3.2-1B"
    assert ALIASES["mistral-7b"] == "mistralai/Mistral-7B-v0.1"
    assert ALIASES["qwen2.5-0.5b"] == "Qwen/Qwen2.5-0.5B"
    assert ALIASES["qwen3-0.6b"] == "Qwen/Qwen3-0.6B"
