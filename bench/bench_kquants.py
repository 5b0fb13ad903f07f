"""Throughput of the K-quant products (Q4_K, Q5_K, Q6_K: llama-quantize's types), and of the types
added for llama-quantize's other mixes (IQ4_XS, IQ4_NL, Q3_K, Q2_K) and two of its low-bit types (IQ2_XXS,
TQ2_0: integer kernels in engine/kernels/iquant_simd.py; their "float" path is gguf's numpy dequantizer, so
a small shape).

Three paths per shape: "float" (engine/kernels/kquants.py: the weights dequantized and dotted with
float activations, the reference path), "portable" and "host" (integer products against Q8_K activations,
portable IR / this CPU's ISA: engine/kernels/kquant_simd.py for one token, kquant_gemm.py's lane products
for batches). Matrix-vector figures are
GB/s of weight bytes, batched ones tokens/s; the activation quantization is included in the time.
Each figure is the best of several runs (the machine is shared: best-of is the least noisy).

    python bench/bench_kquants.py                 # ~1-2 min incl. compiling
    python bench/bench_kquants.py --threads 2

Shapes (n_out x n_in): 32000x2048 is TinyLlama's output layer (Q6_K in llama-quantize's files),
5632x2048 its FFN up/gate (Q4_K in Q4_K_M), 4096x4096 a LLaMA-7B attention projection.

The other types go through the public products (engine.kernels.matmul) on weights quantized by
halfbyte's writers: "float" is the ``HALFBYTE_KERNELS=reference`` path (rows dequantized in chunks, float
dots), "portable"/"host" the integer kernels (every type here has them).

    python bench/bench_kquants.py --types iq4_xs iq4_nl q3_k q2_k --threads 1
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numba
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from engine.kernels import kquant_gemm, kquant_simd, kquants
from engine.kernels.matmul import _call

SHAPES = [("q6_k", 32000, 2048), ("q4_k", 5632, 2048), ("q5_k", 5632, 2048), ("q4_k", 4096, 4096)]
NEW_SHAPES = [("iq4_xs", 5632, 2048), ("iq4_nl", 5632, 2048), ("q3_k", 5632, 2048), ("q2_k", 5632, 2048),
              ("iq2_xxs", 512, 2048), ("tq2_0", 512, 2048)]


def random_rows(qtype: str, n_out: int, n_in: int, rng: np.random.Generator) -> np.ndarray:
    kind = GGMLQuantizationType[qtype.upper()]
    block_size, type_size = GGML_QUANT_SIZES[kind]
    raw = rng.integers(0, 256, (n_out, n_in // block_size * type_size), dtype=np.uint8)
    blocks = raw.reshape(n_out, -1, type_size)
    halves = (rng.uniform(-1, 1, blocks.shape[:2] + (2,)) / 64).astype(np.float16).view(np.uint8)
    where = slice(208, 210) if qtype == "q6_k" else slice(0, 4)
    blocks[..., where] = halves.reshape(*blocks.shape[:2], 4)[..., : where.stop - where.start]
    return raw


def best_seconds(fn: Callable[[], None], min_runs: int = 5, min_total: float = 0.5) -> float:
    fn()  # compile / warm
    times: list[float] = []
    while len(times) < min_runs or sum(times) < min_total:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def product(qtype: str, path: str, raw: np.ndarray, x: np.ndarray, y: np.ndarray) -> Callable[[], None]:
    if path == "float":
        kind = int(GGMLQuantizationType[qtype.upper()])
        return lambda: _call(kquants.matmul, kind, raw, x, y)
    if x.shape[0] >= kquant_gemm.MIN_TOKENS:  # batches: the lane products (engine/kernels/kquant_gemm.py)
        lanes = kquant_gemm.DRIVERS[qtype][path == "portable"]
        return lambda: _call(lanes, raw, *kquant_gemm.activations_for_lanes(qtype, x), x.shape[0], y)
    fn = kquant_simd.DRIVERS[qtype][(0 if x.shape[0] == 1 else 1) + (2 if path == "portable" else 0)]
    return lambda: _call(fn, raw, *kquant_simd.activations_for(qtype, x), y)


def new_type_weight(qtype: str, n_out: int, n_in: int, rng: np.random.Generator):
    from gguf import quants as gguf_quants

    from engine import quants
    from engine.kernels.matmul import WeightView

    kind = GGMLQuantizationType[qtype.upper()]
    if kind == GGMLQuantizationType.IQ2_XXS:  # no writer anywhere in Python: random codes, a finite scale
        raw = random_rows("q4_k", n_out, n_in // 256 * 144, rng)[:, : n_in // 256 * 66]
        raw = np.ascontiguousarray(raw)
        raw.reshape(n_out, -1, 66)[..., 0:2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    else:
        dense = rng.standard_normal((n_out, n_in)).astype(np.float32)
        writer = quants.quantize if kind in quants.QUANTIZE_TYPES else gguf_quants.quantize
        raw = writer(dense, kind)
    return WeightView.from_raw(kind, (n_in, n_out), raw)


def public_product(path: str, weight, x: np.ndarray, y: np.ndarray) -> Callable[[], None]:
    from engine.kernels import matmul

    def run() -> None:
        previous = matmul.set_kernel_path({"float": "reference", "host": "auto"}.get(path, path))
        try:
            if x.shape[0] == 1:
                matmul.matvec(weight, x[0], out=y[0])
            else:
                matmul.matmul(weight, x, out=y)
        finally:
            matmul.set_kernel_path(previous)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--tokens", type=int, default=32, help="batch size of the batched figures")
    parser.add_argument("--types", nargs="+", help="only these types (default: all)")
    args = parser.parse_args()
    from engine.kernels.matmul import kernel_description

    print(f"kernels: {kernel_description()}")
    rng = np.random.default_rng(0)
    for qtype, n_out, n_in in SHAPES + NEW_SHAPES:
        if args.types and qtype not in args.types:
            continue
        if (qtype, n_out, n_in) in NEW_SHAPES:
            weight = new_type_weight(qtype, n_out, n_in, rng)
            for n_tok in (1, args.tokens):
                x = rng.standard_normal((n_tok, n_in)).astype(np.float32)
                y = np.empty((n_tok, n_out), np.float32)
                for threads in args.threads:
                    numba.set_num_threads(threads)
                    cells = []
                    for path in ("float", "portable", "host"):
                        seconds = best_seconds(public_product(path, weight, x, y), min_runs=3)
                        value = weight.nbytes / seconds / 1e9 if n_tok == 1 else n_tok / seconds
                        cells.append(f"{path} {value:8.2f}")
                    unit = "GB/s" if n_tok == 1 else "tokens/s"
                    print(f"{qtype} {n_out}x{n_in} tokens={n_tok:<3} threads={threads}  {unit:8}  " + "  ".join(cells),
                          flush=True)
            continue
        raw = random_rows(qtype, n_out, n_in, rng)
        for n_tok in (1, args.tokens):
            x = rng.standard_normal((n_tok, n_in)).astype(np.float32)
            y = np.empty((n_tok, n_out), np.float32)
            for threads in args.threads:
                numba.set_num_threads(threads)
                cells = []
                for path in ("float", "portable", "host"):
                    seconds = best_seconds(product(qtype, path, raw, x, y))
                    value = raw.nbytes / seconds / 1e9 if n_tok == 1 else n_tok / seconds
                    cells.append(f"{path} {value:8.1f}")
                unit = "GB/s" if n_tok == 1 else "tokens/s"
                print(f"{qtype} {n_out}x{n_in} tokens={n_tok:<3} threads={threads}  {unit:8}  " + "  ".join(cells))


if __name__ == "__main__":
    main()
