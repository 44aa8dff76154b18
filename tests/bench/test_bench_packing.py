"""The packing benchmark: length mix, step plan, and padded vs packed runs with equal per-step losses (CPU, fp32)."""
import pytest
import torch
from conftest import nonzero_lora_b

from turbotune.training import packing
from turbotune.bench.packing import (
    compare_packing,
    eager_step_fn,
    format_packing_table,
    make_length_mix,
    plan_steps,
    run_packing_bench,
)

SEQ_LEN, MICRO, PER_STEP, STEPS = 128, 2, 8, 3


# ---------------------------------------------------------------- data (no model)

def test_length_mix_is_deterministic_and_in_range():
    a = make_length_mix(seed=3, n_samples=200, vocab_size=1000, lo=20, hi=1500)
    assert a == make_length_mix(seed=3, n_samples=200, vocab_size=1000, lo=20, hi=1500)
    assert a != make_length_mix(seed=4, n_samples=200, vocab_size=1000, lo=20, hi=1500)
    lengths = [len(s["input_ids"]) for s in a]
    assert len(a) == 200 and min(lengths) >= 20 and max(lengths) <= 1500
    assert max(lengths) - min(lengths) > 1000  # spread over the range, not one length
    for s in a:
        assert s["labels"] == s["input_ids"] and s["labels"] is not s["input_ids"]
        assert all(32 <= t < 1000 for t in s["input_ids"])
    small = make_length_mix(seed=0, n_samples=500, vocab_size=100, lo=5, hi=7)
    assert {len(s["input_ids"]) for s in small} == {5, 6, 7}  # both ends included
    with pytest.raises(ValueError, match="lo"):
        make_length_mix(0, 4, 1000, lo=1, hi=10)
    with pytest.raises(ValueError, match="lo"):
        make_length_mix(0, 4, 1000, lo=20, hi=10)
    with pytest.raises(ValueError, match="low_id"):
        make_length_mix(0, 4, 16)


def test_plan_steps_covers_each_sample_once_in_order():
    plan = plan_steps(list(range(21)), 8)
    assert plan == [list(range(8)), list(range(8, 16)), list(range(16, 21))]
    assert [i for step in plan for i in step] == list(range(21))
    assert plan_steps(list(range(16)), 8) == [list(range(8)), list(range(8, 16))]
    assert plan_steps([], 8) == []
    with pytest.raises(ValueError):
        plan_steps([1, 2], 0)


# ---------------------------------------------------------------- against a tiny model

def _model(folder):
    from turbotune import FastModel
    model, _ = FastModel.from_pretrained(str(folder), dtype=torch.float32, verbose=False)
    model = FastModel.get_peft_model(model, r=4, use_gradient_checkpointing=False, verbose=False)
    return nonzero_lora_b(model)  # the same B in every instance: every LoRA weight gets a gradient


class _ActiveStepper:
    """Stands in for a GraphedMicroStep whose graphs are on (there are none on the CPU): eager, zeroes in place."""

    active = True

    def __init__(self, model):
        self.model, self.step, self.zeroed = model, eager_step_fn(model), 0

    def __call__(self, batch):
        return self.step(batch)

    def zero_grad(self, optimizer=None):  # GraphedMicroStep's signature; active, so always in place
        self.zeroed += 1
        for p in self.model.parameters():
            if p.grad is not None:
                p.grad.zero_()


@pytest.fixture(scope="module")
def runs(tiny_llama_dir, smol_tokenizer):
    pad = smol_tokenizer.pad_token_id
    samples = None
    out = {}
    for name in ("padded", "packed", "packed-mask_4d", "packed-graphed", "packed-active"):
        model = _model(tiny_llama_dir)
        if samples is None:
            samples = make_length_mix(seed=0, n_samples=STEPS * PER_STEP, vocab_size=model.config.vocab_size,
                                      lo=5, hi=60)
        step_fn = eager_step_fn(model)
        mp = pytest.MonkeyPatch()
        if name == "packed-mask_4d":  # what a transformers without packed-sequence masks gets
            mp.setattr(packing, "transformers_builds_packed_mask", lambda: False)
        if name == "packed-graphed":  # the trainer's micro-step (eager on the CPU) is a valid step_fn
            from turbotune.training.cuda_graphs import GraphedMicroStep
            step_fn = GraphedMicroStep(model, [p for p in model.parameters() if p.requires_grad])
        if name == "packed-active":  # what an active GraphedMicroStep (CUDA) gets: one shape, no host sync
            step_fn = _ActiveStepper(model)
        try:
            out[name] = run_packing_bench(model, pad, samples, seq_len=SEQ_LEN, micro_batch=MICRO,
                                          samples_per_step=PER_STEP, steps=STEPS, warmup=1,
                                          mode=name.split("-")[0], step_fn=step_fn, lr=1e-3)
        finally:
            mp.undo()
    out["samples"] = samples
    return out


