"""`turbotune bench --max-context`: the fit, the prediction, the tables, and a CPU run end to end."""
import json

import pytest

from turbotune.bench import harness as bench
from turbotune.bench.context import (GiB, add_planner_predictions, fit_line, format_context_tables, parse_lengths,
                                     parse_memory, predict_max_tokens, usable_bytes)
from turbotune.bench.presets import preset_config


def test_fit_line_recovers_a_line():
    a, b = fit_line([(1000, 5 + 3 * 1000), (2000, 5 + 3 * 2000), (4000, 5 + 3 * 4000)])
    assert a == pytest.approx(5) and b == pytest.approx(3)
    assert fit_line([(1000, 1.0)]) is None
    assert fit_line([(1000, 1.0), (1000, 2.0)]) is None


def test_predict_max_tokens():
    card = 80 * GiB
    fit = (10 * GiB, 1024 * 1024)  # 10 GiB fixed + 1 MiB per token
    pred = predict_max_tokens(fit, card)
    assert pred == int((usable_bytes(card) - 10 * GiB) // (1024 * 1024))
    assert 10 * GiB + pred * 1024 * 1024 <= usable_bytes(card) < 10 * GiB + (pred + 1) * 1024 * 1024
    assert predict_max_tokens((0, 0), card) is None and predict_max_tokens(None, card) is None


def test_parse():
    assert parse_lengths("8k, 2k,16384,2048") == [2048, 8192, 16384]
    assert parse_memory("80GB") == 80 * GiB and parse_memory("24 GiB") == 24 * GiB and parse_memory("12") == 12 * GiB
    with pytest.raises(ValueError):
        parse_lengths("0")
    with pytest.raises(ValueError):
        parse_lengths(" , ")


def _fake(method, peaks, oom_at=None, card=80 * GiB):
    pts = [{"seq_len": n, "status": "ok", "checkpointing": "recompute", "peak_alloc_bytes": p, "step_s": 1.0}
           for n, p in peaks]
    if oom_at:
        pts.append({"seq_len": oom_at, "status": "oom", "checkpointing": "recompute"})
    fit = fit_line([(n, p) for n, p in peaks][-3:])
    return {"method": method, "status": "ok", "context": {
        "points": pts, "card_memory_bytes": card,
        "fit": {"intercept_bytes": fit[0], "slope_bytes_per_token": fit[1]},
        "predicted_max_tokens": predict_max_tokens(fit, card), "confirm": None}}


def test_tables_and_planner_column():
    lengths = [2048, 8192, 32768]
    hf = _fake("hf", [(2048, 6 * GiB), (8192, 20 * GiB)], oom_at=32768)
    tt = _fake("turbotune", [(2048, 4 * GiB), (8192, 5 * GiB), (32768, 9 * GiB)])
    skipped = {"method": "unsloth", "status": "skipped", "reason": "No module named 'unsloth'"}
    add_planner_predictions([hf, tt, skipped], preset_config("qwen2-1.5b"), qlora=False, lora_r=16)
    assert all("planner_alloc_bytes" in p for p in tt["context"]["points"])
    text = format_context_tables([hf, tt, skipped], lengths)
    first = text.split("The planner")[0]
    rows = {line.split(" | ")[0].strip("| "): line for line in first.splitlines() if line.startswith("| ")}
    assert "OOM" in rows["hf"] and "20.00" in rows["hf"]
    assert "9.00" in rows["turbotune"] and f"{tt['context']['predicted_max_tokens']:,}" in rows["turbotune"]
    assert "skipped" in rows["unsloth"]
    assert "The planner" in text and "| turbotune | 32,768 | recompute | 9.00 |" in text


def test_offloaded_bytes_table():
    """An offloading row's measured host bytes per step sit beside the planner's (L - 1) layer inputs."""
    mm = _fake("turbotune-min-memory", [(2048, 3 * GiB), (8192, 4 * GiB)])
    for p in mm["context"]["points"]:
        p["checkpointing"] = "offload"
        p["host_offloaded_bytes"] = 27 * p["seq_len"] * 1536 * 2  # qwen2-1.5b: 27 of 28 layer inputs, bf16
    add_planner_predictions([mm], preset_config("qwen2-1.5b"), qlora=False, lora_r=16)
    assert [p["planner_host_bytes"] for p in mm["context"]["points"]] == \
        [p["host_offloaded_bytes"] for p in mm["context"]["points"]]
    text = format_context_tables([mm], [2048, 8192])
    assert "pinned host memory" in text
    assert f"| turbotune-min-memory | 8,192 | {27 * 8192 * 1536 * 2 / GiB:.2f} | " in text


def test_max_context_runs_on_cpu(tmp_path, capsys):
    out = tmp_path / "ctx.json"
    rc = bench.main(["--preset", "tiny", "--device", "cpu", "--max-context", "--lengths", "32,64",
                     "--methods", "turbotune", "--cache-dir", str(tmp_path / "cache"), "--json", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    pts = doc["methods"][0]["context"]["points"]
    assert [p["seq_len"] for p in pts] == [32, 64] and all(p["status"] == "ok" for p in pts)
    assert "--max-context" in capsys.readouterr().out


def test_confirm_at_a_chosen_length(tmp_path):
    """--confirm-at: the confirming step at a given length (the target), not the predicted longest."""
    out = tmp_path / "ctx.json"
    rc = bench.main(["--preset", "tiny", "--device", "cpu", "--max-context", "--lengths", "32,64", "--confirm",
                     "--confirm-at", "48", "--methods", "turbotune", "--cache-dir", str(tmp_path / "cache"),
                     "--json", str(out)])
    assert rc == 0
    confirm = json.loads(out.read_text())["methods"][0]["context"]["confirm"]
    assert confirm["seq_len"] == 48 and confirm["status"] == "ok"


def test_max_context_flags_need_the_mode(capsys):
    assert bench.main(["--preset", "tiny", "--device", "cpu", "--confirm"]) == 2
    assert "--max-context" in capsys.readouterr().err
    assert bench.main(["--preset", "tiny", "--device", "cpu", "--max-context", "--confirm-at", "1k"]) == 2
    assert "--confirm-at goes with --confirm" in capsys.readouterr().err
