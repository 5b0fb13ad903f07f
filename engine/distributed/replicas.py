"""`halfbyte serve MODEL --ray`: the OpenAI-compatible server of engine/server.py as Ray Serve replicas.

One Serve application of two deployments:

- ``model`` (``ModelReplica``; ``--replicas N``, or autoscaled with ``--autoscale MIN:MAX``): each
  replica is a process that calls ``engine.server.build_service`` (maps the model, starts its own
  scheduler with ``--parallel`` slots) and runs the unchanged Starlette app of
  ``create_app(service)`` on every request it is given, as an ASGI call: the request's method, path,
  query string, headers and body become an ASGI scope and a ``receive`` that returns the body once
  (then waits until the call is cancelled); what the app ``send``s comes back as the items of a
  streaming call: first ``{"status", "headers"}``, then each body chunk. Every response carries the
  replica's id and process id (``x-halfbyte-replica``, ``x-halfbyte-replica-pid``).
- ``ingress`` (``Ingress``, one replica, no CPU reserved): receives every HTTP request from Serve's
  proxy and forwards it to ``model`` through a DeploymentHandle as a streaming call; it answers with
  the first item's status and headers and the rest as the body: as a whole for JSON, chunk by chunk
  for server-sent events.

Routing: a model replica takes at most ``--parallel`` requests at once (``max_ongoing_requests``), so
Serve's router sends a request only to a replica with a free slot; the others wait in the ingress's
router and go to the first replica where a slot frees. The ingress bounds that waiting line itself:
at most ``(--parallel + --queue-size)`` calls per replica in flight; past that, 503 with
``Retry-After``, as the single server answers a full queue. (Serve's own ``max_queued_requests``
is not used: its count is taken before the request is queued, and a burst through the proxy was
seen to pass it entirely.)

A replica that dies (its process killed, its node lost) is replaced by Serve. Its requests in
flight fail cleanly with a retryable error: 503, ``Retry-After: 1`` and OpenAI's error body
``{"error": {"message", "type": "unavailable_error", "code": 503}}`` if the response had not
started, or, in a server-sent event stream that had, a last event ``data: {"error": {...}}`` after
which the stream closes (no ``[DONE]``). Requests on the other replicas go on; new ones go to the
replicas alive.

A client that disconnects: Serve cancels the ingress's call, which cancels the replica's call,
which cancels the app's handler, which cancels the job in the scheduler (``Service.collect`` and
``Service.stream`` do on cancellation), freeing the slot.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.distributed.ray_runtime import first_line, init_local_ray, join_ray
from engine.errors import HalfbyteError

APP_NAME = "halfbyte"
MODEL_DEPLOYMENT = "model"
INGRESS_DEPLOYMENT = "ingress"
REPLICA_HEADER = "x-halfbyte-replica"
REPLICA_PID_HEADER = "x-halfbyte-replica-pid"
INSTALL_HINT = "halfbyte serve --ray needs Ray Serve: pip install 'halfbyte[ray]'"
HEALTH_CHECK_PERIOD_S = 2.0  # how soon Serve notices a replica gone (its default is 10 s)
READY_TIMEOUT_S = 120.0  # Serve's HTTP proxy answering on the port, after the replicas are up
INGRESS_MAX_ONGOING = 100_000  # the ingress only forwards: let it hold every open request

_started_ray = False  # whether deploy() started the Ray instance (then shutdown() stops it)


def require_ray() -> None:
    """The one-line error that says how to install Ray Serve, where it is missing."""
    _ray()


def _ray():
    """``(ray, ray.serve)``, or the one-line error that says how to install them."""
    try:
        import ray
        from ray import serve
    except ImportError:
        raise HalfbyteError(INSTALL_HINT) from None
    return ray, serve


# -- errors the ingress turns into responses --------------------------------------------------------


def _error_json(status: int, message: str, kind: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "code": status}}


def _causes(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__


def classify_failure(exc: BaseException) -> tuple[int, str, str, dict[str, str]]:
    """``(status, message, type, headers)`` for an exception of a call to the model deployment.

    A replica gone (its actor died or is unreachable: Ray's ``RayActorError`` and its subclasses
    ``ActorDiedError`` and ``ActorUnavailableError``, a crashed worker, a lost node, Serve's
    ``ReplicaUnavailableError`` and ``DeploymentUnavailableError``) and a full queue (Serve's
    ``BackPressureError``) are 503 with ``Retry-After: 1``; anything else is 500."""
    from ray import exceptions as rx
    from ray.serve import exceptions as sx

    lost = (rx.RayActorError, rx.WorkerCrashedError, rx.NodeDiedError, rx.LocalRayletDiedError,
            rx.OwnerDiedError, sx.ReplicaUnavailableError, sx.DeploymentUnavailableError)
    retry = {"Retry-After": "1"}
    for cause in _causes(exc):
        if isinstance(cause, sx.BackPressureError):
            waiting = cause.args[1] if len(cause.args) > 1 else "the most"
            return (503, f"server busy: every slot of every replica is busy and {waiting} requests are waiting; "
                         "retry later", "unavailable_error", retry)
        if isinstance(cause, lost):
            return (503, "the model replica serving this request stopped before it finished "
                         f"({type(cause).__name__}); retry: Ray Serve replaces it", "unavailable_error", retry)
    first_line = (str(exc).strip().splitlines() or [""])[0]
    return 500, f"internal error: {type(exc).__name__}: {first_line}", "server_error", {}


# -- the model replica: the Starlette app of engine/server.py on forwarded requests -----------------


class ModelReplica:
    """One Serve replica: a ``Service`` (model + scheduler) and its Starlette app."""

    def __init__(self, model_path: str, n_ctx: int, threads: int | None, parallel: int, chat_template: str | None,
                 api_key: str | None, queue_size: int, prefill_chunk: int, max_body: int,
                 lora: tuple = (), lora_applied: bool = True) -> None:
        from engine.server import build_service, create_app

        self.service = build_service(model_path, n_ctx, threads, parallel, chat_template, api_key, queue_size,
                                     prefill_chunk, max_body, lora=lora, lora_applied=lora_applied)
        self.app = create_app(self.service)
        self.pid = os.getpid()
        try:
            from ray import serve

            self.replica_id = serve.get_replica_context().replica_id.unique_id
        except Exception:  # outside Serve (a direct test of the class)
            self.replica_id = f"pid-{self.pid}"
        self.headers = [(REPLICA_HEADER.encode(), self.replica_id.encode()),
                        (REPLICA_PID_HEADER.encode(), str(self.pid).encode())]

    def info(self) -> dict[str, Any]:
        model, scheduler = self.service.model, self.service.scheduler
        return {"model": model.name, "n_ctx": scheduler.n_ctx, "slots": len(scheduler.slots),
                "chat_template": model.chat_template.name, "pid": self.pid, "replica": self.replica_id}

    def check_health(self) -> None:
        """Serve's periodic health check: a replica whose scheduler thread died is replaced."""
        thread = getattr(self.service.scheduler, "_thread", None)
        if thread is not None and not thread.is_alive():
            raise RuntimeError("the scheduler thread of this replica is not running")

    def __del__(self) -> None:
        service = getattr(self, "service", None)
        if service is not None:
            service.scheduler.stop(timeout=1.0)

    async def asgi(self, call: dict[str, Any]):
        """Run the app on one forwarded request; yield ``{"status", "headers"}``, then body chunks."""
        sent: collections.deque = collections.deque()  # what the app sent, not yet passed on
        ready = asyncio.Event()
        gone = asyncio.Event()
        body_given = False

        async def receive() -> dict[str, Any]:
            nonlocal body_given
            if not body_given:
                body_given = True
                return {"type": "http.request", "body": call["body"], "more_body": False}
            await gone.wait()  # the body was all there is; the next event is the end of the call
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)
            ready.set()

        async def run() -> None:
            try:
                await self.app(_scope(call), receive, send)
            except Exception:  # Starlette has already answered 500 (ServerErrorMiddleware re-raises)
                logging.getLogger("halfbyte").exception("request failed")
            finally:
                sent.append(None)
                ready.set()

        async def next_message() -> dict[str, Any] | None:
            while not sent:
                ready.clear()
                await ready.wait()
            return sent.popleft()

        task = asyncio.get_running_loop().create_task(run())
        started = False
        try:
            while True:
                message = await next_message()
                if message is None:  # the app returned without (finishing) a response
                    if not started:
                        yield {"status": 500, "headers": [(b"content-type", b"application/json"), *self.headers]}
                        yield json.dumps(_error_json(500, "internal error: no response", "server_error")).encode()
                    break
                if message["type"] == "http.response.start":
                    started = True
                    headers = [(bytes(k), bytes(v)) for k, v in message.get("headers", [])]
                    yield {"status": message["status"], "headers": headers + self.headers}
                elif message["type"] == "http.response.body":
                    # Body chunks already waiting go as one item: fewer, larger items when the
                    # model generates faster than Serve passes items on.
                    body, more = bytearray(message.get("body", b"")), message.get("more_body", False)
                    while more and sent and sent[0] is not None and sent[0]["type"] == "http.response.body":
                        following = sent.popleft()
                        body += following.get("body", b"")
                        more = following.get("more_body", False)
                    if body:
                        yield bytes(body)
                    if not more:
                        break
            await asyncio.wait({task}, timeout=1.0)
        finally:
            gone.set()
            if not task.done():
                task.cancel()  # the caller went away: cancels the handler, which cancels the job


