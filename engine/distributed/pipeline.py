"""One model split across machines: pipeline stages on Ray.

A model too big for one board is cut into K contiguous ranges of layers. Each range is a stage,
a Ray actor (``StageRunner``) placed on its own node by a placement group; it maps the GGUF file
from that node's local copy and only ever reads its own layers' tensors (plus the embedding on
the first stage and the head on the last), so its resident memory is about 1/K of the weights.
Its KV cache holds only its layers too.

A forward pass goes stage to stage as Ray tasks: stage 0 gets token ids, every later stage the
activations of the one before, one ``(n_tok, n_embd)`` float32 array per stage boundary (16 KiB a
token for a 4096-wide model), passed as an object reference so it goes node to node. A long
prompt is cut into micro-batches submitted back to back: while stage 1 runs micro-batch 1,
stage 0 already runs micro-batch 2, so the stages overlap. Token-by-token generation is one
micro-batch per step.

Exactness: every stage runs the architecture's own ``layer`` code (engine/decoder.py) in the same
order as one process. Micro-batches are cut into near-equal parts of at least ``micro_batch / 2``
tokens, and the products of a prompt row do not depend on how many rows share its batch once
there are 8 or more (tests/test_pipeline.py checks the logits are bit-identical to one process).

``PipelineModel`` is a ``Model`` whose architecture is the pipeline and whose KV caches are
``RemoteKVCache`` handles: generation, chat, completions, the server's continuous batching and
embeddings work unchanged. Saving and loading a context (``save_state``) and LoRA are refused.
"""

from __future__ import annotations

import itertools
import math
import os
import re
import threading
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from engine.distributed.ray_runtime import first_line, import_ray, init_local_ray, join_ray
from engine.errors import HalfbyteError
from engine.model import Model

DEFAULT_MICRO_BATCH = 32  # prompt tokens per micro-batch
PLACEMENTS = {"strict-spread": "STRICT_SPREAD", "spread": "SPREAD", "pack": "PACK"}


def split_layers(n_layer: int, n_stages: int) -> list[range]:
    """``n_stages`` contiguous layer ranges of near-equal size (the first ones one layer longer)."""
    if not 1 <= n_stages <= n_layer:
        raise HalfbyteError(f"cannot split {n_layer} layers into {n_stages} stages (1..{n_layer})")
    base, extra = divmod(n_layer, n_stages)
    ranges, first = [], 0
    for i in range(n_stages):
        last = first + base + (1 if i < extra else 0)
        ranges.append(range(first, last))
        first = last
    return ranges


