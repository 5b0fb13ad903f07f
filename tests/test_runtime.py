"""The runtime against transformers: logits of a prompt, token-by-token decoding with the KV
cache, and greedy continuations, for every architecture (F32 files)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from gguf import GGMLQuantizationType
from tiny_models import build_model, falcon_config, llama_config, load_reference, mpt_config, save_checkpoint

from converters.convert import convert
from engine.cli import main
from engine.errors import HalfbyteError
from engine.model import Model

CONFIGS = {
    "llama": (lambda: llama_config(), "llama"),
    "mpt": (lambda: mpt_config(attn_config={"alibi": True, "alibi_bias_max": 8, "clip_qkv": 0.5}), "mpt"),
    "falcon7b": (lambda: falcon_config(new_decoder=False), "falcon"),
    "falcon40b": (lambda: falcon_config(new_decoder=True), "falcon"),
}
PROMPT = "Once upon a time, in a land far away, there lived"


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    make_config, arch = CONFIGS[request.param]
    root = tmp_path_factory.mktemp(request.param)
    directory = save_checkpoint(build_model(make_config(), seed=3), root / "hf", arch)
    path = convert(str(directory), root / "m.gguf", GGMLQuantizationType.F32, progress=False)
    return Model.load(path, threads=2, kv_type="f32"), load_reference(directory)


def hf_logits(reference, ids):
    with torch.no_grad():
        return reference(torch.tensor([ids])).logits[0].numpy()


def test_prompt_logits_match_transformers(pair):
    model, reference = pair
    ids = model.tokenize(PROMPT)
    model.reset()
    ours = model.eval(ids)
    theirs = hf_logits(reference, ids)
    assert np.abs(ours - theirs).max() <= 1e-3 * np.abs(theirs).max()


def test_token_by_token_decoding_matches_transformers(pair):
    model, reference = pair
    ids = model.tokenize(PROMPT)
    model.reset()
    ours = np.concatenate([model.eval([t]) for t in ids])
    theirs = hf_logits(reference, ids)
    assert np.abs(ours - theirs).max() <= 1e-3 * np.abs(theirs).max()


def test_greedy_continuation_matches_transformers(pair):
    model, reference = pair
    ids = model.tokenize(PROMPT)
    model.generate(ids, max_tokens=32, temperature=0, repeat_penalty=1.0)
    ours = model.last_stats.tokens
    with torch.no_grad():
        out = reference.generate(torch.tensor([ids]), max_new_tokens=len(ours), do_sample=False,
                                 eos_token_id=None, pad_token_id=0)
    assert ours == out[0, len(ids):].tolist()


def test_seed_makes_sampling_reproducible(pair):
    model, _ = pair
    a = model.generate(PROMPT, max_tokens=12, temperature=1.0, seed=7)
    b = model.generate(PROMPT, max_tokens=12, temperature=1.0, seed=7)
    assert a == b


def test_bad_inputs_are_clean_errors(pair):
    model, _ = pair
    with pytest.raises(HalfbyteError, match="temperature"):
        model.generate(PROMPT, temperature=-1)
    with pytest.raises(HalfbyteError, match="top-p"):
        model.generate(PROMPT, top_p=1.5)
    with pytest.raises(HalfbyteError, match="context"):
        model.generate([1] * (model.n_ctx + 1))


def test_run_cli_streams_and_reports_speed(pair, tmp_path):
    model, _ = pair
    result = CliRunner().invoke(main, ["run", str(model.path), "-p", PROMPT, "-n", "8", "--temp", "0", "-t", "1"])
    assert result.exit_code == 0, result.output
    assert "tokens/s" in result.output


def test_run_cli_rejects_bad_sampling_values(pair):
    model, _ = pair
    result = CliRunner().invoke(main, ["run", str(model.path), "-p", "x", "--top-p", "0"])
    assert result.exit_code != 0 and "halfbyte: error: top-p" in result.output
