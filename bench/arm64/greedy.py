"""Greedy token ids from a GGUF file, as one JSON line: the arm64 emulated check compares x86 and arm64.

    python bench/arm64/greedy.py MODEL.gguf N_TOKENS [LOGITS.npy]

Greedy = argmax of the logits at every step (temperature 0), through ``Model.eval`` so that the
prompt goes through the batched (prompt) kernels and every generated token through the
one-token ones. ``min_margin`` is the smallest gap between the best and second-best logit over
the run: a tiny gap would make the comparison fragile to rounding differences between kernels.
A random-weight model soon repeats one token, so ``prompt_argmax`` (the argmax after every prompt
position, from one batched pass) is compared too, and LOGITS.npy keeps those logits for a
numeric comparison.
"""

from __future__ import annotations

import json
import sys

import numpy as np

from engine import Model
from engine.kernels.matmul import kernel_description

PROMPT = "In the beginning God created the heaven and the earth."


def greedy(path: str, n_tokens: int, logits_path: str | None = None) -> dict:
    model = Model.load(path, threads=1)
    prompt = model.tokenize(PROMPT, add_bos=True)
    all_logits = model.eval(prompt)
    if logits_path:
        np.save(logits_path, all_logits)
    logits = all_logits[-1]
    out: list[int] = []
    margins: list[float] = []
    for _ in range(n_tokens):
        top2 = np.sort(logits)[-2:]
        margins.append(float(top2[1] - top2[0]))
        token = int(np.argmax(logits))
        out.append(token)
        logits = model.eval([token], last_only=True)[-1]
    return {"model": path, "kernels": kernel_description(), "prompt_tokens": len(prompt),
            "prompt_argmax": [int(t) for t in all_logits.argmax(axis=1)], "tokens": out,
            "min_margin": round(min(margins), 5)}


if __name__ == "__main__":
    print(json.dumps(greedy(sys.argv[1], int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else None)))
