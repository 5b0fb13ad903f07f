"""`halfbyte quantize IN OUT TYPE` with llama-quantize's mixes (q2_k ... q6_k, iq4_nl, iq4_xs, the legacy
types, f16/bf16/f32) and its options --pure, --output-tensor-type, --token-embedding-type.

References nobody here wrote: the per-tensor types llama-quantize chose (tests/fixtures/kquants/recipes.json,
made by its binary) everywhere, and where the binary is built (HALFBYTE_LLAMA_QUANTIZE, as in
test_kquant_quantize.py) its output files themselves: ours must be the same file, byte for byte.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from test_gguf_file import assert_one_line_error, invoke_cli
from test_kquant_quantize import FIXTURES, LLAMA_QUANTIZE, NO_LLAMA_QUANTIZE, RECIPE_MODELS, write_recipe_model

from engine import quants
from engine.filetypes import QUANTIZE_MIXES
from engine.gguf_file import GGUFFile
from engine.requantize import plan_types, quantize_gguf

needs_llama_quantize = pytest.mark.skipif(not LLAMA_QUANTIZE.exists(),
                                          reason=NO_LLAMA_QUANTIZE)
# a smaller model than RECIPE_MODELS' 16 layers for the byte comparisons: 8 layers (use_more_bits varies),
# GQA 4 (the q2_k / iq4 attn_v rules), ffn_down rows of 288 (the K-quant fallbacks)
SMALL = {"gqa4_8": (8, 1, 288, True), "mha_tied": RECIPE_MODELS["mha_tied"]}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("mixes")
    paths = {}
    for name, spec in {**RECIPE_MODELS, **SMALL}.items():
        paths[name] = directory / f"{name}.gguf"
        write_recipe_model(paths[name], *spec)
    return paths


def llama_quantize(source: Path, target: Path, mix: str, *options: str) -> None:
    env = dict(os.environ, LD_LIBRARY_PATH=str(LLAMA_QUANTIZE.parent))
    subprocess.run([str(LLAMA_QUANTIZE), *options, str(source), str(target), mix.upper(), "2"], check=True, env=env,
                   capture_output=True)


# ---- everywhere: the committed expectations ----------------------------------------------------------------


@pytest.mark.parametrize("model", RECIPE_MODELS)
def test_types_per_tensor_are_llama_quantizes(models, model) -> None:
    """Every mix of recipes.json: the type of every tensor (norms kept F32, fallbacks, tied embeddings)."""
    expected = json.loads((FIXTURES / "recipes.json").read_text())[model]
    with GGUFFile(models[model]) as src:
        for mix, want in expected.items():
            assert {name: t.name for name, t in plan_types(src, mix).items()} == want["types"], mix
            assert QUANTIZE_MIXES[mix][0] == want["file_type"], mix


def test_written_file(models, tmp_path) -> None:
    """A q3_k_m file (Q3_K, Q4_K, Q5_K, Q6_K and the Q5_0 fallback in one): tensors in llama-quantize's
    order, each one's bytes the quantizer's, metadata kept, file type and quantization version last."""
    out = tmp_path / "q3_k_m.gguf"
    quantize_gguf(models["gqa4_8"], out, "q3_k_m", progress=False)
    with GGUFFile(models["gqa4_8"]) as src, GGUFFile(out) as dst:
        names = list(dst.tensors)
        layer = [int(n.split(".")[1]) if n.startswith("blk.") else -1 for n in names]
        assert sorted(names) == sorted(src.tensors) and layer == sorted(layer)
        types = plan_types(src, "q3_k_m")
        assert {t.name for t in types.values()} == {"F32", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q5_0"}
        for name in names:
            assert dst.tensors[name].ggml_type == types[name]
            values = src.tensor_array(name)
            assert dst.tensor_bytes(name).tobytes() == quants.quantize(values, types[name]).tobytes(), name
        assert list(dst.metadata)[-2:] == ["general.quantization_version", "general.file_type"]
        assert dst.metadata["general.file_type"] == 12
        assert [k for k in dst.metadata if k not in ("general.file_type", "general.quantization_version")] == \
            [k for k in src.metadata if k != "general.file_type"]


def test_options(models) -> None:
    with GGUFFile(models["gqa4_8"]) as src:
        pure = plan_types(src, "q4_k_m", pure=True)
        assert pure["blk.0.attn_v.weight"] == QT.Q4_K and pure["output.weight"] == QT.Q4_K
        assert pure["blk.0.ffn_down.weight"] == QT.Q5_0  # rows of 288: the fallback still applies
        assert pure["blk.0.attn_norm.weight"] == QT.F32
        chosen = plan_types(src, "q4_k_m", output_tensor_type=QT.Q8_0, token_embedding_type=QT.Q2_K)
        assert chosen["output.weight"] == QT.Q8_0 and chosen["token_embd.weight"] == QT.Q2_K
        assert chosen["blk.0.attn_v.weight"] == QT.Q6_K
        assert set(plan_types(src, "f16").values()) == {QT.F16, QT.F32}
    with GGUFFile(models["mha_tied"]) as src:  # no output.weight: token_embd takes the output's type
        assert plan_types(src, "q4_k_m")["token_embd.weight"] == QT.Q6_K
        assert plan_types(src, "q4_k_m", output_tensor_type=QT.Q5_K)["token_embd.weight"] == QT.Q5_K
        assert plan_types(src, "q4_k_m", pure=True, output_tensor_type=QT.Q5_K)["token_embd.weight"] == QT.Q4_K


def test_requantize_needs_the_flag(models, tmp_path) -> None:
    q8 = tmp_path / "q8.gguf"
    quantize_gguf(models["mha_tied"], q8, "q8_0", progress=False)
    result = invoke_cli("quantize", "-q", str(q8), str(tmp_path / "out.gguf"), "q4_k_m")
    assert result.exit_code == 1
    assert_one_line_error(result.stderr, f"{q8}: tensor ")
    assert "--allow-requantize" in result.stderr
    result = invoke_cli("quantize", "-q", "--allow-requantize", str(q8), str(tmp_path / "out.gguf"), "q4_k_m")
    assert result.exit_code == 0, result.stderr
    with GGUFFile(tmp_path / "out.gguf") as out:
        assert out.tensors["token_embd.weight"].ggml_type == QT.Q6_K


def test_cli(models, tmp_path) -> None:
    out = tmp_path / "out.gguf"
    result = invoke_cli("quantize", "-q", "--pure", "--output-tensor-type", "Q8_0", "--token-embedding-type", "f16",
                        str(models["gqa4_8"]), str(out), "Q4_K_M")
    assert result.exit_code == 0, result.stderr
    with GGUFFile(out) as f:
        assert f.tensors["output.weight"].ggml_type == QT.Q8_0
        assert f.tensors["token_embd.weight"].ggml_type == QT.F16
        assert f.tensors["blk.3.attn_v.weight"].ggml_type == QT.Q4_K
        assert f.metadata["general.file_type"] == 15
    for args, message in ((("q4_k",), "unknown output type 'q4_k'"),
                          (("q4_k_m", "--output-tensor-type", "q9_k"), "unknown ggml type 'q9_k'")):
        result = invoke_cli("quantize", "-q", str(models["gqa4_8"]), str(tmp_path / "bad.gguf"), *args)
        assert result.exit_code == 1
        assert_one_line_error(result.stderr, message)
        assert not (tmp_path / "bad.gguf").exists()


# ---- the llama-quantize binary: the same file ---------------------------------------------------------------

REQUIRED = ["q4_k_m", "q3_k_m", "q5_k_s", "q6_k", "iq4_xs", "q2_k"]
OTHERS = [mix for mix in QUANTIZE_MIXES if mix not in REQUIRED]


def assert_same_file(ours: Path, theirs: Path) -> None:
    a, b = ours.read_bytes(), theirs.read_bytes()
    if a == b:
        return
    with GGUFFile(ours) as x, GGUFFile(theirs) as y:  # say which tensor differs
        assert list(x.tensors) == list(y.tensors)
        for name in x.tensors:
            assert x.tensors[name].ggml_type == y.tensors[name].ggml_type, name
            assert x.tensor_bytes(name).tobytes() == y.tensor_bytes(name).tobytes(), name
        assert list(x.metadata.items()) == list(y.metadata.items())
    raise AssertionError(f"{ours} and {theirs} differ")


@needs_llama_quantize
@pytest.mark.parametrize("mix", REQUIRED + OTHERS)
def test_same_file_as_llama_quantize(models, tmp_path, mix) -> None:
    for model in SMALL:
        if model == "mha_tied" and mix not in REQUIRED:
            continue
        ours, theirs = tmp_path / f"ours-{model}.gguf", tmp_path / f"theirs-{model}.gguf"
        quantize_gguf(models[model], ours, mix, progress=False)
        llama_quantize(models[model], theirs, mix)
        assert_same_file(ours, theirs)


@needs_llama_quantize
@pytest.mark.parametrize("options", [("--pure",), ("--output-tensor-type", "q8_0", "--token-embedding-type", "q3_k"),
                                     ("--pure", "--output-tensor-type", "iq4_nl")])
def test_same_file_as_llama_quantize_with_options(models, tmp_path, options) -> None:
    for model in SMALL:
        ours, theirs = tmp_path / f"ours-{model}.gguf", tmp_path / f"theirs-{model}.gguf"
        result = invoke_cli("quantize", "-q", *options, str(models[model]), str(ours), "q4_k_s")
        assert result.exit_code == 0, result.stderr
        llama_quantize(models[model], theirs, "q4_k_s", *options)
        assert_same_file(ours, theirs)


@needs_llama_quantize
def test_same_requantized_file_as_llama_quantize(models, tmp_path) -> None:
    """--allow-requantize from a Q8_0 file (llama-quantize's): dequantized, then the mix."""
    q8 = tmp_path / "q8.gguf"
    llama_quantize(models["gqa4_8"], q8, "q8_0")
    ours, theirs = tmp_path / "ours.gguf", tmp_path / "theirs.gguf"
    quantize_gguf(q8, ours, "q4_k_m", progress=False, allow_requantize=True)
    llama_quantize(q8, theirs, "q4_k_m", "--allow-requantize")
    assert_same_file(ours, theirs)


def test_memory_is_bounded_by_chunks(models, monkeypatch, tmp_path) -> None:
    """Rows are converted a chunk at a time (here: 32 rows of 256), with the same bytes as in one go."""
    from engine import requantize

    whole = tmp_path / "whole.gguf"
    quantize_gguf(models["mha_tied"], whole, "q2_k", progress=False)
    calls = []
    original = requantize.quants.quantize

    def spy(values, qtype):
        calls.append(values.shape)
        return original(values, qtype)

    monkeypatch.setattr(requantize, "CHUNK_ELEMENTS", 8192)
    monkeypatch.setattr(requantize.quants, "quantize", spy)
    chunked = tmp_path / "chunked.gguf"
    quantize_gguf(models["mha_tied"], chunked, "q2_k", progress=False)
    assert calls and max(shape[0] * shape[1] for shape in calls) <= 8192
    assert chunked.read_bytes() == whole.read_bytes()


def test_gguf_reads_the_file(models, tmp_path) -> None:
    out = tmp_path / "iq4_xs.gguf"
    quantize_gguf(models["gqa4_8"], out, "iq4_xs", progress=False)
    reader = gguf.GGUFReader(out)
    src = gguf.GGUFReader(models["gqa4_8"])
    originals = {t.name: t for t in src.tensors}
    for tensor in reader.tensors:
        original = originals[tensor.name]
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        scale = np.abs(original.data).max()
        assert np.abs(values.reshape(original.data.shape) - original.data).max() <= 0.25 * scale, tensor.name
