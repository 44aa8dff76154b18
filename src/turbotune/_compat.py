"""The one place that knows about versions of torch, transformers, PEFT, TRL and bitsandbytes.

Everything else asks this module ("which keyword does from_pretrained take for the dtype?")
instead of comparing version strings itself, so a new transformers release means one edit here.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.metadata as md
import inspect
import sys
from dataclasses import dataclass
from functools import lru_cache

from packaging.version import Version

# Per package, two windows of releases:
# - works: where turbotune works at all. pyproject.toml allows these ranges, and outside them `turbotune check`
#   FAILs (TESTED_RANGES; the upper end is excluded).
# - tested: the releases (major.minor, both ends included) the tests ran on: CI's pinned stack (constraints.txt,
#   checked by tests/test_compat.py) and the GPU machine's (torch 2.11, transformers 5.17, TRL 1.15). Outside
#   this window `turbotune check` warns: it likely works, but nobody has run the tests on it (TESTED_VERSIONS).
_VERSION_WINDOWS: dict[str, tuple[tuple[str, str], tuple[str, str]]] = {
    #                 works             tested
    "torch":          (("2.4", "3.0"),  ("2.11", "2.13")),
    "transformers":   (("4.57", "6.0"), ("5.17", "5.25")),
    "peft":           (("0.17", "1.0"), ("0.21", "0.21")),
    "trl":            (("0.20", "2.0"), ("1.15", "1.16")),
    "accelerate":     (("1.0", "2.0"),  ("1.15", "1.16")),
    "bitsandbytes":   (("0.45", "1.0"), ("0.50", "0.50")),
    "triton":         (("3.0", "4.0"),  ("3.6", "3.9")),
}
TESTED_RANGES: dict[str, tuple[str, str]] = {name: works for name, (works, _) in _VERSION_WINDOWS.items()}
TESTED_VERSIONS: dict[str, tuple[str, str]] = {name: tested for name, (_, tested) in _VERSION_WINDOWS.items()}


def python_older_than(minimum: tuple[int, int]) -> str | None:
    """The running Python's version ("3.9.18") when it is older than `minimum` (major, minor), else None."""
    vi = tuple(sys.version_info)
    return ".".join(str(x) for x in vi[:3]) if vi[:2] < minimum else None


def package_version(name: str) -> str | None:
    """Installed version of a distribution, or None when it is not installed."""
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


@dataclass
class RangeProblem:
    package: str
    version: str
    low: str
    high: str

    def __str__(self) -> str:
        return (f"{self.package} {self.version} is outside the range turbotune is tested with "
                f"(>={self.low},<{self.high}); fix: pip install '{self.package}>={self.low},<{self.high}'")


def out_of_range(packages=None) -> list[RangeProblem]:
    """Installed packages whose version is outside TESTED_RANGES (missing packages are not problems)."""
    problems = []
    for name in packages or TESTED_RANGES:
        low, high = TESTED_RANGES[name]
        v = package_version(name)
        if v is None:
            continue
        base = Version(Version(v).base_version)
        if not (Version(low) <= base < Version(high)):
            problems.append(RangeProblem(name, v, low, high))
    return problems


def _minor(version: str) -> tuple[int, int]:
    release = Version(version).release + (0,)
    return release[0], release[1]


def untested(packages=None) -> list[tuple[str, str, str, str]]:
    """(package, installed version, oldest, newest tested major.minor) for installed packages outside
    TESTED_VERSIONS."""
    found = []
    for name in packages or TESTED_VERSIONS:
        low, high = TESTED_VERSIONS[name]
        v = package_version(name)
        if v is not None and not (_minor(low) <= _minor(v) <= _minor(high)):
            found.append((name, v, low, high))
    return found


def supports_sdpa(config) -> bool | None:
    """Whether transformers' causal-LM class for `config` has an SDPA attention path (Gemma 2 has none in 5.x:
    SDPA can't soft-cap the logits); None when the class isn't in transformers' auto mapping (remote code)."""
    try:
        from transformers import AutoModelForCausalLM
        cls = AutoModelForCausalLM._model_mapping[type(config)]
    except Exception:  # noqa: BLE001 - not a transformers architecture, or the mapping moved
        return None
    flag = getattr(cls, "_supports_sdpa", None)
    return None if flag is None else bool(flag)


