"""The pre-norm decoder that LLaMA, Mistral, Qwen2, Qwen3 and Phi-3 share; each architecture file
picks its options (RoPE pairing, biases, per-head q/k norms) and stays a few lines.

    x = embed(tokens)
    for each layer:
        h = rms_norm(x)
        q, k, v = h Wq (+bq), h Wk (+bk), h Wv (+bv)
        q, k = rms_norm(q), rms_norm(k) per head             (Qwen3: attn_q_norm / attn_k_norm)
        rope(q, k)                                           (freq_factors: rope_freqs.weight)
        x = x + attention(q, k, v) Wo                        (sliding window: attention.sliding_window)
        h = rms_norm(x) ; x = x + (silu(h Wgate) * h Wup) Wdown
    logits = rms_norm(x) Woutput                             (tied: Woutput = Wembed)

Phi-3's fused projections fit too: ``attn_qkv`` ([q | k | v] rows) in place of Wq, Wk, Wv (as
llama.cpp, whenever the file has one), and, with ``FUSED_GATE_UP``, ``ffn_up`` of 2 * n_ff rows
([gate | up]) in place of Wgate and Wup.

Heads may be narrower or wider than n_embd / n_head (``attention.key_length``, Mistral-Nemo,
Qwen3): Wq is (n_head * head_dim, n_embd) and Wo (n_embd, n_head * head_dim).
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
from engine.model import check_interrupt
from engine.rope import RopeScaling
from engine.weights import Weight


@dataclass(frozen=True)
class DecoderParams:
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_ctx_train: int
    head_dim: int
    n_rot: int
    rms_eps: float
    rope_theta: float
    rope_scale: float  # linear scaling: positions are divided by this
    rope: RopeScaling  # every scaling the file says (linear, YaRN, attn_factor), engine/rope.py
    sliding_window: int  # 0: none

    @classmethod
    def from_file(cls, file: GGUFFile, arch: str) -> DecoderParams:
        hp = HParams(file, arch)
        n_embd = hp.int("embedding_length")
        n_head = hp.int("attention.head_count")
        n_head_kv = hp.int("attention.head_count_kv", n_head)
        if n_embd % n_head and f"{arch}.attention.key_length" not in file.metadata:
            raise file_error(file.path, f"inconsistent attention shape: {n_embd} dims, {n_head} heads "
                                        f"(and no {arch}.attention.key_length)")
        head_dim = hp.int("attention.key_length", n_embd // n_head)
        value_dim = hp.int("attention.value_length", head_dim)
        if value_dim != head_dim:
            raise file_error(file.path, f"{arch}.attention.value_length {value_dim} != key_length {head_dim} "
                                        "is not supported")
        n_rot = hp.int("rope.dimension_count", head_dim)
        if n_head % n_head_kv or n_rot > head_dim or n_rot % 2:
            raise file_error(file.path, f"inconsistent attention shape: {n_head} heads, {n_head_kv} KV heads, "
                                        f"head size {head_dim}, {n_rot} rotary dims")
        n_ctx_train = hp.int("context_length", 2048)
        rope = RopeScaling.from_hparams(hp, n_ctx_train)
        return cls(
            n_vocab=hp.vocab_size(),
            n_embd=n_embd,
            n_layer=hp.int("block_count"),
            n_head=n_head,
            n_head_kv=n_head_kv,
            n_ff=hp.int("feed_forward_length"),
            n_ctx_train=n_ctx_train,
            head_dim=head_dim,
            n_rot=n_rot,
            rms_eps=hp.float("attention.layer_norm_rms_epsilon", 1e-5, minimum=0.0),
            rope_theta=hp.float("rope.freq_base", 10000.0, positive=True),
            rope_scale=rope.factor if rope.kind == "linear" else 1.0,
            rope=rope,
            sliding_window=hp.int("attention.sliding_window", 0, minimum=0),
        )


def hp_original_context(file: GGUFFile, arch: str, n_ctx_train: int) -> int:
    """llama.cpp's n_ctx_orig_yarn: ``rope.scaling.original_context_length``, else the training context."""
    return HParams(file, arch).int("rope.scaling.original_context_length", n_ctx_train)


@dataclass
class DecoderLayer:
    attn_norm: np.ndarray
    wqkv: Weight | None  # fused [q | k | v] rows (Phi-3's attn_qkv); None: wq, wk, wv
    wq: Weight | None
    wk: Weight | None
    wv: Weight | None
    bq: np.ndarray | None
    bk: np.ndarray | None
    bv: np.ndarray | None
    q_norm: np.ndarray | None
    k_norm: np.ndarray | None
    wo: Weight
    ffn_norm: np.ndarray
    w_gate: Weight | None  # None: w_up holds [gate | up] rows (Phi-3's fused ffn_up, 2 * n_ff rows)
    w_up: Weight
    w_down: Weight


