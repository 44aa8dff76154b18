"""`turbotune bench --trainer sft`: each method trained by TRL's SFTTrainer, as the tutorials write it.

The worker loads the method's model exactly as the default bench does (bench_worker.LOADERS: each library's own
loading calls), then builds one `SFTTrainer(model, args=SFTConfig(...), train_dataset=..., processing_class=...)`
with TRL's defaults plus the run's workload (micro-batch, accumulation, steps, learning rate, max_length,
`packing=False`) and calls `.train()`. Nothing else of turbotune's is switched on by hand.

Data: pre-tokenised rows of random token ids (the preset's vocabulary), the same rows in the same order for
every method (TRL's sampler, one seed). `--lengths fixed`: every row --seq-len tokens. `--lengths mixed`: a
long-tailed mix like instruction data (lognormal: median ~150 tokens, 90th percentile ~600, capped at
--seq-len), which TRL's collator pads per micro-batch. Reported: real (non-padding) tokens per second over the
timed steps, the peak GPU memory of training (weights included), and the loss TRL logs at every step.
`--trainer dpo` (preference.py) shares the TRL workload, the step clock, the token count and the recording below.
"""
from __future__ import annotations

import math
import random
import tempfile
import time


def row_lengths(kind: str, n: int, seq_len: int, seed: int) -> list[int]:
    """Token counts of the `n` rows: all `seq_len` ("fixed"), or the long-tailed mix ("mixed")."""
    if kind == "fixed":
        return [seq_len] * n
    if kind != "mixed":
        raise ValueError(f"lengths must be fixed or mixed, not {kind!r}")
    rng = random.Random(seed)
    # lognormal around a median of 150 tokens; sigma 1.08 puts the 90th percentile near 600
    return [max(16, min(seq_len, int(math.exp(rng.gauss(math.log(150), 1.08))))) for _ in range(n)]


def make_rows(kind: str, n: int, seq_len: int, vocab: int, seed: int) -> list[dict]:
    """Pre-tokenised rows; ids 0 and 1 stay free for the stand-in tokenizer's pad and eos."""
    g = random.Random(seed + 1)
    return [{"input_ids": [g.randrange(2, vocab) for _ in range(length)]}
            for length in row_lengths(kind, n, seq_len, seed)]


def stand_in_tokenizer(folder: str):
    """The rows are token ids already; TRL's collator needs a tokenizer only for its pad (0) and eos (1) ids."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"<pad>": 0, "<eos>": 1}, unk_token="<pad>"))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")
    tok.save_pretrained(folder)
    return tok


def run_sft(model, spec: dict, result: dict, log) -> None:
    """Train `model` with SFTTrainer for spec["steps"] optimizer steps; fills result like bench_worker.train."""
    import datasets
    import trl

    clock = step_clock(spec, result, log)  # --profile: one more step, after the timed ones, under torch.profiler
    per_step = spec["micro_batch"] * spec["grad_accum"]
    rows = make_rows(spec["sft_lengths"], per_step * clock.steps, spec["seq_len"], spec["vocab_size"], spec["seed"])
    _graphs_setting(model, spec)
    with tempfile.TemporaryDirectory(prefix="turbotune-sft-") as tmp:
        tok = _tokenizer(spec, tmp)
        config = trl.SFTConfig(**trl_workload(spec, clock.steps, tmp), packing=False)
        trainer = trl.SFTTrainer(model=model, args=config, train_dataset=datasets.Dataset.from_list(rows),
                                 processing_class=tok, callbacks=[clock])
        fed = count_real_tokens(trainer, lambda feats: sum(len(f["input_ids"]) for f in feats))
        train_timed(trainer, model, spec, result, clock, fed)


def trl_workload(spec: dict, steps: int, output_dir: str) -> dict:
    """The arguments every TRL row sets on top of its trainer's defaults: the run's workload, a log entry per step,
    nothing saved, the device's dtype; --optim where given."""
    cuda = spec["device"] == "cuda"
    workload = dict(output_dir=output_dir, per_device_train_batch_size=spec["micro_batch"],
                    gradient_accumulation_steps=spec["grad_accum"], max_steps=steps, learning_rate=spec["lr"],
                    logging_steps=1, report_to=[], save_strategy="no", bf16=cuda and spec["dtype"] == "bfloat16",
                    fp16=cuda and spec["dtype"] == "float16", max_length=spec["seq_len"], seed=spec["seed"],
                    dataloader_drop_last=True, use_cpu=not cuda)
    if spec.get("optim"):
        workload["optim"] = spec["optim"]
    return workload


