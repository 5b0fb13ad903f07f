"""Train a LoRA adapter for halfbyte's demo model: King James English -> World English Bible English.

The demo model (engine/data/demo-kjv-q8_0.gguf, trained by train.py on the KJV) learns the style of
the World English Bible (WEB, a public-domain modern-English translation: "you" for "thou", "to" for
"unto", "Yahweh" for "the LORD") from a small PEFT LoRA adapter. Steps (each cached in --work, so a
rerun resumes where it stopped):

  1. corpus  -- the WEB from Debian's `sword-text-web` package, read with `diatheke` (package
                `diatheke`): the 66 books the KJV has (Genesis-Malachi, Matthew-Revelation; the
                module's deuterocanon is left out), one paragraph per chapter, so chapter i is the
                same chapter as in train.py's KJV corpus; every 40th chapter is held out (the same
                30 chapters as heldout.txt), written to bench/demo_model/heldout-web.txt.
                Markup is dropped, words the module glues together ("<w>God</w><w>created</w>") get
                their space back, psalm titles and the glossary after Revelation 22:21 are left out (the
                KJV text has neither) and typographic quotes become ASCII ' and " (the KJV
                tokenizer has no pieces for them, so each would cost 3 byte tokens).
  2. base    -- the shipped GGUF as a Hugging Face checkpoint for PEFT (transformers dequantizes the
                Q8_0 blocks and un-permutes Q/K), saved as config.json + model.safetensors, with a
                tokenizer.model rebuilt from the GGUF's vocabulary. Checked: `halfbyte convert` of it to
                F32 gives back the GGUF's vocabulary and exactly the dequantized Q8_0 tensors, and its
                logits match halfbyte's on the F32 file (and, within Q8_0's activation rounding, on
                the shipped file).
  3. adapter -- peft LoRA (rank 8, alpha 16) on q/k/v/o/gate/up/down of every layer, trained with torch
                on the CPU, fixed seed, on the WEB training chapters tokenized by halfbyte's own
                tokenizer (so ids are the GGUF's). A wall-clock budget (--minutes, the learning-rate
                schedule following wall time as in train.py) or a step count (--steps, machine-independent).
  4. convert -- `halfbyte convert ADAPTER --base BASE --f16` writes llama.cpp's LoRA GGUF, copied to
                bench/demo_model/web-lora.gguf.
  5. measure -- perplexity (engine.perplexity, the statistic of `halfbyte perplexity -c 256`) of the
                demo model with and without the adapter on both held-out texts, and one greedy
                generation with and without it (`halfbyte run ... --temp 0`), commands printed.

    apt-get install sword-text-web diatheke
    python bench/demo_model/train_lora.py --work /tmp/web-lora --minutes 8

Needs the test extra (torch, transformers, peft, gguf). Not run by CI: the result is committed.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
DEMO = REPO / "engine" / "data" / "demo-kjv-q8_0.gguf"
HELD_OUT_EVERY = 40  # as train.py: chapter index % 40 == 0 -> held out
KJV_CHAPTERS = 1189
MODULE = "engWEB2015eb"  # sword-text-web's module: "World English Bible with Deuterocanon"
RANGES = ("Gen 1:1-Mal 4:6", "Matt 1:1-Rev 22:21")  # the KJV's 66 books, in the KJV's order
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 8, 16
SEQ_LEN, BATCH = 256, 8
PROMPT = "And the LORD spake unto Moses, saying,"

# "Genesis 1:1: ", "I Samuel 3:1: ", "Song of Solomon 2:1: ", "Revelation of John 22:21: "
VERSE_KEY = re.compile(r"((?:I|II|III|IV) )?([A-Z][a-z]+(?: of [A-Z][a-z]+)?) (\d+):(\d+): ")
GLOSSARY = "The following words used in the World English Bible"
QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"'})


def verse_text(osis: str) -> str:
    # The module drops the space between some words ("<w>God</w><w>created</w>", "wise men<w>from</w>").
    text = re.sub(r"(?<=\w)<w>", " <w>", osis.replace("</w><w>", "</w> <w>"))
    text = re.sub(r"</w>(?=\w)", "</w> ", text)
    text = re.sub(r"<[^>]*>", " ", re.sub(r"</?w>", "", text))  # words are marked up, line breaks are tags
    return " ".join(text.translate(QUOTES).split())


def web_chapters() -> list[str]:
    """Every chapter of the WEB's 66 KJV books as one paragraph of prose (verse numbers dropped)."""
    if shutil.which("diatheke") is None:
        sys.exit("train_lora.py: `diatheke` is missing; run `apt-get install sword-text-web diatheke`")
    chapters: dict[tuple[str, int], list[str]] = {}
    for key_range in RANGES:
        raw = subprocess.run(["diatheke", "-b", MODULE, "-f", "OSIS", "-k", key_range], stdin=subprocess.DEVNULL,
                             capture_output=True, text=True, check=True).stdout
        if not raw.strip() or "(" + MODULE + ")" not in raw:
            sys.exit(f"train_lora.py: diatheke printed no {MODULE} text; run `apt-get install sword-text-web`")
        for line in raw.splitlines():
            if not line.strip() or line.strip() == f"({MODULE})":
                continue
            match = VERSE_KEY.search(line)  # what precedes the key is a (repeated) psalm title: dropped
            if match is None:
                sys.exit(f"train_lora.py: unexpected diatheke line {line[:80]!r}")
            book = (match.group(1) or "") + match.group(2)
            text = line[match.end():].split(GLOSSARY)[0]
            verses = chapters.setdefault((book, int(match.group(3))), [])
            if int(match.group(4)) != len(verses) + 1:
                sys.exit(f"train_lora.py: {book} {match.group(3)}:{match.group(4)} out of order")
            verses.append(verse_text(text))
    if len(chapters) != KJV_CHAPTERS:
        sys.exit(f"train_lora.py: {len(chapters)} chapters, expected the KJV's {KJV_CHAPTERS}")
    return [" ".join(v for v in verses if v) for verses in chapters.values()]


