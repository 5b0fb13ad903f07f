"""Gemma (GGUF ``gemma``) and Gemma 2 (``gemma2``), as llama.cpp's graphs compute them:

    x = embed(tokens) * sqrt(n_embd)
    for each layer:
        h = rms_norm(x) ; q, k, v = h Wq, h Wk, h Wv ; rope(q, k)           (neox pairs)
        a = attention(q, k, v) Wo                                          (Gemma 2: softcap, window)
        x = x + a                                                          (Gemma 2: x + rms_norm(a))
        h = rms_norm(x) ; f = (gelu_tanh(h Wgate) * h Wup) Wdown
        x = x + f                                                          (Gemma 2: x + rms_norm(f))
    logits = rms_norm(x) Wembed                                            (Gemma 2: softcap)

The norm weights in the file already hold transformers' ``1 + w`` (converters/gemma.py, as
llama.cpp's converter). The head is always the token embedding (llama.cpp's Gemma graphs never read
``output.weight``). Heads are ``attention.key_length`` wide (256 on the released models). RoPE
scaling keys (linear, YaRN) apply as for the other architectures (engine/rope.py); per-pair factor
tensors are not read, as in llama.cpp's Gemma graphs.

Gemma 2, as llama.cpp's ``gemma2`` hparams and graph:
- attention scores ``s`` become ``c * tanh(s / c)`` with ``c = gemma2.attn_logit_softcapping``
  (default 50), the logits likewise with ``gemma2.final_logit_softcapping`` (default 30);
- sliding-window attention (``gemma2.attention.sliding_window``, default 4096) on the layers of
  ``attention.sliding_window_pattern`` (a bool per layer, or a period n: layer i slides when
  i % n < n - 1; default 2: the even layers), full attention on the others;
  ``rope.freq_base_swa`` (default ``rope.freq_base``) on the sliding ones;
- queries scaled by 1/sqrt(n_embd / n_head) on the 46-layer model (27B), 1/sqrt(head_dim) on any
  other: transformers' ``query_pre_attn_scalar`` of the released models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np

from engine import ops
from engine.batch import Batch
from engine.errors import file_error
from engine.gguf_file import GGUFFile
from engine.hparams import HParams, Tensors
from models.blocks import DecoderLayer, PreNormDecoder


@dataclass
class GemmaLayer(DecoderLayer):
    post_attn_norm: np.ndarray | None = None  # Gemma 2: blk.N.post_attention_norm
    post_ffn_norm: np.ndarray | None = None  # Gemma 2: blk.N.post_ffw_norm


class Gemma(PreNormDecoder):
    ARCH = "gemma"
    NEOX = True
    POST_NORMS = False

    def __init__(self, file: GGUFFile) -> None:
        super().__init__(file)
        p = self.params
        t = Tensors(file)
        self.output = self.tok_embd  # as llama.cpp: the head is token_embd, whatever else the file holds
        self.embed_scale = np.float32(math.sqrt(p.n_embd))
        self.attn_scale = 1.0 / math.sqrt(p.head_dim)
        self.attn_softcap = 0.0
        self.final_softcap = 0.0
        self.windows = [0] * p.n_layer
        self.set_rope_bases([p.rope_theta] * p.n_layer)
        self.layers = [
            GemmaLayer(
                **{f.name: getattr(layer, f.name) for f in fields(DecoderLayer)},
                post_attn_norm=t.vector(f"blk.{i}.post_attention_norm.weight", p.n_embd) if self.POST_NORMS else None,
                post_ffn_norm=t.vector(f"blk.{i}.post_ffw_norm.weight", p.n_embd) if self.POST_NORMS else None,
            )
            for i, layer in enumerate(self.layers)
        ]

    def set_rope_bases(self, thetas: list[float]) -> None:
        """Each layer's RoPE base and rotation (the file's scaling: linear, YaRN, attn_factor, as
        llama.cpp's ggml_rope_ext; no per-pair factors, which llama.cpp's Gemma graphs do not read)."""
        p = self.params
        self.thetas = thetas
        self.rotations = [p.rope.rotation(p.n_rot, theta, None) for theta in thetas]

    def embed(self, batch: Batch) -> np.ndarray:
        return np.multiply(ops.embed(self.tok_embd, batch.tokens), self.embed_scale, dtype=np.float32)

    def layer(self, i: int, x: np.ndarray, batch: Batch) -> np.ndarray:
        p = self.params
        layer = self.layers[i]
        n = batch.n_tok
        h = ops.rms_norm(x, layer.attn_norm, p.rms_eps)
        if layer.wqkv is not None:
            qkv = ops.linear(h, layer.wqkv)
            n_q, n_kv = p.n_head * p.head_dim, p.n_head_kv * p.head_dim
            q, k, v = qkv[:, :n_q], qkv[:, n_q : n_q + n_kv], qkv[:, n_q + n_kv :]
        else:
            q, k, v = ops.linears(h, layer.wq, layer.wk, layer.wv)
        for values, bias in ((q, layer.bq), (k, layer.bk), (v, layer.bv)):
            if bias is not None:
                values += bias
        q = np.ascontiguousarray(q).reshape(n, p.n_head, p.head_dim)
        k = np.ascontiguousarray(k).reshape(n, p.n_head_kv, p.head_dim)
        v = v.reshape(n, p.n_head_kv, p.head_dim)
        scale, divisors, magnitude = self.rotations[i]
        ops.rope(q, batch.positions, p.n_rot, self.thetas[i], scale, True, divisors, magnitude)
        ops.rope(k, batch.positions, p.n_rot, self.thetas[i], scale, True, divisors, magnitude)
        attn = batch.attention(i, q, k, v, self.attn_scale, window=self.windows[i], softcap=self.attn_softcap)
        out = ops.linear(attn.reshape(n, p.n_head * p.head_dim), layer.wo)
        if layer.post_attn_norm is not None:
            out = ops.rms_norm(out, layer.post_attn_norm, p.rms_eps)
        x += out
        h = ops.rms_norm(x, layer.ffn_norm, p.rms_eps)
        act = ops.gelu_tanh(ops.linear(h, layer.w_gate))
        act *= ops.linear(h, layer.w_up)
        out = ops.linear(act, layer.w_down)
        if layer.post_ffn_norm is not None:
            out = ops.rms_norm(out, layer.post_ffn_norm, p.rms_eps)
        x += out
        return x

    def head(self, x: np.ndarray, hidden_only: bool = False) -> np.ndarray:
        h = ops.rms_norm(x, self.output_norm, self.params.rms_eps)
        if hidden_only:  # embeddings: the normed rows, before the output and its soft-capping
            return h
        logits = ops.linear(h, self.output)
        if self.final_softcap > 0:
            logits /= np.float32(self.final_softcap)
            np.tanh(logits, out=logits)
            logits *= np.float32(self.final_softcap)
        return logits


class Gemma2(Gemma):
    ARCH = "gemma2"
    POST_NORMS = True

    def __init__(self, file: GGUFFile) -> None:
        super().__init__(file)
        p = self.params
        hp = HParams(file, self.ARCH)
        self.attn_softcap = hp.float("attn_logit_softcapping", 50.0, positive=True)
        self.final_softcap = hp.float("final_logit_softcapping", 30.0, positive=True)
        if p.n_layer == 46:  # llama.cpp: LLM_TYPE_27B
            self.attn_scale = 1.0 / math.sqrt(p.n_embd // p.n_head)
        window = hp.int("attention.sliding_window", 4096)
        theta_swa = hp.float("rope.freq_base_swa", p.rope_theta, positive=True)
        sliding = self.sliding_layers(file, p.n_layer)
        self.windows = [window if slides else 0 for slides in sliding]
        self.set_rope_bases([theta_swa if slides else p.rope_theta for slides in sliding])

    @classmethod
    def sliding_layers(cls, file: GGUFFile, n_layer: int) -> list[bool]:
        """llama.cpp's load_swa_pattern(2): a bool per layer, or a period (default 2)."""
        key = f"{cls.ARCH}.attention.sliding_window_pattern"
        pattern = file.metadata.get(key)
        if isinstance(pattern, np.ndarray) and pattern.dtype == np.bool_:
            if pattern.shape != (n_layer,):
                raise file_error(file.path, f"metadata {key} lists {pattern.size} layers, the model has {n_layer}")
            return [bool(slides) for slides in pattern]
        period = HParams(file, cls.ARCH).int("attention.sliding_window_pattern", 2, minimum=0)
        return [period == 0 or i % period < period - 1 for i in range(n_layer)]
