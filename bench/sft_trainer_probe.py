"""Probe for issue 16 (not the published bench): an unmodified TRL SFTTrainer on a preset's architecture (random
weights), one method per process, tokens/s over the steps after the warm-up (-P: bench/kernels.py must not
shadow the `kernels` package that bitsandbytes imports). Figures from here go to
bench/NOTES.md only; published ones come from `turbotune bench`.

    python -P bench/sft_trainer_probe.py --preset qwen2-1.5b --method turbotune [--qlora] [--lengths mixed]
        methods: stock (turbotune's loader, stock transformers + PEFT forwards), eager (turbotune, graphs off),
                 turbotune (the default)
"""
import argparse
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

import torch


def _tokenizer(folder: Path):
    """A stand-in tokenizer: the batches are token ids already; the collator only needs a pad id."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0, "<eos>": 1},
                                                                               unk_token="<pad>")),
                                  pad_token="<pad>", eos_token="<eos>")
    tok.save_pretrained(str(folder))
    return tok


def _lengths(kind: str, n: int, max_len: int, rng: random.Random) -> list[int]:
    if kind == "fixed":
        return [max_len] * n
    # long-tailed: median ~150, 90th percentile ~600, capped at max_len (lognormal, sigma 1.08)
    return [max(16, min(max_len, int(math.exp(rng.gauss(math.log(150), 1.08))))) for _ in range(n)]


def _report(prof, wall_s: float, path: str) -> None:
    from turbotune.bench_profile import _busy_us, _device_kernels
    busy = _busy_us(_device_kernels(prof)) / 1e6
    table = prof.key_averages()
    with open(path, "w") as f:
        f.write(f"two steps: wall {wall_s * 1e3:.0f} ms, GPU busy {busy * 1e3:.0f} ms ({100 * busy / wall_s:.0f}%)\n\n")
        f.write(table.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
        f.write("\n")
        f.write(table.table(sort_by="self_cuda_time_total", row_limit=20, max_name_column_width=60))
    print(f"profile: wall {wall_s * 1e3:.0f} ms, GPU busy {busy * 1e3:.0f} ms -> {path}", file=sys.stderr)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="qwen2-1.5b")
    ap.add_argument("--method", default="turbotune", choices=["stock", "eager", "turbotune"])
    ap.add_argument("--qlora", action="store_true")
    ap.add_argument("--lengths", default="fixed", choices=["fixed", "mixed"])
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--grad-accum", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--cache-dir", default="/tmp/bench-cache")
    ap.add_argument("--json", default=None)
    ap.add_argument("--profile", default=None, metavar="PATH",
                    help="torch.profiler over the last two steps: wall vs GPU-busy time and the top ops, to PATH")
    args = ap.parse_args()

    import datasets
    import trl
    from transformers import TrainerCallback

    from turbotune import FastModel
    from turbotune.bench_presets import build_preset_model
    from turbotune.trainer_step import trainer_step_of

    cuda = torch.cuda.is_available()  # the CPU only dry-runs this script
    folder = build_preset_model(args.preset, 0, Path(args.cache_dir), "cuda" if cuda else "cpu", log=lambda *a: None)
    tok_dir = Path(tempfile.mkdtemp())
    tok = _tokenizer(tok_dir)
    model, _ = FastModel.from_pretrained(str(folder), max_seq_length=args.seq_len, load_in_4bit=args.qlora,
                                         patch=args.method != "stock", verbose=False)
    model = FastModel.get_peft_model(model, r=16, lora_alpha=16, random_state=3407, verbose=False)
    step = trainer_step_of(model)
    if step is not None and args.method == "eager":
        step.graphs.disabled_reason = "turned off"

    rng = random.Random(0)
    n = args.batch * args.grad_accum * args.steps
    vocab = model.config.vocab_size
    rows = [{"input_ids": [rng.randrange(2, vocab) for _ in range(L)]}
            for L in _lengths(args.lengths, n, args.seq_len, rng)]
    tokens_per_step = [sum(len(r["input_ids"]) for r in rows[i * args.batch * args.grad_accum:
                                                             (i + 1) * args.batch * args.grad_accum])
                       for i in range(args.steps)]

    class Clock(TrainerCallback):
        times = []
        prof = None

        def on_step_begin(self, a, state, control, **kw):
            if args.profile and state.global_step == args.steps - 2:
                torch.cuda.synchronize()
                self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                               torch.profiler.ProfilerActivity.CUDA])
                self.prof.__enter__()
                self.t_prof = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.times.append(time.perf_counter())
            if self.prof is not None and state.global_step == args.steps:
                self.prof.__exit__(None, None, None)
                _report(self.prof, self.times[-1] - self.t_prof, args.profile)

    config = trl.SFTConfig(output_dir=str(tok_dir / "out"), per_device_train_batch_size=args.batch,
                           gradient_accumulation_steps=args.grad_accum, max_steps=args.steps, learning_rate=2e-4,
                           logging_steps=1, report_to=[], save_strategy="no", bf16=cuda, max_length=args.seq_len,
                           packing=False, seed=3407, dataloader_drop_last=True)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer = trl.SFTTrainer(model=model, args=config, train_dataset=datasets.Dataset.from_list(rows),
                             processing_class=tok, callbacks=[Clock()])
    trainer.train()
    t = Clock.times
    timed = range(args.warmup, args.steps)
    secs = t[-1] - t[args.warmup - 1]
    real = sum(tokens_per_step[i] for i in timed)
    result = {"preset": args.preset, "method": args.method, "qlora": args.qlora, "lengths": args.lengths,
              "real_tokens_per_s": round(real / secs), "s_per_step": round(secs / len(timed), 4),
              "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
              "losses": [round(h["loss"], 5) for h in trainer.state.log_history if "loss" in h],
              "replays": step.graphs.replays if step else 0, "captures": step.graphs.captures if step else 0,
              "graphs_off": step.graphs.disabled_reason if step else "stock"}
    print(json.dumps(result))
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
