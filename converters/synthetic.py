"""Random-weight GGUF files with the shapes of real models, for benchmarks anyone can reproduce.

``halfbyte bench --synthetic llama-7b`` measures a machine without downloading a model: the
file has LLaMA-7B's tensor shapes, Q4_0 blocks of random bytes (with sane fp16 scales, so
activations stay finite), and a small byte-fallback SentencePiece-style vocabulary padded to
32000 tokens. The speed of a forward pass depends only on the shapes and types, so tokens/s
on this file is tokens/s on the real model. Built once and cached on disk.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import MODEL_TENSOR, TENSOR_NAMES, GGMLQuantizationType, GGUFValueType, Keys, LlamaFileType, TokenType

from engine.errors import HalfbyteError
from engine.gguf_file import GGUFWriter
from engine.quants import row_bytes


@dataclass(frozen=True)
class LlamaShape:
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_ctx: int


# The shapes people run: TinyLlama-1.1B, OpenLLaMA-3B, LLaMA(-2)-7B and 13B.
SHAPES: dict[str, LlamaShape] = {
    "llama-1b": LlamaShape(32000, 2048, 22, 32, 4, 5632, 2048),
    "llama-3b": LlamaShape(32000, 3200, 26, 32, 32, 8640, 2048),
    "llama-7b": LlamaShape(32000, 4096, 32, 32, 32, 11008, 4096),
    "llama-13b": LlamaShape(32000, 5120, 40, 40, 40, 13824, 4096),
}

_TYPES = {
    "q4_0": (GGMLQuantizationType.Q4_0, LlamaFileType.MOSTLY_Q4_0),
    "q8_0": (GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0),
}
_WEIGHT_STD = 0.02  # typical of trained LLaMA projections; keeps the residual stream finite
_CHUNK_BYTES = 64 << 20


def cache_dir() -> Path:
    base = os.environ.get("HALFBYTE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "halfbyte"
    )
    return Path(base) / "synthetic"


def synthetic_path(name: str, type_name: str = "q4_0") -> Path:
    """The cached file for ``name`` (e.g. "llama-7b"), built on first use."""
    if name not in SHAPES:
        raise HalfbyteError(f"unknown synthetic model {name!r} (known: {', '.join(SHAPES)})")
    if type_name not in _TYPES:
        raise HalfbyteError(f"synthetic models come as {', '.join(_TYPES)}, not {type_name!r}")
    path = cache_dir() / f"{name}-{type_name}.gguf"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_synthetic(path, SHAPES[name], type_name, name=f"synthetic {name}")
    return path


def _vocab(n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    """<unk>, <s>, </s>, the 256 byte pieces, printable ASCII with and without the space mark, padding."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL] + [TokenType.BYTE] * 256
    chars = [chr(c) for c in range(33, 127)]
    pieces = ["\u2581"] + chars + ["\u2581" + c for c in chars]
    tokens += pieces
    types += [TokenType.NORMAL] * len(pieces)
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    while len(tokens) < n_vocab:
        tokens.append(f"[PAD{len(tokens)}]")
        types.append(TokenType.UNUSED)
        scores.append(-1000.0)
    return tokens, scores, [int(t) for t in types]


