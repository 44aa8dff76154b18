"""Ollama export: the Modelfile's TEMPLATE, run by a small Go-template renderer written here, gives the tokenizer's
own chat template rendering; every EOS / end-of-turn token is a stop; `export(how="ollama")` writes the GGUF and a
Modelfile naming it; a chat template turbotune has no Ollama layout for gets no TEMPLATE, and the export says why."""
from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

from conftest import nonzero_lora_b
from turbotune.data.chat_templates import TEMPLATES
from turbotune.errors import TurbotuneError
from turbotune.export.export import export
from turbotune.export.ollama import modelfile

# --- a Go text/template renderer for the subset the Modelfiles use ------------------------------------------------
# Text, {{ range .Messages }} and {{ range $i, $m := .Messages }}, {{ if P }} / {{ else if P }} / {{ else }} /
# {{ end }}, {{ $x := P }} and {{ $x = P }} (Go scoping: a block's variables end with it; `=` sets the nearest),
# and printing. P: `eq A B` or one value: .Field of dot, $var, $var.Field, "string", an integer, true / false.
# Anything else (trim markers, other functions) fails the test rather than being guessed at.

_ACTION = re.compile(r"{{(.*?)}}", re.S)
_WORDS = re.compile(r'"(?:[^"\\]|\\.)*"|\S+')


def _parse(template: str) -> list:
    root: list = []
    blocks = [{"kind": "root", "body": root}]
    pos = 0
    for m in _ACTION.finditer(template):
        if template[pos:m.start()]:
            blocks[-1]["body"].append(template[pos:m.start()])
        pos = m.end()
        raw = m.group(1)
        assert raw[:1] == " " and raw[-1:] == " ", f"trim markers or odd spacing are outside this renderer: {raw!r}"
        act, top = raw.strip(), blocks[-1]
        if act.startswith("range "):
            head = re.fullmatch(r"range (?:\$(\w+), \$(\w+) := )?(.+)", act)
            node = {"kind": "range", "index": head[1], "item": head[2], "expr": head[3], "body": []}
        elif act.startswith("if "):
            node = {"kind": "if", "branches": [(act[3:], [])], "else": None}
            node["body"] = node["branches"][0][1]
        elif act.startswith("else if "):
            assert top["kind"] == "if" and top["else"] is None
            top["branches"].append((act[8:], []))
            top["body"] = top["branches"][-1][1]
            continue
        elif act == "else":
            assert top["kind"] == "if" and top["else"] is None, "range-else is outside this renderer"
            top["else"] = top["body"] = []
            continue
        elif act == "end":
            blocks.pop()
            continue
        else:
            blocks[-1]["body"].append(("action", act))
            continue
        blocks[-1]["body"].append(node)
        blocks.append(node)
    assert len(blocks) == 1, "unclosed block"
    root.extend([template[pos:]] if template[pos:] else [])
    return root


def _value(word: str, dot, scopes: list[dict]):
    if word.startswith('"'):
        return json.loads(word)
    if re.fullmatch(r"-?\d+", word):
        return int(word)
    if word in ("true", "false"):
        return word == "true"
    if word.startswith("."):
        return dot[word[1:]]
    name, _, field = word[1:].partition(".")
    assert word.startswith("$"), f"unsupported operand {word!r}"
    value = next(s[name] for s in reversed(scopes) if name in s)
    return value[field] if field else value


def _pipeline(expr: str, dot, scopes):
    words = _WORDS.findall(expr)
    if words[0] == "eq":
        a, b = (_value(w, dot, scopes) for w in words[1:])
        assert type(a) is type(b), f"Go's eq fails on {a!r} and {b!r}"
        return a == b
    assert len(words) == 1, f"unsupported pipeline {expr!r}"
    return _value(words[0], dot, scopes)


def _run(nodes: list, dot, scopes: list[dict], out: list):
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, tuple):
            act = node[1]
            setter = re.fullmatch(r"\$(\w+) (:?=) (.+)", act)
            if setter is None:
                out.append(str(_pipeline(act, dot, scopes)))
            elif setter[2] == ":=":
                scopes[-1][setter[1]] = _pipeline(setter[3], dot, scopes)
            else:
                owner = next(s for s in reversed(scopes) if setter[1] in s)
                owner[setter[1]] = _pipeline(setter[3], dot, scopes)
        elif node["kind"] == "range":
            for i, item in enumerate(_pipeline(node["expr"], dot, scopes)):
                scope = {node["index"]: i, node["item"]: item} if node["index"] else {}
                _run(node["body"], item, scopes + [scope], out)
        else:
            body = next((b for cond, b in node["branches"] if _pipeline(cond, dot, scopes)), node["else"])
            _run(body or [], dot, scopes + [{}], out)


