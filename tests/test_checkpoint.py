"""converters.checkpoint: safetensors and PyTorch .bin checkpoints read lazily, checked against torch.

Checkpoints are written at test time with torch.save, safetensors and transformers (fixed seeds);
values must come back bit-exact as float32. Malicious pickles must be refused without running.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from converters import checkpoint as checkpoint_module
from converters.checkpoint import TensorMeta, open_checkpoint, pick_weight_layout
from engine.errors import HalfbyteError

DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def make_state(dtype: torch.dtype, seed: int = 0) -> OrderedDict[str, torch.Tensor]:
    """A small state dict with the shapes a model has, plus the edge cases: a scalar and an empty tensor."""
    generator = torch.Generator().manual_seed(seed)
    shapes = {
        "model.embed_tokens.weight": (32, 16),
        "model.layers.0.self_attn.q_proj.weight": (16, 16),
        "model.layers.0.mlp.up_proj.weight": (24, 16),
        "model.layers.0.input_layernorm.weight": (16,),
        "model.layers.1.conv.weight": (3, 5, 2),
        "model.scale": (),
        "model.empty": (0, 4),
        "lm_head.weight": (32, 16),
    }
    return OrderedDict((name, torch.randn(shape, generator=generator).to(dtype)) for name, shape in shapes.items())


def as_float32(tensor: torch.Tensor) -> np.ndarray:
    return tensor.float().numpy()


def assert_matches(checkpoint, state: dict[str, torch.Tensor], dtype_name: str) -> None:
    assert sorted(checkpoint.names()) == sorted(state)
    for name, tensor in state.items():
        meta = checkpoint.info(name)
        assert meta == TensorMeta(name, dtype_name, tuple(tensor.shape), meta.file)
        loaded = checkpoint.load(name)
        assert loaded.dtype == np.float32 and loaded.shape == tuple(tensor.shape)
        assert loaded.flags.c_contiguous and loaded.flags.writeable
        np.testing.assert_array_equal(loaded, as_float32(tensor), strict=True)


def save_sharded(state: dict[str, torch.Tensor], directory: Path, fmt: str, shards: int, index: bool = True) -> None:
    """Shards named and indexed the way transformers names them (model-00001-of-00002.safetensors,
    pytorch_model-00001-of-00002.bin + *.index.json)."""
    directory.mkdir(parents=True, exist_ok=True)
    stem, suffix = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")
    names = list(state)
    weight_map = {}
    for number in range(shards):
        file_name = f"{stem}-{number + 1:05d}-of-{shards:05d}.{suffix}"
        part = {name: state[name] for name in names[number::shards]}
        if fmt == "safetensors":
            save_file(part, str(directory / file_name), metadata={"format": "pt"})
        else:
            torch.save(part, directory / file_name)
        weight_map.update(dict.fromkeys(part, file_name))
    if index:
        total = sum(t.numel() * t.element_size() for t in state.values())
        (directory / f"{stem}.{suffix}.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def write_torch_zip(path: Path, data_pkl: bytes, storages: dict[str, bytes] | None = None,
                    byteorder: bytes = b"little", compression: int = zipfile.ZIP_STORED) -> Path:
    """A zip laid out like torch.save's, with any pickle and storages we like."""
    with zipfile.ZipFile(path, "w", compression) as archive:
        archive.writestr("archive/data.pkl", data_pkl)
        archive.writestr("archive/byteorder", byteorder)
        for key, data in (storages or {}).items():
            archive.writestr(f"archive/data/{key}", data)
        archive.writestr("archive/version", b"3\n")
    return path


def rezip(source: Path, target: Path, transform=lambda name, data: data, compression: int = zipfile.ZIP_STORED) -> Path:
    """Copy a torch.save zip member by member, optionally changing members or compressing them."""
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(target, "w", compression) as copy:
        for member in original.infolist():
            data = transform(member.filename, original.read(member))
            if data is not None:
                copy.writestr(member.filename, data)
    return target


def error_of(call, *args) -> str:
    with pytest.raises(HalfbyteError) as excinfo:
        call(*args)
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


def assert_file_error(message: str, path: Path, *needles: str) -> None:
    assert message.startswith(f"{path}: "), message
    for needle in needles:
        assert needle in message, (needle, message)


# --------------------------------------------------------------------------------------------
# Values, names, shapes, dtypes against torch


