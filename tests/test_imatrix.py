"""Importance matrices: `halfbyte imatrix` (engine/imatrix.py) and `halfbyte quantize --imatrix`
(engine/kernels/kquant_imatrix.py through engine/requantize.py).

References nobody here wrote: llama.cpp's ``llama-quantize --imatrix`` bytes and ``llama-imatrix`` output,
committed in tests/fixtures/imatrix (README there), and where the binaries are built (HALFBYTE_LLAMA_QUANTIZE
as in test_kquant_quantize.py, HALFBYTE_LLAMA_IMATRIX) their output on the spot.  The collected values are
also checked against sums of squares computed here from the activations the model's products see.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from test_gguf_file import assert_one_line_error, invoke_cli
from test_kquant_quantize import LLAMA_QUANTIZE, NO_LLAMA_QUANTIZE, RECIPE_MODELS, recipe_tensors, write_recipe_model

from engine import quants
from engine.errors import HalfbyteError
from engine.gguf_file import GGUFFile
from engine.imatrix import (
    Collector,
    Entry,
    Imatrix,
    compute_imatrix,
    counted_positions,
    importance,
    observe_products,
    read_imatrix,
    write_imatrix,
    write_imatrix_legacy,
)
from engine.kernels import kquant_imatrix as kqi
from engine.model import Model
from engine.requantize import plan_types, quantize_gguf

HERE = Path(__file__).parent
FIXTURES = HERE / "fixtures" / "imatrix"
KQUANTS = HERE / "fixtures" / "kquants"
DEMO = HERE.parent / "engine" / "data" / "demo-kjv-q8_0.gguf"
LLAMA_IMATRIX = Path(os.environ.get("HALFBYTE_LLAMA_IMATRIX") or "/nonexistent/llama-imatrix")
sys.path.insert(0, str(FIXTURES))
sys.path.insert(0, str(KQUANTS))

from make_fixtures import TENSOR, write_gguf  # noqa: E402  (tests/fixtures/kquants)
from make_imatrix_fixtures import COUNT, ROWS, TYPES, demo_f32  # noqa: E402

MIX_OF = {"Q2_K": "q2_k", "Q3_K": "q3_k_m", "Q4_K": "q4_k_m", "Q5_K": "q5_k_m", "Q6_K": "q6_k", "IQ4_NL": "iq4_nl",
          "IQ4_XS": "iq4_xs", "Q4_0": "q4_0", "Q4_1": "q4_1", "Q5_0": "q5_0", "Q5_1": "q5_1"}


def _fixture_imatrix() -> Imatrix:
    sums = (np.load(FIXTURES / "weights.npy") * np.float32(COUNT)).astype(np.float32)
    return Imatrix({TENSOR: Entry(sums, np.array([COUNT]))}, ["fixture"], 1, 512)


def _calibration() -> str:
    return (FIXTURES / "calibration.txt").read_text(encoding="utf-8")[:-1]  # llama.cpp's -f drops the newline


@pytest.fixture(scope="module")
def demo_model() -> Model:
    return Model.load(DEMO, n_ctx=256, threads=2)


@pytest.fixture(scope="module")
def demo_f32_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("imatrix") / "demo-f32.gguf"
    demo_f32(path)
    return path


# ---- quantizing with importance weights: llama-quantize --imatrix's bytes -------------------------------


@pytest.mark.parametrize("name", TYPES)
def test_weighted_bytes_equal_llama_quantize(name) -> None:
    """Every type ggml quantizes with quant_weights, on the committed rows (edge cases included)."""
    expected = np.load(FIXTURES / "quantized.npz")[name]
    data = np.load(KQUANTS / "input.npy")[ROWS]
    weights = importance(_fixture_imatrix())[TENSOR]
    ours = kqi.quantize(data, QT[name], weights)
    assert ours.shape == expected.shape == (len(ROWS), quants.row_bytes(QT[name], 512))
    bad_rows = np.nonzero((ours != expected).any(axis=1))[0]
    assert bad_rows.size == 0, f"rows differing from llama-quantize: {bad_rows}"
    assert (quants.quantize(data, QT[name]) != expected).any(), "the weights must change the bytes"


def test_quantize_file_with_imatrix(tmp_path) -> None:
    """`quantize_gguf(..., imatrix=FILE)` end to end for every type (--pure): the fixture's bytes for the tensor
    the imatrix has, unweighted bytes for a tensor it lacks, llama-quantize's quantize.imatrix.* keys last."""
    data = np.load(KQUANTS / "input.npy")[ROWS]
    source, imatrix = tmp_path / "f32.gguf", tmp_path / "imatrix.gguf"
    write_gguf(source, data)
    write_imatrix(imatrix, _fixture_imatrix())
    expected = np.load(FIXTURES / "quantized.npz")
    notes = []
    for name in TYPES:
        out = tmp_path / f"{name}.gguf"
        quantize_gguf(source, out, MIX_OF[name], progress=False, pure=True, imatrix=imatrix, report=notes.append)
        with GGUFFile(out) as dst:
            assert dst.tensors[TENSOR].ggml_type == QT[name]
            np.testing.assert_array_equal(dst.tensor_bytes(TENSOR).reshape(expected[name].shape), expected[name])
            assert list(dst.metadata)[-6:] == ["general.quantization_version", "general.file_type",
                                               "quantize.imatrix.file", "quantize.imatrix.dataset",
                                               "quantize.imatrix.entries_count", "quantize.imatrix.chunks_count"]
            assert dst.metadata["quantize.imatrix.file"] == str(imatrix)
            assert dst.metadata["quantize.imatrix.dataset"] == "fixture"
            assert dst.metadata["quantize.imatrix.entries_count"] == 1
    # a second tensor the imatrix does not name: quantized without weights (llama-quantize: "did not find weights")
    writer = gguf.GGUFWriter(str(tmp_path / "two.gguf"), "llama")
    writer.add_block_count(1)
    writer.add_tensor(TENSOR, data)
    writer.add_tensor("blk.0.attn_k.weight", data[::-1].copy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    notes.clear()
    quantize_gguf(tmp_path / "two.gguf", tmp_path / "two-q4k.gguf", "q4_k_m", progress=False, pure=True,
                  imatrix=imatrix, report=notes.append)
    with GGUFFile(tmp_path / "two-q4k.gguf") as dst:
        np.testing.assert_array_equal(dst.tensor_bytes(TENSOR).reshape(len(ROWS), -1), expected["Q4_K"])
        np.testing.assert_array_equal(dst.tensor_bytes("blk.0.attn_k.weight").reshape(len(ROWS), -1),
                                      quants.quantize(data[::-1].copy(), QT.Q4_K))
    assert len(notes) == 1 and "blk.0.attn_k.weight" in notes[0] and "blk.0.attn_q" not in notes[0]


def test_chunk_count_key_and_legacy_input(tmp_path) -> None:
    """quantize.imatrix.chunks_count is written when the imatrix knows its chunks; a legacy .dat file gives the
    same weights and bytes as the GGUF it was written from."""
    data = np.load(KQUANTS / "input.npy")[ROWS]
    source = tmp_path / "f32.gguf"
    write_gguf(source, data)
    im = _fixture_imatrix()
    im.chunk_count, im.chunk_size = 7, 1
    write_imatrix(tmp_path / "im.gguf", im)
    write_imatrix_legacy(tmp_path / "im.dat", im)
    for name in ("im.gguf", "im.dat"):
        out = tmp_path / f"{name}.q5k.gguf"
        quantize_gguf(source, out, "q5_k_m", progress=False, pure=True, imatrix=tmp_path / name)
        with GGUFFile(out) as dst:
            assert dst.metadata["quantize.imatrix.chunks_count"] == 7
            assert list(dst.metadata)[-1] == "quantize.imatrix.chunks_count"
            legacy_weights = importance(read_imatrix(tmp_path / name))[TENSOR]
            expected = kqi.quantize(data, QT.Q5_K, legacy_weights)
            np.testing.assert_array_equal(dst.tensor_bytes(TENSOR).reshape(expected.shape), expected)


def test_expert_rows_and_chunks() -> None:
    """Rows of an expert tensor take their expert's weights (llama-quantize's nrows_per_expert); chunks
    starting at first_row give the bytes of the whole."""
    rng = np.random.default_rng(3)
    data = rng.standard_normal((12, 256)).astype(np.float32)
    weights = np.exp(rng.standard_normal((3, 256))).astype(np.float32)
    for qtype in (QT.Q4_K, QT.IQ4_XS, QT.Q5_0):
        whole = kqi.quantize(data, qtype, weights, rows_per_mat=4)
        for e in range(3):
            np.testing.assert_array_equal(whole[4 * e : 4 * e + 4], kqi.quantize(data[4 * e : 4 * e + 4], qtype,
                                                                                  weights[e]))
        parts = [kqi.quantize(data[s : s + 5], qtype, weights, first_row=s, rows_per_mat=4) for s in (0, 5, 10)]
        np.testing.assert_array_equal(np.concatenate(parts), whole)
    with pytest.raises(ValueError, match="weight vectors"):
        kqi.quantize(data, QT.Q4_K, weights, rows_per_mat=2)


def test_types_change_with_an_imatrix(tmp_path) -> None:
    """llama_tensor_get_type's two imatrix rules (checked against llama-quantize on these models): ffn_down
    of the first n_layer/8 layers is Q4_1 / Q5_1 in q4_0 / q5_0 only with an imatrix, and Q5_K (here its
    fallback Q5_1: rows of 288) in iq4_nl / iq4_xs only without one (with: IQ4_NL, IQ4_XS's fallback)."""
    path = tmp_path / "gqa4.gguf"
    write_recipe_model(path, *RECIPE_MODELS["gqa4"])
    expected = {("q4_0", False): ("Q4_0", "Q4_0"), ("q4_0", True): ("Q4_1", "Q4_0"),
                ("q5_0", False): ("Q5_0", "Q5_0"), ("q5_0", True): ("Q5_1", "Q5_0"),
                ("iq4_xs", False): ("Q5_1", "IQ4_NL"), ("iq4_xs", True): ("IQ4_NL", "IQ4_NL"),
                ("iq4_nl", False): ("Q5_1", "IQ4_NL"), ("iq4_nl", True): ("IQ4_NL", "IQ4_NL")}
    with GGUFFile(path) as src:
        for (mix, with_imatrix), (first, third) in expected.items():
            types = plan_types(src, mix, imatrix=with_imatrix)
            got = (types["blk.1.ffn_down.weight"].name, types["blk.2.ffn_down.weight"].name)
            assert got == (first, third), (mix, with_imatrix)
            assert types["blk.0.ffn_down.weight"] == types["blk.1.ffn_down.weight"]
            assert plan_types(src, mix, imatrix=with_imatrix, pure=True) == plan_types(src, mix, pure=True)
        for mix in ("q4_k_m", "q2_k", "q3_k_m", "q6_k"):  # the other mixes: no imatrix rule
            assert plan_types(src, mix, imatrix=True) == plan_types(src, mix)


# ---- collecting: what llama-imatrix collects ------------------------------------------------------------


def _reference_sums(model: Model, text: str, n_ctx: int, n_chunks: int, process_output: bool) -> dict:
    """Squares of the rows every weight product sees, summed in numpy, over llama-imatrix's chunks."""
    from engine import ops

    tokens = model.tokenize(text)
    seen = []
    original = ops.linear

    def record(x, weight):
        seen.append((weight.name, np.array(x, dtype=np.float32)))
        return original(x, weight)

    sums: dict[str, list] = {}
    ops.linear = record
    try:
        for chunk in range(n_chunks):
            window = list(tokens[chunk * n_ctx : (chunk + 1) * n_ctx])
            window[0] = model.tokenizer.bos_id
            model.reset()
            model.eval(window)
    finally:
        ops.linear = original
    for name, x in seen:
        if name.startswith("blk.") or (process_output and name == "output.weight"):
            total = sums.setdefault(name, [np.zeros(x.shape[1]), 0])
            total[0] += (x.astype(np.float64) ** 2).sum(axis=0)
            total[1] += x.shape[0]
    return sums


def test_values_are_the_squares_of_the_activations(demo_model) -> None:
    text = _calibration()
    run = compute_imatrix(demo_model, text, n_ctx=64, max_chunks=3, process_output=True, dataset="calib")
    reference = _reference_sums(demo_model, text, 64, 3, True)
    im = run.imatrix
    assert sorted(im.entries) == sorted(reference) and len(reference) == 6 * 7 + 1  # 7 products a layer + output
    for name, (sums, count) in reference.items():
        entry = im.entries[name]
        assert entry.counts.tolist() == [count] == [3 * 64], name
        np.testing.assert_allclose(entry.sums, sums, rtol=2e-7, err_msg=name)
    assert (im.chunk_count, im.chunk_size, im.datasets) == (3, 64, ["calib"])
    assert run.n_chunks == 3 and len(run.chunk_ppl) == 3 and run.ppl == pytest.approx(run.chunk_ppl[-1])
    # without --process-output the head is not collected; q, k and v see the same rows
    plain = compute_imatrix(demo_model, text, n_ctx=64, max_chunks=3, compute_ppl=False).imatrix
    assert "output.weight" not in plain.entries
    q, k = plain.entries["blk.3.attn_q.weight"], plain.entries["blk.3.attn_k.weight"]
    np.testing.assert_array_equal(q.sums, k.sums)
    np.testing.assert_array_equal(plain.entries["blk.0.ffn_up.weight"].sums, im.entries["blk.0.ffn_up.weight"].sums)


def test_first_layer_from_the_file(demo_model) -> None:
    """blk.0.attn_q's sums from the GGUF alone: BOS-led chunks of token embeddings, RMS-normed."""
    text = _calibration()
    run = compute_imatrix(demo_model, text, n_ctx=100, max_chunks=2, compute_ppl=False)
    tokens = demo_model.tokenize(text)
    with GGUFFile(DEMO) as f:
        table = gguf.quants.dequantize(f.tensor_bytes("token_embd.weight"), QT.Q8_0).reshape(4096, 288)
        norm = np.asarray(f.tensor_array("blk.0.attn_norm.weight"), dtype=np.float64)
        eps = float(f.metadata["llama.attention.layer_norm_rms_epsilon"])
    total = np.zeros(288)
    for chunk in range(2):
        window = np.array(tokens[chunk * 100 : (chunk + 1) * 100])
        window[0] = demo_model.tokenizer.bos_id
        x = table[window].astype(np.float64)
        h = x / np.sqrt((x * x).mean(axis=1, keepdims=True) + eps) * norm
        total += (h * h).sum(axis=0)
    np.testing.assert_allclose(run.imatrix.entries["blk.0.attn_q.weight"].sums, total, rtol=1e-5)


def test_counted_positions() -> None:
    """llama.cpp's micro-batches: tails of fewer than 16 tokens are left out."""
    assert counted_positions(512, 4).all()
    assert counted_positions(171, 3).tolist() == [True] * 170 + [False]  # 170 + 1 of each of 3 chunks
    assert counted_positions(171, 1, multi_sequence=True).all()  # one chunk: 171 tokens in one micro-batch
    assert counted_positions(1030, 1).tolist() == [True] * 1024 + [False] * 6  # 512 + 512 + 6
    assert counted_positions(3000, 1).all()  # 2048 (4 x 512) + 952 (512 + 440)
    assert counted_positions(2050, 1).tolist() == [True] * 2048 + [False] * 2
    assert counted_positions(8, 256).all()  # -c 8: 2 tokens of each of 256 chunks per micro-batch


def test_skipped_tails_and_chunks(demo_model) -> None:
    text = _calibration()
    run = compute_imatrix(demo_model, text, n_ctx=171, max_chunks=3, compute_ppl=False)
    assert {int(e.counts[0]) for e in run.imatrix.entries.values()} == {510}
    assert run.imatrix.chunk_count == 2
    later = compute_imatrix(demo_model, text, n_ctx=100, from_chunk=2, compute_ppl=False)
    assert later.n_chunks == (len(demo_model.tokenize(text)) - 200) // 100
    with pytest.raises(HalfbyteError, match="needs at least 512"):
        compute_imatrix(demo_model, text[:1000], n_ctx=256)
    with pytest.raises(HalfbyteError, match="not enough tokens left after removing 6 chunks"):
        compute_imatrix(demo_model, text, n_ctx=100, from_chunk=6)


def test_collector_ignores_other_threads_and_restores_linear() -> None:
    import threading

    from engine import ops
    from engine.kernels.matmul import WeightView
    from engine.weights import Weight

    matrix = np.arange(12, dtype=np.float32).reshape(3, 4)
    view = WeightView.from_raw(QT.F32, [4, 3], matrix.view(np.uint8).reshape(3, 16))
    weight = Weight(view.ggml_type, view.n_in, view.n_out, view.data)
    object.__setattr__(weight, "name", "blk.0.attn_q.weight")
    original = ops.linear
    collector = Collector()
    x = np.ones((2, 4), np.float32)
    with observe_products(collector):
        np.testing.assert_allclose(ops.linear(x, weight), x @ matrix.T)
        thread = threading.Thread(target=ops.linear, args=(x[:1], weight))
        thread.start()
        thread.join()
    ops.linear(x, weight)
    assert ops.linear is original
    assert collector.counts == {"blk.0.attn_q.weight": 2}
    np.testing.assert_array_equal(collector.sums["blk.0.attn_q.weight"], [2, 2, 2, 2])
    with pytest.raises(HalfbyteError, match="non-finite"):
        collector.observe(np.full((1, 4), np.inf, np.float32), weight)


# ---- vs llama-imatrix (committed output) ----------------------------------------------------------------


def test_equals_llama_imatrix(demo_f32_path, tmp_path, monkeypatch) -> None:
    """`halfbyte imatrix` with llama-imatrix's arguments on the F32 demo model: the same entries, counts
    (every chunk's skipped last token included), chunk count, size and dataset; sums within 1e-3 (measured:
    1.4e-4 at worst, median 1.4e-6: the forward passes differ in float rounding); the same perplexity."""
    info = json.loads((FIXTURES / "llama-imatrix.json").read_text())
    monkeypatch.chdir(FIXTURES)
    out = tmp_path / "ours.gguf"
    result = invoke_cli("imatrix", str(demo_f32_path), *info["args"], "-o", str(out), "-q")
    assert result.exit_code == 0, result.stderr
    final = [line for line in result.stdout.splitlines() if line.startswith("Final estimate")][0]
    assert float(final.split()[4]) == pytest.approx(info["final_ppl"], rel=2e-5)
    ours, theirs = read_imatrix(out), read_imatrix(FIXTURES / "llama-imatrix.gguf")
    assert (ours.datasets, ours.chunk_count, ours.chunk_size) == (theirs.datasets, 2, 171) == (["calibration.txt"],
                                                                                                2, 171)
    assert list(ours.entries) == list(theirs.entries) and "output.weight" in theirs.entries
    worst = []
    for name, entry in theirs.entries.items():
        assert ours.entries[name].counts.tolist() == entry.counts.tolist() == [510], name
        rel = np.abs(ours.entries[name].sums.astype(np.float64) - entry.sums) / entry.sums
        worst.append(rel.max())
        assert rel.max() < 1e-3, name
    assert np.median(worst) < 1e-4


def test_file_formats_round_trip(tmp_path) -> None:
    """llama-imatrix's GGUF written back by us is the same file; its .dat (legacy) likewise (size and
    sha256 of the one llama-imatrix wrote); read back, both give llama-quantize the same weights."""
    fixture = FIXTURES / "llama-imatrix.gguf"
    im = read_imatrix(fixture)
    assert not im.legacy and im.has_metadata and len(im.entries) == 43
    write_imatrix(tmp_path / "back.gguf", im)
    assert (tmp_path / "back.gguf").read_bytes() == fixture.read_bytes()
    info = json.loads((FIXTURES / "llama-imatrix.json").read_text())
    write_imatrix_legacy(tmp_path / "back.dat", im)
    raw = (tmp_path / "back.dat").read_bytes()
    assert (len(raw), hashlib.sha256(raw).hexdigest()) == (info["dat_size"], info["dat_sha256"])
    dat = read_imatrix(tmp_path / "back.dat")
    assert dat.legacy and (dat.chunk_count, dat.datasets) == (2, ["calibration.txt"])
    w_gguf, w_dat = importance(im), importance(dat)
    assert w_gguf.keys() == w_dat.keys()
    for name in w_gguf:
        np.testing.assert_allclose(w_dat[name], w_gguf[name], rtol=3e-7, err_msg=name)
    # several matrices (experts), one that saw no token: 2-D tensors, weights 1 there
    sums = np.arange(1, 13, dtype=np.float32)
    multi = Imatrix({"blk.0.ffn_up_exps.weight": Entry(sums, np.array([2, 0, 4])),
                     "blk.0.attn_q.weight": Entry(np.ones(4, np.float32), np.array([8]))}, ["a", "b"], 3, 4)
    write_imatrix(tmp_path / "multi.gguf", multi)
    with GGUFFile(tmp_path / "multi.gguf") as f:
        assert f.metadata["general.type"] == "imatrix" and f.metadata["imatrix.datasets"] == ["a", "b"]
        assert f.tensors["blk.0.ffn_up_exps.weight.in_sum2"].shape == (3, 4)
        assert f.tensors["blk.0.ffn_up_exps.weight.counts"].shape == (3, 1)
        assert f.tensors["blk.0.attn_q.weight.in_sum2"].shape == (4,)
        assert list(f.tensors)[:2] == ["blk.0.attn_q.weight.in_sum2", "blk.0.attn_q.weight.counts"]
    back = read_imatrix(tmp_path / "multi.gguf")
    np.testing.assert_array_equal(back.entries["blk.0.ffn_up_exps.weight"].sums, sums)
    assert back.entries["blk.0.ffn_up_exps.weight"].counts.tolist() == [2, 0, 4]
    w = importance(back)["blk.0.ffn_up_exps.weight"]
    np.testing.assert_array_equal(w, np.concatenate([sums[:4] / 2, np.ones(4), sums[8:] / 4]).astype(np.float32))
    assert list(importance(back, include=["exps"])) == ["blk.0.ffn_up_exps.weight"]
    assert list(importance(back, exclude=["exps"])) == ["blk.0.attn_q.weight"]


def test_bad_imatrix_files(tmp_path) -> None:
    (tmp_path / "junk.dat").write_bytes(b"\x05\x00\x00\x00abc")
    with pytest.raises(HalfbyteError, match="junk.dat: not an imatrix file"):
        read_imatrix(tmp_path / "junk.dat")
    with pytest.raises(HalfbyteError, match="missing imatrix metadata"):
        importance(read_imatrix(DEMO), path=str(DEMO))  # a model, not an imatrix: no imatrix.* keys
    nan = Imatrix({"blk.0.attn_q.weight": Entry(np.array([np.nan, 1], np.float32), np.array([1]))}, [], 1, 1)
    with pytest.raises(HalfbyteError, match="non-finite"):
        importance(nan)
    with pytest.raises(HalfbyteError, match="cannot be used together"):
        importance(nan, include=["a"], exclude=["b"])


# ---- the commands --------------------------------------------------------------------------------------


def test_cli_imatrix_then_quantize(demo_f32_path, tmp_path) -> None:
    text = tmp_path / "calib.txt"
    text.write_text(_calibration() + "\n")
    out = tmp_path / "im.dat"
    result = invoke_cli("imatrix", str(demo_f32_path), "-f", str(text), "-o", str(out), "-c", "128", "--chunks", "2",
                        "--output-format", "dat", "--no-ppl", "-q")
    assert result.exit_code == 0, result.stderr
    assert "PPL" not in result.stdout and read_imatrix(out).legacy
    q = tmp_path / "q4km.gguf"
    result = invoke_cli("quantize", str(demo_f32_path), str(q), "q4_k_m", "--imatrix", str(out), "-q",
                        "--exclude-weights", "ffn_down")
    assert result.exit_code == 0, result.stderr
    assert "no importance weights for" in result.stderr and "blk.0.ffn_down.weight" in result.stderr
    with GGUFFile(q) as f:
        assert f.metadata["quantize.imatrix.entries_count"] == 36  # 42 - 6 ffn_down
        assert f.metadata["quantize.imatrix.dataset"] == str(text)


def test_cli_errors(demo_f32_path, tmp_path) -> None:
    fixture = str(FIXTURES / "llama-imatrix.gguf")
    other = tmp_path / "other.gguf"
    write_recipe_model(other, *RECIPE_MODELS["mha_tied"])  # blk.0.attn_q.weight of 256 columns, not 288
    result = invoke_cli("quantize", str(other), str(tmp_path / "o.gguf"), "q4_k_m", "--imatrix", fixture, "-q")
    assert result.exit_code == 1
    assert_one_line_error(result.stderr, f"{fixture}: imatrix size 288 is different from tensor size 256")
    assert str(other) in result.stderr and "another model" in result.stderr
    renamed = tmp_path / "renamed.gguf"
    im = read_imatrix(fixture)
    write_imatrix(renamed, Imatrix({"x." + k: v for k, v in im.entries.items()}, im.datasets, 2, 171))
    result = invoke_cli("quantize", str(demo_f32_path), str(tmp_path / "o.gguf"), "q4_k_m", "--imatrix", str(renamed))
    assert_one_line_error(result.stderr, f"{renamed}: none of its 43 entries")
    assert str(demo_f32_path) in result.stderr
    for args, message in (
        (("--imatrix", str(tmp_path / "missing.gguf")), f"{tmp_path / 'missing.gguf'}: No such file"),
        (("--imatrix", str(DEMO)), f"{DEMO}: missing imatrix metadata"),
        (("--imatrix", fixture, "--include-weights", "a", "--exclude-weights", "b"), "--include-weights and"),
        (("--include-weights", "a"), "--include-weights / --exclude-weights need --imatrix"),
    ):
        result = invoke_cli("quantize", str(demo_f32_path), str(tmp_path / "o.gguf"), "q4_k_m", *args)
        assert result.exit_code == 1, args
        assert_one_line_error(result.stderr, message)
    assert not (tmp_path / "o.gguf").exists()
    text = tmp_path / "short.txt"
    text.write_text("In the beginning God created the heaven and the earth.\n")
    for args, message in (
        (("-f", str(tmp_path / "none.txt")), f"{tmp_path / 'none.txt'}: No such file"),
        (("-f", str(text)), "the text has"),
        (("-f", str(text), "-c", "0"), "-c must be >= 1"),
        (("-f", str(text), "-o", str(demo_f32_path)), f"{demo_f32_path}: refusing to overwrite"),
    ):
        result = invoke_cli("imatrix", str(demo_f32_path), *args, "-q")
        assert result.exit_code == 1, args
        assert_one_line_error(result.stderr, message)


# ---- with llama.cpp's binaries at hand: their output on the spot ----------------------------------------

needs_llama_quantize = pytest.mark.skipif(not LLAMA_QUANTIZE.exists(), reason=NO_LLAMA_QUANTIZE)


def _llama_quantize(*args: str, cwd: Path) -> None:
    env = dict(os.environ, LD_LIBRARY_PATH=str(LLAMA_QUANTIZE.parent))
    subprocess.run([str(LLAMA_QUANTIZE), *args], check=True, env=env, cwd=cwd, capture_output=True)


@pytest.mark.slow
@needs_llama_quantize
@pytest.mark.parametrize("mix", ["q4_k_m", "q3_k_s", "q2_k", "q5_k_m", "q6_k", "iq4_xs", "q4_0", "q5_1"])
def test_whole_files_equal_llama_quantize(demo_f32_path, tmp_path, monkeypatch, mix) -> None:
    """The demo model quantized with llama-imatrix's matrix: llama-quantize's file, byte for byte (both run
    from the same directory: quantize.imatrix.file is the path as given)."""
    import shutil

    shutil.copy(FIXTURES / "llama-imatrix.gguf", tmp_path / "im.gguf")
    shutil.copy(demo_f32_path, tmp_path / "m.gguf")
    monkeypatch.chdir(tmp_path)
    _llama_quantize("--imatrix", "im.gguf", "m.gguf", "theirs.gguf", mix.upper(), "2", cwd=tmp_path)
    result = invoke_cli("quantize", "m.gguf", "ours.gguf", mix, "-q", "--imatrix", "im.gguf")
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "ours.gguf").read_bytes() == (tmp_path / "theirs.gguf").read_bytes()