def render_go(template: str, messages) -> str:
    """The template run on Ollama's chat values: .Messages of {Role, Content}, .System the system texts joined."""
    data = {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages],
            "System": "\n\n".join(m["content"] for m in messages if m["role"] == "system")}
    out: list = []
    _run(_parse(template), data, [{}], out)
    return "".join(out)


def test_the_renderer_itself():
    """Go's scoping and branches as text/template has them, on a template written here."""
    t = ('{{ $n := "" }}{{ range $i, $m := .Messages }}{{ if eq $i 0 }}[{{ .Role }}]{{ else if eq .Role "user" }}'
         '<{{ $m.Content }}>{{ $n = .Content }}{{ else }}({{ .Content }}){{ end }}{{ $x := 5 }}{{ end }}|{{ $n }}')
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    assert render_go(t, msgs) == "[system]<u>(a)|u"
    with pytest.raises(AssertionError):
        render_go("{{- .System }}", msgs)
    with pytest.raises(StopIteration):  # $x was the range body's own
        render_go("{{ range .Messages }}{{ $x := 1 }}{{ end }}{{ $x }}", msgs)


# --- tokenizers with real chat templates, built offline on the SmolLM2 vocabulary -----------------------------------

# Meta-Llama-3-8B-Instruct's chat template (tokenizer_config.json): bos_token once, each message trimmed.
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>'"
          " + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if "
          "loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if "
          "add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
# Gemma 2's: no system role (raise_exception), the assistant is "model".
GEMMA2 = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
          "{% endif %}{% for message in messages %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
          "{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content']"
          " | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}"
          "{% endif %}")
# Mistral's instruct layouts as Mistral's tokenization guide gives them: v1 puts the system text in the first user
# turn, v3 in the last; no generation prompt.
_MISTRAL = ("{%- if messages[0]['role'] == 'system' -%}{%- set system = messages[0]['content'] -%}"
            "{%- set turns = messages[1:] -%}{%- else -%}{%- set system = '' -%}{%- set turns = messages -%}"
            "{%- endif -%}{{- bos_token -}}{%- for m in turns -%}{%- if m['role'] == 'user' -%}"
            "{%- set text = (system + '\n\n' + m['content']) if (loop.WHICH and system) else m['content'] -%}"
            "{{- OPEN + text + CLOSE -}}{%- else -%}{{- ' ' + m['content'] + eos_token -}}{%- endif -%}"
            "{%- endfor -%}")
MISTRAL_V1 = _MISTRAL.replace("WHICH", "first").replace("OPEN", "' [INST] '").replace("CLOSE", "' [/INST]'")
MISTRAL_V3 = _MISTRAL.replace("WHICH", "last").replace("OPEN", "'[INST] '").replace("CLOSE", "'[/INST]'")

_LLAMA3_TOKENS = dict(bos="<|begin_of_text|>", eos="<|eot_id|>",
                      extra=("<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>"))
_GEMMA_TOKENS = dict(bos="<bos>", eos="<eos>", extra=("<start_of_turn>", "<end_of_turn>"), bos_on_encode=True)
_MISTRAL_TOKENS = dict(bos="<s>", eos="</s>", bos_on_encode=True)

# name: (template (None: the tokenizer's own), tokens, the layout expected, the end tokens that must be stops)
CASES = {
    "smollm2": (None, {}, "chatml", {"<|im_end|>", "<|endoftext|>"}),
    "qwen2.5": (TEMPLATES["qwen2.5"], {}, "chatml", {"<|im_end|>", "<|endoftext|>"}),
    "llama-3": (LLAMA3, dict(_LLAMA3_TOKENS, bos_on_encode=True), "llama-3",
                {"<|eot_id|>", "<|end_of_text|>", "<|eom_id|>"}),
    "llama-3, BOS not added on encode": (LLAMA3, _LLAMA3_TOKENS, "llama-3", {"<|eot_id|>", "<|end_of_text|>"}),
    "turbotune llama-3": (TEMPLATES["llama-3"], dict(_LLAMA3_TOKENS, bos_on_encode=True), "llama-3",
                          {"<|eot_id|>", "<|end_of_text|>"}),
    "turbotune gemma": (TEMPLATES["gemma"], _GEMMA_TOKENS, "gemma", {"<end_of_turn>", "<eos>"}),
    "gemma-2": (GEMMA2, _GEMMA_TOKENS, "gemma", {"<end_of_turn>", "<eos>"}),
    "turbotune phi-3": (TEMPLATES["phi-3"], dict(eos="<|endoftext|>", extra=("<|user|>", "<|assistant|>",
                                                                             "<|system|>", "<|end|>")),
                        "phi-3", {"<|end|>", "<|endoftext|>"}),
    "mistral v1": (MISTRAL_V1, _MISTRAL_TOKENS, "mistral-v1", {"</s>"}),
    "mistral v3": (MISTRAL_V3, _MISTRAL_TOKENS, "mistral-v3", {"</s>"}),
    "turbotune alpaca": (TEMPLATES["alpaca"], {}, "alpaca", {"<|im_end|>"}),
}

