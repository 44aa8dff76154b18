"""Preference rows (data/preference.py): good rows of each method pass with only the fields TRL reads; a bad row
stops the run as `file.jsonl:LINE: what is wrong`, before any model loads, or is skipped with --skip-bad-rows."""
import json

import pytest

from turbotune.data.formats import DataError
from turbotune.data.preference import load_preference_rows


def _user(text):
    return [{"role": "user", "content": text}]


def _bot(text):
    return [{"role": "assistant", "content": text}]


GOOD = {
    "dpo": {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
    "dpo-chat": {"prompt": [{"role": "system", "content": "Be brief."}] + _user("Sky colour?"),
                 "chosen": _bot("Blue."), "rejected": _bot("Green.")},
    "kto": {"prompt": "The sky is", "completion": " blue.", "label": True},
    "kto-chat": {"prompt": _user("Sky colour?"), "completion": _bot("Green."), "label": False},
    "grpo": {"prompt": "2 + 2 =", "answer": "4"},
    "grpo-chat": {"prompt": [{"role": "system", "content": "Be brief."}] + _user("2 + 2?"), "answer": "4"},
}


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("method,good", [("dpo", "dpo"), ("dpo", "dpo-chat"), ("orpo", "dpo"), ("orpo", "dpo-chat"),
                                         ("kto", "kto"), ("kto", "kto-chat")])
def test_good_rows_pass(tmp_path, method, good):
    row = dict(GOOD[good], id=7, source="web")  # extra columns are dropped: TRL would carry them into its map
    rows, report = load_preference_rows(str(_write(tmp_path / "file.jsonl", [row] * 3)), method)
    assert len(rows) == 3 and set(rows[0]) == set(GOOD[good]) - {"id", "source"}
    assert rows[0] == GOOD[good]
    kind = "conversational" if good.endswith("chat") else "strings"
    assert report.format == kind and report.summary().startswith(f"3 {method} rows ({kind})")
    # the same rows from a list and from a datasets.Dataset
    assert load_preference_rows([GOOD[good]], method)[0] == [GOOD[good]]
    datasets = pytest.importorskip("datasets")
    assert load_preference_rows(datasets.Dataset.from_list([GOOD[good]]), method)[0] == [GOOD[good]]


def test_kto_summary_counts_labels():
    rows = [dict(GOOD["kto"], label=bool(i % 2)) for i in range(5)]
    assert load_preference_rows(rows, "kto")[1].summary() == "5 kto rows (strings), 2 desirable / 3 undesirable"


def test_grpo_rows_keep_their_columns(tmp_path):
    """GRPO passes the other columns to the reward functions: they stay, and each row gets every column (None where
    it has none), as `datasets` takes the columns from the first row."""
    rows = [dict(GOOD["grpo"], id=1), {"prompt": "3 + 3 =", "answer": "6", "meta": {"level": 2}},
            {"prompt": "1 + 1 =", "answer": None, "id": 2.5}]
    got, report = load_preference_rows(str(_write(tmp_path / "file.jsonl", rows)), "grpo")
    assert got[0] == {"prompt": "2 + 2 =", "answer": "4", "id": 1, "meta": None}
    assert got[1] == {"prompt": "3 + 3 =", "answer": "6", "id": None, "meta": {"level": 2}}
    assert report.columns == ("answer", "id", "meta")
    assert report.summary() == "3 grpo rows (strings), columns for the reward functions: answer, id, meta"
    chat, _ = load_preference_rows([GOOD["grpo-chat"]], "grpo")
    assert chat == [GOOD["grpo-chat"]]
    assert load_preference_rows([{"prompt": "p"}], "grpo")[1].summary() == "1 grpo row (strings), no other columns"
    datasets = pytest.importorskip("datasets")
    assert datasets.Dataset.from_list(got).to_list()[1]["meta"] == {"level": 2}


dpo, kto, chat, grpo = GOOD["dpo"], GOOD["kto"], GOOD["dpo-chat"], GOOD["grpo"]
BAD = [  # (method, row at line 3, what the error says)
    ("dpo", {"prompt": "p", "chosen": "a"},
     "missing field 'rejected' (dpo rows are {\"prompt\", \"chosen\", \"rejected\"})"),
    ("dpo", {"chosen": "a", "rejected": "b"}, "missing field 'prompt'"),
    ("dpo", dict(dpo, chosen="  "), "empty chosen (field 'chosen')"),
    ("orpo", dict(dpo, rejected=None), "missing field 'rejected'"),
    ("dpo", dict(dpo, rejected=dpo["chosen"]), "chosen and rejected are the same"),
    ("dpo", dict(dpo, chosen=3), "field 'chosen' must be a string or a list of messages, got int"),
    ("dpo", dict(dpo, chosen=_bot("x")),
     "'prompt' is a string, 'chosen' is a list of messages, 'rejected' is a string"),
    ("dpo", chat, "message lists, but the rows are strings (as set by"),  # lines 1-2 are strings
    ("dpo", dict(chat, chosen=_bot("")), "empty chosen (field 'chosen')"),
    ("dpo", dict(chat, chosen=[{"role": "gpt", "content": "x"}]), "field 'chosen': message 1 has role 'gpt'"),
    ("dpo", dict(chat, chosen=_user("x")), "field 'chosen' must start with the assistant's turn"),
    ("dpo", dict(chat, prompt=_user("q") + _bot("a")), "field 'prompt' ends with an assistant turn"),
    ("dpo", dict(chat, prompt=[]), "empty conversation (field 'prompt')"),
    ("dpo", {"instruction": "i", "output": "o"}, "looks like alpaca (SFT) data, which --method sft trains on"),
    ("kto", dict(kto, label=1), "field 'label' must be true or false (whether the completion is desirable), got int"),
    ("kto", dict(kto, label="true"), "field 'label' must be true or false"),
    ("kto", {"prompt": "p", "completion": "c"}, "missing field 'label'"),
    ("kto", dict(kto, completion=""), "empty completion (field 'completion')"),
    ("kto", ["not", "an", "object"], "expected a JSON object, got list"),
    ("kto", '{"prompt": "p", ', "invalid JSON"),
    ("grpo", {"answer": "4"}, "missing field 'prompt' (grpo rows are {\"prompt\", ...other columns"),
    ("grpo", dict(grpo, prompt=" "), "empty prompt (field 'prompt')"),
    ("grpo", dict(grpo, prompt=_user("q") + _bot("a")),
     "field 'prompt' ends with an assistant turn; the model writes the assistant's turn"),
    ("grpo", dict(grpo, prompt=_user("q")), "message lists, but the rows are strings (as set by"),
    ("grpo", dict(grpo, answer=4), "column 'answer' is a number here, but a string in earlier rows (as set by "),
    ("grpo", dict(grpo, answer=[1, "a"]), "column 'answer' mixes types inside one value"),
    ("grpo", dict(grpo, completion="x"), "column 'completion': TRL passes reward functions an argument of that name"),
    ("grpo", dict(grpo, trainer_state=1), "column 'trainer_state': TRL passes"),
    ("grpo", {"messages": _user("q")}, "looks like messages (SFT) data"),
]


@pytest.mark.parametrize("method,row,reason", BAD, ids=[f"{m}-{r[:30]}" for m, _, r in BAD])
def test_bad_row_names_file_and_line(tmp_path, method, row, reason):
    good = GOOD[method] if method in ("kto", "grpo") else GOOD["dpo"]
    path = _write(tmp_path / "file.jsonl", [good, good, row, good])
    with pytest.raises(DataError) as e:
        load_preference_rows(str(path), method)
    assert str(e.value).startswith(f"{path}:3: ") and reason in str(e.value), str(e.value)
    rows, report = load_preference_rows(str(path), method, skip_bad_rows=True)
    assert len(rows) == 3 and report.skipped == 1 and report.reasons[0].startswith(f"{path}:3: ")
    assert "1 bad row skipped (first: " in report.summary()


def test_no_valid_rows_is_an_error(tmp_path):
    path = _write(tmp_path / "file.jsonl", [{"prompt": "p"}] * 2)
    with pytest.raises(DataError, match="no valid rows"):
        load_preference_rows(str(path), "dpo", skip_bad_rows=True)
    with pytest.raises(DataError, match="no rows"):
        load_preference_rows(str(_write(tmp_path / "empty.jsonl", [])), "dpo")


def test_cli_reports_a_bad_row_before_loading_the_model(tmp_path, unloadable_model_dir, capsys):
    """`turbotune train --method dpo` checks every row first: the model would load only after that."""
    from turbotune.cli.main import main

    model = unloadable_model_dir
    path = _write(tmp_path / "file.jsonl", [dpo, dpo, {"prompt": "p", "chosen": "a"}])
    out = tmp_path / "out"
    argv = ["train", "--method", "dpo", "--model", str(model), "--data", str(path), "--output-dir", str(out)]
    assert main(argv) == 1
    assert f"turbotune: error: {path}:3: missing field 'rejected'" in capsys.readouterr().err
    assert not out.exists()  # nor is the output folder claimed
    kto_path = _write(tmp_path / "kto.jsonl", [kto, kto, dict(kto, label=0)])
    assert main(["train", "--method", "kto", "--model", str(model), "--data", str(kto_path),
                 "--output-dir", str(out)]) == 1
    assert f"{kto_path}:3: field 'label' must be true or false" in capsys.readouterr().err
