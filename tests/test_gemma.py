"""Gemma (``gemma``) and Gemma 2 (``gemma2``) from tiny random transformers checkpoints, against
transformers' eager attention (the implementation that applies Gemma 2's attention soft-capping).

Gemma: multi-query attention, head_dim 32 != hidden_size / heads, tied output. Gemma 2: grouped
KV heads, attention and final soft-caps small enough to bite (1.0 and 3.0; logits reach ~2.9), a
sliding window of 8 on the even layers under a 34-token prompt. Both with the LLaMA-2 SentencePiece
model plus two added tokens (``<start_of_turn>``, ``<end_of_turn>``: special in tokenizer_config.json,
as in Gemma's) and a chat template. Measured (max |ours - transformers| / max |transformers|):
F32 1.0e-6 (Gemma) and 2.1e-6 (Gemma 2), prompt and token by token; F16 and Q8_0 below.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, TokenType
from test_runtime import PROMPT
from tiny_models import build_model, save_checkpoint

from converters.convert import convert
from engine.chat import BUILTIN_TEMPLATES
from engine.errors import HalfbyteError
from engine.gguf_file import GGUFFile
from engine.kernels import attention
from engine.model import Model

LONG_PROMPT = PROMPT + " a quiet old king who kept seven silver birds in a tall tower by the sea, and every night"
START_OF_TURN, END_OF_TURN = 32000, 32001
T = GGMLQuantizationType


def gemma_config(**overrides):
    from transformers import GemmaConfig

    settings = dict(vocab_size=32002, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=1, head_dim=32, max_position_embeddings=256,
                    rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    settings.update(overrides)
    return GemmaConfig(**settings)


def gemma2_config(**overrides):
    from transformers import Gemma2Config

    settings = dict(vocab_size=32002, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=32,
                    sliding_window=8, attn_logit_softcapping=1.0, final_logit_softcapping=3.0,
                    max_position_embeddings=256, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    settings.update(overrides)
    return Gemma2Config(**settings)


CONFIGS = {"gemma": gemma_config, "gemma2": gemma2_config}


def checkpoint(directory: Path, config, seed: int = 3) -> Path:
    """A tiny checkpoint with Gemma's turn tokens (special, past the SentencePiece pieces) and a
    Gemma chat template in tokenizer_config.json."""
    save_checkpoint(build_model(config, seed=seed), directory, "llama")
    tokenizer_config = json.loads((directory / "tokenizer_config.json").read_text())
    tokenizer_config["chat_template"] = BUILTIN_TEMPLATES["gemma"]
    tokenizer_config["added_tokens_decoder"] = {
        str(START_OF_TURN): {"content": "<start_of_turn>", "special": True},
        str(END_OF_TURN): {"content": "<end_of_turn>", "special": True},
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return directory


def eager_reference(directory: Path, round_to: T | None = None):
    """transformers' model with eager attention; ``round_to``: its matrices rounded through that
    file type first (norms stay float32 in the file, as here)."""
    from gguf import quants
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    if round_to is not None:
        with torch.no_grad():
            for param in model.parameters():
                if param.ndim == 2:
                    w = param.detach().numpy().astype(np.float32)
                    w = (w.astype(np.float16).astype(np.float32) if round_to == T.F16
                         else quants.dequantize(quants.quantize(w, round_to), round_to))
                    param.copy_(torch.from_numpy(w.reshape(param.shape)))
    return model


def hf_logits(reference, ids):
    with torch.no_grad():
        return reference(torch.tensor([ids])).logits[0].numpy()


def relative_error(ours, theirs):
    return np.abs(ours - theirs).max() / np.abs(theirs).max()


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    directory = checkpoint(root / "hf", CONFIGS[request.param]())
    path = convert(str(directory), root / "m.gguf", T.F32, progress=False)
    return request.param, directory, Model.load(path, threads=2, kv_type="f32"), eager_reference(directory)


def test_metadata_and_tensors_as_llama_cpp_writes_them(pair):
    name, directory, model, reference = pair
    md, tensors = model.file.metadata, model.file.tensors
    assert md["general.architecture"] == name
    assert md[f"{name}.attention.key_length"] == md[f"{name}.attention.value_length"] == 32
    assert md[f"{name}.context_length"] == 256 and md[f"{name}.attention.layer_norm_rms_epsilon"] == np.float32(1e-6)
    assert f"{name}.rope.freq_base" not in md and f"{name}.rope.dimension_count" not in md  # llama.cpp's defaults
    assert tensors["blk.0.attn_q.weight"].ne == (64, 128) and tensors["blk.0.attn_output.weight"].ne == (128, 64)
    assert "output.weight" not in tensors  # tied, always
    state = reference.state_dict()
    # RMSNorm weights hold transformers' 1 + w
    np.testing.assert_array_equal(model.file.tensor_array("blk.1.attn_norm.weight"),
                                  state["model.layers.1.input_layernorm.weight"].numpy() + np.float32(1))
    np.testing.assert_array_equal(model.file.tensor_array("output_norm.weight"),
                                  state["model.norm.weight"].numpy() + np.float32(1))
    if name == "gemma2":
        assert md["gemma2.attn_logit_softcapping"] == 1.0 and md["gemma2.final_logit_softcapping"] == 3.0
        assert md["gemma2.attention.sliding_window"] == 8
        assert "gemma2.attention.sliding_window_pattern" not in md  # transformers' default = llama.cpp's
        for hf, ours in (("post_attention_layernorm", "post_attention_norm"), ("pre_feedforward_layernorm", "ffn_norm"),
                         ("post_feedforward_layernorm", "post_ffw_norm")):
            np.testing.assert_array_equal(model.file.tensor_array(f"blk.3.{ours}.weight"),
                                          state[f"model.layers.3.{hf}.weight"].numpy() + np.float32(1))
        assert model.arch.windows == [8, 0, 8, 0]
    else:
        assert "blk.0.post_attention_norm.weight" not in tensors
        np.testing.assert_array_equal(model.file.tensor_array("blk.0.ffn_norm.weight"),
                                      state["model.layers.0.post_attention_layernorm.weight"].numpy() + np.float32(1))
        assert md["tokenizer.ggml.eot_token_id"] == END_OF_TURN
    # tokenizer: llama.cpp's Gemma conventions
    assert md["tokenizer.ggml.model"] == "llama"
    assert md["tokenizer.ggml.add_bos_token"] is True and md["tokenizer.ggml.add_space_prefix"] is False
    assert md["tokenizer.chat_template"] == BUILTIN_TEMPLATES["gemma"]
    types = md["tokenizer.ggml.token_type"]
    assert md["tokenizer.ggml.tokens"][START_OF_TURN:] == ["<start_of_turn>", "<end_of_turn>"]
    assert types[START_OF_TURN] == types[END_OF_TURN] == TokenType.CONTROL


def test_chat_prompt_tokens(pair):
    _, _, model, _ = pair
    text = model.apply_chat_template([{"role": "user", "content": "Hello"}])
    assert text == "<s><start_of_turn>user\nHello<end_of_turn>\n<start_of_turn>model\n"
    ids = model.tokenize(text, add_bos=False, special=True)
    assert ids[:2] == [1, START_OF_TURN] and ids.count(END_OF_TURN) == 1


def test_prompt_token_by_token_and_chunks_match_transformers(pair):
    name, _, model, reference = pair
    ids = model.tokenize(LONG_PROMPT)
    assert len(ids) > 4 * 8  # Gemma 2's window of 8 matters, and more than once
    theirs = hf_logits(reference, ids)
    model.reset()
    assert relative_error(model.eval(ids), theirs) <= 1e-4
    model.reset()
    assert relative_error(np.concatenate([model.eval([t]) for t in ids]), theirs) <= 1e-4
    model.reset()
    chunks = [model.eval(ids[a:b]) for a, b in ((0, 5), (5, 19), (19, len(ids)))]
    assert relative_error(np.concatenate(chunks), theirs) <= 1e-4


def test_greedy_continuation_matches_transformers(pair):
    _, _, model, reference = pair
    ids = model.tokenize(LONG_PROMPT)
    model.generate(ids, max_tokens=24, temperature=0, repeat_penalty=1.0)
    ours = model.last_stats.tokens
    with torch.no_grad():
        out = reference.generate(torch.tensor([ids]), max_new_tokens=len(ours), do_sample=False,
                                 eos_token_id=None, pad_token_id=0)
    assert ours == out[0, len(ids):].tolist()


def test_gemma2_soft_caps_and_window_matter(pair):
    """Each Gemma 2 feature, turned off in the loaded model, puts it far from transformers: the
    checks above test all three."""
    name, _, model, reference = pair
    if name != "gemma2":
        pytest.skip("Gemma 2 only")
    ids = model.tokenize(LONG_PROMPT)
    theirs = hf_logits(reference, ids)
    arch = model.arch
    for attr, off in (("attn_softcap", 0.0), ("final_softcap", 0.0), ("windows", [0] * 4)):
        kept = getattr(arch, attr)
        setattr(arch, attr, off)
        try:
            model.reset()
            assert relative_error(model.eval(ids), theirs) > 1e-2, attr
        finally:
            setattr(arch, attr, kept)


def test_hidden_only_stops_before_the_output_and_its_cap(pair):
    """hidden_only (embeddings) gives transformers' last hidden state: the final norm, no head."""
    from engine.batch import Batch

    _, _, model, reference = pair
    ids = model.tokenize(PROMPT)
    with torch.no_grad():
        hidden = reference.model(torch.tensor([ids])).last_hidden_state[0].numpy()
    p = model.arch.params
    cache = attention.KVCache(p.n_layer, 64, p.n_head_kv, p.head_dim, "f32")
    ours = model.arch.forward(Batch.single(ids, 0, cache), all_logits=True, hidden_only=True)
    assert relative_error(ours, hidden) <= 1e-4


