"""Aggregate generation speed and time to first token of `halfbyte serve` under 1, 2, 4, 8 concurrent streams.

    python bench/bench_server.py ~/.cache/halfbyte/synthetic/llama-1b-q4_0.gguf -n 32 -t 2
    python bench/bench_server.py MODEL --llama-server /path/to/llama-server   # the same against llama.cpp

Each level starts N streaming /v1/completions requests at once (different prompts, greedy,
``max_tokens`` = -n) and reports: aggregate generated tokens per second (all tokens of all
streams / wall time from the first request to the last [DONE]), and time to first token (median
and worst over the streams). The server runs in a subprocess on a free loopback port with
``--parallel 8``; llama-server is started with ``-np 8 -c 8*ctx`` (its -c is shared by the slots)
when given. Not a test: numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

PROMPTS = [
    "The history of the city begins in the year",
    "In a small village near the mountains there lived",
    "The most important property of a prime number is",
    "Once upon a time, a young engineer decided to",
    "The recipe calls for three cups of flour and",
    "When the train finally arrived at the station,",
    "Scientists have long debated whether the moon",
    "The committee met on Tuesday to discuss the budget for",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_halfbyte(model: str, threads: int, ctx: int) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "engine", "serve", model, "--port", "0", "-np", "8", "-c", str(ctx),
               "--queue-size", "16"]
    if threads:
        command += ["-t", str(threads)]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line and process.poll() is not None:
            raise SystemExit("halfbyte serve exited")
        match = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
        if match:
            threading.Thread(target=process.stderr.read, daemon=True).start()  # keep draining
            return process, match.group(1)
    raise SystemExit("halfbyte serve did not start")


def start_llama_server(binary: str, model: str, threads: int, ctx: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [binary, "-m", model, "--host", "127.0.0.1", "--port", str(port), "-np", "8", "-c", str(8 * ctx),
               "--no-webui"]
    if threads:
        command += ["-t", str(threads)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.kill()
    raise SystemExit("llama-server did not start")


def one_stream(url: str, prompt: str, n_predict: int, start: float, out: dict) -> None:
    body = {"prompt": prompt, "max_tokens": n_predict, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "cache_prompt": False,
            "logprobs": 1}  # a chunk per token even where its text is empty (random-weight vocabularies)
    tokens = chunks = 0
    first = None
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if data.get("usage"):
                tokens = data["usage"]["completion_tokens"]
            for choice in data.get("choices") or []:
                if choice.get("text") or (choice.get("logprobs") or {}).get("tokens"):
                    chunks += 1
                    if first is None:
                        first = time.perf_counter()
    out.update(tokens=tokens or chunks, ttft=(first or time.perf_counter()) - start, end=time.perf_counter())


def run_level(url: str, n: int, n_predict: int) -> dict:
    results = [dict() for _ in range(n)]
    start = time.perf_counter()
    threads = [threading.Thread(target=one_stream, args=(url, PROMPTS[i % len(PROMPTS)], n_predict, start,
                                                         results[i])) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = max(r["end"] for r in results) - start
    tokens = sum(r["tokens"] for r in results)
    ttfts = [r["ttft"] for r in results]
    return {"streams": n, "tokens": tokens, "seconds": wall, "tokens_per_second": tokens / wall,
            "ttft_median": statistics.median(ttfts), "ttft_max": max(ttfts)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("-n", "--n-predict", type=int, default=32, help="tokens per stream")
    parser.add_argument("-t", "--threads", type=int, default=0)
    parser.add_argument("-c", "--ctx-size", type=int, default=512, help="context per slot")
    parser.add_argument("--levels", default="1,2,4,8")
    parser.add_argument("--llama-server", default=None, help="path to llama.cpp's llama-server (skipped if absent)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    engines = [("halfbyte", lambda: start_halfbyte(args.model, args.threads, args.ctx_size))]
    if args.llama_server:
        if os.path.isfile(args.llama_server) and os.access(args.llama_server, os.X_OK):
            engines.append(("llama.cpp", lambda: start_llama_server(args.llama_server, args.model, args.threads,
                                                                    args.ctx_size)))
        else:
            print(f"llama-server not found at {args.llama_server}: skipped", file=sys.stderr)
    rows = []
    for name, start in engines:
        process, url = start()
        try:
            run_level(url, 1, 4)  # warm-up (kernel compilation, page-in)
            for n in levels:
                rows.append({"engine": name, **run_level(url, n, args.n_predict)})
        finally:
            process.terminate()
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print("| engine | streams | generated tokens | wall s | aggregate tokens/s | TTFT median s | TTFT max s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['engine']} | {r['streams']} | {r['tokens']} | {r['seconds']:.2f} | {r['tokens_per_second']:.1f} "
              f"| {r['ttft_median']:.3f} | {r['ttft_max']:.3f} |")


if __name__ == "__main__":
    main()
