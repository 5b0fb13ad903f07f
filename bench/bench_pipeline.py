"""What a pipeline stage boundary costs, and what each stage keeps in memory (engine/distributed/pipeline.py).

On one machine, a local Ray with K stages (``placement=spread``) against one process:

- generation: ms per token for 1 process, then 1, 2, 3 stages; going from K to K + 1 stages adds one
  boundary and changes nothing else (the same layers run, one after another), so the difference
  is the cost of a boundary per token;
- prompt: tokens/s for a prompt read in micro-batches (the stages overlap) and in one piece;
- memory: each stage's resident bytes of the mapped file.

    python bench/bench_pipeline.py [MODEL] [--stages 1,2,3] [--tokens 64] [--prompt 128]

MODEL defaults to the synthetic 1.1B-shape Q4_0 file (``halfbyte bench --synthetic llama-1b``).
Not a test: figures depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def decode_ms(model, prompt_ids: list[int], n_tokens: int, rounds: int) -> float:
    """Median ms per generated token (greedy, from a fresh context of ``prompt_ids``)."""
    import numpy as np

    times = []
    for _ in range(rounds):
        model.reset()
        logits = model.eval(prompt_ids, last_only=True)
        start = time.perf_counter()
        for _ in range(n_tokens):
            logits = model.eval([int(np.argmax(logits[-1]))], last_only=True)
        times.append((time.perf_counter() - start) / n_tokens * 1e3)
    return statistics.median(times)


def prompt_tps(model, ids: list[int], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        model.reset()
        start = time.perf_counter()
        model.eval(ids, last_only=True)
        times.append(time.perf_counter() - start)
    return len(ids) / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default=None)
    parser.add_argument("--stages", default="1,2,3")
    parser.add_argument("--tokens", type=int, default=64, help="tokens generated per round")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens for the prompt figure")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--micro-batch", type=int, default=32)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import numpy as np
    import ray

    from engine.distributed.pipeline import PipelineModel
    from engine.machine import cpu_info
    from engine.model import Model

    if args.model is None:
        from converters.synthetic import synthetic_path

        args.model = str(synthetic_path("llama-1b"))
    stage_counts = [int(k) for k in args.stages.split(",")]
    ray.init(num_cpus=max(stage_counts) + 1, include_dashboard=False, log_to_driver=False, namespace="halfbyte-bench")
    rng = np.random.default_rng(0)
    results: dict = {"cpu": cpu_info(), "model": args.model, "tokens": args.tokens, "prompt": args.prompt, "rows": []}

    local = Model.load(args.model, n_ctx=args.prompt + args.tokens + 8, threads=1)
    prompt = [int(t) for t in rng.integers(3, local.n_vocab, args.prompt)]
    short = prompt[:8]
    decode_ms(local, short, 4, 1)  # compile
    prompt_tps(local, prompt[:40], 1)
    results["rows"].append({"setup": "1 process, 1 thread",
                            "decode_ms": decode_ms(local, short, args.tokens, args.rounds),
                            "prompt_tps": prompt_tps(local, prompt, args.rounds)})
    local.close()
    for k in stage_counts:
        with PipelineModel.load(args.model, stages=k, n_ctx=args.prompt + args.tokens + 8, placement="spread",
                                micro_batch=args.micro_batch) as piped:
            decode_ms(piped, short, 4, 1)
            prompt_tps(piped, prompt[:40], 1)
            row = {"setup": f"{k} stage(s)", "decode_ms": decode_ms(piped, short, args.tokens, args.rounds),
                   "prompt_tps": prompt_tps(piped, prompt, args.rounds)}
            piped.arch.micro_batch = 0
            row["prompt_tps_one_piece"] = prompt_tps(piped, prompt, args.rounds)
            row["mapped_mib"] = [round(m["mapped"] / 2**20, 1) for m in piped.stage_memory()]
            row["rss_mib"] = [round(m["rss"] / 2**20, 1) for m in piped.stage_memory()]
            results["rows"].append(row)
    ray.shutdown()
    by_setup = {r["setup"]: r for r in results["rows"]}
    for k in stage_counts:
        row, previous = by_setup[f"{k} stage(s)"], by_setup.get(f"{k - 1} stage(s)")
        if previous is not None:
            row["boundary_ms"] = row["decode_ms"] - previous["decode_ms"]
    if args.json:
        json.dump(results, sys.stdout, indent=2)
        print()
        return
    print(f"CPU: {results['cpu']}\nmodel: {args.model}\n")
    print("| setup | ms/token (tg) | added by the last boundary | prompt t/s (micro-batched) | prompt t/s (one piece) "
          "| mapped file per stage (MiB) |")
    print("|---|---|---|---|---|---|")
    for r in results["rows"]:
        print(f"| {r['setup']} | {r['decode_ms']:.2f} | {r.get('boundary_ms', float('nan')):.2f} | "
              f"{r['prompt_tps']:.1f} | {r.get('prompt_tps_one_piece', float('nan')):.1f} | "
              f"{', '.join(str(m) for m in r.get('mapped_mib', []))} |")


if __name__ == "__main__":
    main()