# F16 (with an F32 KV cache): transformers with its matrices rounded to float16, the same weights;
# measured 9e-7 / 2e-6. Q8_0 (F16 KV cache): our products round the activations to 8 bits as
# llama.cpp's do, and this tiny Gemma is more sensitive to it than test_runtime's LLaMA (Gemma 2's
# final cap of 3 squeezes the logits' scale; with caps of 50 / 30, 3.8% with an F32 cache): 2.2% / 6.1%,
# llama.cpp on the same file 2.7% / 5.9%.
ROUND_TRIP_BOUNDS = {(T.F16, "gemma"): 1e-4, (T.F16, "gemma2"): 1e-4,
                     (T.Q8_0, "gemma"): 0.035, (T.Q8_0, "gemma2"): 0.09}


@pytest.mark.parametrize("qtype", [T.F16, T.Q8_0], ids=lambda t: t.name)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_f16_and_q8_0_match_transformers_on_the_same_weights(name, qtype, tmp_path):
    directory = checkpoint(tmp_path / "hf", CONFIGS[name]())
    model = Model.load(convert(str(directory), tmp_path / "m.gguf", qtype, progress=False), threads=2,
                       kv_type="f32" if qtype == T.F16 else "f16")
    ids = model.tokenize(LONG_PROMPT)
    error = relative_error(model.eval(ids), hf_logits(eager_reference(directory, qtype), ids))
    assert error <= ROUND_TRIP_BOUNDS[qtype, name], error
    assert model.file.tensors["blk.0.attn_q.weight"].ggml_type == qtype
    assert model.file.tensors["blk.0.attn_norm.weight"].ggml_type == T.F32


