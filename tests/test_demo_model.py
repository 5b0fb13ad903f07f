"""The embedded demo model: shipped in the package, used when `halfbyte run` gets no model, and
actually trained (it writes the corpus's English and predicts held-out text far better than chance)."""

from __future__ import annotations

import re
from pathlib import Path

from click.testing import CliRunner

from engine.cli import main
from engine.default_model import default_model_path
from engine.gguf_file import GGUFFile
from engine.model import Model

HELDOUT = Path(__file__).resolve().parents[1] / "bench" / "demo_model" / "heldout.txt"


def words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def test_demo_model_ships_in_the_package_and_is_small():
    path = default_model_path()
    assert path.stat().st_size <= 20 * 2**20
    with GGUFFile(path) as f:
        assert f.architecture == "llama"
        assert f.metadata["llama.attention.head_count_kv"] < f.metadata["llama.attention.head_count"]  # GQA
        assert f.metadata["tokenizer.ggml.model"] == "llama"


def test_run_without_a_model_uses_the_demo_and_writes_corpus_english():
    result = CliRunner().invoke(main, ["run", "-p", "Once upon a time", "-n", "48", "-s", "1", "-t", "1"])
    assert result.exit_code == 0, result.output
    assert "embedded demo model" in result.stderr
    generated = words(result.stdout)
    assert len(generated) >= 15
    known = set(words(HELDOUT.read_text(encoding="utf-8")))
    share = sum(w in known for w in generated) / len(generated)
    assert share >= 0.8, (share, result.stdout)  # real words of the corpus, not word salad


def test_demo_model_predicts_held_out_text():
    from engine.perplexity import perplexity

    model = Model.load(default_model_path(), threads=1)
    result = perplexity(model, HELDOUT.read_text(encoding="utf-8"), n_ctx=256, max_chunks=4)
    assert result.ppl < 60  # a uniform guess over the 4096-piece vocabulary is 4096


def test_perplexity_without_a_model_uses_the_demo(tmp_path):
    result = CliRunner().invoke(main, ["perplexity", "-f", str(HELDOUT), "-c", "128", "--chunks", "1", "-q"])
    assert result.exit_code == 0, result.output
    assert "Final estimate: PPL =" in result.stdout


def test_missing_demo_model_is_a_clean_error(monkeypatch, tmp_path):
    import engine.default_model as default_model

    monkeypatch.setattr(default_model, "DATA_DIR", tmp_path)
    result = CliRunner().invoke(main, ["run", "-p", "x"])
    assert result.exit_code == 1 and "embedded demo model is missing" in result.stderr