def prepare_corpus(work: Path) -> tuple[Path, Path]:
    train_path, heldout_path = work / "web-train.txt", work / "web-heldout.txt"
    if not train_path.exists():
        chapters = web_chapters()
        train = [c for i, c in enumerate(chapters) if i % HELD_OUT_EVERY != 0]
        heldout = [c for i, c in enumerate(chapters) if i % HELD_OUT_EVERY == 0]
        heldout_path.write_text("\n\n".join(heldout) + "\n", encoding="utf-8")
        train_path.write_text("\n".join(train) + "\n", encoding="utf-8")
        print(f"corpus: {len(train)} training chapters, {len(heldout)} held out")
    shutil.copy(heldout_path, HERE / "heldout-web.txt")
    return train_path, heldout_path


def halfbyte(*args: str, capture: bool = False) -> str:
    command = [sys.executable, "-m", "engine", *args]
    print("$ halfbyte " + shlex.join(args), flush=True)
    done = subprocess.run(command, check=True, text=True, stdout=subprocess.PIPE if capture else None,
                          stderr=subprocess.DEVNULL if capture else None)
    return done.stdout if capture else ""


def write_tokenizer(directory: Path) -> None:
    """tokenizer.model (and train.py's tokenizer_config.json) rebuilt from the GGUF's vocabulary, so the
    base directory is a complete checkpoint that `halfbyte convert` takes."""
    from sentencepiece import sentencepiece_model_pb2 as sp_model

    from engine.gguf_file import GGUFFile

    with GGUFFile(DEMO) as file:
        tokens = file.require("tokenizer.ggml.tokens")
        scores = [float(s) for s in file.require("tokenizer.ggml.scores")]
        types = [int(t) for t in file.require("tokenizer.ggml.token_type")]  # gguf's types are SentencePiece's
        add_space_prefix = bool(file.get("tokenizer.ggml.add_space_prefix", True))
    proto = sp_model.ModelProto()
    for piece, score, kind in zip(tokens, scores, types, strict=True):
        proto.pieces.add(piece=piece, score=score, type=kind)
    trainer = proto.trainer_spec  # as train.py trained it
    trainer.model_type = sp_model.TrainerSpec.BPE
    trainer.vocab_size = len(tokens)
    trainer.byte_fallback = True
    trainer.split_digits = True
    trainer.unk_id, trainer.bos_id, trainer.eos_id, trainer.pad_id = 0, 1, 2, -1
    normalizer = proto.normalizer_spec
    normalizer.name = "identity"
    normalizer.add_dummy_prefix = add_space_prefix
    normalizer.remove_extra_whitespaces = False
    normalizer.escape_whitespaces = True
    (directory / "tokenizer.model").write_bytes(proto.SerializeToString())
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"add_bos_token": True, "add_eos_token": False, "tokenizer_class": "LlamaTokenizer"})
    )


