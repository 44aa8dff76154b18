"""The training loop: accumulation equals one big batch, outputs of a run, the log table."""
import json

import pytest
import torch

from turbotune import FastModel
from turbotune.data.dataset import prepare_dataset, sample_data_path
from turbotune.training.config import TrainConfig
from turbotune.cli.train import run_training
from turbotune.training.trainer import Trainer


def _rows(n=8):
    return [{"instruction": f"Write a tagline for product number {i}.", "output": f"Tagline {i}: made for you, every day."}
            for i in range(n)]


def _trainer(tiny_dir, tmp_path, batch, accum, patch):
    model, tok = FastModel.from_pretrained(str(tiny_dir), verbose=False, patch=patch)
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False, verbose=False)
    # make lora_B non-zero so every adapter gets a gradient
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    data, _ = prepare_dataset(_rows(8), tok, max_seq_length=64)
    cfg = TrainConfig(output_dir=str(tmp_path / f"o{batch}{accum}{patch}"), batch_size=batch, grad_accum=accum,
                      max_steps=1, seed=7)
    return Trainer(cfg, model, tok, data, progress=False)


@pytest.mark.parametrize("patch", [False, True])
def test_grad_accumulation_equals_one_big_batch(tiny_llama_dir, tmp_path, patch):
    grads = []
    losses = []
    for batch, accum in [(4, 1), (2, 2), (1, 4)]:
        torch.manual_seed(0)
        t = _trainer(tiny_llama_dir, tmp_path, batch, accum, patch)
        loss, tokens = t._train_step()
        losses.append(loss)
        grads.append({n: p.grad.detach().clone() for n, p in t.model.named_parameters() if p.requires_grad})
    for other, lo in zip(grads[1:], losses[1:]):
        assert abs(lo - losses[0]) < 1e-5 * abs(losses[0])
        for name, g in grads[0].items():
            torch.testing.assert_close(other[name], g, rtol=1e-4, atol=1e-6)


def test_training_run_outputs(tiny_llama_dir, tmp_path, capsys):
    cfg = TrainConfig(model=str(tiny_llama_dir), data=str(sample_data_path()), output_dir=str(tmp_path / "run"),
                      max_steps=3, batch_size=2, grad_accum=2, max_seq_length=128, lora_r=4, lr=1e-3,
                      warmup_steps=1)
    result, model, tok = run_training(cfg, progress=False)
    out = capsys.readouterr().out
    assert "Step |" in out and "Learning Rate" in out and "tokens/s" in out and "RSS" in out
    assert result.steps == 3 and len(result.history) == 3
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)
    last = tmp_path / "run" / "last_checkpoint"
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer_config.json", "run_config.json"):
        assert (last / name).is_file(), name
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    log = json.loads((tmp_path / "run" / "training_log.json").read_text())
    assert [h["step"] for h in log["history"]] == [1, 2, 3]
    assert log["summary"]["steps"] == 3


def test_loss_falls_on_repeated_data(tiny_llama_dir, tmp_path):
    rows = [{"instruction": "Say the slogan.", "output": "Fresh tea, fresh day."}] * 8
    cfg = TrainConfig(model=str(tiny_llama_dir), output_dir=str(tmp_path / "fall"), max_steps=12, batch_size=4,
                      grad_accum=1, max_seq_length=64, lora_r=8, lr=5e-3, warmup_steps=0, logging_steps=1)
    model, tok = FastModel.from_pretrained(str(tiny_llama_dir), verbose=False)
    model = FastModel.get_peft_model(model, r=8, lora_alpha=16, verbose=False)
    data, _ = prepare_dataset(rows, tok, max_seq_length=64)
    result = Trainer(cfg, model, tok, data, progress=False).train()
    assert result.history[-1]["loss"] < result.history[0]["loss"] - 0.4  # random tiny model: slow but steady


