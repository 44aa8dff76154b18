"""`turbotune` / `python -m turbotune`: check, demo, train, generate, chat, export, bench.

Errors the user can fix (TurbotuneError and the data module's DataError) print as one line and exit 1;
everything else keeps its traceback, because that is a bug of ours to report.
"""
from __future__ import annotations

import argparse
import os
import sys

from turbotune import __version__


# Keywords of the two common kinds of flag, so a row below says only its type or constant and its help.
def _int(text: str) -> dict:
    return dict(type=int, help=text)


def _float(text: str) -> dict:
    return dict(type=float, help=text)


def _const(value, text: str, dest: str | None = None) -> dict:
    """A switch that stores `value` (into `dest`, when it is another flag's field)."""
    kw = dict(action="store_const", const=value, help=text)
    if dest is not None:
        kw["dest"] = dest
    return kw


# Flags of `turbotune train`; their names (dashes → underscores) are TrainConfig's fields.
_TRAIN_FLAGS = {
    "--model": dict(help="model folder or hub id (default: the embedded SmolLM2-135M-Instruct)"),
    "--data": dict(help="JSONL/JSON training file (default: the packaged copywriting sample)"),
    "--format": dict(choices=["auto", "alpaca", "sharegpt", "messages", "text"], help="data format (default auto)"),
    "--method": dict(choices=["sft", "dpo", "kto", "orpo", "grpo"],
                     help="sft: learn the answers (default); dpo, orpo: prefer 'chosen' over 'rejected' in rows "
                          "{prompt, chosen, rejected}; kto: rows {prompt, completion, label: true|false}; grpo: rows "
                          "{prompt, ...}, the model's own completions scored by --reward-fn"),
    "--beta": _float("dpo/kto: how closely to stay with the model before training; orpo: the weight of the "
                     "preference term; grpo: the weight of the KL penalty (default TRL's: 0.1, and 0 for grpo)"),
    "--reward-fn": dict(metavar="FILE.py[:NAME,...]",
                        help="grpo: reward functions in your own Python file, which turbotune imports and so runs "
                             "(as `python FILE.py` would): the NAMEs given, else every function defined there whose "
                             "name starts with 'reward' or ends with '_reward'. TRL calls each as f(prompts, "
                             "completions, **kwargs), the data's other columns among the kwargs, and sums the floats "
                             "they return, one per completion"),
    "--num-generations": _int("grpo: completions per prompt, each scored against the others (default 8, TRL's); "
                              "--batch-size x --grad-accum must be a multiple of it"),
    "--max-completion-length": _int("grpo: longest completion in tokens (default 512, TRL's)"),
    "--temperature": _float("grpo: sampling temperature of the completions (default 1.0, TRL's)"),
    "--output-dir": dict(help="where checkpoints, the log and the loss plot go (default outputs)"),
    "--load-in-4bit": _const(True, "QLoRA: 4-bit NF4 base weights"),
    "--double-quant": _const(True, "4-bit with the scales quantised again (the default)", "double_quant"),
    "--no-double-quant": _const(False, "4-bit without double quantisation of the scales", "double_quant"),
    "--dtype": dict(choices=["bf16", "fp16", "fp32"], help="compute dtype (default: bf16 where supported)"),
    "--max-seq-length": _int("truncate samples to this many tokens (default 2048)"),
    "--max-steps": _int("optimizer steps, > 0 (overrides --epochs; default: train by epochs)"),
    "--epochs": _float("passes over the data (default 1)"),
    "--batch-size": _int("micro-batch size (default 2)"),
    "--grad-accum": _int("micro-batches per optimizer step (default 4)"),
    "--lr": _float("peak learning rate (default 2e-4)"),
    "--warmup-steps": _int("linear warm-up steps (default 5)"),
    "--lr-scheduler": dict(choices=["linear", "cosine", "constant"],
                           help="learning-rate schedule after warm-up (default linear)"),
    "--weight-decay": _float("AdamW weight decay (default 0)"),
    "--lora-r": _int("LoRA rank (default 16)"),
    "--lora-alpha": _int("LoRA alpha (default = rank)"),
    "--lora-dropout": _float("LoRA dropout (default 0; > 0 disables the fused LoRA path)"),
    "--seed": _int("seed for LoRA init and data order (default 3407)"),
    "--logging-steps": _int("print a log row every N steps (default 1)"),
    "--save-steps": _int("write a checkpoint every N steps (default: only at the end)"),
    "--save-total-limit": _int("keep only the newest K checkpoints"),
    "--train-on-all-tokens": _const(False, "train on prompts too (default: only the answers)",
                                    "train_on_responses_only"),
    "--skip-bad-rows": _const(True, "skip malformed rows with a summary"),
    "--resume": _const(True, "continue from the latest checkpoint in --output-dir"),
    "--overwrite": _const(True, "replace a different run in --output-dir"),
    "--skip-nonfinite": _const(True, "skip steps whose loss is NaN/inf"),
    "--packing": _const(True, "pack samples into rows of --max-seq-length: no compute spent on padding "
                              "(default: on for GPU runs where the model's attention supports it)"),
    "--no-packing": _const(False, "pad each micro-batch instead", "packing"),
    "--gradient-checkpointing": dict(metavar="MODE", choices=["true", "false", "offload", "auto"],
                                     help="true: recompute every layer (default); false; offload: recompute, each "
                                          "layer's input in pinned host memory; auto: the cheapest that the memory "
                                          "planner predicts will fit"),
    "--no-gradient-checkpointing": _const(False, "keep every activation instead of recomputing: faster, more memory",
                                          "gradient_checkpointing"),
    "--allow-pickle": _const(True, "allow pickle (*.bin) weights: they can run code"),
    "--trust-remote-code": _const(True, "run the model repo's own Python code"),
    "--no-patch": _const(False, "stock transformers + PEFT forwards (for comparison)", "patch"),
    "--no-cuda-graphs": _const(False, "run every micro-step eagerly (default: replay CUDA graphs on a GPU)",
                               "cuda_graphs"),
    "--fsdp": _const("fsdp", "under torchrun: shard the model over the ranks with FSDP2, for a base too big for one "
                             "card (default: DDP, a whole copy per rank)", "distributed"),
    "--adapter-precision": dict(choices=["peft", "input"],
                                help="LoRA math in the adapters' dtype as PEFT (peft, default) or in the "
                                     "compute dtype (input: faster under bf16, as Unsloth)"),
}


