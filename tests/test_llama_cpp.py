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
