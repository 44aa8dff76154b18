"""Reading training rows and turning the four row shapes into one normal form.

Sources: a .jsonl file, a .json file holding a list of rows, a Python list of dicts, or a
`datasets.Dataset` (never imported here; recognised by its attributes). Shapes, detected from the
first valid row unless `format=` says otherwise:

    alpaca    {"instruction", "input"?, "output", "system"?}
    sharegpt  {"conversations": [{"from": "human"|"gpt"|..., "value": ...}, ...]}
    messages  {"messages": [{"role": "user"|"assistant"|"system", "content": ...}, ...]}
    text      {"text": ...}

Every row becomes {"messages": [...], "where": ...} or {"text": ..., "where": ...}, where `where`
is "file.jsonl:LINE" (or "row N", 1-based, for lists and Datasets) so every later error can point
at the row that caused it.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

FORMATS = ("alpaca", "sharegpt", "messages", "text")

# sharegpt dumps use several speaker names; map them onto the three chat-template roles.
ROLE_ALIASES = {
    "system": "system",
    "user": "user", "human": "user",
    "assistant": "assistant", "gpt": "assistant", "model": "assistant",
}
MAX_REASONS = 5  # skipped-row reasons a report keeps; the count is always exact


class DataError(ValueError):
    """A problem with the training data, worded so the user can find and fix it."""


class _RowError(Exception):
    """One bad row; the caller adds where it is."""


@dataclass
class LoadReport:
    source: str
    format: str
    rows: int = 0
    skipped: int = 0
    reasons: list[str] = field(default_factory=list)  # the first MAX_REASONS, each "where: why"

    def summary(self) -> str:
        text = f"{self.rows:,} {_plural(self.rows, 'row')} ({self.format}) from {self.source}"
        if self.skipped:
            text += f", {self.skipped:,} bad {_plural(self.skipped, 'row')} skipped (first: {self.reasons[0]})"
        return text


def _plural(n: int, word: str) -> str:
    return word if n == 1 else word + "s"


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "object", list: "list", str: "string", bool: "bool"}.get(type(value), type(value).__name__)


def _present(row: dict, key: str) -> bool:
    # datasets fills a column that some rows lack with None, so None counts as absent.
    return row.get(key) is not None


def detect_format(row: dict) -> str:
    """Name of the format a row is in. Alpaca wins over text because the original Alpaca
    release carries both its fields and a pre-rendered "text"."""
    if not isinstance(row, dict):
        raise DataError(f"expected a JSON object per row, got {_type_name(row)}")
    if _present(row, "messages"):
        return "messages"
    if _present(row, "conversations"):
        return "sharegpt"
    if _present(row, "instruction") or (_present(row, "output") and not _present(row, "text")):
        return "alpaca"
    if _present(row, "text"):
        return "text"
    keys = ", ".join(repr(k) for k in list(row)[:8]) or "none"
    raise DataError(
        f"cannot tell the format of a row with keys {keys}: expected 'instruction' + 'output' (alpaca), "
        "'conversations' (sharegpt), 'messages' (messages) or 'text' (text)")


# ---------------------------------------------------------------- normalising one row

def _string_field(row: dict, key: str, fmt: str, required: bool = True) -> str | None:
    if not _present(row, key):
        if required:
            raise _RowError(f"missing field '{key}' ({fmt} format)")
        return None
    value = row[key]
    if not isinstance(value, str):
        raise _RowError(f"field '{key}' must be a string, got {_type_name(value)}")
    return value


def _from_alpaca(row: dict) -> list[dict]:
    instruction = _string_field(row, "instruction", "alpaca")
    output = _string_field(row, "output", "alpaca")
    extra = _string_field(row, "input", "alpaca", required=False)
    system = _string_field(row, "system", "alpaca", required=False)
    if not instruction.strip():
        raise _RowError("empty instruction (field 'instruction')")
    if not output.strip():
        raise _RowError("empty answer (field 'output')")
    user = instruction + ("\n\n" + extra if extra and extra.strip() else "")
    messages = [{"role": "system", "content": system}] if system and system.strip() else []
    return messages + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def _content(value: Any, n: int) -> str:
    if isinstance(value, str):
        return value
    # OpenAI also allows content as a list of parts; only text parts make sense for text models.
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in value):
        return "".join(str(p.get("text", "")) for p in value)
    raise _RowError(f"message {n}: content must be a string, got {_type_name(value)}")


def _from_conversation(row: dict, key: str, fmt: str) -> list[dict]:
    turns = row[key]
    if not isinstance(turns, list):
        raise _RowError(f"field '{key}' must be a list of messages, got {_type_name(turns)}")
    if not turns:
        raise _RowError(f"empty conversation (field '{key}')")
    messages = []
    for n, turn in enumerate(turns, 1):
        if not isinstance(turn, dict):
            raise _RowError(f"message {n} must be an object, got {_type_name(turn)}")
        # Accept both key styles in either container: real dumps mix them.
        role_key, text_key = ("from", "value") if "from" in turn else ("role", "content")
        if role_key not in turn:
            raise _RowError(f"message {n}: missing '{'from' if fmt == 'sharegpt' else 'role'}'")
        if text_key not in turn or turn[text_key] is None:
            raise _RowError(f"message {n}: missing '{text_key}'")
        raw_role = turn[role_key]
        role = ROLE_ALIASES.get(raw_role.strip().lower()) if isinstance(raw_role, str) else None
        if role is None:
            raise _RowError(f"message {n}: unknown role {raw_role!r} "
                            f"(expected one of: {', '.join(ROLE_ALIASES)})")
        message = {"role": role, "content": _content(turn[text_key], n)}
        if role == "assistant":
            if not message["content"].strip():
                raise _RowError(f"empty answer (message {n})")
            # OpenAI's fine-tuning format: weight 0 keeps a turn as context without training on it.
            weight = turn.get("weight")
            if weight is not None:
                if weight not in (0, 1) or isinstance(weight, bool):
                    raise _RowError(f"message {n}: weight must be 0 or 1, got {weight!r}")
                if weight == 0:
                    message["weight"] = 0
        messages.append(message)
    roles = [m["role"] for m in messages]
    if "assistant" not in roles:
        raise _RowError("conversation has no assistant turn (nothing to train on)")
    first = next(r for r in roles if r != "system")
    if first == "assistant":
        raise _RowError("conversation starts with an assistant turn; the first non-system turn must be the user's")
    return messages


def normalize_row(row: Any, fmt: str) -> dict:
    """One raw row in format `fmt` → {"messages": [...]} or {"text": ...}; raises _RowError."""
    if not isinstance(row, dict):
        raise _RowError(f"expected a JSON object, got {_type_name(row)}")
    if fmt == "alpaca":
        return {"messages": _from_alpaca(row)}
    if fmt in ("sharegpt", "messages"):
        key = "conversations" if fmt == "sharegpt" else "messages"
        if not _present(row, key):
            raise _RowError(f"missing field '{key}' ({fmt} format)")
        return {"messages": _from_conversation(row, key, fmt)}
    text = _string_field(row, "text", "text")
    if not text.strip():
        raise _RowError("empty text (field 'text')")
    return {"text": text}


# ---------------------------------------------------------------- reading sources

_Bad = _RowError  # a row that could not even be parsed travels as its error


def _read_file(path: str) -> Iterator[tuple[str, Any]]:
    """(where, row) pairs of a .jsonl or .json file; unparseable lines come as _Bad."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found; give the path of a .jsonl or .json file of training rows "
                        "(or pass a list of dicts / a datasets.Dataset)") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder; give the path of one .jsonl or .json file inside it") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read the file ({e.strerror}); check its permissions") from None
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]  # a UTF-8 byte-order mark, as some Windows editors write
    if data.lstrip()[:1] == b"[":
        yield from _read_json_list(path, data)
        return
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield where, _Bad(f"not valid UTF-8 text (byte {e.start + 1} of the line); save the file as UTF-8")
            continue
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as e:
            hint = ""
            if lineno == 1 and line.strip() == "{":
                hint = "; the file looks like pretty-printed JSON: use one object per line, or a JSON list"
            yield where, _Bad(f"invalid JSON ({_json_problem(e)}){hint}")


