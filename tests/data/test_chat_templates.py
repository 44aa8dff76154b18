"""turbotune.data.chat_templates: each family's exact rendering, generation prompts, stop tokens, defaults."""
from __future__ import annotations

import warnings

import pytest

from turbotune.data.chat_templates import (
    TEMPLATES, end_of_turn_token, ensure_chat_template, get_chat_template,
)

CONVERSATION = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "See you."}]

EXPECTED = {
    "chatml": ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
               "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
               "<|im_start|>assistant\nSee you.<|im_end|>\n"),
    "llama-3": ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
                "<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\nSee you.<|eot_id|>"),
    "gemma": ("<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
              "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\nSee you.<end_of_turn>\n"),
    "phi-3": ("<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello!<|end|>\n"
              "<|user|>\nBye<|end|>\n<|assistant|>\nSee you.<|end|>\n"),
    "alpaca": ("Be brief.\n\n### Instruction:\nHi\n\n### Response:\nHello!{eos}\n\n"
               "### Instruction:\nBye\n\n### Response:\nSee you.{eos}\n\n"),
}
GENERATION_PROMPT = {
    "chatml": "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "qwen2.5": ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
                "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"),
    "llama-3": ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    "gemma": "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
    "phi-3": "<|user|>\nHi<|end|>\n<|assistant|>\n",
    "alpaca": ("Below is an instruction that describes a task. Write a response that appropriately completes "
               "the request.\n\n### Instruction:\nHi\n\n### Response:\n"),
}
STOP = {"chatml": "<|im_end|>", "qwen2.5": "<|im_end|>", "llama-3": "<|eot_id|>", "gemma": "<end_of_turn>",
        "phi-3": "<|end|>", "alpaca": None}  # None: the tokenizer's eos


@pytest.fixture
def tok(smol_tokenizer):
    saved = smol_tokenizer.chat_template
    yield smol_tokenizer
    smol_tokenizer.chat_template = saved


def render(tokenizer, messages, generation_prompt=False):
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def test_every_template_is_tested():
    assert set(TEMPLATES) == set(GENERATION_PROMPT) == set(STOP)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_renders_known_conversation_exactly(tok, name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SmolLM2 lacks other families' special tokens
        assert get_chat_template(tok, name) is tok
    assert render(tok, CONVERSATION) == EXPECTED[name].format(eos=tok.eos_token)


def test_qwen25_keeps_a_given_system_prompt(tok):
    get_chat_template(tok, "qwen2.5")
    assert render(tok, CONVERSATION) == EXPECTED["chatml"]


@pytest.mark.parametrize("name", sorted(GENERATION_PROMPT))
def test_generation_prompt_and_stop_token(tok, name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        get_chat_template(tok, name)
    assert render(tok, CONVERSATION[1:2], generation_prompt=True) == GENERATION_PROMPT[name]
    assert end_of_turn_token(tok) == (STOP[name] or tok.eos_token)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_templates_are_prefix_stable(tok, name):
    """What turbotune.data.dataset relies on: the prompt before each answer starts the full rendering, and
    prompt + answer + end-of-turn marker is what the full rendering holds there."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        get_chat_template(tok, name)
    full = render(tok, CONVERSATION)
    for i in (2, 4):
        prompt = render(tok, CONVERSATION[:i], generation_prompt=True)
        upto = render(tok, CONVERSATION[:i + 1])
        assert full.startswith(prompt) and full.startswith(upto) and upto.startswith(prompt)
        stop = STOP[name] or tok.eos_token
        assert upto[len(prompt):].startswith(CONVERSATION[i]["content"] + stop)


def test_warns_when_special_tokens_are_missing(tok):
    with pytest.warns(UserWarning, match=r"'llama-3': .*<\|eot_id\|>.* not in the tokenizer's vocabulary"):
        get_chat_template(tok, "llama-3")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # SmolLM2 has both ChatML tokens: no warning
        get_chat_template(tok, "chatml")


def test_unknown_name_lists_the_choices(tok):
    with pytest.raises(ValueError, match="unknown chat template 'vicuna'.*chatml, llama-3, qwen2.5"):
        get_chat_template(tok, "vicuna")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        get_chat_template(tok, "Llama3")
    assert end_of_turn_token(tok) == "<|eot_id|>"


def test_ensure_keeps_the_models_own_template(tok):
    own = tok.chat_template
    assert "SmolLM" in own
    assert ensure_chat_template(tok) is tok and tok.chat_template == own
    tok.chat_template = None
    assert end_of_turn_token(tok) == tok.eos_token
    ensure_chat_template(tok, default="chatml")
    assert tok.chat_template == TEMPLATES["chatml"]


# Unsloth's get_chat_template(tokenizer, chat_template=NAME) names that are the same rendering as ours.
UNSLOTH_NAMES = {
    "chatml": "chatml", "alpaca": "alpaca",
    "qwen-2.5": "qwen2.5", "qwen2.5": "qwen2.5", "qwen25": "qwen2.5", "qwen-25": "qwen2.5",
    "llama-3": "llama-3", "llama3": "llama-3",
    "gemma": "gemma", "gemma2": "gemma", "gemma-3": "gemma", "gemma3": "gemma",
    "phi-3": "phi-3", "phi3": "phi-3", "phi-3.5": "phi-3", "phi-35": "phi-3",
}


@pytest.mark.parametrize("unsloth_name", sorted(UNSLOTH_NAMES))
def test_unsloth_keyword_and_names(tok, unsloth_name):
    import turbotune
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert turbotune.get_chat_template(tok, chat_template=unsloth_name) is tok
    assert tok.chat_template == TEMPLATES[UNSLOTH_NAMES[unsloth_name]]


def test_chat_template_keyword_positional_and_old_name(tok):
    get_chat_template(tok, "qwen-2.5")
    assert tok.chat_template == TEMPLATES["qwen2.5"]
    get_chat_template(tok, name="chatml")
    assert tok.chat_template == TEMPLATES["chatml"]
    get_chat_template(tok, chat_template="qwen-2.5")
    get_chat_template(tok)  # the default stays ChatML
    assert tok.chat_template == TEMPLATES["chatml"]
    with pytest.raises(TypeError, match="both chat_template and name"):
        get_chat_template(tok, chat_template="chatml", name="gemma")


@pytest.mark.parametrize("name", ["llama-3.1", "Llama-3.2", "llama-33"])
def test_llama31_names_are_refused_with_the_alternative(tok, name):
    """Unsloth's llama-3.1/3.2/3.3 add a dated system block that ours does not: not the same template."""
    saved = tok.chat_template
    with pytest.raises(ValueError, match=r"Cutting Knowledge Date.*'llama-3'"):
        get_chat_template(tok, chat_template=name)
    assert tok.chat_template == saved


def test_unknown_unsloth_name_lists_every_spelling(tok):
    with pytest.raises(ValueError, match=r"unknown chat template 'zephyr'; choose one of: chatml, .*also spelled"
                                         r".*qwen-2\.5"):
        get_chat_template(tok, chat_template="zephyr")