def build_base(work: Path) -> Path:
    """The shipped GGUF as an HF checkpoint (F32), checked against halfbyte on the same weights."""
    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    base_dir = work / "base"
    if (base_dir / "model.safetensors").exists():
        return base_dir
    loaded = LlamaForCausalLM.from_pretrained(DEMO.parent, gguf_file=DEMO.name, dtype=torch.float32)
    settings = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
        settings.pop(key, None)
    model = LlamaForCausalLM(LlamaConfig(**settings))
    model.load_state_dict(loaded.state_dict())
    model.eval()
    tmp = work / "base.tmp"
    model.save_pretrained(tmp, safe_serialization=True)
    write_tokenizer(tmp)

    # The weights: convert it back to F32 with halfbyte and compare with the shipped file's blocks.
    from engine.gguf_file import GGUFFile
    from engine.model import Model
    from engine.quants import dequantize

    f32 = work / "base-f32.gguf"
    halfbyte("convert", str(tmp), "--f32", "-o", str(f32))
    worst = 0.0
    with GGUFFile(DEMO) as shipped, GGUFFile(f32) as rebuilt:
        for key in {k for k in (*shipped.metadata, *rebuilt.metadata) if k.startswith("tokenizer.")}:
            ours, theirs = shipped.get(key), rebuilt.get(key)
            if not np.array_equal(np.asarray(ours, dtype=object), np.asarray(theirs, dtype=object)):
                sys.exit(f"train_lora.py: the rebuilt tokenizer.model gives another {key}")
        for name, info in shipped.tensors.items():
            ours = np.asarray(dequantize(shipped.tensor_bytes(name), info.ggml_type)).reshape(-1)
            theirs = np.asarray(rebuilt.tensor_array(name), dtype=np.float32).reshape(-1)
            worst = max(worst, float(np.abs(ours - theirs).max()))
    print(f"base: {len(model.state_dict())} tensors; halfbyte convert --f32 of it against the shipped Q8_0 "
          f"blocks dequantized: max |difference| {worst:g}")
    # The logits: transformers on the checkpoint against halfbyte on the F32 and the shipped Q8_0 file.
    text = (HERE / "heldout.txt").read_text(encoding="utf-8")[:2000]
    demo = Model.load(DEMO, n_ctx=SEQ_LEN, threads=2)
    ids = demo.tokenize(text)[:SEQ_LEN]
    with torch.no_grad():
        reference = model(torch.tensor([ids])).logits[0].numpy()
    for path in (f32, DEMO):
        hb = Model.load(path, n_ctx=SEQ_LEN, threads=2, kv_type="f32")  # (the default F16 cache rounds more)
        got = np.asarray(hb.eval(ids))
        agree = float((got.argmax(1) == reference.argmax(1)).mean())
        print(f"base: next-token logits over {len(ids)} tokens, transformers against halfbyte on {path.name} "
              f"(F32 KV cache): "
              f"max |difference| {np.abs(got - reference).max():.3g} (logits up to {np.abs(reference).max():.1f}), "
              f"same argmax at {agree:.1%} of positions")
        hb.close()
    demo.close()
    tmp.rename(base_dir)
    return base_dir


def tokenized(work: Path, train_path: Path):
    import numpy as np

    cache = work / "web-train-ids.npy"
    if not cache.exists():
        from engine.model import Model

        model = Model.load(DEMO, threads=2)
        eos = model.tokenizer.eos_id
        ids: list[int] = []
        for chapter in train_path.read_text(encoding="utf-8").splitlines():
            ids += [*model.tokenize(chapter), eos]  # BOS (the model adds it), the chapter, EOS: as train.py
        np.save(cache, np.array(ids, dtype=np.int64))
        model.close()
    return np.load(cache)


