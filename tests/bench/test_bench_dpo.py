"""`turbotune bench --trainer dpo`: every method trained by TRL's DPOTrainer on the same preference rows (CPU, tiny
preset): the rows tokenise to the lengths they were built with, the usage errors, and one run of hf and turbotune
whose losses agree and whose real-token counts are the rows' own."""
from __future__ import annotations

import importlib.util
import math
import sys
import types

import pytest

from tests.bench.test_bench import TINY_ARGS, _ok, _run
from turbotune.bench import preference
from turbotune.bench.presets import _placeholder_tokenizer, max_rel_diff


def _tok():
    return _placeholder_tokenizer({"vocab_size": 512})


@pytest.mark.parametrize("kind", ["fixed", "mixed"])
def test_rows_tokenise_to_the_lengths_they_were_built_with(kind):
    tok = _tok()
    rows = preference.preference_rows(kind, 12, 64, 512, 0, tok.eos_token, tok.all_special_ids)
    assert rows == preference.preference_rows(kind, 12, 64, 512, 0, tok.eos_token, tok.all_special_ids)
    lengths = preference.pair_lengths(kind, 12, 64, 0)
    if kind == "fixed":
        assert set(lengths) == {(16, 48, 48)}
    else:
        # sft's long-tailed mix (median ~150 tokens), capped at the 48 tokens a prompt of 16 leaves
        assert len({n for _, c, r in lengths for n in (c, r)}) > 1 and all(max(c, r) <= 48 for _, c, r in lengths)
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    for row, (p, c, r) in zip(rows, lengths):
        prompt = ids(row["prompt"])
        for completion, n in ((row["chosen"], c), (row["rejected"], r)):
            both = ids(row["prompt"] + completion)  # as TRL tokenises: the prompt's ids, then the completion's
            assert both[:p] == prompt and both[p:] == ids(completion) and len(both) == p + n <= 64
            assert both[-1] == tok.eos_token_id and not set(both[:-1]) & set(tok.all_special_ids)
            assert completion.endswith(tok.eos_token)  # TRL adds no second eos
        # the learnable preference: chosen from the vocabulary's lower half, rejected from its upper half
        assert max(ids(row["chosen"])[:-1]) < 256 <= min(ids(row["rejected"])[:-1])
    with pytest.raises(ValueError):
        preference.pair_lengths("ragged", 2, 64, 0)


def test_a_row_changed_by_the_trainer_is_an_error():
    built = [(16, 48, 48), (16, 48, 48)]
    preference._check_tokenised({"prompt_ids": [[1] * 16] * 2, "chosen_ids": [[1] * 48] * 2,
                                 "rejected_ids": [[1] * 48] * 2}, built)
    with pytest.raises(RuntimeError, match="row 1: \\(16, 48, 47\\), built with \\(16, 48, 48\\)"):
        preference._check_tokenised({"prompt_ids": [[1] * 16] * 2, "chosen_ids": [[1] * 48] * 2,
                                     "rejected_ids": [[1] * 48, [1] * 47]}, built)
    with pytest.raises(RuntimeError, match="1 of 2 rows left"):
        preference._check_tokenised({"prompt_ids": [[1] * 16], "chosen_ids": [[1] * 48],
                                     "rejected_ids": [[1] * 48]}, built)


def test_unsloth_row_patches_as_its_guide_does(monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "unsloth", types.SimpleNamespace(PatchDPOTrainer=lambda: calls.append(1)))
    preference._patch_unsloth_dpo()
    assert calls == [1]
    monkeypatch.setitem(sys.modules, "unsloth", types.ModuleType("unsloth"))  # a release without it
    preference._patch_unsloth_dpo()


@pytest.mark.parametrize("argv, message", [
    (["--packing"], "--trainer dpo is its own benchmark; run --max-context and --packing without it"),
    (["--max-context"], "--trainer dpo is its own benchmark"),
    (["--gpus", "2"], "--gpus measures the throughput run; run --trainer dpo without --gpus"),
    (["--methods", "turbotune-train"], "use it with --trainer sft"),
    (["--lengths", "64,128"], "with --trainer dpo, --lengths is fixed or mixed"),
    (["--seq-len", "4"], "--trainer dpo needs --seq-len 8 or more"),
])
def test_usage_errors(argv, message, capsys):
    rc, _, _ = _run(["--device", "cpu", "--trainer", "dpo"] + argv)
    assert rc == 2 and message in capsys.readouterr().err


def test_beta_goes_with_dpo(capsys):
    rc, _, _ = _run(["--device", "cpu", "--beta", "0.2"])
    assert rc == 2 and "--beta goes with --trainer dpo" in capsys.readouterr().err


def test_optim_goes_with_a_trl_trainer(capsys):
    rc, _, _ = _run(["--device", "cpu", "--optim", "adamw_8bit"])
    assert rc == 2 and "--optim goes with --trainer sft|dpo|grpo" in capsys.readouterr().err


def test_hf_and_turbotune_under_dpo_trainer(tmp_path):
    """Mixed lengths: the collator pads, turbotune removes the padding; the same rows in the same order for both."""
    pytest.importorskip("trl")
    no_unsloth = importlib.util.find_spec("unsloth") is None
    methods = "hf,turbotune" + (",unsloth" if no_unsloth else "")
    rc, out, doc = _run(TINY_ARGS + ["--trainer", "dpo", "--lengths", "mixed", "--methods", methods,
                                     "--cache-dir", str(tmp_path / "cache")], tmp_path / "dpo.json")
    assert rc == 0 and "## turbotune bench --trainer dpo" in out and "DPOTrainer" in out
    assert "\n| hf | " in out and "\n| turbotune | " in out
    if no_unsloth:
        assert "| unsloth | skipped: package 'unsloth' is not installed |" in out
    hf, ours = _ok(doc, "hf"), _ok(doc, "turbotune")
    for m in (hf, ours):
        assert len(m["losses"]) == len(m["step_times_s"]) == len(m["reward_margins"]) == 3
        assert m["real_tokens_per_s"] > 0 and all(math.isfinite(x) for x in m["losses"])
        assert m["losses"][0] == pytest.approx(math.log(2), rel=1e-6)  # step 1: the policy is the reference
    assert ours["losses"][0] == pytest.approx(hf["losses"][0], rel=1e-4)
    assert max_rel_diff(ours["losses"], hf["losses"]) < 1e-4 and ours["max_loss_rel_diff_vs_hf"] < 1e-4
    # the real tokens: both sequences of every pair (the prompt twice), no padding, every row once (one epoch)
    tok = preference.placeholder_tokenizer({"model_dir": doc["header"]["model_dir"], "vocab_size": 512})
    rows = preference.preference_rows("mixed", 2 * 2 * 3, 64, 512, 0, tok.eos_token, tok.all_special_ids)
    expected = sum(len(tok(row["prompt"] + row[k], add_special_tokens=False)["input_ids"])
                   for row in rows for k in ("chosen", "rejected"))
    assert hf["real_tokens_per_step"] == ours["real_tokens_per_step"]
    assert sum(hf["real_tokens_per_step"]) == expected and max(hf["real_tokens_per_step"]) <= 2 * 2 * 2 * 64
    assert doc["header"]["dpo"] == {"lengths": "mixed", "beta": 0.1, "prompt_tokens": 16, "max_completion_tokens": 48}
    assert doc["header"]["flops_per_token"]["total"] > doc["header"]["flops_per_token"]["policy_total"]