def _add_train(sub):
    p = sub.add_parser("train", help="fine-tune with LoRA/QLoRA on a JSONL file (defaults: the embedded demo)")
    p.add_argument("--config", help="YAML file with the same keys as these flags; flags override it")
    for flag, kw in _TRAIN_FLAGS.items():
        p.add_argument(flag, default=None, **kw)
    return p


def _cmd_train(args) -> int:
    from turbotune.training.config import TrainConfig, build_config
    from turbotune.cli.train import run_demo, run_training

    overrides = {k: v for k, v in vars(args).items()
                 if k in TrainConfig.__dataclass_fields__ and v is not None}
    if args.config is None and not overrides:
        return run_demo()
    cfg = build_config(args.config, overrides)
    run_training(cfg)
    return 0


def _add_model_flags(p):
    p.add_argument("--model", default=None, help="base model folder or hub id (default: the adapter's base)")
    p.add_argument("--adapter", default=None, help="adapter folder written by `turbotune train`")
    p.add_argument("--load-in-4bit", action="store_true", help="load the base in 4-bit NF4 (less memory)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                   help="compute dtype (default: bf16 where supported, fp32 on the CPU)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest answer in tokens (default 256)")
    p.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature; 0 = always the likeliest token (default: 0 for generate, 0.7 for chat)")
    p.add_argument("--allow-pickle", action="store_true", help="allow pickle (*.bin) weights: they can run code")


def _cmd_generate(args) -> int:
    from turbotune.inference import generate_reply, load_for_inference
    model, tok = load_for_inference(args.model, args.adapter, args.dtype, args.load_in_4bit,
                                    allow_pickle=args.allow_pickle)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
        [{"role": "user", "content": args.prompt}]
    temp = 0.0 if args.temperature is None else args.temperature
    generate_reply(model, tok, messages, args.max_new_tokens, temp, stream=True)
    return 0


def _cmd_chat(args) -> int:
    from turbotune.inference import chat_loop, load_for_inference
    model, tok = load_for_inference(args.model, args.adapter, args.dtype, args.load_in_4bit,
                                    allow_pickle=args.allow_pickle)
    chat_loop(model, tok, system=args.system, max_new_tokens=args.max_new_tokens,
              temperature=0.7 if args.temperature is None else args.temperature)
    return 0


# Flags of `turbotune export`.
_EXPORT_FLAGS = {
    "--adapter": dict(required=True, help="adapter folder written by `turbotune train`"),
    "--out": dict(required=True, help="output folder"),
    "--how": dict(choices=["adapter", "merged", "gguf", "ollama"], default="merged",
                  help="merged: base + adapter as one 16-bit model (default); adapter: copy the adapter only; "
                       "gguf: base + adapter as one llama.cpp GGUF file, OUT/model-<quant>.gguf (llama, mistral "
                       "and qwen2 models); ollama: that GGUF plus OUT/Modelfile (chat template, stop tokens) for "
                       "`ollama create NAME -f OUT/Modelfile` (--quant applies)"),
    "--quant": dict(default=None, metavar="{f16,bf16,q8_0,q5_1,q5_0,q4_1,q4_0,q4_k_m,...}",
                    help="GGUF tensor type, with --how gguf or ollama: f16 (default), bf16, q8_0 (about 53%% of f16's "
                         "size), q5_1, q5_0, q4_1, q4_0 (about 38/34/31/28%%); matrices whose rows are not a multiple "
                         "of 32 stay f16, norms f32. k-quants (q4_k_m, q5_k_m, q6_k...) are made by llama.cpp from "
                         "the f16 file: with llama-cpp-python installed turbotune runs it, otherwise it writes "
                         "model-f16.gguf and prints the llama-quantize command"),
    "--model": dict(default=None, help="base model (default: the adapter's base)"),
    "--dtype": dict(choices=["bf16", "fp16", "fp32"], default=None,
                    help="dtype of the merged weights (default: the base checkpoint's if 16-bit, else bf16)"),
    "--merge-into": dict(choices=["auto", "nf4", "original"], default="auto",
                         help="the base weights to merge into: nf4 (the 4-bit base dequantised, what a QLoRA adapter "
                              "was trained against), original (the 16-bit weights), auto (nf4 for an adapter trained "
                              "in 4 bits or a pre-quantised base; the default)"),
    "--push-to-hub": dict(default=None, metavar="USER/REPO",
                          help="then upload OUT to this Hugging Face Hub model repo (created if missing), with a model "
                               "card from the run; needs `hf auth login` or HF_TOKEN"),
    "--private": dict(action="store_true", help="with --push-to-hub: create the repo private"),
    "--overwrite": dict(action="store_true", help="replace OUT if it exists (it is replaced whole, atomically, once "
                                                  "the new export is complete)"),
}


def _add_export(sub):
    p = sub.add_parser("export", help="save an adapter, merge it into 16-bit base weights, or write a GGUF")
    for flag, kw in _EXPORT_FLAGS.items():
        p.add_argument(flag, **kw)
    return p


def _cmd_export(args) -> int:
    from turbotune.export.export import export
    if args.push_to_hub:
        from turbotune.export.hub import check_repo_id
        check_repo_id(args.push_to_hub)  # a malformed id fails before the (slow) merge
    elif args.private:
        from turbotune.errors import ConfigError
        raise ConfigError("--private goes with --push-to-hub USER/REPO; add that, or drop --private")
    path = export(args.adapter, args.out, how=args.how, base=args.model, dtype=args.dtype,
                  merge_into=args.merge_into, quant=args.quant, overwrite=args.overwrite)
    print(f"[turbotune] wrote {args.how} model to {path}")
    if args.push_to_hub:
        from turbotune.export.hub import push_to_hub, run_folder_of
        url = push_to_hub(path, args.push_to_hub, private=args.private, run_dir=run_folder_of(args.adapter))
        print(f"[turbotune] pushed {path} to {url}")
    return 0


def _cmd_check(args) -> int:
    from turbotune.health.check import run_health_check
    return run_health_check(as_json=args.json, self_test=not args.no_self_test)


def _cmd_demo(args) -> int:
    from turbotune.cli.train import run_demo
    return run_demo(output_dir=args.output_dir, max_steps=args.max_steps)


class _Parser(argparse.ArgumentParser):
    """No abbreviated flags: argparse would read `--r 8` as `--resume` and a stray 8, silently."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    # Subcommand parsers are of the same class, so none of them takes abbreviations either.
    parser = _Parser(prog="turbotune", description="Fast LoRA / QLoRA fine-tuning of open LLMs.")
    parser.add_argument("--version", action="version", version=f"turbotune {__version__}")
    sub = parser.add_subparsers(dest="command")

    p = sub.add_parser("check", help="environment report + one-step self test; ends with PASS or FAIL")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--no-self-test", action="store_true", help="only the environment report")
    p.set_defaults(func=_cmd_check)

    p = sub.add_parser("demo", help="the embedded demo: SmolLM2-135M + sample data, before/after answers")
    p.add_argument("--output-dir", default="outputs/demo", help="where the demo's run goes (default outputs/demo)")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps, > 0 (default 20)")
    p.set_defaults(func=_cmd_demo)

    _add_train(sub).set_defaults(func=_cmd_train)

    p = sub.add_parser("generate", help="answer one prompt (chat template applied, streamed)")
    _add_model_flags(p)
    p.add_argument("--prompt", required=True, help="the user message to answer")
    p.add_argument("--system", default=None, help="system message put before the prompt")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("chat", help="interactive chat with a model (+ adapter)")
    _add_model_flags(p)
    p.add_argument("--system", default=None, help="system message at the start of the chat (kept on /reset)")
    p.set_defaults(func=_cmd_chat)

    _add_export(sub).set_defaults(func=_cmd_export)

    p = sub.add_parser("plan", help="predict a training step's peak GPU memory from the model config")
    from turbotune.cli.plan import add_plan_arguments, run_plan
    add_plan_arguments(p)
    p.set_defaults(func=run_plan)

    p = sub.add_parser("bench", help="side-by-side benchmark: hf vs turbotune (vs unsloth, liger)")
    try:
        from turbotune.bench.harness import add_bench_arguments, run_bench
        add_bench_arguments(p)
        p.set_defaults(func=run_bench)
    except ImportError as e:  # pragma: no cover - bench is part of the package
        p.set_defaults(func=lambda a, e=e: _fail(f"bench is unavailable: {e}"))
    return parser


def _fail(msg: str) -> int:
    print(f"turbotune: error: {msg}", file=sys.stderr)
    return 1


def _subcommand_parser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def suggest_flag(parser: argparse.ArgumentParser, flag: str) -> str | None:
    """The flag of `parser` an unknown one most likely means: via the config aliases (--learning-rate ->
    --lr), else the closest spelling."""
    import difflib

    from turbotune.training.config import ALIASES

    options = {s: a.dest for a in parser._actions for s in a.option_strings if s.startswith("--")}
    field = ALIASES.get(flag.lstrip("-").replace("-", "_").lower())
    if field:
        same_dest = sorted((s for s, dest in options.items() if dest == field), key=lambda s: s.startswith("--no-"))
        if same_dest:
            return same_dest[0]
    close = difflib.get_close_matches(flag, list(options), n=1, cutoff=0.6)
    return close[0] if close else None


def unknown_arguments_message(parser: argparse.ArgumentParser, extras: list[str]) -> str:
    flags = [e.split("=", 1)[0] for e in extras if e.startswith("-")]
    if not flags:  # stray words, e.g. an unquoted prompt
        return f"unexpected argument{'s' if len(extras) > 1 else ''} {' '.join(extras)}"
    parts = []
    for flag in flags:
        hint = suggest_flag(parser, flag)
        parts.append(flag + (f" (did you mean {hint}?)" if hint else ""))
    return f"unknown flag{'s' if len(flags) > 1 else ''} {', '.join(parts)}"


def parse_arguments(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """parse_args, but an unknown flag is named with the flag it most likely means. Exits 2 as argparse does."""
    args, extras = parser.parse_known_args(argv)
    if args.command is None:  # `turbotune [--json]` is `turbotune check [--json]`
        args, extras = parser.parse_known_args(["check"] + argv)
    if extras:
        sub = _subcommand_parser(parser, args.command)
        sub.error(unknown_arguments_message(sub, extras))
    return args


def main(argv=None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parse_arguments(parser, list(sys.argv[1:] if argv is None else argv))
    from turbotune.errors import TrainingStopped, TurbotuneError
    try:
        from turbotune.data.dataset import DataError
    except ImportError:  # pragma: no cover
        DataError = TurbotuneError  # noqa: N806
    try:
        return int(args.func(args) or 0)
    except TrainingStopped as e:
        print(f"turbotune: {e}", file=sys.stderr)
        return e.exit_code
    except (TurbotuneError, DataError) as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        print("\nturbotune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