def _random_blocks(rng: np.random.Generator, qtype: GGMLQuantizationType, n_rows: int, n_in: int
                   ) -> Iterator[np.ndarray]:
    """Rows of random blocks: random quant bytes, fp16 scales that give weights of about _WEIGHT_STD."""
    block_bytes = 18 if qtype == GGMLQuantizationType.Q4_0 else 34
    value_std = 4.6 if qtype == GGMLQuantizationType.Q4_0 else 73.0  # std of (nibble - 8) / uniform int8
    per_row = row_bytes(qtype, n_in)
    rows_per_chunk = max(1, _CHUNK_BYTES // per_row)
    for first in range(0, n_rows, rows_per_chunk):
        rows = min(rows_per_chunk, n_rows - first)
        blocks = np.frombuffer(rng.bytes(rows * per_row), np.uint8).reshape(-1, block_bytes).copy()
        scales = (_WEIGHT_STD / value_std) * rng.uniform(0.5, 1.5, blocks.shape[0])
        blocks[:, :2] = scales.astype(np.float16).view(np.uint8).reshape(-1, 2)
        yield blocks


def write_synthetic(path: Path, shape: LlamaShape, type_name: str = "q4_0", name: str = "synthetic",
                    seed: int = 0) -> Path:
    """Write a random-weight LLaMA GGUF of ``shape`` to ``path`` (atomically)."""
    qtype, file_type = _TYPES[type_name]
    rng = np.random.default_rng(seed)
    arch = "llama"
    head_dim = shape.n_embd // shape.n_head
    n_kv = shape.n_head_kv * head_dim
    matrices = [("token_embd", shape.n_vocab, shape.n_embd)]
    for i in range(shape.n_layer):
        matrices += [
            (TENSOR_NAMES[MODEL_TENSOR.ATTN_Q].format(bid=i), shape.n_embd, shape.n_embd),
            (TENSOR_NAMES[MODEL_TENSOR.ATTN_K].format(bid=i), n_kv, shape.n_embd),
            (TENSOR_NAMES[MODEL_TENSOR.ATTN_V].format(bid=i), n_kv, shape.n_embd),
            (TENSOR_NAMES[MODEL_TENSOR.ATTN_OUT].format(bid=i), shape.n_embd, shape.n_embd),
            (TENSOR_NAMES[MODEL_TENSOR.FFN_GATE].format(bid=i), shape.n_ff, shape.n_embd),
            (TENSOR_NAMES[MODEL_TENSOR.FFN_UP].format(bid=i), shape.n_ff, shape.n_embd),
            (TENSOR_NAMES[MODEL_TENSOR.FFN_DOWN].format(bid=i), shape.n_embd, shape.n_ff),
        ]
    matrices.append(("output", shape.n_vocab, shape.n_embd))

    tokens, scores, types = _vocab(shape.n_vocab)
    with GGUFWriter(path) as writer:
        writer.add_string(Keys.General.ARCHITECTURE, arch)
        writer.add_string(Keys.General.NAME, name)
        writer.add_uint32(Keys.General.FILE_TYPE, int(file_type))
        writer.add_uint32(Keys.General.QUANTIZATION_VERSION, 2)
        writer.add_uint32(Keys.LLM.CONTEXT_LENGTH.format(arch=arch), shape.n_ctx)
        writer.add_uint32(Keys.LLM.EMBEDDING_LENGTH.format(arch=arch), shape.n_embd)
        writer.add_uint32(Keys.LLM.BLOCK_COUNT.format(arch=arch), shape.n_layer)
        writer.add_uint32(Keys.LLM.FEED_FORWARD_LENGTH.format(arch=arch), shape.n_ff)
        writer.add_uint32(Keys.Attention.HEAD_COUNT.format(arch=arch), shape.n_head)
        writer.add_uint32(Keys.Attention.HEAD_COUNT_KV.format(arch=arch), shape.n_head_kv)
        writer.add_uint32(Keys.Rope.DIMENSION_COUNT.format(arch=arch), head_dim)
        writer.add_float32(Keys.Attention.LAYERNORM_RMS_EPS.format(arch=arch), 1e-5)
        writer.add_float32(Keys.Rope.FREQ_BASE.format(arch=arch), 10000.0)
        writer.add_uint32(Keys.LLM.VOCAB_SIZE.format(arch=arch), shape.n_vocab)
        writer.add_string(Keys.Tokenizer.MODEL, "llama")
        writer.add_string(Keys.Tokenizer.PRE, "default")
        writer.add_array(Keys.Tokenizer.LIST, tokens, GGUFValueType.STRING)
        writer.add_array(Keys.Tokenizer.SCORES, np.asarray(scores, np.float32), GGUFValueType.FLOAT32)
        writer.add_array(Keys.Tokenizer.TOKEN_TYPE, np.asarray(types, np.int32), GGUFValueType.INT32)
        writer.add_uint32(Keys.Tokenizer.BOS_ID, 1)
        writer.add_uint32(Keys.Tokenizer.EOS_ID, 2)
        writer.add_uint32(Keys.Tokenizer.UNK_ID, 0)
        writer.add_bool(Keys.Tokenizer.ADD_BOS, True)
        writer.add_bool(Keys.Tokenizer.ADD_EOS, False)
        order = ["token_embd"] + [n for i in range(shape.n_layer) for n in (
            f"blk.{i}.attn_norm", f"blk.{i}.attn_q", f"blk.{i}.attn_k", f"blk.{i}.attn_v", f"blk.{i}.attn_output",
            f"blk.{i}.ffn_norm", f"blk.{i}.ffn_gate", f"blk.{i}.ffn_up", f"blk.{i}.ffn_down")] + ["output_norm",
                                                                                                   "output"]
        dims = {n: (rows, cols) for n, rows, cols in matrices}
        for tensor in order:
            if tensor in dims:
                writer.add_tensor_info(tensor + ".weight", dims[tensor], qtype)
            else:
                writer.add_tensor_info(tensor + ".weight", (shape.n_embd,), GGMLQuantizationType.F32)
        for tensor in order:
            if tensor in dims:
                rows, cols = dims[tensor]
                writer.write_tensor(tensor + ".weight", _random_blocks(rng, qtype, rows, cols))
            else:
                writer.write_tensor(tensor + ".weight", np.ones(shape.n_embd, np.float32))
        writer.finish()
    return path
