"""GPT-NeoX (GGUF ``gptneox``: Pythia, Dolly-v2, RedPajama-INCITE, StableLM-alpha): LayerNorm
blocks with biases everywhere, fused QKV ([all q | all k | all v] rows, as llama.cpp's converter
writes them), neox RoPE on the first ``rope.dimension_count`` dims of each head, GELU MLP.

    x = embed(tokens)
    for each layer:
        h = layer_norm(x) ; q, k, v = split(h Wqkv + bqkv) ; rope(q, k) on n_rot dims
        a = attention(q, k, v) Wo + bo
        parallel (use_parallel_residual):  x = x + a + mlp(layer_norm(x))
        sequential:                        x = x + a ; x = x + mlp(layer_norm(x))
        (mlp(h) = gelu(h Wup + bup) Wdown + bdown)
    logits = layer_norm(x) Woutput
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from engine import ops
from engine.batch import Batch
from engine.decoder import Decoder
from engine.errors import file_error
from engine.gguf_file import GGUFFile
from engine.hparams import HParams, Tensors
from engine.weights import Weight
from models.common import add_bias, split_qkv

ARCH = "gptneox"


@dataclass(frozen=True)
class GptNeoXParams:
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_ff: int
    n_ctx_train: int
    n_rot: int
    norm_eps: float
    rope_theta: float
    parallel_residual: bool

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def n_head_kv(self) -> int:
        return self.n_head

    @classmethod
    def from_file(cls, file: GGUFFile) -> GptNeoXParams:
        hp = HParams(file, ARCH)
        n_embd = hp.int("embedding_length")
        n_head = hp.int("attention.head_count")
        ops.check_heads(file, n_embd, n_head, n_head, 2)
        n_rot = hp.int("rope.dimension_count", n_embd // n_head)
        ops.check_heads(file, n_embd, n_head, n_head, n_rot)
        parallel = file.metadata.get(f"{ARCH}.use_parallel_residual", True)
        if not isinstance(parallel, (bool, np.bool_)):
            raise file_error(file.path, f"metadata {ARCH}.use_parallel_residual must be a bool, got {parallel!r}")
        return cls(
            n_vocab=hp.vocab_size(),
            n_embd=n_embd,
            n_layer=hp.int("block_count"),
            n_head=n_head,
            n_ff=hp.int("feed_forward_length"),
            n_ctx_train=hp.int("context_length", 2048),
            n_rot=n_rot,
            norm_eps=hp.float("attention.layer_norm_epsilon", 1e-5, minimum=0.0),
            rope_theta=hp.float("rope.freq_base", 10000.0, positive=True),
            parallel_residual=bool(parallel),
        )


@dataclass
class GptNeoXLayer:
    attn_norm: np.ndarray
    attn_norm_b: np.ndarray
    wqkv: Weight
    bqkv: np.ndarray | None
    wo: Weight
    bo: np.ndarray | None
    ffn_norm: np.ndarray
    ffn_norm_b: np.ndarray
    w_up: Weight
    b_up: np.ndarray | None
    w_down: Weight
    b_down: np.ndarray | None


class GptNeoX(Decoder):
    def __init__(self, file: GGUFFile) -> None:
        p = self.params = GptNeoXParams.from_file(file)
        t = Tensors(file)
        e = p.n_embd
        self.tok_embd = t.matrix("token_embd.weight", p.n_vocab, e)
        self.layers = []
        for i in range(p.n_layer):
            blk = f"blk.{i}"
            self.layers.append(GptNeoXLayer(
                attn_norm=t.vector(f"{blk}.attn_norm.weight", e),
                attn_norm_b=t.vector(f"{blk}.attn_norm.bias", e),
                wqkv=t.matrix(f"{blk}.attn_qkv.weight", 3 * e, e),
                bqkv=t.optional_vector(f"{blk}.attn_qkv.bias", 3 * e),
                wo=t.matrix(f"{blk}.attn_output.weight", e, e),
                bo=t.optional_vector(f"{blk}.attn_output.bias", e),
                ffn_norm=t.vector(f"{blk}.ffn_norm.weight", e),
                ffn_norm_b=t.vector(f"{blk}.ffn_norm.bias", e),
                w_up=t.matrix(f"{blk}.ffn_up.weight", p.n_ff, e),
                b_up=t.optional_vector(f"{blk}.ffn_up.bias", p.n_ff),
                w_down=t.matrix(f"{blk}.ffn_down.weight", e, p.n_ff),
                b_down=t.optional_vector(f"{blk}.ffn_down.bias", e),
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
        q, k, v = split_qkv(add_bias(ops.linear(h, layer.wqkv), layer.bqkv), p.n_head, p.n_head, hd)
        ops.rope(q, batch.positions, p.n_rot, p.rope_theta, 1.0, neox=True)
        ops.rope(k, batch.positions, p.n_rot, p.rope_theta, 1.0, neox=True)
        attn = batch.attention(i, q, k, v, 1.0 / math.sqrt(hd))
        attn = add_bias(ops.linear(attn.reshape(n, p.n_embd), layer.wo), layer.bo)
        if p.parallel_residual:
            h = ops.layer_norm(x, layer.ffn_norm, layer.ffn_norm_b, p.norm_eps)
            x += attn + self.mlp(h, layer)
        else:
            x += attn
            x += self.mlp(ops.layer_norm(x, layer.ffn_norm, layer.ffn_norm_b, p.norm_eps), layer)
        return x

    def head(self, x: np.ndarray, hidden_only: bool = False) -> np.ndarray:
        h = ops.layer_norm(x, self.output_norm, self.output_norm_b, self.params.norm_eps)
        return h if hidden_only else ops.linear(h, self.output)  # hidden_only: embeddings

    @staticmethod
    def mlp(h: np.ndarray, layer: GptNeoXLayer) -> np.ndarray:
        # transformers' GPT-NeoX "gelu" is the exact (erf) GELU; llama.cpp's graph uses ggml's tanh
        # approximation (a ~1e-3 difference per activation).
        up = ops.gelu(add_bias(ops.linear(h, layer.w_up), layer.b_up))
        return add_bias(ops.linear(up, layer.w_down), layer.b_down)
