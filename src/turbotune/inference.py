"""Generation helpers behind `turbotune generate` and `turbotune chat`."""
from __future__ import annotations

import sys

import torch


def load_for_inference(model=None, adapter=None, dtype=None, load_in_4bit=False, verbose=True, allow_pickle=False):
    """(model, tokenizer) ready for generate: a base model, optionally with a trained adapter on top.

    `adapter` is a folder written by `turbotune train` (or any PEFT adapter folder). When the folder carries a
    tokenizer (turbotune saves it beside the adapter), that tokenizer is used, chat template included.
    """
    from pathlib import Path

    from turbotune.errors import ModelLoadError
    from turbotune.fast_model import FastModel

    base_name = model
    if adapter is not None:
        cfg_file = Path(adapter) / "adapter_config.json"
        if not cfg_file.is_file():
            raise ModelLoadError(f"{adapter} is not an adapter folder (no adapter_config.json); pass the folder "
                                 "that `turbotune train` wrote, e.g. outputs/last_checkpoint")
        if base_name is None:
            import json
            base_name = json.loads(cfg_file.read_text())["base_model_name_or_path"] or None
    m, tok = FastModel.from_pretrained(base_name, dtype=dtype, load_in_4bit=load_in_4bit, patch=False,
                                       verbose=verbose, allow_pickle=allow_pickle)
    if adapter is not None:
        from peft import PeftModel
        try:
            m = PeftModel.from_pretrained(m, str(adapter))
        except RuntimeError as e:
            if "size mismatch" in str(e):
                raise ModelLoadError(f"the adapter in {adapter} was trained on a different base model than "
                                     f"{base_name} (shape mismatch); pass --model with its own base") from e
            raise
        if (Path(adapter) / "tokenizer_config.json").is_file():
            from turbotune.model.loader import load_tokenizer
            tok = load_tokenizer(str(adapter), True)
    FastModel.for_inference(m)
    return m, tok


def _stop_ids(tokenizer) -> list[int]:
    from turbotune.data.chat_templates import end_of_turn_token
    ids = set()
    for tok in (end_of_turn_token(tokenizer), tokenizer.eos_token):
        if tok is not None:
            tid = tokenizer.convert_tokens_to_ids(tok)
            if isinstance(tid, int) and tid != getattr(tokenizer, "unk_token_id", None):
                ids.add(tid)
    return sorted(ids)


def chat_inputs(tokenizer, messages, device):
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        enc = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    else:
        enc = tokenizer(messages[-1]["content"], return_tensors="pt")
    return {k: v.to(device) for k, v in enc.items()}


@torch.inference_mode()
def generate_reply(model, tokenizer, messages, max_new_tokens=128, temperature=0.0, top_p=0.9, stream=False,
                   out=None) -> str:
    """Answer the last user message of `messages` (greedy when temperature is 0)."""
    device = next(model.parameters()).device
    enc = chat_inputs(tokenizer, messages, device)
    kwargs = dict(max_new_tokens=max_new_tokens, eos_token_id=_stop_ids(tokenizer),
                  pad_token_id=tokenizer.pad_token_id, do_sample=temperature > 0)
    if temperature > 0:
        kwargs.update(temperature=temperature, top_p=top_p)
    if stream:
        from transformers import TextStreamer

        class _Out(TextStreamer):
            def on_finalized_text(self, text, stream_end=False):
                print(text, end="" if not stream_end else "\n", file=out or sys.stdout, flush=True)

        kwargs["streamer"] = _Out(tokenizer, skip_prompt=True, skip_special_tokens=True)
    ids = model.generate(**enc, **kwargs)
    text = tokenizer.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    # A token budget can end inside a multi-byte character (CJK, emoji): drop the dangling replacement mark.
    return text.rstrip("\ufffd").strip()


def chat_loop(model, tokenizer, system=None, max_new_tokens=256, temperature=0.7, stdin=None, stdout=None):
    """Interactive chat: streams tokens; empty line or /exit quits, /reset clears the history."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    history = [{"role": "system", "content": system}] if system else []
    print("[turbotune] chat: type a message; /reset clears the conversation, /exit (or Ctrl-D) quits", file=stdout)
    while True:
        print("you> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line or line.strip() in ("/exit", "/quit"):
            print(file=stdout)
            return
        line = line.strip()
        if not line:
            continue
        if line == "/reset":
            history = history[:1] if system else []
            continue
        history.append({"role": "user", "content": line})
        print("model> ", end="", file=stdout, flush=True)
        reply = generate_reply(model, tokenizer, history, max_new_tokens, temperature, stream=True, out=stdout)
        history.append({"role": "assistant", "content": reply})
