"""turbotune: faster, lighter fine-tuning of open LLMs with the same math as transformers + PEFT.

    from turbotune import FastModel
    model, tokenizer = FastModel.from_pretrained("Qwen/Qwen2.5-1.5B-Instruct", load_in_4bit=True)
    model = FastModel.get_peft_model(model, r=16)
"""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["FastModel", "get_peft_model", "is_bfloat16_supported", "get_chat_template", "__version__"]


def __getattr__(name):
    # Lazy: `python -m turbotune` and `turbotune --help` must start fast and report broken installs cleanly.
    if name in ("FastModel", "get_peft_model"):
        from turbotune import fast_model
        return getattr(fast_model, name)
    if name == "is_bfloat16_supported":
        from turbotune.model.loader import is_bfloat16_supported
        return is_bfloat16_supported
    if name == "get_chat_template":
        from turbotune.data.chat_templates import get_chat_template
        return get_chat_template
    raise AttributeError(f"module 'turbotune' has no attribute {name!r}")
