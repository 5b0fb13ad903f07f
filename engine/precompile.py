"""Compiling the kernels before the first run, on the machine that will run them.

Numba compiles a kernel the first time it is called and keeps the machine code in its on-disk
cache: the ``__pycache__`` beside the kernel's source, keyed by the source's hash and the CPU
(name and features). Without this module the first ``halfbyte run`` of the demo model compiled for
5.5-7 s, and each new file type added 3-9 s more.

``pip install`` builds halfbyte's wheel on the installing machine; the build step (setup.py) runs
this module there, so the cache it fills travels in the wheel and every later process loads the
kernels instead of compiling them. It compiles by running the real code, so every kernel gets the
signature a real run asks for: the embedded demo model generating (the batch and one-token
products, the attention tiles, the compiled decode step), attention over a long context and over
f32 and q8_0 caches, and for each file type ``halfbyte quantize`` writes, a tiny random model of
that type quantized, prompted (short and long batches) and stepped.

A wheel built on another CPU carries entries for that CPU only: they miss, and the kernels
compile on first use as without it. ``HALFBYTE_PRECOMPILE=0`` skips it at build time;
``halfbyte precompile`` runs it again (after moving to another CPU, say).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

# The file types a tiny model is made of, in two groups that share few kernels (the K-quants and
# IQ4 types; the legacy and float types), each about half of the products' compiling.
FILE_TYPE_GROUPS: tuple[tuple[str, ...], ...] = (
    ("q4_k_m", "q5_k_m", "q6_k", "q3_k_m", "q2_k", "iq4_xs", "iq4_nl"),
    ("q4_1", "q5_0", "q5_1", "q4_0", "q8_0", "f16", "bf16", "f32"),
)
FILE_TYPES: tuple[str, ...] = tuple(t for group in FILE_TYPE_GROUPS for t in group)

_TINY_SOURCE = "source-q4_0.gguf"
_LONG_PROMPT = 1040  # past attention's lane threshold (1024 keys), where the transposed-key tile runs


def write_tiny_source(directory: Path) -> Path:
    """A tiny random Q4_0 model (written with numpy: nothing compiles)."""
    from converters.synthetic import LlamaShape, write_synthetic

    source = directory / _TINY_SOURCE
    if not source.exists():
        # rows of 256 (the K-quants' super-block), 4 query heads per KV head (the lane tile's
        # condition), head size 32 (a q8_0 cache's block), a context past the lane threshold
        shape = LlamaShape(n_vocab=512, n_embd=256, n_layer=1, n_head=8, n_head_kv=2, n_ff=512, n_ctx=2048)
        write_synthetic(source, shape, seed=1)
    return source


def write_tiny_files(directory: Path, file_types: Sequence[str]) -> None:
    """``halfbyte quantize``'s file of the tiny model per type (which compiles the quantizers)."""
    from engine.requantize import quantize_gguf

    source = write_tiny_source(directory)
    for file_type in file_types:
        target = directory / f"tiny-{file_type}.gguf"
        if not target.exists():
            quantize_gguf(source, target, file_type, progress=False, allow_requantize=True)


def _exercise(path: Path, kv_type: str = "f16", long_prompt: bool = False) -> None:
    """Prompt a model (a few tokens, then a batch of tiles) and step it (the compiled decode step);
    ``long_prompt``: then a prompt past attention's lane threshold."""
    from engine.model import Model

    with Model.load(path, n_ctx=_LONG_PROMPT + 8 if long_prompt else 128, kv_type=kv_type) as model:
        model.eval([1, 5, 9])
        model.eval(list(range(10, 77)))
        for token in (3, 4, 5):
            model.eval([token], last_only=True)
        if long_prompt:
            model.reset()
            model.eval([(7 * i) % 500 + 3 for i in range(_LONG_PROMPT)], last_only=True)


def exercise_demo() -> None:
    """The embedded demo model as ``halfbyte run`` drives it."""
    from engine.default_model import default_model_path
    from engine.model import Model

    with Model.load(default_model_path()) as model:
        model.generate("In the beginning", max_tokens=4, seed=1)
        model.generate("And", max_tokens=2, temperature=0.0)
    _exercise(default_model_path())


def exercise_attention(directory: Path) -> None:
    """Attention's other kernels, on the tiny model (they do not depend on the weights' type): a
    long context, f32 and q8_0 caches."""
    source = write_tiny_source(directory)
    _exercise(source, long_prompt=True)
    for kv_type in ("f32", "q8_0"):
        _exercise(source, kv_type)


