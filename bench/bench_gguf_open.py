"""How long does opening a GGUF file take, and how much memory does it cost, as files grow?

Opening maps the file and parses only the header (metadata + tensor infos); tensor data
is never read, so open time and RSS growth should be flat from 10 MB to 4 GB.  Each file
carries the full tokenizer of llama.cpp's llama-spm vocab fixture (32000 tokens, scores,
token types), because parsing the vocabulary is what an open actually spends time on.

Files are written into a temporary directory and deleted afterwards:

* 10 MiB and 1 GiB: real bytes (random, written and fsync'ed by ``GGUFWriter``);
* 4 GiB: a *sparse* file (the header is real, the tensor data is a hole), to keep the
  benchmark fast and light on disk.  Opening does not read tensor data, so a hole and
  real bytes cost the same here.

Tensors are laid out like a LLaMA-7B Q4_0 model (4096-wide attention, 11008-wide FFN, F32
norms), as many layers as fit the target size.

Run: ``python bench/bench_gguf_open.py [--repeats N] [--dir PARENT]``
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as QT

from engine.gguf_file import GGUFFile, GGUFWriter, tensor_nbytes

REPO = Path(__file__).resolve().parents[1]
VOCAB_FIXTURE = REPO.parent / "shared" / "fixtures" / "vocab" / "ggml-vocab-llama-spm.gguf"

MiB = 2**20
GiB = 2**30
N_EMBD, N_FF = 4096, 11008  # LLaMA-7B


@dataclass(frozen=True)
class BenchFile:
    label: str
    target_bytes: int
    sparse: bool


BENCH_FILES = [
    BenchFile("vocab only", 0, sparse=False),
    BenchFile("10 MiB", 10 * MiB, sparse=False),
    BenchFile("1 GiB", 1 * GiB, sparse=False),
    BenchFile("4 GiB", 4 * GiB, sparse=True),
]


def llama_tensor_specs() -> Iterator[tuple[str, tuple[int, ...], QT]]:
    """(name, numpy-order shape, type) of a LLaMA-style Q4_0 model, layer after layer, without end."""
    layer = 0
    while True:
        prefix = f"blk.{layer}"
        yield f"{prefix}.attn_norm.weight", (N_EMBD,), QT.F32
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            yield f"{prefix}.{name}.weight", (N_EMBD, N_EMBD), QT.Q4_0
        yield f"{prefix}.ffn_norm.weight", (N_EMBD,), QT.F32
        yield f"{prefix}.ffn_gate.weight", (N_FF, N_EMBD), QT.Q4_0
        yield f"{prefix}.ffn_up.weight", (N_FF, N_EMBD), QT.Q4_0
        yield f"{prefix}.ffn_down.weight", (N_EMBD, N_FF), QT.Q4_0
        layer += 1


def tensors_for(target_bytes: int) -> list[tuple[str, tuple[int, ...], QT, int]]:
    """Tensors, in order, while the total stays within ``target_bytes``."""
    tensors, total = [], 0
    if target_bytes == 0:
        return tensors
    for name, shape, ggml_type in llama_tensor_specs():
        nbytes = tensor_nbytes(ggml_type, shape)
        if total + nbytes > target_bytes:
            return tensors
        tensors.append((name, shape, ggml_type, nbytes))
        total += nbytes


class _SparseGGUFWriter(GGUFWriter):
    """Writes the real header, then extends the file over the tensor data as a hole."""

    def write_holes(self) -> None:
        self.write_header()
        data_bytes = sum(self._pad(nbytes) for *_, nbytes in self._tensors)
        self._out.truncate(self._out.tell() + data_bytes)
        self._out.seek(0, os.SEEK_END)
        self._next_tensor = len(self._tensors)


def write_bench_file(path: Path, spec: BenchFile, vocab: GGUFFile, random_bytes: np.ndarray) -> int:
    """Write one benchmark file; returns its number of tensors."""
    tensors = tensors_for(spec.target_bytes)
    writer_class = _SparseGGUFWriter if spec.sparse else GGUFWriter
    with writer_class(path) as writer:
        writer.copy_metadata(vocab)  # architecture, hyper-parameters and the whole tokenizer
        writer.add_string("general.name", f"halfbyte open benchmark ({spec.label})")
        for name, shape, ggml_type, _ in tensors:
            writer.add_tensor_info(name, shape, ggml_type)
        if spec.sparse:
            writer.write_holes()
        else:
            for name, _, _, nbytes in tensors:
                writer.write_tensor(name, random_bytes[:nbytes])
        writer.finish()
    return len(tensors)


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@dataclass
class OpenStats:
    open_seconds: float  # median GGUFFile() time
    open_and_views_seconds: float  # median time to open and make a view of every tensor
    rss_growth: int  # RSS after open + views of every tensor, minus before


def measure_open(path: Path, repeats: int) -> OpenStats:
    GGUFFile(path).close()  # warm the header pages into the page cache, as any second run would be
    open_times, with_views_times, growths = [], [], []
    for _ in range(repeats):
        rss_before = rss_bytes()
        start = time.perf_counter()
        gguf_file = GGUFFile(path)
        opened = time.perf_counter()
        views = [gguf_file.tensor_array(name) for name in gguf_file.tensors]
        done = time.perf_counter()
        growths.append(rss_bytes() - rss_before)
        open_times.append(opened - start)
        with_views_times.append(done - start)
        del views
        gguf_file.close()
    return OpenStats(statistics.median(open_times), statistics.median(with_views_times), max(growths))


def human(n: float) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="opens per file (median reported)")
    parser.add_argument("--dir", type=Path, default=None, help="parent of the temporary directory")
    args = parser.parse_args()

    work_dir = Path(tempfile.mkdtemp(prefix="halfbyte-bench-", dir=args.dir))
    rows = []
    try:
        # One buffer of random bytes, sliced for every tensor: real, incompressible data on disk.
        largest = tensor_nbytes(QT.Q4_0, (N_FF, N_EMBD))
        random_bytes = np.random.default_rng(0).integers(0, 256, size=largest, dtype=np.uint8)
        with GGUFFile(VOCAB_FIXTURE) as vocab:
            for spec in BENCH_FILES:
                path = work_dir / f"bench-{spec.label.replace(' ', '-')}.gguf"
                start = time.perf_counter()
                n_tensors = write_bench_file(path, spec, vocab, random_bytes)
                write_seconds = time.perf_counter() - start
                stats = measure_open(path, args.repeats)
                with GGUFFile(path) as written:
                    data_bytes = sum(info.nbytes for info in written.tensors.values())
                on_disk = path.stat().st_blocks * 512
                rows.append((spec, n_tensors, data_bytes, path.stat().st_size, on_disk, write_seconds, stats))
                path.unlink()  # keep at most one big file on disk at a time
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)

    print(f"GGUF open benchmark: median of {args.repeats} opens; every file holds the llama-spm tokenizer "
          "(32000 tokens)")
    header = (f"{'file':<15} {'tensors':>7} {'tensor data':>12} {'file size':>11} {'on disk':>11} {'write':>8} "
              f"{'open':>9} {'open+views':>11} {'RSS growth':>11}")
    print(header)
    print("-" * len(header))
    for spec, n_tensors, data_bytes, size, on_disk, write_seconds, stats in rows:
        label = spec.label + (" (sparse)" if spec.sparse else "")
        print(f"{label:<15} {n_tensors:>7} {human(data_bytes):>12} {human(size):>11} {human(on_disk):>11} "
              f"{write_seconds:>7.2f}s {stats.open_seconds * 1e3:>7.1f}ms {stats.open_and_views_seconds * 1e3:>9.1f}ms "
              f"{human(stats.rss_growth):>11}")


if __name__ == "__main__":
    main()
