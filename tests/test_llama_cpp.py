"""Interchangeability with llama.cpp: our converted files load in llama.cpp (through the
llama-cpp-python package) and give the same tokens and logits there as in halfbyte.

llama-cpp-python is not a dependency (it builds llama.cpp from source); these tests run where
it is installed (`pip install llama-cpp-python`) and are skipped elsewhere.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from tiny_models import build_model, save_checkpoint

from converters.convert import convert
from converters.synthetic import LlamaShape, write_synthetic
from engine.model import Model

llama_cpp = pytest.importorskip("llama_cpp")

from test_runtime import CONFIGS, PROMPT  # noqa: E402

T = GGMLQuantizationType
# max |ours - llama.cpp| / max |llama.cpp| measured: F32 3.5e-4 to 5.6e-4; Q8_0/Q4_0 1.1-1.7%
# (each engine's own Q8_0 activation rounding and fp16 KV cache; see test_runtime.QUANT_BOUNDS).
BOUNDS = {T.F32: 2e-3, T.Q8_0: 0.025, T.Q4_0: 0.025}


def llama_cpp_logits(path, ids):
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    llm.eval(ids)
    return llm, np.array(llm.scores[: len(ids)])


@pytest.mark.parametrize("qtype", list(BOUNDS), ids=lambda t: t.name)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_llama_cpp_runs_our_files_like_we_do(tmp_path, name, qtype):
    make_config, arch = CONFIGS[name]
    directory = save_checkpoint(build_model(make_config(), seed=3), tmp_path / "hf", arch)
    path = convert(str(directory), tmp_path / "m.gguf", qtype, progress=False)
    model = Model.load(path, threads=2)
    ids = model.tokenize(PROMPT)
    llm, theirs = llama_cpp_logits(path, ids)
    assert llm.tokenize(PROMPT.encode()) == ids  # same tokenizer from the same metadata
    ours = model.eval(ids)
    error = np.abs(ours - theirs).max() / np.abs(theirs).max()
    assert error <= BOUNDS[qtype], error


def test_llama_cpp_loads_a_synthetic_benchmark_file(tmp_path):
    path = write_synthetic(tmp_path / "syn.gguf", LlamaShape(32000, 256, 2, 4, 2, 512, 512))
    ids = [1, 300, 301, 302]
    _, theirs = llama_cpp_logits(path, ids)
    ours = Model.load(path, threads=2).eval(ids)
    assert np.abs(ours - theirs).max() <= 0.025 * np.abs(theirs).max()


def llama_quantize(source, target, ftype):
    import ctypes

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    assert llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params)) == 0


def dequantized_copy(source, target):
    """The same model with every tensor dequantized to F32: the exact reference for its weights."""
    from engine import quants
    from engine.gguf_file import GGUFFile, GGUFWriter

    src = GGUFFile(source)
    with GGUFWriter(target) as writer:
        writer.copy_metadata(src)
        for name, info in src.tensors.items():
            writer.add_tensor_info(name, info.shape, GGMLQuantizationType.F32)
        for name, info in src.tensors.items():
            data = src.tensor_bytes(name)
            raw = data.reshape(-1, data.size // max(1, int(np.prod(info.shape[:-1]))))  # rows of bytes
            writer.write_tensor(name, quants.dequantize(raw, info.ggml_type).astype(np.float32))
        writer.finish()
    return target


@pytest.mark.parametrize("ftype_name", ["LLAMA_FTYPE_MOSTLY_Q4_0", "LLAMA_FTYPE_MOSTLY_Q4_K_M",
                                        "LLAMA_FTYPE_MOSTLY_Q5_K_M"])
def test_files_quantized_by_llama_cpp_run_at_least_as_exactly_as_in_llama_cpp(tmp_path, ftype_name):
    """llama-quantize's own output (Q6_K head, K-quant mixes) loads and runs. Against the exact
    result for its weights (all tensors dequantized to F32), halfbyte must be at least as close as
    llama.cpp (within 10% + 0.002). Both quantize activations the same way (Q8_0 for Q4_0 weights,
    Q8_K for K-quants). Measured, max |err| / max |logit|: Q4_0 (with llama-quantize's Q6_K head)
    ours 3.5%, llama.cpp 3.4%; Q4_K_M ours 4.6%, llama.cpp 4.4%; Q5_K_M ours 4.1%, llama.cpp 4.3%.
    (HALFBYTE_KERNELS=reference keeps float activations for K-quants.)"""
    from tiny_models import llama_config

    config = llama_config(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)
    directory = save_checkpoint(build_model(config, seed=4), tmp_path / "hf", "llama")
    f16 = convert(str(directory), tmp_path / "f16.gguf", GGMLQuantizationType.F16, progress=False)
    quantized = tmp_path / "q.gguf"
    llama_quantize(f16, quantized, getattr(llama_cpp, ftype_name))
    model = Model.load(quantized, threads=2)
    types = {info.ggml_type.name for info in model.file.tensors.values()}
    assert types & {"Q6_K", "Q4_K", "Q5_K"}, types  # the K-quants llama.cpp picks are really there
    ids = model.tokenize(PROMPT)
    exact = Model.load(dequantized_copy(quantized, tmp_path / "exact.gguf"), threads=2, kv_type="f32").eval(ids)
    _, theirs = llama_cpp_logits(quantized, ids)
    ours = model.eval(ids)
    scale = np.abs(exact).max()
    our_error = np.abs(ours - exact).max() / scale
    their_error = np.abs(theirs - exact).max() / scale
    assert our_error <= 1.1 * their_error + 0.002, (our_error, their_error)
