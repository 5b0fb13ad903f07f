"""Llama 3 / 3.1 / 3.2 from a Hugging Face checkpoint: the byte-level BPE tokenizer (pre-tokenizer
named from tokenizer.json, BOS from the post-processor, control tokens, eot/eom, chat template),
Llama 3.1's RoPE scaling (``rope_freqs.weight``) checked against transformers past position 1000,
and tied embeddings (3.2). Tiny random checkpoints with the real Llama 3 vocabulary
(../shared/fixtures/tokenizers/llama3), made with transformers at test time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, TokenType
from test_runtime import PROMPT, QUANT_BOUNDS, hf_logits, round_trip_reference
from tiny_models import FIXTURES, build_model, llama_config, load_reference, save_checkpoint

from converters.convert import convert
from converters.llama import llama3_rope_factors
from engine.errors import HalfbyteError
from engine.gguf_file import GGUFFile
from engine.model import Model

LLAMA3 = FIXTURES / "tokenizers" / "llama3"
ROPE_LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 256}
# What Meta's tokenizer.json has (the fixture's copy lacks it): BOS prepended by the post-processor.
LLAMA3_POST_PROCESSOR = {
    "type": "Sequence",
    "processors": [
        {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        {"type": "TemplateProcessing",
         "single": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
                    {"Sequence": {"id": "A", "type_id": 0}}],
         "pair": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                  {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
         "special_tokens": {"<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [128000],
                                                  "tokens": ["<|begin_of_text|>"]}}},
    ],
}


def llama3_config(**overrides):
    settings = dict(vocab_size=128256, max_position_embeddings=2048, rope_theta=500000.0,
                    rope_scaling=dict(ROPE_LLAMA3), bos_token_id=128000, eos_token_id=128001)
    settings.update(overrides)
    return llama_config(**settings)


def write_llama3_tokenizer(directory, post_processor=True, tokenizer_config=None):
    """Replace the SentencePiece files save_checkpoint wrote with Llama 3's tokenizer files."""
    for name in ("tokenizer.model", "tokenizer_config.json"):
        (directory / name).unlink(missing_ok=True)
    data = json.loads((LLAMA3 / "tokenizer.json").read_text())
    if post_processor:
        data["post_processor"] = LLAMA3_POST_PROCESSOR
    for token in data["added_tokens"]:  # Llama 3.1 named one of 3.0's reserved tokens
        if token["id"] == 128008:
            token["content"] = "<|eom_id|>"
    (directory / "tokenizer.json").write_text(json.dumps(data))
    if tokenizer_config is None:
        tokenizer_config = json.loads((LLAMA3 / "tokenizer_config.json").read_text())
        tokenizer_config["added_tokens_decoder"]["128008"]["content"] = "<|eom_id|>"
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    # Llama 3.1 Instruct's generation_config: <|end_of_text|>, <|eom_id|>, <|eot_id|> end a generation.
    (directory / "generation_config.json").write_text(json.dumps({"bos_token_id": 128000,
                                                                  "eos_token_id": [128001, 128008, 128009]}))
    return directory


def llama3_checkpoint(root, config=None, seed=5):
    directory = save_checkpoint(build_model(config or llama3_config(), seed=seed), root / "hf", "llama")
    return write_llama3_tokenizer(directory)


@pytest.fixture(scope="module")
def llama31(tmp_path_factory):
    """Llama 3.1-style: llama3 RoPE scaling, untied head, context 2048."""
    root = tmp_path_factory.mktemp("llama31")
    directory = llama3_checkpoint(root)
    path = convert(str(directory), root / "m.gguf", GGMLQuantizationType.F32, progress=False)
    return directory, Model.load(path, threads=2, kv_type="f32"), load_reference(directory)


def test_llama3_tokenizer_metadata(llama31):
    directory, model, _ = llama31
    md = model.file.metadata
    assert md["tokenizer.ggml.model"] == "gpt2" and md["tokenizer.ggml.pre"] == "llama-bpe"
    assert md["tokenizer.ggml.add_bos_token"] is True
    assert md["tokenizer.ggml.bos_token_id"] == 128000 and md["tokenizer.ggml.eos_token_id"] == 128001
    assert md["tokenizer.ggml.eot_token_id"] == 128009 and md["tokenizer.ggml.eom_token_id"] == 128008
    template = json.loads((LLAMA3 / "tokenizer_config.json").read_text())["chat_template"]
    assert md["tokenizer.chat_template"] == template
    tokens, types = md["tokenizer.ggml.tokens"], md["tokenizer.ggml.token_type"]
    assert len(tokens) == 128256
    for text in ("<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|reserved_special_token_5|>"):
        assert types[tokens.index(text)] == TokenType.CONTROL
    assert types[tokens.index("Hello")] == TokenType.NORMAL


