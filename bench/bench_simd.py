"""Throughput of the Q4_0 / Q8_0 kernels in engine/kernels/simd.py.

Matrix-vector: GB/s of weight bytes (the ggml blocks, scales included) per second, for the plain
Numba reference (scalar loops, rows in a prange), the portable-IR path and the host-ISA path, at 1
and 2 threads. Batched: tokens per second of matmul_q4_0 / matmul_q8_0 (row-major tiles) and the 8-row interleaved
matmul_*_x8 kernels for 32 and 128 tokens.
Each figure is the best of several runs (the machine is shared: best-of is the least noisy).

    /work/venv/bin/python bench/bench_simd.py            # everything (~2-4 min incl. compiling)
    /work/venv/bin/python bench/bench_simd.py --quick    # no 400 MB matrix, no reference path

Shapes are n_out x n_in (rows x columns of the weight matrix): 4096x4096 is a LLaMA-7B attention
projection, 4096x11008 the FFN down projection, 11008x4096 up/gate.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import numba
import numpy as np
from numba import njit, prange

from engine.kernels import simd

QK = simd.QK
BLOCK_BYTES = {"q4_0": simd.Q4_0_BLOCK_BYTES, "q8_0": simd.Q8_0_BLOCK_BYTES}


# Not cache=True: Numba's cache of a caller is not invalidated when a callee in another file
# (simd.py) changes, so a cached wrapper here could silently run stale kernels.
@njit(parallel=True)
def matvec_q4_0_reference(w_raw, xq, xscales, xsums, out):  # xsums unused: same call shape as the fast paths
    for r in prange(w_raw.shape[0]):
        out[r] = simd.q4_0_row_dot_ref(w_raw[r], xq, xscales)


@njit(parallel=True)
def matvec_q8_0_reference(w_raw, xq, xscales, out):
    for r in prange(w_raw.shape[0]):
        out[r] = simd.q8_0_row_dot_ref(w_raw[r], xq, xscales)


MATVEC = {
    ("q4_0", "reference"): matvec_q4_0_reference,
    ("q4_0", "generic"): simd.matvec_q4_0_generic,
    ("q4_0", "host"): simd.matvec_q4_0,
    ("q8_0", "reference"): matvec_q8_0_reference,
    ("q8_0", "generic"): simd.matvec_q8_0_generic,
    ("q8_0", "host"): simd.matvec_q8_0,
}
MATMUL = {
    ("q4_0", "generic"): simd.matmul_q4_0_generic,
    ("q4_0", "host"): simd.matmul_q4_0,
    ("q8_0", "generic"): simd.matmul_q8_0_generic,
    ("q8_0", "host"): simd.matmul_q8_0,
    ("q4_0", "x8"): simd.matmul_q4_0_x8,
    ("q8_0", "x8"): simd.matmul_q8_0_x8,
}


def make_weights(qtype: str, n_out: int, n_in: int, rng: np.random.Generator) -> np.ndarray:
    """Random payload bytes with a valid fp16 scale (0.01) in every block."""
    block_bytes = BLOCK_BYTES[qtype]
    w_raw = rng.integers(0, 256, (n_out, n_in // QK * block_bytes), dtype=np.uint8)
    blocks = w_raw.reshape(n_out, n_in // QK, block_bytes)
    blocks[:, :, :2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    return w_raw


def best_seconds(fn: Callable[[], None], min_runs: int = 5, min_total: float = 0.5, max_runs: int = 5000) -> float:
    fn()  # compile / warm caches and page tables
    best = float("inf")
    start = time.perf_counter()
    runs = 0
    while runs < min_runs or (time.perf_counter() - start < min_total and runs < max_runs):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
        runs += 1
    return best


def call_matvec(qtype: str, path: str, w_raw, act, out) -> Callable[[], None]:
    xq, xscales, xsums = act
    fn = MATVEC[qtype, path]
    if qtype == "q4_0":
        return lambda: fn(w_raw, xq, xscales, xsums, out)
    return lambda: fn(w_raw, xq, xscales, out)


def call_matmul(qtype: str, path: str, w_raw, act, out) -> Callable[[], None]:
    xq, xscales, xsums = act
    fn = MATMUL[qtype, path]
    if qtype == "q4_0" or path == "x8":
        return lambda: fn(w_raw, xq, xscales, xsums, out)
    return lambda: fn(w_raw, xq, xscales, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="skip the 400 MB matrix and the reference path")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--min-seconds", type=float, default=0.5, help="keep re-running each case at least this long (best is kept)"
    )
    args = parser.parse_args()
    threads = [t for t in args.threads if t <= numba.config.NUMBA_NUM_THREADS]
    rng = np.random.default_rng(0)
    host = f"host:{simd.kernel_isa()}"
    print(f"kernel_isa={simd.kernel_isa()}  cpu={os.cpu_count()} vCPU  load average={os.getloadavg()}")

    shapes = [(4096, 4096), (4096, 11008), (11008, 4096)]
    paths = ["generic", "host"] if args.quick else ["reference", "generic", "host"]
    header = f"{'matvec':7} {'shape':>12} {'MB':>7} {'path':>12} " + " ".join(
        f"{t} thr GB/s".rjust(12) for t in threads
    )
    print("\n" + header + "\n" + "-" * len(header))
    for qtype in ("q4_0", "q8_0"):
        cases = [(n_out, n_in, False) for n_out, n_in in shapes]
        if not args.quick:
            n_in = 8192
            cases.append((int(400e6 // (n_in // QK * BLOCK_BYTES[qtype])), n_in, True))  # 400 MB: DRAM-bound
        for n_out, n_in, is_dram in cases:
            w_raw = make_weights(qtype, n_out, n_in, rng)
            act = simd.quantize_activations_q8_0(rng.standard_normal(n_in).astype(np.float32))
            out = np.empty(n_out, np.float32)
            for path in paths:
                rates = []
                for t in threads:
                    numba.set_num_threads(t)
                    quick_path = path == "reference" or is_dram
                    seconds = best_seconds(
                        call_matvec(qtype, path, w_raw, act, out),
                        min_runs=3 if quick_path else 5,
                        min_total=args.min_seconds,
                    )
                    rates.append(w_raw.nbytes / seconds / 1e9)
                label = host if path == "host" else path
                shape = f"{n_out}x{n_in}"
                print(
                    f"{qtype:7} {shape:>12} {w_raw.nbytes / 1e6:7.1f} {label:>12} "
                    + " ".join(f"{r:12.2f}" for r in rates)
                )
            del w_raw

    header = f"{'matmul':7} {'shape':>12} {'tokens':>7} {'path':>12} " + " ".join(
        f"{t} thr tok/s".rjust(12) for t in threads
    )
    print("\n" + header + "\n" + "-" * len(header))
    for qtype in ("q4_0", "q8_0"):
        for n_out, n_in in shapes[:2]:
            w_raw = make_weights(qtype, n_out, n_in, rng)
            for n_tok in (32, 128):
                act = simd.quantize_activations_q8_0_batch(rng.standard_normal((n_tok, n_in)).astype(np.float32))
                out = np.empty((n_tok, n_out), np.float32)
                for path in ("generic", "host", "x8") if simd.has_x8_kernels() else ("generic", "host"):
                    rates = []
                    for t in threads:
                        numba.set_num_threads(t)
                        seconds = best_seconds(
                            call_matmul(qtype, path, w_raw, act, out), min_runs=3, min_total=args.min_seconds
                        )
                        rates.append(n_tok / seconds)
                    label = {"host": host, "x8": f"{host}-x8"}.get(path, path)
                    shape = f"{n_out}x{n_in}"
                    print(f"{qtype:7} {shape:>12} {n_tok:7d} {label:>12} " + " ".join(f"{r:12.0f}" for r in rates))

    print("\nactivation quantization (1 thread):")
    numba.set_num_threads(1)
    for n_in in (4096, 11008):
        x = rng.standard_normal(n_in).astype(np.float32)
        seconds = best_seconds(lambda x=x: simd.quantize_activations_q8_0(x), min_runs=20)
        print(f"  quantize_activations_q8_0 n={n_in}: {seconds * 1e6:.1f} us")
    x = rng.standard_normal((128, 4096)).astype(np.float32)
    seconds = best_seconds(lambda: simd.quantize_activations_q8_0_batch(x))
    print(f"  quantize_activations_q8_0_batch 128x4096: {seconds * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
