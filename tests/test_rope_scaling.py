"""RoPE scaling beyond Llama 3.1's (tests/test_llama3.py), against transformers on tiny random
checkpoints: YaRN (Llama and Qwen2 configs, as Qwen2.5's long-context setting), Phi-3's LongRoPE
(short factors within the original context, long ones beyond), and dynamic NTK (written without
scaling, as llama.cpp's converter does: identical within the training context)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from test_architectures import qwen_tokenizer
from tiny_models import build_model, llama_config, save_checkpoint

from converters.convert import convert
from engine.errors import HalfbyteError
from engine.gguf_file import GGUFFile
from engine.model import Model

BOUND = 1e-3  # F32 logits, relative to the logits' scale (the architecture tests' bound)


def hf_logits(directory, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def relative(ours, theirs):
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def random_ids(n, vocab, seed=0):
    return [1] + [int(t) for t in np.random.default_rng(seed).integers(3, vocab, n - 1)]


YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 10000.0}


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_yarn_matches_transformers_past_the_original_context(tmp_path, family):
    if family == "llama":
        config = llama_config(max_position_embeddings=256, rope_scaling=dict(YARN))
    else:
        from transformers import Qwen2Config

        config = Qwen2Config(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                             rope_scaling=dict(YARN), rms_norm_eps=1e-6, tie_word_embeddings=False,
                             bos_token_id=151643, eos_token_id=151643)
    directory = save_checkpoint(build_model(config, seed=7), tmp_path / "hf", "llama")
    if family == "qwen2":
        qwen_tokenizer(directory)
    path = convert(str(directory), tmp_path / "yarn.gguf", GGMLQuantizationType.F32, progress=False)
    with GGUFFile(path) as file:
        arch = file.architecture
        assert file.metadata[f"{arch}.rope.scaling.type"] == "yarn"
        assert file.metadata[f"{arch}.rope.scaling.factor"] == 4.0
        assert file.metadata[f"{arch}.rope.scaling.original_context_length"] == 64
    ids = random_ids(200, config.vocab_size)  # well past the 64 original positions
    theirs = hf_logits(directory, ids)
    model = Model.load(path, n_ctx=256, kv_type="f32")
    assert relative(model.eval(ids), theirs) <= BOUND
    # The same weights without YaRN are far off: the scaling is what is being checked.
    plain = shutil.copytree(directory, tmp_path / "plain")
    config = json.loads((plain / "config.json").read_text())
    for key in ("rope_scaling", "rope_parameters"):
        if isinstance(config.get(key), dict):
            config[key] = {"rope_type": "default", "rope_theta": 10000.0}
    (plain / "config.json").write_text(json.dumps(config))
    assert relative(hf_logits(plain, ids), theirs) > 20 * BOUND


def test_dynamic_ntk_is_written_without_scaling(tmp_path, capfd):
    config = llama_config(max_position_embeddings=256,
                          rope_scaling={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    directory = save_checkpoint(build_model(config, seed=8), tmp_path / "hf", "llama")
    path = convert(str(directory), tmp_path / "dynamic.gguf", GGMLQuantizationType.F32, progress=False)
    assert "'dynamic' (NTK) is written without scaling" in capfd.readouterr().err
    with GGUFFile(path) as file:
        assert "llama.rope.scaling.type" not in file.metadata
    ids = random_ids(100, 32000, seed=1)  # within the training context: dynamic NTK changes nothing
    assert relative(Model.load(path, n_ctx=256, kv_type="f32").eval(ids), hf_logits(directory, ids)) <= BOUND


def test_unknown_rope_scaling_names_the_key(tmp_path):
    directory = save_checkpoint(build_model(llama_config(num_hidden_layers=1), seed=1), tmp_path / "hf", "llama")
    config = json.loads((directory / "config.json").read_text())
    config["rope_scaling"] = {"rope_type": "mystery", "factor": 2.0}
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(HalfbyteError, match=r"rope_type 'mystery' is not supported \(supported: linear, llama3, "
                                            r"yarn, dynamic\)"):
        convert(str(directory), tmp_path / "m.gguf", GGMLQuantizationType.F32, progress=False)


def phi3_longrope_config():
    from transformers import Phi3Config

    pairs = 8  # head_dim 16, all of it rotary
    rng = np.random.default_rng(3)
    return Phi3Config(vocab_size=32064, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      original_max_position_embeddings=64, rms_norm_eps=1e-5, sliding_window=None,
                      rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                       "long_factor": [float(x) for x in 1.0 + 3.0 * rng.random(pairs)],
                                       "short_factor": [float(x) for x in 1.0 + 0.2 * rng.random(pairs)]},
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)


@pytest.fixture(scope="module")
def phi3_longrope(tmp_path_factory):
    root = tmp_path_factory.mktemp("longrope")
    directory = save_checkpoint(build_model(phi3_longrope_config(), seed=9), root / "hf", "llama")
    return directory, convert(str(directory), root / "phi3-longrope.gguf", GGMLQuantizationType.F32, progress=False)


def test_phi3_longrope_file(phi3_longrope):
    _, path = phi3_longrope
    with GGUFFile(path) as file:
        assert file.tensors["rope_factors_long.weight"].shape == (8,)
        assert file.tensors["rope_factors_short.weight"].shape == (8,)
        expected = np.sqrt(1 + np.log(256 / 64) / np.log(64))
        assert file.metadata["phi3.rope.scaling.attn_factor"] == pytest.approx(expected, rel=1e-6)


def test_phi3_longrope_short_factors_within_the_original_context(phi3_longrope):
    directory, path = phi3_longrope
    ids = random_ids(50, 32000, seed=2)  # transformers: 50 <= 64 positions -> short factors
    model = Model.load(path, n_ctx=64, kv_type="f32")  # llama.cpp: a context of 64 -> short factors
    assert relative(model.eval(ids), hf_logits(directory, ids)) <= BOUND


def test_phi3_longrope_long_factors_past_it(phi3_longrope):
    directory, path = phi3_longrope
    ids = random_ids(150, 32000, seed=3)  # transformers: 150 > 64 -> long factors for the whole pass
    model = Model.load(path, n_ctx=256, kv_type="f32")  # a context of 256 > 64 -> long factors
    theirs = hf_logits(directory, ids)
    assert relative(model.eval(ids), theirs) <= BOUND
    # The short factors over the same positions would be far off: the choice is what is checked.
    short_only = Model.load(path, n_ctx=256, kv_type="f32")
    short_only.arch.rotation_long = short_only.arch.rotation_short
    assert relative(short_only.eval(ids), theirs) > 20 * BOUND


@pytest.mark.skipif(not os.environ.get("HALFBYTE_LLAMA_CPP"),
                    reason="set HALFBYTE_LLAMA_CPP to a llama.cpp checkout to run")
@pytest.mark.parametrize("kind", ["yarn", "longrope"])
def test_llama_cpp_converter_files_run_here(tmp_path, phi3_longrope, kind):
    """llama.cpp's convert_hf_to_gguf.py output of the same checkpoints: same keys, same logits."""
    if kind == "yarn":
        directory = save_checkpoint(build_model(llama_config(max_position_embeddings=256, rope_scaling=dict(YARN)),
                                                seed=7), tmp_path / "hf", "llama")
        ids, n_ctx = random_ids(200, 32000), 256
    else:
        directory, ids, n_ctx = shutil.copytree(phi3_longrope[0], tmp_path / "hf"), random_ids(150, 32000, seed=3), 256
        # llama.cpp's Phi-3 converter reads tokenizer_class (Phi-3: LlamaTokenizer)
        config = json.loads((directory / "tokenizer_config.json").read_text())
        (directory / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "LlamaTokenizer"}))
    out = tmp_path / "llama.cpp.gguf"
    script = Path(os.environ["HALFBYTE_LLAMA_CPP"]) / "convert_hf_to_gguf.py"
    subprocess.run([sys.executable, str(script), str(directory), "--outtype", "f32", "--outfile", str(out)],
                   check=True, capture_output=True)
    model = Model.load(out, n_ctx=n_ctx, kv_type="f32")
    assert relative(model.eval(ids), hf_logits(directory, ids)) <= BOUND