def _scope(call: dict[str, Any]) -> dict[str, Any]:
    path = call["path"]
    return {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
        "method": call["method"], "scheme": call.get("scheme", "http"), "path": path,
        "raw_path": path.encode("utf-8"), "query_string": call.get("query", b""), "root_path": "",
        "headers": [(bytes(k), bytes(v)) for k, v in call["headers"]], "client": call.get("client"),
        "server": call.get("server"), "state": {},
    }


# -- the ingress -------------------------------------------------------------------------------------


class Places:
    """The ingress's calls to the model in flight, at most ``limit``: ``take()`` gives a ``Place``
    or None when full. Counted on the ingress's one event loop, so a burst is counted exactly."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.taken = 0

    def take(self) -> Place | None:
        if self.taken >= self.limit:
            return None
        self.taken += 1
        return Place(self)


class Place:
    """One call's place; ``release()`` is idempotent and also runs when the place is collected, so
    a response Starlette drops unstarted (its client gone) cannot keep a place."""

    def __init__(self, places: Places) -> None:
        self.places: Places | None = places

    def release(self) -> None:
        if self.places is not None:
            self.places.taken -= 1
            self.places = None

    def __del__(self) -> None:
        self.release()


class Ingress:
    """Every HTTP request: forwarded to the ``model`` deployment as a streaming call."""

    def __init__(self, model: Any, max_body: int, max_in_flight: int) -> None:
        self.call_model = model.options(stream=True, method_name="asgi")
        self.max_body = max_body
        self.places = Places(max_in_flight)

    async def _body(self, request: Any) -> bytes:
        """The body, cut at max_body + 1 bytes: enough for the app's own 413, without holding more."""
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_body:
                break
        return bytes(body)

    async def __call__(self, request: Any):
        from starlette.responses import JSONResponse, Response, StreamingResponse

        scope = request.scope
        call = {"method": request.method, "path": request.url.path, "query": scope.get("query_string", b""),
                "headers": list(request.headers.raw), "body": await self._body(request),
                "scheme": scope.get("scheme", "http"), "client": _address(scope.get("client")),
                "server": _address(scope.get("server"))}

        def failure(exc: BaseException):
            status, message, kind, headers = classify_failure(exc)
            return JSONResponse(_error_json(status, message, kind), status_code=status, headers=headers)

        place = self.places.take()
        if place is None:
            waiting = self.places.limit
            return JSONResponse(_error_json(503, f"server busy: every slot of every replica is busy and the "
                                                 f"{waiting} places for requests in flight are taken; retry later",
                                            "unavailable_error"), status_code=503, headers={"Retry-After": "1"})
        stream = None
        try:
            stream = self.call_model.remote(call)
            head = await stream.__anext__()
        except asyncio.CancelledError:
            place.release()
            _cancel(stream)
            raise
        except Exception as exc:  # a replica gone, ...
            place.release()
            _cancel(stream)
            return failure(exc)
        headers = [(bytes(k), bytes(v)) for k, v in head["headers"]]
        content_type = next((v for k, v in headers if k.lower() == b"content-type"), b"")
        if not content_type.startswith(b"text/event-stream"):
            try:
                body = b"".join([chunk async for chunk in stream])
            except asyncio.CancelledError:
                _cancel(stream)
                raise
            except Exception as exc:
                _cancel(stream)
                return failure(exc)
            finally:
                place.release()
            response = Response(body, status_code=head["status"])
            response.raw_headers = headers
            return response

        async def rest():
            finished = False
            try:
                async for chunk in stream:
                    yield chunk
                finished = True
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                status, message, kind, _ = classify_failure(exc)
                yield f"data: {json.dumps(_error_json(status, message, kind))}\n\n".encode()
            finally:
                place.release()
                if not finished:
                    _cancel(stream)  # the client went away, or the replica did: stop the replica's call

        response = StreamingResponse(rest(), status_code=head["status"])
        response.raw_headers = headers
        return response


