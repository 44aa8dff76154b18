"""Preference and prompt rows for `turbotune train --method dpo|kto|orpo|grpo`, read and checked before any model
loads.

    dpo, orpo  {"prompt", "chosen", "rejected"}
    kto        {"prompt", "completion", "label": true | false}
    grpo       {"prompt", ...}: the model writes the completions; the other columns go to the reward functions

Each text field is a string, or (conversational rows) a list of {"role", "content"} messages that TRL renders
with the model's chat template: the prompt ends on the user's turn, the completions start with the assistant's.
A file is all strings or all conversations, as TRL reads the first row to decide how to render every row.

Rows come from the same sources as SFT rows (formats.py: .jsonl, .json list, list of dicts, datasets.Dataset),
and a bad row is reported the same way, as a DataError "file.jsonl:LINE: what is wrong", or counted and skipped
with skip_bad_rows. Only the fields TRL needs are kept: other columns would reach its tokenizing map and its
collator, and a column whose type changes from row to row stops `datasets` with an Arrow error. GRPO keeps the
other columns, as TRL hands each to the reward functions as a keyword argument (a list, one value per completion):
there a column must keep one type (null aside) in every row, and a row without it gets None.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from turbotune.data.formats import (MAX_REASONS, DataError, LoadReport, _Bad, _iter_source, _plural, _present,
                                    _RowError, _type_name, detect_format)

# The fields of a row per method, the text fields in the order a message names them.
FIELDS = {"dpo": ("prompt", "chosen", "rejected"), "orpo": ("prompt", "chosen", "rejected"),
          "kto": ("prompt", "completion", "label"), "grpo": ("prompt",)}
ROLES = ("system", "user", "assistant")
# Names TRL 1.16 gives reward functions itself, or drops from the columns it passes on (GRPOTrainer._calculate_rewards)
RESERVED = ("completion", "completion_ids", "prompts", "completions", "trainer_state", "log_extra", "log_metric",
            "environments")


def row_shape(method: str) -> str:
    """How a row of `method` looks, for messages."""
    if method == "kto":
        return '{"prompt", "completion", "label": true|false}'
    if method == "grpo":
        return '{"prompt", ...other columns for the reward functions}'
    return '{"prompt", "chosen", "rejected"}'


def _messages(value: list, key: str, method: str) -> list[dict]:
    """A conversational field: checked {"role", "content"} messages, copied with only those two keys."""
    if not value:
        raise _RowError(f"empty conversation (field '{key}')")
    out = []
    for n, message in enumerate(value, 1):
        if not isinstance(message, dict):
            raise _RowError(f"field '{key}': message {n} must be an object, got {_type_name(message)}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise _RowError(f"field '{key}': message {n} has role {role!r}; expected one of: {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise _RowError(f"field '{key}': message {n}: content must be a string, got {_type_name(content)}")
        out.append({"role": role, "content": content})
    if key == "prompt":
        if out[-1]["role"] == "assistant":
            where = ("the model writes the assistant's turn" if method == "grpo"
                     else "the answer to prefer goes in the completion")
            raise _RowError(f"field 'prompt' ends with an assistant turn; {where}")
    elif out[0]["role"] != "assistant":
        raise _RowError(f"field '{key}' must start with the assistant's turn, got {out[0]['role']!r}")
    if key != "prompt" and not any(m["content"].strip() for m in out if m["role"] == "assistant"):
        raise _RowError(f"empty {key} (field '{key}')")
    return out


def _text(row: dict, key: str, method: str) -> tuple[str, Any]:
    """('text' | 'conversation', the field's value checked)."""
    if not _present(row, key):
        hint = ""
        if key == "prompt":
            hint = "; rows whose prompt is only inside the chosen/rejected conversations: move it into 'prompt'"
        raise _RowError(f"missing field '{key}' ({method} rows are {row_shape(method)}){hint}")
    value = row[key]
    if isinstance(value, str):
        if not value.strip():
            raise _RowError(f"empty {key} (field '{key}')")
        return "text", value
    if isinstance(value, list):
        return "conversation", _messages(value, key, method)
    raise _RowError(f"field '{key}' must be a string or a list of messages, got {_type_name(value)}")


def check_row(row: Any, method: str) -> tuple[str, dict]:
    """(kind, the row with only the fields TRL needs): kind is 'text' or 'conversation'. Raises _RowError."""
    if not isinstance(row, dict):
        raise _RowError(f"expected a JSON object, got {_type_name(row)}")
    text_keys = [k for k in FIELDS[method] if k != "label"]
    kinds, out = {}, {}
    for key in text_keys:
        kinds[key], out[key] = _text(row, key, method)
    if len(set(kinds.values())) > 1:
        parts = ", ".join(f"'{k}' is {'a string' if v == 'text' else 'a list of messages'}" for k, v in kinds.items())
        raise _RowError(f"{parts}: a row's fields must be all strings or all message lists")
    if method == "kto":
        if not _present(row, "label"):
            raise _RowError(f"missing field 'label' (kto rows are {row_shape(method)})")
        if not isinstance(row["label"], bool):
            raise _RowError(f"field 'label' must be true or false (whether the completion is desirable), "
                            f"got {_type_name(row['label'])} ({row['label']!r})")
        out["label"] = row["label"]
    elif method == "grpo":
        for key in row:
            if key in RESERVED:
                raise _RowError(f"column '{key}': TRL passes reward functions an argument of that name itself "
                                "(or drops the column); rename it")
        out.update((k, v) for k, v in row.items() if k != "prompt")
    elif out["chosen"] == out["rejected"]:
        raise _RowError("chosen and rejected are the same; a pair must differ to teach a preference")
    return kinds["prompt"], out


def _shape(value: Any):
    """The type `datasets` gives a value: None (fits any), a name, ("list", items) or ("object", {key: shape})."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "number"  # ints and floats share a float column
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        items = None
        for item in value:
            items = _merge(items, _shape(item))
        return ("list", items)
    if isinstance(value, dict):
        return ("object", {k: _shape(v) for k, v in value.items()})
    return type(value).__name__


def _merge(a, b):
    """One shape holding both (an object's keys united, missing ones null), or ValueError where Arrow has none."""
    if a is None or b is None:
        return b if a is None else a
    if isinstance(a, tuple) and isinstance(b, tuple) and a[0] == b[0]:
        if a[0] == "list":
            return ("list", _merge(a[1], b[1]))
        keys = dict(a[1])
        for k, v in b[1].items():
            keys[k] = _merge(keys.get(k), v)
        return ("object", keys)
    if a == b:
        return a
    raise ValueError


def _describe(shape) -> str:
    return {"list": "a list", "object": "an object"}[shape[0]] if isinstance(shape, tuple) else f"a {shape}"


def _check_columns(row: dict, columns: dict, where: str) -> dict:
    """`columns` ({name: (shape, where it was set)}) with this row's extra columns merged in; raises _RowError
    where a column changes type."""
    out = dict(columns)
    for key, value in row.items():
        if key == "prompt":
            continue
        try:
            shape = _shape(value)
        except ValueError:
            raise _RowError(f"column '{key}' mixes types inside one value; a column keeps one type") from None
        old, at = out.get(key, (None, where))
        try:
            out[key] = (_merge(old, shape), at if old is not None else where)
        except ValueError:
            what = ": its items or keys hold other types than in" if _describe(old) == _describe(shape) else \
                f" is {_describe(shape)} here, but {_describe(old)} in"
            raise _RowError(f"column '{key}'{what} earlier rows (as set by {at}); a column keeps one type "
                            "(`datasets` stores it as one Arrow column)") from None
    return out


def _sft_hint(row: Any) -> str:
    """A note when a row is SFT data, the likeliest reason a preference field is missing."""
    if not isinstance(row, dict) or any(k in row for k in ("chosen", "rejected", "completion")):
        return ""
    try:
        fmt = detect_format(row)
    except DataError:
        return ""
    return f"; the row looks like {fmt} (SFT) data, which --method sft trains on"


@dataclass
class PreferenceReport(LoadReport):
    """LoadReport with the method; `format` is "strings" or "conversational"."""
    method: str = "dpo"
    desirable: int = 0  # kto rows labelled true
    columns: tuple = ()  # grpo: the extra columns, passed on to the reward functions

    def summary(self) -> str:
        text = f"{self.rows:,} {self.method} {_plural(self.rows, 'row')} ({self.format})"
        if self.method == "kto":
            text += f", {self.desirable:,} desirable / {self.rows - self.desirable:,} undesirable"
        if self.method == "grpo":
            text += (f", columns for the reward functions: {', '.join(self.columns)}" if self.columns
                     else ", no other columns")
        if self.skipped:
            text += f", {self.skipped:,} bad {_plural(self.skipped, 'row')} skipped (first: {self.reasons[0]})"
        return text


def load_preference_rows(source: Any, method: str, skip_bad_rows: bool = False) -> tuple[list[dict], PreferenceReport]:
    """Every row of `source` checked for `method` (see the module docstring): (rows for TRL, report).

    Raises DataError on the first bad row unless `skip_bad_rows`; no valid row at all is always an error.
    """
    if method not in FIELDS:
        raise DataError(f"unknown preference method {method!r}; choose one of: {', '.join(FIELDS)}")
    name, pairs = _iter_source(source)
    report = PreferenceReport(source=name, format="none", method=method)
    rows: list[dict] = []
    kind, kind_at, seen = None, None, 0
    columns: dict = {}  # grpo: {column: (shape, where it was set)}

    def bad(where: str, reason: str) -> None:
        if not skip_bad_rows:
            raise DataError(f"{where}: {reason}")
        report.skipped += 1
        if len(report.reasons) < MAX_REASONS:
            report.reasons.append(f"{where}: {reason}")

    for where, row in pairs:
        seen += 1
        if isinstance(row, _Bad):
            bad(where, str(row))
            continue
        try:
            row_kind, checked = check_row(row, method)
        except _RowError as e:
            reason = str(e)
            bad(where, reason + (_sft_hint(row) if reason.startswith("missing field") else ""))
            continue
        if kind is None:
            kind, kind_at = row_kind, where
        elif row_kind != kind:
            bad(where, f"{'strings' if row_kind == 'text' else 'message lists'}, but the rows are "
                       f"{'strings' if kind == 'text' else 'message lists'} (as set by {kind_at}); "
                       "one file must not mix the two")
            continue
        if method == "grpo":
            try:
                columns = _check_columns(checked, columns, where)
            except _RowError as e:
                bad(where, str(e))
                continue
        rows.append(checked)
        report.desirable += bool(checked.get("label"))
    for row in rows:  # `datasets` takes its columns from the first row: each row gets all of them
        for key in columns:
            row.setdefault(key, None)
    report.rows, report.columns = len(rows), tuple(columns)
    report.format = {"text": "strings", "conversation": "conversational"}.get(kind, "none")
    if not rows:
        if seen == 0:
            raise DataError(f"{name}: no rows (the data is empty)")
        first = f"; first: {report.reasons[0]}" if report.reasons else ""
        raise DataError(f"{name}: no valid rows (all {seen:,} were bad{first})")
    return rows, report
