"""Where an SFTTrainer step's time goes outside the model's own pass.

    python bench/sft_host_split.py [--steps 30] [--layers 28] [--optim adamw_torch]     # CPU, a tiny model
    python bench/sft_host_split.py --model /tmp/bench-cache/qwen2-1.5b-seed0-... --qlora  # GPU, a real one
    python bench/sft_host_split.py --cprofile [--top 25] [--save stats.prof]              # by function

On a GPU the pass is a CUDA-graph replay and the device waits for everything else a step does (the trainer's
tail, the next step's data, turbotune's per-pass work): bench/NOTES.md, "Fourteenth session". The workload is the
bench's `--lengths mixed` one (micro-batch 2 x accumulation 4, LoRA r 16 on the seven projections, a log entry per
step). By default each phase is timed with perf_counter wrappers around the functions that run it (a few
microseconds each, unlike cProfile, which inflates Python-heavy code several times); a phase that reads a value
from the GPU (`.item()`, a NaN check) includes its wait. Without --model a 28-layer Qwen2 with hidden 64 stands in,
so the arithmetic is small and what remains is the host's.
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


class Phases:
    """Wall time per labelled phase, from wrappers that count only while `on` (after the warm-up steps). Nested
    phases (the pass inside training_step) are counted in both."""

    def __init__(self):
        self.on = False
        self.ms: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def wrap(self, owner, name: str, label: str) -> None:
        inner = getattr(owner, name)

        def timed(*a, **k):
            if not self.on:
                return inner(*a, **k)
            t = time.perf_counter()
            try:
                return inner(*a, **k)
            finally:
                self.ms[label] = self.ms.get(label, 0.0) + 1000 * (time.perf_counter() - t)
                self.calls[label] = self.calls.get(label, 0) + 1
        setattr(owner, name, timed)


def build_trainer(args, cuda: bool):
    import datasets
    import trl

    from turbotune import FastModel
    from turbotune.bench.sft import make_rows, stand_in_tokenizer

    tmp = tempfile.mkdtemp(prefix="turbotune-host-split-")
    tok = stand_in_tokenizer(tmp + "/tok")
    folder = args.model or make_tiny_model(tmp + "/model", tok, "qwen2", num_hidden_layers=args.layers,
                                           vocab_size=512, max_position_embeddings=2048)
    model, _ = FastModel.from_pretrained(folder, max_seq_length=2048, load_in_4bit=args.qlora, verbose=False)
    model = FastModel.get_peft_model(model, r=16, lora_alpha=16, verbose=False)
    steps = args.warmup + args.steps
    rows = make_rows("mixed", 8 * steps, 2048, model.config.vocab_size, 0)
    config = trl.SFTConfig(output_dir=tmp + "/out", per_device_train_batch_size=2, gradient_accumulation_steps=4,
                           max_steps=steps, learning_rate=1e-4, logging_steps=1, report_to=[], save_strategy="no",
                           use_cpu=not cuda, bf16=cuda, max_length=2048, packing=False, optim=args.optim,
                           dataloader_drop_last=True, disable_tqdm=True)
    return trl.SFTTrainer(model=model, args=config, train_dataset=datasets.Dataset.from_list(rows),
                          processing_class=tok)


DEFERRED = "deferred backward (gradient read)"


def install_timers(trainer, phases: Phases) -> None:
    """Wrap the step's phases; the optimizer and its accelerate wrapper exist only once training starts."""
    from transformers import TrainerCallback

    from turbotune.training import deferred_backward
    from turbotune.training.graphed_call import GraphedCall

    phases.wrap(GraphedCall, "__call__", "model forward (the pass)")
    phases.wrap(torch.autograd, "backward", "backward (the pass)")
    phases.wrap(trainer, "training_step", "training_step (all of it)")
    phases.wrap(trainer, "get_batch_samples", "data: get_batch_samples")
    phases.wrap(trainer, "_maybe_log_save_evaluate", "log / save / evaluate")
    phases.wrap(trainer.accelerator, "clip_grad_norm_", "clip_grad_norm_")
    phases.wrap(trainer.model, "zero_grad", "zero_grad")
    # The step's last backward, deferred to the trainer's first gradient read (TURBOTUNE_DEFER_BACKWARD, on by
    # default): outside training_step, before clipping; its backward is counted in the pass too.
    phases.wrap(deferred_backward, "flush", DEFERRED)

    class Late(TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kw):
            phases.wrap(optimizer, "step", "optimizer.step")
            if lr_scheduler is not None:
                phases.wrap(lr_scheduler, "step", "lr_scheduler.step")
    trainer.add_callback(Late())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=8, help="steps before timing (new lengths are captured then)")
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--optim", default="adamw_torch")
    ap.add_argument("--model", help="a saved model folder (default: a tiny 28-layer Qwen2 built here)")
    ap.add_argument("--qlora", action="store_true", help="with --model: load it in 4-bit NF4")
    ap.add_argument("--cprofile", action="store_true", help="cProfile the timed steps instead of the timers")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--save", help="with --cprofile: also write the stats here (pstats format)")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda:
        torch.set_num_threads(1)
    trainer = build_trainer(args, cuda)
    phases, profiler = Phases(), cProfile.Profile()
    if not args.cprofile:
        install_timers(trainer, phases)

    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            if state.global_step == args.warmup:
                if cuda:
                    torch.cuda.synchronize()
                self.t0 = time.perf_counter()
                phases.on = True
                if args.cprofile:
                    profiler.enable()

        def on_train_end(self, a, state, control, **kw):
            if args.cprofile:
                profiler.disable()
            if cuda:
                torch.cuda.synchronize()
            self.wall = time.perf_counter() - self.t0
            phases.on = False

    clock = Clock()
    trainer.add_callback(clock)
    trainer.train()
    where = torch.cuda.get_device_name() if cuda else "CPU"
    step_ms = 1000 * clock.wall / args.steps
    print(f"\n{args.steps} steps after {args.warmup}: {step_ms:.1f} ms per step "
          f"({args.model or f'{args.layers} tiny layers'}{' NF4' if args.qlora else ''}, optim {args.optim}, "
          f"{where}, {'cProfile' if args.cprofile else 'timers'})\n")
    if args.cprofile:
        stats = pstats.Stats(profiler)
        if args.save:
            stats.dump_stats(args.save)
        stats.sort_stats("cumulative").print_stats(args.top)
        return
    print(f"{'phase':34} {'ms/step':>9} {'calls/step':>11}")
    for label in sorted(phases.ms, key=phases.ms.get, reverse=True):
        print(f"{label:34} {phases.ms[label] / args.steps:9.2f} {phases.calls[label] / args.steps:11.1f}")
    pass_ms = sum(phases.ms.get(k, 0.0) for k in ("model forward (the pass)", "backward (the pass)"))
    outside = ("training_step (all of it)", "data: get_batch_samples", "log / save / evaluate", "clip_grad_norm_",
               "zero_grad", "optimizer.step", "lr_scheduler.step", DEFERRED)
    named = sum(phases.ms.get(k, 0.0) for k in outside)
    print(f"{'the pass (forward + backward)':34} {pass_ms / args.steps:9.2f}")
    print(f"{'outside the pass':34} {step_ms - pass_ms / args.steps:9.2f}")
    # the deferred backward runs outside training_step: what training_step adds is counted without it
    own = phases.ms.get("training_step (all of it)", 0.0) - (pass_ms - phases.ms.get(DEFERRED, 0.0))
    print(f"{'  training_step around the pass':34} {own / args.steps:9.2f}   (TRL's compute_loss, turbotune's work)")
    print(f"{'  of which in no phase above':34} {step_ms - named / args.steps:9.2f}")


if __name__ == "__main__":
    main()