def test_llama3_tokenization_matches_tokenizers(llama31):
    from tokenizers import Tokenizer

    directory, model, _ = llama31
    reference = Tokenizer.from_file(str(directory / "tokenizer.json"))
    for text in (PROMPT, "  Hello,\n\nworld! 1234567 ümlaut 你好 <|eot_id|>"):
        assert model.tokenize(text, special=True) == reference.encode(text).ids
    assert model.tokenize(PROMPT)[0] == 128000


def test_llama3_rope_factors_match_transformers():
    """rope_freqs.weight divides theta^(-2i/d): the quotient is transformers' llama3 inv_freq."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for head_dim, theta, params in [(16, 500000.0, ROPE_LLAMA3),
                                    (128, 500000.0, {**ROPE_LLAMA3, "original_max_position_embeddings": 8192}),
                                    (64, 10000.0, {**ROPE_LLAMA3, "factor": 32.0, "high_freq_factor": 2.0})]:
        config = llama3_config(hidden_size=head_dim * 4, rope_theta=theta, rope_scaling=dict(params))
        inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
        ours = llama3_rope_factors(head_dim, theta, params["factor"], params["low_freq_factor"],
                                   params["high_freq_factor"], params["original_max_position_embeddings"])
        plain = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
        np.testing.assert_allclose(plain / ours, inv_freq.numpy(), rtol=2e-6)
        assert {1.0, params["factor"]} <= set(ours.tolist())  # both ends present: the cases all run


def test_llama3_rope_freqs_tensor_written(llama31):
    _, model, _ = llama31
    info = model.file.tensors["rope_freqs.weight"]
    assert info.shape == (8,) and info.ggml_type == GGMLQuantizationType.F32
    assert "llama.rope.scaling.type" not in model.file.metadata  # as llama.cpp: the tensor says it all


def test_llama3_long_prompt_matches_transformers(llama31):
    """A 1100-token prompt (past original_max_position_embeddings, where the scaling matters),
    then the last tokens one at a time."""
    _, model, reference = llama31
    rng = np.random.default_rng(0)
    ids = [128000, *rng.integers(0, 128000, 1099).tolist()]
    theirs = hf_logits(reference, ids)
    scale = np.abs(theirs).max()
    model.reset()
    ours = model.eval(ids[:-4])
    assert np.abs(ours[-1] - theirs[-5]).max() <= 1e-3 * scale
    for i in range(len(ids) - 4, len(ids)):
        row = model.eval([ids[i]])[-1]
        assert np.abs(row - theirs[i]).max() <= 1e-3 * scale


def test_llama3_prompt_and_greedy_match_transformers(llama31):
    _, model, reference = llama31
    ids = model.tokenize(PROMPT)
    model.reset()
    theirs = hf_logits(reference, ids)
    assert np.abs(model.eval(ids) - theirs).max() <= 1e-3 * np.abs(theirs).max()
    model.reset()
    token_by_token = np.concatenate([model.eval([t]) for t in ids])
    assert np.abs(token_by_token - theirs).max() <= 1e-3 * np.abs(theirs).max()
    model.generate(ids, max_tokens=32, temperature=0, repeat_penalty=1.0)
    with torch.no_grad():
        out = reference.generate(torch.tensor([ids]), max_new_tokens=len(model.last_stats.tokens), do_sample=False,
                                 eos_token_id=None, pad_token_id=0)
    assert model.last_stats.tokens == out[0, len(ids):].tolist()


def test_llama32_tied_embeddings_q8_0(tmp_path):
    """Llama 3.2 1B/3B: tied embeddings (no output.weight); Q8_0 within the LLaMA bound."""
    qtype = GGMLQuantizationType.Q8_0
    directory = llama3_checkpoint(tmp_path, llama3_config(tie_word_embeddings=True), seed=6)
    path = convert(str(directory), tmp_path / "m.gguf", qtype, progress=False)
    assert "output.weight" not in GGUFFile(path).tensors
    model = Model.load(path, threads=2)
    reference = round_trip_reference(directory, qtype)
    ids = model.tokenize(PROMPT)
    theirs = hf_logits(reference, ids)
    error = np.abs(model.eval(ids) - theirs).max() / np.abs(theirs).max()
    assert error <= QUANT_BOUNDS[qtype], error


def test_chat_template_list_and_add_bos_from_tokenizer_config(tmp_path):
    """A list of named templates: ``default`` -> tokenizer.chat_template, the others ->
    tokenizer.chat_template.NAME (and their names in tokenizer.chat_templates); tokenizer_config's
    add_bos_token wins; without either, a ByteLevel-only post-processor adds no BOS (llama.cpp)."""
    directory = save_checkpoint(build_model(llama3_config(num_hidden_layers=1), seed=1), tmp_path / "hf", "llama")
    templates = [{"name": "default", "template": "{{ messages }}"}, {"name": "tool_use", "template": "{{ tools }}"}]
    write_llama3_tokenizer(directory, tokenizer_config={"chat_template": templates, "add_bos_token": False,
                                                        "bos_token": "<|begin_of_text|>",
                                                        "eos_token": "<|eot_id|>"})
    md = GGUFFile(convert(str(directory), tmp_path / "a.gguf", GGMLQuantizationType.F32, vocab_only=True,
                          progress=False)).metadata
    assert md["tokenizer.chat_template"] == "{{ messages }}"
    assert md["tokenizer.chat_template.tool_use"] == "{{ tools }}"
    assert list(md["tokenizer.chat_templates"]) == ["tool_use"]
    assert md["tokenizer.ggml.add_bos_token"] is False
    assert md["tokenizer.ggml.eos_token_id"] == 128009 and md["tokenizer.ggml.eot_token_id"] != 128009
    write_llama3_tokenizer(directory, post_processor=False, tokenizer_config={})
    md = GGUFFile(convert(str(directory), tmp_path / "b.gguf", GGMLQuantizationType.F32, vocab_only=True,
                          progress=False)).metadata
    assert md["tokenizer.ggml.add_bos_token"] is False and "tokenizer.chat_template" not in md


def test_unknown_pre_tokenizer_is_an_error_naming_tokenizer_json(tmp_path):
    directory = save_checkpoint(build_model(llama3_config(num_hidden_layers=1), seed=1), tmp_path / "hf", "llama")
    write_llama3_tokenizer(directory)
    data = json.loads((directory / "tokenizer.json").read_text())
    data["pre_tokenizer"] = {"type": "Whitespace"}
    (directory / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(HalfbyteError, match=r"tokenizer\.json: unknown pre-tokenizer"):
        convert(str(directory), tmp_path / "m.gguf", GGMLQuantizationType.F32, vocab_only=True, progress=False)


@pytest.mark.skipif(not os.environ.get("HALFBYTE_LLAMA_CPP"),
                    reason="set HALFBYTE_LLAMA_CPP to a llama.cpp checkout to run")
def test_llama_cpp_converter_llama31_file_runs(tmp_path):
    """llama.cpp's convert_hf_to_gguf.py writes the same rope_freqs.weight; its file runs here
    (measured 1.1e-6 of the logits' scale over 1100 tokens, tied embeddings)."""
    directory = llama3_checkpoint(tmp_path, llama3_config(tie_word_embeddings=True))
    out = tmp_path / "llama.cpp.gguf"
    script = Path(os.environ["HALFBYTE_LLAMA_CPP"]) / "convert_hf_to_gguf.py"
    subprocess.run([sys.executable, str(script), str(directory), "--outtype", "f32", "--outfile", str(out)],
                   check=True, capture_output=True)
    model = Model.load(out, threads=2, kv_type="f32")
    assert "rope_freqs.weight" in model.file.tensors
    ids = [128000, *np.random.default_rng(0).integers(0, 128000, 1099).tolist()]
    theirs = hf_logits(load_reference(directory), ids)
    assert np.abs(model.eval(ids) - theirs).max() <= 1e-4 * np.abs(theirs).max()


def test_chat_with_a_converted_llama3_chat_model(llama31, monkeypatch):
    """`halfbyte chat` holds a multi-turn conversation with a checkpoint converted here: the file's own
    Llama-3 template (copied from tokenizer_config.json) renders each turn, equal to transformers'
    apply_chat_template, and the second turn continues the first one's context."""
    from click.testing import CliRunner
    from transformers import PreTrainedTokenizerFast

    import engine.chat_cli as chat_cli
    from engine.cli import main

    directory, model, _ = llama31
    loaded = []
    original = chat_cli.load_model
    monkeypatch.setattr(chat_cli, "load_model", lambda *a, **k: loaded.append(original(*a, **k)) or loaded[-1])
    turns = ["Hello there", "And again"]
    result = CliRunner().invoke(main, ["chat", str(model.path), "-n", "4", "--temp", "0", "--system", "Be brief."],
                                input="".join(t + "\n" for t in turns))
    assert result.exit_code == 0, result.output
    assert "chat template" in result.stderr and "chatml (fallback" not in result.stderr
    chat = loaded[0]
    answers = result.stdout.splitlines()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": turns[0]},
                {"role": "assistant", "content": answers[0] if answers else ""}, {"role": "user", "content": turns[1]}]
    reference = PreTrainedTokenizerFast(tokenizer_file=str(directory / "tokenizer.json"),
                                        **{k: v for k, v in json.loads((directory / "tokenizer_config.json")
                                                                       .read_text()).items()
                                           if k in ("chat_template", "bos_token", "eos_token")})
    rendered = chat.apply_chat_template(messages, add_generation_prompt=True)
    assert rendered == reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # the context holds the whole conversation: both user turns, in the template's framing
    context = chat.detokenize(chat.tokens, special=True)
    assert context.count("<|start_header_id|>user<|end_header_id|>") == 2 and turns[1] in context
