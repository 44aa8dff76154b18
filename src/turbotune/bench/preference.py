"""`turbotune bench --trainer dpo`: each method trained by TRL's DPOTrainer, as TRL's and Unsloth's guides write it.

The worker loads the method's model exactly as the other modes do (bench_worker.LOADERS), then builds one
`DPOTrainer(model=peft_model, ref_model=None, args=DPOConfig(...), train_dataset=..., processing_class=...)` with
TRL's defaults plus the run's workload (sft.trl_workload) and beta, and calls `.train()`. With a PEFT model and no
reference model, TRL keeps a frozen copy of the starting adapter as the reference (LoRA B starts at zero: the base
model). The unsloth row calls `PatchDPOTrainer()` first, as Unsloth's DPO guide does (importing unsloth already
swapped TRL's trainer for its own).

Data: DPOTrainer tokenises text itself (prompt, prompt + chosen, prompt + rejected), so the rows are strings of the
bench's placeholder tokens ("<t17>" is id 17, whitespace-split), random ids seeded with --seed, the same rows in the
same order for every method; chosen completions use the lower half of the vocabulary, rejected ones the upper half
(a learnable preference: see preference_rows). Each prompt is a quarter of --seq-len; each completion, its closing
eos included, fills the rest (`--lengths fixed`) or is drawn from sft.py's long-tailed mix capped there
(`--lengths mixed`), so no pair is truncated. Completions start with a space, so prompt + chosen tokenises to the
prompt's ids then the chosen ids, and end with the eos token, which TRL would otherwise glue to the last word.
Reported as for --trainer sft: real tokens/s, counting every non-padding token of the sequences the policy runs
(prompt + chosen and prompt + rejected: the prompt twice), step times, peak memory, and the loss TRL logs at every
step.
"""
from __future__ import annotations

import random
import tempfile

from turbotune.bench.sft import (
    _graphs_setting,
    count_real_tokens,
    row_lengths,
    step_clock,
    train_timed,
    trl_workload,
)

MIN_SEQ_LEN = 8  # a prompt of 2 tokens and completions of up to 6
DEFAULT_BETA = 0.1  # TRL's


def pair_lengths(kind: str, n: int, seq_len: int, seed: int) -> list[tuple[int, int, int]]:
    """(prompt, chosen, rejected) token counts of `n` pairs, each completion's eos included."""
    prompt = seq_len // 4
    room = seq_len - prompt
    if kind == "fixed":
        return [(prompt, room, room)] * n
    mix = row_lengths(kind, 2 * n, room, seed)  # raises ValueError for another kind
    return [(prompt, min(room, mix[2 * i]), min(room, mix[2 * i + 1])) for i in range(n)]


def preference_rows(kind: str, n: int, seq_len: int, vocab: int, seed: int, eos: str, avoid=()) -> list[dict]:
    """`n` rows {"prompt", "chosen", "rejected"} of placeholder tokens; ids in `avoid` (the special tokens) left out.
    Prompts draw from the whole vocabulary, chosen completions from its lower half and rejected ones from its upper
    half: a preference the policy can learn, so the reward margins grow above bf16's rounding of 1,500-token
    log-probability sums (with both completions random, Adam's first step, sign(g), turns that rounding into the
    whole update and the losses of equally correct runs differ by several percent)."""
    g, avoid, half = random.Random(seed + 2), set(avoid), vocab // 2

    def words(k: int, lo: int = 0, hi: int = vocab) -> list[str]:
        out = []
        while len(out) < k:
            i = g.randrange(lo, hi)
            if i not in avoid:
                out.append(f"<t{i}>")
        return out

    return [{"prompt": " ".join(words(p)), "chosen": " " + " ".join(words(c - 1, 0, half) + [eos]),
             "rejected": " " + " ".join(words(r - 1, half) + [eos])}
            for p, c, r in pair_lengths(kind, n, seq_len, seed)]


