"""StableLM (GGUF ``stablelm``: stablelm-3b-4e1t, StableLM-2): a LLaMA-like decoder with
LayerNorms (weight and bias), neox RoPE on the first ``rope.dimension_count`` dims of each head,
optional q/k/v biases, optional per-head q/k LayerNorms (one weight row per head, no bias) and a
SwiGLU MLP. Without ``ffn_norm`` tensors the block is parallel, as llama.cpp's graph decides:

    x = embed(tokens)
    for each layer:
        h = layer_norm(x) ; q, k, v = h Wq (+bq), h Wk (+bk), h Wv (+bv)
        q, k = layer_norm(q), layer_norm(k) per head                (attn_q_norm / attn_k_norm)
        rope(q, k) on n_rot dims ; a = attention(q, k, v) Wo
        sequential: x = x + a ; x = x + mlp(layer_norm(x))
        parallel:   x = x + a + mlp(h)
        (mlp(h) = (silu(h Wgate) * h Wup) Wdown)
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
from models.common import add_bias

ARCH = "stablelm"


@dataclass(frozen=True)
class StableLmParams:
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_ctx_train: int
    n_rot: int
    norm_eps: float
    rope_theta: float

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_file(cls, file: GGUFFile) -> StableLmParams:
        hp = HParams(file, ARCH)
        n_embd = hp.int("embedding_length")
        n_head = hp.int("attention.head_count")
        n_head_kv = hp.int("attention.head_count_kv", n_head)
        ops.check_heads(file, n_embd, n_head, n_head_kv, 2)
        n_rot = hp.int("rope.dimension_count", n_embd // n_head)
        ops.check_heads(file, n_embd, n_head, n_head_kv, n_rot)
        return cls(
            n_vocab=hp.vocab_size(),
            n_embd=n_embd,
            n_layer=hp.int("block_count"),
            n_head=n_head,
            n_head_kv=n_head_kv,
            n_ff=hp.int("feed_forward_length"),
            n_ctx_train=hp.int("context_length", 4096),
            n_rot=n_rot,
            norm_eps=hp.float("attention.layer_norm_epsilon", 1e-5, minimum=0.0),
            rope_theta=hp.float("rope.freq_base", 10000.0, positive=True),
        )


@dataclass
class StableLmLayer:
    attn_norm: np.ndarray
    attn_norm_b: np.ndarray
    wq: Weight
    wk: Weight
    wv: Weight
    bq: np.ndarray | None
    bk: np.ndarray | None
    bv: np.ndarray | None
    q_norm: np.ndarray | None  # (n_head, head_dim)
    k_norm: np.ndarray | None  # (n_head_kv, head_dim)
    wo: Weight
    ffn_norm: np.ndarray | None  # None: parallel residual
    ffn_norm_b: np.ndarray | None
    w_gate: Weight
    w_up: Weight
    w_down: Weight


def per_head_layer_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """LayerNorm (no bias) of each head of ``x`` ``(n_tok, heads, head_dim)`` with its own weight row."""
    out = np.empty_like(x)
    for h in range(x.shape[1]):
        out[:, h] = ops.layer_norm(x[:, h], weight[h], None, eps)
    return out


class StableLm(Decoder):
    def __init__(self, file: GGUFFile) -> None:
        p = self.params = StableLmParams.from_file(file)
        t = Tensors(file)
        e, hd = p.n_embd, p.head_dim
        n_kv = p.n_head_kv * hd

        def head_norm(name: str, heads: int) -> np.ndarray | None:
            return t.matrix(name, heads, hd).dequantize() if t.has(name) else None

        self.tok_embd = t.matrix("token_embd.weight", p.n_vocab, e)
        self.layers = []
        for i in range(p.n_layer):
            blk = f"blk.{i}"
            ffn_norm = t.optional_vector(f"{blk}.ffn_norm.weight", e)
            self.layers.append(StableLmLayer(
                attn_norm=t.vector(f"{blk}.attn_norm.weight", e),
                attn_norm_b=t.vector(f"{blk}.attn_norm.bias", e),
                wq=t.matrix(f"{blk}.attn_q.weight", e, e),
                wk=t.matrix(f"{blk}.attn_k.weight", n_kv, e),
                wv=t.matrix(f"{blk}.attn_v.weight", n_kv, e),
                bq=t.optional_vector(f"{blk}.attn_q.bias", e),
                bk=t.optional_vector(f"{blk}.attn_k.bias", n_kv),
                bv=t.optional_vector(f"{blk}.attn_v.bias", n_kv),
                q_norm=head_norm(f"{blk}.attn_q_norm.weight", p.n_head),
                k_norm=head_norm(f"{blk}.attn_k_norm.weight", p.n_head_kv),
                wo=t.matrix(f"{blk}.attn_output.weight", e, e),
                ffn_norm=ffn_norm,
                ffn_norm_b=t.vector(f"{blk}.ffn_norm.bias", e) if ffn_norm is not None else None,
                w_gate=t.matrix(f"{blk}.ffn_gate.weight", p.n_ff, e),
                w_up=t.matrix(f"{blk}.ffn_up.weight", p.n_ff, e),
                w_down=t.matrix(f"{blk}.ffn_down.weight", e, p.n_ff),
            ))
        self.output_norm = t.vector("output_norm.weight", e)
        self.output_norm_b = t.vector("output_norm.bias", e)
        self.output = t.matrix("output.weight", p.n_vocab, e) if t.has("output.weight") else self.tok_embd

    def embed(self, batch: Batch) -> np.ndarray:
        return ops.embed(self.tok_embd, batch.tokens)

    def layer(self, i: int, x: np.ndarray, batch: Batch) -> np.ndarray:
        p = self.params
        layer = self.layers[i]
        n = batch.n_tok
        hd = p.head_dim
        h = ops.layer_norm(x, layer.attn_norm, layer.attn_norm_b, p.norm_eps)
        q = add_bias(ops.linear(h, layer.wq), layer.bq).reshape(n, p.n_head, hd)
        k = add_bias(ops.linear(h, layer.wk), layer.bk).reshape(n, p.n_head_kv, hd)
        v = add_bias(ops.linear(h, layer.wv), layer.bv).reshape(n, p.n_head_kv, hd)
        if layer.q_norm is not None:
            q = per_head_layer_norm(q, layer.q_norm, p.norm_eps)
        if layer.k_norm is not None:
            k = per_head_layer_norm(k, layer.k_norm, p.norm_eps)
        ops.rope(q, batch.positions, p.n_rot, p.rope_theta, 1.0, neox=True)
        ops.rope(k, batch.positions, p.n_rot, p.rope_theta, 1.0, neox=True)
        attn = ops.linear(batch.attention(i, q, k, v, 1.0 / math.sqrt(hd)).reshape(n, p.n_embd), layer.wo)
        if layer.ffn_norm is None:  # parallel residual: the MLP reads the attention's input norm
            x += attn + self.mlp(h, layer)
        else:
            x += attn
            x += self.mlp(ops.layer_norm(x, layer.ffn_norm, layer.ffn_norm_b, p.norm_eps), layer)
        return x

    def head(self, x: np.ndarray, hidden_only: bool = False) -> np.ndarray:
        h = ops.layer_norm(x, self.output_norm, self.output_norm_b, self.params.norm_eps)
        return h if hidden_only else ops.linear(h, self.output)  # hidden_only: embeddings

    @staticmethod
    def mlp(h: np.ndarray, layer: StableLmLayer) -> np.ndarray:
        return ops.linear(ops.swiglu(ops.linear(h, layer.w_gate), ops.linear(h, layer.w_up)), layer.w_down)