def step_clock(spec: dict, result: dict, log):
    """A TrainerCallback that times every optimizer step (the device synchronised at its end) into `.times`, from
    `.t0` (set by train_timed); with --profile, `.steps` holds one more step, run under torch.profiler."""
    import torch
    from transformers import TrainerCallback

    method, cuda, profile = spec["method"], spec["device"] == "cuda", _step_profile(spec)

    class Clock(TrainerCallback):
        steps = spec["steps"] + (profile is not None)  # the trainer's max_steps

        def __init__(self):
            self.times: list[float] = []
            self.t0 = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            if profile is not None and state.global_step == spec["steps"]:
                profile.start()

        def on_step_end(self, args, state, control, **kwargs):
            if profile is not None and state.global_step > spec["steps"]:
                result["profile"] = p = profile.stop()
                log(method, f"profiled step: wall {p['wall_ms']:.0f} ms, GPU busy {p['gpu_busy_ms']:.0f} ms -> "
                            f"{p['report']}")
                return
            if cuda:
                torch.cuda.synchronize()
            self.times.append(time.perf_counter())
            took = self.times[-1] - (self.times[-2] if len(self.times) > 1 else self.t0)
            log(method, f"step {state.global_step}/{spec['steps']}  {took:.3f} s")

    return Clock()


def count_real_tokens(trainer, count) -> list[int]:
    """Wrap the trainer's collator: the list returned gets count(features), the real (non-padding) tokens of each
    micro-batch it builds, in order."""
    fed: list[int] = []
    collate = trainer.data_collator
    trainer.data_collator = lambda feats: fed.append(count(feats)) or collate(feats)
    return fed


def train_timed(trainer, model, spec: dict, result: dict, clock, fed: list[int]) -> None:
    """run_timed, then result filled (losses TRL logged, step times, real tokens per step from `fed`, notes) through
    _record."""
    times, ga = run_timed(trainer, spec, result, clock), spec["grad_accum"]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    tokens = [sum(fed[i * ga:(i + 1) * ga]) for i in range(len(times))]
    notes = list(model.__dict__.get("_bench_notes", [])) + _step_notes(model, spec, result) + optimizer_note(trainer)
    _record(result, spec, losses, times, tokens, notes)


def optimizer_note(trainer) -> list[str]:
    """The optimizer that ran and its weight decay: a library may change TRL's defaults (Unsloth's patched configs
    pick bitsandbytes' 8-bit AdamW and weight decay 0.001), which moves peak memory and losses."""
    opt = getattr(trainer, "optimizer", None)
    opt = getattr(opt, "optimizer", opt)  # accelerate's wrapper
    if opt is None:
        return []
    decay = sorted({g.get("weight_decay", 0.0) for g in opt.param_groups if g["params"]})
    name = getattr(trainer.args.optim, "value", trainer.args.optim)  # transformers' OptimizerNames enum
    return [f"optimizer {type(opt).__module__.split('.')[0]} {type(opt).__name__} (optim={name}), "
            f"weight decay {', '.join(f'{d:g}' for d in decay)}"]


def run_timed(trainer, spec: dict, result: dict, clock) -> list[float]:
    """trainer.train() with the peak-memory counter reset after loading; the seconds of each step (clock's)."""
    import torch

    if spec["device"] == "cuda":
        result["load_peak_alloc_bytes"] = int(torch.cuda.max_memory_allocated())
        torch.cuda.reset_peak_memory_stats()
    clock.t0 = time.perf_counter()
    trainer.train()
    return [b - a for a, b in zip([clock.t0] + clock.times[:-1], clock.times)]


