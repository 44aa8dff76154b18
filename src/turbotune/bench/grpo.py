"""`turbotune bench --trainer grpo`: each method trained by TRL's GRPOTrainer with a fixed generation length.

The worker loads the method's model exactly as the other modes do (bench_worker.LOADERS), then builds one
`GRPOTrainer(model=peft_model, reward_funcs=..., args=GRPOConfig(...), train_dataset=..., processing_class=...)`
with TRL's defaults plus the run's workload and calls `.train()`. The unsloth row calls `PatchFastRL("GRPO", ...)`
first where the installed release has it, as Unsloth's older GRPO guides do (newer releases patch on import).

Workload: TRL's per-device batch counts completions, so each optimizer step trains micro-batch x grad-accum
completions, `--num-generations` per prompt. Prompts are a quarter of --seq-len of the bench's placeholder tokens;
every completion is exactly the other three quarters (`min_new_tokens` = `max_completion_length`, so no eos ends one
early): the generation work is the same for every method and tokens/s compares like with like. Generation runs
through transformers' `generate` (no vLLM), sampled at temperature 1.0.

Reward: the share of a completion's tokens from the lower half of the vocabulary (a signal with spread, so the
group-relative advantages are not all zero and the policy loss has a gradient). Each method samples its own
completions (bf16 rounding changes what is drawn), so the losses are not compared with hf's; the rewards are
reported per step. Reported: tokens/s counting prompt + completion of every completion over the timed steps, step
times, the share of each step spent in `generate`, peak memory.
"""
from __future__ import annotations

import random
import re
import tempfile
import time

from turbotune.bench.sft import (_graphs_setting, _record, _step_notes, optimizer_note, run_timed, step_clock,
                                 trl_workload)

DEFAULT_NUM_GENERATIONS = 4
MIN_SEQ_LEN = 8  # a prompt of 2 tokens and a completion of 6
_TOKEN = re.compile(r"<t(\d+)>")


def num_generations(given: int | None) -> int:
    """--num-generations as given, or the default."""
    return DEFAULT_NUM_GENERATIONS if given is None else given


def grpo_lengths(seq_len: int) -> tuple[int, int]:
    """(prompt tokens, completion tokens) of every row."""
    prompt = seq_len // 4
    return prompt, seq_len - prompt


def check_workload(micro_batch: int, grad_accum: int, num_generations: int) -> str | None:
    """Why TRL would refuse this workload (None: fine). Its generation batch is micro-batch x grad-accum
    completions, which must be whole groups of num_generations, and a group needs two completions to compare."""
    if num_generations < 2:
        return "--num-generations must be at least 2 (GRPO compares the completions of one prompt)"
    if (micro_batch * grad_accum) % num_generations:
        return (f"--micro-batch x --grad-accum ({micro_batch} x {grad_accum} completions per step) must be a "
                f"multiple of --num-generations ({num_generations})")
    return None


def prompt_rows(n: int, length: int, vocab: int, seed: int, avoid=()) -> list[dict]:
    """`n` rows {"prompt"} of `length` placeholder tokens each (ids in `avoid`, the special tokens, left out)."""
    g, avoid = random.Random(seed + 3), set(avoid)
    rows = []
    for _ in range(n):
        words = []
        while len(words) < length:
            i = g.randrange(vocab)
            if i not in avoid:
                words.append(f"<t{i}>")
        rows.append({"prompt": " ".join(words)})
    return rows


def lower_half_reward(vocab: int):
    """The reward function: the share of a completion's placeholder tokens whose id is below vocab / 2."""
    half = vocab // 2

    def lower_half_share(completions, **kwargs):
        out = []
        for text in completions:
            ids = [int(m) for m in _TOKEN.findall(text if isinstance(text, str) else str(text))]
            out.append(sum(i < half for i in ids) / len(ids) if ids else 0.0)
        return out

    return lower_half_share


