"""Q4_0 / Q8_0 product outputs on fixed random data, for comparing kernels across machines.

    python bench/arm64/kernel_outputs.py OUT.npz            # this machine's kernels (kernel_isa())
    python bench/arm64/kernel_outputs.py --compare A.npz B.npz

The emulated arm64 check runs the first form on x86 and under qemu (Cortex-A76 with the
dot-product extension, Cortex-A72 without) and the second on the results: the arm64 ``sdot``
Q4_0/Q8_0 kernels are built to give x86's bits exactly (engine/kernels/simd.py); the portable ones
sum floats in another order, so for them the relative difference is reported, not required to be
0. The K-quant products must give x86's bits on every path (engine/kernels/kquant_simd.py), and
with KERNEL_OUTPUTS_ALL=1 (the full emulated check; the CI smoke form leaves it out, since every
type compiles for minutes under qemu) so must those of Q2_K, Q3_K, IQ4_XS and the grid and
ternary types (engine/kernels/iquant_simd.py) and the K-quant prompt products with the tokens in the
vector lanes (engine/kernels/kquant_gemm.py). The data is made with numpy's seeded generator,
identical on every platform.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

N_OUT, N_IN = 72, 1024
# 1: the matvec (token generation); 3 and 12: the row-major prompt drivers (1 x 4 token tiles and
# the one-token remainder). x86's 8-row interleaved prompt kernels are not compared: they exist
# only on x86 and sum in another order than the row-major tiles (on x86 too).
TOKEN_COUNTS = (1, 3, 12)
LANE_TOKENS = 100  # engine/kernels/kquant_gemm.py's prompt products: 4-, 2- and 1-vector tiles
K_TYPES = ("q4_k", "q5_k", "q6_k")
MORE_K_TYPES = ("q2_k", "q3_k", "iq4_xs", "iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs", "iq3_s", "iq1_s", "iq1_m",
                "tq1_0", "tq2_0")
# where each type keeps its fp16 super-block scale(s) (IQ1_M spreads d over its scale words: left random,
# the nibbles below keep it finite)
_SCALE_BYTES = {"q6_k": slice(208, 210), "q3_k": slice(108, 110), "q2_k": slice(80, 84), "tq1_0": slice(52, 54),
                "tq2_0": slice(64, 66), "q4_k": slice(0, 4), "q5_k": slice(0, 4)}


def _random_rows(rng: np.random.Generator, qtype: str) -> np.ndarray:
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    w = rng.standard_normal((N_OUT, N_IN)).astype(np.float32)
    return quantize(w, GGMLQuantizationType[qtype.upper()])


def outputs() -> dict[str, np.ndarray]:
    from engine.kernels import simd
    from engine.kernels.matmul import kernel_description

    rng = np.random.default_rng(20261202)
    result: dict[str, np.ndarray] = {"kernels": np.array(kernel_description())}
    for qtype in ("q4_0", "q8_0"):
        w = _random_rows(rng, qtype)
        for n_tok in TOKEN_COUNTS:
            x = rng.standard_normal((n_tok, N_IN)).astype(np.float32)
            xq, xs, xsum = simd.quantize_activations_q8_0_batch(x)
            out = np.zeros((n_tok, N_OUT), np.float32)
            if n_tok == 1:
                if qtype == "q4_0":
                    simd.matvec_q4_0(w, xq[0], xs[0], xsum[0], out[0])
                else:
                    simd.matvec_q8_0(w, xq[0], xs[0], out[0])
            elif qtype == "q4_0":
                simd.matmul_q4_0(w, xq, xs, xsum, out)
            else:
                simd.matmul_q8_0(w, xq, xs, out)
            result[f"{qtype}_t{n_tok}"] = out
    # K-quants (llama-quantize's files): random super-blocks with finite fp16 scales. Their float
    # work starts after exact integer super-block sums, so every ISA, portable included, must
    # give the same bits.
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    from engine.kernels import iquant_simd, kquant_gemm, kquant_simd

    every = os.environ.get("KERNEL_OUTPUTS_ALL") == "1"
    for qtype in K_TYPES + (MORE_K_TYPES if every else ()):
        block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType[qtype.upper()]]
        raw = rng.integers(0, 256, (N_OUT, N_IN // block_size * type_size), dtype=np.uint8)
        blocks = raw.reshape(N_OUT, -1, type_size)
        halves = (rng.uniform(-1, 1, blocks.shape[:2] + (2,)) / 64).astype(np.float16).view(np.uint8)
        where = _SCALE_BYTES.get(qtype, slice(0, 2))
        if qtype == "iq1_m":
            blocks[..., 49:56:2] &= 0x3F  # d's top nibbles: exponent < 16, finite
        else:
            blocks[..., where] = halves.reshape(*blocks.shape[:2], 4)[..., : where.stop - where.start]
        drivers = (kquant_simd.DRIVERS | iquant_simd.DRIVERS)[qtype]
        for n_tok in TOKEN_COUNTS:
            x = rng.standard_normal((n_tok, N_IN)).astype(np.float32)
            out = np.zeros((n_tok, N_OUT), np.float32)
            drivers[0 if n_tok == 1 else 1](raw, *kquant_simd.activations_for(qtype, x), out)
            result[f"{qtype}_t{n_tok}"] = out
        if every and qtype in kquant_gemm.DRIVERS:  # the prompt products with tokens in the lanes
            x = rng.standard_normal((LANE_TOKENS, N_IN)).astype(np.float32)
            out = np.zeros((LANE_TOKENS, N_OUT), np.float32)
            kquant_gemm.DRIVERS[qtype][0](raw, *kquant_gemm.activations_for_lanes(qtype, x), LANE_TOKENS, out)
            result[f"{qtype}_lanes_t{LANE_TOKENS}"] = out
    return result


def compare(path_a: str, path_b: str) -> dict:
    """Q4_0/Q8_0 ("identical", "max_rel_diff") and K-quant ("k_identical") results of two runs."""
    a, b = np.load(path_a), np.load(path_b)
    report = {"a": str(a["kernels"]), "b": str(b["kernels"]), "identical": True, "max_rel_diff": 0.0,
              "k_identical": True}
    for key in a.files:
        if key == "kernels":
            continue
        same = key in b.files and a[key].tobytes() == b[key].tobytes()
        if key.split("_t")[0].removesuffix("_lanes") in K_TYPES + MORE_K_TYPES:
            report["k_identical"] &= same
            continue
        rel = float(np.max(np.abs(a[key] - b[key])) / max(1e-30, float(np.max(np.abs(a[key])))))
        report["identical"] &= same
        report["max_rel_diff"] = max(report["max_rel_diff"], rel)
    return report


if __name__ == "__main__":
    if sys.argv[1] == "--compare":
        print(json.dumps(compare(sys.argv[2], sys.argv[3])))
    else:
        data = outputs()
        np.savez(sys.argv[1], **data)
        print(f"{sys.argv[1]}: kernels {data['kernels']}")