def train_adapter(work: Path, base_dir: Path, train_path: Path, minutes: float, steps: int, seed: int,
                  peak_lr: float) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    out_dir = work / "adapter"
    if (out_dir / "adapter_model.safetensors").exists():
        return out_dir
    data = torch.from_numpy(tokenized(work, train_path))
    print(f"training tokens: {len(data):,}")
    torch.manual_seed(seed)
    random.seed(seed)
    base = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, bias="none",
                                            target_modules=TARGETS, task_type="CAUSAL_LM"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    print(f"trainable parameters: {sum(p.numel() for p in trainable):,} "
          f"of {sum(p.numel() for p in model.parameters()):,}")
    optimizer = torch.optim.AdamW(trainable, lr=peak_lr, betas=(0.9, 0.95), weight_decay=0.0)
    budget = minutes * 60.0
    warmup = 20
    start = time.monotonic()
    step = 0
    model.train()
    while True:
        elapsed = time.monotonic() - start
        if (steps and step >= steps) or (not steps and elapsed > budget):
            break
        progress = step / steps if steps else elapsed / budget  # ends on time (or on the step count)
        lr = peak_lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(data) - SEQ_LEN - 1, (BATCH,))
        x = torch.stack([data[s : s + SEQ_LEN] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        if step % 20 == 0:
            print(f"step {step:5d}  {elapsed / 60:5.1f} min  lr {lr:.2e}  loss {loss.item():.3f}", flush=True)
        step += 1
    elapsed = time.monotonic() - start
    model.eval()
    tmp = work / "adapter.tmp"
    model.save_pretrained(tmp, safe_serialization=True)
    (tmp / "training.json").write_text(json.dumps(
        {"steps": step, "minutes": round(elapsed / 60, 2), "seed": seed, "peak_lr": peak_lr, "rank": RANK,
         "alpha": ALPHA, "batch": BATCH, "seq_len": SEQ_LEN, "tokens_seen": step * BATCH * SEQ_LEN}, indent=1))
    tmp.rename(out_dir)
    print(f"saved {out_dir} after {step} steps, {elapsed / 60:.1f} minutes "
          f"(--steps {step}: as many steps, on a schedule that does not depend on the machine's speed)")
    return out_dir


def measure(adapter: Path, heldout_web: Path) -> None:
    from engine.model import Model
    from engine.perplexity import perplexity

    rel = lambda p: str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(p)  # noqa: E731
    texts = {"KJV held-out": HERE / "heldout.txt", "WEB held-out": heldout_web}
    print("\nperplexity, -c 256 (engine.perplexity, the statistic of `halfbyte perplexity`):")
    for label, lora in (("base", ()), ("+adapter", ((str(adapter), 1.0),))):
        model = Model.load(DEMO, n_ctx=256, threads=2, lora=lora)
        for name, path in texts.items():
            result = perplexity(model, path.read_text(encoding="utf-8"), n_ctx=256)
            if lora:  # `halfbyte perplexity` takes no --lora: the same statistic through the library
                command = ("python -c 'from engine import Model; from engine.perplexity import perplexity; "
                           f'm = Model.load("{rel(DEMO)}", n_ctx=256, lora=["{rel(adapter)}"]); '
                           f'print(perplexity(m, open("{rel(path)}").read(), n_ctx=256).ppl)\'')
            else:
                command = f"halfbyte perplexity -f {rel(path)} -c 256"
            print(f"  {label:9s} {name}: PPL = {result.ppl:.4f} +/- {result.ppl_error:.4f} "
                  f"({result.n_chunks} chunks, {result.tokens_scored} tokens)\n      $ {command}")
        model.close()
    print("\ngreedy generation:")
    for extra in ((), ("--lora", rel(adapter))):
        out = halfbyte("run", *extra, "-p", PROMPT, "-n", "40", "--temp", "0", "-s", "1", capture=True)
        print(out.rstrip("\n"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/halfbyte-web-lora"))
    parser.add_argument("--minutes", type=float, default=8.0, help="wall-clock training budget")
    parser.add_argument("--steps", type=int, default=0, help="train this many steps instead (0: --minutes)")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    train_path, _ = prepare_corpus(args.work)
    base_dir = build_base(args.work)
    adapter_dir = train_adapter(args.work, base_dir, train_path, args.minutes, args.steps, args.seed, args.lr)
    gguf = args.work / "web-lora-f16.gguf"
    if not gguf.exists():
        halfbyte("convert", str(adapter_dir), "--base", str(base_dir), "--f16", "-o", str(gguf))
    target = HERE / "web-lora.gguf"
    shutil.copy(gguf, target)
    print(f"wrote {target} ({target.stat().st_size / 1e6:.2f} MB)")
    measure(target, HERE / "heldout-web.txt")


if __name__ == "__main__":
    main()
