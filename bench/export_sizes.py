"""File size and logit error of each GGUF type for the embedded demo model (SmolLM2-135M-Instruct), on the CPU.

    python bench/export_sizes.py [--steps 5] [--types f16,bf16,q8_0,q5_1,q5_0,q4_1,q4_0]

Trains the demo adapter for a few steps (`turbotune train` on the packaged sample), merges it (fp32, the
reference), exports one GGUF per type, reads each back with transformers' GGUF loader and compares the logits of
a fixed chat prompt with the merged model's: the largest absolute difference, its share of the largest logit,
and whether the greedy next 20 tokens are the same. Prints a markdown table (README's export section quotes it).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--types", default="f16,bf16,q8_0,q5_1,q5_0,q4_1,q4_0")
    args = ap.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from turbotune.cli.train import run_training
    from turbotune.export.export import export
    from turbotune.training.config import TrainConfig

    with tempfile.TemporaryDirectory() as tmp:
        run, _, _ = run_training(TrainConfig(output_dir=f"{tmp}/run", max_steps=args.steps, overwrite=True))
        adapter = run.last_checkpoint
        merged_dir = export(adapter, f"{tmp}/merged", how="merged", dtype="fp32")
        tok = AutoTokenizer.from_pretrained(merged_dir)
        prompt = tok.apply_chat_template([{"role": "user", "content": "Write a tagline for a bakery."}],
                                         add_generation_prompt=True, return_tensors="pt", return_dict=True)
        ids = prompt["input_ids"]
        ref_model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
        ref, ref_gen = _logits_and_greedy(ref_model, ids)
        rows = []
        for q in args.types.split(","):
            t0 = time.perf_counter()
            folder = export(adapter, f"{tmp}/gguf-{q}", how="gguf", quant=q)
            seconds = time.perf_counter() - t0
            name = f"model-{q}.gguf"
            size = os.path.getsize(os.path.join(folder, name))
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
            got, gen = _logits_and_greedy(model, ids)
            diff = (got - ref).abs().max().item()
            same = sum(a == b for a, b in zip(gen, ref_gen))
            rows.append((q, size, diff, diff / ref.abs().max().item(), same, len(ref_gen), seconds))
    print("| type | file size | max abs logit diff | share of the largest logit | greedy tokens as merged | export s |")
    print("|---|---:|---:|---:|---:|---:|")
    for q, size, diff, rel, same, n, seconds in rows:
        print(f"| {q.upper()} | {size / 2**20:.1f} MiB | {diff:.4f} | {rel:.2%} | {same} of {n} | {seconds:.0f} |")


def _logits_and_greedy(model, ids, n=20):
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
        out = model.generate(input_ids=ids, max_new_tokens=n, do_sample=False, min_new_tokens=n)
    return logits, out[0, ids.shape[1]:].tolist()


if __name__ == "__main__":
    main()
