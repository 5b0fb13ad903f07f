"""`halfbyte bench` and the synthetic benchmark files."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from converters import synthetic
from engine.cli import main
from engine.gguf_file import GGUFFile
from engine.model import Model

TINY = synthetic.LlamaShape(n_vocab=32000, n_embd=128, n_layer=2, n_head=4, n_head_kv=2, n_ctx=256, n_ff=256)


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    return synthetic.write_synthetic(tmp_path_factory.mktemp("syn") / "tiny.gguf", TINY)


def test_synthetic_file_has_the_shape_and_runs(tiny_file):
    with GGUFFile(tiny_file) as f:
        assert f.metadata["llama.block_count"] == 2
        assert f.tensors["blk.0.attn_k.weight"].ne == (128, 64)  # GQA: 2 KV heads of 32
        assert f.tensors["output.weight"].ggml_type == 2  # Q4_0
        assert len(f.metadata["tokenizer.ggml.tokens"]) == 32000
    model = Model.load(tiny_file, threads=1)
    logits = model.eval(model.tokenize("hello world"))
    assert np.all(np.isfinite(logits)) and logits.std() > 0


def test_synthetic_files_are_built_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("HALFBYTE_CACHE", str(tmp_path))
    monkeypatch.setitem(synthetic.SHAPES, "tiny", TINY)
    path = synthetic.synthetic_path("tiny")
    assert path.parent == tmp_path / "synthetic" and path.exists()
    stamp = path.stat().st_mtime_ns
    assert synthetic.synthetic_path("tiny") == path and path.stat().st_mtime_ns == stamp


def test_bench_json_uses_llama_bench_fields(tiny_file):
    result = CliRunner().invoke(main, ["bench", str(tiny_file), "-p", "8", "-n", "4", "-r", "2", "-t", "1", "--json"])
    assert result.exit_code == 0, result.output
    records = json.loads(result.stdout)
    assert [(r["n_prompt"], r["n_gen"]) for r in records] == [(8, 0), (0, 4)]
    for r in records:
        for key in ("n_threads", "avg_ts", "stddev_ts", "model_size", "model_n_params", "cpu_info", "samples_ns",
                    "load_ms", "first_token_ms", "peak_rss_bytes", "kernels", "cpu_features", "versions"):
            assert key in r
        assert r["n_threads"] == 1 and len(r["samples_ns"]) == 2 and r["avg_ts"] > 0
        assert r["model_n_params"] == sum(int(np.prod(t.shape)) for t in GGUFFile(tiny_file).tensors.values())


def test_bench_table(tiny_file):
    result = CliRunner().invoke(main, ["bench", str(tiny_file), "-p", "4", "-n", "0", "-r", "1"])
    assert result.exit_code == 0, result.output
    assert "| pp4 |" in result.stdout and "peak RSS" in result.stdout


def test_bench_at_depth(tiny_file):
    """-d D as llama-bench: each timed test runs after D tokens already in the context."""
    result = CliRunner().invoke(main, ["bench", str(tiny_file), "-p", "4", "-n", "2", "-d", "100", "-r", "1",
                                       "--json"])
    assert result.exit_code == 0, result.output
    records = json.loads(result.stdout)
    assert [(r["n_prompt"], r["n_gen"], r["n_depth"]) for r in records] == [(4, 0, 100), (0, 2, 100)]
    table = CliRunner().invoke(main, ["bench", str(tiny_file), "-p", "0", "-n", "2", "-d", "30", "-r", "1"])
    assert "| tg2 @ d30 |" in table.stdout


def test_bench_with_a_q8_0_kv_cache(tiny_file):
    """-ctk/-ctv as llama-bench: the cache's types are used and reported."""
    result = CliRunner().invoke(main, ["bench", str(tiny_file), "-p", "4", "-n", "2", "-r", "1", "-ctk", "q8_0",
                                       "-ctv", "q8_0", "--json"])
    assert result.exit_code == 0, result.output
    records = json.loads(result.stdout)
    assert {(r["type_k"], r["type_v"]) for r in records} == {("q8_0", "q8_0")}
    f16 = json.loads(CliRunner().invoke(main, ["bench", str(tiny_file), "-p", "4", "-n", "0", "-r", "1",
                                               "--json"]).stdout)
    assert records[0]["kv_cache_bytes"] * 64 == f16[0]["kv_cache_bytes"] * 34  # 34 bytes per 32 values, not 64


@pytest.mark.parametrize("args,message", [
    ([], "give a MODEL file or --synthetic"),
    (["{tiny}", "-ctk", "q4_1"], "KV cache type must be one of f16, f32, q8_0, got 'q4_1'"),
    (["{tiny}", "-d", "-1"], "-d (n_depth) must be >= 0, got -1"),
    (["--synthetic", "llama-2b"], "unknown synthetic model 'llama-2b'"),
    (["{tiny}", "-p", "0", "-n", "0"], "need -p > 0 or -n > 0"),
    (["{tiny}", "-r", "0"], "-r (repetitions) must be >= 1"),
    (["{tiny}", "-p", "-1", "-n", "1"], "-p (n_prompt) must be >= 0, got -1"),
    (["{tiny}", "-n", "-3"], "-n (n_gen) must be >= 0, got -3"),
    (["{tmp}"], "is a directory"),
    (["{missing}"], "missing.gguf"),
])
def test_bench_bad_input(args, message, tiny_file, tmp_path):
    args = [a.format(tiny=tiny_file, missing=tmp_path / "missing.gguf", tmp=tmp_path) for a in args]
    result = CliRunner().invoke(main, ["bench", *args])
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output
