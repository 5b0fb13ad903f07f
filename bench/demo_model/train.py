"""Train halfbyte's embedded demo model: a small LLaMA on the King James Bible.

Steps (each cached in --work, so a rerun resumes where it stopped):
  1. corpus   -- the KJV text from Debian's `bible-kjv` / `bible-kjv-text` packages (public domain
                 text, see README), one paragraph per chapter; every 40th chapter is held out.
  2. tokenizer -- a SentencePiece BPE model (byte fallback, like LLaMA's) trained on the training split.
  3. model    -- transformers' LlamaForCausalLM (GQA), trained with torch on the CPU, fixed seed.
  4. export   -- a Hugging Face checkpoint directory (config.json, model.safetensors, tokenizer.model),
                 then `halfbyte convert` writes the GGUF that ships in engine/data/.

    apt-get install bible-kjv            # provides /usr/bin/bible and the text
    python bench/demo_model/train.py --work /tmp/demo --minutes 75

`--shape k256` trains a second model, every row a multiple of 256 wide so K-quants apply (the README's
K-quant perplexity table), with the same corpus and tokenizer, written to --work instead of engine/data:

    python bench/demo_model/train.py --work /tmp/k256 --shape k256 --steps 1200 --threads 1 --type f32

Needs the test extra (torch, transformers). Not run by CI: the result is committed.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
HELD_OUT_EVERY = 40  # chapter index % 40 == 0 -> held-out split (about 30 chapters)

MODEL_SHAPE = {
    "vocab_size": 4096,
    "hidden_size": 288,
    "intermediate_size": 768,
    "num_hidden_layers": 6,
    "num_attention_heads": 6,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}
SHAPES = {"demo": MODEL_SHAPE, "k256": {**MODEL_SHAPE, "hidden_size": 256, "num_attention_heads": 4}}


def kjv_chapters() -> list[str]:
    """Every chapter of the KJV as one paragraph of prose (verse numbers dropped)."""
    if shutil.which("bible") is None:
        sys.exit("train.py: the `bible` program is missing; run `apt-get install bible-kjv`")
    raw = subprocess.run(
        ["bible", "-l0", "Gen1:1-Rev22:21"], stdin=subprocess.DEVNULL, capture_output=True, text=True, check=True
    ).stdout
    chapters: list[str] = []
    verses: list[str] = []
    for line in raw.splitlines():
        if not line.strip():
            continue
        match = re.match(r"^\s+(\d+)\s+(.*)$", line)  # verses are indented; headings ("1 Samuel 3") are not
        if match:
            verses.append(match.group(2))
        else:  # a chapter heading such as "Genesis 1"
            if verses:
                chapters.append(" ".join(verses))
            verses = []
    if verses:
        chapters.append(" ".join(verses))
    return chapters


def prepare_corpus(work: Path) -> tuple[Path, Path]:
    train_path, heldout_path = work / "train.txt", work / "heldout.txt"
    if not train_path.exists():
        chapters = kjv_chapters()
        train = [c for i, c in enumerate(chapters) if i % HELD_OUT_EVERY != 0]
        heldout = [c for i, c in enumerate(chapters) if i % HELD_OUT_EVERY == 0]
        train_path.write_text("\n".join(train) + "\n", encoding="utf-8")
        heldout_path.write_text("\n\n".join(heldout) + "\n", encoding="utf-8")
        print(f"corpus: {len(train)} training chapters, {len(heldout)} held out")
    return train_path, heldout_path


def train_tokenizer(work: Path, train_path: Path) -> Path:
    import sentencepiece as spm

    prefix = work / "tokenizer"
    if not (work / "tokenizer.model").exists():
        spm.SentencePieceTrainer.train(
            input=str(train_path),
            model_prefix=str(prefix),
            model_type="bpe",
            vocab_size=MODEL_SHAPE["vocab_size"],
            byte_fallback=True,
            split_digits=True,
            character_coverage=1.0,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=True,
            max_sentence_length=1 << 16,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            num_threads=2,
            minloglevel=2,
        )
    return work / "tokenizer.model"


def train_model(work: Path, train_path: Path, tokenizer_path: Path, minutes: float, seed: int,
                init_from: Path | None = None, out_name: str = "hf", peak_lr: float = 1e-3,
                shape: dict = MODEL_SHAPE, steps: int = 0) -> Path:
    import numpy as np
    import sentencepiece as spm
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir = work / out_name
    if (out_dir / "model.safetensors").exists():
        return out_dir
    torch.manual_seed(seed)
    random.seed(seed)
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    ids: list[int] = []
    for chapter in train_path.read_text(encoding="utf-8").splitlines():
        ids += [sp.bos_id(), *sp.encode(chapter), sp.eos_id()]
    data = torch.tensor(np.array(ids, dtype=np.int64))
    print(f"training tokens: {len(data):,}")

    if init_from is not None:  # a second stage: continue from an earlier run's weights
        model = LlamaForCausalLM.from_pretrained(init_from, dtype=torch.float32)
    else:
        config = LlamaConfig(**shape, bos_token_id=1, eos_token_id=2)
        model = LlamaForCausalLM(config)
    print(f"parameters: {sum(p.numel() for p in model.parameters()):,}")
    seq_len, batch = 256, 16
    optimizer = torch.optim.AdamW(model.parameters(), lr=peak_lr, betas=(0.9, 0.95), weight_decay=0.1)
    budget = minutes * 60.0
    warmup = 100
    start = time.monotonic()
    step = 0
    model.train()
    while True:
        elapsed = time.monotonic() - start
        if (steps and step >= steps) or (not steps and elapsed > budget):
            break
        progress = step / steps if steps else elapsed / budget  # the schedule follows wall time (or the step count)
        lr = peak_lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(data) - seq_len - 1, (batch,))
        x = torch.stack([data[s : s + seq_len] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 50 == 0:
            print(f"step {step:5d}  {elapsed / 60:5.1f} min  lr {lr:.2e}  loss {loss.item():.3f}", flush=True)
        step += 1
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    shutil.copy(tokenizer_path, out_dir / "tokenizer.model")
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps({"add_bos_token": True, "add_eos_token": False, "tokenizer_class": "LlamaTokenizer"})
    )
    print(f"saved {out_dir} after {step} steps, {(time.monotonic() - start) / 60:.1f} minutes")
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/halfbyte-demo"))
    parser.add_argument("--minutes", type=float, default=75.0, help="wall-clock training budget")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--type", default="q8_0", help="output type of the shipped file")
    parser.add_argument("--continue-minutes", type=float, default=0.0,
                        help="a second stage: continue from the first run's weights this long (peak lr 4e-4)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="demo",
                        help="k256: 256 wide (4 heads of 64), for K-quants; written to --work, not engine/data")
    parser.add_argument("--steps", type=int, default=0, help="train this many steps instead (0: --minutes)")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    train_path, heldout_path = prepare_corpus(args.work)
    tokenizer_path = train_tokenizer(args.work, train_path)
    hf_dir = train_model(args.work, train_path, tokenizer_path, args.minutes, args.seed,
                         shape=SHAPES[args.shape], steps=args.steps)
    if args.continue_minutes > 0:
        hf_dir = train_model(args.work, train_path, tokenizer_path, args.continue_minutes, args.seed + 1,
                             init_from=hf_dir, out_name="hf-stage2", peak_lr=4e-4)
    if args.shape != "demo":
        target = args.work / f"{args.shape}-{args.type}.gguf"
    else:
        target = REPO / "engine" / "data" / f"demo-kjv-{args.type}.gguf"
    target.parent.mkdir(exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "engine", "convert", str(hf_dir), f"--{args.type}", "-o", str(target)], check=True
    )
    if args.shape == "demo":
        shutil.copy(heldout_path, REPO / "bench" / "demo_model" / "heldout.txt")
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