def run_own_trainer(model, spec: dict, result: dict, log) -> None:
    """The `turbotune-train` row: turbotune's own Trainer (what `turbotune train` runs: packing into rows of
    --seq-len, CUDA graphs on a GPU) for spec["steps"] optimizer steps on rows of the same length mix, as many as
    those steps take once packed. Fills result like run_sft: real tokens/s over the timed steps, peak memory,
    the loss of every step."""
    import torch

    from turbotune.training.config import TrainConfig
    from turbotune.training.trainer import Trainer

    cuda = spec["device"] == "cuda"
    kind, seq_len, seed = spec["sft_lengths"], spec["seq_len"], spec["seed"]
    mean = sum(row_lengths(kind, 1000, seq_len, seed)) / 1000
    budget = spec["micro_batch"] * spec["grad_accum"] * seq_len * spec["steps"]  # tokens the steps can hold
    rows = make_rows(kind, int(budget / mean * 1.05) + spec["micro_batch"] * spec["grad_accum"], seq_len,
                     spec["vocab_size"], seed)
    samples = [{"input_ids": r["input_ids"], "labels": list(r["input_ids"]), "where": f"row {i}"}
               for i, r in enumerate(rows)]
    marks: list[tuple[float, int]] = []
    with tempfile.TemporaryDirectory(prefix="turbotune-own-") as tmp:
        tok = _tokenizer(spec, tmp)
        cfg = TrainConfig(output_dir=tmp, batch_size=spec["micro_batch"], grad_accum=spec["grad_accum"],
                          max_steps=spec["steps"], lr=spec["lr"], warmup_steps=0, max_seq_length=seq_len,
                          packing=True, cuda_graphs=spec.get("cuda_graphs", True), seed=seed, overwrite=True)
        trainer = Trainer(cfg, model, tok, samples, progress=False)
        step = trainer._train_step

        def timed_step():  # the step returns a Python float: the device has finished it
            loss, tokens = step()
            marks.append((time.perf_counter(), tokens))
            log(spec["method"], f"step {len(marks)}/{spec['steps']}  {tokens} real tokens")
            return loss, tokens

        trainer._train_step = timed_step
        if cuda:
            result["load_peak_alloc_bytes"] = int(torch.cuda.max_memory_allocated())
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        out = trainer.train()
    times = [b[0] - a for a, b in zip([t0] + [m[0] for m in marks[:-1]], marks)]
    micro = trainer.micro
    _record(result, spec, [h["loss"] for h in out.history], times, [m[1] for m in marks],
            [f"{len(samples)} rows packed into rows of {seq_len}; CUDA graphs "
             + (micro.disabled_reason or f"on ({micro.replays} replays, {micro.captures} graphs)")])


def _record(result: dict, spec: dict, losses, step_times, tokens, notes) -> None:
    """What both SFT rows report: losses, step times, real tokens per step and per second over the timed steps,
    notes, and the run's peak memory."""
    import torch

    result.update(losses=list(losses)[:spec["steps"]], step_times_s=step_times, real_tokens_per_step=tokens,
                  notes=notes)
    timed = range(spec["warmup"], len(step_times))
    seconds = sum(step_times[i] for i in timed)
    result["real_tokens_per_s"] = sum(tokens[i] for i in timed) / seconds if seconds > 0 else None
    steady = steady_rate([step_times[i] for i in timed], [tokens[i] for i in timed])
    if steady is not None and steady[1] < len(timed):  # some timed steps paid a capture or another one-off
        result["steady_real_tokens_per_s"] = steady[0]
        result["notes"] = list(notes) + [f"steady steps ({steady[1]} of {len(timed)} timed, under 1.8x the "
                                         f"median step time): {steady[0]:,.0f} real tokens/s"]
    result["memory_kind"] = "cuda" if spec["device"] == "cuda" else "rss"
    result["peak_rss_bytes"] = _peak_rss_bytes()
    if spec["device"] == "cuda":
        result["peak_alloc_bytes"] = int(torch.cuda.max_memory_allocated())
        result["peak_reserved_bytes"] = int(torch.cuda.max_memory_reserved())


