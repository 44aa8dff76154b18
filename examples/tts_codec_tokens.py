"""Text-to-speech language-model training in miniature: a Llama learns to answer text with audio-codec tokens.

    python examples/tts_codec_tokens.py [--steps 150] [--codec-tokens 64] [--out outputs/tts-tiny]

TTS models such as Orpheus and Llasa are Llama models whose vocabulary was extended with the tokens of an audio
codec (thousands of them, plus control tokens), then trained on "text -> codec tokens" rows; a codec decoder turns
the generated tokens into sound. This script does the same at toy scale, offline and on a CPU in about a minute:
a tiny random Llama, the SmolLM2 tokenizer grown by `--codec-tokens` codec tokens and two control tokens, a
synthetic "codec" (each letter of the text becomes one codec token), the new embedding and head rows trained
through PEFT's `trainable_token_indices` and LoRA on every projection, on turbotune's fused path (the loss through
the fused head, the new rows in its weight). At the end it generates codec tokens for a few texts and prints how
many match the synthetic codec. The same calls apply to a real TTS base (`FastModel.from_pretrained(path)`,
`tokenizer.add_tokens`, `resize_token_embeddings`, `trainable_token_indices` = the new ids).
"""
from __future__ import annotations

import argparse
import random
import string
import tempfile

import torch

from turbotune import FastModel
from turbotune.model.default_model import default_model_dir
from turbotune.training.config import TrainConfig
from turbotune.training.trainer import Trainer

START, END = "<start_of_speech>", "<end_of_speech>"


def codec_of(text: str, n_codes: int) -> list[int]:
    """The synthetic codec: letter i of the alphabet -> code (7i mod n_codes); other characters -> none."""
    return [(7 * string.ascii_lowercase.index(ch)) % n_codes for ch in text.lower() if ch in string.ascii_lowercase]


def spelled(text: str) -> str:
    """One token per letter in the SmolLM2 tokenizer (" h e l l o"), so letters and codes line up."""
    return "".join(" " + ch for ch in text)


def build(n_codes: int, folder: str):
    """A tiny random Llama saved with the SmolLM2 tokenizer grown by the codec and control tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tok = AutoTokenizer.from_pretrained(default_model_dir())
    base_vocab = len(tok)
    tok.add_tokens([f"<c{i}>" for i in range(n_codes)] + [START, END], special_tokens=True)
    cfg = LlamaConfig(vocab_size=base_vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return base_vocab


def rows(tok, n_codes: int, n: int, seed: int) -> list[dict]:
    """"text -> <start_of_speech> codes <end_of_speech>" samples; only the speech part is trained (labels)."""
    rng = random.Random(seed)
    code_ids = tok.convert_tokens_to_ids([f"<c{i}>" for i in range(n_codes)])
    start, end = tok.convert_tokens_to_ids([START, END])
    out = []
    for _ in range(n):
        text = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 6)))
        prompt = tok(spelled(text), add_special_tokens=False)["input_ids"] + [start]
        speech = [code_ids[c] for c in codec_of(text, n_codes)] + [end]
        out.append({"input_ids": prompt + speech, "labels": [-100] * len(prompt) + speech})
    return out


def speak(model, tok, text: str, n_codes: int) -> tuple[list[int], int]:
    """Greedy codec tokens for `text` (until <end_of_speech>), and how many equal the synthetic codec's."""
    start, end = tok.convert_tokens_to_ids([START, END])
    ids = torch.tensor([tok(spelled(text), add_special_tokens=False)["input_ids"] + [start]])
    want = codec_of(text, n_codes)
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=len(want) + 1, do_sample=False, eos_token_id=end,
                             pad_token_id=tok.pad_token_id)
    first_code = tok.convert_tokens_to_ids("<c0>")
    got = [t - first_code for t in out[0, ids.shape[1]:].tolist() if first_code <= t < first_code + n_codes]
    return got, sum(a == b for a, b in zip(got, want))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--codec-tokens", type=int, default=64)
    ap.add_argument("--out", default=None, help="output folder (default: a temporary one)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder, out = f"{tmp}/base", args.out or f"{tmp}/run"
        base_vocab = build(args.codec_tokens, folder)
        model, tok = FastModel.from_pretrained(folder, dtype=torch.float32, verbose=False)
        model.resize_token_embeddings(len(tok))  # the codec and control rows, new
        new_ids = list(range(base_vocab, len(tok)))
        model = FastModel.get_peft_model(model, r=16, lora_alpha=16, random_state=0, verbose=False,
                                         use_gradient_checkpointing=False,
                                         trainable_token_indices={"embed_tokens": new_ids, "lm_head": new_ids})
        cfg = TrainConfig(output_dir=out, max_steps=args.steps, batch_size=8, grad_accum=1, lr=3e-3,
                          warmup_steps=5, max_seq_length=64, seed=0, logging_steps=25, overwrite=True)
        result = Trainer(cfg, model, tok, rows(tok, args.codec_tokens, 2000, seed=1), progress=False).train()
        model.eval()
        matched = total = 0
        for text in ("hello", "speech", "codec"):
            got, ok = speak(model, tok, text, args.codec_tokens)
            matched, total = matched + ok, total + len(text)
            print(f"{text!r} -> codec tokens {got}  ({ok} of {len(text)} as the codec)")
        losses = [h["loss"] for h in result.history]
        print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; {matched} of {total} codec tokens right")
        return {"first_loss": losses[0], "last_loss": losses[-1], "matched": matched, "total": total}


if __name__ == "__main__":
    main()
