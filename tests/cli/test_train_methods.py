"""`turbotune train --method dpo|kto|orpo`: TRL's preference trainers around the turbotune model, end to end on a
tiny random model (2 steps), and the settings checked before anything loads."""
import json
import math

import pytest

from turbotune.cli.main import main
from turbotune.errors import ConfigError
from turbotune.training.config import build_config

pytest.importorskip("trl")
pytest.importorskip("datasets")

WORDS = "alpha beta gamma delta epsilon zeta eta theta".split()


def _say(i, n):
    return " ".join(WORDS[(i + j) % 8] for j in range(n))


def _rows(method, n=8):
    if method == "kto":  # plain strings; the prompt ends on a word, the completion starts with a space
        return [{"prompt": f"Item {i}:", "completion": " " + _say(i, 1 + i % 5), "label": i % 3 != 0}
                for i in range(n)]
    return [{"prompt": [{"role": "user", "content": f"Item {i}?"}],
             "chosen": [{"role": "assistant", "content": _say(i, 3)}],
             "rejected": [{"role": "assistant", "content": _say(3 * i + 1, 2)}]} for i in range(n)]


def _argv(method, model, data, out, *extra):
    return ["train", "--method", method, "--model", str(model), "--data", str(data), "--output-dir", str(out),
            "--max-steps", "2", "--batch-size", "2", "--grad-accum", "1", "--lora-r", "4", "--max-seq-length", "64",
            "--lr", "1e-3", "--warmup-steps", "0", "--no-gradient-checkpointing", *extra]


@pytest.mark.parametrize("method", ["dpo", "kto", "orpo"])
def test_train_method_end_to_end(tiny_llama_dir, tmp_path, method, capsys):
    if method == "orpo":
        from turbotune.training.preference import trl_classes
        try:
            trl_classes("orpo")
        except ConfigError as e:
            pytest.skip(str(e))
    data = tmp_path / f"{method}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows(method)), encoding="utf-8")
    out = tmp_path / "out"
    assert main(_argv(method, tiny_llama_dir, data, out, "--beta", "0.2")) == 0
    printed = capsys.readouterr().out
    assert f"[turbotune] data {data}: 8 {method} rows" in printed
    last = out / "last_checkpoint"
    assert (last / "adapter_model.safetensors").stat().st_size > 0 and (last / "adapter_config.json").is_file()
    assert not (last / "ref").exists()  # TRL's reference copy of the adapter is not saved with it
    history = json.loads((out / "training_log.json").read_text())["history"]
    assert [h["step"] for h in history] == [1, 2] and all(math.isfinite(h["loss"]) for h in history)
    state = json.loads((last / "trainer_state.json").read_text())
    assert state["method"] == method and state["config"]["beta"] == 0.2 and state["step"] == 2
    # The folder now holds this run: another method there is refused before anything loads.
    other = "kto" if method != "kto" else "dpo"
    other_data = tmp_path / "other.jsonl"
    other_data.write_text("".join(json.dumps(r) + "\n" for r in _rows(other)), encoding="utf-8")
    assert main(_argv(other, tiny_llama_dir, other_data, out)) == 1
    assert "already holds a different run (differs in: data, method, beta)" in capsys.readouterr().err


@pytest.mark.parametrize("overrides,message", [
    (dict(method="kto", batch_size=1), "--method kto needs --batch-size 2 or more"),
    (dict(method="dpo", data=None), "--method dpo needs --data"),
    (dict(method="dpo", format="alpaca"), "'format' applies to --method sft only"),
    (dict(method="orpo", packing=True), "'packing' applies to --method sft only"),
    (dict(method="dpo", beta=0), "'beta' must be positive"),
    (dict(beta=0.5), "'beta' applies to --method dpo, kto and orpo"),
    (dict(method="ppo"), "'method' must be one of sft, dpo, kto, orpo"),
])
def test_method_settings_are_checked(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_config(None, dict({"data": "d.jsonl"}, **overrides))


def test_method_in_a_config_file(tmp_path, monkeypatch):
    """`method:` and `beta:` in the YAML reach the run; a flag overrides them; no flag keeps today's sft."""
    import turbotune.cli.train as runner

    seen = []
    monkeypatch.setattr(runner, "run_training", lambda cfg, *a, **k: seen.append(cfg))
    config = tmp_path / "run.yaml"
    config.write_text("model: m\ndata: d.jsonl\nmethod: dpo\nbeta: 0.05\n")
    assert main(["train", "--config", str(config)]) == 0
    assert main(["train", "--config", str(config), "--method", "orpo"]) == 0
    assert main(["train", "--model", "m", "--data", "d.jsonl"]) == 0
    assert [(c.method, c.beta) for c in seen] == [("dpo", 0.05), ("orpo", 0.05), ("sft", 0.1)]