@pytest.mark.slow
@needs_llama_quantize
@pytest.mark.parametrize("mix", ["q4_0", "q5_0", "iq4_nl", "iq4_xs", "q4_k_s"])
def test_imatrix_rules_equal_llama_quantize(tmp_path, monkeypatch, mix) -> None:
    """16 layers, so the imatrix ffn_down rules apply; include/exclude filters and a .dat file too."""
    spec = RECIPE_MODELS["gqa4"]
    write_recipe_model(tmp_path / "m.gguf", *spec)
    rng = np.random.default_rng(5)
    entries = {name: Entry((np.exp(rng.normal(0, 1, shape[1])) * 640).astype(np.float32), np.array([640]))
               for name, shape in recipe_tensors(*spec) if name.startswith("blk.") and len(shape) == 2}
    im = Imatrix(entries, ["calib.txt"], 5, 128)
    write_imatrix(tmp_path / "im.gguf", im)
    write_imatrix_legacy(tmp_path / "im.dat", im)
    monkeypatch.chdir(tmp_path)
    for file, include, exclude in (("im.gguf", [], []), ("im.dat", [], []), ("im.gguf", [], ["ffn_"]),
                                   ("im.gguf", ["attn_v", "blk.1."], [])):
        options = sum((["--include-weights", t] for t in include), []) + \
            sum((["--exclude-weights", t] for t in exclude), [])
        _llama_quantize("--imatrix", file, *options, "m.gguf", "theirs.gguf", mix.upper(), "2", cwd=tmp_path)
        quantize_gguf("m.gguf", "ours.gguf", mix, progress=False, imatrix=file, include_weights=include,
                      exclude_weights=exclude)
        assert Path("ours.gguf").read_bytes() == Path("theirs.gguf").read_bytes(), (file, include, exclude)


