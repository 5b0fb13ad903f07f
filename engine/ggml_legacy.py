"""2023's GGML model files (LLaMA family), read as the GGUF they convert to.

Before GGUF (August 2023), llama.cpp wrote ``ggml-model-*.bin`` files in three formats, told apart
by a little-endian u32 magic (bytes ``lmgg`` / ``fmgg`` / ``tjgg`` on disk):

    'ggml'  unversioned (March 2023)    no version field, vocabulary without scores
    'ggmf'  version 1 (llama.cpp #252)  + a u32 version, a float32 score per token
    'ggjt'  versions 1, 2, 3 (#613)     + tensor data aligned to 32 bytes, so it can be memory-mapped

    magic u32 | [version u32] | n_vocab, n_embd, n_mult, n_head, n_layer, n_rot, ftype (u32 each)
    n_vocab x (length u32, UTF-8 bytes, [score f32])
    tensors until the end of the file:
        n_dims u32, name length u32, ggml type u32, ne[n_dims] u32, name, [padding to 32: ggjt], data

The tensor data layouts changed twice while the container stayed (llama.cpp's own loader, and
``convert_llama_ggml_to_gguf.py``, which converts only the layouts that equal today's):

* up to ggjt v1 (ggml, ggmf, ggjt v1): Q4_0 ``{f32 d; u8 qs[16]}`` and Q4_1 ``{f32 d, m; u8 qs[16]}``
  with the nibbles interleaved: byte k holds elements 2k (low) and 2k+1 (high); Q5_0
  ``{f16 d; u8 qh[4]; u8 qs[16]}`` and Q5_1 ``{f16 d, m; qh; qs}`` interleaved the same way, bit i of
  qh the fifth bit of element i; Q8_0 ``{f32 d; i8 qs[32]}``; Q4_2 (16 elements, ``{f16 d; qs[8]}``)
  and Q4_3 (16 elements, ``{f16 d, m; qs[8]}``), both removed in May 2023.
* ggjt v2 (llama.cpp #1405): today's nibble order (byte j holds element j low, j+16 high; qh
  unchanged) for Q4_0, Q4_1, Q5_0, Q5_1, so Q5_0/Q5_1 are today's blocks; Q4_0/Q4_1/Q8_0 still
  have float32 scales.
* ggjt v3 (llama.cpp #1508): Q4_0/Q4_1/Q8_0 scales in fp16: every block is today's, K-quants too.

``LegacyGGMLFile`` presents such a file through ``GGUFFile``'s interface (``metadata`` with
``general.*``, ``llama.*`` and ``tokenizer.ggml.*`` keys as llama.cpp's converter writes them,
``tensors`` under GGUF names, ``tensor_bytes``...), so ``Model.load``, ``halfbyte run`` and
``halfbyte info`` take it as they take a GGUF (``GGUFFile(path)`` opens one through this class when
the magic says so). Tensors already in today's layout are used in place from the memory map;
the others are re-laid into today's blocks on first use (held in memory): the nibbles are moved
losslessly; float32 scales become fp16 (as llama.cpp's v3 requantization made them: a relative
change of at most 2^-11 per block, none for scales that fp16 holds exactly); Q4_2/Q4_3 have no
block type today and become F16. ``convert_ggml`` writes the GGUF itself.

What these files lack is filled in as llama.cpp's converter does: context length 2048, RMS norm
epsilon 5e-6 (``--eps 1e-5`` for LLaMA-2, 1e-6 for LLaMA-1), rotary dims n_embd / n_head; the KV
heads and the feed-forward size come from the tensor shapes (a 70B file needs no ``--gqa``), the
FFN size from n_mult only without them. ``LegacyOptions`` (or an HF ``config.json`` /
Meta ``params.json`` directory) overrides these.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from engine.errors import HalfbyteError, file_error
from engine.gguf_file import _TENSOR_DTYPES, GGUFFile, GGUFWriter, TensorInfo, _Cursor, tensor_nbytes

QT = GGMLQuantizationType
VT = GGUFValueType

# The u32 magics as their bytes on disk (little-endian).
MAGIC_GGML, MAGIC_GGMF, MAGIC_GGJT = b"lmgg", b"fmgg", b"tjgg"
# Other 2023 ggml containers that are not models halfbyte reads: named in the error.
OTHER_MAGICS = {
    b"algg": "a llama.cpp LoRA adapter in 2023's GGML format ('ggla'), not a model (convert the PEFT "
             "adapter with `halfbyte convert ADAPTER --base BASE`)",
    b"nsgg": "a llama.cpp session file ('ggsn'), not a model",
    b"ccgg": "a Falcon model in ggllm.cpp's 'ggcc' format, not a LLaMA-family GGML file",
}
LEGACY_MAGICS = frozenset({MAGIC_GGML, MAGIC_GGMF, MAGIC_GGJT, *OTHER_MAGICS})

DEFAULT_CONTEXT = 2048  # llama.cpp's convert_llama_ggml_to_gguf.py --context-length default
DEFAULT_EPS = 5e-6  # its --eps default
MAX_NAME_LENGTH = 4096  # its "absurd tensor name length" bound
MAX_TOKEN_LENGTH = 1 << 16
ALIGNMENT = 32  # ggjt pads tensor data to 32 bytes; also what a mapped tensor needs here
_CHUNK_BLOCKS = 1 << 18

# llama.cpp's llama_ftype numbers (the header's ftype) by name, as its converter names them.
FTYPE_NAMES = {
    0: "ALL_F32", 1: "MOSTLY_F16", 2: "MOSTLY_Q4_0", 3: "MOSTLY_Q4_1", 4: "MOSTLY_Q4_1_SOME_F16",
    5: "MOSTLY_Q4_2", 6: "MOSTLY_Q4_3", 7: "MOSTLY_Q8_0", 8: "MOSTLY_Q5_0", 9: "MOSTLY_Q5_1",
    10: "MOSTLY_Q2_K", 11: "MOSTLY_Q3_K_S", 12: "MOSTLY_Q3_K_M", 13: "MOSTLY_Q3_K_L", 14: "MOSTLY_Q4_K_S",
    15: "MOSTLY_Q4_K_M", 16: "MOSTLY_Q5_K_S", 17: "MOSTLY_Q5_K_M", 18: "MOSTLY_Q6_K",
}


# -- block re-layouts: (n_blocks, legacy bytes) uint8 -> (n_blocks, today's bytes) uint8 --------------


class _ScaleOverflow(ValueError):
    pass


def _f32_scales_to_f16(raw: np.ndarray) -> np.ndarray:
    """(n, 4) float32 bytes -> (n, 2) fp16 bytes (round to nearest even, as ggml's conversion)."""
    values = np.ascontiguousarray(raw).view("<f4").reshape(-1)
    with np.errstate(over="ignore"):
        half = values.astype("<f2")
    if not np.isfinite(half[np.isfinite(values)]).all():
        raise _ScaleOverflow("a float32 block scale is beyond fp16's range")
    return half.view(np.uint8).reshape(-1, 2)


def _split_nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, 16) bytes, element 2k in byte k's low nibble and 2k+1 in its high one -> today's order,
    element j (j < 16) in byte j's low nibble and element j + 16 in its high one."""
    q = np.empty((qs.shape[0], 32), np.uint8)
    q[:, 0::2] = qs & 0x0F
    q[:, 1::2] = qs >> 4
    return q[:, :16] | (q[:, 16:] << 4)


