"""LLaMA: pre-norm decoder with RMSNorm, rotary positions (adjacent pairs), GQA and a SwiGLU MLP.

    x = embed(tokens)
    for each layer:
        h = rms_norm(x) ; q, k, v = h Wq, h Wk, h Wv ; rope(q, k)
        x = x + attention(q, k, v) Wo
        h = rms_norm(x) ; x = x + (silu(h Wgate) * h Wup) Wdown
    logits = rms_norm(x) Woutput
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from engine import ops
from engine.batch import Batch
from engine.gguf_file import GGUFFile
from engine.hparams import HParams, Tensors
from engine.model import check_interrupt
from engine.weights import Weight

ARCH = "llama"


@dataclass(frozen=True)
class LlamaParams:
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_ctx_train: int
    n_rot: int
    rms_eps: float
    rope_theta: float
    rope_scale: float  # linear scaling: positions are divided by this

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_file(cls, file: GGUFFile) -> LlamaParams:
        hp = HParams(file, ARCH)
        n_embd = hp.int("embedding_length")
        n_head = hp.int("attention.head_count")
        factor = hp.float("rope.scaling.factor", 1.0, positive=True)  # checked even when unused
        scale = factor if hp.str("rope.scaling.type", "none") == "linear" else 1.0
        return cls(
            n_vocab=hp.vocab_size(),
            n_embd=n_embd,
            n_layer=hp.int("block_count"),
            n_head=n_head,
            n_head_kv=hp.int("attention.head_count_kv", n_head),
            n_ff=hp.int("feed_forward_length"),
            n_ctx_train=hp.int("context_length", 2048),
            n_rot=hp.int("rope.dimension_count", n_embd // n_head),
            rms_eps=hp.float("attention.layer_norm_rms_epsilon", 1e-5, minimum=0.0),
            rope_theta=hp.float("rope.freq_base", 10000.0, positive=True),
            rope_scale=scale,
        )


@dataclass
class LlamaLayer:
    attn_norm: np.ndarray
    wq: Weight
    wk: Weight
    wv: Weight
    wo: Weight
    ffn_norm: np.ndarray
    w_gate: Weight
    w_up: Weight
    w_down: Weight


class Llama:
    def __init__(self, file: GGUFFile) -> None:
        p = self.params = LlamaParams.from_file(file)
        ops.check_heads(file, p.n_embd, p.n_head, p.n_head_kv, p.n_rot)
        t = Tensors(file)
        n_kv = p.n_head_kv * p.head_dim
        self.tok_embd = t.matrix("token_embd.weight", p.n_vocab, p.n_embd)
        self.layers = [
            LlamaLayer(
                attn_norm=t.vector(f"blk.{i}.attn_norm.weight", p.n_embd),
                wq=t.matrix(f"blk.{i}.attn_q.weight", p.n_embd, p.n_embd),
                wk=t.matrix(f"blk.{i}.attn_k.weight", n_kv, p.n_embd),
                wv=t.matrix(f"blk.{i}.attn_v.weight", n_kv, p.n_embd),
                wo=t.matrix(f"blk.{i}.attn_output.weight", p.n_embd, p.n_embd),
                ffn_norm=t.vector(f"blk.{i}.ffn_norm.weight", p.n_embd),
                w_gate=t.matrix(f"blk.{i}.ffn_gate.weight", p.n_ff, p.n_embd),
                w_up=t.matrix(f"blk.{i}.ffn_up.weight", p.n_ff, p.n_embd),
                w_down=t.matrix(f"blk.{i}.ffn_down.weight", p.n_embd, p.n_ff),
            )
            for i in range(p.n_layer)
        ]
        self.output_norm = t.vector("output_norm.weight", p.n_embd)
        # Tied embeddings: no output tensor, the embedding matrix doubles as the head.
        self.output = t.matrix("output.weight", p.n_vocab, p.n_embd) if t.has("output.weight") else self.tok_embd

    def forward(self, batch: Batch, all_logits: bool = False) -> np.ndarray:
        p = self.params
        n = batch.n_tok
        positions = batch.positions
        scale = 1.0 / math.sqrt(p.head_dim)
        x = ops.embed(self.tok_embd, batch.tokens)
        for i, layer in enumerate(self.layers):
            check_interrupt()  # a deferred Ctrl-C stops here, between kernel calls
            h = ops.rms_norm(x, layer.attn_norm, p.rms_eps)
            q = ops.linear(h, layer.wq).reshape(n, p.n_head, p.head_dim)
            k = ops.linear(h, layer.wk).reshape(n, p.n_head_kv, p.head_dim)
            v = ops.linear(h, layer.wv).reshape(n, p.n_head_kv, p.head_dim)
            ops.rope(q, positions, p.n_rot, p.rope_theta, p.rope_scale, neox=False)
            ops.rope(k, positions, p.n_rot, p.rope_theta, p.rope_scale, neox=False)
            attn = batch.attention(i, q, k, v, scale)
            x += ops.linear(attn.reshape(n, p.n_embd), layer.wo)
            h = ops.rms_norm(x, layer.ffn_norm, p.rms_eps)
            x += ops.linear(ops.swiglu(ops.linear(h, layer.w_gate), ops.linear(h, layer.w_up)), layer.w_down)
        x = batch.output_rows(x, all_logits)
        return ops.linear(ops.rms_norm(x, self.output_norm, p.rms_eps), self.output)