def chunk_sizes(n_tok: int, micro_batch: int) -> list[int]:
    """``n_tok`` cut into near-equal micro-batches of at most ``micro_batch`` tokens (0: one piece).
    Near-equal, not ``micro_batch`` and a remainder: a 1- or 2-token tail would take the one-row
    kernels, whose sums run in another order than the batched ones."""
    if micro_batch <= 0 or n_tok <= micro_batch:
        return [n_tok]
    parts = math.ceil(n_tok / micro_batch)
    base, extra = divmod(n_tok, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def resident_bytes(path: str | os.PathLike | None = None) -> dict[str, int]:
    """This process's resident memory (``rss``) and, with ``path``, how much of that file's mapping
    is resident (``mapped``), from /proc/self/smaps (Linux; zeros elsewhere)."""
    rss = mapped = 0
    target = os.path.realpath(path) if path is not None else None
    try:
        with open("/proc/self/smaps", encoding="utf-8", errors="replace") as smaps:
            current = None
            for line in smaps:
                if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                    fields = line.split(None, 5)
                    current = fields[5].strip() if len(fields) > 5 else ""
                elif line.startswith("Rss:"):
                    kib = int(line.split()[1]) * 1024
                    rss += kib
                    if target is not None and current == target:
                        mapped += kib
    except OSError:
        pass
    return {"rss": rss, "mapped": mapped}


class StageRunner:
    """Layers ``first .. last - 1`` of the model in ``path``, with a KV cache per sequence for them.

    The body of a Ray actor (``start_stages``) and usable without Ray (tests, one process)."""

    def __init__(self, path: str, first: int, last: int, threads: int = 1, type_k: str = "f16",
                 type_v: str = "f16") -> None:
        from engine.gguf_file import GGUFFile
        from models import load_architecture

        self.path = path
        self.file = GGUFFile(path)
        self.arch = load_architecture(self.file)
        p = self.arch.params
        self.first, self.last = first, last
        self.is_first, self.is_last = first == 0, last == p.n_layer
        self.arch.keep_only(first, last, embed=self.is_first, head=self.is_last)
        self.threads = max(1, int(threads))
        self.type_k, self.type_v = type_k, type_v
        self.caches: dict[int, Any] = {}

    def ready(self) -> dict[str, Any]:
        """Where this stage runs: its layers, process and host."""
        import socket

        where = {"layers": (self.first, self.last), "pid": os.getpid(), "host": socket.gethostname()}
        try:
            import ray

            if ray.is_initialized():
                where["node_id"] = ray.get_runtime_context().get_node_id()
        except ImportError:
            pass
        return where

    def _cache(self, cache_id: int, n_ctx: int) -> Any:
        from engine.kernels.attention import KVCache

        cache = self.caches.get(cache_id)
        if cache is None:
            p = self.arch.params
            cache = KVCache(self.last - self.first, n_ctx, p.n_head_kv, p.head_dim, self.type_k, self.type_v)
            self.caches[cache_id] = cache
        return cache

    def run(self, tokens: np.ndarray, x: np.ndarray | None, sequences: Sequence[tuple[int, int, int, int]],
            rows: np.ndarray | None = None, hidden_only: bool = False) -> np.ndarray:
        """This stage's part of a forward pass. ``sequences``: ``(cache_id, n_ctx, n_past, n_tok)`` per
        sequence of the batch; ``x``: the previous stage's output (None on the first stage). The last
        stage returns the logits (or normed hidden states) of ``rows``; the others their activations."""
        from engine.batch import Batch, SequenceSlice
        from engine.model import _set_kernel_threads

        batch = Batch(tokens, [SequenceSlice(self._cache(cid, n_ctx), n_past, n_tok)
                               for cid, n_ctx, n_past, n_tok in sequences], first_layer=self.first)
        _set_kernel_threads(self.threads)
        # Ray hands arrays over read-only (zero-copy); the layers update their input in place.
        x = self.arch.embed(batch) if self.is_first else np.array(x, dtype=np.float32)
        x = self.arch.run_layers(x, batch, self.first, self.last)
        if not self.is_last:
            return x
        if rows is not None:
            x = x[rows]
        return self.arch.head(x, hidden_only)

    def release(self, cache_ids: Sequence[int]) -> None:
        for cache_id in cache_ids:
            self.caches.pop(cache_id, None)

    def memory(self) -> dict[str, int]:
        """Resident bytes of this process and of its mapping of the model file."""
        return resident_bytes(self.path)


class RemoteKVCache:
    """A sequence's KV cache as a handle: each stage holds the entries of its own layers."""

    _ids = itertools.count(1)

    def __init__(self, pipeline: PipelineArchitecture, n_ctx: int, type_k: str, type_v: str) -> None:
        self.id = next(self._ids)
        self.n_ctx = n_ctx
        self.n_layer = pipeline.params.n_layer
        self.type_k, self.type_v = type_k, type_v
        self.n_past = 0
        weakref.finalize(self, pipeline.release, self.id)  # the stages drop theirs with the handle

    def reset(self) -> None:
        self.n_past = 0


class PipelineArchitecture:
    """The forward pass of a model whose layers run in ``stages`` (Ray actors, in layer order)."""

    def __init__(self, params: Any, stages: list, ranges: list[range], placement_group: Any = None,
                 micro_batch: int = DEFAULT_MICRO_BATCH) -> None:
        self.params = params
        self.stages = stages
        self.ranges = ranges
        self.placement_group = placement_group
        self.micro_batch = micro_batch
        self._released: list[int] = []
        self._released_lock = threading.Lock()

    def release(self, cache_id: int) -> None:
        # Called by a finalizer (any thread, maybe during a forward pass): sent with the next pass.
        with self._released_lock:
            self._released.append(cache_id)

    def forward(self, batch: Any, all_logits: bool = False, hidden_only: bool = False) -> np.ndarray:
        import ray

        with self._released_lock:
            released, self._released = self._released, []
        if released:
            for stage in self.stages:
                stage.release.remote(released)
        for seq in batch.sequences:
            if not isinstance(seq.cache, RemoteKVCache):
                raise HalfbyteError("a pipeline's sequences need its own KV caches (PipelineModel.new_cache)")
        pieces = [chunk_sizes(seq.n_tok, self.micro_batch) for seq in batch.sequences]
        # Micro-batch j holds the j-th piece of every sequence that has one; each sequence's
        # pieces go through every stage in order, so its cache entries are written in order.
        planned = []  # (ref, [(sequence index, offset in the sequence, n_tok)])
        for j in range(max(len(p) for p in pieces)):
            parts = [(s, sum(sizes[:j]), sizes[j]) for s, sizes in enumerate(pieces) if j < len(sizes)]
            tokens = np.concatenate([batch.tokens[batch.starts[s] + off : batch.starts[s] + off + n]
                                     for s, off, n in parts])
            sequences = [(batch.sequences[s].cache.id, batch.sequences[s].cache.n_ctx,
                          batch.sequences[s].n_past + off, n) for s, off, n in parts]
            if all_logits:
                rows = None
            else:  # each sequence's last row, in the micro-batch whose piece ends the sequence
                ends = np.cumsum([n for _, _, n in parts])
                rows = np.array([end - 1 for (s, _, _), end in zip(parts, ends) if j == len(pieces[s]) - 1],
                                dtype=np.int64)
            ref = None
            for i, stage in enumerate(self.stages):
                ref = stage.run.remote(tokens, ref, sequences, rows if i == len(self.stages) - 1 else None,
                                       hidden_only)
            planned.append((ref, parts))
        try:
            outputs = ray.get([ref for ref, _ in planned])
        except ray.exceptions.RayActorError as exc:
            raise HalfbyteError(f"a pipeline stage died: {first_line(exc)}") from None
        except ray.exceptions.RayTaskError as exc:
            cause = exc.as_instanceof_cause()
            if isinstance(cause, HalfbyteError):
                raise HalfbyteError(str(cause).splitlines()[0]) from None
            raise HalfbyteError(f"a pipeline stage failed: {first_line(exc)}") from None
        for seq in batch.sequences:
            seq.cache.n_past = seq.n_past + seq.n_tok
        if all_logits:  # rows in batch order: sequence by sequence, piece by piece
            per_sequence: list[list[np.ndarray]] = [[] for _ in batch.sequences]
            for out, (_, parts) in zip(outputs, planned):
                at = 0
                for s, _, n in parts:
                    per_sequence[s].append(out[at : at + n])
                    at += n
            return np.concatenate([row for rows in per_sequence for row in rows])
        last: list[np.ndarray | None] = [None] * len(batch.sequences)
        for out, (_, parts) in zip(outputs, planned):
            k = 0  # the output holds one row per sequence whose last piece is in this micro-batch
            for s, off, n in parts:
                if off + n == batch.sequences[s].n_tok:
                    last[s] = out[k]
                    k += 1
        return np.stack(last)

    def where(self) -> list[dict[str, Any]]:
        """Per stage: its layers, process, host and Ray node."""
        import ray

        return ray.get([stage.ready.remote() for stage in self.stages])

    def memory(self) -> list[dict[str, Any]]:
        import ray

        return [{"layers": (r.start, r.stop), **m} for r, m in
                zip(self.ranges, ray.get([stage.memory.remote() for stage in self.stages]))]

    def shutdown(self) -> None:
        import ray

        for stage in self.stages:
            try:
                ray.kill(stage)
            except Exception:  # already gone
                pass
        self.stages = []
        if self.placement_group is not None:
            from ray.util.placement_group import remove_placement_group

            try:
                remove_placement_group(self.placement_group)
            except Exception:
                pass
            self.placement_group = None


def connect(address: str | None = None, num_cpus: int | None = None) -> Any:
    """Ray, connected: to ``address`` (a cluster's, or "auto"), else a local Ray started on demand
    (on the loopback address, engine/distributed/ray_runtime.py)."""
    ray = import_ray()
    if not ray.is_initialized():
        if address:
            join_ray(address, log_to_driver=False)
        else:
            init_local_ray(num_cpus, log_to_driver=False)
    return ray


def start_stages(path: str, params: Any, n_stages: int, *, address: str | None = None,
                 placement: str = "strict-spread", cpus_per_stage: int = 1, type_k: str = "f16",
                 type_v: str = "f16", micro_batch: int = DEFAULT_MICRO_BATCH,
                 ready_timeout: float = 120.0) -> PipelineArchitecture:
    """Place ``n_stages`` stage actors with Ray (one placement group bundle each) and load their layers."""
    if placement not in PLACEMENTS:
        raise HalfbyteError(f"placement must be one of {', '.join(PLACEMENTS)}, got {placement!r}")
    if cpus_per_stage < 1:
        raise HalfbyteError(f"CPUs per stage must be >= 1, got {cpus_per_stage}")
    ranges = split_layers(params.n_layer, n_stages)
    # A local Ray gets a logical CPU per stage (the stages run one after another for a token, and a
    # prompt's micro-batches overlap them); a cluster has its own.
    ray = connect(address, num_cpus=max(os.cpu_count() or 1, n_stages * cpus_per_stage))
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    group = placement_group([{"CPU": cpus_per_stage}] * n_stages, strategy=PLACEMENTS[placement])
    try:
        ray.get(group.ready(), timeout=ready_timeout)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(group)
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        cpus = [int(n.get("Resources", {}).get("CPU", 0)) for n in nodes]
        raise HalfbyteError(
            f"cannot place {n_stages} pipeline stages of {cpus_per_stage} CPU(s) ({placement}) on this Ray "
            f"cluster of {len(nodes)} node(s) with {cpus} CPUs"
            + ("; use --placement spread to put several stages on one node" if placement == "strict-spread"
               else "")) from None
    actor = ray.remote(StageRunner)
    stages = [actor.options(num_cpus=cpus_per_stage, max_concurrency=1, scheduling_strategy=
                            PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i))
              .remote(path, r.start, r.stop, cpus_per_stage, type_k, type_v) for i, r in enumerate(ranges)]
    pipeline = PipelineArchitecture(params, stages, ranges, group, micro_batch)
    try:
        ray.get([stage.ready.remote() for stage in stages], timeout=ready_timeout)
    except ray.exceptions.RayTaskError as exc:
        pipeline.shutdown()
        cause = exc.as_instanceof_cause()
        raise HalfbyteError(str(cause).splitlines()[0] if isinstance(cause, HalfbyteError)
                            else f"a pipeline stage could not load {path}: {first_line(exc)}") from None
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as exc:
        pipeline.shutdown()
        raise HalfbyteError(f"a pipeline stage could not start: {first_line(exc)}") from None
    return pipeline