@pytest.mark.parametrize("dtype_name", DTYPES)
def test_safetensors_single(tmp_path, dtype_name):
    state = make_state(DTYPES[dtype_name])
    save_file(state, str(tmp_path / "model.safetensors"))
    with open_checkpoint(tmp_path) as checkpoint:
        assert_matches(checkpoint, state, dtype_name)
        assert {checkpoint.info(n).file for n in state} == {tmp_path / "model.safetensors"}


@pytest.mark.parametrize("dtype_name", DTYPES)
def test_safetensors_sharded_with_index(tmp_path, dtype_name):
    state = make_state(DTYPES[dtype_name], seed=1)
    save_sharded(state, tmp_path, "safetensors", shards=3)
    with open_checkpoint(tmp_path) as checkpoint:
        assert_matches(checkpoint, state, dtype_name)
        assert checkpoint.info("model.embed_tokens.weight").file == tmp_path / "model-00001-of-00003.safetensors"
        assert checkpoint.info("model.layers.0.self_attn.q_proj.weight").file.name == "model-00002-of-00003.safetensors"


def test_safetensors_shards_without_index_are_a_union(tmp_path):
    state = make_state(torch.float32, seed=2)
    save_sharded(state, tmp_path, "safetensors", shards=2, index=False)
    with open_checkpoint(tmp_path) as checkpoint:
        assert_matches(checkpoint, state, "F32")


@pytest.mark.parametrize("dtype_name", DTYPES)
def test_bin_single(tmp_path, dtype_name):
    state = make_state(DTYPES[dtype_name], seed=3)
    torch.save(state, tmp_path / "pytorch_model.bin")
    with open_checkpoint(tmp_path) as checkpoint:
        assert_matches(checkpoint, state, dtype_name)
        assert checkpoint.names() == list(state)  # file order


@pytest.mark.parametrize("dtype_name", DTYPES)
def test_bin_sharded_with_index(tmp_path, dtype_name):
    state = make_state(DTYPES[dtype_name], seed=4)
    save_sharded(state, tmp_path, "bin", shards=2)
    with open_checkpoint(tmp_path) as checkpoint:
        assert_matches(checkpoint, state, dtype_name)
        assert checkpoint.info("lm_head.weight").file == tmp_path / "pytorch_model-00002-of-00002.bin"


def test_bin_shards_without_index_are_a_union(tmp_path):
    state = make_state(torch.float16, seed=5)
    save_sharded(state, tmp_path, "bin", shards=3, index=False)
    (tmp_path / "training_args.bin").write_bytes(b"not weights, never opened")
    with open_checkpoint(tmp_path) as checkpoint:
        assert_matches(checkpoint, state, "F16")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bin_views_strides_and_shared_storage(tmp_path, dtype):
    """Tensors saved as views keep their storage, offset and strides: transposes, slices, expands."""
    generator = torch.Generator().manual_seed(6)
    base = torch.randn(6, 8, generator=generator).to(dtype)
    state = {
        "transposed": base.t(),
        "rows": base[2:5],
        "columns": base[:, 3:7],
        "stepped": base[::2, 1::3],
        "whole": base,
        "expanded": torch.randn(1, 8, generator=generator).to(dtype).expand(4, 8),
        "permuted": torch.randn(2, 3, 4, generator=generator).to(dtype).permute(2, 0, 1),
    }
    torch.save(state, tmp_path / "pytorch_model.bin")
    reference = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    assert not reference["transposed"].is_contiguous()  # the file really holds strided views
    with open_checkpoint(tmp_path) as checkpoint:
        assert_matches(checkpoint, reference, "F32" if dtype == torch.float32 else "BF16")


def test_bin_parameters(tmp_path):
    """torch.save of nn.Parameter objects (not a state_dict) pickles _rebuild_parameter."""
    torch.manual_seed(7)
    layer = torch.nn.Linear(4, 3)
    torch.save(OrderedDict(layer.named_parameters()), tmp_path / "pytorch_model.bin")
    with zipfile.ZipFile(tmp_path / "pytorch_model.bin") as archive:
        assert b"_rebuild_parameter" in archive.read("pytorch_model/data.pkl")
    with open_checkpoint(tmp_path) as checkpoint:
        assert_matches(checkpoint, {k: v.detach() for k, v in layer.named_parameters()}, "F32")


def test_bin_compressed_members_are_read_through_zipfile(tmp_path):
    state = make_state(torch.bfloat16, seed=8)
    torch.save(state, tmp_path / "original.bin")
    rezip(tmp_path / "original.bin", tmp_path / "pytorch_model.bin", compression=zipfile.ZIP_DEFLATED)
    (tmp_path / "original.bin").unlink()
    with open_checkpoint(tmp_path) as checkpoint:
        assert_matches(checkpoint, state, "BF16")