def kernels_mode_settled(model, training: bool) -> bool:
    """Whether `model.train(training)` would leave transformers' hub-kernels mode as it is: transformers 5.x's
    PreTrainedModel.train sets `kernels_mode` (TRAINING / INFERENCE) when the `kernels` package is there and the
    model uses kernels, re-kernelising only when the mode changes."""
    if not getattr(model, "use_kernels", False):
        return True
    try:
        from kernels import Mode
    except Exception:  # noqa: BLE001 - without the package the setter does nothing
        return True
    return getattr(model, "_kernels_mode", None) == (Mode.TRAINING if training else Mode.INFERENCE)


def trl_fused_head_settings(causal_lm) -> dict | None:
    """What TRL's `add_fused_lm_head` set up on this model: {"temperature", "cast_lm_head_to_fp32", "outputs"},
    read from the forward it installs (TRL 1.15 and 1.16 keep them as variables the forward closes over); None
    when the model's forward is not TRL's fused one or they can't be read."""
    import inspect

    fn = getattr(causal_lm.__dict__.get("forward"), "__func__", None)
    code = getattr(fn, "__code__", None)  # its __name__ is the model's (functools.wraps); the code's is its own
    if code is None or code.co_name != "_fused_forward":
        return None
    try:
        seen = inspect.getclosurevars(fn).nonlocals
    except Exception:  # noqa: BLE001 - another shape of forward
        return None
    keys = ("temperature", "cast_lm_head_to_fp32", "outputs")
    return {k: seen[k] for k in keys} if all(k in seen for k in keys) else None


def trl_fused_output_class():
    """The output class of TRL's fused LM head (`model(..., fused_lm_head=True)`, TRL >= 1.15), or None."""
    try:
        from trl.trainer.utils import FusedCausalLMOutput
    except Exception:  # noqa: BLE001 - no TRL, or one without the fused head
        return None
    return FusedCausalLMOutput


def is_available(module: str) -> bool:
    """True when `module` can be imported (without importing it when a spec check suffices)."""
    return importlib.util.find_spec(module) is not None


@lru_cache(None)
def transformers_version() -> Version:
    return Version(package_version("transformers") or "0")


@lru_cache(None)
def from_pretrained_dtype_kwarg() -> str:
    """transformers 5 renamed `torch_dtype=` to `dtype=`."""
    return "dtype" if transformers_version() >= Version("4.56") else "torch_dtype"


def dtype_kwargs(dtype) -> dict:
    return {from_pretrained_dtype_kwarg(): dtype}


# The keywords a KV cache reaches an attention forward under: `cache=` since transformers 5.2x,
# `past_key_values=` before. Decoder layers of older releases and other families also say `past_key_value=`
# (transformers < 4.56) or `layer_past=` (GPT-2 style).
ATTENTION_CACHE_KWARGS = ("cache", "past_key_values")
LAYER_CACHE_KWARGS = ATTENTION_CACHE_KWARGS + ("past_key_value", "layer_past")


def has_cache(kwargs: dict) -> bool:
    """Whether a forward got a KV cache: `cache=` since transformers 5.2x, `past_key_values=` before."""
    return any(kwargs.get(name) is not None for name in ATTENTION_CACHE_KWARGS)


def cache_from_kwargs(kwargs: dict):
    """Pop the KV cache of an attention forward (`cache=` since transformers 5.2x, `past_key_values=` before)."""
    found = [kwargs.pop(name, None) for name in ATTENTION_CACHE_KWARGS]
    return next((cache for cache in found if cache is not None), None)


def clear_layer_caches(kwargs: dict) -> None:
    """Set every KV cache a decoder layer got to None, under any release's keyword (see LAYER_CACHE_KWARGS)."""
    for name in LAYER_CACHE_KWARGS:
        if kwargs.get(name) is not None:
            kwargs[name] = None


def attention_function(config, module=None):
    """The attention function `config._attn_implementation` names: transformers 5.x looks it up with
    `ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager)`, 4.x indexes the registry, which lacks "eager".
    "eager" is the family's own (`module`'s modeling file: Gemma 2's soft-caps the scores), else Llama's."""
    import sys

    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.llama.modeling_llama import eager_attention_forward

    if module is not None:
        eager_attention_forward = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward",
                                          eager_attention_forward)
    impl = config._attn_implementation
    if hasattr(ALL_ATTENTION_FUNCTIONS, "get_interface"):
        return ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager_attention_forward)
    return eager_attention_forward if impl == "eager" else ALL_ATTENTION_FUNCTIONS[impl]