class PreNormDecoder(Decoder):
    """A LLaMA-style decoder read from ``file``; subclasses set the class attributes."""

    ARCH = "llama"
    NEOX = False  # RoPE pairs: (i, i + n_rot/2) (HF rotate_half) instead of ggml's adjacent (2i, 2i+1)
    REQUIRE_QKV_BIAS = False  # Qwen2: q/k/v biases (optional elsewhere, as in llama.cpp)
    REQUIRE_QK_NORM = False  # Qwen3: per-head RMSNorm of q and k before RoPE
    FUSED_GATE_UP = False  # Phi-3: without ffn_gate, ffn_up holds [gate | up] (2 * n_ff rows)

    def __init__(self, file: GGUFFile) -> None:
        p = self.params = DecoderParams.from_file(file, self.ARCH)
        t = Tensors(file)
        n_q = p.n_head * p.head_dim
        n_kv = p.n_head_kv * p.head_dim

        def vector(name: str, n: int, required: bool) -> np.ndarray | None:
            return t.vector(name, n) if required else t.optional_vector(name, n)

        def matrix(name: str, n_out: int, present: bool) -> Weight | None:
            return t.matrix(name, n_out, p.n_embd) if present else None

        self.tok_embd = t.matrix("token_embd.weight", p.n_vocab, p.n_embd)
        self.layers = []
        for i in range(p.n_layer):
            blk = f"blk.{i}"
            # As llama.cpp's create_tensor_qkv: a fused attn_qkv when the file has one.
            fused = t.has(f"{blk}.attn_qkv.weight")
            gated = t.has(f"{blk}.ffn_gate.weight") or not self.FUSED_GATE_UP
            self.layers.append(DecoderLayer(
                attn_norm=t.vector(f"{blk}.attn_norm.weight", p.n_embd),
                wqkv=matrix(f"{blk}.attn_qkv.weight", n_q + 2 * n_kv, fused),
                wq=matrix(f"{blk}.attn_q.weight", n_q, not fused),
                wk=matrix(f"{blk}.attn_k.weight", n_kv, not fused),
                wv=matrix(f"{blk}.attn_v.weight", n_kv, not fused),
                bq=vector(f"{blk}.attn_q.bias", n_q, self.REQUIRE_QKV_BIAS),
                bk=vector(f"{blk}.attn_k.bias", n_kv, self.REQUIRE_QKV_BIAS),
                bv=vector(f"{blk}.attn_v.bias", n_kv, self.REQUIRE_QKV_BIAS),
                q_norm=vector(f"{blk}.attn_q_norm.weight", p.head_dim, self.REQUIRE_QK_NORM),
                k_norm=vector(f"{blk}.attn_k_norm.weight", p.head_dim, self.REQUIRE_QK_NORM),
                wo=t.matrix(f"{blk}.attn_output.weight", p.n_embd, n_q),
                ffn_norm=t.vector(f"{blk}.ffn_norm.weight", p.n_embd),
                w_gate=matrix(f"{blk}.ffn_gate.weight", p.n_ff, gated),
                w_up=t.matrix(f"{blk}.ffn_up.weight", p.n_ff if gated else 2 * p.n_ff, p.n_embd),
                w_down=t.matrix(f"{blk}.ffn_down.weight", p.n_embd, p.n_ff),
            ))
        self.output_norm = t.vector("output_norm.weight", p.n_embd)
        # Tied embeddings: no output tensor, the embedding matrix doubles as the head.
        self.output = t.matrix("output.weight", p.n_vocab, p.n_embd) if t.has("output.weight") else self.tok_embd
        # Llama 3.1's RoPE scaling: per-pair frequency divisors (llama.cpp's rope_freqs.weight).
        # LongRoPE (Phi-3 128k): short factors, long ones when a sequence's context is longer than the
        # original one (as llama.cpp's get_rope_factors, which decides by the context size).
        divisors = {}
        for name in ("rope_freqs", "rope_factors_short", "rope_factors_long"):
            divisors[name] = t.optional_vector(f"{name}.weight", p.n_rot // 2)
            if divisors[name] is not None and not (np.all(np.isfinite(divisors[name])) and np.all(divisors[name] > 0)):
                raise file_error(file.path, f"tensor '{name}.weight' must hold positive finite numbers")
        self.rope_freqs = divisors["rope_freqs"]
        short = divisors["rope_freqs"] if divisors["rope_freqs"] is not None else divisors["rope_factors_short"]
        long = divisors["rope_freqs"] if divisors["rope_freqs"] is not None else divisors["rope_factors_long"]
        self.rotation_short = p.rope.rotation(p.n_rot, p.rope_theta, short)
        self.rotation_long = p.rope.rotation(p.n_rot, p.rope_theta, long if long is not None else short)
        self.original_context = p.rope.original_context or hp_original_context(file, self.ARCH, p.n_ctx_train)

    def run_layers(self, x: np.ndarray, batch: Batch, first: int, last: int) -> np.ndarray:
        """One token of one sequence through layers with separate q/k/v and gate/up products (biases
        and q/k norms allowed) runs as one compiled step (ops.compiled_decode_stack) when their weights allow; the rest
        runs the layer code."""
        step = self._compiled_step(batch, first, last)
        if step is None or not (x.dtype == np.float32 and x.flags.c_contiguous and x.flags.writeable):
            return super().run_layers(x, batch, first, last)
        check_interrupt()
        p = self.params
        seq = batch.sequences[0]
        cache = seq.cache
        lo, hi = first - batch.first_layer, last - batch.first_layer
        scale, divisors, magnitude = self.rotation(batch)
        if not step(x, cache.k[lo:hi], cache.v[lo:hi], seq.n_past, p.n_rot, p.rope_theta, scale, self.NEOX,
                    divisors, magnitude, p.sliding_window):
            return super().run_layers(x, batch, first, last)  # the step is still being compiled
        cache.n_past = seq.n_past + 1  # as the layer code's stores leave it
        return x

    def _compiled_step(self, batch: Batch, first: int, last: int):
        # exactly this class's layer code (Gemma's is its own), on a plain cache with room left
        if (batch.n_tok != 1 or len(batch.sequences) != 1 or not ops.COMPILED_DECODE
                or type(self).layer is not PreNormDecoder.layer):
            return None
        seq = batch.sequences[0]
        cache = seq.cache
        if cache.type_k not in ("f16", "f32") or cache.type_v != cache.type_k or seq.n_past >= cache.n_ctx:
            return None
        layers = self.layers[first:last]
        for layer in layers:
            if layer is None or layer.wqkv is not None or layer.w_gate is None or any(
                    getattr(w, "lora", ()) for w in (layer.wq, layer.wk, layer.wv, layer.wo, layer.w_gate,
                                                     layer.w_up, layer.w_down)):
                return None
        key = (first, last, ops.kernel_path(), tuple(id(layer) for layer in layers))
        steps = self.__dict__.setdefault("_compiled_steps", {})
        if key not in steps:
            p = self.params
            steps[key] = ops.compiled_decode_stack(layers, p.n_embd, p.n_head, p.n_head_kv, p.head_dim, p.n_ff,
                                                   p.rms_eps)
        return steps[key]

    def rotation(self, batch: Batch) -> tuple[float, np.ndarray | None, float]:
        """(position scale, frequency divisors, magnitude) for this batch's RoPE."""
        longest = max(seq.cache.n_ctx for seq in batch.sequences)
        return self.rotation_long if longest > self.original_context else self.rotation_short

    def embed(self, batch: Batch) -> np.ndarray:
        return ops.embed(self.tok_embd, batch.tokens)

    def layer(self, i: int, x: np.ndarray, batch: Batch) -> np.ndarray:
        p = self.params
        layer = self.layers[i]
        n = batch.n_tok
        positions = batch.positions
        h = ops.rms_norm(x, layer.attn_norm, p.rms_eps)
        if layer.wqkv is not None:
            qkv = ops.linear(h, layer.wqkv)
            n_q, n_kv = p.n_head * p.head_dim, p.n_head_kv * p.head_dim
            q, k, v = qkv[:, :n_q], qkv[:, n_q : n_q + n_kv], qkv[:, n_q + n_kv :]
        else:
            q, k, v = ops.linears(h, layer.wq, layer.wk, layer.wv)
        if layer.bq is not None:
            q += layer.bq
        if layer.bk is not None:
            k += layer.bk
        if layer.bv is not None:
            v += layer.bv
        q = np.ascontiguousarray(q).reshape(n, p.n_head, p.head_dim)
        k = np.ascontiguousarray(k).reshape(n, p.n_head_kv, p.head_dim)
        v = v.reshape(n, p.n_head_kv, p.head_dim)
        if layer.q_norm is not None:
            q = ops.rms_norm(q, layer.q_norm, p.rms_eps)
        if layer.k_norm is not None:
            k = ops.rms_norm(k, layer.k_norm, p.rms_eps)
        scale, divisors, magnitude = self.rotation(batch)
        ops.rope(q, positions, p.n_rot, p.rope_theta, scale, self.NEOX, divisors, magnitude)
        ops.rope(k, positions, p.n_rot, p.rope_theta, scale, self.NEOX, divisors, magnitude)
        attn = batch.attention(i, q, k, v, 1.0 / math.sqrt(p.head_dim), window=p.sliding_window)
        x += ops.linear(attn.reshape(n, p.n_head * p.head_dim), layer.wo)
        h = ops.rms_norm(x, layer.ffn_norm, p.rms_eps)
        if layer.w_gate is not None:
            gate, up = ops.linears(h, layer.w_gate, layer.w_up)
        else:
            gate_up = ops.linear(h, layer.w_up)
            gate, up = gate_up[:, : p.n_ff], gate_up[:, p.n_ff :]
        x += ops.linear(ops.swiglu(gate, up), layer.w_down)
        return x

    def head(self, x: np.ndarray, hidden_only: bool = False) -> np.ndarray:
        h = ops.rms_norm(x, self.output_norm, self.params.rms_eps)
        return h if hidden_only else ops.linear(h, self.output)  # hidden_only: embeddings