def test_gemma2_27b_query_scale(tmp_path):
    """The 46-layer shape (Gemma 2 27B) scales queries by 1/sqrt(n_embd / n_head), here 1/4, not
    1/sqrt(head_dim): llama.cpp's rule, and transformers' with query_pre_attn_scalar = 16."""
    config = gemma2_config(num_hidden_layers=46, query_pre_attn_scalar=16, intermediate_size=64)
    directory = checkpoint(tmp_path / "hf", config)
    model = Model.load(convert(str(directory), tmp_path / "m.gguf", T.F32, progress=False), threads=2, kv_type="f32")
    assert model.arch.attn_scale == 0.25
    ids = model.tokenize(LONG_PROMPT)
    assert relative_error(model.eval(ids), hf_logits(eager_reference(directory), ids)) <= 1e-4


def test_gemma2_other_layer_types_written_as_a_pattern(tmp_path):
    """layer_types other than the alternation llama.cpp assumes: one bool per layer in
    gemma2.attention.sliding_window_pattern (llama.cpp reads it too)."""
    types = ["full_attention", "sliding_attention", "sliding_attention", "full_attention"]
    directory = checkpoint(tmp_path / "hf", gemma2_config(layer_types=types))
    model = Model.load(convert(str(directory), tmp_path / "m.gguf", T.F32, progress=False), threads=2, kv_type="f32")
    pattern = model.file.metadata["gemma2.attention.sliding_window_pattern"]
    assert pattern.tolist() == [False, True, True, False]
    assert model.arch.windows == [0, 8, 8, 0]
    ids = model.tokenize(LONG_PROMPT)
    assert relative_error(model.eval(ids), hf_logits(eager_reference(directory), ids)) <= 1e-4


