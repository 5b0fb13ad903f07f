"""`halfbyte bench`: prompt-processing and generation speed, measured the way llama-bench does.

* pp<P>: evaluate P random tokens as one batch on an empty context (logits of the last only);
* tg<N>: generate N tokens one at a time on an empty context (each a one-token evaluation of
  a random id, as llama-bench does: sampling is not part of the figure).

Each test runs once untimed (warm-up: kernels loaded, weight pages touched) and then ``reps``
timed repetitions; tokens/s is reported as mean +- standard deviation over the repetitions.
Load time, the cold time to the first token (the first prompt evaluation after loading: it
includes loading compiled kernels and faulting in the weights) and the process's peak RSS come
with it. ``--json`` uses llama-bench's field names where they exist.
"""

from __future__ import annotations

import datetime
import json
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np

from engine.errors import HalfbyteError


@dataclass
class TestResult:
    name: str  # "pp128" / "tg64"
    n_prompt: int
    n_gen: int
    samples_ns: list[int]

    @property
    def n_tokens(self) -> int:
        return self.n_prompt + self.n_gen

    @property
    def samples_ts(self) -> list[float]:
        return [self.n_tokens * 1e9 / ns for ns in self.samples_ns]

    @property
    def avg_ts(self) -> float:
        return statistics.fmean(self.samples_ts)

    @property
    def stddev_ts(self) -> float:
        return statistics.stdev(self.samples_ts) if len(self.samples_ns) > 1 else 0.0


def peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def _model_stats(model) -> tuple[int, int]:  # (bytes of tensor data, parameters)
    size = sum(info.nbytes for info in model.file.tensors.values())
    params = sum(int(np.prod(info.shape)) for info in model.file.tensors.values())
    return size, params


def _size_label(n_params: int) -> str:
    return f"{n_params / 1e9:.1f}B" if n_params >= 1e9 else f"{n_params / 1e6:.0f}M"