def checkpoint_func_attrs() -> tuple[str, ...]:
    """Where a layer keeps the checkpoint function transformers gave it: `_gradient_checkpointing_func` in
    4.x and 5.x; the second name is where the activation-checkpointing rename would move it."""
    return ("_gradient_checkpointing_func", "_activation_checkpointing_func")


def packed_mask_builder():
    """transformers' `masking_utils.create_causal_mask` where masking_utils detects packed sequences
    (`find_packed_sequence_indices`, 4.57+), else None."""
    try:
        from transformers import masking_utils
    except ImportError:
        return None
    return masking_utils.create_causal_mask if hasattr(masking_utils, "find_packed_sequence_indices") else None


def call_create_causal_mask(fn, config, embeds, position_ids):
    """transformers' create_causal_mask with this version's keywords: `inputs_embeds` (5.x) or `input_embeds`
    (4.x), `cache` (5.2x) or `past_key_values`, and `cache_position` only in 4.x."""
    params = inspect.signature(fn).parameters
    kwargs = {"config": config, "attention_mask": None, "position_ids": position_ids}
    kwargs["inputs_embeds" if "inputs_embeds" in params else "input_embeds"] = embeds
    kwargs["cache" if "cache" in params else "past_key_values"] = None
    if "cache_position" in params:  # transformers 4.x
        import torch
        kwargs["cache_position"] = torch.arange(embeds.shape[1])
    return fn(**kwargs)


@lru_cache(None)
def transformers_mask_is_capture_safe() -> bool:
    """Whether transformers skips its host-side checks of the mask inputs while a CUDA graph is being captured.

    Its packed-sequence detection ends with `(packed_sequence_mask[:, -1] == 0).all()` used as a Python bool,
    which waits for the GPU, unless `is_tracing()` says a graph is being traced or captured; transformers 5.17
    and 5.24 count CUDA stream capture as tracing (then the document mask is always built, which is exact).
    Checked in the source, since the behaviour can't be observed without a GPU."""
    try:
        from transformers.utils import import_utils
        return "stream_capturing" in inspect.getsource(import_utils.is_tracing)
    except Exception:
        return False


def _no_packed_sequences(position_ids):
    return None


def _not_tracing(tensor=None):
    return False


@contextlib.contextmanager
def masks_see_no_packing_or_tracing():
    """For the block, transformers' masking_utils finds no packed sequences and no tracing: it replaces
    `find_packed_sequence_indices` and `is_tracing` where this version has them (4.57+ / 5.x), nothing without."""
    try:
        from transformers import masking_utils
    except ImportError:
        yield
        return
    replaced = {name: getattr(masking_utils, name) for name in ("find_packed_sequence_indices", "is_tracing")
                if hasattr(masking_utils, name)}
    if "find_packed_sequence_indices" in replaced:
        masking_utils.find_packed_sequence_indices = _no_packed_sequences
    if "is_tracing" in replaced:
        masking_utils.is_tracing = _not_tracing
    try:
        yield
    finally:
        for name, original in replaced.items():
            setattr(masking_utils, name, original)


