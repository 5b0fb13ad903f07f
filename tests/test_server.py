"""`halfbyte serve`: the real server on a free loopback port, driven with the official `openai` client.

Servers run in threads of this process (uvicorn on a socket bound to 127.0.0.1:0) sharing the demo
model; one test starts `halfbyte serve` as a subprocess. Every request is bounded (max_tokens,
client timeouts).
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from engine.default_model import default_model_path  # noqa: E402
from engine.model import Model  # noqa: E402
from engine.server import Service, create_app  # noqa: E402
from engine.serving.scheduler import Scheduler  # noqa: E402

TIMEOUT = 60
# A step with 8 or more sequences runs the weights' 8-row integer tiles, which quantize the
# activations to 8 bits (as llama.cpp's batched products do); fewer rows multiply float activations.
# So a request's logits in a batch of 8 differ from the same request alone by up to ~0.5% of the
# logits' scale (test_batched_logits_tolerance measures it), and greedy text can differ where the
# two best tokens are that close: their log-probabilities (alone) within this.
TIE_TOLERANCE = 0.1
BATCH_LOGITS_TOLERANCE = 0.01  # of the logits' scale


class RunningServer:
    def __init__(self, model: Model, n_slots: int = 8, api_key: str | None = None, queue_size: int = 16,
                 prefill_chunk: int = 64) -> None:
        import uvicorn

        self.scheduler = Scheduler(model, n_slots=n_slots, queue_size=queue_size, prefill_chunk=prefill_chunk).start()
        self.service = Service(model, self.scheduler, api_key=api_key)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(create_app(self.service), log_level="error", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + TIMEOUT
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)

    def client(self, api_key: str = "none") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, timeout=TIMEOUT, max_retries=0)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.scheduler.stop()
        self.sock.close()


@pytest.fixture(scope="module")
def model() -> Model:
    return Model.load(default_model_path())


@pytest.fixture(scope="module")
def server(model):
    running = RunningServer(model, n_slots=8)
    yield running
    running.close()


MESSAGES = [{"role": "system", "content": "Answer as the KJV."}, {"role": "user", "content": "Who spake unto Moses?"}]


def test_health_and_models(server):
    health = httpx.get(f"{server.url}/health", timeout=TIMEOUT).json()
    assert health["status"] == "ok" and health["slots_idle"] + health["slots_processing"] == 8
    models = server.client().models.list()
    assert [m.id for m in models.data] == ["demo-kjv-q8_0.gguf"]


def test_chat(server, model):
    reply = server.client().chat.completions.create(model="any", messages=MESSAGES, max_tokens=16, temperature=0)
    choice = reply.choices[0]
    assert reply.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length") and choice.message.content
    expected = model.create_chat_completion(MESSAGES, max_tokens=16, temperature=0, cache_prompt=False)
    assert reply.usage.prompt_tokens == expected["usage"]["prompt_tokens"]
    assert reply.usage.completion_tokens == expected["usage"]["completion_tokens"]
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert choice.message.content == expected["choices"][0]["message"]["content"]


def test_streamed_chat_equals_non_streamed(server):
    client = server.client()
    whole = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=20, temperature=0)
    chunks = list(client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=20, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_sse_framing(server):
    body = {"prompt": "And the LORD", "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=TIMEOUT) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = "".join(response.iter_text())
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"


def test_completions(server, model):
    client = server.client()
    prompt = "And the LORD said unto Moses"
    reply = client.completions.create(model="m", prompt=prompt, max_tokens=10, temperature=0, logprobs=2)
    assert reply.object == "text_completion"
    assert reply.choices[0].text == model.generate(prompt, max_tokens=10, temperature=0)
    lp = reply.choices[0].logprobs
    assert "".join(lp.tokens) == reply.choices[0].text and len(lp.top_logprobs) == 10
    assert all(max(top.values()) == pytest.approx(t) for top, t in zip(lp.top_logprobs, lp.token_logprobs))
    streamed = client.completions.create(model="m", prompt=prompt, max_tokens=10, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == reply.choices[0].text
    stopped = client.completions.create(model="m", prompt=prompt, max_tokens=10, temperature=0, stop=[" children"])
    assert stopped.choices[0].finish_reason == "stop"
    # token-id prompts, seeds
    by_ids = client.completions.create(model="m", prompt=model.tokenize(prompt), max_tokens=10, temperature=0)
    assert by_ids.choices[0].text == reply.choices[0].text
    a, b = (client.completions.create(model="m", prompt=prompt, max_tokens=12, seed=7, temperature=1.0).choices[0].text
            for _ in range(2))
    assert a == b


def _post(server, path: str, body, headers=None, raw: bytes | None = None) -> httpx.Response:
    content = raw if raw is not None else json.dumps(body).encode()
    return httpx.post(f"{server.url}{path}", content=content, timeout=TIMEOUT,
                      headers={"content-type": "application/json", **(headers or {})})


def _error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "code"} and error["code"] == status
    return error["message"]


def test_errors(server, model):
    chat = "/v1/chat/completions"
    assert "malformed JSON" in _error(_post(server, chat, None, raw=b'{"messages": ['), 400)
    assert "JSON object" in _error(_post(server, chat, [1, 2]), 400)
    assert "temperature must be a number" in _error(
        _post(server, chat, {"messages": MESSAGES, "temperature": "hot"}), 400)
    assert "max_tokens must be an integer" in _error(_post(server, chat, {"messages": MESSAGES, "max_tokens": "9"}),
                                                     400)
    assert "stream must be true or false" in _error(_post(server, chat, {"messages": MESSAGES, "stream": "yes"}), 400)
    assert "unknown role 'wizard'" in _error(_post(server, chat, {"messages": [{"role": "wizard", "content": "x"}]}),
                                             400)
    assert "messages must be a list" in _error(_post(server, chat, {"messages": "hello"}), 400)
    assert "missing messages" in _error(_post(server, chat, {}), 400)
    for bad in (0, -5, 10**6):
        assert f"max_tokens must be in 1..{model.n_ctx}" in _error(
            _post(server, chat, {"messages": MESSAGES, "max_tokens": bad}), 400)
    assert "n must be 1" in _error(_post(server, chat, {"messages": MESSAGES, "n": 2}), 400)
    long_prompt = "And the LORD spake unto Moses, saying, " * 200
    message = _error(_post(server, "/v1/completions", {"prompt": long_prompt}), 400)
    assert f"context of {model.n_ctx} tokens" in message and re.search(r"has \d+ tokens", message)
    assert "prompt token ids" in _error(_post(server, "/v1/completions", {"prompt": [1, 10**7]}), 400)
    assert "Not Found" in _error(httpx.get(f"{server.url}/v1/nothing", timeout=TIMEOUT), 404)
    # unknown fields are ignored
    ok = _post(server, chat, {"messages": MESSAGES, "max_tokens": 2, "frobnicate": {"x": 1}, "user": "me"})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] <= 2
    # the official client turns these into its exceptions
    with pytest.raises(openai.BadRequestError):
        server.client().chat.completions.create(model="m", messages=[{"role": "robot", "content": "x"}])
    # body over the limit
    saved = server.service.max_body
    server.service.max_body = 1000
    try:
        assert "over the limit of 1000 bytes" in _error(
            _post(server, "/v1/completions", {"prompt": "x" * 5000}), 413)
    finally:
        server.service.max_body = saved


def test_api_key(model):
    running = RunningServer(model, n_slots=1, api_key="s3cret")
    try:
        assert httpx.get(f"{running.url}/health", timeout=TIMEOUT).status_code == 200  # open
        assert "API key" in _error(httpx.get(f"{running.url}/v1/models", timeout=TIMEOUT), 401)
        body = {"prompt": "And", "max_tokens": 2}
        assert _post(running, "/v1/completions", body).status_code == 401
        assert _post(running, "/v1/completions", body, {"authorization": "Bearer wrong"}).status_code == 401
        assert _post(running, "/v1/completions", body, {"authorization": "Basic s3cret"}).status_code == 401
        with pytest.raises(openai.AuthenticationError):
            running.client("wrong").models.list()
        reply = running.client("s3cret").completions.create(model="m", prompt="And", max_tokens=2)
        assert reply.usage.completion_tokens <= 2
    finally:
        running.close()


PROMPTS = [
    "And the LORD said unto Moses",
    "In the beginning God created",
    "Blessed are the poor in spirit",
    "The LORD is my shepherd",
    "And it came to pass",
    "Now these are the names of the children of Israel",
    "Hear, O Israel",
    "And Jesus answered and said unto them",
]


def _greedy(server, prompt: str) -> tuple[str, list[str], list[dict]]:
    reply = server.client().completions.create(model="m", prompt=prompt, max_tokens=24, temperature=0, logprobs=2,
                                               extra_body={"cache_prompt": False})
    lp = reply.choices[0].logprobs
    return reply.choices[0].text, lp.tokens, lp.top_logprobs


def test_batched_logits_tolerance(model):
    """The same sequence as one of 1, 2, 4 or 8 sequences of a step: logits within
    BATCH_LOGITS_TOLERANCE of its own (exactly equal below 8 sequences, up to float rounding)."""
    from engine.batch import Batch, SequenceSlice
    from engine.kernels.attention import KVCache

    p = model.arch.params
    ids = model.tokenize("And the LORD said unto Moses")

    def prefilled() -> KVCache:
        cache = KVCache(p.n_layer, 64, p.n_head_kv, p.head_dim)
        model.arch.forward(Batch.single(ids, 0, cache))
        return cache

    single = model.arch.forward(Batch.single([300], len(ids), prefilled()))[-1]
    scale = np.abs(single).max()
    for n in (2, 4, 8):
        rows = model.arch.forward(Batch([300] * n, [SequenceSlice(prefilled(), len(ids), 1) for _ in range(n)]))
        worst = np.abs(rows - single).max() / scale
        assert worst < (BATCH_LOGITS_TOLERANCE if n >= 8 else 1e-5), (n, worst)


def test_concurrent_greedy_requests_equal_alone(server):
    """8 requests at once (continuous batching: one forward pass per step for all of them) give the
    text each gives alone, up to float ties (see TIE_TOLERANCE)."""
    before = dict(server.scheduler.batch_sizes)
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = list(pool.map(lambda p: _greedy(server, p), PROMPTS))
    batched = {k: v - before.get(k, 0) for k, v in server.scheduler.batch_sizes.items()}
    assert max(k for k, v in batched.items() if v > 0) >= 4, batched  # steps did run many sequences at once
    for prompt, (text, tokens, _) in zip(PROMPTS, together):
        alone_text, alone_tokens, alone_top = _greedy(server, prompt)
        if text == alone_text:
            continue
        j = next(i for i, (a, b) in enumerate(zip(tokens, alone_tokens)) if a != b)
        best = sorted(alone_top[j].values(), reverse=True)
        assert best[0] - best[1] < TIE_TOLERANCE, (prompt, j, alone_top[j])


def test_streams_interleave_and_long_prompt_is_chunked(model):
    """A long prompt is read in chunks while another request keeps generating."""
    running = RunningServer(model, n_slots=2, prefill_chunk=16)
    try:
        client = running.client()
        long_prompt = "And the LORD spake unto Moses, saying, Speak unto the children of Israel. " * 8
        n_long = len(model.tokenize(long_prompt))
        times = []

        def stream_one():
            for _chunk in client.completions.create(model="m", prompt="And it came to pass", max_tokens=60,
                                                   temperature=0, stream=True):
                times.append(time.monotonic())

        thread = threading.Thread(target=stream_one)
        thread.start()
        while len(times) < 3:
            time.sleep(0.005)
        reply = client.completions.create(model="m", prompt=long_prompt, max_tokens=4, temperature=0)
        thread.join(TIMEOUT)
        assert reply.usage.prompt_tokens == n_long > 64
        assert running.scheduler.batch_sizes[2] >= n_long // 16  # prefill chunks batched with the decode steps
        assert reply.choices[0].text == model.generate(long_prompt, max_tokens=4, temperature=0)
    finally:
        running.close()


def _wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_queue_full_503_and_disconnect_frees_slot(model):
    """The test holds the model's lock, so the scheduler's next step waits: a request stays in
    its slot for as long as needed."""
    running = RunningServer(model, n_slots=1, queue_size=0)
    status = running.scheduler.status
    try:
        model._lock.acquire()
        try:
            with ThreadPoolExecutor(1) as pool:
                first = pool.submit(_post, running, "/v1/completions", {"prompt": "And", "max_tokens": 3})
                _wait_for(lambda: status()["slots_processing"] == 1)
                busy = _post(running, "/v1/completions", {"prompt": "x", "max_tokens": 2})
                assert "server busy" in _error(busy, 503) and busy.headers["retry-after"] == "1"
                with pytest.raises(openai.APIStatusError) as info:
                    running.client().completions.create(model="m", prompt="x", max_tokens=2)
                assert info.value.status_code == 503
                model._lock.release()
                assert first.result(TIMEOUT).status_code == 200
            # a streaming client that goes away frees its slot
            model._lock.acquire()
            body = {"prompt": "And it came to pass", "max_tokens": 400, "temperature": 0, "stream": True}
            with httpx.stream("POST", f"{running.url}/v1/completions", json=body, timeout=TIMEOUT) as response:
                assert response.status_code == 200
                _wait_for(lambda: status()["slots_processing"] == 1)
            time.sleep(0.5)  # the server notices the closed connection and cancels the job
            steps = running.scheduler.steps
        finally:
            if model._lock.locked():
                model._lock.release()
        _wait_for(lambda: status()["slots_processing"] == 0)
        assert running.scheduler.steps - steps < 5  # freed, not generated to its 400 tokens
        assert running.client().completions.create(model="m", prompt="x", max_tokens=2).usage.completion_tokens <= 2
    finally:
        running.close()


def test_library_calls_alongside_the_server(server, model):
    """Model's own single-sequence API keeps working while the server's scheduler runs."""
    with ThreadPoolExecutor(2) as pool:
        served = pool.submit(lambda: server.client().completions.create(model="m", prompt="Hear, O Israel",
                                                                       max_tokens=16, temperature=0))
        direct = model.generate("Hear, O Israel", max_tokens=16, temperature=0)
        assert served.result().choices[0].text == direct


def test_serve_command(tmp_path):
    """`halfbyte serve` as a process: port 0, the address it prints, a request, Ctrl-C."""
    process = subprocess.Popen([sys.executable, "-m", "engine", "serve", "--port", "0", "-np", "2",
                                "--api-key", "k"], stderr=subprocess.PIPE, text=True)
    try:
        url = None
        deadline = time.monotonic() + TIMEOUT
        while url is None and time.monotonic() < deadline:
            line = process.stderr.readline()
            match = re.search(r"serving \S+ on (http://127\.0\.0\.1:\d+) \(2 slots", line)
            url = match.group(1) if match else None
        assert url, "no 'serving ... on' line"
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="k", timeout=TIMEOUT, max_retries=0)
        reply = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=4)
        assert reply.usage.completion_tokens <= 4
        process.send_signal(signal.SIGINT)
        assert process.wait(20) == 130  # like every halfbyte command stopped by Ctrl-C
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stderr.close()