def run_bench(path: str | Path, n_prompt: int = 128, n_gen: int = 64, threads: int | None = None, reps: int = 5,
              seed: int = 1, log: Callable[[str], None] | None = None, n_depth: int = 0,
              type_k: str = "f16", type_v: str = "f16") -> list[dict[str, Any]]:
    """Benchmark one GGUF file; returns one llama-bench-style record per test (pp, tg).

    ``n_depth`` (llama-bench's ``-d``): each timed pass starts after that many tokens already in the
    context (evaluated untimed), so pp and tg are measured at a long context. ``type_k`` / ``type_v``:
    the KV cache's types (llama-bench's ``-ctk`` / ``-ctv``: f16, f32, q8_0)."""
    from engine import jit_cache
    from engine.kernels.matmul import kernel_description
    from engine.machine import machine_info
    from engine.model import Model
    from engine.threads import available_cores

    check_bench_args(n_prompt, n_gen, reps, n_depth)
    log = log or (lambda message: None)
    start = time.perf_counter()
    # A fixed count, as llama-bench: a benchmark measures the threads it names, it does not adapt.
    threads = threads if threads is not None and threads > 0 else available_cores()
    model = Model.load(path, n_ctx=n_depth + max(n_prompt, n_gen, 1), threads=threads, type_k=type_k, type_v=type_v)
    load_ns = int((time.perf_counter() - start) * 1e9)
    rng = np.random.default_rng(seed)

    def random_tokens(n: int) -> list[int]:
        return [int(t) for t in rng.integers(0, model.n_vocab, n)]

    def fill_depth() -> None:
        model.reset()
        for start in range(0, n_depth, 512):  # in prompt-sized batches, untimed
            model.eval(random_tokens(min(512, n_depth - start)), last_only=True)

    def prompt_pass(n: int) -> int:
        tokens = random_tokens(n)
        fill_depth()
        t0 = time.perf_counter_ns()
        model.eval(tokens, last_only=True)
        return time.perf_counter_ns() - t0

    def generation_pass(n: int) -> int:
        tokens = random_tokens(n)  # like llama-bench: random ids, no sampling in the timing
        fill_depth()
        t0 = time.perf_counter_ns()
        for token in tokens:
            model.eval((token,), last_only=True)
        return time.perf_counter_ns() - t0

    # Cold: the first evaluation after loading, as a user's first prompt would see it.
    compiled = jit_cache.compile_seconds()
    first = prompt_pass(max(n_prompt, 1))
    compile_ns = int((jit_cache.compile_seconds() - compiled) * 1e9)
    compiling = f" (of which {compile_ns / 1e9:.2f} s compiling kernels)" if compile_ns >= 5e6 else ""
    log(f"loaded in {load_ns / 1e6:.0f} ms; first {max(n_prompt, 1)}-token prompt in {first / 1e6:.0f} ms"
        f"{compiling}")
    tests: list[TestResult] = []
    at_depth = f" @ d{n_depth}" if n_depth else ""
    if n_prompt:
        prompt_pass(n_prompt)  # warm-up
        tests.append(TestResult(f"pp{n_prompt}{at_depth}", n_prompt, 0, [prompt_pass(n_prompt) for _ in range(reps)]))
        log(f"pp{n_prompt}: {tests[-1].avg_ts:.2f} t/s")
    if n_gen:
        generation_pass(1)  # warm-up
        tests.append(TestResult(f"tg{n_gen}{at_depth}", 0, n_gen, [generation_pass(n_gen) for _ in range(reps)]))
        log(f"tg{n_gen}: {tests[-1].avg_ts:.2f} t/s")

    size, n_params = _model_stats(model)
    info = machine_info()
    file_type = model.metadata.get("general.file_type")
    type_name = _file_type_name(file_type)
    kv_bytes = model.cache.nbytes
    records = []
    for test in tests:
        records.append({
            "build_commit": info["versions"]["halfbyte"],
            "build_number": 0,
            "cpu_info": info["cpu_info"],
            "gpu_info": "",
            "backends": "CPU",
            "model_filename": str(path),
            "model_type": f"{model.architecture} {_size_label(n_params)} {type_name}",
            "model_size": size,
            "model_n_params": n_params,
            "n_batch": n_prompt,
            "n_ubatch": n_prompt,
            "n_threads": model.threads,
            "type_k": model.cache.type_k,
            "type_v": model.cache.type_v,
            "n_prompt": test.n_prompt,
            "n_gen": test.n_gen,
            "n_depth": n_depth,
            "test_time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "avg_ns": int(statistics.fmean(test.samples_ns)),
            "stddev_ns": int(statistics.stdev(test.samples_ns)) if reps > 1 else 0,
            "avg_ts": round(test.avg_ts, 6),
            "stddev_ts": round(test.stddev_ts, 6),
            "samples_ns": test.samples_ns,
            "samples_ts": [round(v, 6) for v in test.samples_ts],
            # halfbyte's own fields
            "engine": "halfbyte",
            "kernels": kernel_description(),
            "cpu_features": info["cpu_features"],
            "n_cpus": info["n_cpus"],
            "machine": info["machine"],
            "os": info["os"],
            "versions": info["versions"],
            "load_ms": round(load_ns / 1e6, 1),
            "first_token_ms": round((load_ns + first) / 1e6, 1),
            "compile_ms": round(compile_ns / 1e6, 1),  # kernel compiling within first_token_ms
            "peak_rss_bytes": peak_rss_bytes(),
            "file_size": Path(path).stat().st_size,
            "kv_cache_bytes": kv_bytes,
        })
    return records


def check_bench_args(n_prompt: int, n_gen: int, reps: int, n_depth: int = 0) -> None:
    """llama-bench's ranges, with the option named: -p/-n >= 0 (not both 0), -r >= 1."""
    from engine.model import check_int

    check_int("-p (n_prompt)", n_prompt, 0)
    check_int("-n (n_gen)", n_gen, 0)
    check_int("-r (repetitions)", reps, 1)
    check_int("-d (n_depth)", n_depth, 0)
    if n_prompt + n_gen == 0:
        raise HalfbyteError("need -p > 0 or -n > 0 tokens to measure")


def _file_type_name(file_type: Any) -> str:
    from gguf import LlamaFileType

    try:
        name = LlamaFileType(int(file_type)).name
    except (TypeError, ValueError):
        return "?"
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")