@contextlib.contextmanager
def sdpa_masks_leave_windows_to_attention():
    """For the block, transformers' SDPA mask code treats sliding-window layers as plain causal ones: with no
    padding and no packing it builds no mask at all (SDPA's is_causal), rather than a [B, 1, L, L] mask as soon as
    the window is shorter than the sequence. Only for a model whose attention applies the window itself
    (model/kernels/windowed_attention.py, called by the patched attention when its mask is None). It replaces
    `_ignore_causal_mask_sdpa` by a version called with no local size, where this transformers has that function
    (5.x); without it, nothing changes and the mask is built as before (correct, slower)."""
    try:
        from transformers import masking_utils
        original = masking_utils._ignore_causal_mask_sdpa
        params = inspect.signature(original).parameters
    except (ImportError, AttributeError, TypeError, ValueError):
        yield
        return
    local = next((n for n in ("local_attention_size", "local_size") if n in params), None)
    if local is None:
        yield
        return
    signature = inspect.signature(original)

    def without_local_size(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.arguments[local] = None
        return original(*bound.args, **bound.kwargs)

    masking_utils._ignore_causal_mask_sdpa = without_local_size
    try:
        yield
    finally:
        masking_utils._ignore_causal_mask_sdpa = original


def unwrap_peft(model):
    """The transformers model under a PEFT wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def is_checkpointing(model) -> bool:
    """transformers 5.x renamed is_gradient_checkpointing to is_activation_checkpointing."""
    base = unwrap_peft(model)
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(base), name):
            return bool(getattr(base, name))
    return False


def checkpointing_enable(model, use_reentrant: bool = False, preserve_rng_state: bool = True) -> None:
    """transformers 5.x renamed gradient_checkpointing_enable to activation_checkpointing_enable (5.2x).

    Called on the transformers model under a PEFT wrapper: the wrapper's own switches are the trainer hook's
    (training/trainer_step.py), which keep turbotune's choice against a trainer's; turbotune's own switching
    must reach transformers' whichever name this version has."""
    base = unwrap_peft(model)
    kwargs = {"use_reentrant": use_reentrant}
    if not preserve_rng_state:
        kwargs["preserve_rng_state"] = False
    fn = getattr(base, "activation_checkpointing_enable", None)
    if fn is not None:
        fn(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def checkpointing_disable(model) -> None:
    """As checkpointing_enable: on the transformers model, past the trainer hook's switches."""
    base = unwrap_peft(model)
    fn = getattr(base, "activation_checkpointing_disable", None) or base.gradient_checkpointing_disable
    fn()


def accepts_kwarg(fn, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def autocast_dtype(device_type: str):
    """The autocast dtype when autocast is on for `device_type`, else None (torch < 2.4 had other names)."""
    import torch

    try:
        on = torch.is_autocast_enabled(device_type)
    except TypeError:  # pragma: no cover - torch < 2.4
        on = torch.is_autocast_enabled() if device_type == "cuda" else torch.is_autocast_cpu_enabled()
    if not on:
        return None
    try:
        return torch.get_autocast_dtype(device_type)
    except AttributeError:  # pragma: no cover - torch < 2.4
        return torch.get_autocast_gpu_dtype() if device_type == "cuda" else torch.get_autocast_cpu_dtype()


@lru_cache(None)
def triton_usable() -> bool:
    """Triton is importable (the kernels then run on CUDA, or on CPU under TRITON_INTERPRET=1)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
        return True
    except Exception:
        return False


def trl_train_metrics(trainer) -> dict | None:
    """TRL's per-call training metric lists (its trainers' `_metrics["train"]`: name -> list of floats, averaged
    at each log), or None for a trainer without them."""
    metrics = getattr(trainer, "_metrics", None)
    train = metrics.get("train") if isinstance(metrics, dict) else None
    return train if isinstance(train, dict) else None


def fsdp2():
    """(fully_shard, MixedPrecisionPolicy, DTensor, distribute_tensor) of this torch: public under
    torch.distributed.fsdp / torch.distributed.tensor from 2.6 (2.5 for DTensor), under _composable / _tensor before."""
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:  # pragma: no cover - torch < 2.6
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard
    try:
        from torch.distributed.tensor import DTensor, distribute_tensor
    except ImportError:  # pragma: no cover - torch < 2.5
        from torch.distributed._tensor import DTensor, distribute_tensor
    return fully_shard, MixedPrecisionPolicy, DTensor, distribute_tensor


def fsdp_sum_gradients(module) -> None:
    """Make a fully_shard-ed module's gradient reduction a plain sum over the ranks (FSDP2 averages by default).
    A divide factor of 1 alone asks for ReduceOp.PREMUL_SUM(1.0), which gloo rejects ("Cannot use
    ReduceOp.PREMUL_SUM with Gloo"); with sum-only collectives as well (set_force_sum_reduction_for_comms, which
    torch 2.13 has) FSDP2 reduces with SUM and divides by nothing. Older releases name the factor's setter
    set_reduce_scatter_divide_factor and may lack the sum-only switch (fine on NCCL, which has PREMUL_SUM)."""
    setter = getattr(module, "set_gradient_divide_factor", None) or module.set_reduce_scatter_divide_factor
    setter(1.0)
    force_sum = getattr(module, "set_force_sum_reduction_for_comms", None)
    if force_sum is not None:
        force_sum(True)
