"""2023 GGML files (ggml, ggmf v1, ggjt v1-v3; LLaMA family) run, show info and convert to GGUF.

The legacy files are written here from the format's description (``write_legacy``: header,
vocabulary, tensor records; the 2023 block layouts in ``legacy_blocks``), from the same quantized
weights as a reference GGUF written by our own writer in today's layouts: the legacy file must
give the same logits, and ``halfbyte convert`` the same tensor bytes.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGMLQuantizationType, GGUFValueType

from engine import quants
from engine.cli import main
from engine.errors import HalfbyteError
from engine.ggml_legacy import LegacyGGMLFile, LegacyOptions, gguf_name, is_legacy_ggml
from engine.gguf_file import GGUFFile, GGUFWriter
from engine.model import Model

QT = GGMLQuantizationType
VT = GGUFValueType
LLAMA_CPP = os.environ.get("HALFBYTE_LLAMA_CPP")

MAGICS = {"ggml": 0x67676D6C, "ggmf": 0x67676D66, "ggjt": 0x67676A74}
TYPE_IDS = {QT.F32: 0, QT.F16: 1, QT.Q4_0: 2, QT.Q4_1: 3, QT.Q5_0: 6, QT.Q5_1: 7, QT.Q8_0: 8,
            QT.Q2_K: 10, QT.Q3_K: 11, QT.Q4_K: 12, QT.Q5_K: 13, QT.Q6_K: 14}
FTYPES = {QT.F32: 0, QT.F16: 1, QT.Q4_0: 2, QT.Q4_1: 3, QT.Q8_0: 7, QT.Q5_0: 8, QT.Q5_1: 9, QT.Q4_K: 15,
          QT.Q6_K: 18}
LAYER_PARTS = ["attention.wq", "attention.wk", "attention.wv", "attention.wo", "feed_forward.w1",
               "feed_forward.w2", "feed_forward.w3", "attention_norm", "ffn_norm"]
GGUF_PARTS = {"attention.wq": "attn_q", "attention.wk": "attn_k", "attention.wv": "attn_v",
              "attention.wo": "attn_output", "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down",
              "feed_forward.w3": "ffn_up", "attention_norm": "attn_norm", "ffn_norm": "ffn_norm"}
IDS = [1, 5, 269, 42, 7, 260, 99, 3]


# -- writing 2023 files from the format description --------------------------------------------------


def write_legacy(path: Path, fmt: str, version: int, hp: dict, vocab: list[tuple[bytes, float]],
                 tensors: list[tuple[str, tuple[int, ...], int, bytes]]) -> Path:
    """magic u32, [version u32], 7 x u32 hyper-parameters, vocabulary (length, bytes, [score]), then per
    tensor: n_dims, name length, type, ne[], name, [zero padding to 32: ggjt], data."""
    out = bytearray(struct.pack("<I", MAGICS[fmt]))
    if fmt != "ggml":
        out += struct.pack("<I", version)
    out += struct.pack("<7I", hp["n_vocab"], hp["n_embd"], hp["n_mult"], hp["n_head"], hp["n_layer"], hp["n_rot"],
                       hp["ftype"])
    for text, score in vocab:
        out += struct.pack("<I", len(text)) + text
        if fmt != "ggml":
            out += struct.pack("<f", score)
    for name, ne, type_id, data in tensors:
        raw_name = name.encode()
        out += struct.pack(f"<3I{len(ne)}I", len(ne), len(raw_name), type_id, *ne) + raw_name
        if fmt == "ggjt":
            out += b"\0" * (-len(out) % 32)
        out += data
    path.write_bytes(bytes(out))
    return path


def _interleave(elements: np.ndarray) -> np.ndarray:
    """(n, 2k) codes in element order -> (n, k) bytes: element 2i low nibble, 2i+1 high (before ggjt v2)."""
    return (elements[:, 0::2] | (elements[:, 1::2] << 4)).astype(np.uint8)


def _elements(qs: np.ndarray) -> np.ndarray:
    """Today's (n, 16) bytes -> (n, 32) codes in element order (element j low nibble, j + 16 high)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _f32(half: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(half).view("<f2").astype("<f4").view(np.uint8)


