"""Reward functions for `turbotune train --method grpo --reward-fn FILE.py[:NAME[,NAME2...]]`.

The file is the user's own Python, imported and run because they named it on the command line (as `python
FILE.py` would run it). Without names, every function defined in the file whose name starts with `reward` or
ends with `_reward` (TRL's own naming, `accuracy_reward`) is taken, in the order the file defines them; names
starting with `_` never are. With names, each is looked up in the file (imported ones included).

TRL calls each function with keyword arguments only: `prompts`, `completions`, `completion_ids`, `trainer_state`,
`log_extra`, `log_metric`, and one list per extra column of the data (GRPOTrainer._calculate_rewards in TRL
1.16). So a function must take **kwargs, or name every one of those. Everything is checked here, before the
model loads: a missing file, a syntax error (FILE.py:LINE), an error while the file runs, an unknown name and a
function TRL could not call each stop the run with a ConfigError.
"""
from __future__ import annotations

import importlib.util
import inspect
import re
import sys
import traceback
from pathlib import Path

from turbotune.errors import ConfigError

# The keyword arguments TRL 1.16 passes to every reward function besides the data's own columns.
TRL_ARGUMENTS = ("prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric")
_NAMES = re.compile(r"[A-Za-z_]\w*(\s*,\s*[A-Za-z_]\w*)*")
SHAPE = "def reward(prompts, completions, **kwargs) -> list[float]"


def split_spec(spec: str) -> tuple[str, list[str]]:
    """'FILE.py:a,b' -> ('FILE.py', ['a', 'b']); 'FILE.py' -> ('FILE.py', []). A colon followed by anything but
    names belongs to the path (C:\\rewards.py)."""
    path, sep, names = spec.rpartition(":")
    if sep and path and _NAMES.fullmatch(names.strip()):
        return path, [n.strip() for n in names.split(",")]
    return spec, []


def _is_default(name: str, value, module) -> bool:
    return (inspect.isfunction(value) and not name.startswith("_") and getattr(value, "__module__", None) ==
            module.__name__ and (name.startswith("reward") or name.endswith("_reward")))


def _run_file(path: Path, shown: str):
    """The file imported as a module of its own. Its folder goes at the end of sys.path (as `python FILE.py`
    would have it first), so it can import its neighbours without shadowing installed packages."""
    name = "turbotune_rewards_" + re.sub(r"\W", "_", path.stem)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"--reward-fn {shown}: not a Python file Python can import (name it *.py)")
    module = importlib.util.module_from_spec(spec)
    folder = str(path.parent)
    if folder not in sys.path:
        sys.path.append(folder)
    sys.modules[name] = module  # dataclasses and pickling look their module up there
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        sys.modules.pop(name, None)
        # a syntax error in a file it imports names that file
        same = not e.filename or Path(e.filename).resolve() == path
        where = f"{shown if same else e.filename}:{e.lineno}" if e.lineno else shown
        text = f": {e.text.strip()}" if e.text and e.text.strip() else ""
        raise ConfigError(f"--reward-fn {where}: syntax error: {e.msg}{text}") from None
    except Exception as e:  # noqa: BLE001 - the user's code may raise anything; report where in their file
        sys.modules.pop(name, None)
        frames = [f for f in traceback.extract_tb(e.__traceback__) if Path(f.filename) == path]
        where = f"{shown}:{frames[-1].lineno}" if frames else shown
        raise ConfigError(f"--reward-fn {where}: the file raised {type(e).__name__} while loading: {e}") from None
    return module


def check_signature(func, label: str, columns: tuple[str, ...] | None = None) -> None:
    """Raise ConfigError unless TRL can call `func` with its keyword arguments and the data's `columns`
    (None: not read yet, so a parameter without a default may still be a column)."""
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return  # a builtin or C callable without a signature: TRL's call is the only test
    passed = set(TRL_ARGUMENTS) | set(columns or ())
    offer = f"TRL passes {', '.join(TRL_ARGUMENTS)}, by keyword, " + (
        f"and the data's columns {', '.join(columns)}" if columns else "and the data has no other columns")
    for p in params:
        required = p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        if required and p.kind == p.POSITIONAL_ONLY:
            raise ConfigError(f"--reward-fn {label}: parameter '{p.name}' is positional-only, but TRL passes "
                              f"everything by keyword; write it as {SHAPE}")
        if required and columns is not None and p.name not in passed:
            raise ConfigError(f"--reward-fn {label}: parameter '{p.name}' gets no value ({offer}); give it a "
                              f"default or write it as {SHAPE}")
    if not any(p.kind == p.VAR_KEYWORD for p in params):
        missing = [n for n in (*TRL_ARGUMENTS, *(columns or ())) if n not in {p.name for p in params}]
        if missing:
            raise ConfigError(f"--reward-fn {label}: takes no **kwargs and no parameter "
                              f"{', '.join(map(repr, missing))}, which TRL passes; write it as {SHAPE}")


def load_reward_functions(spec: str) -> list:
    """The reward functions `spec` names (see the module docstring), checked against TRL's own arguments."""
    path_text, names = split_spec(spec)
    path = Path(path_text).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"--reward-fn {path_text}: no such file" + (" (a folder)" if path.is_dir() else ""))
    module = _run_file(path, path_text)
    if names:
        funcs = []
        for name in names:
            func = getattr(module, name, None)
            if func is None:
                found = [n for n, v in vars(module).items() if inspect.isfunction(v) and not n.startswith("_")]
                raise ConfigError(f"--reward-fn {path_text}: no function '{name}' in the file (its functions: "
                                  f"{', '.join(found) or 'none'})")
            if not callable(func):
                raise ConfigError(f"--reward-fn {path_text}: '{name}' is a {type(func).__name__}, not a function")
            funcs.append(func)
    else:
        funcs = [v for n, v in vars(module).items() if _is_default(n, v, module)]
        if not funcs:
            raise ConfigError(f"--reward-fn {path_text}: no function named reward* or *_reward defined in the file; "
                              "name them: --reward-fn FILE.py:NAME[,NAME2]")
    for func in funcs:
        check_signature(func, f"{path_text}:{getattr(func, '__name__', '?')}")
    return funcs


def check_columns(funcs: list, columns: tuple[str, ...], spec: str) -> None:
    """Once the data is read: each function must also take the data's extra columns."""
    for func in funcs:
        check_signature(func, f"{split_spec(spec)[0]}:{getattr(func, '__name__', '?')}", columns)


def describe(funcs: list) -> str:
    return ", ".join(getattr(f, "__name__", type(f).__name__) for f in funcs)
