"""One GGUF file, one run: halfbyte vs llama.cpp vs transformers, tokens/s side by side.

    python bench/compare.py --synthetic llama-1b -p 128 -n 64 -t 2 -r 3
    python bench/compare.py model.gguf -p 64 -n 32
    python bench/compare.py model.gguf --engines halfbyte,llama-bench --llama-bench BUILD/bin/llama-bench --rounds 5
    python bench/compare.py model.gguf -p 512 -n 64 -d 4000 --engines halfbyte,llama-bench --llama-bench ...

Engines alternate (``--rounds K`` runs every engine K times, in turn), so a noisy machine slows
them alike; the table gives each engine's mean over all rounds and, per round, its ratio to the
baseline (mainline llama.cpp: ``llama-bench`` when given, else llama-cpp-python): min / median / max.

Each engine does what llama-bench does: pp<P> = P random tokens evaluated as one batch on an
empty context; tg<N> = N tokens evaluated one at a time (random ids, no sampling). One untimed
warm-up per test, then R timed repetitions (mean +- stddev of tokens/s).

* halfbyte: engine.bench.run_bench, in this process.
* llama.cpp: the `llama-cpp-python` package (`Llama.eval`), skipped if it is not installed.
  Each engine runs in its own subprocess so peak RSS is per engine.
* llama-bench: a llama.cpp ``llama-bench`` binary given by path (``--llama-bench``), run with
  ``-o json``; ``ik_llama`` the same for ik_llama.cpp's (``--ik-llama-bench``, its extra flags in
  ``--ik-args``, e.g. "-rtr 1 -fa 1"). ``-d`` (context depth) is passed to both.
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


def run_halfbyte(path: str, p: int, n: int, threads: int, reps: int, depth: int = 0, type_k: str = "f16",
                 type_v: str = "f16") -> dict:
    from engine.bench import run_bench

    records = run_bench(path, p, n, threads, reps, n_depth=depth, type_k=type_k, type_v=type_v)
    out = {"engine": f"halfbyte ({records[0]['kernels']})", "load_s": records[0]["load_ms"] / 1e3,
           "peak_rss": records[0]["peak_rss_bytes"]}
    for r in records:
        key = f"pp{p}" if r["n_prompt"] else f"tg{n}"
        out[key] = {"avg_ts": r["avg_ts"], "stddev_ts": r["stddev_ts"]}
    return out


def run_llama_bench(binary: str, path: str, p: int, n: int, threads: int, reps: int, depth: int = 0,
                    extra: str = "", label: str = "llama-bench") -> dict:
    """A llama.cpp-family ``llama-bench`` binary on the same file; its JSON records -> our fields."""
    env = dict(os.environ, LD_LIBRARY_PATH=str(Path(binary).resolve().parent))
    command = [binary, "-m", path, "-p", str(p), "-n", str(n), "-t", str(threads), "-r", str(reps), "-o", "json",
               *extra.split()]
    if depth:
        command += ["-d", str(depth)]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{binary} exited with {done.returncode}: {done.stderr.strip()[-300:]}")
    out = {"engine": f"{label} ({Path(binary).name} {extra})".replace(" )", ")"), "load_s": float("nan"),
           "peak_rss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}
    for record in json.loads(done.stdout):
        key = f"pp{record['n_prompt']}" if record["n_prompt"] else f"tg{record['n_gen']}"
        out[key] = {"avg_ts": record["avg_ts"], "stddev_ts": record["stddev_ts"]}
    return out


def run_llama_cpp(path: str, p: int, n: int, threads: int, reps: int, depth: int = 0) -> dict:
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


def run_transformers(path: str, p: int, n: int, threads: int, reps: int, depth: int = 0) -> dict:
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
BASELINES = ("llama-bench", "llama.cpp")  # mainline llama.cpp, by preference


def _child(args: argparse.Namespace) -> None:
    if args.engine in ("llama-bench", "ik_llama"):
        binary = args.llama_bench if args.engine == "llama-bench" else args.ik_llama_bench
        extra = "" if args.engine == "llama-bench" else args.ik_args
        if (args.ctk, args.ctv) != ("f16", "f16"):
            # llama.cpp quantizes the V cache only with flash attention
            extra += f" -ctk {args.ctk} -ctv {args.ctv}"
            if args.ctv != "f16" and "-fa" not in extra:
                extra += " -fa 1"
        result = run_llama_bench(binary, args.model, args.n_prompt, args.n_gen, args.threads, args.reps,
                                 args.n_depth, extra, label=args.engine)
    else:
        if args.n_depth and args.engine != "halfbyte":
            raise SystemExit(f"{args.engine}: -d is supported for halfbyte and llama-bench binaries only")
        if args.engine == "halfbyte":
            result = run_halfbyte(args.model, args.n_prompt, args.n_gen, args.threads, args.reps, args.n_depth,
                                  args.ctk, args.ctv)
        else:
            result = RUNNERS[args.engine](args.model, args.n_prompt, args.n_gen, args.threads, args.reps,
                                          args.n_depth)
    print(json.dumps(result))


def _fits_transformers(path: str) -> bool:
    from engine.gguf_file import GGUFFile

    with GGUFFile(path) as f:
        n_params = sum(int(np.prod(t.shape)) for t in f.tensors.values())
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return n_params * 4 * 2 < total  # fp32 weights plus the same again for init and activations


def _available(engine: str, args: argparse.Namespace) -> bool:
    if engine == "llama.cpp":
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            print("llama.cpp: llama-cpp-python is not installed, skipped", file=sys.stderr)
            return False
    if engine == "llama-bench" and not args.llama_bench:
        print("llama-bench: give --llama-bench PATH, skipped", file=sys.stderr)
        return False
    if engine == "ik_llama" and not args.ik_llama_bench:
        print("ik_llama: give --ik-llama-bench PATH, skipped", file=sys.stderr)
        return False
    if engine == "transformers" and not _fits_transformers(args.model):
        print("transformers: float32 weights would not fit in memory, skipped", file=sys.stderr)
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?")
    parser.add_argument("--synthetic", help="a halfbyte synthetic shape instead of a file, e.g. llama-1b")
    parser.add_argument("-p", "--n-prompt", type=int, default=128)
    parser.add_argument("-n", "--n-gen", type=int, default=64)
    parser.add_argument("-d", "--n-depth", type=int, default=0, help="tokens in the context before each test")
    parser.add_argument("-t", "--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("-ctk", "--ctk", default="f16", help="KV cache type of the keys (f16, f32, q8_0)")
    parser.add_argument("-ctv", "--ctv", default="f16", help="KV cache type of the values (f16, f32, q8_0)")
    parser.add_argument("-r", "--reps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1, help="run every engine this many times, alternating")
    parser.add_argument("--engines", default="halfbyte,llama.cpp,transformers",
                        help="comma-separated: halfbyte, llama.cpp, llama-bench, ik_llama, transformers")
    parser.add_argument("--llama-bench", help="path of a mainline llama.cpp llama-bench binary")
    parser.add_argument("--ik-llama-bench", help="path of ik_llama.cpp's llama-bench binary")
    parser.add_argument("--ik-args", default="-rtr 1 -fa 1", help="extra flags for ik_llama.cpp's llama-bench")
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

    engines = [e for e in args.engines.split(",") if _available(e, args)]
    rounds: list[list[dict]] = []
    for round_index in range(args.rounds):
        results = []
        for engine in engines:
            command = [sys.executable, __file__, args.model, "--engine", engine, "-p", str(args.n_prompt),
                       "-n", str(args.n_gen), "-d", str(args.n_depth), "-t", str(args.threads), "-r", str(args.reps),
                       "-ctk", args.ctk, "-ctv", args.ctv,
                       f"--ik-args={args.ik_args}"]
            for flag, value in (("--llama-bench", args.llama_bench), ("--ik-llama-bench", args.ik_llama_bench)):
                if value:
                    command += [flag, value]
            print(f"round {round_index + 1}/{args.rounds}: running {engine}...", file=sys.stderr)
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"{engine}: failed: {done.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
                continue
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        rounds.append(results)

    if args.json:
        print(json.dumps(rounds, indent=2))
        return
    depth = f" @ d{args.n_depth}" if args.n_depth else ""
    tests = [t for t in (f"pp{args.n_prompt}" if args.n_prompt else "", f"tg{args.n_gen}" if args.n_gen else "") if t]
    names = list(dict.fromkeys(r["engine"] for results in rounds for r in results))
    base_name = next((n for prefix in BASELINES for n in names if n.startswith(prefix)), None)
    print(f"file: {args.model} ({Path(args.model).stat().st_size / 2**20:.0f} MiB), threads: {args.threads}, "
          f"rounds: {args.rounds}; ratios per round against {base_name or 'nothing'}: min / median / max\n")
    print("| engine | " + " | ".join(f"{t}{depth} t/s" for t in tests) + " | " + " | ".join(
        f"{t} vs llama.cpp" for t in tests) + " | load s | peak RSS MiB |")
    print("|" + " --- |" * (1 + 2 * len(tests) + 2))
    for name in names:
        mine = [next((r for r in results if r["engine"] == name), None) for results in rounds]
        base = [next((r for r in results if r["engine"] == base_name), None) for results in rounds]
        speeds, ratios = [], []
        for t in tests:
            values = [r[t]["avg_ts"] for r in mine if r]
            spread = statistics.stdev(values) if len(values) > 1 else (mine[0] or {}).get(t, {}).get("stddev_ts", 0)
            speeds.append(f"{statistics.fmean(values):.2f} ± {spread:.2f}" if values else "-")
            per_round = sorted(m[t]["avg_ts"] / b[t]["avg_ts"] for m, b in zip(mine, base) if m and b)
            ratios.append(f"{per_round[0]:.2f} / {statistics.median(per_round):.2f} / {per_round[-1]:.2f}x"
                          if per_round else "-")
        last = [r for r in mine if r][-1]
        print(f"| {name} | {' | '.join(speeds)} | {' | '.join(ratios)} | {last['load_s']:.2f} | "
              f"{last['peak_rss'] / 2**20:.0f} |")


if __name__ == "__main__":
    main()