def test_bin_big_endian(tmp_path):
    """A checkpoint written on a big-endian machine says so in its byteorder record."""
    state = {"a": torch.randn(3, 4), "b": torch.randn(5).half(), "c": torch.randn(2, 3).bfloat16()}
    torch.save(state, tmp_path / "little.bin")
    itemsizes = {"0": 4, "1": 2, "2": 2}  # storage keys follow insertion order

    def to_big_endian(name: str, data: bytes) -> bytes:
        if name.endswith("/byteorder"):
            return b"big"
        key = name.rsplit("/data/", 1)[-1]
        if "/data/" in name and key in itemsizes:
            return np.frombuffer(data, dtype=f"<u{itemsizes[key]}").byteswap().tobytes()
        return data

    rezip(tmp_path / "little.bin", tmp_path / "pytorch_model.bin", to_big_endian)
    (tmp_path / "little.bin").unlink()
    with open_checkpoint(tmp_path) as checkpoint:
        for name, tensor in state.items():
            np.testing.assert_array_equal(checkpoint.load(name), as_float32(tensor), strict=True)


def test_safetensors_preferred_over_bin(tmp_path):
    save_file(make_state(torch.float32, seed=9), str(tmp_path / "model.safetensors"))
    torch.save(make_state(torch.float32, seed=10), tmp_path / "pytorch_model.bin")
    with open_checkpoint(tmp_path) as checkpoint:
        assert {checkpoint.info(n).file.name for n in checkpoint.names()} == {"model.safetensors"}
        assert_matches(checkpoint, make_state(torch.float32, seed=9), "F32")


def test_weight_layout_preference():
    layout = pick_weight_layout
    assert layout(["model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"]).files == (
        "model.safetensors",)
    assert layout(["model.safetensors.index.json", "model-00001-of-00002.safetensors"]).index == (
        "model.safetensors.index.json")
    assert layout(["pytorch_model.bin.index.json", "pytorch_model-00001-of-00002.bin"]).format == "bin"
    assert layout(["b.safetensors", "a.safetensors", "pytorch_model.bin"]).files == ("a.safetensors", "b.safetensors")
    assert layout(["pytorch_model-00002-of-00002.bin", "pytorch_model-00001-of-00002.bin", "training_args.bin"]
                  ).files == ("pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin")
    assert layout(["config.json", "training_args.bin", "sub/model.safetensors"]) is None


