"""MPT: pre-norm decoder with LayerNorm (no bias), fused QKV, ALiBi positions and a GELU MLP.

    x = embed(tokens)
    for each layer:
        h = layer_norm(x) ; q, k, v = split(clamp(h Wqkv))
        x = x + attention(q, k, v, alibi) Wo
        h = layer_norm(x) ; x = x + gelu(h Wup) Wdown
    logits = layer_norm(x) Wembed^T
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from engine import ops
from engine.batch import Batch
from engine.decoder import Decoder
from engine.gguf_file import GGUFFile
from engine.hparams import HParams, Tensors
from engine.weights import Weight

ARCH = "mpt"


@dataclass(frozen=True)
class MptParams:
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_ctx_train: int
    norm_eps: float
    max_alibi_bias: float
    clip_qkv: float  # 0 = no clamping

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_file(cls, file: GGUFFile) -> MptParams:
        hp = HParams(file, ARCH)
        n_embd = hp.int("embedding_length")
        n_head = hp.int("attention.head_count")
        return cls(
            n_vocab=hp.vocab_size(),
            n_embd=n_embd,
            n_layer=hp.int("block_count"),
            n_head=n_head,
            n_head_kv=hp.int("attention.head_count_kv", n_head),
            n_ff=hp.int("feed_forward_length", 4 * n_embd),
            n_ctx_train=hp.int("context_length", 2048),
            norm_eps=hp.float("attention.layer_norm_epsilon", 1e-5, minimum=0.0),
            max_alibi_bias=hp.float("attention.max_alibi_bias", 8.0, minimum=0.0),
            clip_qkv=hp.float("attention.clamp_kqv", 0.0, minimum=0.0),
        )


@dataclass
class MptLayer:
    attn_norm: np.ndarray
    attn_norm_b: np.ndarray | None
    wqkv: Weight
    wo: Weight
    ffn_norm: np.ndarray
    ffn_norm_b: np.ndarray | None
    w_up: Weight
    w_down: Weight


class Mpt(Decoder):
    def __init__(self, file: GGUFFile) -> None:
        p = self.params = MptParams.from_file(file)
        ops.check_heads(file, p.n_embd, p.n_head, p.n_head_kv, p.head_dim)
        t = Tensors(file)
        n_qkv = p.n_embd + 2 * p.n_head_kv * p.head_dim
        self.tok_embd = t.matrix("token_embd.weight", p.n_vocab, p.n_embd)
        self.layers = [
            MptLayer(
                attn_norm=t.vector(f"blk.{i}.attn_norm.weight", p.n_embd),
                attn_norm_b=t.optional_vector(f"blk.{i}.attn_norm.bias", p.n_embd),
                wqkv=t.matrix(f"blk.{i}.attn_qkv.weight", n_qkv, p.n_embd),
                wo=t.matrix(f"blk.{i}.attn_output.weight", p.n_embd, p.n_embd),
                ffn_norm=t.vector(f"blk.{i}.ffn_norm.weight", p.n_embd),
                ffn_norm_b=t.optional_vector(f"blk.{i}.ffn_norm.bias", p.n_embd),
                w_up=t.matrix(f"blk.{i}.ffn_up.weight", p.n_ff, p.n_embd),
                w_down=t.matrix(f"blk.{i}.ffn_down.weight", p.n_embd, p.n_ff),
            )
            for i in range(p.n_layer)
        ]
        self.output_norm = t.vector("output_norm.weight", p.n_embd)
        self.output_norm_b = t.optional_vector("output_norm.bias", p.n_embd)
        self.output = t.matrix("output.weight", p.n_vocab, p.n_embd) if t.has("output.weight") else self.tok_embd
        self.alibi = ops.alibi_slopes(p.n_head, p.max_alibi_bias)

    def embed(self, batch: Batch) -> np.ndarray:
        return ops.embed(self.tok_embd, batch.tokens)

    def layer(self, i: int, x: np.ndarray, batch: Batch) -> np.ndarray:
        p = self.params
        layer = self.layers[i]
        n = batch.n_tok
        hd = p.head_dim
        h = ops.layer_norm(x, layer.attn_norm, layer.attn_norm_b, p.norm_eps)
        qkv = ops.linear(h, layer.wqkv)
        if p.clip_qkv > 0:
            np.clip(qkv, -p.clip_qkv, p.clip_qkv, out=qkv)
        q = qkv[:, : p.n_embd].reshape(n, p.n_head, hd)
        k = qkv[:, p.n_embd : p.n_embd + p.n_head_kv * hd].reshape(n, p.n_head_kv, hd)
        v = qkv[:, p.n_embd + p.n_head_kv * hd :].reshape(n, p.n_head_kv, hd)
        attn = batch.attention(i, np.ascontiguousarray(q), k, v, 1.0 / math.sqrt(hd), self.alibi)
        x += ops.linear(attn.reshape(n, p.n_embd), layer.wo)
        h = ops.layer_norm(x, layer.ffn_norm, layer.ffn_norm_b, p.norm_eps)
        x += ops.linear(ops.gelu(ops.linear(h, layer.w_up)), layer.w_down)
        return x

    def head(self, x: np.ndarray, hidden_only: bool = False) -> np.ndarray:
        h = ops.layer_norm(x, self.output_norm, self.output_norm_b, self.params.norm_eps)
        return h if hidden_only else ops.linear(h, self.output)  # hidden_only: embeddings