def markdown_table(records: list[dict[str, Any]]) -> str:
    """llama-bench's table: model, size, params, backend, threads, test, t/s."""
    lines = ["| model | size | params | backend | threads | test | t/s |",
             "| --- | ---: | ---: | --- | ---: | ---: | ---: |"]
    for r in records:
        test = f"pp{r['n_prompt']}" if r["n_prompt"] else f"tg{r['n_gen']}"
        if r.get("n_depth"):
            test += f" @ d{r['n_depth']}"
        lines.append(
            f"| {r['model_type']} | {r['model_size'] / 2**30:.2f} GiB | {r['model_n_params'] / 1e9:.2f} B "
            f"| {r['engine']} {r['kernels']} | {r['n_threads']} | {test} | {r['avg_ts']:.2f} ± {r['stddev_ts']:.2f} |"
        )
    return "\n".join(lines)


@click.command()
@click.argument("model_path", metavar="[MODEL]", required=False)
@click.option("-p", "--n-prompt", default=128, show_default=True, help="Prompt tokens (pp test; 0 = skip).")
@click.option("-n", "--n-gen", default=64, show_default=True, help="Generated tokens (tg test; 0 = skip).")
@click.option("-t", "--threads", type=int, default=None,
              help="Threads (0 or negative, the default: all cores, fixed as in llama-bench).")
@click.option("-d", "--n-depth", default=0, show_default=True,
              help="Tokens already in the context before each timed test (long-context speed).")
@click.option("-ctk", "--cache-type-k", "type_k", default="f16", show_default=True,
              help="KV cache type of the keys: f16, f32 or q8_0.")
@click.option("-ctv", "--cache-type-v", "type_v", default="f16", show_default=True,
              help="KV cache type of the values: f16, f32 or q8_0.")
@click.option("-r", "--repetitions", "reps", default=5, show_default=True, help="Timed repetitions per test.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list (llama-bench field names).")
@click.option("--synthetic", metavar="SHAPE",
              help="Benchmark a random-weight Q4_0 file of a known shape (llama-1b, llama-3b, llama-7b, "
                   "llama-13b), built once and cached.")
def bench(model_path: str | None, n_prompt: int, n_gen: int, threads: int | None, n_depth: int, type_k: str,
          type_v: str, reps: int, as_json: bool, synthetic: str | None) -> None:
    """Measure prompt processing (pp) and generation (tg) tokens/s of a GGUF file, like llama-bench."""
    from engine.run_cli import check_not_directory, compile_notices, warnings_on_stderr

    if (model_path is None) == (synthetic is None):
        raise HalfbyteError("give a MODEL file or --synthetic SHAPE (one of them)")
    from engine.kernels.attention import cache_type_name

    cache_type_name(type_k), cache_type_name(type_v)  # a bad -ctk/-ctv before anything is loaded
    check_bench_args(n_prompt, n_gen, reps, n_depth)  # before building a synthetic file or loading anything
    check_not_directory(model_path)
    if synthetic is not None:
        from converters.synthetic import synthetic_path

        click.echo(f"halfbyte: using synthetic model {synthetic} (built on first use)", err=True)
        model_path = str(synthetic_path(synthetic))
    compile_notices()

    def log(message: str) -> None:
        click.echo(f"halfbyte: {message}", err=True)

    with warnings_on_stderr():
        records = run_bench(model_path, n_prompt, n_gen, threads, reps, log=log, n_depth=n_depth, type_k=type_k,
                            type_v=type_v)
    if as_json:
        click.echo(json.dumps(records, indent=2))
        return
    click.echo(markdown_table(records))
    r = records[0]
    click.echo(
        f"\nload {r['load_ms']:.0f} ms, first token {r['first_token_ms']:.0f} ms after start of load, "
        f"peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB (file {r['file_size'] / 2**20:.0f} MiB, "
        f"KV cache {r['kv_cache_bytes'] / 2**20:.0f} MiB); {r['cpu_info']}, {r['n_cpus']} CPUs, "
        f"features {','.join(r['cpu_features'])}"
    )
