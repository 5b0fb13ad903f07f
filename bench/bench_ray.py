"""Aggregate generation speed of `halfbyte serve --ray` with 1, then 2 (or --replicas) Ray Serve replicas.

    python bench/bench_ray.py                          # the embedded demo model
    python bench/bench_ray.py MODEL.gguf -c 512 -t 1 --clients 8 --requests 4 -n 32

Starts a local Ray instance (loopback only), deploys MODEL with each replica count in turn
(``engine.distributed.replicas.deploy``, ``--parallel`` slots per replica, on a free loopback port),
warms the replicas up, then runs a bounded load: ``--clients`` concurrent clients, each sending
``--requests`` streaming /v1/completions requests one after the other (different prompts, greedy,
``max_tokens`` = -n). Reports per replica count: generated tokens (from each stream's usage chunk),
wall time, aggregate tokens/s (all tokens / wall time from the first request to the last [DONE]),
mean and worst request latency (request sent to [DONE]), and which replicas answered. Not a test:
numbers depend on the machine and its load (replicas share its cores).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.distributed import replicas  # noqa: E402
from engine.machine import cpu_info, n_cpus  # noqa: E402

PROMPTS = [
    "The history of the city begins in the year",
    "In a small village near the mountains there lived",
    "And the LORD said unto Moses",
    "Once upon a time, a young engineer decided to",
    "The recipe calls for three cups of flour and",
    "In the beginning God created",
    "Hear, O Israel",
    "And it came to pass",
]


def one_stream(url: str, prompt: str, n_predict: int) -> dict:
    body = {"prompt": prompt, "max_tokens": n_predict, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "cache_prompt": False}
    start = time.perf_counter()
    tokens = 0
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        replica = response.headers.get(replicas.REPLICA_PID_HEADER, "?")
        for line in response.iter_lines():
            if line.startswith("data: {"):
                data = json.loads(line[6:])
                if "error" in data:
                    raise RuntimeError(data["error"]["message"])
                if data.get("usage"):
                    tokens = data["usage"]["completion_tokens"]
    return {"tokens": tokens, "latency": time.perf_counter() - start, "end": time.perf_counter(), "replica": replica}


def run_load(url: str, clients: int, requests: int, n_predict: int) -> dict:
    results: list[dict] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        for r in range(requests):
            try:
                result = one_stream(url, PROMPTS[(c + r) % len(PROMPTS)], n_predict)
            except Exception as exc:  # reported, not hidden
                with lock:
                    errors.append(exc)
                return
            with lock:
                results.append(result)

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise SystemExit(f"{len(errors)} requests failed, e.g. {errors[0]!r}")
    wall = max(r["end"] for r in results) - start
    tokens = sum(r["tokens"] for r in results)
    latencies = [r["latency"] for r in results]
    return {"requests": len(results), "tokens": tokens, "seconds": wall, "tokens_per_second": tokens / wall,
            "latency_mean": statistics.mean(latencies), "latency_max": max(latencies),
            "replicas_seen": len({r["replica"] for r in results})}


@contextlib.contextmanager
def single_process_server(args: argparse.Namespace):
    """`halfbyte serve` without --ray, in a thread of this process on a free loopback port."""
    import socket

    import uvicorn

    from engine.server import build_service, create_app

    service = build_service(args.model, args.ctx_size, args.threads, args.parallel, None, None)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    server = uvicorn.Server(uvicorn.Config(create_app(service), log_level="error", access_log=False, lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        service.scheduler.stop()
        sock.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default=None, help="GGUF file or org/repo:QUANT (default: demo model)")
    parser.add_argument("--replicas", default="0,1,2",
                        help="replica counts to measure, in turn (0: the single-process server, no Ray)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent streaming clients")
    parser.add_argument("--requests", type=int, default=4, help="requests per client, one after the other")
    parser.add_argument("-n", "--n-predict", type=int, default=32, help="max_tokens of each request")
    parser.add_argument("-np", "--parallel", type=int, default=4, help="slots per replica")
    parser.add_argument("-c", "--ctx-size", type=int, default=512, help="context per slot")
    parser.add_argument("-t", "--threads", type=int, default=None, help="kernel threads per replica")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.model is None:
        from engine.default_model import default_model_path

        args.model = str(default_model_path())
    counts = [int(x) for x in args.replicas.split(",")]
    cpu_per_replica = args.threads if args.threads and args.threads > 0 else 1
    replicas.init_local_ray(max(n_cpus(), cpu_per_replica * max(max(counts), 1)), log_to_driver=False)
    rows = []
    try:
        for count in counts:
            if count == 0:  # the same app in this process, no Ray: what Ray's hops add
                with single_process_server(args) as url:
                    run_load(url, args.parallel, 1, 4)
                    rows.append({"replicas": "0 (no Ray)", **run_load(url, args.clients, args.requests,
                                                                      args.n_predict)})
                continue
            deployed = replicas.deploy(args.model, replicas=count, parallel=args.parallel, n_ctx=args.ctx_size,
                                       threads=args.threads, host="127.0.0.1", port=0)
            try:
                run_load(deployed.url, count * args.parallel, 1, 4)  # warm-up: page-in, first steps of each
                rows.append({"replicas": count, **run_load(deployed.url, args.clients, args.requests,
                                                           args.n_predict)})
            finally:
                replicas.shutdown()
    finally:
        import ray

        ray.shutdown()
    cpu = f"{cpu_info()} ({n_cpus()} logical CPUs)"
    if args.json:
        print(json.dumps({"cpu": cpu, "model": Path(args.model).name, "rows": rows}, indent=2))
        return
    print(f"{Path(args.model).name} on {cpu}: {args.clients} clients x {args.requests} streaming requests, "
          f"max_tokens {args.n_predict}, {args.parallel} slots per replica")
    print("| replicas | requests | generated tokens | wall s | aggregate tokens/s | latency mean s | latency max s "
          "| replicas answering |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['replicas']} | {r['requests']} | {r['tokens']} | {r['seconds']:.2f} | "
              f"{r['tokens_per_second']:.1f} | {r['latency_mean']:.3f} | {r['latency_max']:.3f} | "
              f"{r['replicas_seen']} |")


if __name__ == "__main__":
    main()
