"""Host (Python + autograd) overhead of one training step, on a model whose arithmetic is negligible.

    python bench/host_overhead.py            # table: stock vs patched, with and without recompute
    python bench/host_overhead.py --profile  # cProfile of the patched step with recompute, top 20 by self time

A 28-layer Qwen2 with hidden 64 and 8 tokens: what remains is the cost of Python, autograd and PEFT plumbing per
layer, which on a GPU decides whether the device waits for the host (bench/NOTES.md). Runs on the CPU.
"""
import argparse
import cProfile
import pstats
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import make_tiny_model  # noqa: E402

from turbotune import FastModel  # noqa: E402
from turbotune.model.default_model import default_model_dir  # noqa: E402


def build(folder, patch, checkpointing):
    m, _ = FastModel.from_pretrained(str(folder), patch=patch, verbose=False)
    m = FastModel.get_peft_model(m, r=4, use_gradient_checkpointing=checkpointing, verbose=False)
    m.train()
    return m


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(default_model_dir()))
    folder = make_tiny_model(tempfile.mkdtemp(), tok, "qwen2", num_hidden_layers=28, vocab_size=512,
                             tie_word_embeddings=True)
    ids = torch.randint(0, 512, (1, 8))
    step = lambda m: m(input_ids=ids, labels=ids).loss.backward()  # noqa: E731
    if args.profile:
        m = build(folder, True, True)
        for _ in range(3):
            step(m)
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(5):
            step(m)
        pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(20)
        return
    for patch in (False, True):
        for gc in (False, True):
            m = build(folder, patch, gc)
            for _ in range(3):
                step(m)
            t = time.perf_counter()
            for _ in range(args.steps):
                step(m)
            print(f"patch={patch!s:5} checkpointing={gc!s:5} {1000 * (time.perf_counter() - t) / args.steps:7.1f} ms "
                  "per fwd+bwd")


if __name__ == "__main__":
    main()
