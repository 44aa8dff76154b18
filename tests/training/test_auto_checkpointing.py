"""use_gradient_checkpointing="auto": the cheapest mode whose predicted peak fits the budget."""
from turbotune import FastModel
from turbotune.training.auto_checkpointing import choose_checkpointing, plan_checkpointing
from turbotune.model.checkpointing import get_offloaded_checkpointing
from turbotune.planner.predict import predict_peak
from turbotune.model.state import turbo_state


def _model(folder):
    m, _ = FastModel.from_pretrained(str(folder), verbose=False)
    return FastModel.get_peft_model(m, r=4, use_gradient_checkpointing="auto", verbose=False)


def test_choice_follows_the_budget(tiny_llama_dir):
    model = _model(tiny_llama_dir)
    assert turbo_state(model).checkpointing == "auto"
    cfg = model.get_base_model().config
    need = {m: predict_peak(cfg, 512, 8, lora_r=4, checkpointing=m, dtype=model.get_base_model().dtype).total_bytes
            for m in ("none", "recompute", "offload")}
    assert need["none"] > need["recompute"] >= need["offload"]
    assert choose_checkpointing(model, 512, 8, budget_bytes=10 * need["none"]).mode == "none"
    between = int((need["none"] + need["recompute"]) / 2 / 0.85)
    assert choose_checkpointing(model, 512, 8, budget_bytes=between).mode == "recompute"
    assert choose_checkpointing(model, 512, 8, budget_bytes=1).mode == "offload"


def test_plan_applies_the_mode(tiny_llama_dir):
    model = _model(tiny_llama_dir)
    choice = plan_checkpointing(model, 64, 2, budget_bytes=1)
    assert choice.mode == "offload" and "offload" in choice.line()
    assert get_offloaded_checkpointing(model) is not None
    plan_checkpointing(model, 64, 2, budget_bytes=1 << 40)
    assert get_offloaded_checkpointing(model) is None
    from turbotune._compat import is_checkpointing
    assert not is_checkpointing(model)


def test_cpu_auto_keeps_recompute(tiny_llama_dir):
    model = _model(tiny_llama_dir)
    assert choose_checkpointing(model, 64, 2).mode == "recompute"


def test_partial_checkpointing_keeps_the_other_layers(tiny_llama_dir, smol_tokenizer, tmp_path):
    """Between "none" and "recompute every layer" the plan checkpoints only as many layers as must be, and the
    gradients stay those of no checkpointing."""
    import pytest
    import torch
    from conftest import make_tiny_model, nonzero_lora_b

    from turbotune.model.checkpointing import find_decoder_layers as find_layers
    from turbotune.planner.predict import PlanError

    folder = make_tiny_model(tmp_path / "four", smol_tokenizer, "llama", num_hidden_layers=4)
    model = nonzero_lora_b(_model(folder))
    base = model.get_base_model()

    def need(mode, k=None):
        return predict_peak(base.config, 512, 8, lora_r=4, checkpointing=mode, dtype=base.dtype,
                            checkpointed_layers=k).total_bytes

    totals = [need("recompute", k) for k in (1, 2, 3, 4)]
    assert totals == sorted(totals, reverse=True) and totals[-1] == need("recompute") < need("none")
    with pytest.raises(PlanError):
        need("recompute", 5)
    budget = int(need("recompute", 2) / 0.85) + 1  # 2 layers checkpointed fit, 1 does not
    assert budget * 0.85 < need("recompute", 1)
    choice = plan_checkpointing(model, 512, 8, budget_bytes=budget)
    assert (choice.mode, choice.layers) == ("recompute", 2) and "recompute 2 of its layers" in choice.line()
    assert [layer.gradient_checkpointing for layer in find_layers(model)] == [True, True, False, False]

    ids = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    model.train()

    def grads():
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    partial = grads()
    plan_checkpointing(model, 512, 8, budget_bytes=1 << 40)  # everything fits: no checkpointing
    assert not any(layer.gradient_checkpointing for layer in find_layers(model))
    plain = grads()
    for n in plain:
        torch.testing.assert_close(partial[n], plain[n], rtol=1e-6, atol=1e-7)
