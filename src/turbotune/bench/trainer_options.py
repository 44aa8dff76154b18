"""`turbotune bench --trainer sft|dpo|grpo`: the options that choose and shape the TRL-trainer benchmarks, and
their checks (made before any model loads)."""
from __future__ import annotations

import argparse

from turbotune.bench import grpo
from turbotune.bench.preference import DEFAULT_BETA, MIN_SEQ_LEN
from turbotune.bench.presets import BenchError


def add_trainer_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `--trainer sft|dpo|grpo` (TRL's trainers as the tutorials write them)."""
    g = parser.add_argument_group("trainer (--trainer sft|dpo|grpo)")
    g.add_argument("--trainer", choices=["loop", "sft", "dpo", "grpo"], default="loop",
                   help="loop: the bench's own training loop (default); sft: every method trained by TRL's "
                        "SFTTrainer as the tutorials write it, with --lengths fixed or mixed (a long-tailed mix, "
                        "padded per batch by TRL); dpo: by TRL's DPOTrainer on preference pairs (prompt a quarter of "
                        "--seq-len, completions the rest or, with --lengths mixed, that mix); grpo: by TRL's "
                        "GRPOTrainer, prompts a quarter of --seq-len and every completion generated to exactly the "
                        "rest (try --seq-len 512: generation is token by token); tokens/s counts real "
                        "(non-padding) tokens")
    g.add_argument("--beta", type=float, default=None,
                   help=f"--trainer dpo: DPO's beta (default {DEFAULT_BETA}, TRL's)")
    g.add_argument("--optim", default=None, help="the optimizer every method's TRL config names (transformers' "
                   "`optim`, e.g. adamw_8bit as Unsloth's notebooks write it); default: TRL's, which Unsloth's "
                   "patched configs turn into adamw_8bit (each row's note names the optimizer that ran)")
    g.add_argument("--num-generations", type=int, default=None,
                   help=f"--trainer grpo: completions per prompt (default {grpo.DEFAULT_NUM_GENERATIONS}); "
                        "--micro-batch x --grad-accum completions train per step")


def check_trainer_arguments(args) -> None:
    """Raise BenchError for a trainer option that does not fit the rest of the command line."""
    if args.trainer != "sft" and args.methods and "turbotune-train" in args.methods.split(","):
        raise BenchError("turbotune-train compares turbotune's own Trainer with the SFTTrainer rows: use it with "
                         "--trainer sft")
    if args.trainer in ("sft", "dpo", "grpo"):
        if args.max_context or args.packing:
            raise BenchError(f"--trainer {args.trainer} is its own benchmark; run --max-context and --packing "
                             "without it")
        if args.lengths not in (None, "fixed", "mixed") or (args.trainer == "grpo" and args.lengths):
            raise BenchError(f"with --trainer {args.trainer}, --lengths is " + (
                "not used (completions have a fixed length)" if args.trainer == "grpo" else "fixed or mixed"))
    elif not args.max_context and (args.lengths or args.confirm or args.card_memory):
        raise BenchError("--lengths, --confirm and --card-memory go with --max-context (or --trainer sft|dpo)")
    if args.optim is not None and args.trainer not in ("sft", "dpo", "grpo"):
        raise BenchError("--optim goes with --trainer sft|dpo|grpo (the own loop runs torch's AdamW)")
    if args.beta is not None and args.trainer != "dpo":
        raise BenchError("--beta goes with --trainer dpo")
    if args.trainer == "dpo" and args.seq_len < MIN_SEQ_LEN:
        raise BenchError(f"--trainer dpo needs --seq-len {MIN_SEQ_LEN} or more (a prompt and two completions)")
    if args.num_generations is not None and args.trainer != "grpo":
        raise BenchError("--num-generations goes with --trainer grpo")
    if args.trainer == "grpo":
        if args.seq_len < grpo.MIN_SEQ_LEN:
            raise BenchError(f"--trainer grpo needs --seq-len {grpo.MIN_SEQ_LEN} or more (a prompt and a completion)")
        why = grpo.check_workload(args.micro_batch, args.grad_accum, grpo.num_generations(args.num_generations))
        if why:
            raise BenchError(why)