def _cancel(stream: Any) -> None:
    """Cancel a call to the model deployment (a no-op once it ended). ``cancel()`` of a call that
    failed re-raises its error (e.g. Serve's BackPressureError): already answered for."""
    if stream is None:
        return
    try:
        stream.cancel()
    except Exception:
        pass


def _address(value: Any) -> tuple[str, int] | None:
    if value is None:
        return None
    host, port = value
    return (str(host), int(port))


# -- deploying ---------------------------------------------------------------------------------------


@dataclass
class Deployed:
    """What ``deploy`` started: the base URL (``url + "/v1"`` for OpenAI clients) and the handles."""

    url: str
    replicas: int | None
    autoscale: tuple[int, int] | None
    ingress: Any = field(repr=False)  # DeploymentHandle of the ingress
    model: Any = field(repr=False)  # DeploymentHandle of the model deployment
    info: dict[str, Any] = field(default_factory=dict)  # from one replica: model name, n_ctx, slots, ...

    def describe(self) -> str:
        if self.autoscale is not None:
            count = f"{self.autoscale[0]} to {self.autoscale[1]} autoscaled Ray Serve replicas"
        else:
            count = f"{self.replicas} Ray Serve replica{'s' if self.replicas != 1 else ''}"
        slots = ""
        if self.info:
            slots = (f" ({self.info['slots']} slots of {self.info['n_ctx']} tokens each, "
                     f"chat template: {self.info['chat_template']})")
        return f"serving {self.info.get('model', 'the model')} on {self.url} with {count}{slots}"


