"""Falcon: parallel attention + MLP blocks with LayerNorm, fused QKV, rotary positions
(neox pairing), multi-query (7B) or grouped (40B, two LayerNorms) attention, GELU MLP.

    x = embed(tokens)
    for each layer:
        m = layer_norm(x)                     (7B: a = m; 40B: a = a second layer_norm(x))
        q, k, v = split(a Wqkv) ; rope(q, k)
        x = x + attention(q, k, v) Wo + gelu(m Wup) Wdown
    logits = layer_norm(x) Woutput
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

ARCH = "falcon"


@dataclass(frozen=True)
class FalconParams:
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_ctx_train: int
    norm_eps: float
    rope_theta: float

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_file(cls, file: GGUFFile) -> FalconParams:
        hp = HParams(file, ARCH)
        n_embd = hp.int("embedding_length")
        return cls(
            n_vocab=hp.vocab_size(),
            n_embd=n_embd,
            n_layer=hp.int("block_count"),
            n_head=hp.int("attention.head_count"),
            n_head_kv=hp.int("attention.head_count_kv", 1),
            n_ff=hp.int("feed_forward_length", 4 * n_embd),
            n_ctx_train=hp.int("context_length", 2048),
            norm_eps=hp.float("attention.layer_norm_epsilon", 1e-5, minimum=0.0),
            rope_theta=hp.float("rope.freq_base", 10000.0, positive=True),
        )


@dataclass
class FalconLayer:
    mlp_norm: np.ndarray  # attn_norm in the file
    mlp_norm_b: np.ndarray
    attn_norm: np.ndarray | None  # attn_norm_2 in the file: 40B style's LayerNorm for attention
    attn_norm_b: np.ndarray | None
    wqkv: Weight
    wo: Weight
    w_up: Weight
    w_down: Weight


class Falcon(Decoder):
    def __init__(self, file: GGUFFile) -> None:
        p = self.params = FalconParams.from_file(file)
        ops.check_heads(file, p.n_embd, p.n_head, p.n_head_kv, p.head_dim)
        t = Tensors(file)
        n_qkv = (p.n_head + 2 * p.n_head_kv) * p.head_dim
        self.tok_embd = t.matrix("token_embd.weight", p.n_vocab, p.n_embd)
        self.layers = [
            FalconLayer(
                mlp_norm=t.vector(f"blk.{i}.attn_norm.weight", p.n_embd),
                mlp_norm_b=t.vector(f"blk.{i}.attn_norm.bias", p.n_embd),
                attn_norm=t.optional_vector(f"blk.{i}.attn_norm_2.weight", p.n_embd),
                attn_norm_b=t.optional_vector(f"blk.{i}.attn_norm_2.bias", p.n_embd),
                wqkv=t.matrix(f"blk.{i}.attn_qkv.weight", n_qkv, p.n_embd),
                wo=t.matrix(f"blk.{i}.attn_output.weight", p.n_embd, p.n_embd),
                w_up=t.matrix(f"blk.{i}.ffn_up.weight", p.n_ff, p.n_embd),
                w_down=t.matrix(f"blk.{i}.ffn_down.weight", p.n_embd, p.n_ff),
            )
            for i in range(p.n_layer)
        ]
        self.output_norm = t.vector("output_norm.weight", p.n_embd)
        self.output_norm_b = t.vector("output_norm.bias", p.n_embd)
        self.output = t.matrix("output.weight", p.n_vocab, p.n_embd) if t.has("output.weight") else self.tok_embd

    def embed(self, batch: Batch) -> np.ndarray:
        return ops.embed(self.tok_embd, batch.tokens)

    def layer(self, i: int, x: np.ndarray, batch: Batch) -> np.ndarray:
        p = self.params
        layer = self.layers[i]
        n = batch.n_tok
        hd = p.head_dim
        # As in llama.cpp: attn_norm feeds the MLP (and, in 7B-style blocks, attention too);
        # 40B-style blocks have attn_norm_2 (HF's ln_attn) for attention.
        m = ops.layer_norm(x, layer.mlp_norm, layer.mlp_norm_b, p.norm_eps)
        a = m if layer.attn_norm is None else ops.layer_norm(x, layer.attn_norm, layer.attn_norm_b, p.norm_eps)
        qkv = ops.linear(a, layer.wqkv)
        q = np.ascontiguousarray(qkv[:, : p.n_embd]).reshape(n, p.n_head, hd)
        k = np.ascontiguousarray(qkv[:, p.n_embd : p.n_embd + p.n_head_kv * hd]).reshape(n, p.n_head_kv, hd)
        v = qkv[:, p.n_embd + p.n_head_kv * hd :].reshape(n, p.n_head_kv, hd)
        ops.rope(q, batch.positions, hd, p.rope_theta, 1.0, neox=True)
        ops.rope(k, batch.positions, hd, p.rope_theta, 1.0, neox=True)
        attn = batch.attention(i, q, k, v, 1.0 / math.sqrt(hd))
        mlp = ops.linear(ops.gelu(ops.linear(m, layer.w_up)), layer.w_down)
        x += ops.linear(attn.reshape(n, p.n_embd), layer.wo) + mlp
        return x

    def head(self, x: np.ndarray, hidden_only: bool = False) -> np.ndarray:
        h = ops.layer_norm(x, self.output_norm, self.output_norm_b, self.params.norm_eps)
        return h if hidden_only else ops.linear(h, self.output)  # hidden_only: embeddings

