"""One GGUF file, one run: halfbyte vs llama.cpp (llama-cpp-python) vs transformers, tokens/s side by side.

    python bench/compare.py --synthetic llama-1b -p 128 -n 64 -t 2 -r 3
    python bench/compare.py model.gguf -p 64 -n 32

Each engine does what llama-bench does: pp<P> = P random tokens evaluated as one batch on an
empty context; tg<N> = N tokens evaluated one at a time (random ids, no sampling). One untimed
warm-up per test, then R timed repetitions (mean +- stddev of tokens/s).

* halfbyte: engine.bench.run_bench, in this process.
* llama.cpp: the `llama-cpp-python` package (`Llama.eval`), skipped if it is not installed.
  Each engine runs in its own subprocess so peak RSS is per engine.
* transformers: LlamaForCausalLM in float32 with the file's shapes (LLaMA files only), random
  weights (speed does not depend on the values), skipped when float32 weights would not fit in
  half the RAM (7B: 27 GB).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _summary(samples_s: list[float], n: int) -> dict:
    ts = [n / s for s in samples_s]
    return {"avg_ts": statistics.fmean(ts), "stddev_ts": statistics.stdev(ts) if len(ts) > 1 else 0.0}


def run_halfbyte(path: str, p: int, n: int, threads: int, reps: int) -> dict:
    from engine.bench import run_bench

    records = run_bench(path, p, n, threads, reps)
    out = {"engine": f"halfbyte ({records[0]['kernels']})", "load_s": records[0]["load_ms"] / 1e3,
           "peak_rss": records[0]["peak_rss_bytes"]}
    for r in records:
        key = f"pp{p}" if r["n_prompt"] else f"tg{n}"
        out[key] = {"avg_ts": r["avg_ts"], "stddev_ts": r["stddev_ts"]}
    return out


def run_llama_cpp(path: str, p: int, n: int, threads: int, reps: int) -> dict:
    import llama_cpp
    from llama_cpp import Llama

    start = time.perf_counter()
    llm = Llama(model_path=path, n_ctx=max(p, n) + 1, n_batch=max(p, 1), n_ubatch=max(p, 1), n_threads=threads,
                n_threads_batch=threads, verbose=False)
    load_s = time.perf_counter() - start
    rng = np.random.default_rng(1)
    n_vocab = llm.n_vocab()

    def prompt_pass() -> float:
        tokens = [int(t) for t in rng.integers(0, n_vocab, p)]
        llm.reset()  # the next eval drops the KV cache past n_tokens = 0
        t0 = time.perf_counter()
        llm.eval(tokens)
        return time.perf_counter() - t0

    def generation_pass(count: int) -> float:
        llm.reset()  # the next eval drops the KV cache past n_tokens = 0
        t0 = time.perf_counter()
        for _ in range(count):
            llm.eval([int(rng.integers(0, n_vocab))])
        return time.perf_counter() - t0

    out = {"engine": f"llama.cpp (llama-cpp-python {llama_cpp.__version__})", "load_s": load_s}
    if p:
        prompt_pass()
        out[f"pp{p}"] = _summary([prompt_pass() for _ in range(reps)], p)
    if n:
        generation_pass(1)
        out[f"tg{n}"] = _summary([generation_pass(n) for _ in range(reps)], n)
    out["peak_rss"] = _peak_rss()
    return out


def run_transformers(path: str, p: int, n: int, threads: int, reps: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from engine.gguf_file import GGUFFile

    with GGUFFile(path) as f:
        if f.architecture != "llama":
            raise SystemExit("transformers comparison: LLaMA files only")
        m = f.metadata
        n_vocab = len(m["tokenizer.ggml.tokens"])
        config = LlamaConfig(
            vocab_size=n_vocab, hidden_size=m["llama.embedding_length"],
            intermediate_size=m["llama.feed_forward_length"],
            num_hidden_layers=m["llama.block_count"], num_attention_heads=m["llama.attention.head_count"],
            num_key_value_heads=m.get("llama.attention.head_count_kv", m["llama.attention.head_count"]),
            rms_norm_eps=m.get("llama.attention.layer_norm_rms_epsilon", 1e-5), max_position_embeddings=max(p, n) + 1,
            tie_word_embeddings="output.weight" not in f.tensors,
        )
    torch.set_num_threads(threads)
    start = time.perf_counter()
    with torch.no_grad():
        model = LlamaForCausalLM(config).eval()
    load_s = time.perf_counter() - start
    rng = np.random.default_rng(1)

    def prompt_pass() -> float:
        ids = torch.tensor([rng.integers(0, n_vocab, p)])
        t0 = time.perf_counter()
        with torch.no_grad():
            model(input_ids=ids, use_cache=True, logits_to_keep=1)
        return time.perf_counter() - t0

    def generation_pass(count: int) -> float:
        past = None
        t0 = time.perf_counter()
        with torch.no_grad():
            for _ in range(count):
                ids = torch.tensor([[int(rng.integers(0, n_vocab))]])
                past = model(input_ids=ids, past_key_values=past, use_cache=True, logits_to_keep=1).past_key_values
        return time.perf_counter() - t0

    out = {"engine": f"transformers fp32 (torch {torch.__version__})", "load_s": load_s}
    if p:
        prompt_pass()
        out[f"pp{p}"] = _summary([prompt_pass() for _ in range(reps)], p)
    if n:
        generation_pass(1)
        out[f"tg{n}"] = _summary([generation_pass(n) for _ in range(reps)], n)
    out["peak_rss"] = _peak_rss()
    return out


RUNNERS = {"halfbyte": run_halfbyte, "llama.cpp": run_llama_cpp, "transformers": run_transformers}


def _child(args: argparse.Namespace) -> None:
    result = RUNNERS[args.engine](args.model, args.n_prompt, args.n_gen, args.threads, args.reps)
    print(json.dumps(result))


def _fits_transformers(path: str) -> bool:
    from engine.gguf_file import GGUFFile

    with GGUFFile(path) as f:
        n_params = sum(int(np.prod(t.shape)) for t in f.tensors.values())
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return n_params * 4 * 2 < total  # fp32 weights plus the same again for init and activations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?")
    parser.add_argument("--synthetic", help="a halfbyte synthetic shape instead of a file, e.g. llama-1b")
    parser.add_argument("-p", "--n-prompt", type=int, default=128)
    parser.add_argument("-n", "--n-gen", type=int, default=64)
    parser.add_argument("-t", "--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("-r", "--reps", type=int, default=3)
    parser.add_argument("--engines", default="halfbyte,llama.cpp,transformers")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--engine", help=argparse.SUPPRESS)  # child mode
    args = parser.parse_args()
    if args.engine:
        _child(args)
        return
    if args.synthetic:
        from converters.synthetic import synthetic_path

        args.model = str(synthetic_path(args.synthetic))
    if not args.model:
        parser.error("give a GGUF file or --synthetic SHAPE")

    results = []
    for engine in args.engines.split(","):
        if engine == "llama.cpp":
            try:
                import llama_cpp  # noqa: F401
            except ImportError:
                print("llama.cpp: llama-cpp-python is not installed, skipped", file=sys.stderr)
                continue
        if engine == "transformers" and not _fits_transformers(args.model):
            print("transformers: float32 weights would not fit in memory, skipped", file=sys.stderr)
            continue
        command = [sys.executable, __file__, args.model, "--engine", engine, "-p", str(args.n_prompt),
                   "-n", str(args.n_gen), "-t", str(args.threads), "-r", str(args.reps)]
        print(f"running {engine}...", file=sys.stderr)
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{engine}: failed: {done.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
            continue
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))

    if args.json:
        print(json.dumps(results, indent=2))
        return
    tests = [t for t in (f"pp{args.n_prompt}" if args.n_prompt else "", f"tg{args.n_gen}" if args.n_gen else "") if t]
    base = next((r for r in results if r["engine"].startswith("llama.cpp")), None)
    print(f"file: {args.model} ({Path(args.model).stat().st_size / 2**20:.0f} MiB), threads: {args.threads}\n")
    header = "| engine | " + " | ".join(f"{t} t/s" for t in tests) + " | " + " | ".join(
        f"{t} vs llama.cpp" for t in tests) + " | load s | peak RSS MiB |"
    print(header)
    print("|" + " --- |" * (1 + 2 * len(tests) + 2))
    for r in results:
        speeds = " | ".join(f"{r[t]['avg_ts']:.2f} ± {r[t]['stddev_ts']:.2f}" for t in tests)
        ratios = " | ".join(f"{r[t]['avg_ts'] / base[t]['avg_ts']:.2f}x" if base else "-" for t in tests)
        print(f"| {r['engine']} | {speeds} | {ratios} | {r['load_s']:.2f} | {r['peak_rss'] / 2**20:.0f} |")


if __name__ == "__main__":
    main()
