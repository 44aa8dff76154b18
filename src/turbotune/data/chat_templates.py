"""Chat templates of the common model families, written out as our own Jinja strings.

`get_chat_template(tokenizer, chat_template)` installs one on a tokenizer; `ensure_chat_template` keeps a
model's own template and only fills in a default when there is none; `end_of_turn_token` says
which token generation should stop at.

Every template here is prefix-stable: rendering the first k messages gives a prefix of rendering
all of them, and the generation prompt is exactly what precedes an assistant answer. The data
module relies on that to find answer tokens. (Some official templates are not, e.g. Phi-3's,
which appends eos only when there is no generation prompt; ours leaves that eos out.)
"""
from __future__ import annotations

import warnings
from typing import Any

_CHATML = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)

QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
# Qwen2.5 is ChatML with a default system message when the conversation brings none.
_QWEN25 = (
    "{%- if not messages or messages[0]['role'] != 'system' -%}"
    "{{- '<|im_start|>system\n" + QWEN_SYSTEM + "<|im_end|>\n' -}}"
    "{%- endif -%}" + _CHATML
)

# Llama 3: headers around each role, content trimmed, <|eot_id|> closes every turn.
_LLAMA3 = (
    "{{- '<|begin_of_text|>' -}}"
    "{%- for message in messages -%}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}{%- endif -%}"
)

# Gemma has no system role: the system text opens the first user turn. The assistant is "model".
_GEMMA = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] | trim -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set system = '' -%}{%- set turns = messages -%}{%- endif -%}"
    "{{- '<bos>' -}}"
    "{%- for message in turns -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{%- set content = message['content'] | trim -%}"
    "{%- if loop.first and system -%}{%- set content = system + '\n\n' + content -%}{%- endif -%}"
    "{{- '<start_of_turn>' + role + '\n' + content + '<end_of_turn>\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\n' -}}{%- endif -%}"
)

_PHI3 = (
    "{%- for message in messages -%}"
    "{{- '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\n' -}}{%- endif -%}"
)

ALPACA_PREAMBLE = ("Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.")
# Stanford Alpaca's layout; a system message replaces the preamble; each answer ends with eos.
_ALPACA = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{{- messages[0]['content'] + '\n\n' -}}{%- set turns = messages[1:] -%}"
    "{%- else -%}{{- '" + ALPACA_PREAMBLE + "\n\n' -}}{%- set turns = messages -%}{%- endif -%}"
    "{%- for message in turns -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '### Response:\n' + message['content'] + (eos_token or '') + '\n\n' -}}"
    "{%- else -%}{{- '### Instruction:\n' + message['content'] + '\n\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '### Response:\n' -}}{%- endif -%}"
)

TEMPLATES: dict[str, str] = {
    "chatml": _CHATML,
    "llama-3": _LLAMA3,
    "qwen2.5": _QWEN25,
    "gemma": _GEMMA,
    "phi-3": _PHI3,
    "alpaca": _ALPACA,
}

# The special tokens each template writes; each should be one token of the tokenizer's vocabulary.
SPECIAL_TOKENS: dict[str, tuple[str, ...]] = {
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "qwen2.5": ("<|im_start|>", "<|im_end|>"),
    "llama-3": ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "gemma": ("<bos>", "<start_of_turn>", "<end_of_turn>"),
    "phi-3": ("<|user|>", "<|assistant|>", "<|system|>", "<|end|>"),
    "alpaca": (),
}

# Other spellings of our names, Unsloth's among them (its get_chat_template(tokenizer, chat_template=...)),
# where they name the same rendering. Gemma 1/2 have no system role; ours, like Gemma 3's, puts a system
# message at the start of the first user turn.
_ALIASES = {
    "llama3": "llama-3",
    "qwen-2.5": "qwen2.5", "qwen25": "qwen2.5", "qwen-25": "qwen2.5",
    "gemma2": "gemma", "gemma-2": "gemma", "gemma3": "gemma", "gemma-3": "gemma",
    "phi3": "phi-3", "phi-3.5": "phi-3", "phi3.5": "phi-3", "phi-35": "phi-3",
}

