"""What the Python between a decode step's kernels costs: the model's layers as they run (models/blocks.py,
one Python call per norm, product, RoPE, attention...) against the same kernels called in the same
order from one compiled function, for one generated token.

Both paths run the engine's own kernels (RMSNorm, Q8_0 activation quantization, the Q4_0 matrix-vector
products, RoPE, the attention tile, SwiGLU) on the same weights; the compiled one only removes the
Python between them. Their outputs are checked equal first (the same kernels on the same numbers give
the same bits), then alternated rounds time the layers alone (no embedding, no output head).

    python bench/bench_decode_step.py [MODEL] [--tokens 60] [--rounds 5]

MODEL: a LLaMA-family Q4_0 GGUF without biases, q/k norms or fused projections (default: the synthetic
1.1B-shape file, ``halfbyte bench --synthetic llama-1b``). Measurement only: the compiled function here
is built for this bench (plain ``@njit``, which links and re-optimizes every kernel it calls: about
10 s to compile on first use, which is what an engine version would have to avoid).
Not a test: figures depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
from numba import njit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.kernels import attention as att  # noqa: E402
from engine.kernels import ops as kops  # noqa: E402
from engine.kernels import simd  # noqa: E402


@njit
def compiled_layers(x, positions, factors, attn_norms, ffn_norms, wq, wk, wv, wo, w_gate, w_up, w_down, k_caches,
                    v_caches, eps, theta, n_rot, tile_address, slopes, scratch):
    """models/blocks.py's PreNormDecoder.layer for one token at ``positions[0]``, every layer in turn."""
    h, q, k, v, attn, o, gate, up, act, down = scratch
    pos = int(positions[0])
    scale = np.float32(1.0 / math.sqrt(q.shape[2]))
    for i in range(len(wq)):
        kops._rms_norm_kernel(x, attn_norms[i], eps, h)
        xq, xs, xsum = simd.quantize_activations_q8_0(h[0])
        simd.matvec_q4_0(wq[i], xq, xs, xsum, q.reshape(-1))
        simd.matvec_q4_0(wk[i], xq, xs, xsum, k.reshape(-1))
        simd.matvec_q4_0(wv[i], xq, xs, xsum, v.reshape(-1))
        kops._rope_kernel(q, positions, n_rot, theta, 1.0, False, factors, q)
        kops._rope_kernel(k, positions, n_rot, theta, 1.0, False, factors, k)
        k_caches[i][pos] = k[0]
        v_caches[i][pos] = v[0]
        att._attend_kernel(tile_address, q, k_caches[i], v_caches[i], pos, scale, slopes, False, 0,
                           np.float32(0.0), attn)
        xq, xs, xsum = simd.quantize_activations_q8_0(attn.reshape(-1))
        simd.matvec_q4_0(wo[i], xq, xs, xsum, o.reshape(-1))
        x += o
        kops._rms_norm_kernel(x, ffn_norms[i], eps, h)
        xq, xs, xsum = simd.quantize_activations_q8_0(h[0])
        simd.matvec_q4_0(w_gate[i], xq, xs, xsum, gate)
        simd.matvec_q4_0(w_up[i], xq, xs, xsum, up)
        kops._swiglu_kernel(gate, up, act)
        xq, xs, xsum = simd.quantize_activations_q8_0(act)
        simd.matvec_q4_0(w_down[i], xq, xs, xsum, down.reshape(-1))
        x += down


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default=str(Path.home() / ".cache/halfbyte/synthetic/llama-1b-q4_0.gguf"))
    parser.add_argument("--tokens", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    from engine.batch import Batch
    from engine.kernels.matmul import slp_scope
    from engine.machine import cpu_info
    from engine.model import Model

    model = Model.load(args.model, n_ctx=args.tokens * (args.rounds + 1) + 64, threads=2, kv_type="f32")
    arch, p = model.arch, model.arch.params
    layers = arch.layers
    if any(getattr(layer, name) is None or layer.wq.ggml_type.name != "Q4_0"
           for layer in layers for name in ("wq", "wk", "wv", "w_gate")) or p.n_rot != p.head_dim:
        sys.exit(f"{args.model}: this bench needs a LLaMA-style Q4_0 file with separate q/k/v and gate/up")
    weights = [tuple(getattr(layer, name).data for layer in layers)
               for name in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")]
    n_ctx = model.n_ctx
    k_caches = tuple(np.zeros((n_ctx, p.n_head_kv, p.head_dim), np.float32) for _ in layers)
    v_caches = tuple(np.zeros((n_ctx, p.n_head_kv, p.head_dim), np.float32) for _ in layers)
    q = np.zeros((1, p.n_head, p.head_dim), np.float32)
    k = np.zeros((1, p.n_head_kv, p.head_dim), np.float32)
    scratch = (np.zeros((1, p.n_embd), np.float32), q, k, np.zeros_like(k), np.zeros_like(q),
               np.zeros((1, p.n_embd), np.float32), *(np.zeros(p.n_ff, np.float32) for _ in range(3)),
               np.zeros((1, p.n_embd), np.float32))
    slopes = np.zeros(p.n_head, np.float32)
    factors = np.ones(p.n_rot // 2, np.float32)
    with slp_scope():
        tile = att._tile_address(att._attend_tile, (q, k_caches[0], v_caches[0], 0, np.float32(1.0), slopes, False,
                                                    0, np.float32(0.0), scratch[4]))
    norms = (tuple(layer.attn_norm for layer in layers), tuple(layer.ffn_norm for layer in layers))

    def compiled_token(position: int, x: np.ndarray) -> np.ndarray:
        compiled_layers(x, np.array([float(position)]), factors, *norms, *weights, k_caches, v_caches,
                        np.float32(p.rms_eps), float(p.rope_theta), p.n_rot, tile, slopes, scratch)
        return x

    def python_token(token: int, x: np.ndarray) -> np.ndarray:
        batch = Batch.single(np.array([token]), model.n_past, model.cache)
        out = arch.run_layers(x, batch, 0, len(layers))
        model.tokens.append(token)
        return out

    rng = np.random.default_rng(0)
    with slp_scope():
        print("compiling the bench's function (about 10 s)...", file=sys.stderr)
        for position in range(8):  # the same 8 tokens' hidden states through both paths, compared
            x = rng.standard_normal((1, p.n_embd)).astype(np.float32)
            ours, theirs = compiled_token(position, x.copy()), python_token(1, x.copy())
            if not np.array_equal(ours, theirs):
                sys.exit(f"the compiled layers differ from the model's at position {position}: "
                         f"{np.abs(ours - theirs).max()}")
        print(f"CPU: {cpu_info()}; {args.model}; 2 threads; ms per token, layers only")
        for round_ in range(args.rounds):
            times = {}
            for name, step in (("compiled", compiled_token), ("python", python_token)):
                start_pos = model.n_past
                x = rng.standard_normal((1, p.n_embd)).astype(np.float32)
                begin = time.perf_counter()
                for t in range(args.tokens):
                    step(start_pos + t if name == "compiled" else 1, x.copy())
                times[name] = (time.perf_counter() - begin) / args.tokens * 1e3
            print(f"round {round_ + 1}: compiled {times['compiled']:.2f}, model's layers {times['python']:.2f}")


if __name__ == "__main__":
    main()