@pytest.mark.parametrize("safe_serialization", [False, True])
def test_transformers_save_pretrained(tmp_path, safe_serialization):
    """What transformers' save_pretrained writes today. transformers 5 dropped .bin output: it writes
    safetensors even with safe_serialization=False (the argument is swallowed by **kwargs); the
    PyTorch .bin layout of transformers 4 (pytorch_model-0000N-of-0000M.bin + index) is covered by
    test_bin_sharded_with_index."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    torch.manual_seed(11)
    model = LlamaForCausalLM(config)
    model.save_pretrained(tmp_path, safe_serialization=safe_serialization, max_shard_size="10KB")
    files = sorted(p.name for p in tmp_path.iterdir())
    assert "model.safetensors.index.json" in files and not any(name.endswith(".bin") for name in files)
    shards = [name for name in files if name.startswith("model-") and name.endswith(".safetensors")]
    assert len(shards) > 1
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    with open_checkpoint(tmp_path) as checkpoint:
        assert_matches(checkpoint, {k: v.detach() for k, v in model.state_dict().items()}, "F32")


def test_load_reads_only_that_tensors_bytes(tmp_path, monkeypatch):
    state = make_state(torch.bfloat16, seed=12)
    torch.save(state, tmp_path / "pytorch_model.bin")
    read_sizes: list[int] = []
    real_readinto = checkpoint_module._FileBytes.readinto

    def counting_readinto(self, offset, buffer):
        read_sizes.append(buffer.nbytes)
        return real_readinto(self, offset, buffer)

    monkeypatch.setattr(checkpoint_module._FileBytes, "readinto", counting_readinto)
    monkeypatch.setattr(checkpoint_module, "WIDEN_CHUNK_ELEMENTS", 100)  # widen in several chunks
    with open_checkpoint(tmp_path) as checkpoint:
        assert read_sizes == []  # opening reads headers only
        for name, tensor in state.items():
            read_sizes.clear()
            np.testing.assert_array_equal(checkpoint.load(name), as_float32(tensor), strict=True)
            assert sum(read_sizes) == tensor.numel() * 2
            assert max(read_sizes, default=0) <= 200


# --------------------------------------------------------------------------------------------
# Pickles that would run code


def test_malicious_pickle_payloads_are_live(tmp_path):
    """The payloads below really do act when unpickled normally: the refusal tests are meaningful."""
    marker = tmp_path / "proof"
    pickle.loads(open_payload(marker))
    assert marker.exists()


def open_payload(marker: Path) -> bytes:
    """Protocol-0 pickle calling builtins.open(marker, "w") — creates the file when executed."""
    return b"cbuiltins\nopen\n(V" + str(marker).encode() + b"\nVw\ntR."


class RunsShell:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.mark.parametrize("kind", ["builtins.open", "posix.system", "torch._utils"])
def test_malicious_bin_is_refused_without_running(tmp_path, kind):
    marker = tmp_path / "pwned"
    if kind == "builtins.open":
        payload, refused = open_payload(marker), "builtins.open"
    elif kind == "posix.system":
        # Inside a plausible state dict: the OrderedDict is allowed, the tensor is not a tensor.
        payload = pickle.dumps(OrderedDict(weight=RunsShell(f"touch {marker}")), protocol=2)
        assert b"posix\nsystem" in payload
        refused = "posix.system"
    else:
        # torch._utils is a trusted module, but only its rebuild functions are allowed.
        payload = b"\x80\x02ctorch._utils\n_import_dotted_name\nX\x02\x00\x00\x00osq\x00\x85R."
        refused = "torch._utils._import_dotted_name"
    directory = tmp_path / "checkpoint"
    directory.mkdir()
    write_torch_zip(directory / "pytorch_model.bin", payload)
    message = error_of(open_checkpoint, directory)
    assert_file_error(message, directory / "pytorch_model.bin",
                      f"refusing to unpickle {refused}: not a tensor checkpoint")
    assert not marker.exists()


def test_stand_ins_are_not_callable(tmp_path):
    """A storage class is allowed as a name, but calling it gets a clean error, not torch code."""
    payload = b"\x80\x02ctorch\nFloatStorage\nK\x04\x85R."
    write_torch_zip(tmp_path / "pytorch_model.bin", payload)
    assert_file_error(error_of(open_checkpoint, tmp_path), tmp_path / "pytorch_model.bin", "corrupt data.pkl")


def test_bad_persistent_id_is_refused(tmp_path):
    payload = b"\x80\x02X\x03\x00\x00\x00abcQ."  # BINPERSID with a plain string
    write_torch_zip(tmp_path / "pytorch_model.bin", payload)
    assert_file_error(error_of(open_checkpoint, tmp_path), tmp_path / "pytorch_model.bin", "persistent id")


# --------------------------------------------------------------------------------------------
# Validation errors: each one line, naming the file


def test_missing_directory_and_missing_weights(tmp_path):
    assert_file_error(error_of(open_checkpoint, tmp_path / "nope"), tmp_path / "nope", "no such directory")
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "training_args.bin").write_bytes(b"x")
    assert_file_error(error_of(open_checkpoint, tmp_path), tmp_path, "no weights found")


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_index_names_a_missing_shard(tmp_path, fmt):
    save_sharded(make_state(torch.float16), tmp_path, fmt, shards=2)
    stem, suffix = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")
    missing = tmp_path / f"{stem}-00002-of-00002.{suffix}"
    missing.unlink()
    assert_file_error(error_of(open_checkpoint, tmp_path), missing, "missing", f"{stem}.{suffix}.index.json")


def test_bad_index(tmp_path):
    save_sharded(make_state(torch.float32), tmp_path, "safetensors", shards=2)
    index = tmp_path / "model.safetensors.index.json"
    original = json.loads(index.read_text())

    index.write_text("{\"weight_map\": ")
    assert_file_error(error_of(open_checkpoint, tmp_path), index, "invalid JSON")
    index.write_text(json.dumps({"metadata": {}}))
    assert_file_error(error_of(open_checkpoint, tmp_path), index, "weight_map")
    index.write_text(json.dumps({"weight_map": {"x": "../../etc/passwd"}}))
    assert_file_error(error_of(open_checkpoint, tmp_path), index, "outside the checkpoint")
    ghost = {**original["weight_map"], "ghost.weight": "model-00001-of-00002.safetensors"}
    index.write_text(json.dumps({"weight_map": ghost}))
    assert_file_error(error_of(open_checkpoint, tmp_path), tmp_path / "model-00001-of-00002.safetensors",
                      "has no tensor 'ghost.weight'", "model.safetensors.index.json")


def test_truncated_safetensors(tmp_path):
    save_file(make_state(torch.float32), str(tmp_path / "model.safetensors"))
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    (header_length,) = struct.unpack("<Q", data[:8])
    for cut, needle in [(5, "truncated"), (8 + header_length // 2, "truncated"), (len(data) - 10, "beyond the end")]:
        path.write_bytes(data[:cut])
        assert_file_error(error_of(open_checkpoint, tmp_path), path, needle)


def write_safetensors(path: Path, header: dict, data: bytes = b"") -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def test_bad_safetensors_headers(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 9) + b"{not json")
    assert_file_error(error_of(open_checkpoint, tmp_path), path, "invalid header JSON")
    path.write_bytes(struct.pack("<Q", 2) + b"[]")
    assert_file_error(error_of(open_checkpoint, tmp_path), path, "invalid header JSON")
    path.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    assert_file_error(error_of(open_checkpoint, tmp_path), path, "not a safetensors file")
    cases = [
        ({"a": {"dtype": "F32", "shape": "4", "data_offsets": [0, 16]}}, "shape"),
        ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [16, 0]}}, "data_offsets"),
        ({"a": {"shape": [4], "data_offsets": [0, 16]}}, "no dtype"),
        ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}, "needs 16"),
    ]
    for header, needle in cases:
        write_safetensors(path, header, bytes(16))
        assert_file_error(error_of(open_checkpoint, tmp_path), path, "'a'", needle)


def test_tensor_data_beyond_file_end(tmp_path):
    path = write_safetensors(tmp_path / "model.safetensors",
                             {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                              "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, bytes(8))
    assert_file_error(error_of(open_checkpoint, tmp_path), path, "'b'", "beyond the end of the file")


@pytest.mark.parametrize("dtype,what", [("I64", "unsupported dtype I64"), ("F8_E4M3", "unsupported dtype F8_E4M3"),
                                        ("Q9", "unknown dtype Q9")])
def test_unreadable_dtypes_are_named(tmp_path, dtype, what):
    """Other tensors stay readable (checkpoints carry int buffers the converter ignores); the bad one
    fails as soon as it is asked for."""
    state = {"position_ids": torch.arange(8).to(torch.int64), "weight": torch.randn(8)}
    if dtype == "F8_E4M3":
        state["position_ids"] = torch.randn(8).to(torch.float8_e4m3fn)
    save_file(state, str(tmp_path / "model.safetensors"))
    path = tmp_path / "model.safetensors"
    if dtype == "Q9":
        data = path.read_bytes().replace(b'"I64"', b'"Q9" ')
        path.write_bytes(data)
    with open_checkpoint(tmp_path) as checkpoint:
        assert set(checkpoint.names()) == set(state)
        np.testing.assert_array_equal(checkpoint.load("weight"), state["weight"].numpy())
        for method in (checkpoint.info, checkpoint.load):
            assert_file_error(error_of(method, "position_ids"), path, "'position_ids'", what)


def test_unsupported_dtype_in_bin(tmp_path):
    torch.save({"mask": torch.ones(4, dtype=torch.bool), "w": torch.randn(2)}, tmp_path / "pytorch_model.bin")
    with open_checkpoint(tmp_path) as checkpoint:
        assert_file_error(error_of(checkpoint.info, "mask"), tmp_path / "pytorch_model.bin", "dtype BOOL")


def test_duplicate_names_across_shards(tmp_path):
    save_file({"a": torch.zeros(2), "b": torch.zeros(2)}, str(tmp_path / "one.safetensors"))
    save_file({"b": torch.ones(2)}, str(tmp_path / "two.safetensors"))
    assert_file_error(error_of(open_checkpoint, tmp_path), tmp_path / "two.safetensors", "'b'", "one.safetensors")

    bins = tmp_path / "bins"
    bins.mkdir()
    torch.save({"a": torch.zeros(2), "b": torch.zeros(2)}, bins / "pytorch_model-00001-of-00002.bin")
    torch.save({"b": torch.ones(2)}, bins / "pytorch_model-00002-of-00002.bin")
    weight_map = {"a": "pytorch_model-00001-of-00002.bin", "b": "pytorch_model-00002-of-00002.bin"}
    (bins / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert_file_error(error_of(open_checkpoint, bins), bins / "pytorch_model-00002-of-00002.bin", "'b'",
                      "pytorch_model-00001-of-00002.bin")


def test_broken_bin_files(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    torch.save(make_state(torch.float32), path)
    data = path.read_bytes()

    path.write_bytes(data[: len(data) // 2])
    assert_file_error(error_of(open_checkpoint, tmp_path), path, "truncated")
    path.write_bytes(b"\x00" * 100)
    assert_file_error(error_of(open_checkpoint, tmp_path), path, "not a PyTorch zip checkpoint")

    torch.save(make_state(torch.float32), path, _use_new_zipfile_serialization=False)
    assert_file_error(error_of(open_checkpoint, tmp_path), path, "legacy", "PyTorch")

    write_torch_zip(path, pickle.dumps([1, 2], protocol=2))
    assert_file_error(error_of(open_checkpoint, tmp_path), path, "not a state dict")
    write_torch_zip(path, pickle.dumps({"a": 1}, protocol=2))
    assert_file_error(error_of(open_checkpoint, tmp_path), path, "'a' is not a tensor")
    write_torch_zip(path, b"\x80\x02}q\x00(X")
    assert_file_error(error_of(open_checkpoint, tmp_path), path, "corrupt data.pkl")


def test_bin_storage_problems(tmp_path):
    torch.save({"w": torch.randn(4, 4)}, tmp_path / "original.bin")
    path = tmp_path / "pytorch_model.bin"
    rezip(tmp_path / "original.bin", path, lambda name, data: None if name.endswith("/data/0") else data)
    assert_file_error(error_of(open_checkpoint, tmp_path), path, "'w'", "data/0", "missing")
    rezip(tmp_path / "original.bin", path, lambda name, data: data[:20] if name.endswith("/data/0") else data)
    assert_file_error(error_of(open_checkpoint, tmp_path), path, "data/0", "need 64")


def test_unknown_tensor_name(tmp_path):
    save_file({"a": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with open_checkpoint(tmp_path) as checkpoint:
        assert "a" in checkpoint and len(checkpoint) == 1
        assert_file_error(error_of(checkpoint.load, "b"), tmp_path, "no tensor 'b'")


def test_file_truncated_after_opening(tmp_path):
    save_file({"a": torch.randn(64)}, str(tmp_path / "model.safetensors"))
    path = tmp_path / "model.safetensors"
    with open_checkpoint(tmp_path) as checkpoint:
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size - 16)
        assert_file_error(error_of(checkpoint.load, "a"), path, "truncated")


def test_close_is_idempotent(tmp_path):
    torch.save(make_state(torch.float32), tmp_path / "original.bin")
    rezip(tmp_path / "original.bin", tmp_path / "pytorch_model.bin", compression=zipfile.ZIP_DEFLATED)
    checkpoint = open_checkpoint(tmp_path)
    checkpoint.load("lm_head.weight")
    checkpoint.close()
    checkpoint.close()
    assert_file_error(error_of(checkpoint.load, "lm_head.weight"), tmp_path, "closed")


def test_pickled_torch_size_is_a_tuple(tmp_path):
    """Older torch versions pickled shapes as torch.Size; it is allowed and becomes a tuple."""
    buffer = io.BytesIO()
    torch.save({"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}, buffer)
    buffer.seek(0)
    with zipfile.ZipFile(buffer) as archive:
        names = archive.namelist()
        pkl = archive.read(next(n for n in names if n.endswith("data.pkl")))
        storage = archive.read(next(n for n in names if n.endswith("/data/0")))
    # Replace the size tuple (2, 3) -> torch.Size((2, 3)): GLOBAL torch Size, the tuple, TUPLE1, REDUCE.
    old = b"K\x02K\x03\x86"
    assert pkl.count(old) == 1
    pkl = pkl.replace(old, b"ctorch\nSize\nK\x02K\x03\x86\x85R")
    write_torch_zip(tmp_path / "pytorch_model.bin", pkl, {"0": storage})
    with open_checkpoint(tmp_path) as checkpoint:
        assert checkpoint.info("w").shape == (2, 3)
        np.testing.assert_array_equal(checkpoint.load("w"), np.arange(6, dtype=np.float32).reshape(2, 3))


# --------------------------------------------------------------------------------------------
# Hostile files (the audit's classes): pickles written opcode by opcode, bombs, layouts


class Global:
    """A pickle GLOBAL (module.name), for ``torch_pickle``."""

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name


class Call:
    """A pickle REDUCE: ``callable(*args)``."""

    def __init__(self, callable_: Global, *args) -> None:
        self.callable, self.args = callable_, args


class PersistentId:
    def __init__(self, value) -> None:
        self.value = value


def pickle_opcodes(value) -> bytes:
    """A minimal pickle writer (protocol 2 opcodes) that can write any field, well-typed or not."""
    if value is None:
        return b"N"
    if value is True or value is False:
        return b"\x88" if value else b"\x89"
    if isinstance(value, int):
        raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
        return b"\x8a" + bytes([len(raw)]) + raw  # LONG1
    if isinstance(value, float):
        return b"G" + struct.pack(">d", value)
    if isinstance(value, str):
        raw = value.encode("utf-8", "surrogatepass")
        return b"X" + struct.pack("<I", len(raw)) + raw
    if isinstance(value, tuple):
        return b"(" + b"".join(pickle_opcodes(item) for item in value) + b"t"
    if isinstance(value, list):
        return b"](" + b"".join(pickle_opcodes(item) for item in value) + b"e"
    if isinstance(value, dict):
        items = b"".join(pickle_opcodes(k) + pickle_opcodes(v) for k, v in value.items())
        return b"}(" + items + b"u"
    if isinstance(value, Global):
        return f"c{value.module}\n{value.name}\n".encode()
    if isinstance(value, Call):
        return pickle_opcodes(value.callable) + pickle_opcodes(tuple(value.args)) + b"R"
    if isinstance(value, PersistentId):
        return pickle_opcodes(value.value) + b"Q"
    raise TypeError(type(value))


def tensor_record(storage_type: str = "FloatStorage", key: str = "0", numel=16, offset=0, shape=(4, 4),
                  stride=(4, 1)) -> Call:
    """What torch.save pickles for one tensor: _rebuild_tensor_v2(storage, offset, size, stride, ...)."""
    storage = PersistentId(("storage", Global("torch", storage_type), key, "cpu", numel))
    return Call(Global("torch._utils", "_rebuild_tensor_v2"), storage, offset, shape, stride, False,
                Call(Global("collections", "OrderedDict")))


def torch_pickle(records: dict) -> bytes:
    return b"\x80\x02" + pickle_opcodes(records) + b"."


def test_pickle_writer_matches_what_torch_reads(tmp_path):
    """The opcode writer makes real checkpoints: torch.load reads them (so the hostile variants below
    differ from a valid file only in the field under test)."""
    values = np.arange(16, dtype=np.float32)
    write_torch_zip(tmp_path / "pytorch_model.bin", torch_pickle({"w": tensor_record()}), {"0": values.tobytes()})
    reference = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    np.testing.assert_array_equal(reference["w"].numpy(), values.reshape(4, 4))
    with open_checkpoint(tmp_path) as checkpoint:
        np.testing.assert_array_equal(checkpoint.load("w"), values.reshape(4, 4))


BAD_RECORDS = {
    "negative offset": (dict(offset=-64), "storage offset"),
    "offset beyond storage": (dict(offset=17), "storage offset"),
    "offset not an int": (dict(offset="0"), "storage offset"),
    "numel not an int": (dict(numel="abc"), "persistent id"),
    "numel negative": (dict(numel=-1), "persistent id"),
    "numel huge": (dict(numel=2**64), "persistent id"),
    "shape of strings": (dict(shape=("x",), stride=(1,)), "shape"),
    "shape negative": (dict(shape=(-4, 4)), "shape"),
    "shape not a tuple": (dict(shape=[4, 4]), "shape"),
    "shape huge": (dict(shape=(2**40, 2**40), stride=(0, 0)), "shape"),
    "too many dims": (dict(shape=(1,) * 40, stride=(1,) * 40), "shape"),
    "stride negative": (dict(stride=(-4, 1)), "stride"),
    "stride wrong length": (dict(stride=(1,)), "stride"),
    "stride of floats": (dict(stride=(4.0, 1.0)), "stride"),
    "unknown storage type": (dict(storage_type="QuantizedStorage"), "refusing to unpickle torch.QuantizedStorage"),
    "view beyond storage": (dict(offset=8, shape=(4, 4)), "extends beyond its storage"),
    "strided view beyond storage": (dict(shape=(4, 4), stride=(5, 1)), "extends beyond its storage"),
    "storage bigger than its record": (dict(numel=1000), "need 4000"),
    "expanded far beyond its storage": (dict(numel=1, shape=(2**20, 2**20), stride=(0, 0)), "overlapping strides"),
}


@pytest.mark.parametrize("case", list(BAD_RECORDS))
def test_bad_tensor_records_are_clean_errors(tmp_path, case):
    """Every field of a tensor record is type- and range-checked (audit: offset -64 used to be read
    from before its storage; numel="abc", shape=('x',) and unknown dtypes gave tracebacks)."""
    fields, needle = BAD_RECORDS[case]
    path = write_torch_zip(tmp_path / "pytorch_model.bin", torch_pickle({"w": tensor_record(**fields)}),
                           {"0": np.arange(16, dtype=np.float32).tobytes()})
    assert_file_error(error_of(open_checkpoint, tmp_path), path, needle)


def test_strided_and_expanded_records_within_bounds_still_load(tmp_path):
    values = np.arange(16, dtype=np.float32)
    records = {"t": tensor_record(shape=(4, 4), stride=(1, 4)), "e": tensor_record(shape=(3, 4), stride=(0, 1))}
    write_torch_zip(tmp_path / "pytorch_model.bin", torch_pickle(records), {"0": values.tobytes()})
    with open_checkpoint(tmp_path) as checkpoint:
        np.testing.assert_array_equal(checkpoint.load("t"), values.reshape(4, 4).T)
        np.testing.assert_array_equal(checkpoint.load("e"), np.broadcast_to(values[:4], (3, 4)))


def test_data_pkl_inflate_bomb_is_refused_with_bounded_memory(tmp_path):
    """A small .bin whose data.pkl inflates to 256 MiB: refused, without inflating it."""
    import tracemalloc

    path = tmp_path / "pytorch_model.bin"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        with archive.open("archive/data.pkl", "w", force_zip64=True) as member:
            chunk = b"\0" * (1 << 20)
            for _ in range(256):
                member.write(chunk)
        archive.writestr("archive/byteorder", b"little")
    assert path.stat().st_size < 2 << 20
    tracemalloc.start()
    try:
        message = error_of(open_checkpoint, tmp_path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert_file_error(message, path, "data.pkl", "not a plausible torch.save checkpoint")
    assert peak < 8 << 20, peak


def test_data_pkl_lying_about_its_size_is_read_with_a_bound(tmp_path, monkeypatch):
    """The cap holds however the member's size is declared: it is enforced on the inflated bytes."""
    monkeypatch.setattr(checkpoint_module, "MAX_PICKLE_BYTES", 1000)
    path = write_torch_zip(tmp_path / "pytorch_model.bin", torch_pickle({f"w{i}": tensor_record() for i in range(50)}),
                           {"0": bytes(64)}, compression=zipfile.ZIP_DEFLATED)
    assert_file_error(error_of(open_checkpoint, tmp_path), path, "data.pkl", "more than the 1000")
    real_read = checkpoint_module._read_member

    def declared_small(path, archive, member, limit, default=b""):
        if member is not None:
            member.file_size = 10  # what a hostile central directory can claim
        return real_read(path, archive, member, limit, default)

    monkeypatch.setattr(checkpoint_module, "_read_member", declared_small)
    assert_file_error(error_of(open_checkpoint, tmp_path), path, "data.pkl")


