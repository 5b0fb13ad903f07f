"""Embeddings (engine/embeddings.py): pooled final hidden states of a tiny random LLaMA converted to F32
against transformers' ``output_hidden_states=True`` (the last entry is after the final norm), the
``halfbyte embed`` command, and ``/v1/embeddings`` through the ``openai`` client."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from gguf import GGMLQuantizationType
from tiny_models import build_model, llama_config, load_reference, save_checkpoint

from converters.convert import convert
from engine.cli import main
from engine.embeddings import hidden_states
from engine.errors import HalfbyteError
from engine.model import Model

TEXTS = ["Once upon a time, in a land far away", "The quick brown fox", "Hello"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed")
    directory = save_checkpoint(build_model(llama_config(), seed=7), root / "hf", "llama")
    path = convert(str(directory), root / "m.gguf", GGMLQuantizationType.F32, progress=False)
    return path, Model.load(path, threads=2, kv_type="f32"), load_reference(directory)


def reference_hidden(reference, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        out = reference(torch.tensor([ids]), output_hidden_states=True)
    return out.hidden_states[-1][0].double().numpy()  # LlamaModel: after the final RMSNorm


def close(ours, theirs, rel=1e-3) -> bool:
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    return float(np.abs(ours - theirs).max()) <= rel * float(np.abs(theirs).max())


@pytest.mark.parametrize("pooling", ["mean", "cls", "last"])
def test_pooled_hidden_states_match_transformers(pair, pooling):
    _, model, reference = pair
    ours = model.embed(TEXTS, pooling=pooling, normalize=False)
    for text, vector in zip(TEXTS, ours):
        hidden = reference_hidden(reference, model.tokenize(text))
        expected = {"mean": hidden.mean(axis=0), "cls": hidden[0], "last": hidden[-1]}[pooling]
        assert len(vector) == 64 and close(vector, expected)
    normalized = model.embed(TEXTS, pooling=pooling)
    for raw, unit in zip(ours, normalized):
        assert abs(np.linalg.norm(unit) - 1) < 1e-9 and np.allclose(unit, np.asarray(raw) / np.linalg.norm(raw))


def test_every_row_and_the_logits(pair):
    """The hidden states are exactly what the output projection reads: all rows match transformers,
    and times output.weight they are the model's own logits."""
    from engine.batch import Batch
    from engine.kernels.attention import KVCache

    _, model, reference = pair
    ids = model.tokenize(TEXTS[0])
    p = model.arch.params
    hidden = hidden_states(model.arch, Batch.single(ids, 0, KVCache(p.n_layer, len(ids), p.n_head_kv, p.head_dim,
                                                                    np.float32)))
    assert close(hidden, reference_hidden(reference, ids))
    model.reset()
    logits = model.eval(ids)
    assert close(hidden @ model.arch.output.dequantize().T, logits, 1e-5)


def test_batching_and_the_context_are_independent(pair):
    _, model, _ = pair
    model.reset()
    model.eval(model.tokenize("a context that must survive"))
    before = list(model.tokens)
    together = model.embed(TEXTS)
    alone = [model.embed(text)[0] for text in TEXTS]
    assert np.allclose(together, alone, atol=1e-6)
    assert model.tokens == before and model.cache.n_past == len(before)
    ids = model.tokenize(TEXTS[1])
    assert model.embed([ids]) == model.embed(ids) == [alone[1]]  # token ids are accepted too


def test_create_embedding_and_errors(pair):
    _, model, _ = pair
    result = model.create_embedding(TEXTS[:2])
    assert result["object"] == "list" and result["model"] == "m.gguf"
    assert [d["index"] for d in result["data"]] == [0, 1] and result["data"][0]["object"] == "embedding"
    n = sum(len(model.tokenize(t)) for t in TEXTS[:2])
    assert result["usage"] == {"prompt_tokens": n, "total_tokens": n}
    with pytest.raises(HalfbyteError, match="pooling must be one of mean, cls, last"):
        model.embed("x", pooling="max")
    with pytest.raises(HalfbyteError, match="does not fit in the context of 256 tokens"):
        model.embed("word " * 300)
    assert len(model.embed("word " * 300, truncate=True)) == 1
    with pytest.raises(HalfbyteError, match="input must be"):
        model.embed([])


def test_hidden_only_is_used_when_the_architecture_has_it():
    class Arch:
        def forward(self, batch, all_logits=False, hidden_only=False):
            return ("hidden", all_logits, hidden_only)

    assert hidden_states(Arch(), None) == ("hidden", True, True)


def test_embed_command(pair, tmp_path):  # the command uses an F16 KV cache: 1e-3
    path, model, _ = pair
    result = CliRunner().invoke(main, ["embed", str(path), *TEXTS[:2], "--pooling", "last", "-t", "1"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and close(json.loads(lines[1]), model.embed(TEXTS[1], pooling="last")[0], 1e-3)
    (tmp_path / "texts.txt").write_text(f"{TEXTS[0]}\n\n{TEXTS[2]}\n")
    result = CliRunner().invoke(main, ["embed", str(path), "-f", str(tmp_path / "texts.txt"), "--no-normalize"])
    assert result.exit_code == 0, result.output
    vectors = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(vectors) == 2 and close(vectors[1], model.embed(TEXTS[2], normalize=False)[0], 1e-3)
    result = CliRunner().invoke(main, ["embed", str(path)])
    assert result.exit_code == 1 and "halfbyte: error: give some TEXT to embed" in result.stderr


def test_server_embeddings(pair):
    pytest.importorskip("openai")
    from test_server import RunningServer

    _, model, _ = pair
    server = RunningServer(model, n_slots=2)
    try:
        client = server.client()
        reply = client.embeddings.create(model="tiny", input=TEXTS)  # the client asks for base64
        assert [d.index for d in reply.data] == [0, 1, 2] and reply.model == "tiny"
        expected = model.embed(TEXTS)
        for item, vector in zip(reply.data, expected):
            assert np.allclose(item.embedding, vector, atol=1e-6)
        floats = client.embeddings.create(model="tiny", input="Hello", encoding_format="float")
        assert np.allclose(floats.data[0].embedding, expected[2], atol=1e-6)
        assert floats.usage.prompt_tokens == len(model.tokenize("Hello"))
        import openai

        with pytest.raises(openai.BadRequestError, match="pooling must be one of"):
            client.embeddings.create(model="tiny", input="x", extra_body={"pooling": "max"})
    finally:
        server.close()
