"""`halfbyte serve`: an OpenAI-compatible HTTP server (Starlette + uvicorn) with continuous batching.

Endpoints (also without the ``/v1`` prefix, as llama.cpp's server):

- ``GET /health``: ``{"status": "ok", "slots_idle", "slots_processing", "queued"}`` (no key needed)
- ``GET /v1/models``: the one model, by its file name
- ``POST /v1/chat/completions``: messages rendered with the chat template, then generated
- ``POST /v1/completions``: a text (or token-id) prompt continued
- ``GET /lora-adapters``, ``POST /lora-adapters``: the run-time LoRA adapters (``--lora``) and their
  scales, as llama-server's; a request's ``"lora": [{"id", "scale"}]`` sets its own (others at 0).
  Requests with different scales run in separate forward passes of a step.

``"stream": true`` answers with server-sent events, one ``data: {chunk}`` per piece of text and
``data: [DONE]`` at the end (``stream_options.include_usage`` adds a last chunk with ``usage``).
Sampling fields: OpenAI's (``temperature``, ``top_p``, ``max_tokens``/``max_completion_tokens``,
``stop``, ``seed``, ``presence_penalty``, ``frequency_penalty``, ``logprobs``, ``top_logprobs``) and
llama.cpp's (``top_k``, ``min_p``, ``repeat_penalty``, ``repeat_last_n``, ``cache_prompt``,
``chat_template_kwargs``, ``typical_p``, ``mirostat``/``mirostat_tau``/``mirostat_eta``, ``dry_*``,
``xtc_*``, ``top_n_sigma``, ``logit_bias``, ``grammar``, ``json_schema``), and OpenAI's
``response_format`` (``json_object``, ``json_schema``). Unknown fields are ignored; wrong types,
unknown roles, a prompt that does not fit in a slot's context, ``max_tokens`` outside 1..context
and ``n`` other than 1 are 400; a body over the size limit is 413; with ``--api-key`` a missing or wrong
``Authorization: Bearer`` key is 401; a full queue is 503 with ``Retry-After``. Every error is
OpenAI's ``{"error": {"message", "type", "code"}}``.

All requests go to one ``Scheduler`` (engine.serving.scheduler): ``--parallel`` slots generate
together, one forward pass per step. ``--ray`` serves the same app from Ray Serve replicas
(engine/distributed/replicas.py); ``--ray --pipeline K`` runs the model's layers in K Ray stages
behind this one server (engine/distributed/pipeline.py).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import time
from typing import Any

import click

from engine.distributed.ray_runtime import RAY_HINT
from engine.errors import HalfbyteError
from engine.run_cli import THREADS_HELP, check_not_directory, check_option, compile_notices, load_model

DEFAULT_MAX_BODY = 4 * 1024 * 1024
DISCONNECT_POLL_SECONDS = 0.25


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.headers = status, message, kind, headers or {}


def _error_response(status: int, message: str, kind: str, headers: dict[str, str] | None = None):
    from starlette.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status,
                        headers=headers)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class Service:
    """The request handling of one model and its scheduler (the Starlette app calls these)."""

    def __init__(self, model: Any, scheduler: Any, api_key: str | None = None,
                 max_body: int = DEFAULT_MAX_BODY) -> None:
        self.model = model
        self.scheduler = scheduler
        self.api_key = api_key
        self.max_body = max_body
        self.created = int(time.time())
        # Run-time LoRA adapters: scales of requests without a "lora" field (POST /lora-adapters sets them).
        self.lora_scales = [float(a["scale"]) for a in getattr(model, "lora_adapters", [])]

    # -- request plumbing ----------------------------------------------------------------------------

    def check_auth(self, request: Any) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "invalid or missing API key (Authorization: Bearer KEY)", "authentication_error")

    async def read_json(self, request: Any) -> dict[str, Any]:
        data = await self.read_json_value(request)
        if not isinstance(data, dict):
            raise ApiError(400, f"the body must be a JSON object, got {type(data).__name__}")
        return data

    async def read_json_value(self, request: Any) -> Any:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            raise ApiError(413, f"request body of {length} bytes is over the limit of {self.max_body} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_body:
                raise ApiError(413, f"request body is over the limit of {self.max_body} bytes")
        try:
            data = json.loads(bytes(body).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ApiError(400, f"malformed JSON body: {exc}") from None
        return data

    def settings(self, body: dict[str, Any], chat: bool):  # -> engine.serving.completion.Settings
        from engine.serving.completion import Settings

        n = body.get("n", 1)
        if n is not None and n != 1:
            raise ApiError(400, f"n must be 1 (one choice per request), got {n!r}")
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens", None if chat else 16))
        if max_tokens is not None:
            if not _is_int(max_tokens):
                raise ApiError(400, f"max_tokens must be an integer, got {type(max_tokens).__name__}")
            if not 1 <= max_tokens <= self.scheduler.n_ctx:
                raise ApiError(400, f"max_tokens must be in 1..{self.scheduler.n_ctx} (the context size), "
                                    f"got {max_tokens}")
        if chat:
            logprobs = body.get("logprobs", False)
            if not isinstance(logprobs, bool) and logprobs is not None:
                raise ApiError(400, f"logprobs must be true or false, got {type(logprobs).__name__}")
            top = body.get("top_logprobs")
            if top is not None and not logprobs:
                raise ApiError(400, "top_logprobs needs logprobs: true")
            k = (top or 0) if logprobs else None
        else:
            k = body.get("logprobs")
        values = {}  # defaults: llama.cpp's server's
        for name, default in (("temperature", 0.8), ("top_p", 0.95), ("top_k", 40), ("min_p", 0.05),
                              ("repeat_penalty", 1.0), ("repeat_last_n", 64), ("presence_penalty", 0.0),
                              ("frequency_penalty", 0.0)):
            value = body.get(name, default)
            values[name] = default if value is None else value
        seed = body.get("seed")
        try:
            return Settings.build(max_tokens, values["temperature"], values["top_p"], values["top_k"],
                                  values["min_p"], values["repeat_penalty"], values["repeat_last_n"],
                                  body.get("stop"), seed, k, values["presence_penalty"], values["frequency_penalty"],
                                  **self.more_sampling(body))
        except HalfbyteError as exc:
            raise ApiError(400, str(exc)) from None

    def more_sampling(self, body: dict[str, Any]) -> dict[str, Any]:
        """llama.cpp's server fields for its other samplers (``typical_p``, ``mirostat``,
        ``mirostat_tau``, ``mirostat_eta``, ``dry_*``, ``xtc_*``, ``top_n_sigma``), ``logit_bias``,
        and the output constraints ``grammar`` (GBNF), ``json_schema`` and OpenAI's ``response_format``."""
        from engine.grammar import grammar_for_request
        from engine.sampling import check_logit_bias

        extra: dict[str, Any] = {}
        for name, field in (("typical_p", "typical_p"), ("mirostat", "mirostat"), ("mirostat_tau", "mirostat_tau"),
                            ("mirostat_eta", "mirostat_eta"), ("dry_multiplier", "dry_multiplier"),
                            ("dry_base", "dry_base"), ("dry_allowed_length", "dry_allowed_length"),
                            ("dry_penalty_last_n", "dry_penalty_last_n"), ("xtc_probability", "xtc_probability"),
                            ("xtc_threshold", "xtc_threshold"), ("top_n_sigma", "top_n_sigma")):
            if body.get(name) is not None:
                extra[field] = body[name]
        breakers = body.get("dry_sequence_breakers")
        if breakers is not None:
            if not isinstance(breakers, list) or not all(isinstance(b, str) for b in breakers):
                raise HalfbyteError("dry_sequence_breakers must be a list of strings")
            extra["dry_sequence_breakers"] = tuple(breakers)
        extra["logit_bias"] = check_logit_bias(body.get("logit_bias"), self.model.n_vocab)
        extra["grammar"] = grammar_for_request(body.get("grammar"), body.get("response_format"),
                                               body.get("json_schema"))
        return extra

    def prompt_ids(self, body: dict[str, Any]) -> list[int]:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]  # a batch of one prompt
        if isinstance(prompt, str):
            ids = self.model.tokenize(prompt)
        elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
            if any(not 0 <= t < self.model.n_vocab for t in prompt):
                raise ApiError(400, f"prompt token ids must be in 0..{self.model.n_vocab - 1}")
            ids = list(prompt)
        elif prompt is None:
            raise ApiError(400, "missing prompt")
        else:
            raise ApiError(400, "prompt must be a string, a list of one string, or a list of token ids")
        if not ids:
            raise ApiError(400, "empty prompt: no tokens to start from")
        return ids

    def check_fits(self, ids: list[int]) -> None:
        if len(ids) >= self.scheduler.n_ctx:
            raise ApiError(400, f"the prompt has {len(ids)} tokens, more than fit in the context of "
                                f"{self.scheduler.n_ctx} tokens (--ctx-size) with room to answer")

    def stream_flags(self, body: dict[str, Any]) -> tuple[bool, bool]:
        stream = body.get("stream", False)
        if stream is None:
            stream = False
        if not isinstance(stream, bool):
            raise ApiError(400, f"stream must be true or false, got {type(stream).__name__}")
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise ApiError(400, "stream_options must be an object")
        include_usage = options.get("include_usage", False)
        if not isinstance(include_usage, bool):
            raise ApiError(400, "stream_options.include_usage must be true or false")
        cache_prompt = body.get("cache_prompt", True)
        if not isinstance(cache_prompt, bool):
            raise ApiError(400, "cache_prompt must be true or false")
        return stream, include_usage

    def lora_from(self, value: Any, where: str = "lora") -> list[float]:
        """llama-server's ``[{"id": N, "scale": S}, ...]``: those scales, every other adapter at 0."""
        n = len(self.lora_scales)
        if not isinstance(value, list):
            raise ApiError(400, f"{where} must be a list of {{\"id\", \"scale\"}} objects")
        scales = [0.0] * n
        for item in value:
            if not isinstance(item, dict) or not _is_int(item.get("id")) or not _is_number(item.get("scale")):
                raise ApiError(400, f"{where}: each entry must be {{\"id\": integer, \"scale\": number}}, got "
                                    f"{json.dumps(item)[:80]}")
            if not 0 <= item["id"] < n:
                raise ApiError(400, f"{where}: no adapter with id {item['id']} (this server has {n}: "
                                    f"GET /lora-adapters lists them)")
            if not math.isfinite(item["scale"]):
                raise ApiError(400, f"{where}: scale must be finite")
            scales[item["id"]] = float(item["scale"])
        return scales

    def request_lora(self, body: dict[str, Any]) -> tuple[float, ...] | None:
        """The adapters' scales for this request: its ``lora`` field, else the server's current ones."""
        if "lora" in body and body["lora"] is not None:
            return tuple(self.lora_from(body["lora"]))
        return tuple(self.lora_scales) if self.lora_scales else None

    # -- running a job -------------------------------------------------------------------------------

    def submit(self, state: Any, cache_prompt: bool, lora: tuple[float, ...] | None = None
               ) -> tuple[Any, asyncio.Queue]:
        from engine.serving.scheduler import Job, QueueFull

        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(event: tuple) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        job = Job(state, emit, cache_prompt, lora_scales=lora)
        try:
            self.scheduler.submit(job)
        except QueueFull as exc:
            raise ApiError(503, f"server busy: {exc}; retry later", "unavailable_error", {"Retry-After": "1"}) from None
        return job, events

    async def collect(self, request: Any, job: Any, events: asyncio.Queue) -> tuple[str, list, str]:
        """Wait for the whole result; a client that disconnects cancels its job."""
        pieces, records = [], []
        try:
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), DISCONNECT_POLL_SECONDS)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        self.scheduler.cancel(job)
                        raise ApiError(499, "client disconnected") from None
                    continue
                if event[0] == "text":
                    pieces.append(event[1])
                    records.extend(event[2])
                elif event[0] == "done":
                    return "".join(pieces), records, event[1]
                else:
                    raise ApiError(500, event[1], "server_error")
        except asyncio.CancelledError:
            self.scheduler.cancel(job)
            raise

    async def stream(self, job: Any, events: asyncio.Queue, make_chunk, final_chunk, usage_chunk):
        """SSE lines: a chunk per piece of text, the final chunk, optionally usage, then [DONE]."""
        pending: list = []
        try:
            first = make_chunk(None, None)
            if first is not None:
                yield _sse(first)
            while True:
                event = await events.get()
                if event[0] == "text":
                    pending.extend(event[2])
                    if event[1] or event[2]:  # text, or a token's logprobs (when asked for)
                        yield _sse(make_chunk(event[1], pending))
                        pending = []
                elif event[0] == "done":
                    yield _sse(final_chunk(event[1], pending))
                    if usage_chunk is not None:
                        yield _sse(usage_chunk())
                    break
                else:
                    yield _sse({"error": {"message": event[1], "type": "server_error", "code": 500}})
                    break
            yield "data: [DONE]\n\n"
        finally:
            self.scheduler.cancel(job)  # a no-op once finished; frees the slot of a client that left

    # -- endpoints -----------------------------------------------------------------------------------

    async def health(self, request: Any):
        from starlette.responses import JSONResponse

        return JSONResponse({"status": "ok", **self.scheduler.status()})

    async def lora_adapters(self, request: Any):
        """llama-server's ``GET /lora-adapters`` (``[{"id", "path", "scale"}]``) and ``POST`` with
        ``[{"id", "scale"}]``: the scales of requests that do not set their own."""
        from starlette.responses import JSONResponse

        self.check_auth(request)
        if request.method == "POST":
            body = await self.read_json_value(request)
            self.lora_scales = self.lora_from(body, "the body")
        adapters = getattr(self.model, "lora_adapters", [])
        return JSONResponse([{"id": a["id"], "path": a["path"], "scale": scale}
                             for a, scale in zip(adapters, self.lora_scales)])

    async def models(self, request: Any):
        from starlette.responses import JSONResponse

        self.check_auth(request)
        return JSONResponse({"object": "list", "data": [
            {"id": self.model.name, "object": "model", "created": self.created, "owned_by": "halfbyte",
             "meta": {"n_ctx": self.scheduler.n_ctx, "n_vocab": self.model.n_vocab,
                      "n_slots": len(self.scheduler.slots)}}]})

    async def completions(self, request: Any):
        from starlette.responses import JSONResponse, StreamingResponse

        from engine.serving import completion as c
        from engine.serving.completion import SequenceState

        self.check_auth(request)
        body = await self.read_json(request)
        settings = self.settings(body, chat=False)
        stream, include_usage = self.stream_flags(body)
        ids = self.prompt_ids(body)
        self.check_fits(ids)
        state = SequenceState(self.model.tokenizer, ids, settings, self.scheduler.n_ctx)
        job, events = self.submit(state, body.get("cache_prompt", True), self.request_lora(body))
        cid, created, name = c.new_id("cmpl"), c.now(), self.model.name
        tokenizer = self.model.tokenizer
        with_logprobs = settings.logprobs is not None
        if not stream:
            text, records, finish = await self.collect(request, job, events)
            state.fill_offsets(0)
            logprobs = c.completion_logprobs(tokenizer, records) if with_logprobs else None
            return JSONResponse(c.completion_response(cid, created, name, text, finish, logprobs, len(ids),
                                                      len(state.generated)))

        def chunk(text, records):
            if text is None:
                return None
            return c.completion_chunk(cid, created, name, text, None,
                                      c.completion_logprobs(tokenizer, records) if with_logprobs else None)

        def final(finish, records):
            return c.completion_chunk(cid, created, name, "", finish,
                                      c.completion_logprobs(tokenizer, records) if with_logprobs else None)

        def usage():
            return {"id": cid, "object": "text_completion", "created": created, "model": name, "choices": [],
                    "usage": c.usage(len(ids), len(state.generated))}

        return StreamingResponse(self.stream(job, events, chunk, final, usage if include_usage else None),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def chat_completions(self, request: Any):
        from starlette.responses import JSONResponse, StreamingResponse

        from engine.chat import prompt_tokens
        from engine.serving import completion as c
        from engine.serving.completion import SequenceState

        self.check_auth(request)
        body = await self.read_json(request)
        settings = self.settings(body, chat=True)
        stream, include_usage = self.stream_flags(body)
        if "messages" not in body:
            raise ApiError(400, "missing messages")
        kwargs = body.get("chat_template_kwargs") or {}
        if not isinstance(kwargs, dict):
            raise ApiError(400, "chat_template_kwargs must be an object")
        template = self.model.chat_template
        try:
            text = template.render(body["messages"], add_generation_prompt=True, tools=body.get("tools"), **kwargs)
        except HalfbyteError as exc:
            raise ApiError(400, str(exc)) from None
        ids = prompt_tokens(self.model.tokenizer, text)
        self.check_fits(ids)
        state = SequenceState(self.model.tokenizer, ids, settings, self.scheduler.n_ctx, template.stop_texts)
        job, events = self.submit(state, body.get("cache_prompt", True), self.request_lora(body))
        cid, created, name = c.new_id("chatcmpl"), c.now(), self.model.name
        tokenizer = self.model.tokenizer
        with_logprobs = settings.logprobs is not None
        if not stream:
            answer, records, finish = await self.collect(request, job, events)
            logprobs = c.chat_logprobs(tokenizer, records) if with_logprobs else None
            return JSONResponse(c.chat_response(cid, created, name, answer, finish, logprobs, len(ids),
                                                len(state.generated)))

        def chunk(piece, records):
            if piece is None:
                return c.chat_chunk(cid, created, name, {"role": "assistant", "content": ""}, None)
            return c.chat_chunk(cid, created, name, {"content": piece}, None,
                                c.chat_logprobs(tokenizer, records) if with_logprobs else None)

        def final(finish, records):
            return c.chat_chunk(cid, created, name, {}, finish,
                                c.chat_logprobs(tokenizer, records) if with_logprobs and records else None)

        def usage():
            return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": name,
                    "choices": [], "usage": c.usage(len(ids), len(state.generated))}

        return StreamingResponse(self.stream(job, events, chunk, final, usage if include_usage else None),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _embeddings(service: Service, request: Any):
    """POST /v1/embeddings (OpenAI's shape; ``encoding_format`` float or base64, as the ``openai`` client
    asks by default). Evaluated in a worker thread, between the scheduler's steps (the model's lock)."""
    import base64

    import numpy as np
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import JSONResponse

    from engine.errors import HalfbyteError

    service.check_auth(request)
    body = await service.read_json(request)
    if "input" not in body:
        raise ApiError(400, "'input' is required")
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise ApiError(400, f"encoding_format must be 'float' or 'base64', got {encoding!r}")
    pooling = body.get("pooling", "mean")
    normalize = body.get("normalize", True)
    try:
        result = await run_in_threadpool(service.model.create_embedding, body["input"], pooling=pooling,
                                         normalize=normalize)
    except HalfbyteError as exc:
        raise ApiError(400, str(exc)) from None
    if isinstance(body.get("model"), str):
        result["model"] = body["model"]
    if encoding == "base64":
        for item in result["data"]:
            item["embedding"] = base64.b64encode(np.asarray(item["embedding"], "<f4").tobytes()).decode("ascii")
    return JSONResponse(result)


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def create_app(service: Service):
    """The Starlette application of ``service``."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.routing import Route

    def guarded(handler):
        async def endpoint(request):
            try:
                return await handler(request)
            except ApiError as exc:
                return _error_response(exc.status, exc.message, exc.kind, exc.headers)
        return endpoint

    routes = [
        Route("/health", guarded(service.health), methods=["GET"]),
        Route("/v1/health", guarded(service.health), methods=["GET"]),
        Route("/lora-adapters", guarded(service.lora_adapters), methods=["GET", "POST"]),
    ]
    for prefix in ("/v1", ""):
        routes += [
            Route(f"{prefix}/models", guarded(service.models), methods=["GET"]),
            Route(f"{prefix}/chat/completions", guarded(service.chat_completions), methods=["POST"]),
            Route(f"{prefix}/completions", guarded(service.completions), methods=["POST"]),
            Route(f"{prefix}/embeddings", guarded(lambda request: _embeddings(service, request)), methods=["POST"]),
        ]

    async def http_error(request, exc: HTTPException):
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(exc.status_code, "invalid_request_error")
        return _error_response(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", kind)

    async def server_error(request, exc: Exception):
        return _error_response(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")

    return Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: server_error})


def build_service(model_path: str, n_ctx: int, threads: int | None, parallel: int, chat_template: str | None,
                  api_key: str | None, queue_size: int = 16, prefill_chunk: int = 64,
                  max_body: int = DEFAULT_MAX_BODY, lora: tuple | list = (), lora_applied: bool = True,
                  pipeline: dict[str, Any] | None = None) -> Service:
    """Load the model, start its scheduler: everything but the HTTP listener. ``lora``: run-time
    adapters ``[(path, scale)]`` (``lora_applied=False``: loaded at scale 0, as llama-server's
    ``--lora-init-without-apply``). ``pipeline``: ``PipelineModel`` options (``stages``, ``address``,
    ``placement``, ``micro_batch``): the layers run in Ray actors (engine/distributed/pipeline.py)."""
    from engine.serving.scheduler import Scheduler

    if pipeline is not None:
        if lora:
            raise HalfbyteError("--lora does not go with --pipeline (the stages hold no adapters)")
        from engine.distributed.pipeline import PipelineModel
        from engine.hub import resolve_model_path

        model = PipelineModel.load(resolve_model_path(model_path, None, None), n_ctx=n_ctx or None, threads=threads,
                                   **pipeline)
    else:
        model = load_model(model_path, n_ctx, threads, lora=lora)
    model._chat_template_spec = chat_template
    model.chat_template  # noqa: B018  (resolved now: a bad --chat-template fails before serving)
    scheduler = Scheduler(model, n_slots=parallel, n_ctx=model.n_ctx, queue_size=queue_size,
                          prefill_chunk=prefill_chunk).start()
    service = Service(model, scheduler, api_key=api_key, max_body=max_body)
    if not lora_applied:
        service.lora_scales = [0.0] * len(service.lora_scales)
    return service


@click.command()
@click.argument("model_path", metavar="[MODEL]", required=False)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8080, show_default=True, help="Port to listen on (0 = any free port).")
@click.option("-np", "--parallel", default=4, show_default=True,
              help="Slots: requests generated together (continuous batching), each with its own KV cache.")
@click.option("-c", "--ctx-size", "n_ctx", type=int, default=0, show_default=True,
              help="Context size of each slot (0 = the model's training context).")
@click.option("--api-key", envvar="HALFBYTE_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' on /v1 endpoints (or set HALFBYTE_API_KEY).")
@click.option("--chat-template", metavar="NAME|FILE", default=None,
              help="The file's own template (default; ChatML if it has none), a built-in name (chatml, llama2, "
                   "llama3, mistral, zephyr, gemma, phi3), a named template of the file, or a Jinja file.")
@click.option("-t", "--threads", type=int, default=None, help=THREADS_HELP)
@click.option("--queue-size", default=16, show_default=True,
              help="Requests that may wait for a slot; more get 503 with Retry-After.")
@click.option("--prefill-chunk", default=64, show_default=True,
              help="Prompt tokens read per step (long prompts in chunks, so generating slots keep going).")
@click.option("--max-body", default=DEFAULT_MAX_BODY, show_default=True, help="Largest request body in bytes (413).")
@click.option("--log-level", default="warning", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]), help="uvicorn's log level.")
@click.option("--ray", "use_ray", is_flag=True,
              help="Serve through Ray Serve: each replica a process with its own model mapping and slots, "
                   "requests routed to replicas with a free slot (engine/distributed/replicas.py).")
@click.option("--replicas", type=int, default=None, help="With --ray: how many replicas (default 1).")
@click.option("--autoscale", metavar="MIN:MAX", default=None,
              help="With --ray: let Serve scale between MIN and MAX replicas (about --parallel requests each).")
@click.option("--ray-address", default=None,
              help="With --ray: join this Ray cluster (e.g. auto, or HOST:6379) instead of starting one locally.")
@click.option("--pipeline", "stages", type=int, default=None, metavar="K",
              help="With --ray: split the layers into K stages, each a Ray actor on its own node, for a model "
                   "too big for one machine (engine/distributed/pipeline.py).")
@click.option("--placement", type=click.Choice(["strict-spread", "spread", "pack"]), default=None,
              help="With --pipeline: strict-spread (default: one stage per node), spread or pack.")
@click.option("--micro-batch", type=int, default=None, help="With --pipeline: prompt tokens per micro-batch "
              "(the stages overlap; default 32, 0 = none).")
@click.option("--lora", "lora", multiple=True, metavar="FILE", help="Load this LoRA adapter GGUF (repeatable).")
@click.option("--lora-scaled", "lora_scaled", multiple=True, nargs=2, type=(str, float), metavar="FILE S",
              help="Load this LoRA adapter GGUF at scale S (repeatable).")
@click.option("--lora-init-without-apply", is_flag=True,
              help="Load the adapters at scale 0: requests set scales with their \"lora\" field, or POST "
                   "/lora-adapters sets them for all.")
def serve(model_path: str | None, host: str, port: int, parallel: int, n_ctx: int, api_key: str | None,
          chat_template: str | None, threads: int | None, queue_size: int, prefill_chunk: int, max_body: int,
          log_level: str, use_ray: bool, replicas: int | None, autoscale: str | None, ray_address: str | None,
          stages: int | None = None, placement: str | None = None, micro_batch: int | None = None,
          lora: tuple = (), lora_scaled: tuple = (), lora_init_without_apply: bool = False) -> None:
    """Serve MODEL (default: the embedded demo model) over HTTP with OpenAI's API: /v1/chat/completions,
    /v1/completions, /v1/models, /health. Binds 127.0.0.1 unless --host says otherwise."""
    bounds = None  # --autoscale MIN:MAX
    adapters = [(path, 1.0) for path in lora] + [(path, scale) for path, scale in lora_scaled]
    if lora_init_without_apply and not adapters:
        raise HalfbyteError("--lora-init-without-apply needs --lora or --lora-scaled")
    if stages is None:
        for name, value in (("--placement", placement), ("--micro-batch", micro_batch)):
            if value is not None:
                raise HalfbyteError(f"{name} needs --pipeline")
    if not use_ray:
        for name, value in (("--replicas", replicas), ("--autoscale", autoscale), ("--ray-address", ray_address),
                            ("--pipeline", stages)):
            if value is not None:
                raise HalfbyteError(f"{name} needs --ray")
    elif stages is not None:
        check_option("--pipeline", stages, 1)
        check_option("--micro-batch", micro_batch if micro_batch is not None else 0, 0)
        if replicas is not None or autoscale is not None:
            raise HalfbyteError("--pipeline serves one copy of the model across nodes: it does not go with "
                                "--replicas or --autoscale")
        from engine.distributed.ray_runtime import import_ray

        import_ray(f"halfbyte serve --pipeline needs Ray: {RAY_HINT}")
    else:
        from engine.distributed.replicas import parse_autoscale, require_ray

        require_ray()
        if replicas is not None and autoscale is not None:
            raise HalfbyteError("give either --replicas or --autoscale, not both")
        check_option("--replicas", replicas, 1)
        bounds = parse_autoscale(autoscale) if autoscale is not None else None
    try:
        import uvicorn
    except ImportError:
        raise HalfbyteError("halfbyte serve needs starlette and uvicorn: pip install 'halfbyte[server]'") from None
    check_option("--parallel", parallel, 1)
    check_option("-c", n_ctx, 0, " (0 = the model's training context)")
    check_option("--port", port, 0)
    check_option("--queue-size", queue_size, 0)
    check_option("--prefill-chunk", prefill_chunk, 1)
    check_option("--max-body", max_body, 1)
    if port > 65535:
        raise HalfbyteError(f"--port must be <= 65535, got {port}")
    if api_key is not None and not api_key:
        raise HalfbyteError("--api-key must not be empty")
    check_not_directory(model_path)
    if model_path is None:
        from engine.default_model import default_model_path

        model_path = str(default_model_path())
        click.echo(f"halfbyte: no model given, using the embedded demo model {model_path}", err=True)
    pipeline = None
    if stages is not None:
        from engine.distributed.pipeline import DEFAULT_MICRO_BATCH

        use_ray = False  # one process serves; its model's layers run in the stages
        pipeline = {"stages": stages, "address": ray_address, "placement": placement or "strict-spread",
                    "micro_batch": DEFAULT_MICRO_BATCH if micro_batch is None else micro_batch}
    if use_ray:
        from engine.distributed import replicas as ray_replicas

        deployed = ray_replicas.deploy(model_path, replicas=None if bounds else (replicas or 1), autoscale=bounds,
                                       parallel=parallel, n_ctx=n_ctx, threads=threads, host=host, port=port,
                                       chat_template=chat_template, api_key=api_key, queue_size=queue_size,
                                       prefill_chunk=prefill_chunk, max_body=max_body, ray_address=ray_address,
                                       log_level=log_level, lora=tuple(adapters),
                                       lora_applied=not lora_init_without_apply)
        click.echo(f"halfbyte: {deployed.describe()}{', API key required' if api_key else ''}", err=True)
        ray_replicas.serve_forever(deployed)  # until Ctrl-C or SIGTERM; then Serve is shut down, exit 0
        return
    compile_notices()
    service = build_service(model_path, n_ctx, threads, parallel, chat_template, api_key, queue_size, prefill_chunk,
                            max_body, lora=adapters, lora_applied=not lora_init_without_apply, pipeline=pipeline)
    import socket

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        raise HalfbyteError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(128)
    bound = sock.getsockname()[1]
    where = f", layers in {stages} Ray pipeline stages" if stages else ""
    click.echo(f"halfbyte: serving {service.model.name} on http://{host}:{bound} ({parallel} slots of "
               f"{service.scheduler.n_ctx} tokens, chat template: {service.model.chat_template.name}{where}"
               f"{', API key required' if api_key else ''})", err=True)
    # lifespan="off": the app has no start-up or shutdown handlers, and uvicorn logs a cancelled lifespan
    # task as an error (with a traceback) when Ctrl-C arrives while Ray is initialised in this process.
    config = uvicorn.Config(create_app(service), log_level=log_level, timeout_graceful_shutdown=3, lifespan="off",
                            access_log=log_level in ("info", "debug"))
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        service.scheduler.stop()
        sock.close()
        if stages:
            service.model.close()  # the stage actors and their placement group