def legacy_blocks(today: np.ndarray, qtype: QT, layout: str) -> bytes:
    """Today's blocks of ``qtype`` as a file of ``layout`` stores the same numbers.

    old (ggml, ggmf, ggjt v1): Q4_0 {f32 d; qs[16]}, Q4_1 {f32 d, m; qs[16]}, Q5_0 {f16 d; qh[4]; qs[16]},
    Q5_1 {f16 d, m; qh[4]; qs[16]} with nibbles interleaved, Q8_0 {f32 d; qs[32]}; v2: today's nibble order,
    f32 scales for Q4_0/Q4_1/Q8_0; v3: today's blocks."""
    if layout == "v3" or qtype not in (QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0):
        return today.tobytes()
    b = today.reshape(-1, quants.type_bytes(qtype))
    old = layout == "old"
    if qtype == QT.Q4_0:
        qs = _interleave(_elements(b[:, 2:18])) if old else b[:, 2:18]
        parts = [_f32(b[:, 0:2]), qs]
    elif qtype == QT.Q4_1:
        qs = _interleave(_elements(b[:, 4:20])) if old else b[:, 4:20]
        parts = [_f32(b[:, 0:2]), _f32(b[:, 2:4]), qs]
    elif qtype == QT.Q5_0:
        parts = [b[:, 0:6], _interleave(_elements(b[:, 6:22])) if old else b[:, 6:22]]
    elif qtype == QT.Q5_1:
        parts = [b[:, 0:8], _interleave(_elements(b[:, 8:24])) if old else b[:, 8:24]]
    else:  # Q8_0
        parts = [_f32(b[:, 0:2]), b[:, 2:34]]
    return np.concatenate([np.ascontiguousarray(p).reshape(b.shape[0], -1) for p in parts], axis=1).tobytes()


def vocabulary(n_vocab: int) -> list[tuple[bytes, float]]:
    """As 2023's convert-pth-to-ggml.py wrote LLaMA's: unknown ' \u2047 ', control tokens empty, byte
    tokens as the byte, pieces with U+2581 as a space."""
    items = [(" \u2047 ".encode(), 0.0), (b"", 0.0), (b"", 0.0)] + [(bytes([b]), 0.0) for b in range(256)]
    items += [(b"", 0.0), (" caf\u00e9".encode(), -1.5)]
    items += [(f" w{i}".encode(), -float(i) - 2.0) for i in range(n_vocab - len(items))]
    return items


def expected_tokens(vocab: list[tuple[bytes, float]]) -> tuple[list[str], list[int]]:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    for text, _ in vocab[259:]:
        tokens.append(text.decode().replace(" ", "\u2581"))
        types.append(3 if not text else 1)
    return tokens, types


def shapes(n_vocab: int, n_embd: int, n_head: int, n_head_kv: int, n_ff: int, n_layer: int) -> dict[str, tuple]:
    """numpy-order shapes of the GGML file's tensors, in convert-pth-to-ggml.py's order."""
    n_kv = n_embd // n_head * n_head_kv
    out = {"tok_embeddings.weight": (n_vocab, n_embd), "norm.weight": (n_embd,), "output.weight": (n_vocab, n_embd)}
    for i in range(n_layer):
        per = {"attention.wq": (n_embd, n_embd), "attention.wk": (n_kv, n_embd), "attention.wv": (n_kv, n_embd),
               "attention.wo": (n_embd, n_embd), "feed_forward.w1": (n_ff, n_embd), "feed_forward.w2": (n_embd, n_ff),
               "feed_forward.w3": (n_ff, n_embd), "attention_norm": (n_embd,), "ffn_norm": (n_embd,)}
        out.update({f"layers.{i}.{part}.weight": shape for part, shape in per.items()})
    return out


def gguf_tensor_name(name: str) -> str:
    if name.startswith("layers."):
        _, index, rest = name.split(".", 2)
        return f"blk.{index}.{GGUF_PARTS[rest.removesuffix('.weight')]}.weight"
    return {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
            "output.weight": "output.weight"}[name]