@pytest.mark.slow
@needs_llama_quantize
def test_fresh_data_equals_llama_quantize(tmp_path) -> None:
    """New rows (1024 wide: 4 super-blocks, 32 legacy blocks) and new weights through the binary, every type."""
    from test_kquant_quantize import _varied

    data = _varied(41, rows=16, cols=1024)
    rng = np.random.default_rng(42)
    weights = (rng.chisquare(1, 1024) * 10.0 ** rng.uniform(-3, 3)).astype(np.float32)
    weights[rng.random(1024) < 0.1] = 0.0
    write_gguf_wide(tmp_path / "f32.gguf", data)
    write_imatrix(tmp_path / "im.gguf", Imatrix({TENSOR: Entry(weights, np.array([1]))}, ["x"], 1, 1))
    for name in TYPES:
        _llama_quantize("--pure", "--imatrix", "im.gguf", "f32.gguf", "out.gguf", name, "1", cwd=tmp_path)
        theirs = next(t for t in gguf.GGUFReader(tmp_path / "out.gguf").tensors if t.name == TENSOR)
        ours = kqi.quantize(data, QT[name], weights)
        np.testing.assert_array_equal(ours, np.array(theirs.data, dtype=np.uint8).reshape(ours.shape), err_msg=name)


def write_gguf_wide(path: Path, data: np.ndarray) -> None:
    """``write_gguf`` of the kquants fixtures for rows of any width (the hyper-parameters llama-quantize reads)."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(256)
    writer.add_embedding_length(data.shape[1])
    writer.add_block_count(1)
    writer.add_feed_forward_length(data.shape[1])
    writer.add_head_count(4)
    writer.add_head_count_kv(4)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(0)
    writer.add_tensor(TENSOR, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.slow
@pytest.mark.skipif(not LLAMA_IMATRIX.exists(),
                    reason="set HALFBYTE_LLAMA_IMATRIX to llama.cpp's llama-imatrix binary to run")
def test_llama_imatrix_fixture_is_what_it_writes(tmp_path, monkeypatch) -> None:
    """Remake llama-imatrix.gguf / .json with the binary (into tmp) and compare with the committed ones."""
    import make_imatrix_fixtures

    monkeypatch.setattr(make_imatrix_fixtures, "HERE", tmp_path)
    for name in ("calibration.txt",):
        (tmp_path / name).write_bytes((FIXTURES / name).read_bytes())
    make_imatrix_fixtures.make_llama_imatrix(str(LLAMA_IMATRIX.parent))
    # Same entries, counts and metadata; the sums to float rounding (ggml's threads split the work by
    # timing, so two runs on a loaded machine can add in another order).
    from engine.gguf_file import GGUFFile

    with GGUFFile(tmp_path / "llama-imatrix.gguf") as remade, GGUFFile(FIXTURES / "llama-imatrix.gguf") as committed:
        assert remade.metadata == committed.metadata and set(remade.tensors) == set(committed.tensors)
        for name in committed.tensors:
            np.testing.assert_allclose(remade.tensor_array(name), committed.tensor_array(name), rtol=1e-5, atol=0)
    remade_info = json.loads((tmp_path / "llama-imatrix.json").read_text())
    committed_info = json.loads((FIXTURES / "llama-imatrix.json").read_text())
    assert remade_info.keys() == committed_info.keys()
