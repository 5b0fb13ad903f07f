"""GPT-2 (GGUF ``gpt2``: OpenAI GPT-2, Cerebras-GPT): learned absolute positions added to the
token embeddings, pre-LayerNorm blocks with biases, fused QKV, GELU (tanh form) MLP, tied head.

    x = embed(tokens) + position_embd(positions)
    for each layer:
        h = layer_norm(x) ; q, k, v = split(h Wqkv + bqkv)
        x = x + attention(q, k, v) Wo + bo
        h = layer_norm(x) ; x = x + gelu(h Wup + bup) Wdown + bdown
    logits = layer_norm(x) Woutput                                  (tied: Woutput = Wembed)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from engine import ops
from engine.batch import Batch
from engine.decoder import Decoder
from engine.errors import HalfbyteError
from engine.gguf_file import GGUFFile
from engine.hparams import HParams, Tensors
from engine.weights import Weight
from models.common import add_bias, split_qkv

ARCH = "gpt2"


@dataclass(frozen=True)
class Gpt2Params:
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_ff: int
    n_ctx_train: int
    norm_eps: float

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def n_head_kv(self) -> int:
        return self.n_head

    @classmethod
    def from_file(cls, file: GGUFFile) -> Gpt2Params:
        hp = HParams(file, ARCH)
        n_embd = hp.int("embedding_length")
        n_head = hp.int("attention.head_count")
        ops.check_heads(file, n_embd, n_head, n_head, 2)
        return cls(
            n_vocab=hp.vocab_size(),
            n_embd=n_embd,
            n_layer=hp.int("block_count"),
            n_head=n_head,
            n_ff=hp.int("feed_forward_length", 4 * n_embd),
            n_ctx_train=hp.int("context_length"),
            norm_eps=hp.float("attention.layer_norm_epsilon", 1e-5, minimum=0.0),
        )


@dataclass
class Gpt2Layer:
    attn_norm: np.ndarray
    attn_norm_b: np.ndarray
    wqkv: Weight
    bqkv: np.ndarray
    wo: Weight
    bo: np.ndarray
    ffn_norm: np.ndarray
    ffn_norm_b: np.ndarray
    w_up: Weight
    b_up: np.ndarray
    w_down: Weight
    b_down: np.ndarray


class Gpt2(Decoder):
    def __init__(self, file: GGUFFile) -> None:
        p = self.params = Gpt2Params.from_file(file)
        t = Tensors(file)
        e = p.n_embd
        self.tok_embd = t.matrix("token_embd.weight", p.n_vocab, e)
        self.pos_embd = t.matrix("position_embd.weight", p.n_ctx_train, e)
        self.layers = [
            Gpt2Layer(
                attn_norm=t.vector(f"blk.{i}.attn_norm.weight", e),
                attn_norm_b=t.vector(f"blk.{i}.attn_norm.bias", e),
                wqkv=t.matrix(f"blk.{i}.attn_qkv.weight", 3 * e, e),
                bqkv=t.vector(f"blk.{i}.attn_qkv.bias", 3 * e),
                wo=t.matrix(f"blk.{i}.attn_output.weight", e, e),
                bo=t.vector(f"blk.{i}.attn_output.bias", e),
                ffn_norm=t.vector(f"blk.{i}.ffn_norm.weight", e),
                ffn_norm_b=t.vector(f"blk.{i}.ffn_norm.bias", e),
                w_up=t.matrix(f"blk.{i}.ffn_up.weight", p.n_ff, e),
                b_up=t.vector(f"blk.{i}.ffn_up.bias", p.n_ff),
                w_down=t.matrix(f"blk.{i}.ffn_down.weight", e, p.n_ff),
                b_down=t.vector(f"blk.{i}.ffn_down.bias", e),
            )
            for i in range(p.n_layer)
        ]
        self.output_norm = t.vector("output_norm.weight", e)
        self.output_norm_b = t.vector("output_norm.bias", e)
        self.output = t.matrix("output.weight", p.n_vocab, e) if t.has("output.weight") else self.tok_embd

    def embed(self, batch: Batch) -> np.ndarray:
        n_ctx_train = self.params.n_ctx_train
        if int(batch.positions.max()) >= n_ctx_train:
            raise HalfbyteError(f"position {int(batch.positions.max())} is past the {n_ctx_train} learned "
                                "positions of this model (GPT-2 cannot run beyond its training context)")
        return ops.embed(self.tok_embd, batch.tokens) + ops.embed(self.pos_embd, batch.positions)

    def layer(self, i: int, x: np.ndarray, batch: Batch) -> np.ndarray:
        p = self.params
        layer = self.layers[i]
        n = batch.n_tok
        hd = p.head_dim
        h = ops.layer_norm(x, layer.attn_norm, layer.attn_norm_b, p.norm_eps)
        q, k, v = split_qkv(add_bias(ops.linear(h, layer.wqkv), layer.bqkv), p.n_head, p.n_head, hd)
        attn = batch.attention(i, q, k, v, 1.0 / math.sqrt(hd))
        x += add_bias(ops.linear(attn.reshape(n, p.n_embd), layer.wo), layer.bo)
        h = ops.layer_norm(x, layer.ffn_norm, layer.ffn_norm_b, p.norm_eps)
        up = ops.gelu_tanh(add_bias(ops.linear(h, layer.w_up), layer.b_up))
        x += add_bias(ops.linear(up, layer.w_down), layer.b_down)
        return x

    def head(self, x: np.ndarray, hidden_only: bool = False) -> np.ndarray:
        h = ops.layer_norm(x, self.output_norm, self.output_norm_b, self.params.norm_eps)
        return h if hidden_only else ops.linear(h, self.output)  # hidden_only: embeddings