class Tiny:
    """A tiny LLaMA in one 2023 format and the reference GGUF of the same numbers."""

    def __init__(self, tmp_path: Path, fmt: str, version: int, main_type: QT, output_type: QT | None = None,
                 n_embd: int = 64, n_head: int = 4, n_head_kv: int = 4, n_mult: int = 32, n_vocab: int = 300,
                 n_layer: int = 2, seed: int = 0) -> None:
        layout = "v3" if (fmt, version) == ("ggjt", 3) else "v2" if (fmt, version) == ("ggjt", 2) else "old"
        n_ff = ((2 * (4 * n_embd) // 3 + n_mult - 1) // n_mult) * n_mult
        self.hp = dict(n_vocab=n_vocab, n_embd=n_embd, n_mult=n_mult, n_head=n_head, n_layer=n_layer,
                       n_rot=n_embd // n_head, ftype=FTYPES[main_type])
        self.n_ff, self.n_head_kv = n_ff, n_head_kv
        rng = np.random.default_rng(seed)
        self.vocab = vocabulary(n_vocab)
        if fmt == "ggml":
            self.vocab = [(text, 0.0) for text, _ in self.vocab]
        self.today: dict[str, tuple[QT, tuple, np.ndarray]] = {}  # GGUF name -> (type, shape, today's bytes)
        records = []
        for name, shape in shapes(n_vocab, n_embd, n_head, n_head_kv, n_ff, n_layer).items():
            if len(shape) == 1:
                qtype, values = QT.F32, (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
            else:
                qtype = output_type if output_type is not None and name == "output.weight" else main_type
                values = (0.08 * rng.standard_normal(shape)).astype(np.float32)
            data = quants.quantize(values, qtype)
            self.today[gguf_tensor_name(name)] = (qtype, shape, np.ascontiguousarray(data))
            records.append((name, tuple(reversed(shape)), TYPE_IDS[qtype], legacy_blocks(data, qtype, layout)))
        self.path = write_legacy(tmp_path / f"ggml-model-{fmt}{version}-{main_type.name.lower()}.bin", fmt,
                                 version, self.hp, self.vocab, records)
        self.reference = self.write_reference(tmp_path / f"reference-{fmt}{version}.gguf")

    def write_reference(self, path: Path, eps: float = 5e-6, n_ctx: int = 2048) -> Path:
        tokens, types = expected_tokens(self.vocab)
        hp = self.hp
        with GGUFWriter(path) as writer:
            writer.add_string("general.architecture", "llama")
            writer.add_uint32("llama.context_length", n_ctx)
            writer.add_uint32("llama.embedding_length", hp["n_embd"])
            writer.add_uint32("llama.block_count", hp["n_layer"])
            writer.add_uint32("llama.feed_forward_length", self.n_ff)
            writer.add_uint32("llama.rope.dimension_count", hp["n_embd"] // hp["n_head"])
            writer.add_uint32("llama.attention.head_count", hp["n_head"])
            writer.add_uint32("llama.attention.head_count_kv", self.n_head_kv)
            writer.add_float32("llama.attention.layer_norm_rms_epsilon", eps)
            writer.add_string("tokenizer.ggml.model", "llama")
            writer.add_array("tokenizer.ggml.tokens", tokens, VT.STRING)
            writer.add_array("tokenizer.ggml.scores", np.array([s for _, s in self.vocab], np.float32), VT.FLOAT32)
            writer.add_array("tokenizer.ggml.token_type", np.array(types, np.int32), VT.INT32)
            for name, (qtype, shape, _) in self.today.items():
                writer.add_tensor_info(name, shape, qtype)
            for name, (_, _, data) in self.today.items():
                writer.write_tensor(name, data)
            writer.finish()
        return path


def logits(path: Path) -> np.ndarray:
    model = Model.load(path, n_ctx=64, threads=1)
    try:
        return model.eval(IDS)
    finally:
        model.file.close()


# Every version with the types it stored (LLaMA files: one type for the matrices, F32 norms).
CASES = {
    "ggml-f16": ("ggml", 1, QT.F16, None),
    "ggml-q4_0": ("ggml", 1, QT.Q4_0, QT.F16),
    "ggml-q4_1": ("ggml", 1, QT.Q4_1, None),
    "ggmf-f32": ("ggmf", 1, QT.F32, None),
    "ggmf-q4_1": ("ggmf", 1, QT.Q4_1, QT.Q4_0),
    "ggjt1-q4_0": ("ggjt", 1, QT.Q4_0, QT.F16),
    "ggjt1-q5_0": ("ggjt", 1, QT.Q5_0, QT.Q8_0),
    "ggjt1-q5_1": ("ggjt", 1, QT.Q5_1, QT.Q4_1),
    "ggjt2-q4_0": ("ggjt", 2, QT.Q4_0, QT.Q8_0),
    "ggjt2-q4_1": ("ggjt", 2, QT.Q4_1, QT.F16),
    "ggjt2-q5_1": ("ggjt", 2, QT.Q5_1, QT.Q5_0),
    "ggjt3-f32": ("ggjt", 3, QT.F32, QT.F16),
    "ggjt3-q4_0": ("ggjt", 3, QT.Q4_0, QT.Q8_0),
    "ggjt3-q4_1": ("ggjt", 3, QT.Q4_1, QT.Q5_1),
    "ggjt3-q5_0": ("ggjt", 3, QT.Q5_0, QT.F16),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Tiny]:
    cache: dict[str, Tiny] = {}

    def get(case: str) -> Tiny:
        if case not in cache:
            fmt, version, main_type, output_type = CASES[case]
            cache[case] = Tiny(tmp_path_factory.mktemp(case), fmt, version, main_type, output_type)
        return cache[case]

    return get


@pytest.mark.parametrize("case", list(CASES))
def test_legacy_file_gives_the_logits_of_the_same_weights_in_gguf(built, case):
    tiny = built(case)
    np.testing.assert_array_equal(logits(tiny.path), logits(tiny.reference))


@pytest.mark.parametrize("case", list(CASES))
def test_tensors_are_todays_bytes_under_gguf_names(built, case):
    tiny = built(case)
    with GGUFFile(tiny.path) as file:
        assert isinstance(file, LegacyGGMLFile)
        assert list(file.tensors) == list(tiny.today)
        for name, (qtype, shape, data) in tiny.today.items():
            info = file.tensors[name]
            assert (info.ggml_type, info.shape) == (qtype, shape), name
            assert file.tensor_bytes(name).tobytes() == data.tobytes(), name
            if qtype in (QT.F32, QT.F16):
                np.testing.assert_array_equal(file.tensor_array(name), data)


def test_metadata_as_llama_cpp_converter_derives_it(built):
    tiny = built("ggjt3-q4_0")
    with GGUFFile(tiny.path) as file:
        md = file.metadata
        assert file.architecture == "llama"
        assert md["general.name"] == tiny.path.name
        assert md["general.description"] == "converted from legacy GGJTv3 MOSTLY_Q4_0 format"
        assert md["general.file_type"] == 2
        assert md["llama.context_length"] == 2048
        assert md["llama.feed_forward_length"] == tiny.n_ff == 192
        assert md["llama.attention.head_count_kv"] == 4
        assert md["llama.rope.dimension_count"] == 16
        assert md["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(5e-6)
        tokens, types = expected_tokens(tiny.vocab)
        assert md["tokenizer.ggml.model"] == "llama"
        assert md["tokenizer.ggml.tokens"] == tokens
        assert md["tokenizer.ggml.token_type"].tolist() == types
        np.testing.assert_array_equal(md["tokenizer.ggml.scores"], [s for _, s in tiny.vocab])
        assert (md["tokenizer.ggml.unknown_token_id"], md["tokenizer.ggml.bos_token_id"],
                md["tokenizer.ggml.eos_token_id"]) == (0, 1, 2)
        assert set(file.value_types) == set(md)
    model = Model.load(tiny.path, n_ctx=64, threads=1)
    assert model.tokenize("w5")[0] == 1
    assert model.tokenizer.decode([261 + 5, 260]).strip() == "w5 café"
    model.file.close()


def test_names_follow_the_gguf_packages_llama_map():
    import gguf

    mapping = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 3)
    for name in shapes(300, 64, 4, 4, 192, 3):
        assert gguf_name(name, 3) == mapping.get_name(name, try_suffixes=(".weight", ".bias")) == gguf_tensor_name(name)
    assert gguf_name("layers.3.attention.wq.weight", 3) is None
    assert gguf_name("layers.01.attention.wq.weight", 3) is None


def test_ggjt_tensors_are_memory_mapped_and_converted_ones_made_once(built):
    tiny = built("ggjt3-q4_0")
    with GGUFFile(tiny.path) as file:
        whole = np.frombuffer(file._map, np.uint8)
        for name in file.tensors:
            assert file.legacy[name].mapped
            assert np.shares_memory(file.tensor_bytes(name), whole)
    old = built("ggjt1-q4_0")
    with GGUFFile(old.path) as file:
        name = "blk.0.attn_q.weight"
        assert not file.legacy[name].mapped
        assert file.tensor_bytes(name) is not None and file.tensor_bytes(name).base is file.tensor_bytes(name).base
        assert file.legacy["output_norm.weight"].mapped  # F32 stays in place


def test_gqa_from_the_shapes_and_k_quants_in_ggjt_v3(tmp_path):
    tiny = Tiny(tmp_path, "ggjt", 3, QT.Q4_K, QT.Q6_K, n_embd=256, n_head=4, n_head_kv=2, n_mult=256, seed=4)
    with GGUFFile(tiny.path) as file:
        assert file.metadata["llama.attention.head_count_kv"] == 2
        assert file.metadata["llama.feed_forward_length"] == 768
        assert file.tensors["output.weight"].ggml_type == QT.Q6_K
    np.testing.assert_array_equal(logits(tiny.path), logits(tiny.reference))
    with pytest.raises(HalfbyteError, match="--gqa 4 disagrees with the tensors"):
        LegacyGGMLFile(tiny.path, LegacyOptions(gqa=4))
    with LegacyGGMLFile(tiny.path, LegacyOptions(gqa=2, eps=1e-5, n_ctx=4096)) as file:
        assert file.metadata["llama.attention.head_count_kv"] == 2
        assert file.metadata["llama.context_length"] == 4096


def test_config_directory_fills_what_the_file_lacks(built, tmp_path):
    import json

    tiny = built("ggjt2-q5_1")
    (tmp_path / "config.json").write_text(json.dumps({
        "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 4,
        "intermediate_size": 192, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 500000.0}))
    with LegacyGGMLFile(tiny.path, LegacyOptions(config_dir=tmp_path)) as file:
        md = file.metadata
        assert md["llama.context_length"] == 4096
        assert md["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
        assert md["llama.rope.freq_base"] == 500000.0
    with LegacyGGMLFile(tiny.path, LegacyOptions(config_dir=tmp_path, eps=2e-6)) as file:
        assert file.metadata["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(2e-6)  # the flag wins
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 128}))
    with pytest.raises(HalfbyteError, match="hidden_size|n_embd 128"):
        LegacyGGMLFile(tiny.path, LegacyOptions(config_dir=tmp_path))


def test_old_float32_scales_become_fp16_and_q4_2_becomes_f16(tmp_path):
    """Blocks made by 2023's quantizers (not from today's): Q4_0 with a float32 scale fp16 cannot hold
    keeps its codes and gets the scale rounded to fp16; Q4_2 and Q4_3 (16-element blocks) become F16."""
    rng = np.random.default_rng(7)
    n_embd, n_layer = 64, 1
    base = Tiny(tmp_path, "ggjt", 1, QT.Q4_0, n_embd=n_embd, n_layer=n_layer, seed=7)
    records, expected = [], {}
    for name, shape in shapes(300, n_embd, 4, 4, base.n_ff, n_layer).items():
        values = (0.08 * rng.standard_normal(shape)).astype(np.float32)
        if len(shape) == 1:
            records.append((name, tuple(reversed(shape)), 0, (1 + values).tobytes()))
            expected[gguf_tensor_name(name)] = (QT.F32, (1 + values).tobytes())
        elif name.startswith("layers.0.attention"):  # Q4_0 as 2023's quantize_row_q4_0_reference
            blocks = values.reshape(-1, 32)
            d = blocks[np.arange(len(blocks)), np.abs(blocks).argmax(axis=1)] / np.float32(-8)
            inv = np.where(d == 0, 0, 1 / np.where(d == 0, 1, d)).astype(np.float32)
            codes = np.minimum(15, np.floor(blocks * inv[:, None] + np.float32(8.5))).astype(np.uint8)
            legacy = np.concatenate([d.astype("<f4").view(np.uint8).reshape(-1, 4), _interleave(codes)], axis=1)
            records.append((name, tuple(reversed(shape)), 2, legacy.tobytes()))
            today = np.concatenate([d.astype("<f2").view(np.uint8).reshape(-1, 2),
                                    codes[:, :16] | (codes[:, 16:] << 4)], axis=1)
            expected[gguf_tensor_name(name)] = (QT.Q4_0, today.tobytes())
        elif name.startswith("layers.0.feed_forward"):  # Q4_3: 16 elements, fp16 scale and min
            blocks = values.reshape(-1, 16)
            low, high = blocks.min(axis=1), blocks.max(axis=1)
            d, m = ((high - low) / 15).astype(np.float16), low.astype(np.float16)
            d32, m32 = d.astype(np.float32), m.astype(np.float32)
            codes = np.clip(np.round((blocks - m32[:, None]) / d32[:, None]), 0, 15).astype(np.uint8)
            legacy = np.concatenate([d.view(np.uint8).reshape(-1, 2), m.view(np.uint8).reshape(-1, 2),
                                     _interleave(codes)], axis=1)
            records.append((name, tuple(reversed(shape)), 5, legacy.tobytes()))
            dequantized = (codes.astype(np.float32) * d32[:, None] + m32[:, None]).astype(np.float16)
            expected[gguf_tensor_name(name)] = (QT.F16, dequantized.tobytes())
        else:  # Q4_2: 16 elements, fp16 scale, interleaved nibbles
            blocks = values.reshape(-1, 16)
            d = (blocks[np.arange(len(blocks)), np.abs(blocks).argmax(axis=1)] / np.float32(-8)).astype(np.float16)
            d32 = d.astype(np.float32)
            codes = np.clip(np.round(blocks / np.where(d32 == 0, 1, d32)[:, None]) + 8, 0, 15).astype(np.uint8)
            legacy = np.concatenate([d.view(np.uint8).reshape(-1, 2), _interleave(codes)], axis=1)
            records.append((name, tuple(reversed(shape)), 4, legacy.tobytes()))
            dequantized = ((codes.astype(np.float32) - 8) * d32[:, None]).astype(np.float16)
            expected[gguf_tensor_name(name)] = (QT.F16, dequantized.tobytes())
    path = write_legacy(tmp_path / "ggml-model-q4_2.bin", "ggjt", 1, dict(base.hp, ftype=5), base.vocab, records)
    with GGUFFile(path) as file:
        assert file.metadata["general.file_type"] == 1
        for name, (qtype, data) in expected.items():
            assert file.tensors[name].ggml_type == qtype
            assert file.tensor_bytes(name).tobytes() == data, name


# -- info and convert --------------------------------------------------------------------------------


def test_info_shows_the_format(built):
    tiny = built("ggjt1-q5_0")
    result = CliRunner().invoke(main, ["info", str(tiny.path)])
    assert result.exit_code == 0, result.output
    assert "format:       ggjt v1 (a 2023 GGML file" in result.output
    assert "architecture: llama" in result.output
    assert "blk.1.ffn_down.weight" in result.output and "Q5_0" in result.output
    old = built("ggml-q4_0")
    result = CliRunner().invoke(main, ["info", str(old.path)])
    assert result.exit_code == 0 and "ggml (unversioned)" in result.output


@pytest.mark.parametrize("case", ["ggml-q4_0", "ggmf-q4_1", "ggjt1-q5_1", "ggjt2-q4_0", "ggjt3-q4_1"])
def test_convert_writes_the_reference_tensors(built, tmp_path, case):
    tiny = built(case)
    out = tmp_path / "out.gguf"
    result = CliRunner().invoke(main, ["convert", str(tiny.path), "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    with GGUFFile(out) as converted, GGUFFile(tiny.reference) as reference:
        assert type(converted) is GGUFFile
        assert list(converted.tensors) == list(reference.tensors)
        for name, info in reference.tensors.items():
            ours = converted.tensors[name]
            assert (ours.ggml_type, ours.shape) == (info.ggml_type, info.shape)
            assert converted.tensor_bytes(name).tobytes() == reference.tensor_bytes(name).tobytes(), name
        assert converted.metadata["general.description"].startswith("converted from legacy")
        for key in ("tokenizer.ggml.tokens", "llama.feed_forward_length", "llama.context_length"):
            assert np.array_equal(converted.metadata[key], reference.metadata[key])
    np.testing.assert_array_equal(logits(out), logits(tiny.reference))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.gguf"]


def test_convert_options(built, tmp_path):
    tiny = built("ggjt3-q5_0")
    out = tmp_path / "llama2.gguf"
    result = CliRunner().invoke(main, ["convert", str(tiny.path), "-o", str(out), "--eps", "1e-5", "-c", "4096",
                                       "--gqa", "1", "-q"])
    assert result.exit_code == 0, result.output
    with GGUFFile(out) as file:
        assert file.metadata["llama.context_length"] == 4096
        assert file.metadata["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    result = CliRunner().invoke(main, ["convert", str(tiny.path), "-o", str(tmp_path / "x.gguf"), "--q8_0"])
    assert result.exit_code == 1 and "own tensor types" in result.output
    result = CliRunner().invoke(main, ["convert", str(tiny.path), "-o", str(tmp_path / "y.gguf"), "--gqa", "3"])
    assert result.exit_code == 1 and "--gqa 3" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama2.gguf"]
    here = os.getcwd()
    os.chdir(tmp_path)
    try:
        result = CliRunner().invoke(main, ["convert", str(tiny.path), "-q"])
    finally:
        os.chdir(here)
    assert result.exit_code == 0, result.output
    assert (tmp_path / (tiny.path.stem + ".gguf")).is_file()


def test_run_a_legacy_file(built):
    tiny = built("ggjt3-q4_0")
    result = CliRunner().invoke(main, ["run", str(tiny.path), "-p", " w1 w2", "-n", "4", "--temp", "0", "-t", "1"])
    assert result.exit_code == 0, result.output


# -- bad input -------------------------------------------------------------------------------------


def _good(tmp_path: Path, fmt: str = "ggjt", version: int = 3) -> bytes:
    return Tiny(tmp_path, fmt, version, QT.Q4_0, n_vocab=270, n_layer=1).path.read_bytes()


def _tensor_start(data: bytes, name: bytes) -> int:
    """Offset of the record (n_dims u32) of the tensor called ``name``."""
    at = data.index(name)
    length_at = at - 4 * 3  # 2-D: n_dims, name length, type, ne0, ne1, name
    return length_at - 8


def _hp(fmt: str = "ggjt", version: int = 3, **values) -> bytes:
    hp = dict(n_vocab=3, n_embd=64, n_mult=32, n_head=4, n_layer=1, n_rot=16, ftype=2) | values
    head = struct.pack("<I", MAGICS[fmt]) + (struct.pack("<I", version) if fmt != "ggml" else b"")
    return head + struct.pack("<7I", *hp.values())


def _record(name: bytes, ne: list[int], type_id: int = 0, n_dims: int | None = None,
            name_length: int | None = None) -> bytes:
    return struct.pack(f"<3I{len(ne)}I", len(ne) if n_dims is None else n_dims,
                       len(name) if name_length is None else name_length, type_id, *ne) + name


VOCAB3 = b"".join(struct.pack("<I", 1) + b"a" + struct.pack("<f", 0.0) for _ in range(3))
PAD = b"\0" * 32


def bad_files(tmp_path: Path) -> dict[str, tuple[bytes, str]]:
    good = _good(tmp_path)
    q_at = _tensor_start(good, b"layers.0.attention.wq.weight")
    return {
        "truncated-in-tensor-data": (good[: len(good) - 100], "runs past the end of the file"),
        "truncated-at-a-tensor": (good[:q_at], "missing tensor"),
        "truncated-in-vocabulary": (good[:2300], "truncated vocabulary"),
        "vocabulary-too-big-for-the-file": (good[:200], "vocabulary size 270 is impossible"),
        "truncated-header": (good[:20], "truncated"),
        "absurd-n-vocab": (_hp(n_vocab=0xFFFFFFFF) + VOCAB3, "vocabulary size 4294967295 is impossible"),
        "zero-n-embd": (_hp(n_embd=0) + VOCAB3, "not a LLaMA-family GGML file either"),
        "unknown-ftype": (_hp(ftype=99) + VOCAB3, "unknown ftype 99"),
        "n-dims-5": (_hp() + VOCAB3 + _record(b"tok_embeddings.weight", [64, 3, 1, 1, 1]) + PAD, "5 dimensions"),
        "n-dims-0": (_hp() + VOCAB3 + _record(b"norm.weight", [], n_dims=0) + PAD, "0 dimensions"),
        "dims-overflow": (_hp() + VOCAB3 + _record(b"tok_embeddings.weight", [0xFFFFFFFF, 0xFFFFFFFF]) + PAD,
                          "runs past the end of the file"),
        "name-length-absurd": (_hp() + VOCAB3 + _record(b"norm.weight", [64], name_length=1 << 30) + PAD,
                               "absurd name length"),
        "name-runs-past-end": (_hp() + VOCAB3 + _record(b"norm", [64], name_length=4000), "truncated"),
        "unknown-type": (_hp() + VOCAB3 + _record(b"norm.weight", [64], type_id=99) + PAD, "type 99, unknown"),
        "q4_2-in-ggjt-v3": (_hp() + VOCAB3 + _record(b"norm.weight", [64], type_id=4) + PAD, "type 4, unknown"),
        "q5_0-in-ggmf": (_hp("ggmf", 1) + VOCAB3 + _record(b"norm.weight", [64], type_id=6) + PAD, "type 6"),
        "not-a-llama-tensor": (_hp() + VOCAB3 + _record(b"wte.weight", [64]) + PAD, "not a LLaMA tensor"),
        "layer-past-n-layer": (_hp() + VOCAB3 + _record(b"layers.5.ffn_norm.weight", [64]) + PAD,
                               "not a LLaMA tensor"),
        "row-not-whole-blocks": (_hp() + VOCAB3 + _record(b"norm.weight", [48], type_id=2) + PAD,
                                 "not a multiple of the Q4_0 block size"),
        "token-length-absurd": (_hp() + struct.pack("<I", 1 << 31) + b"a" * 40, "absurd length"),
        "ggjt-version-4": (_hp(version=4), "unknown ggjt version 4"),
        "ggmf-version-2": (_hp("ggmf", 2), "unknown ggmf version 2"),
        "rwkv": (_hp("ggmf", 101), "RWKV"),
        "lora-adapter": (b"algg" + struct.pack("<I", 1) + b"\0" * 64, "LoRA adapter"),
        "session-file": (b"nsgg" + struct.pack("<I", 1) + b"\0" * 64, "session file"),
        "no-tensors": (_hp() + VOCAB3, "has no tensors"),
        "multi-part": (_hp("ggmf", 1, n_vocab=3, n_embd=128) + VOCAB3 + _record(b"tok_embeddings.weight", [64, 3])
                       + b"\0" * 768, "part 1 of a 2-part GGML model"),
    }


def foreign_files() -> dict[str, tuple[bytes, str]]:
    """GGML files of the ggml repo's examples: hyper-parameters, then `n_vocab` (GPT-J, GPT-NeoX) and the
    tokens without scores, then tensors under their own names."""
    def words(n):
        return b"".join(struct.pack("<I", 2) + f"t{i}".encode() for i in range(n))

    def tensors(*names):
        return b"".join(_record(n.encode(), [8, 4]) + b"\0" * 128 for n in names)

    gptj = (struct.pack("<I7i", MAGICS["ggml"], 4, 2048, 8, 2, 1, 4, 2002) + struct.pack("<i", 4) + words(4)
            + tensors("transformer.wte.weight", "transformer.h.0.ln_1.weight"))
    neox = (struct.pack("<I8i", MAGICS["ggml"], 4, 2048, 8, 2, 1, 4, 1, 2001) + struct.pack("<i", 4) + words(4)
            + tensors("gpt_neox.embed_in.weight"))
    mpt = (struct.pack("<I5i2fi", MAGICS["ggml"], 8, 2048, 2, 1, 4, 8.0, 0.0, 1) + words(4)
           + tensors("transformer.wte.weight", "transformer.blocks.0.norm_1.weight"))
    gpt2 = (struct.pack("<I6i", MAGICS["ggml"], 4, 1024, 8, 2, 1, 1) + struct.pack("<i", 4) + words(4)
            + tensors("model/ln_f/g", "model/wte"))
    return {"gpt-j": (gptj, "GPT-J"), "gpt-neox": (neox, "GPT-NeoX"), "mpt": (mpt, "MPT"),
            "gpt-2": (gpt2, "GPT-2")}


def _check_one_line(message: str, path: Path, fragment: str) -> None:
    assert message.startswith(f"{path}: "), message
    assert "\n" not in message and fragment in message, message


def test_bad_files_give_one_line_errors_naming_the_file(tmp_path):
    for case, (content, fragment) in (bad_files(tmp_path) | foreign_files()).items():
        path = tmp_path / f"{case}.bin"
        path.write_bytes(content)
        assert is_legacy_ggml(path), case
        with pytest.raises(HalfbyteError) as error:
            GGUFFile(path)
        _check_one_line(str(error.value), path, fragment)


def test_foreign_ggml_files_are_named(tmp_path):
    for case, (content, fragment) in foreign_files().items():
        path = tmp_path / f"{case}.bin"
        path.write_bytes(content)
        with pytest.raises(HalfbyteError, match=f": {fragment}.* model in the ggml examples' GGML format, not "
                                                "LLaMA-family"):
            GGUFFile(path)


def test_bad_files_through_the_cli_leave_no_output(tmp_path):
    (tmp_path / "src").mkdir()
    cases = bad_files(tmp_path / "src")
    for case in ("truncated-in-tensor-data", "unknown-type", "absurd-n-vocab"):
        content, fragment = cases[case]
        path = tmp_path / f"{case}.bin"
        path.write_bytes(content)
        for args in (["info", str(path)], ["run", str(path), "-p", "hi", "-n", "1"],
                     ["convert", str(path), "-o", str(tmp_path / "out.gguf"), "-q"]):
            result = CliRunner().invoke(main, args)
            assert result.exit_code == 1, (case, args, result.output)
            lines = result.output.strip().splitlines()
            assert len(lines) == 1 and fragment in lines[0] and str(path) in lines[0], result.output
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == sorted(
        f"{case}.bin" for case in ("truncated-in-tensor-data", "unknown-type", "absurd-n-vocab"))


def test_float32_scale_beyond_fp16_is_an_error_naming_the_tensor(tmp_path):
    tiny = Tiny(tmp_path, "ggjt", 2, QT.Q4_0, n_layer=1)
    data = bytearray(tiny.path.read_bytes())
    at = _tensor_start(bytes(data), b"layers.0.attention.wq.weight")
    start = at + 4 * 5 + len(b"layers.0.attention.wq.weight")
    start += -start % 32
    data[start : start + 4] = struct.pack("<f", 1e6)
    tiny.path.write_bytes(bytes(data))
    with GGUFFile(tiny.path) as file, pytest.raises(HalfbyteError, match="'layers.0.attention.wq.weight'.*fp16"):
        file.tensor_bytes("blk.0.attn_q.weight")


def test_gguf_and_missing_files_are_not_legacy(tmp_path, built):
    assert not is_legacy_ggml(tmp_path / "missing.bin")
    assert not is_legacy_ggml(tmp_path)
    assert not is_legacy_ggml(built("ggjt3-q4_0").reference)
    assert type(GGUFFile(built("ggjt3-q4_0").reference)) is GGUFFile


# -- llama.cpp's converter ----------------------------------------------------------------------------

# What convert_llama_ggml_to_gguf.py converts: unquantized files of every version, ggjt v2's Q5_0/Q5_1
# (today's blocks already), every ggjt v3 type.
CONVERTIBLE = ["ggml-f16", "ggmf-f32", "ggjt3-f32", "ggjt3-q4_0", "ggjt3-q4_1", "ggjt3-q5_0"]


@pytest.mark.skipif(not LLAMA_CPP, reason="set HALFBYTE_LLAMA_CPP to a llama.cpp checkout to run")
@pytest.mark.parametrize("case", CONVERTIBLE + ["ggjt2-q5-only"])
def test_llama_cpp_converter_writes_the_same_tensors_and_metadata(built, tmp_path, case):
    if case == "ggjt2-q5-only":
        tiny = Tiny(tmp_path, "ggjt", 2, QT.Q5_0, QT.Q5_1)
    else:
        tiny = built(case)
    theirs, ours = tmp_path / "theirs.gguf", tmp_path / "ours.gguf"
    script = Path(LLAMA_CPP) / "convert_llama_ggml_to_gguf.py"
    # The script hands gguf-py's add_tensor element shapes, where today's gguf-py takes the byte shape of a
    # raw tensor, so it fails on every file ("Quantized tensor bytes per row ... is not a multiple of ...",
    # llama.cpp issue #11976): run it with that one argument given in bytes.
    shim = tmp_path / "run_converter.py"
    shim.write_text(textwrap.dedent(f"""
        import runpy, sys
        sys.path.insert(1, {str(Path(LLAMA_CPP) / "gguf-py")!r})
        import gguf
        add_tensor = gguf.GGUFWriter.add_tensor
        def in_bytes(self, name, tensor, raw_shape=None, raw_dtype=None):
            block, size = gguf.GGML_QUANT_SIZES[raw_dtype]
            raw_shape = [*raw_shape[:-1], raw_shape[-1] // block * size]
            return add_tensor(self, name, tensor, raw_shape=raw_shape, raw_dtype=raw_dtype)
        gguf.GGUFWriter.add_tensor = in_bytes
        sys.argv = [{str(script)!r}, "--input", {str(tiny.path)!r}, "--output", {str(theirs)!r}]
        runpy.run_path({str(script)!r}, run_name="__main__")
    """))
    subprocess.run([sys.executable, str(shim)], check=True, capture_output=True)
    result = CliRunner().invoke(main, ["convert", str(tiny.path), "-o", str(ours), "-q"])
    assert result.exit_code == 0, result.output
    with GGUFFile(theirs) as a, GGUFFile(ours) as b:
        assert list(a.tensors) == list(b.tensors)
        for name, info in a.tensors.items():
            assert (info.ggml_type, info.shape) == (b.tensors[name].ggml_type, b.tensors[name].shape), name
            assert a.tensor_bytes(name).tobytes() == b.tensor_bytes(name).tobytes(), name
        for key, value in a.metadata.items():
            assert key in b.metadata, key
            assert np.array_equal(np.asarray(value), np.asarray(b.metadata[key])), key
            assert a.value_types[key] == b.value_types[key], key
        assert set(b.metadata) - set(a.metadata) == {"general.quantization_version"}
    np.testing.assert_array_equal(logits(theirs), logits(ours))
