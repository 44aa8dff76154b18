"""The command line: help, chat stops at the end-of-turn token, generate streams an answer."""
import io

from turbotune.cli import build_parser, main


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