def test_padded_and_packed_losses_agree(runs):
    padded, packed = runs["padded"], runs["packed"]
    assert packed["attention"] == "position_ids" and runs["packed-mask_4d"]["attention"] == "mask_4d"
    assert padded["attention"] == "padding mask"
    assert len(padded["losses"]) == len(packed["losses"]) == STEPS
    assert all(torch.isfinite(torch.tensor(r["losses"])).all() for r in (padded, packed))
    # Same samples per step: same real tokens and the same number of scored targets.
    step_tokens = [sum(len(runs["samples"][i]["input_ids"]) for i in idx)
                   for idx in plan_steps(runs["samples"], PER_STEP)]
    assert padded["real_tokens"] == packed["real_tokens"] == step_tokens
    assert padded["targets"] == packed["targets"] == [n - PER_STEP for n in step_tokens]
    for other in ("packed", "packed-mask_4d", "packed-graphed", "packed-active"):
        for a, b in zip(runs[other]["losses"], padded["losses"]):
            assert abs(a - b) <= 1e-5 * abs(b), (other, runs[other]["losses"], padded["losses"])
    assert runs["packed-graphed"]["losses"] == packed["losses"]  # the same computation, eagerly
    # The step's loss is normalised by the step's targets: a mean token loss, about ln(vocab) for a random model.
    assert 9 < padded["first_loss"] < 12


def test_packed_computes_fewer_tokens(runs):
    padded, packed = runs["padded"], runs["packed"]
    assert sum(packed["computed_tokens"]) < sum(padded["computed_tokens"])
    assert packed["padding_frac"] < padded["padding_frac"]
    assert all(c >= r for c, r in zip(packed["computed_tokens"], packed["real_tokens"]))
    assert sum(packed["micro_batches"]) < sum(padded["micro_batches"])
    assert padded["micro_batches"] == [PER_STEP // MICRO] * STEPS and padded["rows"] == [PER_STEP] * STEPS
    for r in (padded, packed):
        assert len(r["step_times_s"]) == STEPS and r["timed_steps"] == STEPS - 1
        timed = slice(1, STEPS)
        assert r["real_tokens_per_s"] == pytest.approx(sum(r["real_tokens"][timed]) / sum(r["step_times_s"][timed]))
        assert r["s_per_step"] > 0 and r["computed_tokens_per_s"] > r["real_tokens_per_s"]


def test_compare_and_table(runs):
    padded, packed = runs["padded"], runs["packed"]
    cmp = compare_packing(padded, packed)
    assert cmp["speed_ratio"] == pytest.approx(packed["real_tokens_per_s"] / padded["real_tokens_per_s"])
    assert cmp["max_rel_loss_diff"] <= 1e-5 and cmp["steps_compared"] == STEPS
    assert cmp["same_targets"] and cmp["same_real_tokens"]
    assert cmp["computed_token_ratio"] < 1
    table = format_packing_table([dict(padded, method="turbotune"), dict(packed, method="turbotune"),
                                  {"method": "hf", "mode": "packed", "status": "failed", "error": "boom"}])
    lines = table.splitlines()
    assert lines[0].startswith("| method / mode | steps | real tokens/s")
    assert lines[2].startswith("| turbotune / padded | 3 |") and "| 1.00× | — |" in lines[2]
    assert lines[3].startswith("| turbotune / packed | 3 |") and f"{cmp['speed_ratio']:.2f}×" in lines[3]
    assert "failed: boom" in lines[4]


def test_run_checks_its_arguments(tiny_llama_dir):
    model = _model(tiny_llama_dir)
    samples = make_length_mix(0, 8, model.config.vocab_size, lo=5, hi=20)
    kw = {"seq_len": 32, "micro_batch": 2, "samples_per_step": 4}
    with pytest.raises(ValueError, match="warmup"):
        run_packing_bench(model, 0, samples, steps=2, warmup=2, **kw)
    with pytest.raises(ValueError, match="need 12"):
        run_packing_bench(model, 0, samples, steps=3, warmup=0, **kw)
    with pytest.raises(ValueError, match="mode"):
        run_packing_bench(model, 0, samples, steps=2, mode="bucketed", **kw)
    with pytest.raises(ValueError, match="more than seq_len=16"):
        run_packing_bench(model, 0, samples, steps=2, mode="padded", **{**kw, "seq_len": 16})


def test_active_graphs_get_one_shape_and_a_document_mask(runs):
    """With CUDA graphs on, packed rows are padded to seq_len and a short last micro-batch is filled with
    label-free rows (one shape to replay), and the mask needs no host sync, as in Trainer."""
    active, packed = runs["packed-active"], runs["packed"]
    want = "position_ids" if packing.transformers_mask_is_capture_safe() else "mask_4d"
    assert active["attention"] == want and active["pad_to_multiple_of"] == SEQ_LEN
    assert packed["pad_to_multiple_of"] is None and runs["padded"]["pad_to_multiple_of"] is None
    assert active["computed_tokens"] == [rows * SEQ_LEN for rows in active["rows"]]
    assert active["rows"] == [-(-rows // MICRO) * MICRO for rows in packed["rows"]]
    assert active["real_tokens"] == packed["real_tokens"] and active["losses"] == pytest.approx(packed["losses"],
                                                                                                 rel=1e-5)