def _interleaved_values(qs: np.ndarray) -> np.ndarray:
    """(n, 8) bytes of interleaved nibbles -> (n, 16) float32 codes 0..15 in element order."""
    q = np.empty((qs.shape[0], 16), np.float32)
    q[:, 0::2] = qs & 0x0F
    q[:, 1::2] = qs >> 4
    return q


def _f16(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view("<f2").astype(np.float32)


def _q4_0_old(b: np.ndarray) -> np.ndarray:  # {f32 d; qs[16] interleaved} -> {f16 d; qs[16]}
    return np.concatenate([_f32_scales_to_f16(b[:, 0:4]), _split_nibbles(b[:, 4:20])], axis=1)


def _q4_0_v2(b: np.ndarray) -> np.ndarray:  # {f32 d; qs[16]}
    return np.concatenate([_f32_scales_to_f16(b[:, 0:4]), b[:, 4:20]], axis=1)


def _q4_1_old(b: np.ndarray) -> np.ndarray:  # {f32 d, m; qs[16] interleaved} -> {f16 d, m; qs[16]}
    return np.concatenate([_f32_scales_to_f16(b[:, 0:4]), _f32_scales_to_f16(b[:, 4:8]),
                           _split_nibbles(b[:, 8:24])], axis=1)


def _q4_1_v2(b: np.ndarray) -> np.ndarray:
    return np.concatenate([_f32_scales_to_f16(b[:, 0:4]), _f32_scales_to_f16(b[:, 4:8]), b[:, 8:24]], axis=1)


def _q5_0_old(b: np.ndarray) -> np.ndarray:  # {f16 d; qh[4]; qs[16] interleaved}: qh is kept
    return np.concatenate([b[:, 0:6], _split_nibbles(b[:, 6:22])], axis=1)


def _q5_1_old(b: np.ndarray) -> np.ndarray:  # {f16 d, m; qh[4]; qs[16] interleaved}
    return np.concatenate([b[:, 0:8], _split_nibbles(b[:, 8:24])], axis=1)


def _q8_0_f32(b: np.ndarray) -> np.ndarray:  # {f32 d; i8 qs[32]} -> {f16 d; qs[32]}
    return np.concatenate([_f32_scales_to_f16(b[:, 0:4]), b[:, 4:36]], axis=1)


def _q4_2(b: np.ndarray) -> np.ndarray:  # 16 elements {f16 d; qs[8] interleaved}: (q - 8) * d, as F16
    values = (_interleaved_values(b[:, 2:10]) - 8.0) * _f16(b[:, 0:2])
    with np.errstate(over="ignore"):
        return values.astype("<f2").view(np.uint8)


def _q4_3(b: np.ndarray) -> np.ndarray:  # 16 elements {f16 d, m; qs[8] interleaved}: q * d + m, as F16
    values = _interleaved_values(b[:, 4:12]) * _f16(b[:, 0:2]) + _f16(b[:, 2:4])
    with np.errstate(over="ignore"):
        return values.astype("<f2").view(np.uint8)


def _copy(b: np.ndarray) -> np.ndarray:
    return b


@dataclass(frozen=True)
class LegacyType:
    """One tensor type as a given file version stores it, and what it becomes."""

    name: str
    block: int  # elements per block
    nbytes: int  # bytes per block in the file
    target: GGMLQuantizationType  # today's type it is read as
    relayout: Callable[[np.ndarray], np.ndarray] | None  # None: the bytes are today's already


def _today(qtype: GGMLQuantizationType) -> LegacyType:
    block, nbytes = GGML_QUANT_SIZES[qtype]
    return LegacyType(qtype.name, block, nbytes, qtype, None)


_OLD = {  # ggml, ggmf v1 (types 0-3) and ggjt v1 (all): the pre-#1405 layouts
    0: _today(QT.F32),
    1: _today(QT.F16),
    2: LegacyType("Q4_0 (interleaved nibbles, float32 scale)", 32, 20, QT.Q4_0, _q4_0_old),
    3: LegacyType("Q4_1 (interleaved nibbles, float32 scale and min)", 32, 24, QT.Q4_1, _q4_1_old),
    4: LegacyType("Q4_2 (removed in May 2023)", 16, 10, QT.F16, _q4_2),
    5: LegacyType("Q4_3 (removed in April 2023)", 16, 12, QT.F16, _q4_3),
    6: LegacyType("Q5_0 (interleaved nibbles)", 32, 22, QT.Q5_0, _q5_0_old),
    7: LegacyType("Q5_1 (interleaved nibbles)", 32, 24, QT.Q5_1, _q5_1_old),
    8: LegacyType("Q8_0 (float32 scale)", 32, 36, QT.Q8_0, _q8_0_f32),
}
_V2 = {  # ggjt v2: today's nibble order; Q4_0/Q4_1/Q8_0 keep float32 scales (Q4_2/Q4_3 were gone)
    0: _today(QT.F32),
    1: _today(QT.F16),
    2: LegacyType("Q4_0 (float32 scale)", 32, 20, QT.Q4_0, _q4_0_v2),
    3: LegacyType("Q4_1 (float32 scale and min)", 32, 24, QT.Q4_1, _q4_1_v2),
    6: _today(QT.Q5_0),
    7: _today(QT.Q5_1),
    8: _OLD[8],  # still {f32 d; i8 qs[32]}
}
_V3 = {int(t): _today(t) for t in (QT.F32, QT.F16, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0,
                                   QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K)}


def _types_for(fmt: str, version: int) -> dict[int, LegacyType]:
    if fmt == "ggjt":
        return {1: _OLD, 2: _V2, 3: _V3}[version]
    return {k: v for k, v in _OLD.items() if k <= 3}  # ggml / ggmf: F32, F16, Q4_0, Q4_1 only


# -- names ---------------------------------------------------------------------------------------------

_GLOBAL_NAMES = {"tok_embeddings": "token_embd", "norm": "output_norm", "output": "output"}
_LAYER_NAMES = {
    "attention.wq": "attn_q", "attention.wk": "attn_k", "attention.wv": "attn_v", "attention.wo": "attn_output",
    "attention_norm": "attn_norm", "ffn_norm": "ffn_norm",
    "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down", "feed_forward.w3": "ffn_up",
}
_LAYER_RE = re.compile(r"layers\.(\d+)\.(.+)\.weight")


def gguf_name(name: str, n_layer: int) -> str | None:
    """The GGUF name of a LLaMA GGML tensor (Meta's checkpoint names), as llama.cpp's converter maps it."""
    if name.endswith(".weight") and name[: -len(".weight")] in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name[: -len(".weight")]] + ".weight"
    match = _LAYER_RE.fullmatch(name)
    if match and match.group(2) in _LAYER_NAMES and int(match.group(1)) < n_layer and match.group(1) == str(
            int(match.group(1))):
        return f"blk.{int(match.group(1))}.{_LAYER_NAMES[match.group(2)]}.weight"
    return None