def _json_problem(e: json.JSONDecodeError) -> str:
    """json's message with its column. Some messages already end in "at" ("Unterminated string starting
    at"), which would read "at at column N"."""
    msg = e.msg[:-3] if e.msg.endswith(" at") else e.msg
    return f"{msg} at column {e.colno}"


def _read_json_list(path: str, data: bytes) -> Iterator[tuple[str, Any]]:
    try:
        rows = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 text; save the file as UTF-8") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({_json_problem(e)}); "
                        "a .json file must hold one list of rows") from None
    for i, row in enumerate(rows, 1):
        yield f"{path}: row {i}", row


def _is_dataset(obj: Any) -> bool:
    return type(obj).__module__.split(".")[0] == "datasets"


def _iter_source(source: Any) -> tuple[str, Iterable[tuple[str, Any]]]:
    """(name for messages, (where, row) pairs)."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        return path, _read_file(path)
    if isinstance(source, dict):
        if _is_dataset(source):  # DatasetDict is a dict of splits
            splits = ", ".join(repr(k) for k in source)
            raise DataError(f"got a DatasetDict with splits {splits}; pass one split, e.g. dataset['train']")
        raise DataError("got one dict; pass a list of row dicts (or a datasets.Dataset)")
    if _is_dataset(source):
        return "dataset", ((f"row {i}", row) for i, row in enumerate(source, 1))
    if isinstance(source, (list, tuple)):
        return "list", ((f"row {i}", row) for i, row in enumerate(source, 1))
    raise DataError(f"cannot read training data from a {type(source).__name__}: give the path of a .jsonl or "
                    ".json file, a list of dicts, or a datasets.Dataset")


def _other_format(row: Any, fmt: str) -> bool:
    try:
        return detect_format(row) != fmt
    except DataError:
        return False


def load_rows(source: Any, format: str = "auto", skip_bad_rows: bool = False) -> tuple[list[dict], LoadReport]:
    """Read and normalise every row of `source` (see the module docstring).

    Raises DataError on the first bad row unless `skip_bad_rows`, in which case bad rows are
    counted in the report. No valid rows at all is always an error.
    """
    if format not in FORMATS and format != "auto":
        raise DataError(f"unknown format {format!r}; choose one of: auto, {', '.join(FORMATS)}")
    name, pairs = _iter_source(source)
    fmt = None if format == "auto" else format
    detected_at = None
    rows: list[dict] = []
    report = LoadReport(source=name, format=fmt or "auto")

    def bad(where: str, reason: str) -> None:
        if not skip_bad_rows:
            raise DataError(f"{where}: {reason}")
        report.skipped += 1
        if len(report.reasons) < MAX_REASONS:
            report.reasons.append(f"{where}: {reason}")

    seen = 0
    for where, row in pairs:
        seen += 1
        if isinstance(row, _Bad):
            bad(where, str(row))
            continue
        if fmt is None:
            try:
                fmt = detect_format(row)
            except DataError as e:
                bad(where, str(e))
                continue
            detected_at = where
            report.format = fmt
        try:
            normal = normalize_row(row, fmt)
        except _RowError as e:
            reason = str(e)
            if detected_at is not None and reason.startswith("missing field") and _other_format(row, fmt):
                reason += f"; the format ({fmt}) was detected from {detected_at}, rows must not mix formats"
            bad(where, reason)
            continue
        normal["where"] = where
        rows.append(normal)

    report.rows = len(rows)
    if not rows:
        if seen == 0:
            raise DataError(f"{name}: no rows (the data is empty)")
        first = f"; first: {report.reasons[0]}" if report.reasons else ""
        raise DataError(f"{name}: no valid rows (all {seen:,} were bad{first})")
    return rows, report
