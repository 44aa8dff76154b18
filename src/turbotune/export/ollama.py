"""Ollama export: the GGUF (export/gguf.py) plus a `Modelfile` beside it, for `ollama create NAME -f OUT/Modelfile`.

The Modelfile names the GGUF (`FROM ./model-<quant>.gguf`), gives a `TEMPLATE` in Ollama's Go-template syntax and
one `PARAMETER stop` line for every token that ends a turn or the text. Without those stops an Ollama model can run
on past its answer; that is what this file is for.

Ollama cannot run the tokenizer's Jinja chat template, so FORMATS below describes the chat layouts turbotune's
families use, each turned into a Go template by `go_template`. `detect` renders a few probe conversations with the
tokenizer's own `apply_chat_template(..., add_generation_prompt=True)` and keeps the first layout whose rendering is
the same text on every probe (with the tokenizer's default system prompt, when it adds one). When none is, the
Modelfile has no TEMPLATE and the export says so: Ollama then goes by the chat template embedded in the GGUF.

What the Go templates cannot do: Jinja's `| trim` (Llama 3 and Gemma trim each message; Ollama passes text as it
is, so only text without surrounding whitespace renders the same), and Ollama joins consecutive messages of one
role into one. A conversation that ends with an assistant message gets a new assistant header after it, as
`add_generation_prompt=True` does. A BOS token that the tokenizer adds by itself (and so llama.cpp, from the GGUF's
`add_bos_token`) is left out of the template, where the Jinja template writes it as text.
"""
from __future__ import annotations

import io
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

MODELFILE = "Modelfile"


@dataclass(frozen=True)
class ChatFormat:
    """A chat layout: each message is `before + content + after` for its role.

    `turns`: (role, before, after); role "*" stands for every role not listed, "{role}" in `before` for the
    role's name, "{eos}" for the tokenizer's eos token. `generation` opens the assistant's answer. `fold`: None
    when a system message is a turn of its own, else "first" or "last": the system text, then `fold_sep`, opens
    that user message instead. `stops`: the tokens that end a turn in this layout.
    """
    name: str
    turns: tuple[tuple[str, str, str], ...]
    generation: str = ""
    fold: str | None = None
    fold_sep: str = "\n\n"
    stops: tuple[str, ...] = ()


FORMATS = (
    ChatFormat("chatml", (("*", "<|im_start|>{role}\n", "<|im_end|>\n"),), "<|im_start|>assistant\n",
               stops=("<|im_end|>",)),
    ChatFormat("llama-3", (("*", "<|start_header_id|>{role}<|end_header_id|>\n\n", "<|eot_id|>"),),
               "<|start_header_id|>assistant<|end_header_id|>\n\n", stops=("<|eot_id|>",)),
    ChatFormat("gemma", (("assistant", "<start_of_turn>model\n", "<end_of_turn>\n"),
                         ("*", "<start_of_turn>{role}\n", "<end_of_turn>\n")), "<start_of_turn>model\n",
               fold="first", stops=("<end_of_turn>",)),
    ChatFormat("phi-3", (("*", "<|{role}|>\n", "<|end|>\n"),), "<|assistant|>\n", stops=("<|end|>",)),
    # Mistral's instruct layouts (tokenizer v1: spaces around [INST], the system text in the first user turn;
    # v3: none before [/INST], the system text in the last user turn; Tekken: no spaces at all). No generation
    # prompt: [/INST] is where the answer starts.
    ChatFormat("mistral-v1", (("user", " [INST] ", " [/INST]"), ("assistant", " ", "{eos}")), fold="first",
               stops=("{eos}",)),
    ChatFormat("mistral-v3", (("user", "[INST] ", "[/INST]"), ("assistant", " ", "{eos}")), fold="last",
               stops=("{eos}",)),
    ChatFormat("mistral-tekken", (("user", "[INST]", "[/INST]"), ("assistant", "", "{eos}")), fold="last",
               stops=("{eos}",)),
    ChatFormat("alpaca", (("system", "", "\n\n"), ("assistant", "### Response:\n", "{eos}\n\n"),
                          ("*", "### Instruction:\n", "\n\n")), "### Response:\n", stops=("{eos}",)),
)

# Special tokens that end a turn or the text in the common families; each is a stop where the tokenizer has it.
END_MARKERS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<end_of_turn>",
               "<eos>", "<|end|>", "</s>", "<|END_OF_TURN_TOKEN|>", "<|return|>")