def required_names(n_layer: int) -> list[str]:
    names = ["tok_embeddings.weight", "norm.weight", "output.weight"]
    for i in range(n_layer):
        names += [f"layers.{i}.{part}.weight" for part in _LAYER_NAMES]
    return names


# GGML files of other models (the ggml repo's examples and their forks), told by their tensor names.
_FOREIGN_SIGNATURES = (
    (b"gpt_neox.embed_in", "GPT-NeoX (Pythia, Dolly v2, RedPajama, StableLM-alpha)"),
    (b"transformer.word_embeddings", "Falcon"),
    (b"word_embeddings_layernorm", "BLOOM"),
    (b"transformer.blocks.0.norm_1", "MPT"),
    (b"transformer.blocks.0.", "Replit"),
    (b"transformer.h.0.attn.q_proj", "GPT-J"),
    (b"transformer.wte", "GPT-J"),
    (b"model/h0/", "GPT-2 / StarCoder / Cerebras-GPT"),
    (b"model/wte", "GPT-2 / StarCoder / Cerebras-GPT"),
    (b"encoder.conv1", "Whisper (whisper.cpp)"),
    (b"blocks.0.att.", "RWKV (rwkv.cpp)"),
)


def _identify_foreign(buf: Any, size: int) -> str | None:
    """The model of a GGML file whose first 32 MiB (hyper-parameters, vocabulary, first tensors) name its
    tensors as one of ``_FOREIGN_SIGNATURES``; searched in the map, nothing copied."""
    for signature, name in _FOREIGN_SIGNATURES:
        if buf.find(signature, 0, min(size, 32 << 20)) >= 0:
            return name
    return None