CONVERSATIONS = [
    [{"role": "user", "content": "Hello"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"},
     {"role": "assistant", "content": "A2"}, {"role": "user", "content": "Q3"}],
    [{"role": "system", "content": "Use lists.\nAlways."}, {"role": "user", "content": "Two lines\nhere"},
     {"role": "assistant", "content": "Sure:\n- a"}, {"role": "user", "content": "Ça va? 日本 {x}"}],
    [{"role": "user", "content": "First\nsecond"}, {"role": "assistant", "content": "Yes."},
     {"role": "user", "content": "Why?"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"}, {"role": "assistant", "content": "A1"},
     {"role": "user", "content": "U2"}, {"role": "assistant", "content": "A2"}, {"role": "user", "content": "U3"}],
]


def build_tokenizer(smol_dir, template=None, bos=None, eos=None, extra=(), bos_on_encode=False):
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smol_dir))
    special = {k: v for k, v in (("bos_token", bos), ("eos_token", eos)) if v}
    if special:
        tok.add_special_tokens(special)
    if extra:
        tok.add_tokens(list(extra), special_tokens=True)
    if bos_on_encode:  # as Llama 3's and Gemma's own tokenizers do
        tok.backend_tokenizer.post_processor = TemplateProcessing(
            single=f"{tok.bos_token} $A", pair=f"{tok.bos_token} $A {tok.bos_token} $B",
            special_tokens=[(tok.bos_token, tok.bos_token_id)])
    if template is not None:
        tok.chat_template = template
    return tok


def parse_modelfile(text: str) -> dict:
    template = re.search(r'^TEMPLATE """(.*?)"""$', text, re.S | re.M)
    return {"from": re.findall(r"^FROM (.+)$", text, re.M), "template": template[1] if template else None,
            "stops": re.findall(r'^PARAMETER stop "(.+)"$', text, re.M),
            "commands": [ln.split()[0] for ln in re.sub(r'""".*?"""', "T", text, flags=re.S).splitlines()
                         if ln and not ln.startswith("#")]}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, smol_dir):
    template, tokens, layout, ends = CASES[request.param]
    return build_tokenizer(smol_dir, template, **tokens), layout, ends


def test_template_renders_as_the_tokenizer(case):
    tok, layout, _ = case
    text, note = modelfile(tok, "model-f16.gguf")
    parsed = parse_modelfile(text)
    assert note is None and f"the {layout} layout" in text
    assert parsed["template"] and '"""' not in parsed["template"]
    ids = tok("a").input_ids
    runtime_bos = tok.bos_token if ids[0] == tok.bos_token_id else ""  # llama.cpp adds it from the GGUF
    compared = 0
    for conversation in CONVERSATIONS:
        try:
            want = tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        except Exception:  # Gemma 2 has no system role
            continue
        assert runtime_bos + render_go(parsed["template"], conversation) == want, conversation
        compared += 1
    assert compared >= 3
    if runtime_bos:
        assert tok.bos_token not in parsed["template"]  # else the prompt would start with two
    assert parsed["commands"] == ["FROM", "TEMPLATE"] + ["PARAMETER"] * len(parsed["stops"])


def test_every_end_token_is_a_stop(case):
    tok, _, ends = case
    stops = parse_modelfile(modelfile(tok, "model-f16.gguf")[0])["stops"]
    assert ends | {tok.eos_token} <= set(stops), stops
    assert len(stops) == len(set(stops))
    openers = {"<|im_start|>", "<|start_header_id|>", "<start_of_turn>", "<|user|>", "<s>", "<bos>"}
    assert not openers & set(stops)


def test_generation_config_eos_ids_are_stops(smol_dir):
    """export_ollama passes generation_config's eos_token_id list: a token only it names becomes a stop too."""
    tok = build_tokenizer(smol_dir, LLAMA3, **dict(_LLAMA3_TOKENS, extra=("<|custom_end|>",)))
    assert '"<|custom_end|>"' not in modelfile(tok, "m.gguf")[0]
    extra = tok.convert_tokens_to_ids("<|custom_end|>")
    stops = parse_modelfile(modelfile(tok, "m.gguf", extra_stop_ids=[extra])[0])["stops"]
    assert stops[0] == "<|eot_id|>" and "<|custom_end|>" in stops


# Llama 2's layout and a ChatML look-alike with a blank line between turns: no layout of ours renders these.
LLAMA2 = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ '<<SYS>>\n' + m['content'] + '\n<</SYS>>\n\n' }}"
          "{% elif m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}{% else %}{{ ' ' + m['content'] +"
          " ' ' + eos_token }}{% endif %}{% endfor %}")