def steady_rate(times: list[float], tokens: list[int], limit: float = 1.8) -> tuple[float, int] | None:
    """(real tokens/s, steps) over the steps that took under `limit` x the median step time: the steps that
    paid no one-off cost (a graph capture of a new length costs a few eager passes of host time). Mixed-length
    runs of 40 timed steps moved ±25% with their captures' timing alone (bench/NOTES.md, thirteenth session);
    this figure is the one to compare between invocations. None without steps."""
    if not times:
        return None
    median = sorted(times)[len(times) // 2]
    kept = [(t, n) for t, n in zip(times, tokens) if t < limit * median]
    seconds = sum(t for t, _ in kept)
    return (sum(n for _, n in kept) / seconds, len(kept)) if seconds > 0 else None


def _step_profile(spec: dict):
    if not spec.get("profile_dir"):
        return None
    from turbotune.bench.profile import StepProfile
    return StepProfile(spec["method"], spec["profile_dir"], spec["device"] == "cuda")


def _tokenizer(spec: dict, tmp: str):
    """The model folder's own tokenizer (a preset's placeholder has one token per id); else a stand-in."""
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(spec["model_dir"])
    except Exception:  # noqa: BLE001 - a folder without a tokenizer
        return stand_in_tokenizer(tmp)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _peak_rss_bytes() -> int:
    import resource
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def _graphs_setting(model, spec) -> None:
    """--no-cuda-graphs; on a GPU, CUDA events around every replayed pass (pass_timeline.py) for the notes."""
    from turbotune.training.pass_timeline import PassTimeline
    from turbotune.training.trainer_step import trainer_step_of
    step = trainer_step_of(model)
    if step is not None and not spec.get("cuda_graphs", True):
        step.graphs.disabled_reason = "turned off (--no-cuda-graphs)"
    if step is not None and spec["device"] == "cuda":
        step.graphs.timeline = PassTimeline()


def _capture_split(parts: list[tuple[float, float]]) -> str:
    """", per graph (median): forward capture X ms, backward Y ms" (each with its graph's instantiation)."""
    if not parts:
        return ""
    fwd, bwd = (sorted(x)[len(x) // 2] * 1000 for x in zip(*parts))
    return f"; per graph, medians: forward capture {fwd:.0f} ms, backward {bwd:.0f} ms"


def _step_notes(model, spec, result: dict | None = None) -> list[str]:
    """The trainer hook's counters as note lines; `result` also gets the pass timeline's medians
    ("pass_timeline_ms") and each capture's forward and backward seconds ("capture_parts_s") for the JSON."""
    from turbotune.training.trainer_step import trainer_step_of
    step = trainer_step_of(model)
    if step is None:
        return []
    g, ng = step.graphs, step.no_grad_graphs
    state = (f"off: {g.disabled_reason}" if g.disabled_reason
             else f"on ({g.replays} of {g.replays + g.eager_calls} calls replayed, {g.captures} graphs, "
                  f"{g.capture_s:.1f} s capturing{_capture_split(g.capture_parts)}"
                  f"{f'; {g.standins} replays in a longer graph' if g.standins else ''})")
    w = step.window
    passes = (f"{w.micro_batches} micro-batches of {w.steps} optimizer steps ran as {w.passes} passes"
              if w.steps else w.line() or "micro-batches run one by one")
    notes = [f"CUDA graphs {state}", passes]
    from turbotune.training import step_prefetch
    if step_prefetch.step_prefetch_enabled():  # one bench process trains one model: the count is this run's
        notes.append(f"{step_prefetch.prefetches} steps' batches fetched before the previous step's log")
    if result is not None and g.capture_parts:
        result["capture_parts_s"] = [list(p) for p in g.capture_parts]
    if g.timeline is not None:
        from turbotune.training.pass_timeline import timeline_line
        summary = g.timeline.summary()
        if result is not None and summary:
            result["pass_timeline_ms"] = summary
        line = timeline_line(summary)
        if line:
            notes.append(line)
    if ng.replays or ng.captures or ng.disabled_reason:
        notes.append(f"no-grad calls: {ng.disabled_reason or f'{ng.replays} replayed, {ng.captures} graphs'}")
    return notes
