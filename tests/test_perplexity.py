"""`halfbyte perplexity` against the same statistic computed with transformers."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from gguf import GGMLQuantizationType
from tiny_models import build_model, llama_config, load_reference, save_checkpoint

from converters.convert import convert
from engine.cli import main
from engine.errors import HalfbyteError
from engine.model import Model
from engine.perplexity import perplexity

TEXT = (
    "In the beginning the earth was without form, and void; and darkness was upon the face of the deep. "
    "The quick brown fox jumps over the lazy dog while 12 ducks swim across the pond at 3:45 pm. "
    "Numbers, punctuation; and UPPER case words -- all of them count as tokens here!\n"
) * 4


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppl")
    directory = save_checkpoint(build_model(llama_config(), seed=5), root / "hf", "llama")
    path = convert(str(directory), root / "m.gguf", GGMLQuantizationType.F32, progress=False)
    return Model.load(path, threads=2, kv_type="f32"), load_reference(directory)


def reference_perplexity(model: Model, reference, n_ctx: int) -> float:
    """llama-perplexity's statistic, from transformers' logits."""
    tokens = model.tokenize(TEXT)
    nll, count = 0.0, 0
    for chunk in range(len(tokens) // n_ctx):
        window = list(tokens[chunk * n_ctx : (chunk + 1) * n_ctx])
        window[0] = model.tokenizer.bos_id
        with torch.no_grad():
            logits = reference(torch.tensor([window])).logits[0].double()
        logp = torch.log_softmax(logits, -1)
        for j in range(n_ctx // 2, n_ctx - 1):
            nll -= logp[j, window[j + 1]].item()
            count += 1
    return math.exp(nll / count)


@pytest.mark.parametrize("n_ctx", [16, 32])
def test_perplexity_matches_transformers(pair, n_ctx):
    model, reference = pair
    result = perplexity(model, TEXT, n_ctx=n_ctx)
    expected = reference_perplexity(model, reference, n_ctx)
    assert result.n_chunks == len(model.tokenize(TEXT)) // n_ctx
    assert result.tokens_scored == result.n_chunks * (n_ctx - 1 - n_ctx // 2)
    assert result.ppl == pytest.approx(expected, rel=1e-3)
    assert result.chunk_ppl[-1] == pytest.approx(result.ppl)
    assert 0 < result.ppl_error < result.ppl


def test_cli_prints_llama_cpp_style_estimate(pair, tmp_path):
    model, _ = pair
    text = tmp_path / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    result = CliRunner().invoke(main, ["perplexity", str(model.path), "-f", str(text), "-c", "32", "-q"])
    assert result.exit_code == 0, result.output
    assert re.search(r"^\[1\]\d+\.\d{4},\[2\]", result.stdout, re.M)
    match = re.search(r"Final estimate: PPL = (\d+\.\d{4}) \+/- \d+\.\d{5}", result.stdout)
    expected = perplexity(model, TEXT, n_ctx=32).ppl
    assert match and float(match.group(1)) == pytest.approx(expected, rel=1e-4)  # the CLI's KV cache is fp16


def test_too_short_text_and_bad_context_are_clean_errors(pair, tmp_path):
    model, _ = pair
    with pytest.raises(HalfbyteError, match="the text has 2 tokens: need at least 64"):
        perplexity(model, "short", n_ctx=64)
    with pytest.raises(HalfbyteError, match="larger than the model's context"):
        perplexity(model, TEXT, n_ctx=model.n_ctx + 1)
    text = tmp_path / "short.txt"
    text.write_text("short", encoding="utf-8")
    result = CliRunner().invoke(main, ["perplexity", str(model.path), "-f", str(text), "-c", "64", "-q"])
    assert result.exit_code == 1 and "need at least 64" in result.output and "Traceback" not in result.output


def test_log_softmax_is_stable_for_large_logits():
    from engine.perplexity import _log_softmax_at

    logits = np.array([[1000.0, 0.0, -1000.0]], np.float32)
    assert _log_softmax_at(logits, np.array([0]))[0] == pytest.approx(0.0)
