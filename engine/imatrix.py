"""Importance matrices, as llama.cpp's ``llama-imatrix`` computes them and ``llama-quantize --imatrix`` uses them.

``halfbyte imatrix MODEL -f TEXT -o imatrix.gguf`` evaluates TEXT in chunks and, for every weight matrix
``W`` of a product ``x W^T``, adds up per input column the squares of the activations entering it
(``in_sum2[j] = sum over tokens of x[t, j]^2``) and the number of tokens (``counts``).  What is collected
and how, as llama-imatrix (tools/imatrix/imatrix.cpp) does:

* the text (one trailing newline dropped, as llama.cpp's ``-f``) is tokenized once, with BOS when the
  model adds one; at least ``2 * n_ctx`` tokens are needed; ``--chunk N`` drops the first N chunks;
  ``--chunks N`` keeps at most N of the ``len(tokens) // n_ctx`` chunks;
* each chunk of ``n_ctx`` tokens is evaluated from an empty context with its first token replaced by
  BOS (when the model adds one), and ALL its tokens are collected (the second half of each chunk is
  only what the perplexity, printed as llama-imatrix does, is computed on);
* the products collected are those with a weight named ``blk.*`` (every projection of every layer,
  fused ``attn_qkv`` / ``ffn_up`` included, under the tensor's own name) and, with ``--process-output``,
  ``output.weight`` (never ``token_embd.weight``, even when it serves as the tied output head);
* llama.cpp skips a product whose micro-batch has fewer than 16 tokens: llama-imatrix evaluates
  ``n_batch / n_ctx`` chunks per batch (n_batch 2048), split into micro-batches of ``n_ubatch`` (512)
  tokens taken equally from each chunk.  The tokens that land in such a small micro-batch (a chunk's
  tail, e.g. with ``-c 520``) are left out here too (``counted_positions``);
* sums are float64 here (llama.cpp: float32), stored as float32.

Files: llama.cpp's GGUF format (``general.type = imatrix``; per weight ``<name>.in_sum2`` F32 ``[n, n_mat]``
and ``<name>.counts`` F32 ``[1, n_mat]``, tensors sorted by name; ``imatrix.datasets``,
``imatrix.chunk_count``, ``imatrix.chunk_size``), written the way llama-imatrix writes it, and the
legacy ``.dat`` format (read, and written with ``--output-format dat``).

For quantizing, ``importance`` turns a file into llama-quantize's per-column weights (``in_sum2 / counts``,
float32; 1 for an expert that saw no token; legacy files: ``values / ncall``) with its
``--include-weights`` / ``--exclude-weights`` filters.

The products are observed by wrapping ``engine.ops.linear`` (every matrix product of the architectures
goes through it) for the duration of ``observe_products``; nothing in the forward pass changes.
"""

from __future__ import annotations

import math
import os
import struct
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import click
import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType

from engine.errors import HalfbyteError, file_error

GENERAL_TYPE = "imatrix"
KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"
SUM_SUFFIX = ".in_sum2"
COUNT_SUFFIX = ".counts"
MIN_UBATCH_TOKENS = 16  # llama-imatrix ignores products of smaller micro-batches
DEFAULT_BATCH = 2048  # llama.cpp's -b / -ub defaults
DEFAULT_UBATCH = 512


@dataclass
class Entry:
    """One weight's statistics: ``sums`` float32, flat (n_mat * n: expert after expert), ``counts`` int64
    (n_mat,) tokens seen per matrix (legacy files: one value, the ``ncall`` the sums were scaled to)."""

    sums: np.ndarray
    counts: np.ndarray

    @property
    def n_mat(self) -> int:
        return len(self.counts)


@dataclass
class Imatrix:
    entries: dict[str, Entry]
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    legacy: bool = False  # read from a .dat file: sums are mean squares times ncall
    has_metadata: bool = True  # a GGUF file with the three imatrix.* keys


# -- reading and writing -------------------------------------------------------------------------


