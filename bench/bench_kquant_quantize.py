"""Speed of the K-quant / IQ4 writers: Numba kernels against their plain numpy references.

    /work/venv/bin/python bench/bench_kquant_quantize.py [--rows 512] [--cols 4096] [--repeat 3]

MB/s (10**6 bytes) of float32 input, gaussian weights.  Numba at 1 thread and at all Numba threads
(``engine.quants.quantize``, the path writers use), the numpy reference
(``engine.kernels.kquant_quantize.reference_quantize``, one thread) on the same data; the speed-up
column is Numba (all threads) / numpy.  Best of ``--repeat`` runs after one untimed warm-up run.
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable
from functools import partial

import numba
import numpy as np
from gguf import GGMLQuantizationType as QT

from engine import quants
from engine.kernels import kquant_quantize as kqq


def best_seconds(run: Callable[[], object], repeat: int) -> float:
    run()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--types", default=",".join(t.name for t in kqq.TYPES))
    args = parser.parse_args()
    data = (np.random.default_rng(0).standard_normal((args.rows, args.cols)) * 0.02).astype(np.float32)
    megabytes = data.nbytes / 1e6
    threads = numba.get_num_threads()
    print(f"{args.rows}x{args.cols} float32 ({megabytes:.1f} MB), {platform.processor() or platform.machine()}, "
          f"numba threads {threads}")
    print(f"{'type':8} {'numba 1t MB/s':>14} {f'numba {threads}t MB/s':>14} {'numpy MB/s':>11} {'speed-up':>9}")
    for name in args.types.split(","):
        qtype = QT[name]
        numba.set_num_threads(1)
        one = best_seconds(partial(quants.quantize, data, qtype), args.repeat)
        numba.set_num_threads(threads)
        many = best_seconds(partial(quants.quantize, data, qtype), args.repeat)
        ref = best_seconds(partial(kqq.reference_quantize, data, qtype), args.repeat)
        print(f"{name:8} {megabytes / one:14.1f} {megabytes / many:14.1f} {megabytes / ref:11.1f} {ref / many:8.1f}x")


if __name__ == "__main__":
    main()