# Names that Unsloth gives a different rendering than any of ours: refused with what to use instead.
_NOT_OURS = {
    **dict.fromkeys(
        ("llama-3.1", "llama-31", "llama3.1", "llama-3.2", "llama-32", "llama3.2", "llama-3.3", "llama-33",
         "llama3.3"),
        "Llama 3.1+ templates open with a 'Cutting Knowledge Date / Today Date' system block that turbotune's "
        "'llama-3' does not write. Keep the model's own template (Llama 3.1+ tokenizers ship it: don't call "
        "get_chat_template), or pass 'llama-3' for the plain Llama 3 layout"),
    "phi-4": "Phi-4 uses <|im_start|>/<|im_sep|> markers, which no template here writes; keep the model's own "
             "template (don't call get_chat_template)",
}

# Most specific first: "<|end|>" must not be found inside the other markers.
_END_OF_TURN = ("<|eot_id|>", "<|im_end|>", "<end_of_turn>", "<|end|>")


def _template_text(tokenizer: Any) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates ("default", "tool_use", ...)
        template = template.get("default") or "".join(str(t) for t in template.values())
    return template or ""


def get_chat_template(tokenizer: Any, chat_template: str | None = None, *, name: str | None = None) -> Any:
    """Set `tokenizer.chat_template` to our template for the family `chat_template` (default "chatml");
    returns the tokenizer.

    `chat_template` is also Unsloth's keyword, and its names are accepted where they are the same template
    ("qwen-2.5", "llama3", "gemma-3", "phi-3.5", ...); `name=` is this function's older keyword.
    Warns when the template's special tokens are not single tokens of the vocabulary: they would
    then be split into pieces, which trains but wastes tokens and makes stopping unreliable.
    """
    if name is not None:
        if chat_template is not None:
            raise TypeError("get_chat_template() got both chat_template and name (the same argument); pass one")
        chat_template = name
    if chat_template is None:
        chat_template = "chatml"
    key = _ALIASES.get(chat_template.lower(), chat_template.lower()) if isinstance(chat_template, str) else None
    if key in _NOT_OURS:
        raise ValueError(f"chat template {chat_template!r}: {_NOT_OURS[key]}")
    if key not in TEMPLATES:
        raise ValueError(f"unknown chat template {chat_template!r}; choose one of: {', '.join(TEMPLATES)} "
                         f"(also spelled {', '.join(sorted(_ALIASES))})")
    missing = [t for t in SPECIAL_TOKENS[key] if not _in_vocab(tokenizer, t)]
    if key == "alpaca" and getattr(tokenizer, "eos_token", None) is None:
        missing.append("eos_token (the tokenizer has none)")
    if missing:
        warnings.warn(
            f"chat template {key!r}: {', '.join(missing)} not in the tokenizer's vocabulary, so they are "
            "split into ordinary tokens. Prefer the family's own tokenizer, or add them as special tokens "
            "and resize the model's embeddings.", UserWarning, stacklevel=2)
    tokenizer.chat_template = TEMPLATES[key]
    return tokenizer


def _in_vocab(tokenizer: Any, token: str) -> bool:
    try:
        return token in tokenizer.get_vocab()
    except Exception:  # a tokenizer without get_vocab: fall back to the id lookup
        tid = tokenizer.convert_tokens_to_ids(token)
        return tid is not None and tid != getattr(tokenizer, "unk_token_id", None)


def ensure_chat_template(tokenizer: Any, default: str = "chatml") -> Any:
    """Keep the tokenizer's own chat template; install `default` only when it has none."""
    if not _template_text(tokenizer):
        get_chat_template(tokenizer, default)
    return tokenizer


def end_of_turn_token(tokenizer: Any) -> str | None:
    """The token that ends an assistant turn under the tokenizer's template (where generation
    should stop): found in the template text, else the tokenizer's eos token."""
    text = _template_text(tokenizer)
    for token in _END_OF_TURN:
        if token in text:
            return token
    return getattr(tokenizer, "eos_token", None)