SAFETENSORS_LAYOUTS = {
    "overlap": ({"a": [0, 16], "b": [8, 24]}, 24, "overlap"),
    "aliased": ({"a": [0, 16], "b": [0, 16]}, 16, "overlap"),
    "gap": ({"a": [0, 16], "b": [24, 40]}, 40, "gaps"),
    "gap at start": ({"a": [8, 24]}, 24, "gaps"),
    "trailing bytes": ({"a": [0, 16]}, 24, "unused bytes"),
}


@pytest.mark.parametrize("case", list(SAFETENSORS_LAYOUTS))
def test_safetensors_offsets_must_tile_the_data_section(tmp_path, case):
    """Decision: overlapping data_offsets would be harmless to read, but the safetensors library refuses
    overlaps, gaps and trailing bytes; we match it (a file the reference rejects is not accepted)."""
    offsets, data_size, needle = SAFETENSORS_LAYOUTS[case]
    header = {name: {"dtype": "F32", "shape": [4], "data_offsets": span} for name, span in offsets.items()}
    path = write_safetensors(tmp_path / "model.safetensors", header, bytes(data_size))
    assert_file_error(error_of(open_checkpoint, tmp_path), path, needle)
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    with pytest.raises(SafetensorError):  # the reference library agrees
        load_file(str(path))


@pytest.mark.parametrize("where", ["header", "index"])
def test_deeply_nested_json_is_a_clean_error(tmp_path, where):
    deep = "[" * 100_000 + "]" * 100_000
    if where == "header":
        path = tmp_path / "model.safetensors"
        path.write_bytes(struct.pack("<Q", len(deep)) + deep.encode())
    else:
        path = tmp_path / "model.safetensors.index.json"
        path.write_text('{"weight_map": ' + deep + "}")
    assert_file_error(error_of(open_checkpoint, tmp_path), path, "nested too deeply")