# -- options -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LegacyOptions:
    """What 2023 GGML files do not say, as llama.cpp's converter takes it (None: the default / the file).

    ``n_ctx``: training context (2048); ``eps``: RMS norm epsilon (5e-6); ``gqa``: n_head / n_head_kv
    (from the K/V shapes); ``config_dir``: a directory with an HF ``config.json`` or Meta ``params.json``
    whose values fill the ones not given here."""

    n_ctx: int | None = None
    eps: float | None = None
    gqa: int | None = None
    config_dir: str | os.PathLike | None = None

    def __post_init__(self) -> None:
        if self.n_ctx is not None and (isinstance(self.n_ctx, bool) or not isinstance(self.n_ctx, int)
                                       or self.n_ctx < 1):
            raise HalfbyteError(f"context length must be a positive integer, got {self.n_ctx!r}")
        if self.eps is not None and (isinstance(self.eps, bool) or not isinstance(self.eps, (int, float))
                                     or not math.isfinite(self.eps) or self.eps <= 0):
            raise HalfbyteError(f"--eps must be a positive number, got {self.eps!r}")
        if self.gqa is not None and (isinstance(self.gqa, bool) or not isinstance(self.gqa, int) or self.gqa < 1):
            raise HalfbyteError(f"--gqa must be a positive integer, got {self.gqa!r}")