CHATML_LOOKALIKE = TEMPLATES["chatml"].replace("'<|im_end|>\n'", "'<|im_end|>\n\n'")


@pytest.mark.parametrize("template", [LLAMA2, CHATML_LOOKALIKE], ids=["llama-2", "chatml-lookalike"])
def test_unknown_layout_gets_no_template(smol_dir, template):
    tok = build_tokenizer(smol_dir, template)
    text, note = modelfile(tok, "model-f16.gguf")
    parsed = parse_modelfile(text)
    assert parsed["template"] is None and "TEMPLATE" not in parsed["commands"]
    assert "renders as none of turbotune's Ollama layouts (chatml, llama-3" in note
    assert "chat template embedded in the GGUF" in note
    assert {"<|im_end|>", "<|endoftext|>"} <= set(parsed["stops"])  # the stops do not depend on the layout


def test_no_chat_template(smol_dir):
    tok = build_tokenizer(smol_dir)
    tok.chat_template = None
    text, note = modelfile(tok, "model-f16.gguf")
    assert "the tokenizer has no chat template" in note and parse_modelfile(text)["template"] is None


# --- export(how="ollama") on a tiny model ---------------------------------------------------------------------------

def _adapter(base_dir, out, tokenizer=None):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    peft = nonzero_lora_b(get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])))
    peft.save_pretrained(str(out))
    (tokenizer or AutoTokenizer.from_pretrained(str(base_dir))).save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def tiny_adapter(tiny_llama_dir, tmp_path_factory):
    pytest.importorskip("gguf")
    return _adapter(tiny_llama_dir, tmp_path_factory.mktemp("ollama-adapter"))


def test_export_writes_gguf_and_modelfile(tiny_adapter, smol_tokenizer, tmp_path, capsys):
    out = export(tiny_adapter, tmp_path / "ollama", how="ollama")
    files = sorted(p.name for p in out.iterdir())
    assert files == ["Modelfile", "model-f16.gguf", "turbotune_merge.json"]
    parsed = parse_modelfile((out / "Modelfile").read_text(encoding="utf-8"))
    assert parsed["from"] == ["./model-f16.gguf"] and (out / parsed["from"][0]).stat().st_size > 100_000
    conversation = CONVERSATIONS[3]
    assert render_go(parsed["template"], conversation) == smol_tokenizer.apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=True)
    assert {"<|im_end|>", "<|endoftext|>"} <= set(parsed["stops"])
    said = capsys.readouterr().out
    assert f"GGUF (f16) written to {out / 'model-f16.gguf'}" in said and ".ollama-" not in said
    assert f"Ollama Modelfile written to {out / 'Modelfile'}" in said and "without TEMPLATE" not in said
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    with pytest.raises(TurbotuneError, match="exists and is not empty"):  # nothing replaced unasked
        export(tiny_adapter, tmp_path / "ollama", how="ollama", quant="q8_0")
    assert (out / "model-f16.gguf").is_file()
    again = export(tiny_adapter, tmp_path / "ollama", how="ollama", quant="q8_0", overwrite=True)  # replaced whole
    assert parse_modelfile((again / "Modelfile").read_text())["from"] == ["./model-q8_0.gguf"]
    assert (again / "model-q8_0.gguf").is_file() and not (again / "model-f16.gguf").exists()


def test_export_without_a_known_layout_says_why(tiny_llama_dir, tiny_adapter, smol_dir, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    shutil.copytree(tiny_adapter, adapter)
    build_tokenizer(smol_dir, LLAMA2).save_pretrained(str(adapter))  # the adapter's tokenizer goes into the GGUF
    out = export(adapter, tmp_path / "ollama", how="ollama", base=str(tiny_llama_dir))
    text = (out / "Modelfile").read_text()
    assert "TEMPLATE" not in parse_modelfile(text)["commands"] and "FROM ./model-f16.gguf" in text
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "without TEMPLATE" in ln]
    assert len(lines) == 1 and "renders as none of turbotune's Ollama layouts" in lines[0]


def test_export_arguments(tiny_adapter, tmp_path):
    with pytest.raises(TurbotuneError, match="dtype is for merged exports"):
        export(tiny_adapter, tmp_path / "o", how="ollama", dtype="bf16")
    with pytest.raises(TurbotuneError, match="'gguf' or 'ollama'"):
        export(tiny_adapter, tmp_path / "x", how="lmstudio")
    assert not (tmp_path / "o").exists()


def test_cli_accepts_ollama():
    from turbotune.cli.main import build_parser

    args = build_parser().parse_args(["export", "--adapter", "a", "--out", "o", "--how", "ollama"])
    assert args.how == "ollama"