def _lround(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    return (np.sign(values) * np.floor(np.abs(values) + 0.5)).astype(np.int64)


def read_imatrix(path: str | os.PathLike) -> Imatrix:
    """An imatrix file, GGUF (llama-imatrix's current format) or legacy ``.dat``; errors name the file."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise HalfbyteError(f"{path}: is a directory")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise HalfbyteError(f"{path}: {exc.strerror or exc}") from None
    if magic == b"GGUF":
        return _read_gguf(path)
    return _read_legacy(path)


def _read_gguf(path: str) -> Imatrix:
    from engine.gguf_file import GGUFFile

    with GGUFFile(path) as gguf:
        if not gguf.tensors:
            raise file_error(path, "no data in this imatrix file (no tensors)")
        datasets = gguf.metadata.get(KEY_DATASETS, [])
        if isinstance(datasets, str):
            datasets = [datasets]
        has_metadata = all(k in gguf.metadata for k in (KEY_DATASETS, KEY_CHUNK_COUNT, KEY_CHUNK_SIZE))
        pairs: dict[str, list] = {}
        for name in gguf.tensors:
            for suffix, slot in ((SUM_SUFFIX, 0), (COUNT_SUFFIX, 1)):
                if name.endswith(suffix):
                    pairs.setdefault(name[: -len(suffix)], [None, None])[slot] = name
        entries = {}
        for name in sorted(pairs):
            sums_name, counts_name = pairs[name]
            if sums_name is None or counts_name is None:
                raise file_error(path, f"mismatched sums and counts for {name}")
            infos = gguf.tensors[sums_name], gguf.tensors[counts_name]
            if any(i.ggml_type != GGMLQuantizationType.F32 for i in infos):
                raise file_error(path, f"sums and counts for {name} must be F32")
            sums = np.array(gguf.tensor_array(sums_name), dtype=np.float32).reshape(-1)
            counts = _lround(np.asarray(gguf.tensor_array(counts_name), dtype=np.float32).reshape(-1))
            if not len(counts) or len(sums) % len(counts):
                raise file_error(path, f"{name}: {len(sums)} sums do not split into {len(counts)} matrices")
            entries[name] = Entry(sums, counts)
        return Imatrix(entries, [str(d) for d in datasets], int(gguf.metadata.get(KEY_CHUNK_COUNT, 0)),
                       int(gguf.metadata.get(KEY_CHUNK_SIZE, 0)), legacy=False, has_metadata=has_metadata)


def _read_legacy(path: str) -> Imatrix:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise HalfbyteError(f"{path}: {exc.strerror or exc}") from None
    pos = 0

    def take(n: int, what: str) -> bytes:
        nonlocal pos
        if pos + n > len(data):
            raise file_error(path, f"not an imatrix file (GGUF or legacy .dat): truncated at {what}")
        pos += n
        return data[pos - n : pos]

    def i32(what: str) -> int:
        return struct.unpack("<i", take(4, what))[0]

    n_entries = i32("the entry count") if len(data) >= 4 else 0
    if n_entries < 1:
        raise file_error(path, "not an imatrix file (GGUF or legacy .dat): no entries")
    entries = {}
    for i in range(n_entries):
        length = i32(f"entry {i + 1}")
        if length < 0:
            raise file_error(path, f"not an imatrix file (GGUF or legacy .dat): bad name length in entry {i + 1}")
        raw = take(length, f"the name of entry {i + 1}")
        name = raw.split(b"\0", 1)[0].decode("utf-8", errors="replace")
        ncall = i32(f"entry {name}")
        nval = i32(f"entry {name}")
        if nval < 1:
            raise file_error(path, f"not an imatrix file (GGUF or legacy .dat): entry {name} has {nval} values")
        sums = np.frombuffer(take(4 * nval, f"the values of {name}"), dtype="<f4").astype(np.float32)
        entries[name] = Entry(sums, np.array([ncall], dtype=np.int64))
    chunk_count = 0
    datasets = []
    if pos < len(data):  # optional trailer: chunk count, then the dataset name
        if pos + 4 <= len(data):
            chunk_count = struct.unpack("<i", data[pos : pos + 4])[0]
            pos += 4
            if pos + 4 <= len(data):
                length = struct.unpack("<i", data[pos : pos + 4])[0]
                pos += 4
                if 0 < length <= len(data) - pos:
                    datasets.append(data[pos : pos + length].split(b"\0", 1)[0].decode("utf-8", errors="replace"))
    return Imatrix(dict(sorted(entries.items())), datasets, chunk_count, 0, legacy=True, has_metadata=False)


def write_imatrix(path: str | os.PathLike, imatrix: Imatrix, inputs: Iterable[str | os.PathLike] = ()) -> None:
    """llama-imatrix's GGUF file: the three imatrix.* keys after general.type, then for every entry (by
    name) ``<name>.in_sum2`` and ``<name>.counts``, 1-D when the weight is one matrix (ggml_n_dims)."""
    from engine.gguf_file import GGUFWriter

    with GGUFWriter(path, inputs=inputs) as out:
        out.add_string("general.type", GENERAL_TYPE)
        out.add_array(KEY_DATASETS, list(imatrix.datasets), GGUFValueType.STRING)
        out.add_uint32(KEY_CHUNK_COUNT, imatrix.chunk_count)
        out.add_uint32(KEY_CHUNK_SIZE, imatrix.chunk_size)
        tensors = []
        for name in sorted(imatrix.entries, key=lambda n: n.encode("utf-8", "surrogateescape")):
            entry = imatrix.entries[name]
            n_mat = entry.n_mat
            if not len(entry.sums) or not n_mat:
                continue
            n = len(entry.sums) // n_mat
            sums = np.asarray(entry.sums, dtype=np.float32).reshape(n_mat, n)
            counts = np.asarray(entry.counts, dtype=np.float32).reshape(n_mat, 1)
            if n_mat == 1:
                sums, counts = sums.reshape(n), counts.reshape(1)
            tensors += [(name + SUM_SUFFIX, sums), (name + COUNT_SUFFIX, counts)]
        for name, array in tensors:
            out.add_tensor_info(name, array.shape, GGMLQuantizationType.F32)
        for name, array in tensors:
            out.write_tensor(name, array)
        out.finish()


def write_imatrix_legacy(path: str | os.PathLike, imatrix: Imatrix, inputs: Iterable[str | os.PathLike] = ()) -> None:
    """llama-imatrix's ``--output-format dat``: per entry with data (by name) ``ncall`` = ceil(max count /
    chunk size) and the values ``sum / count * ncall`` (1 for a matrix without data), then the chunk count
    and the dataset name."""
    from engine.gguf_file import refuse_overwriting_inputs

    refuse_overwriting_inputs(path, inputs)
    if imatrix.legacy:
        raise HalfbyteError("this imatrix was read from a .dat file already; write it as GGUF")
    chunk = max(1, imatrix.chunk_size)
    parts = []
    stored = [(name, e) for name, e in sorted(imatrix.entries.items()) if e.n_mat and np.any(e.counts != 0)]
    parts.append(struct.pack("<i", len(stored)))
    for name, entry in stored:
        raw = name.encode("utf-8")
        ncall = (int(entry.counts.max()) + chunk - 1) // chunk
        n = len(entry.sums) // entry.n_mat
        counts = np.repeat(entry.counts.astype(np.float32), n)
        values = entry.sums.astype(np.float32)
        empty = counts == 0
        values = np.where(empty, np.float32(1), values)
        counts = np.where(empty, np.float32(1), counts)
        scaled = (values / counts) * np.float32(ncall)
        parts += [struct.pack("<i", len(raw)), raw, struct.pack("<ii", ncall, len(values)),
                  scaled.astype("<f4").tobytes()]
    dataset = imatrix.datasets[-1].encode("utf-8") if imatrix.datasets else b""
    parts += [struct.pack("<i", imatrix.chunk_count), struct.pack("<i", len(dataset)), dataset]
    tmp = f"{os.fspath(path)}.{os.getpid()}.partial"
    try:
        with open(tmp, "wb") as f:
            f.write(b"".join(parts))
        os.replace(tmp, path)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise file_error(os.fspath(path), f"cannot write: {exc.strerror or exc}") from None


# -- what llama-quantize makes of a file ---------------------------------------------------------


def importance(imatrix: Imatrix, include: Iterable[str] = (), exclude: Iterable[str] = (),
               path: str = "imatrix") -> dict[str, np.ndarray]:
    """Per-column quantization weights (float32, flat: n_mat * n) by tensor name, as llama-quantize's
    load_imatrix and prepare_imatrix compute them: ``sums / count`` per matrix (1 where a matrix saw no
    token), legacy files ``values / ncall``; ``exclude``: drop entries whose name contains any of these
    strings, ``include``: keep only those whose name contains one.  Non-finite weights are refused."""
    include, exclude = list(include), list(exclude)
    if include and exclude:
        raise HalfbyteError("--include-weights and --exclude-weights cannot be used together")
    if not imatrix.legacy and not imatrix.has_metadata:
        raise file_error(path, "missing imatrix metadata (imatrix.datasets, imatrix.chunk_count, imatrix.chunk_size)")
    weights = {}
    for name, entry in imatrix.entries.items():
        if imatrix.legacy:
            ncall = int(entry.counts[0]) if len(entry.counts) else 0
            values = entry.sums / np.float32(ncall) if ncall > 0 else entry.sums.copy()
        else:
            n = len(entry.sums) // entry.n_mat
            values = np.ones(len(entry.sums), np.float32)
            for j, count in enumerate(entry.counts):
                if float(count) > 0:
                    values[j * n : (j + 1) * n] = entry.sums[j * n : (j + 1) * n] / np.float32(count)
        weights[name] = values.astype(np.float32)
    for text in exclude:
        weights = {k: v for k, v in weights.items() if text not in k}
    if include:
        weights = {k: v for k, v in weights.items() if any(text in k for text in include)}
    for name, values in weights.items():
        if not np.all(np.isfinite(values)):
            bad = values[~np.isfinite(values)][0]
            raise file_error(path, f"imatrix contains non-finite value {bad} (entry {name})")
    return weights


# -- collecting ----------------------------------------------------------------------------------


class Collector:
    """Sums of squared activations per weight, fed by ``observe_products``."""

    def __init__(self, process_output: bool = False) -> None:
        self.process_output = process_output
        self.sums: dict[str, np.ndarray] = {}  # float64 (n,)
        self.counts: dict[str, int] = {}
        self.rows: np.ndarray | None = None  # which rows of the current evaluation count (None: all)

    def wants(self, name: str | None) -> bool:
        return bool(name) and (name.startswith("blk.") or (self.process_output and name == "output.weight"))

    def observe(self, x: np.ndarray, weight) -> None:
        name = getattr(weight, "name", None)
        if not self.wants(name) or x.ndim != 2:
            return
        if self.rows is not None and len(self.rows) == x.shape[0]:
            x = x[self.rows]
        if not x.shape[0]:
            return
        x64 = x.astype(np.float64)
        squares = np.einsum("ij,ij->j", x64, x64)
        total = self.sums.get(name)
        if total is None:
            self.sums[name] = squares
            self.counts[name] = 0
        elif total.shape != squares.shape:
            raise HalfbyteError(f"inconsistent size for {name} ({total.shape[0]} vs {squares.shape[0]})")
        else:
            total += squares
        if not np.all(np.isfinite(self.sums[name])):
            raise HalfbyteError(f"non-finite values detected in {name}")
        self.counts[name] += x.shape[0]

    def result(self, chunk_size: int, datasets: list[str]) -> Imatrix:
        entries = {name: Entry(self.sums[name].astype(np.float32), np.array([self.counts[name]], np.int64))
                   for name in sorted(self.sums)}
        chunk_count = max((c // chunk_size for c in self.counts.values()), default=0) if chunk_size else 0
        return Imatrix(entries, list(datasets), int(chunk_count), int(chunk_size))


@contextmanager
def observe_products(collector: Collector) -> Iterator[Collector]:
    """Within this block every ``engine.ops.linear(x, W)`` called from this thread also hands ``x`` (the
    float32 rows the product sees) and ``W`` to ``collector``.  Products from other threads are not
    observed; the original function is back afterwards."""
    from engine import ops

    original = ops.linear
    thread = threading.get_ident()

    def linear(x: np.ndarray, weight) -> np.ndarray:
        if threading.get_ident() == thread:
            collector.observe(np.ascontiguousarray(x, dtype=np.float32), weight)
        return original(x, weight)

    ops.linear = linear
    try:
        yield collector
    finally:
        ops.linear = original


def counted_positions(n_ctx: int, n_seqs: int, n_batch: int = DEFAULT_BATCH, n_ubatch: int = DEFAULT_UBATCH,
                      multi_sequence: bool | None = None) -> np.ndarray:
    """Which positions of each of ``n_seqs`` chunks evaluated together llama-imatrix collects: all but
    those in micro-batches of fewer than 16 tokens.  One chunk per batch (``multi_sequence`` False): the
    chunk is cut in batches of ``n_batch`` tokens, each in micro-batches of ``n_ubatch`` (llama.cpp's
    split_simple).  Several (llama-imatrix's ``n_batch // n_ctx`` > 1, one KV stream per chunk): each
    micro-batch takes ``n_ubatch // n_seqs`` tokens of every chunk (split_equal)."""
    if multi_sequence is None:
        multi_sequence = n_seqs > 1
    counted = np.ones(n_ctx, dtype=bool)
    if multi_sequence:
        per = max(1, n_ubatch // n_seqs)
        for start in range(0, n_ctx, per):
            size = min(per, n_ctx - start)
            if size * n_seqs < MIN_UBATCH_TOKENS:
                counted[start : start + size] = False
    else:
        for batch in range(0, n_ctx, n_batch):
            end = min(n_ctx, batch + n_batch)
            for start in range(batch, end, n_ubatch):
                if min(n_ubatch, end - start) < MIN_UBATCH_TOKENS:
                    counted[start : min(end, start + n_ubatch)] = False
    return counted


@dataclass
class ImatrixRun:
    imatrix: Imatrix
    n_chunks: int
    chunk_ppl: list[float]
    ppl: float | None
    ppl_error: float | None


def compute_imatrix(model, text: str, n_ctx: int = 512, max_chunks: int | None = None, from_chunk: int = 0,
                    process_output: bool = False, parse_special: bool = False, compute_ppl: bool = True,
                    n_batch: int = DEFAULT_BATCH, n_ubatch: int = DEFAULT_UBATCH, dataset: str = "",
                    on_chunk: Callable[[int, int, float | None], None] | None = None) -> ImatrixRun:
    """The importance matrix of ``model`` (an engine.model.Model with a context of at least ``n_ctx``)
    over ``text``, as llama-imatrix computes it (see the module doc); also the perplexity of the second
    half of every chunk, as llama-imatrix prints it (``compute_ppl``)."""
    from engine.model import check_int
    from engine.perplexity import _log_softmax_at

    n_ctx = check_int("context size", n_ctx, 1)
    from_chunk = check_int("first chunk", from_chunk, 0)
    n_batch = check_int("batch size", n_batch, 1)
    n_ubatch = check_int("micro-batch size", n_ubatch, 1)
    if max_chunks is not None and check_int("chunks", max_chunks) < 1:
        raise HalfbyteError(f"chunks must be >= 1, got {max_chunks}")
    if n_ctx > model.n_ctx:
        raise HalfbyteError(f"context size {n_ctx} is larger than the model's context ({model.n_ctx})")
    n_seq = max(1, n_batch // n_ctx)
    n_batch = min(n_batch, n_seq * n_ctx)
    n_ubatch = min(n_ubatch, n_batch)
    if n_seq > n_ubatch:
        raise HalfbyteError(f"a context of {n_ctx} tokens is too small for batches of {n_batch} "
                            f"(micro-batches of {n_ubatch}): use a larger -c")
    tokens = np.asarray(model.tokenize(text, special=parse_special), dtype=np.int64)
    if from_chunk > 0:
        if (from_chunk + 2) * n_ctx >= len(tokens):
            raise HalfbyteError(f"there will be not enough tokens left after removing {from_chunk} chunks "
                                f"(the text has {len(tokens)} tokens)")
        tokens = tokens[from_chunk * n_ctx :]
    if len(tokens) < 2 * n_ctx:
        raise HalfbyteError(f"the text has {len(tokens)} tokens: llama-imatrix needs at least {2 * n_ctx} "
                            f"(twice the context of {n_ctx}); use a longer text or a smaller -c")
    n_chunk = len(tokens) // n_ctx
    if max_chunks is not None:
        n_chunk = min(n_chunk, max_chunks)
    bos = model.tokenizer.bos_id if model.tokenizer.add_bos else None
    first = n_ctx // 2
    collector = Collector(process_output)
    need_logits = compute_ppl or process_output
    nll = nll2 = 0.0
    count = 0
    running: list[float] = []
    with observe_products(collector):
        for group in range(0, n_chunk, n_seq):
            collector.rows = counted_positions(n_ctx, min(n_seq, n_chunk - group), n_batch, n_ubatch,
                                               multi_sequence=n_seq > 1)
            for chunk in range(group, min(n_chunk, group + n_seq)):
                window = tokens[chunk * n_ctx : (chunk + 1) * n_ctx].copy()
                if bos is not None:
                    window[0] = bos
                model.reset()
                logits = model.eval(window, last_only=not need_logits)
                if compute_ppl and n_ctx - 1 > first:
                    logp = _log_softmax_at(logits[first : n_ctx - 1],
                                           tokens[chunk * n_ctx + first + 1 : (chunk + 1) * n_ctx])
                    nll -= float(logp.sum())
                    nll2 += float((logp * logp).sum())
                    count += len(logp)
                    running.append(math.exp(nll / count))
                if on_chunk is not None:
                    on_chunk(chunk + 1, n_chunk, running[-1] if running else None)
    ppl = ppl_error = None
    if compute_ppl and count:
        mean = nll / count
        variance = nll2 / count - mean * mean
        ppl = math.exp(mean)
        ppl_error = ppl * math.sqrt(variance / (count - 1)) if variance > 0 and count > 1 else None
    return ImatrixRun(collector.result(n_ctx, [dataset] if dataset else []), n_chunk, running, ppl, ppl_error)


# -- the command ---------------------------------------------------------------------------------


@click.command("imatrix")
@click.argument("model_path", metavar="MODEL")
@click.option("-f", "--file", "text_file", metavar="TEXT", required=True, help="The calibration text (UTF-8).")
@click.option("-o", "--output", "output", metavar="FILE", default="imatrix.gguf", show_default=True,
              help="Where to write the importance matrix.")
@click.option("--output-format", type=click.Choice(["gguf", "dat"]), default=None,
              help="gguf (llama.cpp's current format, the default) or dat (the legacy one).")
@click.option("-c", "--ctx-size", "n_ctx", type=int, default=512, show_default=True, help="Tokens per chunk.")
@click.option("--chunks", "max_chunks", type=int, default=None, help="Evaluate at most this many chunks.")
@click.option("--chunk", "--from-chunk", "from_chunk", type=int, default=0, help="Skip the first N chunks.")
@click.option("--process-output", is_flag=True, help="Also collect the output head (output.weight).")
@click.option("--parse-special", is_flag=True, help="Parse control-token text such as <s> in the text.")
@click.option("--no-ppl", is_flag=True, help="Do not compute the perplexity.")
@click.option("-b", "--batch-size", "n_batch", type=int, default=DEFAULT_BATCH, show_default=True,
              help="llama.cpp's batch size (decides which chunk tails llama-imatrix leaves out).")
@click.option("-ub", "--ubatch-size", "n_ubatch", type=int, default=DEFAULT_UBATCH, show_default=True,
              help="llama.cpp's micro-batch size (likewise).")
@click.option("-t", "--threads", type=int, default=None, help="Threads (0 or negative: the free cores).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def imatrix_command(model_path: str, text_file: str, output: str, output_format: str | None, n_ctx: int,
                    max_chunks: int | None, from_chunk: int, process_output: bool, parse_special: bool,
                    no_ppl: bool, n_batch: int, n_ubatch: int, threads: int | None, quiet: bool) -> None:
    """Compute an importance matrix of MODEL over a text, as llama.cpp's llama-imatrix (for
    `halfbyte quantize --imatrix` or llama-quantize --imatrix)."""
    from tqdm import tqdm

    from engine.gguf_file import refuse_overwriting_inputs
    from engine.run_cli import check_not_directory, check_option, compile_notices, load_model, read_text_file

    check_option("-c", n_ctx, 1)
    check_option("--chunks", max_chunks, 1)
    check_option("--chunk", from_chunk, 0)
    check_option("-b", n_batch, 1)
    check_option("-ub", n_ubatch, 1)
    check_not_directory(output)
    refuse_overwriting_inputs(output, [model_path, text_file])
    text = read_text_file(text_file)
    if text.endswith("\n"):  # llama.cpp's -f drops one trailing newline
        text = text[:-1]
    compile_notices()
    model = load_model(model_path, n_ctx, threads)
    bar = None

    def on_chunk(done: int, total: int, ppl: float | None) -> None:
        nonlocal bar
        if quiet:
            return
        if bar is None:
            bar = tqdm(desc="imatrix", unit="chunk", total=total, file=click.get_text_stream("stderr"),
                       dynamic_ncols=True)
        if ppl is not None:
            bar.set_postfix_str(f"PPL {ppl:.4f}")
        bar.update(1)

    try:
        run = compute_imatrix(model, text, n_ctx, max_chunks, from_chunk, process_output, parse_special,
                              not no_ppl, n_batch, n_ubatch, dataset=text_file, on_chunk=on_chunk)
    finally:
        if bar is not None:
            bar.close()
    if run.chunk_ppl:
        click.echo(",".join(f"[{i + 1}]{p:.4f}" for i, p in enumerate(run.chunk_ppl)))
    if run.ppl is not None:
        error = f" +/- {run.ppl_error:.5f}" if run.ppl_error is not None else ""
        click.echo(f"Final estimate: PPL = {run.ppl:.4f}{error}")
    legacy = output_format == "dat"
    (write_imatrix_legacy if legacy else write_imatrix)(output, run.imatrix, inputs=[model_path, text_file])
    click.echo(f"wrote {output}: {len(run.imatrix.entries)} entries, {run.n_chunks} chunks of {n_ctx} tokens",
               err=True)


# -- quantizing with an importance matrix (engine.requantize) -------------------------------------

TOKEN_EMBEDDINGS = ("token_embd.weight", "per_layer_token_embd.weight")


def tensor_weights(plan, weights: dict[str, np.ndarray], imatrix_path: str, model_path: str,
                   model_tensors: Iterable[str], report: Callable[[str], None] | None = None,
                   ) -> dict[str, tuple[np.ndarray, int]]:
    """For every tensor of ``plan`` (``(TensorInfo, new type)`` pairs) that gets converted: its importance
    weights as ``((n_mat, n) float32, rows per matrix)``, as llama-quantize looks them up (by the tensor's
    name; the size must be ne[0] * ne[2], else an error, except token_embd.weight, then quantized without
    weights).  Tensors without an entry are quantized without weights, as llama-quantize does (``report``
    says which).  An imatrix none of whose entries names a tensor of the model is refused."""
    names = set(model_tensors)
    if weights and not names & set(weights):
        example = next(iter(weights))
        raise HalfbyteError(f"{imatrix_path}: none of its {len(weights)} entries (e.g. {example}) is a tensor of "
                            f"{model_path}: an importance matrix of another model?")
    found: dict[str, tuple[np.ndarray, int]] = {}
    missing = []
    for info, new_type in plan:
        if new_type == info.ggml_type:
            continue
        values = weights.get(info.name)
        if values is None:
            missing.append(info.name)
            continue
        ne = info.ne
        n = int(ne[0])
        n_mat = int(ne[2]) if len(ne) > 2 else 1
        if len(values) != n * n_mat:
            if info.name in TOKEN_EMBEDDINGS:
                if report is not None:
                    report(f"imatrix size {len(values)} is different from tensor size {n * n_mat} for {info.name}: "
                           "quantized without importance weights")
                continue
            raise HalfbyteError(f"{imatrix_path}: imatrix size {len(values)} is different from tensor size "
                                f"{n * n_mat} for {info.name} of {model_path}: an importance matrix of another model?")
        found[info.name] = (values.reshape(n_mat, n), int(ne[1]) if len(ne) > 1 else 1)
    if missing and report is not None:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        report(f"no importance weights for {shown} in {imatrix_path}: quantized without, as llama-quantize does")
    return found


def quantize_metadata(imatrix: Imatrix, weights: dict[str, np.ndarray], imatrix_path: str | os.PathLike,
                      ) -> list[tuple[str, object, GGUFValueType]]:
    """The keys llama-quantize adds after general.file_type when it quantizes with an imatrix (strings cut
    to 127 bytes as it does): the file as given, its first dataset, the entry count, the chunk count."""
    keys: list[tuple[str, object, GGUFValueType]] = [
        ("quantize.imatrix.file", os.fsencode(imatrix_path)[:127], GGUFValueType.STRING)]
    if imatrix.datasets:
        keys.append(("quantize.imatrix.dataset", imatrix.datasets[0].encode("utf-8", "surrogateescape")[:127],
                     GGUFValueType.STRING))
    keys.append(("quantize.imatrix.entries_count", len(weights), GGUFValueType.UINT32))
    if imatrix.chunk_count > 0:
        keys.append(("quantize.imatrix.chunks_count", int(imatrix.chunk_count), GGUFValueType.UINT32))
    return keys