def parse_autoscale(value: str) -> tuple[int, int]:
    """``"MIN:MAX"`` → ``(MIN, MAX)`` with 0 <= MIN <= MAX and MAX >= 1."""
    low, sep, high = value.partition(":")
    try:
        bounds = int(low), int(high)
    except ValueError:
        bounds = None
    if not sep or bounds is None:
        raise HalfbyteError(f"--autoscale must be MIN:MAX (replica counts, e.g. 1:4), got {value!r}")
    if bounds[0] < 0 or bounds[1] < 1 or bounds[0] > bounds[1]:
        raise HalfbyteError(f"--autoscale MIN:MAX needs 0 <= MIN <= MAX and MAX >= 1, got {value!r}")
    return bounds


def resolve_model(model_path: str) -> str:
    """An existing local file as an absolute path (every replica opens that path, on its own node: on
    a cluster the file must be at the same path on every node); a Hub reference ``org/repo[:QUANT]``
    as it is (each replica downloads it, into its node's cache)."""
    from engine.hub import parse_hub_spec

    path = Path(model_path).expanduser()
    if path.is_dir():
        raise HalfbyteError(f"{model_path}: is a directory, not a GGUF file")
    if path.exists():
        return str(path.resolve())
    if parse_hub_spec(model_path) is not None:
        return model_path
    raise HalfbyteError(f"{model_path}: no such file")


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _check_port(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise HalfbyteError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def _init_ray(ray: Any, address: str | None, cpus_needed: float, log_to_driver: bool) -> None:
    global _started_ray
    if ray.is_initialized():
        return
    common = {"logging_level": logging.WARNING, "log_to_driver": log_to_driver}
    if address:
        join_ray(address, **common)
        return
    # Room for every replica asked for (Ray would otherwise leave replicas beyond the core count
    # pending forever; the kernels share the cores in any case).
    init_local_ray(max(os.cpu_count() or 1, cpus_needed), **common)
    _started_ray = True


def _deploy_error(serve: Any, exc: BaseException) -> HalfbyteError:
    """A failed deployment (e.g. a replica's constructor raised) as one line: the replica's
    ``HalfbyteError`` message where there is one (Serve keeps the traceback in the deployment's status),
    else the last line of the error."""
    texts = [str(exc)]
    try:
        app = serve.status().applications.get(APP_NAME)
        texts += [d.message for d in app.deployments.values() if d.message] if app is not None else []
    except Exception:  # the status is a nicety; the error is reported either way
        pass
    lines = [line.strip() for text in texts for line in text.strip().splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("engine.errors.HalfbyteError: "):
            return HalfbyteError(line.split(": ", 1)[1])
    for line in reversed(lines):
        if "Error: " in line or "Exception: " in line:
            return HalfbyteError(f"Ray Serve could not start the replicas: {line}")
    return HalfbyteError(f"Ray Serve could not start the replicas: {first_line(exc)}")


def _wait_for_proxy(url: str, timeout: float) -> None:
    """Serve's proxy answers once the route table reaches it: poll its /-/routes for our app."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{url}/-/routes", timeout=5) as response:
                if APP_NAME in json.loads(response.read() or b"{}").values():
                    return
        except (OSError, ValueError, urllib.error.URLError):
            pass
        if time.monotonic() > deadline:
            raise HalfbyteError(f"Ray Serve's HTTP proxy did not answer on {url} within {timeout:.0f} s")
        time.sleep(0.2)


def deploy(model_path: str, replicas: int | None = 1, autoscale: tuple[int, int] | None = None, parallel: int = 4,
           n_ctx: int = 0, threads: int | None = None, host: str = "127.0.0.1", port: int = 8080,
           chat_template: str | None = None, api_key: str | None = None, queue_size: int = 16,
           prefill_chunk: int = 64, max_body: int | None = None, ray_address: str | None = None,
           replica_cpus: float | None = None, log_level: str = "warning", lora: tuple = (),
           lora_applied: bool = True) -> Deployed:
    """Deploy MODEL as a Ray Serve application listening on ``host:port`` (0: a free port); returns
    once the replicas are up and the proxy answers. Starts a local Ray instance unless Ray is
    already initialized in this process or ``ray_address`` names a cluster to join.

    ``replicas``: a fixed count; ``autoscale=(MIN, MAX)`` instead: Serve keeps about ``parallel``
    requests per replica (``target_ongoing_requests``) within MIN..MAX. ``replica_cpus``: the CPUs
    Ray reserves for each model replica (default: ``threads`` if given, else 1). ``lora``,
    ``lora_applied``: run-time LoRA adapters of every replica, as ``engine.server.build_service``."""
    from engine.server import DEFAULT_MAX_BODY

    ray, serve = _ray()
    if (replicas is None) == (autoscale is None):
        raise HalfbyteError("give either a replica count (--replicas) or --autoscale MIN:MAX, not both")
    if replicas is not None and replicas < 1:
        raise HalfbyteError(f"--replicas must be >= 1, got {replicas}")
    if parallel < 1:
        raise HalfbyteError(f"--parallel must be >= 1, got {parallel}")
    if queue_size < 0:
        raise HalfbyteError(f"--queue-size must be >= 0, got {queue_size}")
    max_body = DEFAULT_MAX_BODY if max_body is None else max_body
    model_path = resolve_model(model_path)
    most = autoscale[1] if autoscale is not None else replicas
    cpus = float(replica_cpus if replica_cpus is not None else (threads if threads and threads > 0 else 1))
    if ray_address is None:
        if port == 0:
            port = _free_port(host)
        else:
            _check_port(host, port)
    elif port == 0:
        raise HalfbyteError("--port 0 (any free port) needs a local Ray: give a port with --ray-address")

    _init_ray(ray, ray_address, cpus * most, log_to_driver=log_level in ("info", "debug"))
    logging.getLogger("ray.serve").setLevel(log_level.upper())  # Serve's own lines in this process
    serve_log = {"log_level": log_level.upper(), "enable_access_log": log_level in ("info", "debug")}
    try:
        serve.start(http_options={"host": host, "port": port}, logging_config=serve_log)
        # Routing to free slots: a replica takes at most `parallel` requests at once, one per slot, so
        # Serve's router sends a request only to a replica with a free slot; the rest wait in the
        # ingress's router and go to whichever replica frees a slot first (with `parallel +
        # queue_size` they would queue inside one replica's scheduler while another may sit idle).
        # The waiting line is bounded like the single server's: the ingress lets (parallel +
        # --queue-size) calls per replica be in flight, past that 503 + Retry-After (Places).
        # /health and /v1/models take one of those places for the moment they run.
        options: dict[str, Any] = {
            "name": MODEL_DEPLOYMENT, "max_ongoing_requests": parallel,
            "ray_actor_options": {"num_cpus": cpus}, "health_check_period_s": HEALTH_CHECK_PERIOD_S,
            "graceful_shutdown_timeout_s": 5.0, "max_constructor_retry_count": 3,
        }
        if autoscale is not None:
            options["autoscaling_config"] = {
                "min_replicas": autoscale[0], "max_replicas": autoscale[1],
                "initial_replicas": max(autoscale[0], 1), "target_ongoing_requests": parallel}
        else:
            options["num_replicas"] = replicas
        # The replica's own scheduler queue only absorbs the moment between Serve counting a
        # request done and the scheduler freeing its slot (at its next step).
        model = serve.deployment(ModelReplica).options(**options).bind(
            model_path, n_ctx, threads, parallel, chat_template, api_key, max(queue_size, parallel), prefill_chunk,
            max_body, tuple(lora), lora_applied)
        ingress = serve.deployment(Ingress).options(
            name=INGRESS_DEPLOYMENT, num_replicas=1, max_ongoing_requests=INGRESS_MAX_ONGOING,
            ray_actor_options={"num_cpus": 0}, graceful_shutdown_timeout_s=5.0).bind(
                model, max_body, (parallel + queue_size) * most)
        try:
            handle = serve.run(ingress, name=APP_NAME, route_prefix="/", logging_config=serve_log)
        except RuntimeError as exc:
            raise _deploy_error(serve, exc) from None
        model_handle = serve.get_deployment_handle(MODEL_DEPLOYMENT, app_name=APP_NAME)
        info = {}
        if autoscale is None or autoscale[0] > 0:
            info = model_handle.info.remote().result(timeout_s=READY_TIMEOUT_S)
        url_host = f"[{host}]" if ":" in host else host
        url = f"http://{url_host}:{port}"
        _wait_for_proxy(url, READY_TIMEOUT_S)
    except BaseException:
        shutdown()
        raise
    return Deployed(url, replicas, autoscale, handle, model_handle, info)


def shutdown() -> None:
    """Stop the Serve application and Serve; stop Ray too if ``deploy`` started it."""
    global _started_ray
    try:
        import ray
        from ray import serve
    except ImportError:
        return
    if ray.is_initialized():
        try:
            serve.shutdown()
        finally:
            if _started_ray:
                _started_ray = False
                ray.shutdown()


def serve_forever(deployed: Deployed) -> None:
    """Block until Ctrl-C or SIGTERM, then shut Serve down (the CLI's loop)."""
    import signal
    import threading

    stop = threading.Event()

    def on_signal(signum, frame) -> None:  # noqa: ANN001
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.wait(0.5):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutdown()
