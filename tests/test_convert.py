"""`halfbyte convert`: tiny transformers checkpoints -> GGUF, checked tensor by tensor and key by key."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from gguf import GGMLQuantizationType, GGUFReader, LlamaFileType
from tiny_models import build_model, falcon_config, llama_config, mpt_config, save_checkpoint

from converters.convert import convert
from converters.falcon import regroup_qkv
from converters.llama import permute_for_rope
from engine import quants
from engine.cli import main
from engine.errors import HalfbyteError
from engine.gguf_file import GGUFFile

# Relative RMS error of dequantized weights that each type must stay under (random normal weights).
TYPE_TOLERANCE = {
    GGMLQuantizationType.F32: 0.0,
    GGMLQuantizationType.F16: 1e-3,
    GGMLQuantizationType.Q8_0: 0.01,
    GGMLQuantizationType.Q5_1: 0.05,
    GGMLQuantizationType.Q5_0: 0.05,
    GGMLQuantizationType.Q4_1: 0.1,
    GGMLQuantizationType.Q4_0: 0.12,
}
TYPE_FLAGS = {t: f"--{t.name.lower()}" for t in TYPE_TOLERANCE}

ARCH_CONFIGS = {
    "llama": lambda: llama_config(),
    "mpt": lambda: mpt_config(attn_config={"alibi": True, "alibi_bias_max": 8, "clip_qkv": 6.0}),
    "falcon7b": lambda: falcon_config(new_decoder=False),
    "falcon40b": lambda: falcon_config(new_decoder=True),
}


def arch_of(key: str) -> str:
    return "falcon" if key.startswith("falcon") else key


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """One safetensors checkpoint per architecture, plus a sharded .bin LLaMA and MPT."""
    root = tmp_path_factory.mktemp("ckpt")
    made = {}
    for key, make_config in ARCH_CONFIGS.items():
        model = build_model(make_config(), seed=1)
        made[key] = save_checkpoint(model, root / key, arch_of(key))
        if key in ("llama", "mpt"):
            made[f"{key}-bin"] = save_checkpoint(model, root / f"{key}-bin", arch_of(key), fmt="bin", shards=2)
        if key == "llama":
            made["llama-bf16"] = save_checkpoint(model, root / "llama-bf16", "llama", dtype=torch.bfloat16, shards=3)
    return made


def source_state(directory: Path) -> dict[str, np.ndarray]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def expected_tensors(key: str, directory: Path) -> dict[str, np.ndarray]:
    """What each GGUF tensor must hold, computed from the HF weights with the layout rules
    llama.cpp documents (Q/K row permutation; Falcon QKV regrouping)."""
    config = json.loads((directory / "config.json").read_text())
    state = source_state(directory)
    out: dict[str, np.ndarray] = {}
    if key == "llama":
        n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
        out["token_embd.weight"] = state["model.embed_tokens.weight"]
        out["output_norm.weight"] = state["model.norm.weight"]
        out["output.weight"] = state["lm_head.weight"]
        for i in range(config["num_hidden_layers"]):
            p = f"model.layers.{i}."
            out[f"blk.{i}.attn_q.weight"] = permute_for_rope(state[p + "self_attn.q_proj.weight"], n_head)
            out[f"blk.{i}.attn_k.weight"] = permute_for_rope(state[p + "self_attn.k_proj.weight"], n_kv)
            out[f"blk.{i}.attn_v.weight"] = state[p + "self_attn.v_proj.weight"]
            out[f"blk.{i}.attn_output.weight"] = state[p + "self_attn.o_proj.weight"]
            out[f"blk.{i}.ffn_gate.weight"] = state[p + "mlp.gate_proj.weight"]
            out[f"blk.{i}.ffn_up.weight"] = state[p + "mlp.up_proj.weight"]
            out[f"blk.{i}.ffn_down.weight"] = state[p + "mlp.down_proj.weight"]
            out[f"blk.{i}.attn_norm.weight"] = state[p + "input_layernorm.weight"]
            out[f"blk.{i}.ffn_norm.weight"] = state[p + "post_attention_layernorm.weight"]
    elif key == "mpt":
        out["token_embd.weight"] = state["transformer.wte.weight"]
        out["output_norm.weight"] = state["transformer.norm_f.weight"]
        for i in range(config["n_layers"]):
            p = f"transformer.blocks.{i}."
            out[f"blk.{i}.attn_qkv.weight"] = state[p + "attn.Wqkv.weight"]
            out[f"blk.{i}.attn_output.weight"] = state[p + "attn.out_proj.weight"]
            out[f"blk.{i}.ffn_up.weight"] = state[p + "ffn.up_proj.weight"]
            out[f"blk.{i}.ffn_down.weight"] = state[p + "ffn.down_proj.weight"]
            out[f"blk.{i}.attn_norm.weight"] = state[p + "norm_1.weight"]
            out[f"blk.{i}.ffn_norm.weight"] = state[p + "norm_2.weight"]
    else:
        n_head = config["num_attention_heads"]
        new = config["new_decoder_architecture"]
        n_kv = config["num_kv_heads"] if new else 1
        hd = config["hidden_size"] // n_head
        out["token_embd.weight"] = state["transformer.word_embeddings.weight"]
        out["output_norm.weight"] = state["transformer.ln_f.weight"]
        out["output_norm.bias"] = state["transformer.ln_f.bias"]
        for i in range(config["num_hidden_layers"]):
            p = f"transformer.h.{i}."
            qkv = state[p + "self_attention.query_key_value.weight"]
            out[f"blk.{i}.attn_qkv.weight"] = regroup_qkv(qkv, n_head, n_kv, hd)
            out[f"blk.{i}.attn_output.weight"] = state[p + "self_attention.dense.weight"]
            out[f"blk.{i}.ffn_up.weight"] = state[p + "mlp.dense_h_to_4h.weight"]
            out[f"blk.{i}.ffn_down.weight"] = state[p + "mlp.dense_4h_to_h.weight"]
            norms = [("ln_mlp", "attn_norm"), ("ln_attn", "attn_norm_2")] if new else [("input_layernorm", "attn_norm")]
            for hf, gg in norms:
                out[f"blk.{i}.{gg}.weight"] = state[p + hf + ".weight"]
                out[f"blk.{i}.{gg}.bias"] = state[p + hf + ".bias"]
    return out


def read_tensor(file: GGUFFile, name: str) -> np.ndarray:
    info = file.tensors[name]
    if info.ggml_type == GGMLQuantizationType.F32:
        return np.array(file.tensor_array(name))
    if info.ggml_type == GGMLQuantizationType.F16:
        return file.tensor_array(name).astype(np.float32)
    return quants.dequantize(file.tensor_bytes(name), info.ggml_type).reshape(info.shape)


def test_qkv_regroup_matches_the_falcon_attention_split():
    """Regrouped rows hold all q heads, then k heads, then v heads, in HF's head order."""
    n_head, n_kv, hd, n_in = 4, 2, 3, 5
    w = np.arange((n_head + 2 * n_kv) * hd * n_in, dtype=np.float32).reshape(-1, n_in)
    grouped = w.reshape(n_kv, n_head // n_kv + 2, hd, n_in)
    q, k, v = np.split(regroup_qkv(w, n_head, n_kv, hd), [n_head * hd, (n_head + n_kv) * hd])
    assert np.array_equal(q.reshape(n_kv, n_head // n_kv, hd, n_in), grouped[:, :-2])
    assert np.array_equal(k.reshape(n_kv, hd, n_in), grouped[:, -2])
    assert np.array_equal(v.reshape(n_kv, hd, n_in), grouped[:, -1])


@pytest.mark.parametrize("key", ["llama", "mpt", "falcon7b", "falcon40b", "llama-bin", "mpt-bin", "llama-bf16"])
def test_f32_conversion_is_exact(checkpoints, tmp_path, key):
    source = checkpoints[key]
    out = convert(str(source), tmp_path / "out.gguf", GGMLQuantizationType.F32, progress=False)
    expected = expected_tensors(key.split("-")[0], source)
    with GGUFFile(out) as file:
        assert set(file.tensors) == set(expected)
        for name, want in expected.items():
            got = read_tensor(file, name)
            assert got.shape == want.shape, name
            if key.endswith("bf16"):
                want = torch.from_numpy(want).bfloat16().float().numpy()
            np.testing.assert_array_equal(got, want, err_msg=name)
        assert file.metadata["general.file_type"] == LlamaFileType.ALL_F32


@pytest.mark.parametrize("ggml_type", list(TYPE_TOLERANCE), ids=lambda t: t.name)
@pytest.mark.parametrize("key", ["llama", "mpt", "falcon40b"])
def test_every_output_type_dequantizes_close_to_the_source(checkpoints, tmp_path, key, ggml_type):
    source = checkpoints[key]
    result = CliRunner().invoke(main, ["convert", str(source), TYPE_FLAGS[ggml_type], "-q", "-o",
                                       str(tmp_path / "m.gguf")])
    assert result.exit_code == 0, result.output
    expected = expected_tensors(key, source)
    with GGUFFile(tmp_path / "m.gguf") as file:
        assert file.metadata["general.file_type"] == {
            GGMLQuantizationType.F32: LlamaFileType.ALL_F32, GGMLQuantizationType.F16: LlamaFileType.MOSTLY_F16,
        }.get(ggml_type, getattr(LlamaFileType, f"MOSTLY_{ggml_type.name}", None))
        for name, want in expected.items():
            info = file.tensors[name]
            if want.ndim == 1:
                assert info.ggml_type == GGMLQuantizationType.F32, name
            else:
                assert info.ggml_type == ggml_type, name
                got = read_tensor(file, name)
                rel = np.sqrt(np.mean((got - want) ** 2)) / np.sqrt(np.mean(want**2))
                assert rel <= TYPE_TOLERANCE[ggml_type] + 1e-7, (name, rel)


def test_quantized_bytes_equal_the_gguf_reference_quantizer(checkpoints, tmp_path):
    out = convert(str(checkpoints["llama"]), tmp_path / "q.gguf", GGMLQuantizationType.Q4_0, progress=False)
    expected = expected_tensors("llama", checkpoints["llama"])
    import gguf.quants

    with GGUFFile(out) as file:
        for name in ("blk.0.attn_q.weight", "blk.1.ffn_down.weight", "token_embd.weight"):
            want = gguf.quants.quantize(expected[name].astype(np.float32), GGMLQuantizationType.Q4_0)
            np.testing.assert_array_equal(file.tensor_bytes(name), want)


def test_metadata_follows_the_config(checkpoints, tmp_path):
    cases = {
        "llama": {"llama.embedding_length": 64, "llama.block_count": 2, "llama.attention.head_count": 4,
                  "llama.attention.head_count_kv": 2, "llama.feed_forward_length": 128, "llama.context_length": 256,
                  "llama.rope.dimension_count": 16, "llama.vocab_size": 32000, "tokenizer.ggml.model": "llama",
                  "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
                  "tokenizer.ggml.add_bos_token": True},
        "mpt": {"mpt.embedding_length": 64, "mpt.block_count": 2, "mpt.attention.head_count": 4,
                "mpt.feed_forward_length": 256, "mpt.context_length": 256, "mpt.attention.max_alibi_bias": 8.0,
                "mpt.attention.clamp_kqv": 6.0, "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "mpt"},
        "falcon7b": {"falcon.embedding_length": 64, "falcon.attention.head_count": 4,
                     "falcon.attention.head_count_kv": 1, "falcon.feed_forward_length": 256,
                     "falcon.tensor_data_layout": "jploski", "tokenizer.ggml.pre": "falcon",
                     "tokenizer.ggml.bos_token_id": 11, "tokenizer.ggml.eos_token_id": 11},
        "falcon40b": {"falcon.attention.head_count_kv": 2, "general.architecture": "falcon"},
    }
    for key, want in cases.items():
        out = convert(str(checkpoints[key]), tmp_path / f"{key}.gguf", GGMLQuantizationType.Q8_0, progress=False)
        with GGUFFile(out) as file:
            for k, v in want.items():
                got = file.metadata[k]
                assert got == pytest.approx(v) if isinstance(v, float) else got == v, (key, k, got)
            assert file.metadata["general.quantization_version"] == 2
            assert len(file.metadata["tokenizer.ggml.tokens"]) == file.tensors["token_embd.weight"].shape[0]


def test_llama_rope_scaling_and_theta_are_written(tmp_path):
    config = llama_config(rope_theta=50000.0, rope_scaling={"type": "linear", "factor": 2.0})
    source = save_checkpoint(build_model(config), tmp_path / "scaled", "llama")
    out = convert(str(source), tmp_path / "s.gguf", GGMLQuantizationType.F16, progress=False)
    with GGUFFile(out) as file:
        assert file.metadata["llama.rope.freq_base"] == 50000.0
        assert file.metadata["llama.rope.scaling.type"] == "linear"
        assert file.metadata["llama.rope.scaling.factor"] == 2.0


def test_output_reads_back_through_the_gguf_package(checkpoints, tmp_path):
    out = convert(str(checkpoints["falcon7b"]), tmp_path / "f.gguf", GGMLQuantizationType.Q4_0, progress=False)
    reader = GGUFReader(out)
    ours = GGUFFile(out)
    assert {t.name for t in reader.tensors} == set(ours.tensors)
    for t in reader.tensors:
        np.testing.assert_array_equal(np.asarray(t.data).reshape(-1).view(np.uint8),
                                      np.asarray(ours.tensor_bytes(t.name)).reshape(-1).view(np.uint8))


def test_vocab_only(checkpoints, tmp_path):
    out = convert(str(checkpoints["mpt"]), tmp_path / "v.gguf", GGMLQuantizationType.Q4_0, vocab_only=True,
                  progress=False)
    with GGUFFile(out) as file:
        assert not file.tensors
        assert file.metadata["tokenizer.ggml.pre"] == "mpt"
        assert file.metadata["mpt.block_count"] == 2


def test_default_output_name(checkpoints, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["convert", str(checkpoints["llama"]), "--q8_0", "-q"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "llama-q8_0.gguf").is_file()


def test_info_on_a_converted_file(checkpoints, tmp_path):
    out = convert(str(checkpoints["falcon40b"]), tmp_path / "i.gguf", GGMLQuantizationType.Q4_0, progress=False)
    result = CliRunner().invoke(main, ["info", str(out)])
    assert result.exit_code == 0, result.output
    for text in ("architecture: falcon", "attention.head_count_kv", "model:      gpt2", "pre:        falcon",
                 "blk.1.attn_norm_2.weight", "MOSTLY_Q4_0", "bits per weight"):
        assert text in result.output


# -- bad input ------------------------------------------------------------------------------------


def run_cli(*args: str):
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def assert_clean_error(code: int, output: str, *needles: str) -> None:
    assert code != 0
    lines = [line for line in output.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("halfbyte: error: "), output
    assert "Traceback" not in output
    for needle in needles:
        assert needle in lines[-1], (needle, lines[-1])


def copy_checkpoint(source: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(source, target)
    return target


def test_missing_config(tmp_path):
    (tmp_path / "empty").mkdir()
    code, out = run_cli("convert", str(tmp_path / "empty"), "-o", str(tmp_path / "o.gguf"))
    assert_clean_error(code, out, "config.json", "missing")
    assert not (tmp_path / "o.gguf").exists()


def test_unsupported_architecture_lists_the_supported_ones(checkpoints, tmp_path):
    d = copy_checkpoint(checkpoints["llama"], tmp_path / "bert")
    config = json.loads((d / "config.json").read_text())
    config.update(architectures=["BertForMaskedLM"], model_type="bert")
    (d / "config.json").write_text(json.dumps(config))
    code, out = run_cli("convert", str(d), "-o", str(tmp_path / "o.gguf"))
    assert_clean_error(code, out, "BertForMaskedLM", "LlamaForCausalLM", "MptForCausalLM", "FalconForCausalLM")


def test_missing_shard(checkpoints, tmp_path):
    d = copy_checkpoint(checkpoints["llama-bin"], tmp_path / "shard")
    (d / "pytorch_model-00002-of-00002.bin").unlink()
    code, out = run_cli("convert", str(d), "-o", str(tmp_path / "o.gguf"))
    assert_clean_error(code, out, "pytorch_model-00002-of-00002.bin")
    assert not (tmp_path / "o.gguf").exists()


def test_shape_disagreeing_with_config(checkpoints, tmp_path):
    d = copy_checkpoint(checkpoints["llama"], tmp_path / "shape")
    config = json.loads((d / "config.json").read_text())
    config["intermediate_size"] = 96
    (d / "config.json").write_text(json.dumps(config))
    code, out = run_cli("convert", str(d), "-o", str(tmp_path / "o.gguf"))
    assert_clean_error(code, out, "model.safetensors", "mlp.", "shape")


def test_unknown_dtype(tmp_path):
    from safetensors.torch import save_file

    model = build_model(llama_config(num_hidden_layers=1))
    d = save_checkpoint(model, tmp_path / "i64", "llama")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state["model.layers.0.mlp.up_proj.weight"] = state["model.layers.0.mlp.up_proj.weight"].to(torch.int64)
    save_file(state, str(d / "model.safetensors"))
    code, out = run_cli("convert", str(d), "-o", str(tmp_path / "o.gguf"))
    assert_clean_error(code, out, "model.safetensors", "I64")


@pytest.mark.parametrize("key,missing", [("llama", "tokenizer.model"), ("falcon7b", "tokenizer.json")])
def test_missing_tokenizer(checkpoints, tmp_path, key, missing):
    d = copy_checkpoint(checkpoints[key], tmp_path / "tok")
    (d / missing).unlink()
    code, out = run_cli("convert", str(d), "-o", str(tmp_path / "o.gguf"))
    assert_clean_error(code, out, missing)


def test_interrupt_leaves_no_output(checkpoints, tmp_path, monkeypatch):
    import converters.convert as convert_module

    calls = {"n": 0}
    real = convert_module.quants.quantize

    def interrupting(data, qtype):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(data, qtype)

    monkeypatch.setattr(convert_module.quants, "quantize", interrupting)
    code, out = run_cli("convert", str(checkpoints["llama"]), "-o", str(tmp_path / "o.gguf"), "-q")
    assert code == 130 and "interrupted" in out and "Traceback" not in out
    assert os.listdir(tmp_path) == []


def test_no_space_left(checkpoints, tmp_path, monkeypatch):
    import errno

    import engine.gguf_file as gguf_file

    real_write = gguf_file.GGUFWriter.write_tensor

    def full_disk(self, name, data):
        if name.startswith("blk.1"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, name, data)

    monkeypatch.setattr(gguf_file.GGUFWriter, "write_tensor", full_disk)
    code, out = run_cli("convert", str(checkpoints["llama"]), "-o", str(tmp_path / "o.gguf"), "-q")
    assert_clean_error(code, out, "o.gguf", "no space left")
    assert os.listdir(tmp_path) == []


def test_existing_output_is_untouched_on_failure(checkpoints, tmp_path):
    d = copy_checkpoint(checkpoints["llama-bin"], tmp_path / "shard")
    (d / "pytorch_model-00001-of-00002.bin").write_bytes(b"garbage")
    target = tmp_path / "keep.gguf"
    target.write_bytes(b"precious")
    code, out = run_cli("convert", str(d), "-o", str(target))
    assert_clean_error(code, out)
    assert target.read_bytes() == b"precious"


def test_library_errors_are_halfbyte_errors(tmp_path):
    with pytest.raises(HalfbyteError, match="config.json"):
        convert(str(tmp_path), tmp_path / "x.gguf", GGMLQuantizationType.Q4_0, progress=False)


@pytest.mark.parametrize("key", list(ARCH_CONFIGS))
def test_tensor_names_agree_with_gguf_tensor_map(checkpoints, key):
    """Every checkpoint tensor goes where gguf-py's TensorNameMap (llama.cpp's converter) puts it."""
    from gguf import MODEL_ARCH_NAMES, TensorNameMap

    from converters.checkpoint import open_checkpoint
    from converters.convert import pick_architecture, read_config

    directory = checkpoints[key]
    config = read_config(directory)
    module = pick_architecture(config, directory / "config.json")
    with open_checkpoint(directory) as checkpoint:
        names = set(checkpoint.names())
    plan = module.plan(config, directory / "config.json", names)
    arch = next(a for a, name in MODEL_ARCH_NAMES.items() if name == plan.arch)
    name_map = TensorNameMap(arch, config.get("num_hidden_layers") or config.get("n_layers"))
    checked = 0
    for planned in plan.tensors:
        expected = name_map.get_name(planned.source, try_suffixes=(".weight", ".bias"))
        if expected is not None:
            assert planned.name == expected, planned.source
            checked += 1
    assert checked >= len(plan.tensors) - 1  # all but, at most, a tensor gguf-py does not list


# -- the audit's classes: aliasing, absurd sizes, config types, deep JSON, -o a directory -----------


def assert_one_line_error(code: int, output: str, *needles: str) -> None:
    assert code == 1, output
    lines = [line for line in output.splitlines() if line.strip() and not line.startswith("halfbyte: warning")]
    assert len(lines) == 1 and lines[0].startswith("halfbyte: error: "), output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    """A 1-layer LLaMA, sharded .bin with an index, so that every kind of input file exists."""
    model = build_model(llama_config(num_hidden_layers=1), seed=3)
    return save_checkpoint(model, tmp_path_factory.mktemp("tiny") / "llama", "llama", fmt="bin", shards=2)


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file() and not p.is_symlink()}


@pytest.mark.parametrize("target", ["config.json", "tokenizer.model", "tokenizer_config.json",
                                    "pytorch_model-00001-of-00002.bin", "pytorch_model.bin.index.json"])
@pytest.mark.parametrize("how", ["direct", "dotdot", "symlink", "hardlink", "symlinked dir"])
def test_output_that_is_an_input_is_refused(tiny_llama, tmp_path, target, how):
    """The output may not be any input file, by any path (audit: -o DIR/model.safetensors overwrote
    the checkpoint with rc 0)."""
    d = copy_checkpoint(tiny_llama, tmp_path / "ckpt")
    before = snapshot(d)
    if how == "direct":
        output = d / target
    elif how == "dotdot":
        output = d / ".." / d.name / target
    elif how == "symlink":
        output = tmp_path / "link.gguf"
        output.symlink_to(d / target)
    elif how == "hardlink":
        output = tmp_path / "hard.gguf"
        os.link(d / target, output)
    else:
        (tmp_path / "alias").symlink_to(d)
        output = tmp_path / "alias" / target
    for extra in ([], ["--vocab-only"]):
        code, out = run_cli("convert", str(d), "-o", str(output), "-q", *extra)
        assert_one_line_error(code, out, str(output), "refusing to overwrite the input file")
    assert snapshot(d) == before
    assert not [p for p in d.iterdir() if p.name.endswith(".partial")]


def test_output_beside_the_inputs_is_fine(tiny_llama, tmp_path):
    d = copy_checkpoint(tiny_llama, tmp_path / "ckpt")
    code, out = run_cli("convert", str(d), "-o", str(d / "model.gguf"), "-q", "--f16")
    assert code == 0, out
    code, out = run_cli("convert", str(d), "-o", str(d / "model.gguf"), "-q", "--f16")  # rewriting our output
    assert code == 0, out


def with_config(source: Path, target: Path, edit) -> Path:
    d = copy_checkpoint(source, target)
    config = json.loads((d / "config.json").read_text())
    edit(config)
    (d / "config.json").write_text(json.dumps(config))
    return d


@pytest.mark.parametrize("vocab_only", [False, True])
def test_absurd_layer_count_is_refused_before_planning(tiny_llama, tmp_path, vocab_only):
    """num_hidden_layers = 10**9 used to grow memory without bound (the plan loop)."""
    import time

    d = with_config(tiny_llama, tmp_path / "deep", lambda c: c.update(num_hidden_layers=10**9))
    start = time.monotonic()
    code, out = run_cli("convert", str(d), "-o", str(tmp_path / "o.gguf"), "-q",
                        *(["--vocab-only"] if vocab_only else []))
    assert time.monotonic() - start < 10
    assert_one_line_error(code, out, "config.json", "num_hidden_layers")
    if not vocab_only:  # within the absolute bound, the checkpoint's own layer count decides
        d = with_config(tiny_llama, tmp_path / "deeper", lambda c: c.update(num_hidden_layers=4000))
        code, out = run_cli("convert", str(d), "-o", str(tmp_path / "o.gguf"), "-q")
        assert_one_line_error(code, out, "config.json", "'num_hidden_layers' is 4000 but the checkpoint has 1 layers")
    assert not (tmp_path / "o.gguf").exists()


CONFIG_ERRORS = {
    "kv heads zero": ({"num_key_value_heads": 0}, "num_key_value_heads"),
    "kv heads string": ({"num_key_value_heads": "2"}, "num_key_value_heads"),
    "kv heads above heads": ({"num_key_value_heads": 8}, "num_key_value_heads"),
    "rope_theta string": ({"rope_theta": "abc"}, "rope_theta"),
    "rope_theta zero": ({"rope_theta": 0}, "rope_theta"),
    "rope_scaling list": ({"rope_scaling": [1, 2]}, "rope_scaling"),
    "rope_scaling factor string": ({"rope_scaling": {"type": "linear", "factor": "x"}}, "rope_scaling.factor"),
    "rope_scaling type number": ({"rope_scaling": {"type": 3, "factor": 2.0}}, "rope_scaling.type"),
    "context 2**40": ({"max_position_embeddings": 2**40}, "max_position_embeddings"),
    "context negative": ({"max_position_embeddings": -5}, "max_position_embeddings"),
    "architectures int": ({"architectures": 5}, "architectures"),
    "model_type list": ({"architectures": None, "model_type": ["llama"]}, "model_type"),
    "rms eps string": ({"rms_norm_eps": "1e-5"}, "rms_norm_eps"),
    "rms eps nan-like": ({"rms_norm_eps": 1e400}, "rms_norm_eps"),
    "hidden size bool": ({"hidden_size": True}, "hidden_size"),
    "hidden size float": ({"hidden_size": 64.5}, "hidden_size"),
    "vocab huge": ({"vocab_size": 2**40}, "vocab_size"),
    "head_dim list": ({"head_dim": [16]}, "head_dim"),
    "tie string": ({"tie_word_embeddings": "no"}, "tie_word_embeddings"),
    "bos id string": ({"bos_token_id": "1"}, "bos_token_id"),
    "eos id float": ({"eos_token_id": 2.5}, "eos_token_id"),
}


@pytest.mark.parametrize("case", list(CONFIG_ERRORS))
def test_config_values_of_wrong_type_or_range(tiny_llama, tmp_path, case):
    """One line naming config.json and the key, exit 1 (audit: ZeroDivisionError, struct.error, ...)."""
    changes, key = CONFIG_ERRORS[case]
    d = with_config(tiny_llama, tmp_path / "cfg", lambda c: c.update(changes))
    for extra in ([], ["--vocab-only"]):
        code, out = run_cli("convert", str(d), "-o", str(tmp_path / "o.gguf"), "-q", *extra)
        assert_one_line_error(code, out, str(d / "config.json"), key)
    assert os.listdir(tmp_path) == ["cfg"]


@pytest.mark.parametrize("key,arch,changes", [
    ("attn_config", "mpt", {"attn_config": [1]}),
    ("attn_config.kv_n_heads", "mpt", {"attn_config": {"alibi": True, "kv_n_heads": 0}}),
    ("attn_config.alibi_bias_max", "mpt", {"attn_config": {"alibi": True, "alibi_bias_max": "8"}}),
    ("attn_config.clip_qkv", "mpt", {"attn_config": {"alibi": True, "clip_qkv": -1}}),
    ("expansion_ratio", "mpt", {"expansion_ratio": "4"}),
    ("max_seq_len", "mpt", {"max_seq_len": 2**33}),
    ("multi_query", "falcon7b", {"multi_query": 1}),
    ("ffn_hidden_size", "falcon7b", {"ffn_hidden_size": 0}),
    ("num_kv_heads", "falcon40b", {"num_kv_heads": "2"}),
    ("new_decoder_architecture", "falcon40b", {"new_decoder_architecture": "yes"}),
])
def test_config_checks_for_every_architecture(checkpoints, tmp_path, key, arch, changes):
    d = with_config(checkpoints[arch], tmp_path / "cfg", lambda c: c.update(changes))
    code, out = run_cli("convert", str(d), "-o", str(tmp_path / "o.gguf"), "-q", "--vocab-only")
    assert_one_line_error(code, out, "config.json", key)


@pytest.mark.parametrize("file_name", ["config.json", "tokenizer_config.json", "pytorch_model.bin.index.json",
                                       "special_tokens_map.json", "added_tokens.json"])
def test_deeply_nested_json_files(tiny_llama, tmp_path, file_name):
    """JSON nested 100,000 deep used to raise RecursionError."""
    d = copy_checkpoint(tiny_llama, tmp_path / "deep")
    (d / file_name).write_text('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")
    code, out = run_cli("convert", str(d), "-o", str(tmp_path / "o.gguf"), "-q")
    assert_one_line_error(code, out, str(d / file_name), "nested too deeply")


@pytest.mark.parametrize("file_name,content,needle", [
    ("tokenizer_config.json", {"add_bos_token": "yes"}, "add_bos_token"),
    ("tokenizer_config.json", [1, 2], "expected a JSON object"),
    ("added_tokens.json", {"<pad>": "32000"}, "token id"),
    ("added_tokens.json", {"<pad>": 10**12}, "token id"),
])
def test_bad_tokenizer_side_files(tiny_llama, tmp_path, file_name, content, needle):
    d = copy_checkpoint(tiny_llama, tmp_path / "tok")
    (d / file_name).write_text(json.dumps(content))
    code, out = run_cli("convert", str(d), "-o", str(tmp_path / "o.gguf"), "-q", "--vocab-only")
    assert_one_line_error(code, out, str(d / file_name), needle)


def test_bpe_token_ids_are_bounded(checkpoints, tmp_path):
    """A tokenizer.json id of 10**9 would make the vocabulary loop run 10**9 times."""
    d = copy_checkpoint(checkpoints["mpt"], tmp_path / "bpe")
    data = json.loads((d / "tokenizer.json").read_text())
    data["model"]["vocab"]["hello-there"] = 10**9
    (d / "tokenizer.json").write_text(json.dumps(data))
    code, out = run_cli("convert", str(d), "-o", str(tmp_path / "o.gguf"), "-q", "--vocab-only")
    assert_one_line_error(code, out, str(d / "tokenizer.json"), "token id")


def test_special_id_outside_the_vocabulary_is_a_warning_naming_the_file(tiny_llama, tmp_path):
    d = with_config(tiny_llama, tmp_path / "ids", lambda c: c.update(bos_token_id=40000))
    code, out = run_cli("convert", str(d), "-o", str(tmp_path / "o.gguf"), "-q", "--vocab-only")
    assert code == 0, out
    assert f"halfbyte: warning: {d / 'config.json'}: bos token id 40000 is outside the vocabulary" in out


@pytest.mark.parametrize("kind", ["existing dir", "missing parent"])
def test_output_directory_is_our_one_line_error(tiny_llama, tmp_path, kind):
    """-o DIR used to print click's usage text with exit 2."""
    output = tmp_path if kind == "existing dir" else tmp_path / "nope" / "o.gguf"
    code, out = run_cli("convert", str(tiny_llama), "-o", str(output), "-q")
    assert_one_line_error(code, out, "directory")
    assert "Usage" not in out


def test_lone_surrogate_token_names_the_tokenizer_file(checkpoints, tmp_path):
    d = copy_checkpoint(checkpoints["mpt"], tmp_path / "bpe")
    text = (d / "tokenizer.json").read_text()
    (d / "tokenizer.json").write_text(text.replace('"model": {', '"model": {"_": 0, ', 1)
                                      .replace('"vocab": {', '"vocab": {"\\ud800": 5, ', 1))
    code, out = run_cli("convert", str(d), "-o", str(tmp_path / "o.gguf"), "-q", "--vocab-only")
    assert_one_line_error(code, out, str(d / "tokenizer.json"), "lone surrogate")
