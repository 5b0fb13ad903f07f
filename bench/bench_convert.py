"""Converter speed and memory: `halfbyte convert DIR --q4_0` vs llama.cpp's two steps, one run.

    python bench/bench_convert.py --work /tmp/convert-bench \
        --llama-cpp /path/to/llama.cpp --llama-quantize /path/to/llama.cpp/build/bin/llama-quantize

The checkpoint is made here with transformers: random weights with TinyLlama-1.1B's shapes,
saved as fp16 safetensors (2.2 GB) with the LLaMA-2 tokenizer from ../shared/fixtures.
Measured per tool: wall time and peak RSS (of the process tree's largest process, from wait4).
llama.cpp = `convert_hf_to_gguf.py --outtype f16` then `llama-quantize F16 OUT q4_0`; it is
skipped when the paths are not given. Afterwards the two Q4_0 files are compared tensor by
tensor (same name, type and bytes).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO.parent / "shared" / "fixtures" / "llama2-tokenizer.model"

TINYLLAMA = dict(
    vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
    num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0,
    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
)


def make_checkpoint(directory: Path, tokenizer: Path) -> Path:
    if (directory / "config.json").exists():
        return directory
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    print(f"making a TinyLlama-shape fp16 checkpoint in {directory} ...", file=sys.stderr)
    torch.manual_seed(0)
    config = LlamaConfig(**TINYLLAMA)
    with torch.no_grad():
        model = LlamaForCausalLM(config).to(torch.float16)
    tmp = directory.with_name(directory.name + ".partial")
    model.save_pretrained(tmp, safe_serialization=True)
    shutil.copy(tokenizer, tmp / "tokenizer.model")
    tmp.rename(directory)
    return directory


def timed(command: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of one command."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    stderr = process.stderr.read().decode(errors="replace") if process.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{command[0]} failed:\n{stderr[-2000:]}")
    return wall, usage.ru_maxrss * 1024


def compare_files(ours: Path, theirs: Path) -> str:
    from engine.gguf_file import GGUFFile

    with GGUFFile(ours) as a, GGUFFile(theirs) as b:
        same = differ = 0
        notes = []
        for name, info in a.tensors.items():
            other = b.tensors.get(name)
            if other is None:
                notes.append(f"{name} missing in llama.cpp's file")
                continue
            if info.ggml_type == other.ggml_type and bytes(a.tensor_bytes(name)) == bytes(b.tensor_bytes(name)):
                same += 1
            else:
                differ += 1
                notes.append(f"{name}: ours {info.ggml_type.name}, llama.cpp {other.ggml_type.name}")
    return f"{same} tensors byte-identical, {differ} differ" + (": " + "; ".join(notes[:4]) if notes else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/halfbyte-convert-bench"))
    parser.add_argument("--tokenizer", type=Path, default=TOKENIZER)
    parser.add_argument("--llama-cpp", type=Path, help="a llama.cpp checkout (for convert_hf_to_gguf.py)")
    parser.add_argument("--llama-quantize", type=Path, help="the llama-quantize binary")
    parser.add_argument("--make-checkpoint-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    checkpoint = args.work / "tinyllama-fp16"
    if args.make_checkpoint_only:
        make_checkpoint(checkpoint, args.tokenizer)
        return
    # In a child process: Linux counts a child's peak RSS from its parent's size at fork, so a
    # parent holding torch and the 2.2 GB model would inflate every measurement below.
    subprocess.run([sys.executable, __file__, "--make-checkpoint-only", "--work", str(args.work),
                    "--tokenizer", str(args.tokenizer)], check=True)
    size = sum(f.stat().st_size for f in checkpoint.glob("*.safetensors"))
    rows = []

    ours = args.work / "halfbyte-q4_0.gguf"
    wall, rss = timed([sys.executable, "-m", "engine", "convert", str(checkpoint), "--q4_0", "-q", "-o", str(ours)])
    rows.append(("halfbyte convert --q4_0", wall, rss))

    theirs = None
    if args.llama_cpp and args.llama_quantize:
        f16 = args.work / "llama.cpp-f16.gguf"
        theirs = args.work / "llama.cpp-q4_0.gguf"
        wall1, rss1 = timed([sys.executable, str(args.llama_cpp / "convert_hf_to_gguf.py"), str(checkpoint),
                             "--outtype", "f16", "--outfile", str(f16)])
        wall2, rss2 = timed([str(args.llama_quantize), str(f16), str(theirs), "q4_0"])
        rows.append(("llama.cpp convert_hf_to_gguf.py --outtype f16", wall1, rss1))
        rows.append(("llama.cpp llama-quantize q4_0", wall2, rss2))
        rows.append(("llama.cpp total", wall1 + wall2, max(rss1, rss2)))

    print(f"checkpoint: TinyLlama-1.1B shapes, fp16 safetensors, {size / 1e9:.2f} GB\n")
    print("| tool | wall s | peak RSS MB |\n| --- | ---: | ---: |")
    for name, wall, rss in rows:
        print(f"| {name} | {wall:.1f} | {rss / 1e6:.0f} |")
    if theirs is not None:
        print("\n" + compare_files(ours, theirs))


if __name__ == "__main__":
    main()