def placeholder_tokenizer(spec: dict):
    """The model folder's tokenizer where it is the bench's placeholder (every preset's), else a placeholder for the
    model's vocabulary: the rows are placeholder tokens, which a real tokenizer would split into other counts."""
    from transformers import AutoTokenizer

    from turbotune.bench.presets import _placeholder_tokenizer
    try:
        tok = AutoTokenizer.from_pretrained(spec["model_dir"])
        if tok("<t3> <t4>", add_special_tokens=False)["input_ids"] == [3, 4]:
            return tok
    except Exception:  # noqa: BLE001 - a folder without a tokenizer, or one that cannot load
        pass
    return _placeholder_tokenizer({"vocab_size": spec["vocab_size"]})


def run_dpo(model, spec: dict, result: dict, log) -> None:
    """Train `model` with DPOTrainer for spec["steps"] optimizer steps; fills result as sft.run_sft does, plus TRL's
    reward margin at every step."""
    import datasets

    from turbotune.training.preference import trl_classes

    if spec["method"] == "unsloth":
        _patch_unsloth_dpo()
    trainer_cls, config_cls = trl_classes("dpo")  # after unsloth's import: Unsloth's trainer and config
    clock = step_clock(spec, result, log)
    n = spec["micro_batch"] * spec["grad_accum"] * clock.steps  # one epoch: every row once
    tok = placeholder_tokenizer(spec)
    rows = preference_rows(spec["sft_lengths"], n, spec["seq_len"], spec["vocab_size"], spec["seed"], tok.eos_token,
                           tok.all_special_ids)
    _graphs_setting(model, spec)
    with tempfile.TemporaryDirectory(prefix="turbotune-dpo-") as tmp:
        config = config_cls(**trl_workload(spec, clock.steps, tmp), beta=spec["beta"])
        trainer = trainer_cls(model=model, ref_model=None, args=config, train_dataset=datasets.Dataset.from_list(rows),
                              processing_class=tok, callbacks=[clock])
        _check_tokenised(trainer.train_dataset, pair_lengths(spec["sft_lengths"], n, spec["seq_len"], spec["seed"]))
        fed = count_real_tokens(trainer, lambda feats: _real_tokens(feats, spec["seq_len"]))
        train_timed(trainer, model, spec, result, clock, fed)
    logged = [h for h in trainer.state.log_history if "loss" in h][:spec["steps"]]
    result["reward_margins"] = [h.get("rewards/margins") for h in logged]
    prompt = spec["seq_len"] // 4
    reference = ("TRL's frozen copy of the starting adapter" if "ref" in getattr(model, "peft_config", {})
                 else "the model with its adapters off")
    result["notes"].append(f"{n} pairs, prompts {prompt} tokens, completions "
                           f"{'' if spec['sft_lengths'] == 'fixed' else 'up to '}{spec['seq_len'] - prompt} tokens "
                           f"(eos included); beta {spec['beta']:g}; reference: {reference}")


def _patch_unsloth_dpo() -> None:
    """Unsloth's DPO guide calls PatchDPOTrainer() before building the trainer (a no-op in recent releases, whose
    import patches TRL's trainers); a release without it needs nothing."""
    try:
        from unsloth import PatchDPOTrainer
    except ImportError:
        return
    PatchDPOTrainer()


def _real_tokens(feats: list[dict], max_length: int) -> int:
    """The tokens of the sequences DPO's collator builds from these rows, prompt + chosen and prompt + rejected (each
    capped at max_length, as the collator truncates), before it pads them."""
    return sum(min(len(f["prompt_ids"]) + len(f[k]), max_length) for f in feats for k in ("chosen_ids", "rejected_ids"))


def _check_tokenised(dataset, lengths: list[tuple[int, int, int]]) -> None:
    """Every row survives TRL's preparation with exactly the tokens it was built with: none dropped, merged at a join,
    or given a second eos (the counts and the comparison between methods rest on it)."""
    got = list(zip(map(len, dataset["prompt_ids"]), map(len, dataset["chosen_ids"]), map(len, dataset["rejected_ids"])))
    if got != lengths:
        bad = next((i for i, (a, b) in enumerate(zip(got, lengths)) if a != b), min(len(got), len(lengths)))
        raise RuntimeError(f"TRL's preparation changed the bench's preference rows: {len(got)} of {len(lengths)} "
                           f"rows left; (prompt, chosen, rejected) tokens of row {bad}: "
                           f"{got[bad] if bad < len(got) else 'dropped'}, built with {lengths[bad]}")