def exercise_file_types(directory: Path, file_types: Sequence[str]) -> None:
    for file_type in file_types:
        _exercise(directory / f"tiny-{file_type}.gguf")


def _run_jobs(jobs: Sequence[tuple[list[str], bool]], workers: int) -> None:
    """Run each ``(arguments, needs the tiny files)`` job as a child ``python -m engine.precompile``,
    ``workers`` at a time, in order; a job that needs the tiny files waits for the ``--write`` job."""
    pending = list(jobs)
    running: dict[subprocess.Popen, list[str]] = {}
    files_written = False
    while pending or running:
        ready = [job for job in pending if files_written or not job[1]]
        while ready and len(running) < workers:
            job = ready.pop(0)
            pending.remove(job)
            running[subprocess.Popen([sys.executable, "-m", "engine.precompile", *job[0]])] = job[0]
        done = next((child for child in running if child.poll() is not None), None)
        if done is None:
            time.sleep(0.05)
            continue
        arguments = running.pop(done)
        if done.returncode != 0:
            for child in running:
                child.kill()
            raise RuntimeError(f"precompiling failed in: {' '.join(arguments)}")
        files_written = files_written or arguments[0] == "--write"


def precompile(file_types: Sequence[str] = FILE_TYPES, log: Callable[[str], None] | None = None,
               workers: int | None = None) -> float:
    """Compile (into Numba's on-disk cache) the kernels the demo model and files of ``file_types``
    run on, with ``workers`` processes (default: up to 2, as the cores allow). Returns the seconds
    the final pass (everything again, in this process) spent compiling: with workers, 0 unless two
    of them saved entries of one kernel at the same moment and one was lost."""
    from engine.jit_cache import compile_seconds
    from engine.threads import available_cores

    log = log or (lambda message: None)
    workers = workers or min(2, available_cores())
    start = time.perf_counter()
    # compiled here or by the workers below, not by the children the engine starts on its own
    previous = os.environ.get("HALFBYTE_BACKGROUND_COMPILE")
    os.environ["HALFBYTE_BACKGROUND_COMPILE"] = "0"
    try:
        with tempfile.TemporaryDirectory(prefix="halfbyte-precompile-") as tmp:
            folder = Path(tmp)
            groups = [[t for t in group if t in file_types] for group in FILE_TYPE_GROUPS]
            groups = [group for group in groups if group]
            if workers >= 2:
                # the demo's kernels (the shared ones: norms, attention, the decode step) beside the
                # quantizers; the file types' products once their tiny files are written
                _run_jobs([(["--demo"], False), (["--write", tmp, *file_types], False), (["--attention", tmp], False),
                           *((["--run", tmp, *group], True) for group in groups)], workers)
            compiled_before = compile_seconds()
            exercise_demo()
            exercise_attention(folder)
            write_tiny_files(folder, file_types)
            for group in groups:
                exercise_file_types(folder, group)
            final_pass = compile_seconds() - compiled_before
    finally:
        if previous is None:
            del os.environ["HALFBYTE_BACKGROUND_COMPILE"]
        else:
            os.environ["HALFBYTE_BACKGROUND_COMPILE"] = previous
    log(f"kernels compiled for this machine in {time.perf_counter() - start:.1f} s"
        + (f" ({final_pass:.2f} s of it compiling in the final pass)" if workers >= 2 else ""))
    return final_pass


def main(argv: Sequence[str]) -> int:
    """``python -m engine.precompile``: everything; ``--demo``, ``--attention DIR``, ``--write DIR
    TYPES...`` and ``--run DIR TYPES...`` are precompile's workers."""
    jobs: dict[str, Callable[[], None]] = {
        "--demo": exercise_demo,
        "--attention": lambda: exercise_attention(Path(argv[1])),
        "--write": lambda: write_tiny_files(Path(argv[1]), argv[2:]),
        "--run": lambda: exercise_file_types(Path(argv[1]), argv[2:]),
    }
    if argv and argv[0] in jobs:
        os.environ["HALFBYTE_BACKGROUND_COMPILE"] = "0"
        jobs[argv[0]]()
    else:
        precompile(log=lambda message: print(f"halfbyte precompile: {message}", file=sys.stderr, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