def test_packed_training_run(tiny_llama_dir, tmp_path):
    """--packing: rows of several samples, no padding; one step's loss equals the same samples padded."""
    model, tok = FastModel.from_pretrained(str(tiny_llama_dir), verbose=False)
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False, verbose=False)
    data, _ = prepare_dataset(_rows(8), tok, max_seq_length=64)
    total = sum(len(d["input_ids"]) for d in data)
    cfg = TrainConfig(output_dir=str(tmp_path / "packed"), batch_size=1, grad_accum=1, max_steps=1, packing=True,
                      max_seq_length=total, seed=3)
    t = Trainer(cfg, model, tok, data, progress=False)
    assert len(t.units) == 1  # all 8 samples fit one row
    packed_loss, tokens = t._train_step()
    assert tokens == total
    t.model.zero_grad()
    cfg2 = TrainConfig(output_dir=str(tmp_path / "padded"), batch_size=8, grad_accum=1, max_steps=1, seed=3)
    padded_loss, _ = Trainer(cfg2, model, tok, data, progress=False)._train_step()
    assert abs(packed_loss - padded_loss) < 1e-5 * padded_loss


def test_packing_default_is_auto(tiny_llama_dir, monkeypatch):
    """packing=None: off on the CPU (said in the run's first lines); on a GPU, on when attention allows."""
    import torch

    from turbotune import FastModel
    from turbotune.training.trainer import auto_packing

    m, _ = FastModel.from_pretrained(str(tiny_llama_dir), dtype=torch.float32, verbose=False)
    assert auto_packing(m, torch.device("cpu")) == (False, "CPU run")
    on, why = auto_packing(m, torch.device("cuda"))
    assert on and "position_ids" in why
    m.config._attn_implementation = "paged|sdpa"
    on, why = auto_packing(m, torch.device("cuda"))
    assert not on and "paged" in why


class _ModelLoaded(Exception):
    pass


def _record_model_loads(monkeypatch) -> list:
    """Replace the model loader with one that records the call and stops the run there."""
    calls = []

    def loader(*args, **kwargs):
        calls.append(args)
        raise _ModelLoaded

    monkeypatch.setattr(FastModel, "from_pretrained", loader)
    return calls


def test_bad_row_is_reported_before_the_model_loads(tmp_path, monkeypatch):
    from turbotune.data.dataset import DataError

    calls = _record_model_loads(monkeypatch)
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps(_rows(1)[0]) + "\n" + json.dumps({"instruction": "a"}) + "\n")
    cfg = TrainConfig(model="some/large-model", data=str(data), output_dir=str(tmp_path / "o"), max_steps=1)
    with pytest.raises(DataError) as err:
        run_training(cfg, progress=False)
    assert str(err.value) == f"{data}:2: missing field 'output' (alpaca format)"
    assert calls == []
    # With --skip-bad-rows the row is only counted, and the run goes on to load the model.
    cfg.skip_bad_rows = True
    with pytest.raises(_ModelLoaded):
        run_training(cfg, progress=False)
    assert len(calls) == 1


def test_max_steps_zero_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    from turbotune.errors import ConfigError

    calls = _record_model_loads(monkeypatch)
    for steps in (0, -1):
        with pytest.raises(ConfigError, match=f"'max_steps' must be positive, got {steps}; to train by epochs"):
            run_training(TrainConfig(output_dir=str(tmp_path / "o"), max_steps=steps), progress=False)
    assert calls == []


def test_max_steps_none_trains_by_epochs(tiny_llama_dir, tmp_path):
    from turbotune.errors import ConfigError

    model, tok = FastModel.from_pretrained(str(tiny_llama_dir), verbose=False)
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False, verbose=False)
    data, _ = prepare_dataset(_rows(8), tok, max_seq_length=64)
    cfg = TrainConfig(output_dir=str(tmp_path / "e"), batch_size=2, grad_accum=2, epochs=1.5, packing=False)
    assert cfg.max_steps is None
    assert Trainer(cfg, model, tok, data, progress=False).total_steps == 3  # ceil(1.5 * 4 micro-batches / 2)
    cfg.max_steps = 5
    assert Trainer(cfg, model, tok, data, progress=False).total_steps == 5
    cfg.max_steps = 0  # a config built in code, past build_config: the Trainer refuses it too
    with pytest.raises(ConfigError, match="'max_steps' must be positive"):
        Trainer(cfg, model, tok, data, progress=False)