class PipelineModel(Model):
    """A ``Model`` whose layers run in ``stages`` Ray actors (see the module's docstring).

    ``PipelineModel.load("model.gguf", stages=2)`` on a local Ray started on demand, or on a
    cluster with ``address="auto"`` / ``"ray://head:10001"``. ``placement``: ``strict-spread``
    (the default: every stage on its own node), ``spread`` or ``pack``. The file must be at the
    same path on every node that gets a stage."""

    def __init__(self, path: str | os.PathLike, stages: int = 2, n_ctx: int | None = None,
                 threads: int | None = None, kv_type: str = "f16", chat_template: str | None = None,
                 type_k: str | None = None, type_v: str | None = None, address: str | None = None,
                 placement: str = "strict-spread", cpus_per_stage: int = 1,
                 micro_batch: int = DEFAULT_MICRO_BATCH, ready_timeout: float = 120.0) -> None:
        from engine.model import check_int

        self._pipeline_options = {
            "n_stages": check_int("stages", stages, 1), "address": address, "placement": placement,
            "cpus_per_stage": check_int("cpus_per_stage", cpus_per_stage, 1),
            "micro_batch": check_int("micro_batch", micro_batch, 0), "ready_timeout": float(ready_timeout)}
        try:
            super().__init__(str(Path(path).resolve()), n_ctx=n_ctx, threads=threads, kv_type=kv_type,
                             chat_template=chat_template, type_k=type_k, type_v=type_v)
        except BaseException:
            if isinstance(getattr(self, "arch", None), PipelineArchitecture):
                self.arch.shutdown()  # the stages started before the failure
            raise

    @classmethod
    def load(cls, path: str | os.PathLike, stages: int = 2, **kwargs: Any) -> PipelineModel:  # type: ignore[override]
        return cls(path, stages=stages, **kwargs)

    def _load_architecture(self) -> PipelineArchitecture:
        from models import load_architecture

        # The head process reads only the hyper-parameters (and small norm vectors) here.
        params = load_architecture(self.file).params
        return start_stages(str(self.path), params, type_k=self.type_k, type_v=self.type_v,
                            **self._pipeline_options)

    def new_cache(self, n_ctx: int, type_k: str | None = None, type_v: str | None = None) -> RemoteKVCache:
        if (type_k or self.type_k, type_v or self.type_v) != (self.type_k, self.type_v):
            raise HalfbyteError(f"a pipeline's KV caches are {self.type_k}/{self.type_v}, set when it was loaded")
        return RemoteKVCache(self.arch, n_ctx, self.type_k, self.type_v)

    def stages(self) -> list[dict[str, Any]]:
        """Where each stage runs: ``{"layers", "pid", "host", "node_id"}``."""
        with self._exclusive():
            return self.arch.where()

    def stage_memory(self) -> list[dict[str, Any]]:
        """Per stage: its layers, resident bytes (``rss``) and resident bytes of the mapped file (``mapped``)."""
        with self._exclusive():
            return self.arch.memory()

    def save_state(self, path: str | os.PathLike | None = None) -> bytes:
        raise HalfbyteError("save_state is not supported on a pipeline (each stage holds its own part of the "
                            "KV cache)")

    def load_state(self, state: bytes | str | os.PathLike) -> None:
        raise HalfbyteError("load_state is not supported on a pipeline (each stage holds its own part of the "
                            "KV cache)")

    def close(self) -> None:
        arch = getattr(self, "arch", None)
        if isinstance(arch, PipelineArchitecture):
            arch.shutdown()
        super().close()
