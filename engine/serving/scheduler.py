"""Continuous batching: K sequences ("slots"), each with its own KV cache, share one model.

One scheduler thread runs the loop. At every step the next token of every generating slot, plus
up to ``prefill_chunk`` prompt tokens of slots still reading their prompt, go through the weights
in ONE ``model.arch.forward(Batch(...))`` call; then each slot samples its next token from its own
row of logits with its own generator and settings (``SequenceState``). New requests take a free
slot between steps (preferring the slot whose cache already holds the longest prefix of the
prompt: those positions are not evaluated again); a long prompt is read in chunks so it does not
stall the slots that are generating. A cancelled request (a client that went away) frees its
slot at the next step. Requests beyond the free slots wait in a bounded queue; past that,
``submit`` raises ``QueueFull``.

Each forward pass holds the model's lock (``Model._exclusive``), so the model's own
single-sequence API keeps working alongside: its calls and the scheduler's steps take turns.

Numbers: a batch of several sequences goes through the batched matrix products, whose sums run
in another order than the one-row products of a single sequence, so a request's logits can
differ from the same request run alone by float rounding (about 1e-6 relative on the demo
model); greedy text is the same except where the top two tokens are that close.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine.errors import HalfbyteError


class QueueFull(HalfbyteError):
    """Every slot is busy and the waiting queue is full."""


@dataclass
class Job:
    """A request: its generation state and where its events go.

    ``emit(event)`` is called from the scheduler thread with ``("text", piece, records)``,
    ``("done", finish_reason)`` or ``("error", message)``."""

    state: Any  # engine.serving.completion.SequenceState
    emit: Callable[[tuple], None]
    cache_prompt: bool = True
    cancelled: bool = False
    submitted: float = field(default_factory=time.monotonic)
    started: float | None = None  # prompt processing began
    first_token: float | None = None
    finished: float | None = None
    prompt_evaluated: int = 0  # prompt tokens actually evaluated (the rest came from the cache)
    lora_scales: tuple[float, ...] | None = None  # run-time LoRA adapters' scales (None: as loaded)


class Slot:
    def __init__(self, index: int, cache: Any) -> None:
        self.index = index
        self.cache = cache
        self.tokens: list[int] = []  # what the cache holds, in order
        self.lora_scales: tuple[float, ...] | None = None  # the LoRA scales the cache was computed with
        self.job: Job | None = None
        self.pending: list[int] = []  # prompt tokens still to evaluate
        self.next_token: int | None = None  # sampled, to evaluate next step

    @property
    def busy(self) -> bool:
        return self.job is not None


class Scheduler:
    """``Scheduler(model, n_slots, n_ctx)``; ``start()``, ``submit(job)``, ``stop()``."""

    def __init__(self, model: Any, n_slots: int = 4, n_ctx: int | None = None, queue_size: int = 16,
                 prefill_chunk: int = 64, kv_type: str | None = None) -> None:
        if n_slots < 1:
            raise HalfbyteError(f"--parallel must be >= 1, got {n_slots}")
        if queue_size < 0:
            raise HalfbyteError(f"the queue size must be >= 0, got {queue_size}")
        if prefill_chunk < 1:
            raise HalfbyteError(f"the prefill chunk must be >= 1, got {prefill_chunk}")
        self.model = model
        self.n_ctx = n_ctx or model.n_ctx
        self.queue_size = queue_size
        self.prefill_chunk = prefill_chunk
        self.slots = [Slot(i, model.new_cache(self.n_ctx, kv_type, kv_type)) for i in range(n_slots)]
        self._queue: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="halfbyte-scheduler", daemon=True)
        self.steps = 0
        self.batch_sizes: collections.Counter[int] = collections.Counter()  # sequences per step

    # -- public ------------------------------------------------------------------------------------

    def start(self) -> Scheduler:
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        """Queue ``job``; ``QueueFull`` when every slot is busy and ``queue_size`` jobs wait."""
        with self._cond:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            free = sum(1 for s in self.slots if not s.busy)
            if len(self._queue) >= free + self.queue_size:
                raise QueueFull(f"all {len(self.slots)} slots are busy and {self.queue_size} requests are waiting")
            self._queue.append(job)
            self._cond.notify_all()

    def cancel(self, job: Job) -> None:
        with self._cond:
            job.cancelled = True
            self._cond.notify_all()

    def status(self) -> dict[str, int]:
        with self._cond:
            busy = sum(1 for s in self.slots if s.busy)
            return {"slots_idle": len(self.slots) - busy, "slots_processing": busy, "queued": len(self._queue)}

    # -- the loop ------------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._queue and not any(s.busy for s in self.slots):
                    self._cond.wait()
                if self._stopping:
                    break
                self._admit()
            try:
                self._step()
            except Exception as exc:  # a failed step fails the requests in it, not the server
                message = str(exc) if isinstance(exc, HalfbyteError) else f"{type(exc).__name__}: {exc}"
                for slot in self.slots:
                    if slot.busy:
                        self._release(slot, ("error", message))
                        slot.tokens = []
        for slot in self.slots:
            if slot.busy:
                self._release(slot, ("error", "the server is shutting down"))
        while self._queue:
            self._queue.popleft().emit(("error", "the server is shutting down"))

    def _admit(self) -> None:
        """Move waiting jobs into free slots (called with the lock held)."""
        for slot in self.slots:
            if slot.busy and slot.job.cancelled:
                self._release(slot, None)
        while self._queue:
            job = self._queue[0]
            if job.cancelled:
                self._queue.popleft()
                continue
            free = [s for s in self.slots if not s.busy]
            if not free:
                return
            self._queue.popleft()
            prompt = job.state.prompt_ids
            keep = 0
            slot = free[0]
            if job.cache_prompt:
                best = -1
                for candidate in free:
                    # Cached keys and values computed under other LoRA scales are not this request's.
                    same = candidate.lora_scales == job.lora_scales
                    common = _common_prefix(candidate.tokens, prompt) if same else 0
                    if common > best:
                        best, slot = common, candidate
                keep = min(best, len(prompt) - 1)
            slot.tokens = slot.tokens[:keep]
            slot.lora_scales = job.lora_scales
            slot.pending = list(prompt[keep:])
            slot.next_token = None
            slot.job = job
            job.started = time.monotonic()
            job.prompt_evaluated = len(slot.pending)

    def _release(self, slot: Slot, event: tuple | None) -> None:
        job, slot.job = slot.job, None
        slot.pending, slot.next_token = [], None
        if job is not None:
            job.finished = time.monotonic()
            if event is not None:
                job.emit(event)

    def _step(self) -> None:
        from engine.batch import Batch, SequenceSlice
        from engine.lora import scales_in_effect
        from engine.model import _set_kernel_threads

        entries: list[tuple[Slot, list[int], bool]] = []  # slot, tokens, wants a sample from this step
        budget = self.prefill_chunk
        for slot in self.slots:
            if slot.busy and slot.next_token is not None:
                entries.append((slot, [slot.next_token], True))
        for slot in self.slots:
            if slot.busy and slot.pending and budget > 0:
                chunk = slot.pending[:budget]
                budget -= len(chunk)
                entries.append((slot, chunk, len(chunk) == len(slot.pending)))
        if not entries:
            return
        # Sequences whose requests set different LoRA scales do not share a forward pass (as llama-server).
        groups: dict[tuple[float, ...] | None, list[int]] = {}
        for index, (slot, _, _) in enumerate(entries):
            groups.setdefault(slot.job.lora_scales, []).append(index)
        rows: list[Any] = [None] * len(entries)
        with self.model._exclusive():
            _set_kernel_threads(self.model.thread_policy.threads())
            for scales, members in groups.items():
                part = [entries[i] for i in members]
                tokens = np.fromiter((t for _, chunk, _ in part for t in chunk), dtype=np.int64)
                batch = Batch(tokens, [SequenceSlice(slot.cache, len(slot.tokens), len(chunk))
                                       for slot, chunk, _ in part])
                with scales_in_effect(scales):
                    logits = self.model.arch.forward(batch, all_logits=False)
                for i, row in zip(members, logits):
                    rows[i] = row
        logits = rows
        self.steps += 1
        self.batch_sizes[len(entries)] += 1
        now = time.monotonic()
        for (slot, chunk, sample), row in zip(entries, logits):
            slot.tokens.extend(chunk)
            if slot.pending:
                del slot.pending[: len(chunk)]
            else:
                slot.next_token = None
            if not sample:
                continue
            job = slot.job
            if job.cancelled:
                self._release(slot, None)
                continue
            state = job.state
            n_records = len(state.records)
            token, text = state.step(row)
            if job.first_token is None:
                job.first_token = now
            if text or len(state.records) > n_records:
                job.emit(("text", text, state.records[n_records:]))
            if token is None:
                self._release(slot, ("done", state.finish_reason))
            else:
                slot.next_token = token


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
