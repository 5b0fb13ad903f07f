"""`halfbyte run`: what reaches stdout and stderr, interactive mode, the first-run compile notice."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from converters.synthetic import LlamaShape, write_synthetic
from engine.cli import main
from engine.model import Model

SHAPE = LlamaShape(n_vocab=32000, n_embd=128, n_layer=2, n_head=4, n_head_kv=2, n_ctx=256, n_ff=256)
GREEDY = ["--temp", "0", "--repeat-penalty", "1", "-t", "1"]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    return write_synthetic(tmp_path_factory.mktemp("run") / "m.gguf", SHAPE)


@pytest.fixture(autouse=True)
def warm_cache(tmp_path, monkeypatch):
    """A private cache dir, marked warm, so the notice does not appear unless a test wants it."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    from engine import jit_cache

    jit_cache.mark_warm()


def invoke(*args, input=None):
    return CliRunner().invoke(main, ["run", *map(str, args)], input=input)


def test_stdout_is_exactly_the_generated_text(model_file):
    expected = Model.load(model_file, threads=1).generate("hello", max_tokens=10, temperature=0, repeat_penalty=1)
    result = invoke(model_file, "-p", "hello", "-n", 10, *GREEDY)
    assert result.exit_code == 0, result.output
    assert result.stdout == expected
    assert "prompt" in result.stderr and "tokens/s" in result.stderr and "stopped: length" in result.stderr


def test_echo_prints_the_prompt_first(model_file):
    result = invoke(model_file, "-p", "hello", "-n", 4, "--echo", *GREEDY)
    assert result.exit_code == 0 and result.stdout.startswith("hello")


def test_interactive_mode_reads_turns_until_end_of_input(model_file):
    model = Model.load(model_file, threads=1)
    first = model.generate("hi\n", max_tokens=3, temperature=0, repeat_penalty=1)
    second = model.generate("again\n", max_tokens=3, temperature=0, repeat_penalty=1, reset=False, add_bos=False)
    result = invoke(model_file, "-i", "-n", 3, *GREEDY, input="hi\nagain\n")
    assert result.exit_code == 0, result.output
    assert result.stdout == first + second  # the second turn continues the first one's context
    assert result.stderr.count("> ") == 3  # a prompt before each turn and one at end of input


def test_compile_notice_only_when_the_cache_is_cold(model_file, tmp_path, monkeypatch):
    warm = invoke(model_file, "-p", "hi", "-n", 1, *GREEDY)
    assert "compiling kernels" not in warm.stderr
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cold"))
    cold = invoke(model_file, "-p", "hi", "-n", 1, *GREEDY)
    assert cold.exit_code == 0 and "compiling kernels (first run only)" in cold.stderr
    again = invoke(model_file, "-p", "hi", "-n", 1, *GREEDY)
    assert "compiling kernels" not in again.stderr  # the successful run marked the cache warm


@pytest.mark.parametrize("args,message", [
    (["-p", "hi", "--temp", "-1"], "temperature"),
    (["-p", "hi", "-c", "0"], "context size must be positive"),
    (["-p", "word " * 300, "-c", "64"], "does not fit in the context of 64"),
    (["-f", "{missing}"], "missing.txt"),
])
def test_bad_input_is_one_line(model_file, tmp_path, args, message):
    args = [a.format(missing=tmp_path / "missing.txt") for a in args]
    result = invoke(model_file, *args)
    assert result.exit_code == 1 and message in result.stderr and "Traceback" not in result.output


def test_context_shift_keeps_generating_past_the_context(model_file):
    model = Model.load(model_file, n_ctx=32, threads=1)
    model.generate("hello", max_tokens=60, temperature=0, repeat_penalty=1)
    assert model.last_stats.stop_reason == "context" and model.last_stats.generated_tokens < 60
    model.generate("hello", max_tokens=60, temperature=0, repeat_penalty=1, context_shift=True)
    assert model.last_stats.stop_reason == "length" and model.last_stats.generated_tokens == 60
    assert model.n_past <= 32
    # After a shift the state is exactly a fresh evaluation of the kept tokens.
    kept = list(model.tokens)
    logits = model.eval([5], last_only=True)
    fresh = Model.load(model_file, n_ctx=32, threads=1)
    fresh.eval(kept)
    np.testing.assert_allclose(fresh.eval([5], last_only=True), logits, rtol=1e-5, atol=1e-5)
    result = invoke(model_file, "-p", "hello", "-n", 40, "-c", 16, "--context-shift", *GREEDY)
    assert result.exit_code == 0 and "stopped: length" in result.stderr


def test_each_installation_has_its_own_warm_marker(tmp_path, monkeypatch):
    """A warm checkout must not silence the notice for a fresh `pip install .` (another kernel cache)."""
    from engine import jit_cache

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    jit_cache.mark_warm()
    assert jit_cache.is_warm()
    other = tmp_path / "site-packages" / "engine" / "kernels"
    other.mkdir(parents=True)
    for path in jit_cache.KERNEL_DIR.glob("*.py"):
        (other / path.name).write_bytes(path.read_bytes())  # the same sources, installed elsewhere
    monkeypatch.setattr(jit_cache, "KERNEL_DIR", other)
    assert not jit_cache.is_warm()