def _read_config(directory: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """(file, values) from an HF config.json or a Meta params.json, in llama.cpp's terms."""
    base = Path(directory)
    if not base.is_dir():
        raise file_error(base, "is not a directory (--config takes the directory of config.json or params.json)")
    for name, keys in (
        ("config.json", {"n_ctx": "max_position_embeddings", "eps": "rms_norm_eps", "n_head_kv": "num_key_value_heads",
                         "n_embd": "hidden_size", "n_head": "num_attention_heads", "n_layer": "num_hidden_layers",
                         "n_ff": "intermediate_size", "rope_theta": "rope_theta"}),
        ("params.json", {"eps": "norm_eps", "n_head_kv": "n_kv_heads", "n_embd": "dim", "n_head": "n_heads",
                         "n_layer": "n_layers", "rope_theta": "rope_theta"}),
    ):
        path = base / name
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise file_error(path, f"cannot read: {exc}") from None
            if not isinstance(data, dict):
                raise file_error(path, "is not a JSON object")
            values = {}
            for ours, theirs in keys.items():
                value = data.get(theirs)
                if value is None:
                    continue
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                        or value <= 0 or (ours not in ("eps", "rope_theta") and value != int(value)):
                    raise file_error(path, f"{theirs} must be a positive number, got {value!r}")
                values[ours] = float(value) if ours in ("eps", "rope_theta") else int(value)
            return path, values
    raise file_error(base, "has no config.json or params.json")


# -- the reader ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LegacyTensor:
    """Where a tensor's bytes are in the file, as the file stores them."""

    name: str  # the GGML file's name (layers.0.attention.wq.weight)
    type_id: int
    kind: LegacyType
    ne: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def mapped(self) -> bool:
        """Used in place from the memory map: today's layout, and aligned (always so in ggjt)."""
        return self.kind.relayout is None and self.offset % ALIGNMENT == 0


def is_legacy_ggml(path: str | os.PathLike) -> bool:
    """Whether ``path`` starts with a 2023 GGML magic (anything unreadable: False)."""
    try:
        with open(path, "rb") as handle:
            return handle.read(4) in LEGACY_MAGICS
    except (OSError, ValueError, TypeError):
        return False


class LegacyGGMLFile(GGUFFile):
    """A 2023 GGML LLaMA file with ``GGUFFile``'s interface (see the module doc).

    ``format_name``: e.g. ``"ggjt v3"``; ``legacy``: GGUF name -> ``LegacyTensor``; ``ftype``: the
    header's llama_ftype. ``TensorInfo.offset`` is where the file's bytes are; for converted tensors
    (``legacy[name].mapped`` false) ``tensor_bytes`` gives today's bytes, made on first use."""

    def __init__(self, path: str | os.PathLike, options: LegacyOptions | None = None,
                 _split_part: bool = False) -> None:
        self.options = options if options is not None else LegacyOptions()
        self.legacy: dict[str, LegacyTensor] = {}
        self._converted: dict[str, np.ndarray] = {}
        self.version = 0
        self.alignment = ALIGNMENT
        super().__init__(path, _split_part=True)  # a GGML file has no split parts

    # -- parsing ---------------------------------------------------------------------------------

    def _parse(self) -> None:
        cur = _Cursor(self._map, self.file_size, str(self.path))
        magic = bytes(self._map[0:4])
        if magic in OTHER_MAGICS:
            raise cur.fail(OTHER_MAGICS[magic])
        cur.pos = 4
        if magic == MAGIC_GGML:
            self.fmt, self.version = "ggml", 1
            self.format_name = "ggml (unversioned)"
        else:
            self.fmt = "ggmf" if magic == MAGIC_GGMF else "ggjt"
            self.version = cur.u32("header")
            if self.fmt == "ggmf" and self.version in (100, 101):
                raise cur.fail("an RWKV model in rwkv.cpp's format, not a LLaMA-family GGML file")
            if (self.fmt, self.version) not in (("ggmf", 1), ("ggjt", 1), ("ggjt", 2), ("ggjt", 3)):
                raise cur.fail(f"not a GGUF file, and an unknown {self.fmt} version {self.version} "
                               "(2023 GGML files are ggmf v1 and ggjt v1-v3)")
            self.format_name = f"{self.fmt} v{self.version}"
        self.legacy_format = (f"{self.format_name} (a 2023 GGML file, LLaMA family; shown as the GGUF "
                              "`halfbyte convert` writes from it)")
        try:
            self._parse_llama(cur)
        except HalfbyteError:
            foreign = _identify_foreign(self._map, self.file_size)
            if foreign is not None:
                raise cur.fail(f"{foreign} model in the ggml examples' GGML format, not LLaMA-family: only "
                               "LLaMA-family 2023 GGML files are read (convert the original checkpoint "
                               "instead)") from None
            raise

    def _parse_llama(self, cur: _Cursor) -> None:
        names = ("n_vocab", "n_embd", "n_mult", "n_head", "n_layer", "n_rot", "ftype")
        hp = dict(zip(names, (cur.u32("header") for _ in names)))
        self.hparams = hp
        self.ftype = hp["ftype"]
        not_llama = f"not a GGUF file, and not a LLaMA-family GGML file either ({self.format_name} magic"
        for key in ("n_vocab", "n_embd", "n_head", "n_layer"):
            if hp[key] == 0:
                raise cur.fail(f"{not_llama}, {key} 0)")
        if hp["ftype"] not in FTYPE_NAMES:
            raise cur.fail(f"{not_llama}, unknown ftype {hp['ftype']})")
        if hp["n_embd"] % hp["n_head"]:
            raise cur.fail(f"{not_llama}, n_embd {hp['n_embd']} not a multiple of n_head {hp['n_head']})")
        if hp["n_layer"] > 10_000 or hp["n_embd"] > 1 << 20:
            raise cur.fail(f"{not_llama}, {hp['n_layer']} layers of {hp['n_embd']} dims)")
        with_scores = self.fmt != "ggml"
        if hp["n_vocab"] < 3 or hp["n_vocab"] > (self.file_size - cur.pos) // (8 if with_scores else 4):
            raise cur.fail(f"vocabulary size {hp['n_vocab']} is impossible for a file of {self.file_size} bytes")
        texts, scores = self._read_vocab(cur, hp["n_vocab"], with_scores)
        self._read_tensors(cur, hp)
        self._build_metadata(hp, texts, scores)

    def _read_vocab(self, cur: _Cursor, n_vocab: int, with_scores: bool) -> tuple[list[bytes], np.ndarray]:
        buf, size, pos = self._map, self.file_size, cur.pos
        unpack_u32 = struct.Struct("<I").unpack_from
        unpack_f32 = struct.Struct("<f").unpack_from
        texts: list[bytes] = []
        scores = np.zeros(n_vocab, np.float32)
        for index in range(n_vocab):
            if pos + 4 > size:
                raise cur.fail(f"truncated vocabulary at token {index} (offset {pos})")
            (length,) = unpack_u32(buf, pos)
            pos += 4
            if length > MAX_TOKEN_LENGTH:
                raise cur.fail(f"token {index} has an absurd length {length}")
            if pos + length + (4 if with_scores else 0) > size:
                raise cur.fail(f"truncated vocabulary at token {index} (offset {pos})")
            texts.append(bytes(buf[pos : pos + length]))
            pos += length
            if with_scores:
                scores[index] = unpack_f32(buf, pos)[0]
                pos += 4
        cur.pos = pos
        return texts, scores

    def _read_tensors(self, cur: _Cursor, hp: dict[str, int]) -> None:
        types = _types_for(self.fmt, self.version)
        seen: dict[str, str] = {}
        while cur.pos < self.file_size:
            start = cur.pos
            n_dims = cur.u32("tensor record")
            name_length = cur.u32("tensor record")
            type_id = cur.u32("tensor record")
            if not 1 <= n_dims <= 4:
                raise cur.fail(f"tensor record at offset {start} has {n_dims} dimensions (1 to 4)")
            if not 1 <= name_length <= MAX_NAME_LENGTH:
                raise cur.fail(f"tensor record at offset {start} has an absurd name length {name_length}")
            ne = tuple(cur.u32("tensor shape") for _ in range(n_dims))
            cur.need(name_length, "tensor name")
            raw_name = bytes(self._map[cur.pos : cur.pos + name_length])
            cur.pos += name_length
            try:
                name = raw_name.decode("utf-8")
            except UnicodeDecodeError:
                raise cur.fail(f"tensor name {raw_name[:64]!r} at offset {start} is not UTF-8") from None
            kind = types.get(type_id)
            if kind is None:
                known = ", ".join(f"{k} {v.name.split(' ')[0]}" for k, v in types.items())
                raise cur.fail(f"tensor {name!r} has type {type_id}, unknown in {self.format_name} files "
                               f"(known: {known})")
            target = gguf_name(name, hp["n_layer"])
            if target is None:
                raise cur.fail(f"tensor {name!r} is not a LLaMA tensor (or its layer is past n_layer "
                               f"{hp['n_layer']})")
            if target in seen:
                raise cur.fail(f"duplicate tensor {name!r}")
            if any(d == 0 for d in ne):
                raise cur.fail(f"tensor {name!r} has an empty dimension in {list(ne)}")
            if ne[0] % kind.block:
                raise cur.fail(f"tensor {name!r} row length {ne[0]} is not a multiple of the {kind.name} block "
                               f"size {kind.block}")
            n_elements = math.prod(ne)
            if self.fmt == "ggjt":
                cur.pos += -cur.pos % ALIGNMENT
            nbytes = n_elements // kind.block * kind.nbytes
            if nbytes > self.file_size - min(cur.pos, self.file_size):
                raise cur.fail(f"tensor {name!r} ({'x'.join(map(str, ne))} {kind.name}, {nbytes} bytes) runs past "
                               f"the end of the file at offset {cur.pos} (truncated file?)")
            shape = tuple(reversed(ne))
            self.legacy[target] = LegacyTensor(name, type_id, kind, ne, cur.pos, nbytes)
            self.tensors[target] = TensorInfo(target, kind.target, shape, cur.pos, tensor_nbytes(kind.target, shape))
            seen[target] = name
            cur.pos += nbytes
        if not self.tensors:
            raise cur.fail("has no tensors (truncated file?)")
        self.data_offset = min(t.offset for t in self.legacy.values())
        embd = self.legacy.get("token_embd.weight")
        if embd is not None and len(embd.ne) == 2 and embd.ne[0] != hp["n_embd"]:
            parts = hp["n_embd"] // embd.ne[0] if hp["n_embd"] % embd.ne[0] == 0 else 0
            if parts > 1:
                raise cur.fail(f"is part 1 of a {parts}-part GGML model (13B+ before April 2023): join the parts "
                               "with llama.cpp's migrate-ggml-2023-03-30-pr613.py first")
            raise cur.fail(f"tensor 'tok_embeddings.weight' has {embd.ne[0]} columns, the header says n_embd "
                           f"{hp['n_embd']}")
        have = {t.name for t in self.legacy.values()}
        for name in required_names(hp["n_layer"]):
            if name not in have:
                raise cur.fail(f"missing tensor {name!r} (truncated file?)")

    def _build_metadata(self, hp: dict[str, int], texts: list[bytes], scores: np.ndarray) -> None:
        opts = self.options
        config_path, config = _read_config(opts.config_dir) if opts.config_dir is not None else (None, {})
        for key in ("n_embd", "n_head", "n_layer"):
            if key in config and config[key] != hp[key]:
                raise file_error(config_path, f"does not describe {self.path.name}: {key} {config[key]}, the file "
                                              f"has {hp[key]}")
        n_embd, n_head = hp["n_embd"], hp["n_head"]
        head_dim = n_embd // n_head
        # n_head_kv from the K projection's rows (n_head_kv * head_dim), as 70B files need.
        wk = self.legacy.get("blk.0.attn_k.weight")
        n_head_kv = n_head
        if wk is not None and len(wk.ne) == 2 and wk.ne[1] % head_dim == 0 and n_head % (wk.ne[1] // head_dim) == 0:
            n_head_kv = wk.ne[1] // head_dim
        stated = n_head // opts.gqa if opts.gqa is not None else config.get("n_head_kv")
        if opts.gqa is not None and n_head % opts.gqa:
            raise file_error(self.path, f"--gqa {opts.gqa} does not divide the {n_head} heads")
        if stated is not None and stated != n_head_kv:
            where = f"--gqa {opts.gqa}" if opts.gqa is not None else f"{config_path}: num_key_value_heads {stated}"
            raise file_error(self.path, f"{where} disagrees with the tensors ({n_head_kv} KV heads of {head_dim} "
                                        "dims in layers.0.attention.wk)")
        w1 = self.legacy.get("blk.0.ffn_gate.weight")
        if w1 is not None and len(w1.ne) == 2:
            n_ff = w1.ne[1]
        else:  # 2023 llama.cpp's rule
            n_mult = max(hp["n_mult"], 1)
            n_ff = ((2 * (4 * n_embd) // 3 + n_mult - 1) // n_mult) * n_mult
        if "n_ff" in config and config["n_ff"] != n_ff:
            raise file_error(config_path, f"intermediate_size {config['n_ff']} disagrees with the tensors of "
                                          f"{self.path.name} ({n_ff})")
        n_ctx = opts.n_ctx if opts.n_ctx is not None else config.get("n_ctx", DEFAULT_CONTEXT)
        eps = opts.eps if opts.eps is not None else config.get("eps", DEFAULT_EPS)
        ftype = hp["ftype"]
        out_ftype = 1 if ftype in (5, 6) else ftype  # Q4_2 / Q4_3 are read as F16

        def put(key: str, value: Any, value_type: GGUFValueType, elem_type: GGUFValueType | None = None) -> None:
            self.metadata[key] = value
            self.value_types[key] = (value_type, elem_type)

        fmt_label = self.fmt.upper()  # llama.cpp's converter: "converted from legacy GGJTv3 MOSTLY_Q4_0 format"
        put("general.architecture", "llama", VT.STRING)
        put("general.name", self.path.name, VT.STRING)
        put("general.description", f"converted from legacy {fmt_label}v{self.version} {FTYPE_NAMES[ftype]} format",
            VT.STRING)
        put("general.file_type", out_ftype, VT.UINT32)
        put("general.quantization_version", 2, VT.UINT32)
        put("llama.context_length", int(n_ctx), VT.UINT32)
        put("llama.embedding_length", n_embd, VT.UINT32)
        put("llama.block_count", hp["n_layer"], VT.UINT32)
        put("llama.feed_forward_length", int(n_ff), VT.UINT32)
        put("llama.rope.dimension_count", head_dim, VT.UINT32)
        put("llama.attention.head_count", n_head, VT.UINT32)
        put("llama.attention.head_count_kv", n_head_kv, VT.UINT32)
        put("llama.attention.layer_norm_rms_epsilon", float(np.float32(eps)), VT.FLOAT32)
        if "rope_theta" in config:
            put("llama.rope.freq_base", float(np.float32(config["rope_theta"])), VT.FLOAT32)
        tokens, token_types = vocab_tokens(texts)
        put("tokenizer.ggml.model", "llama", VT.STRING)
        put("tokenizer.ggml.pre", "default", VT.STRING)
        put("tokenizer.ggml.tokens", tokens, VT.ARRAY, VT.STRING)
        put("tokenizer.ggml.scores", scores, VT.ARRAY, VT.FLOAT32)
        put("tokenizer.ggml.token_type", np.asarray(token_types, np.int32), VT.ARRAY, VT.INT32)
        put("tokenizer.ggml.unknown_token_id", 0, VT.UINT32)
        put("tokenizer.ggml.bos_token_id", 1, VT.UINT32)
        put("tokenizer.ggml.eos_token_id", 2, VT.UINT32)

    # -- access ----------------------------------------------------------------------------------

    def converted_bytes(self, name: str) -> np.ndarray:
        """Today's bytes of a tensor (1-D uint8), made now and not kept: a view of the map for the
        tensors used in place, a new array for the others."""
        info = self._info(name)
        legacy = self.legacy[name]
        source = np.frombuffer(self._map, np.uint8, count=legacy.nbytes, offset=legacy.offset)
        if legacy.mapped:
            return source
        relayout = legacy.kind.relayout or _copy
        blocks = source.reshape(-1, legacy.kind.nbytes)
        out = np.empty(info.nbytes, np.uint8)
        out_blocks = out.reshape(blocks.shape[0], -1)
        try:
            for first in range(0, blocks.shape[0], _CHUNK_BLOCKS):
                out_blocks[first : first + _CHUNK_BLOCKS] = relayout(blocks[first : first + _CHUNK_BLOCKS])
        except _ScaleOverflow as exc:
            raise file_error(self.path, f"tensor {legacy.name!r}: {exc}") from None
        return out

    def _raw(self, info: TensorInfo) -> np.ndarray:
        if self.legacy[info.name].mapped:
            return self.converted_bytes(info.name)
        cached = self._converted.get(info.name)
        if cached is None:
            cached = self._converted[info.name] = self.converted_bytes(info.name)
        return cached

    def tensor_bytes(self, name: str) -> np.ndarray:
        info = self._info(name)
        raw = self._raw(info)
        outer = info.shape[:-1]
        return raw.reshape(*outer, info.nbytes // max(1, math.prod(outer)))

    def tensor_array(self, name: str) -> np.ndarray:
        info = self._info(name)
        dtype = _TENSOR_DTYPES.get(info.ggml_type)
        if dtype is None:
            return self.tensor_bytes(name)
        return self._raw(info).view(dtype).reshape(info.shape)

    def close(self) -> None:
        self._converted.clear()
        super().close()


def vocab_tokens(texts: list[bytes]) -> tuple[list[str], list[int]]:
    """Token texts and types as llama.cpp's converter derives them from a 2023 vocabulary: ids 0-2 are
    <unk> (unknown), <s>, </s> (control); an empty text is a control token; a one-byte text among ids
    3-258 is the byte token <0xXX>; elsewhere a space is SentencePiece's U+2581."""
    tokens: list[str] = []
    types: list[int] = []
    for index, text in enumerate(texts):
        if index <= 2:
            tokens.append(("<unk>", "<s>", "</s>")[index])
            types.append(2 if index == 0 else 3)
        elif not text:
            tokens.append("")
            types.append(3)
        elif index <= 258 and len(text) == 1:
            tokens.append(f"<0x{text[0]:02X}>")
            types.append(6)
        else:
            tokens.append(text.replace(b" ", "\u2581".encode()).decode("utf-8", errors="surrogateescape"))
            types.append(1)
    return tokens, types


# -- conversion ----------------------------------------------------------------------------------------


def convert_ggml(source: str | os.PathLike, output: str | os.PathLike | None = None,
                 options: LegacyOptions | None = None, progress: bool = True) -> Path:
    """`halfbyte convert model.bin`: the GGUF of a 2023 GGML LLaMA file, tensors in today's layouts (the
    bytes of those already in it copied as they are), written atomically (no partial file on error)."""
    from engine.progress import progress_bar

    source_path = Path(source)
    target = Path(output) if output is not None else Path.cwd() / (source_path.stem + ".gguf")
    if target.is_dir():
        raise file_error(target, "is a directory (give a file name with -o)")
    if not target.parent.is_dir():
        raise file_error(target.parent, "output directory does not exist")
    with LegacyGGMLFile(source_path, options) as src:
        try:
            with GGUFWriter(target, inputs=[source_path]) as writer:
                writer.copy_metadata(src)
                for name, info in src.tensors.items():
                    writer.add_tensor_info(name, info.shape, info.ggml_type)
                writer.write_header()
                total = sum(info.nbytes for info in src.tensors.values())
                with progress_bar(total, f"convert {target.name}", progress) as bar:
                    for name, info in src.tensors.items():
                        writer.write_tensor(name, src.converted_bytes(name))
                        bar.update(info.nbytes)
                return writer.finish()
        except OSError as exc:
            if exc.errno == 28:  # ENOSPC
                raise file_error(target, "no space left on device") from None
            raise file_error(exc.filename or target, f"cannot write: {exc.strerror or exc}") from None
