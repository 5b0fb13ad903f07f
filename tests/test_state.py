"""Model.save_state / load_state (engine/state.py), the prefix cache of generate / create_completion,
close() and the context manager."""

from __future__ import annotations

import numpy as np
import pytest

from converters.synthetic import LlamaShape, write_synthetic
from engine.errors import HalfbyteError
from engine.model import Model

SHAPE = LlamaShape(n_vocab=32000, n_embd=64, n_layer=2, n_head=2, n_head_kv=1, n_ctx=128, n_ff=128)
IDS = [1, 450, 4996, 17354, 1701, 29916, 432, 17204, 975, 278, 17366, 11203]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("state")
    return (write_synthetic(root / "a.gguf", SHAPE, "q8_0", seed=1),
            write_synthetic(root / "b.gguf", SHAPE, "q8_0", seed=2))


@pytest.mark.parametrize("kv_type", ["f16", "f32", "q8_0"])
def test_round_trip_continues_exactly(files, kv_type, tmp_path):
    path, _ = files
    first = Model.load(path, threads=1, kv_type=kv_type)
    first.eval(IDS)
    blob = first.save_state(tmp_path / "ctx.hbstate")
    assert (tmp_path / "ctx.hbstate").read_bytes() == blob
    expected = first.eval([29889])
    for source in (blob, tmp_path / "ctx.hbstate", str(tmp_path / "ctx.hbstate")):
        second = Model.load(path, threads=1, kv_type=kv_type)
        second.eval([5, 6, 7])  # whatever was there is replaced
        second.load_state(source)
        assert second.tokens == IDS and second.cache.n_past == len(IDS)
        np.testing.assert_array_equal(second.eval([29889]), expected)
    empty = Model.load(path, threads=1, kv_type=kv_type)
    empty.load_state(Model.load(path, threads=1, kv_type=kv_type).save_state())
    assert empty.tokens == [] and empty.cache.n_past == 0


def test_state_is_checked_against_the_model(files, tmp_path):
    path, other = files
    model = Model.load(path, threads=1)
    model.eval(IDS)
    blob = model.save_state()
    with pytest.raises(HalfbyteError, match=r"^state: saved from model a.gguf \(llama, \d+ bytes\), not from this "
                                            r"model b.gguf \(llama, \d+ bytes\)$"):
        Model.load(other, threads=1).load_state(blob)  # same shapes and size, other weights
    with pytest.raises(HalfbyteError, match="saved with context size 128, this model has 64"):
        Model.load(path, threads=1, n_ctx=64).load_state(blob)
    with pytest.raises(HalfbyteError, match="saved with KV cache key type f16, this model has f32"):
        Model.load(path, threads=1, kv_type="f32").load_state(blob)
    with pytest.raises(HalfbyteError, match="truncated or corrupt state"):
        model.load_state(blob[:-1])
    with pytest.raises(HalfbyteError, match="not a halfbyte state"):
        model.load_state(b"GGUF" + blob)
    with pytest.raises(HalfbyteError, match="state format version 99"):
        model.load_state(blob[:8] + (99).to_bytes(4, "little") + blob[12:])
    with pytest.raises(HalfbyteError, match="missing.hbstate: cannot read the state"):
        model.load_state(tmp_path / "missing.hbstate")
    with pytest.raises(HalfbyteError, match="state must be bytes or a path"):
        model.load_state(42)
    assert model.tokens == IDS  # a refused state leaves the context alone


def test_prefix_cache_after_load_state(files):
    path, _ = files
    model = Model.load(path, threads=1)
    model.eval(IDS)
    blob = model.save_state()
    fresh = Model.load(path, threads=1)
    fresh.load_state(blob)
    longer = IDS + [29889, 450, 3681]
    reused = fresh.create_completion(longer, max_tokens=4, temperature=0)
    assert fresh.last_stats.prompt_tokens == 3  # only what follows the restored context
    full = Model.load(path, threads=1).create_completion(longer, max_tokens=4, temperature=0)
    assert reused["choices"][0]["text"] == full["choices"][0]["text"]


def test_generate_reuses_the_shared_prefix(files):
    path, _ = files
    model = Model.load(path, threads=1)
    model.generate(IDS, max_tokens=2, temperature=0)
    assert model.last_stats.prompt_tokens == len(IDS)
    text = model.generate(IDS + [29889], max_tokens=8, temperature=0)
    assert model.last_stats.prompt_tokens == 1  # the rest of the prompt was already in the context
    assert text == Model.load(path, threads=1).generate(IDS + [29889], max_tokens=8, temperature=0)
    model.generate(IDS, max_tokens=2, temperature=0)  # a prefix of the context: its last token again
    assert model.last_stats.prompt_tokens == 1
    model.reset()
    model.generate(IDS, max_tokens=2, temperature=0)
    assert model.last_stats.prompt_tokens == len(IDS)


def test_close_and_context_manager(files):
    path, _ = files
    with Model.load(path, threads=1) as model:
        assert model.generate(IDS, max_tokens=2, temperature=0) is not None
    with pytest.raises(HalfbyteError, match="this model is closed"):
        model.eval(IDS)
    with pytest.raises(HalfbyteError, match="this model is closed"):
        model.generate(IDS, max_tokens=2)
    with pytest.raises(HalfbyteError, match="this model is closed"):
        model.save_state()
    model.close()  # twice is fine
