"""Checkpoints that survive crashes: every one is written under a temporary name and renamed into place.

A rename within one folder is atomic, so at any instant `output_dir/checkpoint-N` either does not exist or
is complete; a crash or a SIGKILL mid-save leaves at most a `.tmp-*` folder behind (cleaned up on the next
run) and every earlier checkpoint loadable.

Layout of a checkpoint folder:
    adapter_config.json, adapter_model.safetensors   the PEFT adapter (trainable weights)
    tokenizer files                                   (last_checkpoint only)
    trainer_state.pt                                  optimizer, scheduler and RNG states (loaded weights_only)
    trainer_state.json                                step, epoch, log history, settings
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path

import torch

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
LAST = "last_checkpoint"


def write_atomically(target: Path, write_fn) -> Path:
    """Run write_fn(tmp_dir), then rename tmp_dir to target (replacing an older target last)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write_fn(tmp)
        _fsync_dir(tmp)
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            os.replace(target, old)      # both renames are atomic; the window without `target` is tiny
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def write_json_atomically(path: Path, obj) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def clean_partial(output_dir: Path) -> int:
    """Remove temporary folders that a killed save left behind."""
    n = 0
    for p in Path(output_dir).glob(".*.tmp-*"):
        shutil.rmtree(p, ignore_errors=True)
        n += 1
    for p in Path(output_dir).glob(".*.old-*"):
        shutil.rmtree(p, ignore_errors=True)
    return n


def list_checkpoints(output_dir) -> list[tuple[int, Path]]:
    out = []
    d = Path(output_dir)
    if not d.is_dir():
        return out
    for p in d.iterdir():
        m = CHECKPOINT_RE.match(p.name)
        if m and p.is_dir() and (p / "trainer_state.json").is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(output_dir) -> Path | None:
    cps = list_checkpoints(output_dir)
    return cps[-1][1] if cps else None


def rotate(output_dir, keep: int | None) -> None:
    if not keep:
        return
    cps = list_checkpoints(output_dir)
    for _, p in cps[:-keep]:
        shutil.rmtree(p, ignore_errors=True)


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_as_python_state(state["python"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_python_state(s):
    # torch.load(weights_only=True) gives lists back where random.getstate() had tuples.
    return (s[0], tuple(s[1]), s[2])


def save_checkpoint(path: Path, model, optimizer, scheduler, state: dict, tokenizer=None, extra_files=None,
                    adapter_state=None, optimizer_state=None) -> Path:
    """adapter_state / optimizer_state: what to write instead of the model's and the optimizer's own state dicts
    (whole tensors gathered from an FSDP2-sharded model, training/fsdp.py)."""
    if optimizer_state is None and optimizer is not None:
        optimizer_state = optimizer.state_dict()

    def write(tmp: Path):
        model.save_pretrained(str(tmp), safe_serialization=True,
                              **({"state_dict": adapter_state} if adapter_state is not None else {}))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        torch.save({"optimizer": optimizer_state,
                    "scheduler": scheduler.state_dict() if scheduler else None,
                    "rng": rng_state()}, tmp / "trainer_state.pt")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        # Written last: a folder is a checkpoint only once this file exists.
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2, ensure_ascii=False), encoding="utf-8")

    return write_atomically(path, write)


def load_trainer_state(path: Path) -> tuple[dict, dict]:
    """(json state, tensors state) of a checkpoint."""
    state = json.loads((Path(path) / "trainer_state.json").read_text(encoding="utf-8"))
    tensors = torch.load(Path(path) / "trainer_state.pt", map_location="cpu", weights_only=True)
    return state, tensors


def load_adapter_weights(model, path: Path, prepare=None) -> None:
    """Load a checkpoint's adapter into a PEFT model; a shape mismatch means another base model. prepare: applied
    to the loaded tensors first (FSDP2 splits them as the sharded parameters)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from turbotune.errors import TurbotuneError

    f = Path(path) / "adapter_model.safetensors"
    if not f.is_file():
        raise TurbotuneError(f"{path} has no adapter_model.safetensors; it is not a turbotune/PEFT checkpoint")
    try:
        tensors = load_file(str(f))
        result = set_peft_model_state_dict(model, prepare(tensors) if prepare else tensors)
    except RuntimeError as e:
        if "size mismatch" in str(e):
            raise TurbotuneError(f"the adapter in {path} was trained on a different base model (shape mismatch); "
                                 "load it with the base model it was trained on") from e
        raise
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise TurbotuneError(f"the adapter in {path} does not fit this model ({len(unexpected)} unexpected "
                             f"weights, e.g. {unexpected[0]}); load it with the base model it was trained on")
