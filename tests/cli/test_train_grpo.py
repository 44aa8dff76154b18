"""`turbotune train --method grpo --reward-fn FILE.py[:NAME]`: the reward file and the GRPO settings checked before any
model loads, each failure one clear line; then TRL's GRPOTrainer end to end on a tiny random model (2 steps)."""
import json
import math

import pytest

from turbotune.cli.main import main
from turbotune.errors import ConfigError
from turbotune.training.config import build_config
from turbotune.training.rewards import load_reward_functions, split_spec

pytest.importorskip("trl")
pytest.importorskip("datasets")

REWARDS = '''
def reward_length(completions, **kwargs):
    return [float(len(c[0]["content"]) % 5) for c in completions]


def answer_reward(prompts, completions, answer, **kwargs):
    # `answer` is the data's own column, one value per completion
    assert len(answer) == len(completions)
    return [1.0 if a in c[0]["content"] else 0.0 for a, c in zip(answer, completions)]


def helper(x):
    return x
'''


def _prompts(path, n=4):
    rows = [{"prompt": [{"role": "user", "content": f"Item {i}?"}], "answer": str(i)} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def no_model_load(unloadable_model_dir, tmp_path):
    """A model folder that must never be loaded, and the rest of a grpo command line."""
    data = _prompts(tmp_path / "prompts.jsonl")
    return ["train", "--method", "grpo", "--model", str(unloadable_model_dir), "--data", str(data),
            "--output-dir", str(tmp_path / "out")]


def _file(tmp_path, text, name="rewards.py"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("text,name,message", [
    (None, "", "no such file"),
    ("def reward_a(completions, **kwargs):\n    return [\n\ndef x(:\n", "", ":4: syntax error"),
    ("import no_such_module_here\n", "", ":1: the file raised ModuleNotFoundError while loading"),
    (REWARDS, ":reward_lenght", "no function 'reward_lenght' in the file (its functions: reward_length, "
                                "answer_reward, helper)"),
    ("def helper(completions, **kwargs):\n    return [0.0]\n", "", "no function named reward* or *_reward"),
    ("def reward_a(completions):\n    return [0.0]\n", "",
     "reward_a: takes no **kwargs and no parameter 'prompts', 'completion_ids'"),
    ("def reward_a(completions, /, **kwargs):\n    return [0.0]\n", "", "parameter 'completions' is positional-only"),
    (REWARDS.replace("answer, **kwargs", "answr, **kwargs"), ":answer_reward",
     "answer_reward: parameter 'answr' gets no value (TRL passes prompts"),
])
def test_reward_file_errors_come_before_the_model(no_model_load, tmp_path, capsys, text, name, message):
    path = _file(tmp_path, text) if text is not None else str(tmp_path / "missing.py")
    assert main(no_model_load + ["--reward-fn", path + name, "--num-generations", "2"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"turbotune: error: --reward-fn {path}") and message in err, err
    assert not (tmp_path / "out").exists()  # nor is the output folder claimed


def test_reward_functions_are_found():
    assert split_spec("r.py:a, b") == ("r.py", ["a", "b"]) and split_spec(r"C:\r.py") == (r"C:\r.py", [])


def test_default_rule_and_names(tmp_path):
    path = _file(tmp_path, REWARDS)
    assert [f.__name__ for f in load_reward_functions(path)] == ["reward_length", "answer_reward"]
    assert [f.__name__ for f in load_reward_functions(path + ":answer_reward")] == ["answer_reward"]


@pytest.mark.parametrize("overrides,message", [
    (dict(), "--method grpo needs --reward-fn"),
    (dict(reward_fn="r.py", batch_size=2, grad_accum=1, num_generations=3),
     r"--batch-size × --grad-accum \(2\) must be a multiple of --num-generations \(3\).*--num-generations 2"),
    (dict(reward_fn="r.py", num_generations=1), "'num_generations' must be 2 or more"),
    (dict(reward_fn="r.py", temperature=0.0), "'temperature' must be positive"),
    (dict(reward_fn="r.py", beta=-1.0), "'beta' must be 0 or more"),
    (dict(method="dpo", reward_fn="r.py"), "'reward_fn' applies to --method grpo only"),
    (dict(method="sft", num_generations=4), "'num_generations' applies to --method grpo only"),
])
def test_grpo_settings_are_checked(overrides, message):
    with pytest.raises(ConfigError, match=message):
        build_config(None, dict({"data": "d.jsonl", "method": "grpo"}, **overrides))


def test_beta_defaults_per_method():
    """TRL's default beta: 0 for GRPO (no KL penalty, no reference model), 0.1 for the others."""
    assert build_config(None, dict(data="d", method="grpo", reward_fn="r.py")).beta == 0.0
    assert build_config(None, dict(data="d", method="grpo", reward_fn="r.py", beta=0.04)).beta == 0.04
    assert build_config(None, dict(data="d", method="dpo")).beta == 0.1


def test_grpo_end_to_end(tiny_llama_dir, tmp_path, capsys):
    data = _prompts(tmp_path / "prompts.jsonl")
    rewards = _file(tmp_path, REWARDS)
    out = tmp_path / "out"
    argv = ["train", "--method", "grpo", "--model", str(tiny_llama_dir), "--data", str(data), "--reward-fn", rewards,
            "--output-dir", str(out), "--max-steps", "2", "--batch-size", "4", "--grad-accum", "1",
            "--num-generations", "2", "--max-completion-length", "4", "--lora-r", "4", "--max-seq-length", "64",
            "--lr", "1e-3", "--warmup-steps", "0", "--no-gradient-checkpointing"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "4 grpo rows (conversational), columns for the reward functions: answer" in printed
    assert "reward functions: reward_length, answer_reward" in printed and "beta 0," in printed
    last = out / "last_checkpoint"
    assert (last / "adapter_model.safetensors").stat().st_size > 0 and (last / "adapter_config.json").is_file()
    history = json.loads((out / "training_log.json").read_text())["history"]
    assert [h["step"] for h in history] == [1, 2] and all(math.isfinite(h["loss"]) for h in history)
    assert all(math.isfinite(h["reward"]) and "rewards/answer_reward/mean" in h for h in history), history
    state = json.loads((last / "trainer_state.json").read_text())
    assert state["method"] == "grpo" and state["config"]["reward_fn"] == rewards and state["step"] == 2


def test_grpo_keys_in_a_config_file(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("method: grpo\ndata: d.jsonl\nreward-fn: r.py:a\nnum_generations: 4\nmax_completion_length: 64\n"
                      "temperature: 0.7\n")
    cfg = build_config(str(config), {"num_generations": 2})
    assert (cfg.reward_fn, cfg.num_generations, cfg.max_completion_length, cfg.temperature, cfg.beta) == \
        ("r.py:a", 2, 64, 0.7, 0.0)
    config.write_text("method: grpo\ndata: d.jsonl\nreward_funcs: r.py\n")
    with pytest.raises(ConfigError, match="'reward_funcs' \\(did you mean reward_fn\\?\\)"):
        build_config(str(config))