_SYSTEM = "You answer in one short sentence."
# Probe conversations; each ends with a user message and is rendered with add_generation_prompt=True.
PROBES = (
    ({"role": "system", "content": _SYSTEM}, {"role": "user", "content": "What is the capital of France?"}),
    ({"role": "user", "content": "Hi there!"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Name a colour."}),
    ({"role": "user", "content": "Say yes."},),
    ({"role": "system", "content": _SYSTEM}, {"role": "user", "content": "Count to two."},
     {"role": "assistant", "content": "One, two."}, {"role": "user", "content": "And to three?"}),
)


@dataclass(frozen=True)
class Match:
    """A layout that renders as the tokenizer does: `lead` is the text the Jinja template starts with, before the
    first message (a BOS written as text, or "");
    `default_system` the system prompt the tokenizer's template adds when a conversation has none."""
    format: ChatFormat
    eos: str
    lead: str = ""
    default_system: str | None = None


def _turn(fmt: ChatFormat, role: str, eos: str) -> tuple[str, str] | None:
    """(before, after) of a message of `role`, or None where the layout drops that role."""
    found = next((t for t in fmt.turns if t[0] == role), None) or next((t for t in fmt.turns if t[0] == "*"), None)
    if found is None:
        return None
    return found[1].replace("{role}", role).replace("{eos}", eos), found[2].replace("{eos}", eos)


def _fold_target(fmt: ChatFormat, messages) -> tuple[str, int]:
    """(system text, index of the user message it opens) for a folding layout: the last system message's text."""
    system, at = "", -1
    for i, m in enumerate(messages):
        if m["role"] == "system":
            system = m["content"]
        elif m["role"] == "user" and (fmt.fold == "last" or at == -1):
            at = i
    return system, at


def render(fmt: ChatFormat, messages, eos: str = "", default_system: str | None = None) -> str:
    """What the Go template of `fmt` renders for `messages` (Python's reading of it; detection compares this)."""
    system, at = _fold_target(fmt, messages) if fmt.fold else ("", -1)
    out = []
    for i, m in enumerate(messages):
        if i == 0 and default_system is not None and m["role"] != "system":
            before, after = _turn(fmt, "system", eos)
            out.append(before + default_system + after)
        if fmt.fold and m["role"] == "system":
            continue
        content = m["content"]
        if fmt.fold and i == at and system:
            content = system + fmt.fold_sep + content
        turn = _turn(fmt, m["role"], eos)
        if turn is not None:
            out.append(turn[0] + content + turn[1])
    return "".join(out) + fmt.generation


def _message_go(fmt: ChatFormat, eos: str) -> str:
    """The Go template of one message (inside `range`, where `.` is the message): an if-chain on `.Role`."""
    def body(role: str | None, content: str = "{{ .Content }}") -> str:
        found = next(t for t in fmt.turns if t[0] == (role or "*"))
        before = found[1].replace("{role}", "{{ .Role }}").replace("{eos}", eos)
        return before + content + found[2].replace("{eos}", eos)

    listed = [t[0] for t in fmt.turns if t[0] != "*"]
    branches = [(role, body(role)) for role in listed]
    if fmt.fold:
        opened = "{{ if eq $i $at }}{{ if $sys }}{{ $sys }}" + fmt.fold_sep + "{{ end }}{{ end }}{{ .Content }}"
        user = body("user" if "user" in listed else None, opened)
        branches = [("system", ""), ("user", user)] + [b for b in branches if b[0] not in ("system", "user")]
    fallback = body(None) if any(t[0] == "*" for t in fmt.turns) else None
    if not branches:
        return fallback or ""
    chain = "".join(("{{ if " if k == 0 else "{{ else if ") + f'eq .Role "{role}" }}}}' + text
                    for k, (role, text) in enumerate(branches))
    return chain + ("{{ else }}" + fallback if fallback is not None else "") + "{{ end }}"


def go_template(fmt: ChatFormat, eos: str = "", default_system: str | None = None, lead: str = "") -> str:
    """The Ollama TEMPLATE of `fmt`: `lead`, every message of .Messages, then the generation prompt."""
    if fmt.fold:
        pick = "{{ $at = $i }}" if fmt.fold == "last" else "{{ if eq $at -1 }}{{ $at = $i }}{{ end }}"
        head = ('{{ $sys := "" }}{{ $at := -1 }}{{ range $i, $m := .Messages }}{{ if eq .Role "system" }}'
                '{{ $sys = .Content }}{{ else if eq .Role "user" }}' + pick + "{{ end }}{{ end }}"
                "{{ range $i, $m := .Messages }}")
    elif default_system is not None:
        before, after = _turn(fmt, "system", eos)
        head = ('{{ range $i, $m := .Messages }}{{ if eq $i 0 }}{{ if eq .Role "system" }}{{ else }}'
                + before + default_system + after + "{{ end }}{{ end }}")
    else:
        head = "{{ range .Messages }}"
    return lead + head + _message_go(fmt, eos) + "{{ end }}" + fmt.generation


def adds_bos(tok) -> bool:
    """Whether the tokenizer puts BOS before text by itself (what the GGUF's add_bos_token says; gguf.py)."""
    ids = tok("a").input_ids
    return bool(tok.bos_token_id is not None and ids and ids[0] == tok.bos_token_id)


def _probe_renderings(tok) -> list[tuple[tuple, str]]:
    """(probe, the tokenizer's rendering) for each probe its template accepts (Gemma 2's refuses a system role)."""
    done = []
    for probe in PROBES:
        try:
            text = tok.apply_chat_template(list(probe), tokenize=False, add_generation_prompt=True)
        except Exception:  # noqa: BLE001 - raise_exception() in the template: the model has no such conversation
            continue
        if isinstance(text, str):
            done.append((probe, text))
    return done


def _default_system(fmt: ChatFormat, renderings, lead: str, eos: str) -> str | None:
    """The system prompt the tokenizer's template adds to a conversation without one (seen on the user-only
    probe), where `fmt` writes system turns of its own; else None."""
    if fmt.fold or _turn(fmt, "system", eos) is None:
        return None
    before, after = _turn(fmt, "system", eos)
    for probe, text in renderings:
        bare = render(fmt, probe, eos)
        head = text[len(lead):-len(bare)] if len(probe) == 1 and bare and text.endswith(bare) else ""
        if len(head) > len(before) + len(after) and head.startswith(before) and head.endswith(after):
            return head[len(before):len(head) - len(after)]
    return None


def _lead(fmt: ChatFormat, renderings, eos: str) -> str | None:
    """The text the tokenizer's template writes before the first message (a BOS written as text, say): what
    precedes `fmt`'s rendering of a probe with a system message (no default system prompt there); None if `fmt`'s
    rendering does not end that text."""
    probe, text = next(((p, t) for p, t in renderings if p[0]["role"] == "system"), renderings[0])
    tail = render(fmt, probe, eos)
    return text[:len(text) - len(tail)] if text.endswith(tail) else None


def detect(tok) -> tuple[Match | None, str]:
    """(the layout the tokenizer's chat template renders as, or None; a few words on how it was decided)."""
    if not getattr(tok, "chat_template", None):
        return None, "the tokenizer has no chat template"
    renderings = _probe_renderings(tok)
    if not any(any(m["role"] == "assistant" for m in probe) for probe, _ in renderings):
        return None, "the tokenizer's chat template refuses the probe conversations"
    eos = tok.eos_token or ""
    for fmt in FORMATS:
        lead = _lead(fmt, renderings, eos)
        default = None if lead is None else _default_system(fmt, renderings, lead, eos)
        if lead is None or not all(text == lead + render(fmt, probe, eos, default) for probe, text in renderings):
            continue
        if any("{{" in s or '"""' in s for s in (lead, default or "")):
            return None, (f"the tokenizer's chat template renders as the {fmt.name} layout, but with text that a "
                          "Modelfile template cannot hold ('{{' or '\"\"\"')")
        with_default = "" if default is None else ", with its default system prompt"
        return Match(fmt, eos, lead, default), (f"the tokenizer's chat template renders as the {fmt.name} layout"
                                                f"{with_default}, on {len(renderings)} probe conversations")
    names = ", ".join(f.name for f in FORMATS)
    return None, f"the tokenizer's chat template renders as none of turbotune's Ollama layouts ({names})"


def stop_tokens(tok, match: Match | None = None, extra_ids=()) -> list[str]:
    """Every token that ends a turn or the text: the layout's end-of-turn tokens, the template's (chat_templates.
    end_of_turn_token), eos, `extra_ids` (e.g. generation_config's eos_token_id list) and the END_MARKERS that
    are special tokens of this tokenizer; in that order, each once."""
    from turbotune.data.chat_templates import end_of_turn_token

    eos = tok.eos_token or ""
    found = [s.replace("{eos}", eos) for s in (match.format.stops if match else ())]
    found += [end_of_turn_token(tok), eos]
    found += [tok.convert_ids_to_tokens(int(i)) for i in extra_ids if i is not None and 0 <= int(i) < len(tok)]
    special = set(tok.get_added_vocab()) | set(getattr(tok, "all_special_tokens", ()))
    found += [t for t in END_MARKERS if t in special]
    return list(dict.fromkeys(t for t in found if isinstance(t, str) and t))


def modelfile(tok, gguf_name: str, extra_stop_ids=()) -> tuple[str, str | None]:
    """(the Modelfile's text, a line to print when it has no TEMPLATE, else None)."""
    match, why = detect(tok)
    lines = [f"# Ollama Modelfile written by turbotune: ollama create NAME -f {MODELFILE} (from this folder)",
             f"FROM ./{gguf_name}"]
    note = None
    if match is not None:
        lead, bos = match.lead, tok.bos_token or ""
        if bos and lead.startswith(bos) and adds_bos(tok):  # llama.cpp adds BOS itself where the tokenizer does
            lead = lead[len(bos):]
        lines.insert(1, f"# TEMPLATE: {why}")
        lines.append('TEMPLATE """' + go_template(match.format, match.eos, match.default_system, lead) + '"""')
    else:
        note = (f"Modelfile written without TEMPLATE: {why}; Ollama will go by the chat template embedded in the "
                "GGUF (one of its own templates that resembles it, else the bare prompt)")
        lines.insert(1, f"# No TEMPLATE: {why}.")
    lines += [f'PARAMETER stop "{t}"' for t in stop_tokens(tok, match, extra_stop_ids)]
    return "\n".join(lines) + "\n", note


def _generation_eos_ids(path: str, local_only: bool) -> list[int]:
    """generation_config's eos_token_id (an id or a list: Llama 3 Instruct lists <|eot_id|> and more), or []."""
    try:
        from transformers import GenerationConfig
        ids = GenerationConfig.from_pretrained(path, local_files_only=local_only).eos_token_id
    except Exception:  # noqa: BLE001 - a model without generation_config.json
        return []
    return [ids] if isinstance(ids, int) else list(ids or [])


def export_ollama(adapter: Path, out: Path, quant="f16", base=None, stream=None, merge_into="auto") -> Path:
    """Write `out/model-<quant>.gguf` (export_gguf) and `out/Modelfile`, the folder atomically (an older `out` is
    replaced, as the other export kinds do)."""
    from turbotune.export.export import MERGE_REPORT
    from turbotune.export.gguf import check_quant, export_gguf
    from turbotune.model.loader import load_tokenizer, resolve_model_path
    from turbotune.training.checkpoints import write_atomically

    quant = check_quant(quant)
    base_name = base or json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
    path, local_only = resolve_model_path(base_name)
    own = (adapter / "tokenizer_config.json").is_file()  # the tokenizer the GGUF gets (as merge_adapter picks it)
    tok = load_tokenizer(str(adapter) if own else path, True if own else local_only)
    say = stream or sys.stdout
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.ollama-", dir=out.parent) as tmp:
        said = io.StringIO()
        built = export_gguf(adapter, Path(tmp) / "gguf", quant=quant, base=base, stream=said, merge_into=merge_into)
        report = json.loads((built / MERGE_REPORT).read_text())  # which file is the asked quant
        gguf_name = report.get("gguf_llama_cpp_file") or report["gguf_file"]
        text, note = modelfile(tok, gguf_name, _generation_eos_ids(path, local_only))

        def write(dest: Path):
            for f in built.iterdir():
                os.replace(f, dest / f.name)
            (dest / MODELFILE).write_text(text, encoding="utf-8")

        written = write_atomically(out, write)
        for line in said.getvalue().splitlines():  # its paths name the temporary folder: say the final one
            print(line.replace(str(built), str(written)), file=say, flush=True)
    if note:
        print(f"[turbotune] {note}", file=say, flush=True)
    print(f"[turbotune] Ollama Modelfile written to {written / MODELFILE}: ollama create NAME -f "
          f"{written / MODELFILE}", file=say, flush=True)
    return written
