"""K-quant and IQ4 writers (engine.kernels.kquant_quantize through engine.quants).

References nobody here wrote: llama.cpp's ``llama-quantize`` (its bytes are committed as fixtures in
tests/fixtures/kquants, see the README there; with the binary at hand, also on fresh data) and
``gguf.quants.dequantize`` for the dequantizers.  The Numba kernels are also checked against the
numpy references of the same module on data the fixtures do not hold.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from engine import quants
from engine.kernels import kquant_quantize as kqq

FIXTURES = Path(__file__).parent / "fixtures" / "kquants"
TYPES = [QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.IQ4_NL, QT.IQ4_XS]
# Checks against llama.cpp's own binaries run only where one is named: CI must not pick up whatever a
# session left in /tmp.
LLAMA_QUANTIZE = Path(os.environ.get("HALFBYTE_LLAMA_QUANTIZE") or "/nonexistent/llama-quantize")
NO_LLAMA_QUANTIZE = "set HALFBYTE_LLAMA_QUANTIZE to llama.cpp's llama-quantize binary to run"


def _input() -> np.ndarray:
    return np.load(FIXTURES / "input.npy")


def _varied(seed: int, rows: int = 24, cols: int = 512) -> np.ndarray:
    """Rows of different distributions, none of them in the fixtures."""
    rng = np.random.default_rng(seed)
    kinds = [
        lambda: rng.standard_normal(cols) * 10.0 ** rng.uniform(-4, 2),
        lambda: rng.standard_t(1.2, cols) * 0.01,
        lambda: rng.laplace(size=cols) * rng.choice([1e-3, 1.0], cols),
        lambda: rng.standard_normal(cols) * (rng.random(cols) < 0.05),
        lambda: np.where(rng.random(cols) < 0.5, 0.0, rng.uniform(0.1, 1, cols)),
        lambda: rng.integers(-3, 4, cols) * 0.125,
        lambda: rng.standard_normal(cols) * np.repeat(10.0 ** rng.uniform(-6, 0, cols // 16), 16),
        lambda: np.full(cols, rng.standard_normal()),
    ]
    return np.stack([kinds[i % len(kinds)]() for i in range(rows)]).astype(np.float32)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_bytes_equal_llama_quantize(qtype) -> None:
    expected = np.load(FIXTURES / f"{qtype.name}.npy")
    data = _input()
    ours = quants.quantize(data, qtype)
    assert ours.shape == expected.shape == (64, quants.row_bytes(qtype, 512))
    bad_rows = np.nonzero((ours != expected).any(axis=1))[0]
    assert bad_rows.size == 0, f"rows differing from llama-quantize: {bad_rows}"
    np.testing.assert_array_equal(kqq.reference_quantize(data, qtype), expected)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_numba_equals_numpy_reference(qtype) -> None:
    for seed in (1, 2):
        data = _varied(seed)
        np.testing.assert_array_equal(quants.quantize(data, qtype), kqq.reference_quantize(data, qtype))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
def test_dequantize_equals_gguf(qtype) -> None:
    raw = np.load(FIXTURES / f"{qtype.name}.npy")
    ours = quants.dequantize(raw, qtype)
    theirs = gguf.quants.dequantize(raw, qtype)
    np.testing.assert_array_equal(ours.view(np.uint32), theirs.view(np.uint32))
    # arbitrary bytes (every code, scale bit pattern and fp16 value, NaN/inf included)
    size, nbytes = kqq.BLOCK[qtype]
    blocks = np.random.default_rng(int(qtype)).integers(0, 256, (300, nbytes), dtype=np.uint8)
    ours = quants.dequantize(blocks.reshape(3, -1), qtype)
    theirs = gguf.quants.dequantize(blocks.reshape(3, -1), qtype)
    assert ours.shape == (3, 100 * size)
    if qtype in (QT.Q4_K, QT.Q5_K, QT.Q6_K):  # kquants.py's readers: NaN where gguf has NaN, payload not kept
        assert np.array_equal(np.isnan(ours), np.isnan(theirs))
        ours, theirs = np.nan_to_num(ours), np.nan_to_num(theirs)
    np.testing.assert_array_equal(ours.view(np.uint32), theirs.view(np.uint32))


# RMS error / RMS value on gaussian rows, measured: Q2_K 0.32, Q3_K 0.17, Q4_K 0.096, Q5_K 0.047,
# Q6_K 0.023, IQ4_NL 0.084, IQ4_XS 0.087 (llama.cpp's ppl ranking of the types, same order).
ROUND_TRIP = {QT.Q2_K: 0.36, QT.Q3_K: 0.20, QT.Q4_K: 0.11, QT.Q5_K: 0.055, QT.Q6_K: 0.027,
              QT.IQ4_NL: 0.095, QT.IQ4_XS: 0.10}


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_round_trip_error(qtype) -> None:
    rng = np.random.default_rng(5)
    data = rng.standard_normal((16, 1024)).astype(np.float32) * 0.02
    back = quants.dequantize(quants.quantize(data, qtype), qtype)
    rel = np.sqrt(np.mean((back - data) ** 2) / np.mean(data**2))
    assert rel < ROUND_TRIP[qtype], rel
    zeros = quants.quantize(np.zeros((2, 256), np.float32), qtype)
    assert not quants.dequantize(zeros, qtype).any()


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_shapes_and_layouts(qtype) -> None:
    """Any leading shape, non-contiguous and float64 input: same bytes as the contiguous float32 rows."""
    data = _varied(3, rows=12, cols=256).reshape(3, 4, 256)
    flat = quants.quantize(data.reshape(12, 256), qtype)
    assert quants.quantize(data, qtype).shape == (3, 4, quants.row_bytes(qtype, 256))
    np.testing.assert_array_equal(quants.quantize(data, qtype).reshape(12, -1), flat)
    wide = np.zeros((3, 4, 512), np.float32)
    wide[..., ::2] = data
    np.testing.assert_array_equal(quants.quantize(wide[..., ::2], qtype).reshape(12, -1), flat)
    np.testing.assert_array_equal(quants.quantize(data.astype(np.float64), qtype).reshape(12, -1), flat)
    with pytest.raises(Exception, match="not a multiple"):
        quants.quantize(np.zeros((2, 16), np.float32), qtype)


def test_registered_types() -> None:
    assert set(TYPES) <= quants.QUANTIZE_TYPES
    assert set(TYPES) <= quants.SUPPORTED_TYPES


def test_edge_values_are_deterministic() -> None:
    """Huge, subnormal and fp16-overflowing inputs: Numba and numpy agree (llama-quantize would
    reject the infinite scales that values beyond fp16 give, so nothing to compare with there)."""
    rows = np.zeros((6, 256), np.float32)
    rows[0, 3] = 1e-40  # subnormal
    rows[1] = np.linspace(-1e-38, 1e-38, 256)
    rows[2, :] = 3e5  # scales overflow fp16
    rows[3, 7] = 1e30
    rows[4] = np.float32(65504.0)
    rows[5, ::3] = -1e-7
    for qtype in TYPES:
        np.testing.assert_array_equal(quants.quantize(rows, qtype), kqq.reference_quantize(rows, qtype))


@pytest.mark.skipif(not LLAMA_QUANTIZE.exists(), reason=NO_LLAMA_QUANTIZE)
def test_fresh_data_equals_llama_quantize(tmp_path) -> None:
    """New data (not the fixtures) through the llama-quantize binary itself."""
    sys.path.insert(0, str(FIXTURES))
    try:
        from make_fixtures import TENSOR, write_gguf
    finally:
        sys.path.pop(0)
    data = _varied(11, rows=32)
    write_gguf(tmp_path / "f32.gguf", data)
    env = dict(os.environ, LD_LIBRARY_PATH=str(LLAMA_QUANTIZE.parent))
    for qtype in TYPES:
        out = tmp_path / f"{qtype.name}.gguf"
        subprocess.run([str(LLAMA_QUANTIZE), "--pure", str(tmp_path / "f32.gguf"), str(out), qtype.name, "2"],
                       check=True, env=env, capture_output=True)
        tensor = next(t for t in gguf.GGUFReader(out).tensors if t.name == TENSOR)
        theirs = np.array(tensor.data, dtype=np.uint8).reshape(data.shape[0], -1)
        np.testing.assert_array_equal(quants.quantize(data, qtype), theirs, err_msg=qtype.name)


def test_branchless_nearest_value_equals_best_index() -> None:
    """The IQ4 search's branchless index == ggml's binary search (best_index_int8), also at and
    one ulp around every midpoint, at the ends, for huge values and NaN."""
    table = kqq.KVALUES_IQ4NL.astype(np.float32)
    values = [np.float32(v) for v in np.random.default_rng(0).uniform(-140, 140, 2000)]
    for a, b in zip(table[:-1], table[1:]):
        mid = np.float32((a + b) / 2)
        values += [mid, np.nextafter(mid, np.float32(-1e9)), np.nextafter(mid, np.float32(1e9)), a, b]
    values += [np.float32(v) for v in (-1e30, 1e30, -0.0, 0.0, np.inf, -np.inf, np.nan, 1e-40)]
    table64 = kqq.KVALUES_IQ4NL.astype(np.int64)
    for v in values:
        assert kqq._nearest_value(v) == kqq._best_index(table64, v) == kqq.ref_best_index(v), v


# ---- quant_recipes: llama-quantize's per-tensor choice in its mixes --------------------------------

RECIPE_MODELS = {  # name: (n_layer, n_head_kv, n_ff, with output.weight)
    "gqa4": (16, 1, 288, True),  # ffn_down rows of 288: K-quant fallbacks
    "mha_tied": (8, 4, 280, False),  # 280 columns: not even 32-divisible -> F16; token_embd as output
}


def recipe_tensors(n_layer: int, n_head_kv: int, n_ff: int, output: bool) -> list[tuple[str, tuple[int, ...]]]:
    hidden, vocab, kv = 256, 32, 256 * n_head_kv // 4
    tensors = [("token_embd.weight", (vocab, hidden)), ("output_norm.weight", (hidden,))]
    if output:
        tensors.append(("output.weight", (vocab, hidden)))
    for i in range(n_layer):
        tensors += [(f"blk.{i}.attn_norm.weight", (hidden,)), (f"blk.{i}.attn_q.weight", (hidden, hidden)),
                    (f"blk.{i}.attn_k.weight", (kv, hidden)), (f"blk.{i}.attn_v.weight", (kv, hidden)),
                    (f"blk.{i}.attn_output.weight", (hidden, hidden)), (f"blk.{i}.ffn_norm.weight", (hidden,)),
                    (f"blk.{i}.ffn_gate.weight", (n_ff, hidden)), (f"blk.{i}.ffn_up.weight", (n_ff, hidden)),
                    (f"blk.{i}.ffn_down.weight", (hidden, n_ff))]
    return tensors


def write_recipe_model(path: Path, n_layer: int, n_head_kv: int, n_ff: int, output: bool) -> None:
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(256)
    writer.add_embedding_length(256)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(4)
    writer.add_head_count_kv(n_head_kv)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(0)
    for name, shape in recipe_tensors(n_layer, n_head_kv, n_ff, output):
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _expected_recipes() -> dict:
    import json

    return json.loads((FIXTURES / "recipes.json").read_text())


@pytest.mark.parametrize("model", RECIPE_MODELS)
def test_recipes_match_llama_quantize_fixture(model) -> None:
    """Types and general.file_type llama-quantize chose (tests/fixtures/kquants/recipes.json)."""
    from engine import quant_recipes

    n_layer, n_head_kv, n_ff, output = RECIPE_MODELS[model]
    for mix, expected in _expected_recipes()[model].items():
        ours = quant_recipes.tensor_types(recipe_tensors(n_layer, n_head_kv, n_ff, output), mix, n_layer,
                                          n_head=4, n_head_kv=n_head_kv)
        assert {name: qtype.name for name, qtype in ours.items()} == expected["types"], mix
        assert quant_recipes.FILE_TYPES[mix] == expected["file_type"], mix


def test_recipe_single_tensor_rules() -> None:
    from engine.quant_recipes import tensor_type

    assert tensor_type("output.weight", (32000, 4096), "q4_0", 32) == QT.Q6_K
    assert tensor_type("output.weight", (32000, 4096), "q8_0", 32) == QT.Q8_0
    assert tensor_type("output.weight", (32000, 4096), "q4_k_m", 32, arch="falcon") == QT.Q8_0
    assert tensor_type("blk.0.attn_v.weight", (4096, 4096), "q4_k_m", 32) == QT.Q6_K  # first eighth
    assert tensor_type("blk.5.attn_v.weight", (4096, 4096), "q4_k_m", 32) == QT.Q4_K
    assert tensor_type("blk.6.attn_v.weight", (4096, 4096), "q4_k_m", 32) == QT.Q6_K  # (6 - 4) % 3 == 2
    assert tensor_type("blk.9.attn_v.weight", (1024, 8192), "q3_k_m", 80, n_head=64, n_head_kv=8) == QT.Q5_K  # 70B
    assert tensor_type("blk.3.ffn_down.weight", (4096, 11008), "q4_k_s", 32) == QT.Q5_K
    assert tensor_type("blk.10.ffn_down.weight", (2048, 288), "q4_k_s", 32) == QT.Q5_0  # 288 % 256: Q4_K -> Q5_0
    assert tensor_type("blk.3.ffn_down.weight", (2048, 288), "q4_k_s", 32) == QT.Q5_1  # Q5_K -> Q5_1
    assert tensor_type("blk.0.attn_norm.weight", (4096,), "q4_k_m", 32) == QT.F32
    with pytest.raises(ValueError, match="unknown quantization mix"):
        tensor_type("output.weight", (32, 256), "q4_k_x", 1)


def make_recipes_fixture(binary: Path = LLAMA_QUANTIZE) -> dict:
    """What llama-quantize (no --pure) chooses for each mix on the RECIPE_MODELS; writes recipes.json."""
    import json
    import tempfile

    from engine import quant_recipes

    result: dict = {}
    env = dict(os.environ, LD_LIBRARY_PATH=str(binary.parent))
    with tempfile.TemporaryDirectory() as tmp:
        for model, (n_layer, n_head_kv, n_ff, output) in RECIPE_MODELS.items():
            source = Path(tmp) / f"{model}.gguf"
            write_recipe_model(source, n_layer, n_head_kv, n_ff, output)
            result[model] = {}
            for mix in quant_recipes.MIXES:
                target = Path(tmp) / "out.gguf"
                subprocess.run([str(binary), str(source), str(target), mix.upper(), "2"], check=True, env=env,
                               capture_output=True)
                reader = gguf.GGUFReader(target)
                file_type = int(reader.fields["general.file_type"].parts[-1][0])
                result[model][mix] = {"file_type": file_type,
                                      "types": {t.name: t.tensor_type.name for t in reader.tensors}}
    (FIXTURES / "recipes.json").write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    return result


@pytest.mark.slow
@pytest.mark.skipif(not LLAMA_QUANTIZE.exists(), reason=NO_LLAMA_QUANTIZE)
def test_recipes_fixture_is_what_llama_quantize_writes(tmp_path, monkeypatch) -> None:
    """Regenerate the recipe fixture with the binary (into tmp) and compare with the committed one."""
    committed = _expected_recipes()
    monkeypatch.setattr(sys.modules[__name__], "FIXTURES", tmp_path)
    assert make_recipes_fixture() == committed
