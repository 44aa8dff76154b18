"""use_gradient_checkpointing="auto": the cheapest mode whose predicted peak fits the budget."""
from turbotune import FastModel
from turbotune.auto_checkpointing import choose_checkpointing, plan_checkpointing
from turbotune.checkpointing import get_offloaded_checkpointing
from turbotune.planner import predict_peak


def _model(folder):
    m, _ = FastModel.from_pretrained(str(folder), verbose=False)
    return FastModel.get_peft_model(m, r=4, use_gradient_checkpointing="auto", verbose=False)


def test_choice_follows_the_budget(tiny_llama_dir):
    model = _model(tiny_llama_dir)
    assert model.__dict__["_turbotune_checkpointing"] == "auto"
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
