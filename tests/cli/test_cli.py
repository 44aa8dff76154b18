"""The command line: help, chat stops at the end-of-turn token, generate streams an answer."""
import io

from turbotune.cli.main import build_parser, main


def test_subcommands_exist():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert {"check", "demo", "train", "generate", "chat", "export", "bench"} <= set(sub.choices)


def test_chat_loop_streams_and_exits(tiny_llama_dir):
    from turbotune.inference import chat_loop, load_for_inference

    model, tok = load_for_inference(str(tiny_llama_dir), verbose=False)
    out = io.StringIO()
    chat_loop(model, tok, max_new_tokens=4, temperature=0.0, stdin=io.StringIO("hello\n/reset\nagain\n/exit\n"),
              stdout=out)
    text = out.getvalue()
    assert text.count("model> ") == 2 and text.count("you> ") == 4


def test_generate_command(tiny_llama_dir, capsys):
    rc = main(["generate", "--model", str(tiny_llama_dir), "--prompt", "Hi", "--max-new-tokens", "3"])
    assert rc == 0


def test_stop_ids_include_end_of_turn(smol_tokenizer):
    from turbotune.inference import _stop_ids
    assert smol_tokenizer.convert_tokens_to_ids("<|im_end|>") in _stop_ids(smol_tokenizer)


def test_train_switches_parse():
    """The switch pairs reach TrainConfig's fields: 4-bit double quant, packing, CUDA graphs, adapter precision."""
    p = build_parser()
    a = p.parse_args(["train", "--model", "m", "--data", "d", "--double-quant", "--no-packing", "--no-cuda-graphs",
                      "--adapter-precision", "input"])
    assert (a.double_quant, a.packing, a.cuda_graphs, a.adapter_precision) == (True, False, False, "input")
    a = p.parse_args(["train", "--model", "m", "--data", "d", "--no-double-quant", "--packing"])
    assert (a.double_quant, a.packing, a.cuda_graphs) == (False, True, None)


def _subparsers(parser):
    import argparse
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def test_every_flag_has_help():
    import argparse
    missing = [f"{name} {'/'.join(a.option_strings) or a.dest}"
               for name, sub in _subparsers(build_parser()).items() for a in sub._actions
               if not isinstance(a, (argparse._HelpAction, argparse._VersionAction)) and not (a.help or "").strip()]
    assert missing == []


def test_unknown_flag_names_the_likely_one(capsys):
    """Usage errors keep argparse's exit code 2; the message names the flag meant."""
    import pytest
    with pytest.raises(SystemExit) as e:
        main(["train", "--model", "m", "--learning-rate", "1e-4", "--epocs", "2"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "turbotune train: error: unknown flags --learning-rate (did you mean --lr?), " \
           "--epocs (did you mean --epochs?)" in err
    with pytest.raises(SystemExit) as e:
        main(["generate", "--prompt", "hi", "--max-tokens=5"])
    assert e.value.code == 2 and "unknown flag --max-tokens (did you mean --max-new-tokens?)" in capsys.readouterr().err
    # No abbreviations: argparse would take `--r 8` as --resume plus a stray 8.
    with pytest.raises(SystemExit):
        main(["train", "--r", "8"])
    assert "unknown flag --r (did you mean --lora-r?)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--jsn"])  # `turbotune [flags]` is `turbotune check [flags]`
    assert "turbotune check: error: unknown flag --jsn (did you mean --json?)" in capsys.readouterr().err


def test_max_steps_zero_is_refused(monkeypatch, capsys):
    """--max-steps 0 and -1 once trained a whole epoch silently; now they stop before anything loads."""
    from turbotune.fast_model import FastModel

    def no_load(*a, **k):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(FastModel, "from_pretrained", no_load)
    for argv in (["train", "--model", "m", "--max-steps", "0"], ["train", "--max-steps", "-1"],
                 ["demo", "--max-steps", "0"]):
        assert main(argv) == 1
        assert ("turbotune: error: 'max_steps' must be positive, got " + argv[-1] +
                "; to train by epochs leave it out and pass --epochs") in capsys.readouterr().err


def test_gradient_checkpointing_mode_flag(monkeypatch):
    """`--gradient-checkpointing auto` reaches the run's config as the planner's mode."""
    import turbotune.cli.train as runner
    seen = {}
    monkeypatch.setattr(runner, "run_training", lambda cfg, *a, **k: seen.setdefault("cfg", cfg))
    assert main(["train", "--model", "m", "--data", "d.jsonl", "--gradient-checkpointing", "auto"]) == 0
    assert seen["cfg"].gradient_checkpointing == "auto"


def test_export_push_flags_are_checked_before_any_work(tmp_path, capsys):
    """A malformed --push-to-hub repo id, or --private without it, fails at once: nothing is merged or written."""
    out = tmp_path / "out"
    rc = main(["export", "--adapter", str(tmp_path / "none"), "--out", str(out), "--push-to-hub", "alice/bad name"])
    assert rc != 0 and "not a Hub repo id" in capsys.readouterr().err and not out.exists()
    rc = main(["export", "--adapter", str(tmp_path / "none"), "--out", str(out), "--private"])
    assert rc != 0 and "--private goes with --push-to-hub" in capsys.readouterr().err and not out.exists()