def test_gemma_rope_theta_written_when_not_the_default(tmp_path):
    config = gemma_config(num_hidden_layers=1, rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    directory = checkpoint(tmp_path / "hf", config)
    model = Model.load(convert(str(directory), tmp_path / "m.gguf", T.F32, progress=False), threads=2, kv_type="f32")
    assert model.file.metadata["gemma.rope.freq_base"] == 500.0
    ids = model.tokenize(LONG_PROMPT)
    assert relative_error(model.eval(ids), hf_logits(eager_reference(directory), ids)) <= 1e-4


@pytest.mark.parametrize("name,change,message", [
    ("gemma2", {"query_pre_attn_scalar": 64}, r"query_pre_attn_scalar 64 is not supported.*1/sqrt\(32\)"),
    ("gemma2", {"attn_logit_softcapping": None}, r"'attn_logit_softcapping' is null"),
    ("gemma2", {"final_logit_softcapping": None}, r"'final_logit_softcapping' is null"),
    ("gemma2", {"hidden_activation": "gelu"}, r"hidden_activation 'gelu' is not supported"),
    ("gemma2", {"layer_types": ["full_attention"]}, r"'layer_types' must list 4"),
    ("gemma", {"hidden_act": "silu"}, r"hidden_act 'silu' is not supported"),
    ("gemma", {"attention_bias": True}, r"attention_bias = true is not supported"),
    ("gemma", {"tie_word_embeddings": False}, r"tie_word_embeddings = false with an lm_head is not supported"),
    ("gemma", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}},
     r"rope_type 'linear' is not supported for Gemma"),
])
def test_unsupported_configs_are_refused(tmp_path, name, change, message):
    directory = checkpoint(tmp_path / "hf", CONFIGS[name](num_hidden_layers=4))
    if name == "gemma" and "tie_word_embeddings" in change:  # an untied checkpoint has its own lm_head
        from safetensors.torch import load_file, save_file

        state = load_file(directory / "model.safetensors")
        state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
        save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((directory / "config.json").read_text())
    config.update(change)
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(HalfbyteError, match=message):
        convert(str(directory), tmp_path / "m.gguf", T.F32, progress=False)
    assert not (tmp_path / "m.gguf").exists()


def test_attention_softcap_kernel_matches_reference():
    """attend(softcap=c) against the plain float64 reference, with and without a window and ALiBi, on
    every cache type; softcap=0 is the uncapped kernel, bit for bit."""
    from engine.kernels.ops import alibi_slopes

    rng = np.random.default_rng(7)
    for kind in ("f32", "f16", "q8_0"):
        cache = attention.KVCache(1, 48, 2, 32, kind)
        cache.store(0, 3 * rng.standard_normal((40, 2, 32), dtype=np.float32),
                    rng.standard_normal((40, 2, 32), dtype=np.float32), 0)
        keys, values = cache.dequantized("k", 0), cache.dequantized("v", 0)
        for n_past, n_tok in ((0, 23), (30, 1), (25, 15)):
            q = 3 * rng.standard_normal((n_tok, 4, 32), dtype=np.float32)
            for window in (0, 6):
                for slopes in (None, alibi_slopes(4, 8.0)):
                    plain = attention.attend(q, cache.keys(0), cache.values(0), n_past, 0.2, slopes, window=window)
                    np.testing.assert_array_equal(
                        attention.attend(q, cache.keys(0), cache.values(0), n_past, 0.2, slopes, window=window,
                                         softcap=0.0), plain)
                    capped = attention.attend(q, cache.keys(0), cache.values(0), n_past, 0.2, slopes, window=window,
                                              softcap=2.0)
                    reference = attention.reference_attention(q, keys, values, n_past, 0.2, slopes, window=window,
                                                              softcap=2.0)
                    np.testing.assert_allclose(capped, reference, atol=3e-5)
                    assert np.abs(capped - plain).max() > 1e-2  # the cap is active
    for bad in (-1.0, float("nan"), float("inf"), True, "2"):
        with pytest.raises(HalfbyteError, match="softcap"):
            attention.attend(q, cache.keys(0), cache.values(0), 25, 0.2, softcap=bad)


