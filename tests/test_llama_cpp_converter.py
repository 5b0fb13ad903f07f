"""Files written by llama.cpp's own converter run in halfbyte.

* Always: llama.cpp's vocab-only GGUF files (../shared/fixtures/vocab, written by its converter)
  with tiny weights added keep every metadata key llama.cpp wrote; halfbyte loads and runs them.
* Where a llama.cpp checkout is available (HALFBYTE_LLAMA_CPP=/path/to/llama.cpp, with
  convert_hf_to_gguf.py): tiny transformers checkpoints converted by that script give the
  same logits in halfbyte as in transformers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFValueType
from test_runtime import CONFIGS, PROMPT, hf_logits
from tiny_models import FIXTURES, build_model, load_reference, save_checkpoint

from converters.synthetic import LlamaShape, write_synthetic
from engine.gguf_file import GGUFFile, GGUFWriter
from engine.model import Model

LLAMA_CPP = os.environ.get("HALFBYTE_LLAMA_CPP")


def test_llama_cpp_vocab_file_with_weights_runs(tmp_path):
    """Tensors from a tiny synthetic model under llama.cpp's own metadata (tokenizer included)."""
    vocab = GGUFFile(FIXTURES / "vocab" / "ggml-vocab-llama-spm.gguf")
    weights = GGUFFile(write_synthetic(tmp_path / "w.gguf", LlamaShape(32000, 128, 2, 4, 2, 256, 256)))
    shape_keys = {k: v for k, v in weights.metadata.items() if k.startswith("llama.")}
    path = tmp_path / "llama-cpp-vocab.gguf"
    with GGUFWriter(path) as writer:
        writer.copy_metadata(vocab, skip=shape_keys)
        for key in shape_keys:
            value_type, elem_type = weights.value_types[key]
            writer.add(key, weights.metadata[key], value_type, elem_type)
        writer.add("general.file_type", 2, GGUFValueType.UINT32)
        for name, info in weights.tensors.items():
            writer.add_tensor_info(name, info.shape, info.ggml_type)
        for name in weights.tensors:
            writer.write_tensor(name, weights.tensor_bytes(name))
        writer.finish()
    model = Model.load(path, threads=1)
    import sentencepiece

    reference = sentencepiece.SentencePieceProcessor(model_file=str(FIXTURES / "llama2-tokenizer.model"))
    assert model.tokenize(PROMPT) == [1, *reference.encode(PROMPT)]
    text = model.generate(PROMPT, max_tokens=8, temperature=0)
    assert model.last_stats.generated_tokens + (model.last_stats.stop_reason == "eos") >= 1
    assert isinstance(text, str)
    ours = Model.load(weights.path, threads=1)
    ids = [1, 100, 200, 300]
    model.reset()
    np.testing.assert_array_equal(model.eval(ids), ours.eval(ids))  # same weights, same numbers


@pytest.mark.skipif(not LLAMA_CPP, reason="set HALFBYTE_LLAMA_CPP to a llama.cpp checkout to run")
# falcon7b is left out: llama.cpp's converter reads the config through transformers, whose
# FalconConfig fills num_kv_heads = num_attention_heads even for multi-query models, and then
# fails to split query_key_value ("shape [4, 3, 16, 64] is invalid"); a llama.cpp/transformers-5
# incompatibility, not a property of the checkpoint.
@pytest.mark.parametrize("name", ["llama", "mpt", "falcon40b"])
def test_llama_cpp_converter_output_matches_transformers(tmp_path, name):
    make_config, arch = CONFIGS[name]
    directory = save_checkpoint(build_model(make_config(), seed=3), tmp_path / "hf", arch)
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    if name == "mpt":
        config["architectures"] = ["MPTForCausalLM"]  # the class name mosaicml's checkpoints carry
    config_path.write_text(json.dumps(config))
    out = tmp_path / "llama.cpp.gguf"
    subprocess.run([sys.executable, str(Path(LLAMA_CPP) / "convert_hf_to_gguf.py"), str(directory), "--outtype",
                    "f32", "--outfile", str(out)], check=True, capture_output=True)
    model = Model.load(out, threads=2, kv_type="f32")
    ids = model.tokenize(PROMPT)
    theirs = hf_logits(load_reference(directory), ids)
    assert np.abs(model.eval(ids) - theirs).max() <= 1e-4 * np.abs(theirs).max()
    assert GGMLQuantizationType.F32 in {t.ggml_type for t in model.file.tensors.values()}
