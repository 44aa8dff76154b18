"""Training data: rows → chat-template tokens with answer-only labels → padded batches.

    rows, load_report = load_rows("data.jsonl")              # data/formats.py: read, detect, normalise
    samples, tok_report = tokenize_examples(rows, tokenizer)  # render, tokenize, mask, truncate
    batch = DataCollator(tokenizer)(samples[:8])              # pad to the longest sample

or all at once with `prepare_dataset`. Labels are -100 on every token the loss must ignore.

How answer tokens are found: for the assistant turn i, the template renders messages[:i] with the
generation prompt (the prompt) and messages[:i+1] (prompt + answer + the template's end-of-turn
marker). The prompt, and the answer that follows it, must start the full rendering the same way;
the tokens between the two are the answer. This works for any prefix-stable template without
knowing its markers, and trains the end-of-turn token so the model learns to stop.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from turbotune.data.formats import FORMATS, MAX_REASONS, DataError, LoadReport, _plural, detect_format, load_rows

__all__ = [
    "FORMATS", "DataError", "LoadReport", "TokenizeReport", "DataReport", "DataCollator",
    "load_rows", "detect_format", "tokenize_examples", "prepare_dataset", "sample_data_path",
]

IGNORE_INDEX = -100


def sample_data_path(name: str = "copywriting") -> Path:
    """A dataset shipped with turbotune (alpaca rows), for demos and smoke tests."""
    path = Path(__file__).with_name("sample_data") / f"{name}.jsonl"
    if not path.is_file():
        shipped = sorted(p.stem for p in path.parent.glob("*.jsonl"))
        raise DataError(f"no sample data named {name!r}; shipped: {', '.join(shipped) or 'none'}")
    return path


@dataclass
class TokenizeReport:
    samples: int = 0
    max_seq_length: int = 0
    truncated: int = 0
    dropped: list[tuple[str, str]] = field(default_factory=list)  # (where, why) of samples left out
    tokens: int = 0
    trainable: int = 0

    def _counts(self) -> str:
        return (f"{self.truncated:,} truncated to {self.max_seq_length:,} tokens, "
                f"{len(self.dropped):,} without answer tokens; "
                f"{self.tokens:,} tokens, {self.trainable:,} trainable")

    def summary(self) -> str:
        return f"{self.samples:,} {_plural(self.samples, 'sample')}, {self._counts()}"

    def details(self) -> list[str]:
        """One line per dropped sample (the first few), for logs."""
        lines = [f"{where}: dropped, {why}" for where, why in self.dropped[:MAX_REASONS]]
        if len(self.dropped) > MAX_REASONS:
            lines.append(f"... and {len(self.dropped) - MAX_REASONS:,} more dropped")
        return lines


@dataclass
class DataReport:
    load: LoadReport
    tokenize: TokenizeReport

    @property
    def samples(self) -> int:
        return self.tokenize.samples

    def summary(self) -> str:
        n = self.tokenize.samples
        skipped = f", {self.load.skipped:,} bad {_plural(self.load.skipped, 'row')} skipped" if self.load.skipped else ""
        return f"{n:,} {_plural(n, 'sample')} ({self.load.format}){skipped}, {self.tokenize._counts()}"

    def details(self) -> list[str]:
        """The reasons behind the counts: skipped rows, then dropped samples (the first few of each)."""
        lines = [f"{r} (skipped)" for r in self.load.reasons]
        if self.load.skipped > len(self.load.reasons):
            lines.append(f"... and {self.load.skipped - len(self.load.reasons):,} more skipped")
        return lines + self.tokenize.details()


# ---------------------------------------------------------------- tokenisation

def _encode(tokenizer: Any, text: str, special: bool = False) -> list[int]:
    # Rendered templates already hold their bos/markers as text, hence no special tokens there.
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _render(tokenizer: Any, messages: list[dict], generation_prompt: bool, where: str) -> str:
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as e:  # jinja errors, or a template's raise_exception("roles must alternate ...")
        raise DataError(f"{where}: the chat template failed on this conversation ({type(e).__name__}: {e})") from e
    if not isinstance(text, str):
        raise DataError(f"{where}: apply_chat_template(tokenize=False) returned {type(text).__name__}, not text")
    return text


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _not_stable(where: str, turn: int, what: str) -> DataError:
    return DataError(
        f"{where}: the chat template is not prefix-stable at message {turn + 1} ({what}), so the answer "
        "tokens cannot be located. Use a template that renders earlier turns the same way whatever follows "
        "(e.g. turbotune.get_chat_template(tokenizer, 'chatml')), or train_on_responses_only=False.")


def _conversation(tokenizer: Any, messages: list[dict], where: str, responses_only: bool) -> tuple[list[int], list[int]]:
    full = _render(tokenizer, messages, False, where)
    if not responses_only:
        ids = _encode(tokenizer, full)
        return ids, list(ids)
    spans = []  # (message index, prompt text, prompt + answer text)
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or message.get("weight", 1) == 0:
            continue
        prompt = _render(tokenizer, messages[:i], True, where)
        upto = full if i == len(messages) - 1 else _render(tokenizer, messages[: i + 1], False, where)
        if not full.startswith(prompt):
            raise _not_stable(where, i, "the prompt rendered alone differs from the start of the full conversation")
        if not upto.startswith(prompt):
            raise _not_stable(where, i, "the generation prompt is not how the answer's turn begins")
        # Some official templates close the *last* turn differently (e.g. with eos), so `upto`
        # need not be a prefix of `full` after the answer; the answer itself must be.
        answer = upto[len(prompt):]
        content = message["content"].strip()
        at = answer.find(content)
        if at < 0 or not full.startswith(upto[: len(prompt) + at + len(content)]):
            raise _not_stable(where, i, "the answer is not rendered the same way inside the full conversation")
        spans.append((i, prompt, upto))
    # One tokenizer call per conversation: most of the cost is per call, not per string.
    texts = list(dict.fromkeys([full] + [t for _, p, u in spans for t in (p, u)]))
    encoded = dict(zip(texts, tokenizer(texts, add_special_tokens=False)["input_ids"]))
    ids = list(encoded[full])
    labels = [IGNORE_INDEX] * len(ids)
    for i, prompt, upto in spans:
        # Token-level common prefixes absorb a token that merges across the prompt/answer seam.
        start = _common_prefix(encoded[prompt], ids)
        end = _common_prefix(encoded[upto], ids)
        if end <= start:
            raise _not_stable(where, i, "no answer tokens between the prompt and the answer's end")
        labels[start:end] = ids[start:end]
    return ids, labels


def tokenize_examples(rows: list[dict], tokenizer: Any, max_seq_length: int = 2048,
                      train_on_responses_only: bool = True) -> tuple[list[dict], TokenizeReport]:
    """Tokenize normalised rows (from `load_rows`) into {"input_ids", "labels", "where"} samples.

    Chat rows go through `tokenizer.apply_chat_template`; with `train_on_responses_only` only the
    assistant answers (and their end-of-turn token) carry labels. Text rows are text + eos and
    train on every token. Samples longer than `max_seq_length` are cut; a sample left with no
    label to predict is dropped and named in the report.
    """
    if max_seq_length < 2:
        raise DataError(f"max_seq_length must be at least 2, got {max_seq_length}")
    if any("messages" in r for r in rows) and not getattr(tokenizer, "chat_template", None):
        raise DataError("the tokenizer has no chat template; install one first, e.g. "
                        "turbotune.data.chat_templates.ensure_chat_template(tokenizer) (ChatML) "
                        "or get_chat_template(tokenizer, 'llama-3')")
    eos_id = getattr(tokenizer, "eos_token_id", None)
    report = TokenizeReport(max_seq_length=max_seq_length)
    samples = []
    for n, row in enumerate(rows, 1):
        where = row.get("where") or f"row {n}"
        if "messages" in row:
            ids, labels = _conversation(tokenizer, row["messages"], where, train_on_responses_only)
        elif "text" in row:
            ids = _encode(tokenizer, row["text"], special=True)
            if eos_id is not None and (not ids or ids[-1] != eos_id):
                ids.append(eos_id)  # so a text model learns where documents end
            labels = list(ids)
        else:
            raise DataError(f"{where}: a row needs 'messages' or 'text'; read raw rows with load_rows() first")
        if len(ids) > max_seq_length:
            report.truncated += 1
            first_label = next((j for j, x in enumerate(labels) if x != IGNORE_INDEX), None)
            ids, labels = ids[:max_seq_length], labels[:max_seq_length]
        else:
            first_label = None
        # Position 0 is never a target: the model predicts token t from the tokens before it.
        if all(x == IGNORE_INDEX for x in labels[1:]):
            if first_label is not None and first_label >= max_seq_length - 1:
                why = (f"the answer starts after max_seq_length={max_seq_length:,} tokens "
                       f"(the prompt is {first_label:,} tokens)")
            else:
                why = "no trainable tokens (every assistant turn has weight 0)"
            report.dropped.append((where, why))
            continue
        samples.append({"input_ids": ids, "labels": labels, "where": where})
        report.tokens += len(ids)
        report.trainable += sum(1 for x in labels[1:] if x != IGNORE_INDEX)
    report.samples = len(samples)
    if not samples:
        first = f" (first: {report.dropped[0][0]}: {report.dropped[0][1]})" if report.dropped else ""
        raise DataError(f"no samples left to train on: all {len(rows):,} rows have no answer tokens{first}; "
                        "raise max_seq_length or shorten the prompts" if rows else "no rows to tokenize")
    return samples, report


def prepare_dataset(source: Any, tokenizer: Any, max_seq_length: int = 2048, format: str = "auto",
                    train_on_responses_only: bool = True, skip_bad_rows: bool = False) -> tuple[list[dict], DataReport]:
    """`load_rows` then `tokenize_examples`: a file, list or Dataset in, trainable samples out."""
    rows, load_report = load_rows(source, format=format, skip_bad_rows=skip_bad_rows)
    samples, tok_report = tokenize_examples(rows, tokenizer, max_seq_length=max_seq_length,
                                            train_on_responses_only=train_on_responses_only)
    return samples, DataReport(load=load_report, tokenize=tok_report)


# ---------------------------------------------------------------- batching

class DataCollator:
    """Right-pads a list of samples to the longest one: input_ids with the pad id, attention_mask
    with 0, labels with -100. Extra keys ("where") are ignored. Returns torch tensors."""

    def __init__(self, tokenizer_or_pad_id: Any, pad_to_multiple_of: int | None = None):
        if isinstance(tokenizer_or_pad_id, int):
            pad_id = tokenizer_or_pad_id
        else:
            pad_id = getattr(tokenizer_or_pad_id, "pad_token_id", None)
            if pad_id is None:  # common for base models; masked out by attention_mask and labels anyway
                pad_id = getattr(tokenizer_or_pad_id, "eos_token_id", None)
            if pad_id is None:
                raise ValueError("the tokenizer has neither a pad nor an eos token; pass a pad id")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be a positive integer, got {pad_to_multiple_of}")
        self.pad_id = int(pad_id)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list[dict]) -> dict:
        import torch

        if not features:
            raise ValueError("cannot collate an empty batch")
        ids = [list(map(int, f["input_ids"])) for f in features]
        labels = [list(map(int, f["labels"])) if f.get("labels") is not None else list(i)
                  for f, i in zip(features, ids)]
        length = max(len(i) for i in ids)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch_ids = torch.full((len(ids), length), self.pad_id, dtype=torch.long)
        batch_labels = torch.full((len(ids), length), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(ids), length), dtype=torch.long)
        for row, (i, lab) in enumerate(zip(ids, labels)):
            if len(lab) != len(i):
                raise ValueError(f"sample {row}: {len(i)} input_ids but {len(lab)} labels")
            batch_ids[row, : len(i)] = torch.tensor(i, dtype=torch.long)
            batch_labels[row, : len(i)] = torch.tensor(lab, dtype=torch.long)
            mask[row, : len(i)] = 1
        return {"input_ids": batch_ids, "attention_mask": mask, "labels": batch_labels}
