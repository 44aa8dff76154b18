"""turbotune.data.dataset: reading the four row formats, errors that name the row, answer-only labels, batching."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from turbotune.data.dataset import (
    FORMATS, DataCollator, DataError, detect_format, load_rows, prepare_dataset, sample_data_path,
    tokenize_examples,
)

IGNORE = -100
CJK = re.compile(r"[\u4e00-\u9fff]")

# One row per format, all meaning the same conversation.
ROWS = {
    "alpaca": {"instruction": "Name a tea.", "input": "green", "output": "Longjing.", "system": "Be brief."},
    "sharegpt": {"conversations": [{"from": "system", "value": "Be brief."},
                                   {"from": "human", "value": "Name a tea.\n\ngreen"},
                                   {"from": "gpt", "value": "Longjing."}]},
    "messages": {"messages": [{"role": "system", "content": "Be brief."},
                              {"role": "user", "content": "Name a tea.\n\ngreen"},
                              {"role": "assistant", "content": "Longjing."}]},
    "text": {"text": "Longjing is a green tea."},
}
EXPECTED_MESSAGES = [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "Name a tea.\n\ngreen"},
                     {"role": "assistant", "content": "Longjing."}]


def write_jsonl(path: Path, lines: list) -> Path:
    """Rows as JSON lines; a str entry is written verbatim (for broken or blank lines)."""
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x, ensure_ascii=False)) + "\n"
                            for x in lines), encoding="utf-8")
    return path


@pytest.fixture
def tok(smol_tokenizer):
    """The shared SmolLM2 tokenizer; tests may change its chat template, which is put back after."""
    saved = smol_tokenizer.chat_template
    yield smol_tokenizer
    smol_tokenizer.chat_template = saved


def label_runs(tokenizer, sample) -> list[str]:
    """Decoded text of each contiguous run of trained labels."""
    runs, cur = [], []
    for label in sample["labels"] + [IGNORE]:
        if label != IGNORE:
            cur.append(label)
        elif cur:
            runs.append(tokenizer.decode(cur))
            cur = []
    return runs


# ---------------------------------------------------------------- loading

@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_from_jsonl_and_list(tmp_path, fmt):
    path = write_jsonl(tmp_path / "d.jsonl", [ROWS[fmt], "", ROWS[fmt]])
    rows, report = load_rows(path)
    assert report.format == fmt and report.rows == 2
    assert [r["where"] for r in rows] == [f"{path}:1", f"{path}:3"]  # the blank line still counts
    listed, list_report = load_rows([ROWS[fmt]])
    assert list_report.format == fmt and listed[0]["where"] == "row 1"
    if fmt == "text":
        assert rows[0]["text"] == listed[0]["text"] == "Longjing is a green tea."
    else:
        assert rows[0]["messages"] == listed[0]["messages"] == EXPECTED_MESSAGES


def test_alpaca_without_input_or_system():
    rows, _ = load_rows([{"instruction": "Hi", "input": "", "output": "Hello"}])
    assert rows[0]["messages"] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


def test_json_list_file(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([ROWS["alpaca"], {"instruction": "x", "output": 3}], indent=2), encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(f"{path}: row 2: field 'output' must be a string, got int")):
        load_rows(path)


def test_datasets_dataset_source():
    datasets = pytest.importorskip("datasets")
    # The second row lacks "input": datasets fills it with None, which must count as absent.
    ds = datasets.Dataset.from_list([{"instruction": "a", "input": "b", "output": "c"},
                                     {"instruction": "d", "output": "e"}])
    rows, report = load_rows(ds)
    assert report.format == "alpaca" and [r["where"] for r in rows] == ["row 1", "row 2"]
    assert rows[1]["messages"][0] == {"role": "user", "content": "d"}
    with pytest.raises(DataError, match="pass one split"):
        load_rows(datasets.DatasetDict({"train": ds}))


def test_detect_format():
    for fmt, row in ROWS.items():
        assert detect_format(row) == fmt
    # The original Alpaca release carries a rendered "text" next to its fields: still alpaca.
    assert detect_format({"instruction": "a", "output": "b", "text": "### a b"}) == "alpaca"
    with pytest.raises(DataError, match="cannot tell the format.*'prompt'"):
        detect_format({"prompt": "a", "completion": "b"})


def test_format_override(tmp_path):
    row = {"instruction": "a", "output": "b", "text": "plain text"}
    assert "messages" in load_rows([row])[0][0]
    rows, report = load_rows([row], format="text")
    assert rows[0]["text"] == "plain text" and report.format == "text"
    path = write_jsonl(tmp_path / "d.jsonl", [ROWS["alpaca"]])
    with pytest.raises(DataError, match=re.escape(f"{path}:1: missing field 'conversations' (sharegpt format)")):
        load_rows(path, format="sharegpt")
    with pytest.raises(DataError, match="unknown format 'chat'"):
        load_rows([row], format="chat")


BAD_ROWS = [  # (format of the good rows around it, the bad line, the reason expected)
    ("alpaca", '{"instruction": "a" "output": "b"}', "invalid JSON (Expecting ',' delimiter"),
    ("alpaca", {"instruction": "a"}, "missing field 'output' (alpaca format)"),
    ("alpaca", {"instruction": 7, "output": "b"}, "field 'instruction' must be a string, got int"),
    ("alpaca", {"instruction": "a", "output": "  "}, "empty answer (field 'output')"),
    ("alpaca", [1, 2], "expected a JSON object, got list"),
    ("sharegpt", {"conversations": [{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}]},
     "message 2: unknown role 'bot'"),
    ("sharegpt", {"conversations": [{"from": "human", "value": "a"}]}, "conversation has no assistant turn"),
    ("sharegpt", {"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}]},
     "conversation starts with an assistant turn"),
    ("messages", {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]},
     "empty answer (message 2)"),
    ("messages", {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "b"}]},
     "message 1: content must be a string, got int"),
    ("text", {"text": ""}, "empty text (field 'text')"),
]


@pytest.mark.parametrize("fmt,bad,reason", BAD_ROWS, ids=[r for _, _, r in BAD_ROWS])
def test_bad_row_named_by_file_and_line(tmp_path, fmt, bad, reason):
    good = ROWS[fmt]
    path = write_jsonl(tmp_path / "data.jsonl", [good, "", good, bad, good])
    with pytest.raises(DataError) as err:
        load_rows(path)
    assert str(err.value).startswith(f"{path}:4: {reason}")  # line 2 is blank, yet lines keep their numbers
    if not isinstance(bad, str):  # in a list the same row is named by its 1-based index
        with pytest.raises(DataError) as err:
            load_rows([good, bad])
        assert str(err.value).startswith(f"row 2: {reason}")


def test_skip_bad_rows_reports_count_and_reasons(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [ROWS["alpaca"], "{oops", {"instruction": "a"}, ROWS["alpaca"]])
    rows, report = load_rows(path, skip_bad_rows=True)
    assert len(rows) == report.rows == 2 and report.skipped == 2
    assert report.reasons[0].startswith(f"{path}:2: invalid JSON")
    assert report.reasons[1] == f"{path}:3: missing field 'output' (alpaca format)"
    assert "2 bad rows skipped" in report.summary()


def test_rows_of_another_format_say_where_the_format_came_from(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [ROWS["alpaca"], ROWS["messages"]])
    with pytest.raises(DataError, match=re.escape(f"{path}:2: missing field 'instruction'") + r".*detected from .*d\.jsonl:1"):
        load_rows(path)


def test_empty_dataset_is_always_an_error(tmp_path):
    empty = write_jsonl(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(DataError, match="no rows"):
        load_rows(empty, skip_bad_rows=True)
    with pytest.raises(DataError, match="no rows"):
        load_rows([])
    all_bad = write_jsonl(tmp_path / "bad.jsonl", ["{", '{"instruction": 1, "output": "x"}'])
    with pytest.raises(DataError, match=r"no valid rows \(all 2 were bad; first: .*bad\.jsonl:1: invalid JSON"):
        load_rows(all_bad, skip_bad_rows=True)


def test_missing_file_says_what_to_do(tmp_path):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(DataError) as err:
        load_rows(path)
    message = str(err.value)
    assert message.startswith(f"{path}: file not found") and ".jsonl" in message and "\n" not in message
    with pytest.raises(DataError, match="is a folder"):
        load_rows(tmp_path)


# ---------------------------------------------------------------- tokenisation

TWO_TURNS = {"messages": [{"role": "system", "content": "You write copy."},
                          {"role": "user", "content": "Tagline for tea?"},
                          {"role": "assistant", "content": "Spring in every leaf."},
                          {"role": "user", "content": "Shorter."},
                          {"role": "assistant", "content": "Pure spring."}]}


def test_response_only_mask_token_by_token(tok):
    rows, _ = load_rows([TWO_TURNS])
    (sample,), report = tokenize_examples(rows, tok)
    msgs = TWO_TURNS["messages"]
    full = tok.apply_chat_template(msgs, tokenize=False)
    assert sample["input_ids"] == tok(full, add_special_tokens=False)["input_ids"]
    assert label_runs(tok, sample) == ["Spring in every leaf.<|im_end|>\n", "Pure spring.<|im_end|>\n"]
    # Recompute the spans independently from the prompt renderings and check every position.
    spans = []
    for i in (2, 4):
        start = len(tok(tok.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True),
                        add_special_tokens=False)["input_ids"])
        end = len(tok(tok.apply_chat_template(msgs[:i + 1], tokenize=False), add_special_tokens=False)["input_ids"])
        spans.append(range(start, end))
    for pos, (token, label) in enumerate(zip(sample["input_ids"], sample["labels"])):
        trained = any(pos in s for s in spans)
        assert label == (token if trained else IGNORE), pos
    assert tok.convert_ids_to_tokens(sample["labels"][spans[0][-1] - 1]) == "<|im_end|>"  # the stop token trains
    assert report.trainable == sum(len(s) for s in spans) and report.tokens == len(sample["input_ids"])


def test_train_on_all_tokens(tok):
    rows, _ = load_rows([TWO_TURNS])
    (sample,), report = tokenize_examples(rows, tok, train_on_responses_only=False)
    assert sample["labels"] == sample["input_ids"]
    assert report.trainable == len(sample["input_ids"]) - 1  # position 0 is never a target


def test_text_rows_train_every_token_and_end_with_eos(tok):
    rows, _ = load_rows([ROWS["text"]])
    (sample,), _ = tokenize_examples(rows, tok)
    assert sample["labels"] == sample["input_ids"]
    ids = sample["input_ids"]
    assert ids[-1] == tok.eos_token_id
    if ids[0] == tok.bos_token_id:  # whether plain text gets a bos depends on the tokenizer's settings
        ids = ids[1:]
    assert tok.decode(ids[:-1]) == "Longjing is a green tea."


def test_weight_zero_turn_is_context_only(tok):
    row = json.loads(json.dumps(TWO_TURNS))
    row["messages"][2]["weight"] = 0
    (sample,), _ = tokenize_examples(load_rows([row])[0], tok)
    assert label_runs(tok, sample) == ["Pure spring.<|im_end|>\n"]


def test_truncation_is_counted(tok):
    long_answer = {"instruction": "Describe the lamp.", "output": "A warm, bright lamp. " * 40}
    rows, _ = load_rows([long_answer, ROWS["alpaca"]])
    samples, report = tokenize_examples(rows, tok, max_seq_length=64)
    assert report.truncated == 1 and report.samples == 2
    assert len(samples[0]["input_ids"]) == len(samples[0]["labels"]) == 64
    assert samples[0]["labels"][-1] != IGNORE  # the cut answer still trains
    assert "1 truncated to 64 tokens" in report.summary()


def test_sample_whose_answer_is_cut_off_is_dropped_and_named(tmp_path, tok):
    long_prompt = {"instruction": "Summarise: " + "tea leaves " * 60, "output": "Tea."}
    path = write_jsonl(tmp_path / "d.jsonl", [ROWS["alpaca"], long_prompt])
    samples, report = prepare_dataset(path, tok, max_seq_length=48)
    assert [s["where"] for s in samples] == [f"{path}:1"]
    (where, why), = report.tokenize.dropped
    assert where == f"{path}:2" and why.startswith("the answer starts after max_seq_length=48 tokens")
    assert report.details() == [f"{path}:2: dropped, {why}"]
    assert report.summary().startswith("1 sample (alpaca), 1 truncated to 48 tokens, 1 without answer tokens; ")
    with pytest.raises(DataError, match="no samples left to train on.*raise max_seq_length"):
        tokenize_examples(load_rows([long_prompt])[0], tok, max_seq_length=48)


def test_prepare_dataset_summary_counts(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [ROWS["alpaca"], "not json", ROWS["alpaca"]])
    samples, report = prepare_dataset(path, tok, max_seq_length=512, skip_bad_rows=True)
    n_tokens = sum(len(s["input_ids"]) for s in samples)
    n_train = sum(1 for s in samples for x in s["labels"][1:] if x != IGNORE)
    assert report.summary() == (f"2 samples (alpaca), 1 bad row skipped, 0 truncated to 512 tokens, "
                                f"0 without answer tokens; {n_tokens:,} tokens, {n_train:,} trainable")
    assert report.details()[0].startswith(f"{path}:2: invalid JSON")


def test_tokenizer_without_chat_template(tok):
    tok.chat_template = None
    with pytest.raises(DataError, match="no chat template.*ensure_chat_template"):
        tokenize_examples(load_rows([ROWS["alpaca"]])[0], tok)
    assert tokenize_examples(load_rows([ROWS["text"]])[0], tok)[1].samples == 1  # text needs no template


def test_template_that_is_not_prefix_stable_fails_clearly(tok):
    # Marks the last message, so a shorter conversation renders differently from a longer one.
    tok.chat_template = ("{% for m in messages %}{% if loop.last %}[LAST]{% endif %}"
                         "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(DataError, match=r"row 1: the chat template is not prefix-stable at message 3"):
        tokenize_examples(load_rows([TWO_TURNS])[0], tok)


def test_template_that_closes_the_last_turn_with_eos(tok):
    # Like Phi-3's official template: eos only when there is no generation prompt. The full
    # rendering then differs from "prefix + answer" after each middle answer; that must still work.
    tok.chat_template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
                         "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                         "{% else %}<|endoftext|>{% endif %}")
    (sample,), _ = tokenize_examples(load_rows([TWO_TURNS])[0], tok)
    assert label_runs(tok, sample) == ["Spring in every leaf.<|im_end|>\n", "Pure spring.<|im_end|>\n<|endoftext|>"]


# ---------------------------------------------------------------- batching

def test_collator_pads_right(tok):
    features = [{"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7], "where": "a"},
                {"input_ids": [8], "labels": [8], "where": "b"}]
    batch = DataCollator(tok)(features)
    pad = tok.pad_token_id
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, pad, pad]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]
    wide = DataCollator(0, pad_to_multiple_of=8)(features)
    assert wide["input_ids"].shape == (2, 8) and wide["input_ids"][1].tolist() == [8] + [0] * 7
    assert wide["labels"][0, 3:].tolist() == [IGNORE] * 5 and wide["input_ids"].dtype.is_floating_point is False
    with pytest.raises(ValueError, match="3 input_ids but 2 labels"):
        DataCollator(0)([{"input_ids": [1, 2, 3], "labels": [1, 2]}])


# ---------------------------------------------------------------- the shipped sample data

def test_sample_copywriting_data(tok):
    rows, report = load_rows(sample_data_path())
    with pytest.raises(DataError, match="no sample data named 'poems'; shipped: copywriting"):
        sample_data_path("poems")
    assert report.format == "alpaca" and report.rows >= 90 and report.skipped == 0
    answers = [r["messages"][-1]["content"] for r in rows]
    chinese = sum(bool(CJK.search(a)) for a in answers)
    assert 30 <= chinese <= len(answers) - 30  # roughly half each
    assert all(a.splitlines()[-1].startswith("→ ") and len(a.splitlines()) >= 3 for a in answers)  # house style
    with_input = sum("\n\n" in r["messages"][0]["content"] for r in rows)
    assert 20 <= with_input < len(rows)
    samples, tok_report = tokenize_examples(rows, tok, max_seq_length=256)
    assert tok_report.samples == len(rows) and tok_report.truncated == 0
    assert max(len(s["input_ids"]) for s in samples) < 256


def test_json_error_wording(tmp_path):
    """json's "Unterminated string starting at" already ends in "at": no "at at column"."""
    path = write_jsonl(tmp_path / "d.jsonl", [ROWS["alpaca"], '{"instruction": "a", "output": "b'])
    with pytest.raises(DataError) as err:
        load_rows(path)
    assert str(err.value) == f"{path}:2: invalid JSON (Unterminated string starting at column 32)"
    listed = tmp_path / "d.json"
    listed.write_text('[{"instruction": "a",\n "output": "b}]')
    with pytest.raises(DataError) as err:
        load_rows(listed)
    assert str(err.value) == (f"{listed}:2: invalid JSON (Unterminated string starting at column 12); "
                              "a .json file must hold one list of rows")
    path.write_text('{"instruction": "a" "output": "b"}\n')
    with pytest.raises(DataError) as err:
        load_rows(path)
    assert str(err.value) == f"{path}:1: invalid JSON (Expecting ',' delimiter at column 21)"