def test_gemma2_pattern_and_defaults_read_as_llama_cpp(tmp_path):
    """A period as sliding_window_pattern (layer i slides when i % n < n - 1), and llama.cpp's
    defaults for a file without the Gemma 2 keys (window 4096, soft-caps 50 and 30)."""
    from engine.gguf_file import GGUFWriter
    from models.gemma import Gemma2

    directory = checkpoint(tmp_path / "hf", gemma2_config(num_hidden_layers=4))
    source = GGUFFile(convert(str(directory), tmp_path / "m.gguf", T.F32, progress=False))
    dropped = {"gemma2.attn_logit_softcapping", "gemma2.final_logit_softcapping", "gemma2.attention.sliding_window"}
    path = tmp_path / "edited.gguf"
    with GGUFWriter(path) as writer:
        writer.copy_metadata(source, skip=dropped)
        writer.add_uint32("gemma2.attention.sliding_window_pattern", 3)
        for tensor, info in source.tensors.items():
            writer.add_tensor_info(tensor, info.shape, info.ggml_type)
        for tensor in source.tensors:
            writer.write_tensor(tensor, source.tensor_bytes(tensor))
        writer.finish()
    arch = Gemma2(GGUFFile(path))
    assert arch.windows == [4096, 4096, 0, 4096]
    assert (arch.attn_softcap, arch.final_softcap) == (50.0, 30.0)


LLAMA_CPP = os.environ.get("HALFBYTE_LLAMA_CPP")


@pytest.mark.skipif(not LLAMA_CPP, reason="set HALFBYTE_LLAMA_CPP to a llama.cpp checkout to run")
@pytest.mark.parametrize("name", list(CONFIGS))
def test_llama_cpp_converter_writes_the_same_file(tmp_path, name):
    """llama.cpp's convert_hf_to_gguf.py on the same checkpoint: the same tensors, bit for bit, the same
    architecture keys, and its file runs here as ours does (measured 1.0e-6 / 2.1e-6 of the logits'
    scale).
    Its Gemma converter writes eot = 107 whatever that token is (Gemma's <end_of_turn>); ours names
    <end_of_turn> by its text."""
    directory = checkpoint(tmp_path / "hf", CONFIGS[name]())
    ours = GGUFFile(convert(str(directory), tmp_path / "ours.gguf", T.F32, progress=False))
    out = tmp_path / "llama.cpp.gguf"
    subprocess.run([sys.executable, str(Path(LLAMA_CPP) / "convert_hf_to_gguf.py"), str(directory), "--outtype",
                    "f32", "--outfile", str(out)], check=True, capture_output=True)
    theirs = GGUFFile(out)
    assert set(ours.tensors) == set(theirs.tensors)
    for tensor in ours.tensors:
        np.testing.assert_array_equal(ours.tensor_array(tensor), theirs.tensor_array(tensor), err_msg=tensor)
    arch_keys = {key for key in theirs.metadata if key.startswith(f"{name}.")}
    assert arch_keys == {key for key in ours.metadata if key.startswith(f"{name}.")}
    for key in arch_keys | {"tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.add_space_prefix",
                            "tokenizer.ggml.add_bos_token", "tokenizer.chat_template"}:
        assert np.array_equal(np.asarray(ours.metadata[key]), np.asarray(theirs.metadata[key])), key
    if name == "gemma":
        assert theirs.metadata["tokenizer.ggml.eot_token_id"] == 107
    model = Model.load(out, threads=2, kv_type="f32")
    ids = model.tokenize(LONG_PROMPT)
    assert relative_error(model.eval(ids), hf_logits(eager_reference(directory), ids)) <= 1e-4


@pytest.mark.parametrize("name", list(CONFIGS))
def test_llama_cpp_runs_our_files_like_we_do(tmp_path, name):
    """Our F32 files in llama.cpp (llama-cpp-python, where installed): the same tokens, and logits
    within 5e-3 of their scale (measured 8.1e-4 Gemma, 2.0e-3 Gemma 2: ggml's GELU goes through a
    float16 table; both KV caches are float16)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    directory = checkpoint(tmp_path / "hf", CONFIGS[name]())
    path = convert(str(directory), tmp_path / "m.gguf", T.F32, progress=False)
    model = Model.load(path, threads=2)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    ids = model.tokenize(LONG_PROMPT)
    assert llm.tokenize(LONG_PROMPT.encode()) == ids
    chat = model.apply_chat_template([{"role": "user", "content": "Hello"}])
    assert llm.tokenize(chat.encode(), add_bos=False, special=True) == model.tokenize(chat, add_bos=False,
                                                                                       special=True)
    llm.eval(ids)
    assert relative_error(model.eval(ids), np.array(llm.scores[: len(ids)])) <= 5e-3