def run_grpo(model, spec: dict, result: dict, log) -> None:
    """Train `model` with GRPOTrainer for spec["steps"] optimizer steps; fills result as sft.run_sft does, plus the
    mean reward, the completions' mean length and the time in `generate` at every step."""
    import datasets

    from turbotune.bench.preference import placeholder_tokenizer
    from turbotune.training.preference import trl_classes

    if spec["method"] == "unsloth":
        _patch_unsloth_grpo()
    trainer_cls, config_cls = trl_classes("grpo")  # after unsloth's import: its trainer where it swaps TRL's
    clock = step_clock(spec, result, log)
    per_step = spec["micro_batch"] * spec["grad_accum"]  # completions
    generations = spec["num_generations"]
    prompt, completion = grpo_lengths(spec["seq_len"])
    tok = placeholder_tokenizer(spec)
    rows = prompt_rows(per_step // generations * clock.steps, prompt, spec["vocab_size"], spec["seed"],
                       tok.all_special_ids)
    _graphs_setting(model, spec)
    generate_s = _time_generate(model, spec["device"] == "cuda")
    with tempfile.TemporaryDirectory(prefix="turbotune-grpo-") as tmp:
        workload = trl_workload(spec, clock.steps, tmp)
        workload.pop("max_length")  # GRPOConfig has none: prompts are whole, completions max_completion_length
        config = config_cls(**workload, num_generations=generations, max_completion_length=completion,
                            generation_kwargs={"min_new_tokens": completion}, temperature=1.0)
        trainer = trainer_cls(model=model, reward_funcs=lower_half_reward(spec["vocab_size"]), args=config,
                              train_dataset=datasets.Dataset.from_list(rows), processing_class=tok,
                              callbacks=[clock])
        times = run_timed(trainer, spec, result, clock)
    logged = [h for h in trainer.state.log_history if "loss" in h][:spec["steps"]]
    lengths = [h.get("completions/mean_length") for h in logged]
    tokens = [per_step * (prompt + (n if n is not None else completion)) for n in lengths]
    gen = _per_step(generate_s, [clock.t0] + clock.times)
    _record(result, spec, [h["loss"] for h in logged], times, tokens,
            list(model.__dict__.get("_bench_notes", [])) + _step_notes(model, spec, result) + optimizer_note(trainer))
    result.update(rewards=[h.get("reward") for h in logged], completion_mean_lengths=lengths,
                  generate_s_per_step=gen)
    timed = range(spec["warmup"], len(times))
    share = sum(gen[i] for i in timed) / sum(times[i] for i in timed) if gen and len(gen) == len(times) else None
    fixed = all(n == completion for n in lengths)
    result["notes"].append(
        f"{len(rows)} prompts of {prompt} tokens, {generations} completions each of "
        + (f"{completion} tokens" if fixed else f"up to {completion} tokens (mean lengths {lengths})")
        + (f"; generate {share:.0%} of the timed steps" if share is not None else "")
        + "; losses not compared with hf's (each method samples its own completions)")


def _time_generate(model, cuda: bool) -> list[tuple[float, float]]:
    """Wrap the model's `generate` (TRL calls it on the model it was given): the list returned gets the (start,
    end) of every call, the device synchronised at both ends."""
    import torch

    spans: list[tuple[float, float]] = []
    generate = model.generate

    def timed(*args, **kwargs):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = generate(*args, **kwargs)
        if cuda:
            torch.cuda.synchronize()
        spans.append((start, time.perf_counter()))
        return out

    model.generate = timed
    return spans


def _per_step(spans: list[tuple[float, float]], marks: list[float]) -> list[float]:
    """Seconds of `generate` inside each step (the steps' ends in `marks`, its start first)."""
    return [sum(e - s for s, e in spans if a <= s < b) for a, b in zip(marks, marks[1:])]


def _patch_unsloth_grpo() -> None:
    """Unsloth's older GRPO guides call PatchFastRL("GRPO", FastLanguageModel) before building the trainer; newer
    releases patch TRL's trainers on import and drop it."""
    try:
        from unsloth import FastLanguageModel, PatchFastRL
    except ImportError:
        return
    PatchFastRL("GRPO", FastLanguageModel)
