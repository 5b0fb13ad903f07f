"""Throughput of halfbyte's quantize/dequantize kernels vs the gguf.quants reference.

    /work/venv/bin/python bench/bench_quants.py [--rows 4096] [--cols 4096] [--repeat 5]

MB/s (10**6 bytes) of float32 data: the input of quantize, the output of dequantize
(``out=``: into a reused buffer, the way an inference loop calls it).
halfbyte runs at 1 thread and at all Numba threads; the reference is numpy (one thread).
Each figure is the best of ``--repeat`` runs, after one untimed warm-up run (JIT cache load).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial

import numba
import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import quants as reference

from engine import quants


def best_seconds(run: Callable[[], object], repeat: int) -> float:
    run()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def with_threads(count: int, run: Callable[[], object]) -> Callable[[], object]:
    def pinned() -> object:
        previous = numba.get_num_threads()
        numba.set_num_threads(count)
        try:
            return run()
        finally:
            numba.set_num_threads(previous)

    return pinned


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    data = np.random.default_rng(0).standard_normal((args.rows, args.cols)).astype(np.float32)
    megabytes = data.nbytes / 1e6
    all_threads = numba.config.NUMBA_NUM_THREADS
    print(f"{args.rows}x{args.cols} float32 ({megabytes:.0f} MB), numba threads: {all_threads}, MB/s of f32 data")
    header = f"{'operation':<22}{'halfbyte 1T':>13}{f'halfbyte {all_threads}T':>13}{'gguf ref':>11}{'1T / ref':>10}"
    print(header)
    print("-" * len(header))
    for qtype in (QT.Q4_0, QT.Q8_0):
        packed = quants.quantize(data, qtype)
        assert np.array_equal(packed, reference.quantize(data, qtype)), "not byte-identical to gguf"
        for name, ours, theirs in (
            (f"quantize {qtype.name}", partial(quants.quantize, data, qtype), partial(reference.quantize, data, qtype)),
            (f"dequantize {qtype.name}", partial(quants.dequantize, packed, qtype),
             partial(reference.dequantize, packed, qtype)),
        ):
            one = megabytes / best_seconds(with_threads(1, ours), args.repeat)
            every = megabytes / best_seconds(with_threads(all_threads, ours), args.repeat)
            ref = megabytes / best_seconds(theirs, max(1, args.repeat // 2))
            print(f"{name:<22}{one:>13.0f}{every:>13.0f}{ref:>11.0f}{one / ref:>9.1f}x")
        # Into a reused buffer: no page faults of a fresh 64 MiB array (gguf has no such option).
        into = partial(quants.dequantize, packed, qtype, out=np.empty_like(data))
        one = megabytes / best_seconds(with_threads(1, into), args.repeat)
        every = megabytes / best_seconds(with_threads(all_threads, into), args.repeat)
        print(f"{f'dequantize {qtype.name} out=':<22}{one:>13.0f}{every:>13.0f}{ref:>11.0f}{one / ref:>9.1f}x")


if __name__ == "__main__":
    main()
