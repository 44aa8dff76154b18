"""`turbotune bench --trainer grpo`: every method trained by TRL's GRPOTrainer with a fixed generation length (CPU,
tiny preset): the prompts tokenise to their length, the reward, the usage errors, and one run of hf and turbotune
whose completions all have the fixed length and whose token counts follow from it."""
from __future__ import annotations

import math

import pytest

from tests.bench.test_bench import _ok, _run
from turbotune.bench import grpo
from turbotune.bench.presets import _placeholder_tokenizer


def test_prompts_tokenise_to_their_length():
    tok = _placeholder_tokenizer({"vocab_size": 512})
    rows = grpo.prompt_rows(5, 16, 512, 0, tok.all_special_ids)
    assert rows == grpo.prompt_rows(5, 16, 512, 0, tok.all_special_ids) and len(rows) == 5
    for row in rows:
        ids = tok(row["prompt"], add_special_tokens=False)["input_ids"]
        assert len(ids) == 16 and not set(ids) & set(tok.all_special_ids)
    assert grpo.grpo_lengths(64) == (16, 48) and grpo.grpo_lengths(10) == (2, 8)


def test_reward_is_the_lower_half_share():
    reward = grpo.lower_half_reward(512)
    assert reward(["<t3> <t300> <t255> <t256>", "<t511>", "", " <t0>"]) == [0.5, 0.0, 0.0, 1.0]


def test_generate_time_is_split_by_step():
    marks = [0.0, 10.0, 20.0]
    assert grpo._per_step([(1.0, 4.0), (12.0, 13.0), (14.0, 16.0)], marks) == [3.0, 3.0]


@pytest.mark.parametrize("micro, accum, generations, message", [
    (2, 1, 4, "must be a multiple of --num-generations (4)"),
    (4, 1, 1, "--num-generations must be at least 2"),
])
def test_workload_trl_would_refuse(micro, accum, generations, message):
    assert message in grpo.check_workload(micro, accum, generations)
    assert grpo.check_workload(2, 2, 4) is None


@pytest.mark.parametrize("argv, message", [
    (["--trainer", "grpo", "--packing"], "--trainer grpo is its own benchmark"),
    (["--trainer", "grpo", "--lengths", "mixed"], "--lengths is not used (completions have a fixed length)"),
    (["--trainer", "grpo", "--seq-len", "4"], "--trainer grpo needs --seq-len 8 or more"),
    (["--trainer", "grpo", "--micro-batch", "3", "--grad-accum", "1"], "must be a multiple of --num-generations"),
    (["--trainer", "dpo", "--num-generations", "2"], "--num-generations goes with --trainer grpo"),
])
def test_usage_errors(argv, message, capsys):
    rc, _, _ = _run(["--device", "cpu"] + argv)
    assert rc == 2 and message in capsys.readouterr().err


def test_hf_and_turbotune_under_grpo_trainer(tmp_path, monkeypatch):
    pytest.importorskip("trl")
    monkeypatch.setenv("TURBOTUNE_BUCKETS", "4")  # the default; a switch set in the environment is reported
    rc, out, doc = _run(["--preset", "tiny", "--device", "cpu", "--steps", "2", "--warmup", "1", "--seq-len", "16",
                         "--micro-batch", "4", "--grad-accum", "1", "--num-generations", "2", "--trainer", "grpo",
                         "--methods", "hf,turbotune", "--cache-dir", str(tmp_path / "cache")], tmp_path / "g.json")
    assert rc == 0 and "## turbotune bench --trainer grpo" in out and "GRPOTrainer" in out
    assert doc["header"]["switches_env"] == {"TURBOTUNE_BUCKETS": "4"} and "- environment: TURBOTUNE_BUCKETS=4" in out
    assert doc["header"]["grpo"] == {"prompt_tokens": 4, "completion_tokens": 12, "temperature": 1.0,
                                     "num_generations": 2}
    for name in ("hf", "turbotune"):
        m = _ok(doc, name)
        # every completion generated to exactly 12 tokens, so each step trains 4 x (4 + 12) tokens
        assert m["completion_mean_lengths"] == [12, 12] and m["real_tokens_per_step"] == [64, 64]
        assert len(m["rewards"]) == 2 and all(0 <= r <= 1 for r in m["rewards"])
        assert len(m["generate_s_per_step"]) == 2 and all(0 < g < s for g, s in zip(m["generate_s_per_step"],
                                                                                   m["step_times_s"]))
        assert all(math.isfinite(x) for x in m["losses"]) and m["max_loss_rel_diff_vs_hf"] is None
        assert any("2 completions each of 12 tokens; generate" in n for n in m["notes"])
