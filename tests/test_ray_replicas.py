"""`halfbyte serve --ray`: the OpenAI-compatible server as Ray Serve replicas (engine/distributed/replicas.py).

One local Ray instance for the module (on the loopback address, 4 logical CPUs), two replicas of the
demo model, driven with the official `openai` client on 127.0.0.1. Every request is bounded
(max_tokens, client timeouts), every wait has a deadline.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytestmark = pytest.mark.slow

ray = pytest.importorskip("ray", reason="Ray Serve is not installed (pip install 'halfbyte[ray]')")
pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'halfbyte[ray]')")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from click.testing import CliRunner  # noqa: E402

from engine.cli import main  # noqa: E402
from engine.default_model import default_model_path  # noqa: E402
from engine.distributed import replicas  # noqa: E402
from engine.model import Model  # noqa: E402

TIMEOUT = 60
N_CTX = 8192  # beyond the demo model's training context (512): requests that run for long
PARALLEL = 4
# Batched decoding can differ from one sequence alone by float rounding (engine/serving/scheduler.py;
# steps of 8 or more rows even use 8-bit activations), so greedy text can differ where the two best
# tokens are that close: their log-probabilities (alone) within this, as in tests/test_server.py.
TIE_TOLERANCE = 0.1
PID = replicas.REPLICA_PID_HEADER


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ray_instance():
    if ray.is_initialized():
        pytest.skip("Ray is already initialized in this process")
    replicas.init_local_ray(4, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    replicas.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def deployed(ray_instance):
    running = replicas.deploy(str(default_model_path()), replicas=2, parallel=PARALLEL, n_ctx=N_CTX, threads=1,
                              host="127.0.0.1", port=free_port(), queue_size=16)
    yield running
    replicas.shutdown()


@pytest.fixture(scope="module")
def model() -> Model:
    return Model.load(default_model_path())


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", timeout=TIMEOUT, max_retries=0)


CHATS = [
    [{"role": "user", "content": "Who spake unto Moses?"}],
    [{"role": "system", "content": "Answer as the KJV."}, {"role": "user", "content": "What is love?"}],
    [{"role": "user", "content": "Where is Jerusalem?"}],
    [{"role": "user", "content": "Tell me of the flood."}],
]
PROMPTS = ["And the LORD said unto Moses", "In the beginning God created", "Hear, O Israel",
           "And it came to pass"]


def chat_streamed(url: str, messages: list) -> dict:
    raw = client(url).chat.completions.with_raw_response.create(
        model="m", messages=messages, max_tokens=24, temperature=0, logprobs=True, top_logprobs=2, stream=True,
        extra_body={"cache_prompt": False})
    pid = raw.headers[PID]
    text, tokens, finish = [], [], None
    for chunk in raw.parse():
        choice = chunk.choices[0]
        text.append(choice.delta.content or "")
        if choice.logprobs and choice.logprobs.content:
            tokens += [t.token for t in choice.logprobs.content]
        finish = choice.finish_reason or finish
    return {"pid": pid, "text": "".join(text), "tokens": tokens, "finish": finish}


def completion(url: str, prompt: str) -> dict:
    raw = client(url).completions.with_raw_response.create(model="m", prompt=prompt, max_tokens=24, temperature=0,
                                                           logprobs=2, extra_body={"cache_prompt": False})
    reply = raw.parse()
    choice = reply.choices[0]
    return {"pid": raw.headers[PID], "text": choice.text, "tokens": choice.logprobs.tokens,
            "finish": choice.finish_reason, "completion_tokens": reply.usage.completion_tokens}


def alone_chat(model: Model, messages: list) -> dict:
    reply = model.create_chat_completion(messages, max_tokens=24, temperature=0, logprobs=True, top_logprobs=2,
                                         cache_prompt=False)
    choice = reply["choices"][0]
    content = choice["logprobs"]["content"]
    return {"text": choice["message"]["content"], "tokens": [t["token"] for t in content],
            "tops": [[top["logprob"] for top in t["top_logprobs"]] for t in content], "finish": choice["finish_reason"]}


def alone_completion(model: Model, prompt: str) -> dict:
    reply = model.create_completion(prompt, max_tokens=24, temperature=0, logprobs=2, cache_prompt=False)
    choice = reply["choices"][0]
    lp = choice["logprobs"]
    return {"text": choice["text"], "tokens": lp["tokens"], "tops": [list(t.values()) for t in lp["top_logprobs"]],
            "finish": choice["finish_reason"]}


def assert_matches_alone(served: dict, alone: dict) -> None:
    """The served answer is the one the model gives alone, token for token and to the finish reason;
    or the two part at a token where the model alone saw a near-tie between its two best tokens
    (batched rounding may pick the other). A truncated, spliced or otherwise corrupted answer parts
    at a clear choice, or matches as a prefix only, and fails."""
    if served["tokens"] == alone["tokens"]:
        assert served["text"] == alone["text"] and served["finish"] == alone["finish"], (served, alone)
        return
    j = next((i for i, (a, b) in enumerate(zip(served["tokens"], alone["tokens"])) if a != b),
             min(len(served["tokens"]), len(alone["tokens"])))
    assert j < len(alone["tops"]), ("the served answer runs past the answer alone", served, alone)
    best = sorted(alone["tops"][j], reverse=True)
    assert len(best) >= 2 and best[0] - best[1] < TIE_TOLERANCE, (j, served, alone)


def test_two_replicas_answer_sixteen_concurrent_requests(deployed, model):
    """16 requests at once (8 streamed chats, 8 completions; each distinct request twice) across two
    replicas of 4 slots: every answer complete and the one the model gives alone (up to float ties),
    and both replicas served some."""
    url = deployed.url
    jobs = [("chat", m) for m in CHATS * 2] + [("completion", p) for p in PROMPTS * 2]
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = [pool.submit(chat_streamed if kind == "chat" else completion, url, arg) for kind, arg in jobs]
        served = [f.result(TIMEOUT * 2) for f in futures]
    assert len({s["pid"] for s in served}) == 2, [s["pid"] for s in served]
    for (kind, arg), answer in zip(jobs, served):
        alone = alone_chat(model, arg) if kind == "chat" else alone_completion(model, arg)
        assert answer["finish"] in ("stop", "length") and answer["tokens"], answer
        if kind == "completion":
            assert answer["completion_tokens"] == len(answer["tokens"])
        assert_matches_alone(answer, alone)


def test_endpoints_and_errors_pass_through(deployed):
    health = httpx.get(f"{deployed.url}/health", timeout=TIMEOUT)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert health.json()["slots_idle"] + health.json()["slots_processing"] == PARALLEL
    assert int(health.headers[PID]) > 0 and health.headers[replicas.REPLICA_HEADER]
    assert [m.id for m in client(deployed.url).models.list().data] == ["demo-kjv-q8_0.gguf"]
    bad = httpx.post(f"{deployed.url}/v1/completions", content=b'{"prompt": ', timeout=TIMEOUT,
                     headers={"content-type": "application/json"})
    assert bad.status_code == 400 and "malformed JSON" in bad.json()["error"]["message"]
    missing = httpx.get(f"{deployed.url}/v1/nothing?x=1", timeout=TIMEOUT)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == 404
    # a body over the limit stops at the ingress (it reads max_body + 1 bytes) and is the app's 413
    big = httpx.post(f"{deployed.url}/v1/completions", content=b"x" * (5 * 1024 * 1024), timeout=TIMEOUT)
    assert big.status_code == 413 and big.json()["error"]["code"] == 413


def _busy_slots_on(url: str, pid: str) -> int:
    """``slots_processing`` of the replica with process id ``pid``. Serve routes a request to the less
    busy replica, so /health is asked two at a time (the second may land on either) until ``pid`` answers."""
    deadline = time.monotonic() + 20
    with ThreadPoolExecutor(2) as pool:
        while True:
            assert time.monotonic() < deadline, f"replica {pid} did not answer /health"
            for response in pool.map(lambda _: httpx.get(f"{url}/health", timeout=TIMEOUT), range(2)):
                if response.headers[PID] == pid:
                    return response.json()["slots_processing"]


def test_client_disconnect_frees_the_slot(deployed):
    """A streaming client that goes away cancels the ingress's call, the replica's call and the job:
    its slot is free within seconds, long before the ~8000 tokens it asked for could be generated
    (tens of seconds on this model)."""
    body = {"prompt": "And it came to pass", "max_tokens": N_CTX - 100, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{deployed.url}/v1/completions", json=body, timeout=TIMEOUT) as response:
        assert response.status_code == 200
        pid = response.headers[PID]
        lines = response.iter_lines()
        for _ in range(3):
            next(lines)
        assert _busy_slots_on(deployed.url, pid) == 1
    closed = time.monotonic()
    while _busy_slots_on(deployed.url, pid) != 0:
        assert time.monotonic() - closed < 5, "the disconnected request kept its slot"
        time.sleep(0.05)


def test_full_queue_is_503_with_retry_after(deployed):
    """2 x 4 slots held by long streams, then 48 requests at once: 32 wait (16 per replica), the rest
    get the single server's answer to a full queue (the ingress has 2 x (4 + 16) places for calls in
    flight): 503, Retry-After: 1, OpenAI's error. The slots are taken first, and seen taken, so the
    count does not depend on how fast the burst arrives."""
    def post(_):
        return httpx.post(f"{deployed.url}/v1/completions", timeout=TIMEOUT * 4,
                          json={"prompt": "And it came to pass", "max_tokens": 64, "temperature": 0})

    holders = []
    with httpx.Client(timeout=TIMEOUT * 4) as client:
        try:
            for _ in range(2 * PARALLEL):
                stream = client.stream("POST", f"{deployed.url}/v1/completions",
                                       json={"prompt": "And it came to pass", "max_tokens": N_CTX - 64,
                                             "temperature": 0, "stream": True,
                                             "logit_bias": {"2": -100}})  # no end-of-text: it holds
                response = stream.__enter__()
                holders.append(stream)
                assert response.status_code == 200
                next(response.iter_lines())  # generating: this request holds a slot
            with ThreadPoolExecutor(48) as pool:
                futures = [pool.submit(post, i) for i in range(48)]
                # Those beyond the ingress's places are refused at once (counted on its event loop,
                # engine/distributed/replicas.py Places); the rest wait for the held slots. Wait for
                # the refusals with a deadline: on a loaded machine the burst crosses the proxy slowly.
                deadline = time.monotonic() + 3 * TIMEOUT
                while sum(f.done() for f in futures) < 16 and time.monotonic() < deadline:
                    time.sleep(0.1)
                for stream in holders:
                    stream.__exit__(None, None, None)  # the holders go away: their slots free
                holders = []
                responses = [f.result() for f in futures]
        finally:
            for stream in holders:
                stream.__exit__(None, None, None)
    busy = [r for r in responses if r.status_code == 503]
    served = [r for r in responses if r.status_code == 200]
    statuses = [r.status_code for r in responses]
    assert 0 < len(busy) <= 16 and len(served) >= 32 and len(busy) + len(served) == 48, statuses
    for response in busy:
        error = response.json()["error"]
        assert response.headers["retry-after"] == "1" and error["type"] == "unavailable_error"
        assert error["code"] == 503 and error["message"].startswith("server busy"), error
    assert all(r.json()["usage"]["completion_tokens"] == 64 for r in served)


def test_places_are_counted_and_released_once():
    """The ingress's bound on calls in flight: full at the limit, a place released once however
    often it is released, and released when dropped unreleased (a response never started)."""
    places = replicas.Places(2)
    first, second = places.take(), places.take()
    assert places.take() is None and places.taken == 2
    first.release()
    first.release()
    assert places.taken == 1
    del second
    assert places.taken == 0 and places.take() is not None


def test_killed_replica_fails_its_requests_cleanly_and_is_replaced(deployed):
    """SIGKILL one replica while 8 long requests run on the two: its requests fail with a retryable
    503 (before the response started: status 503 with Retry-After: 1; in a started event stream: a
    last `data: {"error": {... 503 ...}}`), the other replica's complete, and Serve starts a new
    replica, which then serves."""
    url = deployed.url
    long = 1000
    started: dict[int, str] = {}

    def stream(i: int) -> tuple:
        raw = client(url).completions.with_raw_response.create(model="m", prompt="And it came to pass",
                                                               max_tokens=long, temperature=0, stream=True)
        started[i] = raw.headers[PID]
        try:
            chunks = list(raw.parse())
        except openai.APIError as exc:
            return "failed", started[i], exc
        return "done", started[i], chunks

    def whole(i: int) -> tuple:
        try:
            raw = client(url).completions.with_raw_response.create(model="m", prompt="Hear, O Israel",
                                                                   max_tokens=long, temperature=0)
        except openai.APIStatusError as exc:
            return "failed", None, exc
        return "done", raw.headers[PID], raw.parse()

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(stream, i) for i in range(4)] + [pool.submit(whole, i) for i in range(4)]
        deadline = time.monotonic() + TIMEOUT
        while len(started) < 4:
            assert time.monotonic() < deadline, "the streams did not start"
            assert not any(f.done() and f.exception() for f in futures), [f.exception() for f in futures if f.done()]
            time.sleep(0.01)
        victim = started[0]
        os.kill(int(victim), signal.SIGKILL)
        killed_at = time.monotonic()
        results = [f.result(TIMEOUT * 2) for f in futures]
    failed = [r for r in results if r[0] == "failed"]
    done = [r for r in results if r[0] == "done"]
    assert 1 <= len(failed) <= PARALLEL and done, results
    for kind, (outcome, pid, value) in zip(["stream"] * 4 + ["whole"] * 4, results):
        if outcome == "failed":
            if kind == "stream":  # the event stream had started: its last event is the error
                assert pid == victim and value.body["code"] == 503 and value.body["type"] == "unavailable_error"
            else:
                assert value.status_code == 503 and value.response.headers["retry-after"] == "1"
                assert value.body["type"] == "unavailable_error" and value.body["code"] == 503, value.body
            assert "replica" in str(value)
        else:  # complete: every token it asked for
            assert pid != victim
            if kind == "stream":
                assert value[-1].choices[0].finish_reason == "length" and len(value) >= long // 2
            else:
                assert value.usage.completion_tokens == long and value.choices[0].finish_reason == "length"
    assert all(r[1] == victim for r in failed if r[1] is not None)
    # every request after the kill is answered; Serve replaces the dead replica, and the new one serves
    survivor = next(r[1] for r in done)
    deadline = killed_at + 90
    pids: set[str] = set()
    while not pids - {victim, survivor}:
        assert time.monotonic() < deadline, f"no new replica yet (answered by {pids})"
        with ThreadPoolExecutor(PARALLEL) as pool:
            answers = list(pool.map(lambda p: completion(url, p), PROMPTS * 2))
        pids = {a["pid"] for a in answers}
        assert victim not in pids and all(a["completion_tokens"] == 24 or a["finish"] == "stop" for a in answers)
        time.sleep(0.5)


# -- the command line --------------------------------------------------------------------------------


def one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 1, (result.exit_code, result.output)
    assert "Traceback" not in result.output and "Usage:" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("halfbyte: error: ")]
    assert len(errors) == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])


def test_cli_option_errors_are_one_line():
    def invoke(*args):
        return CliRunner().invoke(main, ["serve", *args])

    one_line_error(invoke("--ray", "--replicas", "0"), "--replicas must be >= 1, got 0")
    one_line_error(invoke("--ray", "--autoscale", "3:1"), "--autoscale", "0 <= MIN <= MAX")
    one_line_error(invoke("--ray", "--autoscale", "0:0"), "--autoscale", "MAX >= 1")
    one_line_error(invoke("--ray", "--autoscale", "two"), "--autoscale must be MIN:MAX")
    one_line_error(invoke("--ray", "--replicas", "2", "--autoscale", "1:2"), "either --replicas or --autoscale")
    one_line_error(invoke("--ray-address", "auto"), "--ray-address needs --ray")
    one_line_error(invoke("--replicas", "2"), "--replicas needs --ray")


def test_cli_without_ray_installed(monkeypatch):
    for name in [m for m in sys.modules if m == "ray" or m.startswith("ray.")]:
        monkeypatch.setitem(sys.modules, name, None)  # `import ray` raises ImportError
    result = CliRunner().invoke(main, ["serve", "--ray", "--replicas", "2"])
    one_line_error(result, "halfbyte serve --ray needs Ray Serve: pip install 'halfbyte[ray]'")


def test_cli_serves_until_sigterm(ray_instance, deployed):
    """`halfbyte serve --ray` as a process joining the module's Ray: the line it prints, a request, then
    SIGTERM: Serve shut down, exit status 0. (It takes over Serve, so the module's deployment goes first.)"""
    replicas.shutdown()
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "engine", "serve", "--ray", "--ray-address", ray_instance,
                                "--replicas", "1", "--port", str(port), "-np", "2", "-c", "256", "-t", "1"],
                               stderr=subprocess.PIPE, text=True)
    try:
        url = None
        deadline = time.monotonic() + TIMEOUT * 2
        while url is None and time.monotonic() < deadline:
            line = process.stderr.readline()
            assert line or process.poll() is None, "halfbyte serve --ray exited"
            match = re.search(r"serving demo-kjv-q8_0\.gguf on (http://127\.0\.0\.1:\d+) with 1 Ray Serve replica "
                              r"\(2 slots of 256 tokens", line)
            url = match.group(1) if match else None
        assert url == f"http://127.0.0.1:{port}"
        reply = client(url).chat.completions.create(model="m", messages=CHATS[0], max_tokens=4)
        assert 1 <= reply.usage.completion_tokens <= 4
        process.send_signal(signal.SIGTERM)
        assert process.wait(TIMEOUT) == 0
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{url}/health", timeout=5)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stderr.close()
