"""Throughput of the weight-matrix kernels, per weight type and thread count.

    python bench/bench_matmul.py                       # all types, 1 and 2 threads
    python bench/bench_matmul.py --types q4_0,q8_0 --threads 1,2,4 --batch 64

matvec (decode): GB/s of weight bytes streamed, for 4096x4096 (attention) and
11008x4096 (LLaMA-7B FFN: n_out = 11008, n_in = 4096) matrices; the activations are
quantized inside each call, as in real use. matmul (prompt processing): tokens/s for a
batch of ``--batch`` tokens through the 4096x4096 matrix. Times are the best of
``--repeat`` runs after a warm-up (which also compiles, or loads the Numba cache).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numba
import numpy as np
from gguf import GGMLQuantizationType, quants

from engine.kernels.matmul import WeightView, matmul, matvec

TYPES = {
    "f32": GGMLQuantizationType.F32,
    "f16": GGMLQuantizationType.F16,
    "bf16": GGMLQuantizationType.BF16,
    "q8_0": GGMLQuantizationType.Q8_0,
    "q5_1": GGMLQuantizationType.Q5_1,
    "q5_0": GGMLQuantizationType.Q5_0,
    "q4_1": GGMLQuantizationType.Q4_1,
    "q4_0": GGMLQuantizationType.Q4_0,
}
SHAPES = ((4096, 4096), (11008, 4096))  # (n_out, n_in)


def make_weight(qtype: GGMLQuantizationType, n_out: int, n_in: int, rng: np.random.Generator) -> WeightView:
    dense = rng.standard_normal((n_out, n_in), dtype=np.float32) * np.float32(0.02)
    if qtype == GGMLQuantizationType.F32:
        raw = dense
    elif qtype == GGMLQuantizationType.F16:
        raw = dense.astype(np.float16)
    else:
        # Quantize a band of rows and tile it: the kernels' speed does not depend on the
        # values, and quantizing 45M floats with gguf's numpy code would take minutes.
        band = quants.quantize(dense[:256], qtype)
        raw = np.ascontiguousarray(np.resize(band, (n_out, band.shape[1])))
        if qtype == GGMLQuantizationType.BF16:
            raw = raw.view(np.uint16)
    return WeightView.from_raw(qtype, (n_in, n_out), raw)


def best_time(fn: Callable[[], object], repeat: int, min_seconds: float = 0.2) -> float:
    fn()  # warm-up / compile
    best = float("inf")
    for _ in range(repeat):
        calls = 0
        start = time.perf_counter()
        while True:
            fn()
            calls += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds:
                break
        best = min(best, elapsed / calls)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--types", default=",".join(TYPES), help="comma-separated weight types")
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    parser.add_argument("--batch", type=int, default=64, help="tokens per matmul")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    threads = [min(int(t), numba.config.NUMBA_NUM_THREADS) for t in args.threads.split(",")]
    rng = np.random.default_rng(0)

    header = ["type", "threads"] + [f"matvec {o}x{i} GB/s" for o, i in SHAPES] + [f"matmul {args.batch}tok tok/s"]
    print(" | ".join(header))
    print(" | ".join("-" * len(h) for h in header))
    for name in args.types.split(","):
        qtype = TYPES[name.strip().lower()]
        weights = [make_weight(qtype, n_out, n_in, rng) for n_out, n_in in SHAPES]
        xs = [rng.standard_normal(w.n_in, dtype=np.float32) for w in weights]
        outs = [np.empty(w.n_out, np.float32) for w in weights]
        batch = rng.standard_normal((args.batch, weights[0].n_in), dtype=np.float32)
        batch_out = np.empty((args.batch, weights[0].n_out), np.float32)
        for n_threads in threads:
            numba.set_num_threads(n_threads)
            cells = [name, str(n_threads)]
            for w, x, y in zip(weights, xs, outs):
                seconds = best_time(lambda w=w, x=x, y=y: matvec(w, x, out=y), args.repeat)
                cells.append(f"{w.nbytes / seconds / 1e9:.2f}")
            seconds = best_time(lambda w=weights[0], x=batch, y=batch_out: matmul(w, x, out=y), args.repeat,
                                min_seconds=0.5)
            cells.append(f"{args.batch / seconds:.0f}")
            print(" | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
