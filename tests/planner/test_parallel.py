"""`turbotune plan --gpus N --parallel ddp|fsdp`: the per-GPU prediction (planner/parallel.py). Predictions only:
nothing here is measured on several GPUs."""
from __future__ import annotations

import argparse
import contextlib
import io
import json

import pytest

from turbotune.cli import plan as plan_cli
from turbotune.planner import parallel
from turbotune.planner.parallel import BUCKET_BYTES, ddp_buckets, fsdp_unit_bytes, predict_per_gpu
from turbotune.planner.predict import GiB, PlanError, lora_param_count, model_shape, predict_peak
from turbotune.planner.search import max_seq_len
from turbotune.planner.shapes import preset_dict
from turbotune.planner.summary import prediction_line

SHAPES = ["tiny", "llama3-8b"]
STATIC = ("weights_linears", "weights_other", "lora_params", "lora_grads", "adamw_state")


def _run(argv):
    out, err = io.StringIO(), io.StringIO()
    args = plan_cli.add_plan_arguments(argparse.ArgumentParser()).parse_args(argv)
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = plan_cli.run_plan(args)
    return rc, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
@pytest.mark.parametrize("name", SHAPES)
def test_one_gpu_is_todays_prediction_exactly(name, mode):
    for ckpt in ("none", "recompute", "offload"):
        one = predict_peak(preset_dict(name), 2048, 2, checkpointing=ckpt)
        per = predict_per_gpu(preset_dict(name), 2048, 2, gpus=1, parallel=mode, checkpointing=ckpt)
        assert [(i.key, i.bytes, i.counted) for i in per.items] == [(i.key, i.bytes, i.counted) for i in one.items]
        assert (per.allocated_bytes, per.total_bytes, per.peak_phase) == \
            (one.allocated_bytes, one.total_bytes, one.peak_phase)
        assert per.gpus == 1 and per.parallel == mode


def test_the_constants_match_the_trainers():
    """The planner may not import training/ (tests/test_layout.py): its copies must stay equal to the trainer's."""
    distributed = pytest.importorskip("turbotune.training.distributed")
    fsdp = pytest.importorskip("turbotune.training.fsdp")
    assert parallel.BUCKET_BYTES == distributed.BUCKET_BYTES
    assert "quant_state" in fsdp.FOUR_BIT_REFUSAL and "quant_state" in parallel.FSDP_FOUR_BIT_REFUSAL


def test_ddp_buckets_group_as_the_trainer_does():
    """The same grouping as training/distributed.py's _buckets on one dtype's tensors, sizes only."""
    torch = pytest.importorskip("torch")
    from turbotune.training.distributed import _buckets
    sizes = [3 * 2**20, 9 * 2**20, 6 * 2**20, 20 * 2**20, 2**20, 15 * 2**20]
    tensors = [torch.empty(n // 4) for n in sizes]
    assert ddp_buckets(sizes) == [sum(t.numel() * 4 for t in b) for b in _buckets(tensors)]


@pytest.mark.parametrize("name", SHAPES)
@pytest.mark.parametrize("gpus", [2, 8])
def test_ddp_is_one_gpu_plus_the_allreduce_buffers(name, gpus):
    one = predict_peak(preset_dict(name), 2048, 2)
    ddp = predict_per_gpu(preset_dict(name), 2048, 2, gpus=gpus, parallel="ddp")
    flats = ddp.item("ddp_allreduce")
    p = lora_param_count(preset_dict(name))
    assert flats == 4 * p  # every bucket is in flight at once: the whole fp32 LoRA gradient
    # the buffers exist after the last backward (activations freed): a phase of its own, smaller here
    assert ddp.allocated_bytes == one.allocated_bytes and ddp.total_bytes == one.total_bytes
    assert ddp.peak_phase == one.peak_phase
    # where that phase is the larger (a very short step), it is static + workspaces + the buffers
    short = predict_per_gpu(preset_dict(name), 1, 1, gpus=gpus, parallel="ddp")
    static = sum(short.item(k) for k in STATIC) + short.item("cublas_workspace")
    assert short.allocated_bytes == max(predict_peak(preset_dict(name), 1, 1).allocated_bytes, static + flats)


def test_ddp_buckets_are_bounded_by_bucket_bytes():
    sizes = parallel.lora_tensor_bytes(model_shape(preset_dict("llama3-8b")), 16)
    buckets = ddp_buckets(sizes)
    assert sum(buckets) == sum(sizes) and max(buckets) <= BUCKET_BYTES and len(buckets) > 1


@pytest.mark.parametrize("name", SHAPES)
def test_fsdp_weights_scale_as_one_over_n(name):
    shape = model_shape(preset_dict(name))
    one = predict_peak(shape, 2048, 2)
    unit = fsdp_unit_bytes(shape, "bf16", 16)
    for gpus in (2, 4, 8):
        fsdp = predict_per_gpu(shape, 2048, 2, gpus=gpus, parallel="fsdp")
        for key in ("weights_linears", "weights_other", "lora_params", "adamw_state"):
            assert fsdp.item(key) == -(-one.item(key) // gpus)
        assert fsdp.item("lora_grads") == one.item("lora_grads")  # accumulated unsharded (module docstring)
        assert fsdp.item("fsdp_root_gathered") == unit["root"]
        assert fsdp.item("fsdp_layers_gathered") == 2 * unit["layer"]
        for key in ("act_layer_inputs", "act_last_hidden", "layer_recompute", "layer_working", "loss_chunk"):
            assert fsdp.item(key) == one.item(key)  # the same micro-batch per rank
        assert fsdp.gpus == gpus and fsdp.parallel == "fsdp"


def test_fsdp_llama3_8b_per_gpu_weights_about_half_plus_the_gathered_units():
    shape = model_shape(preset_dict("llama3-8b"))
    one = predict_peak(shape, 2048, 2)
    two = predict_per_gpu(shape, 2048, 2, gpus=2, parallel="fsdp")
    assert two.weights_bytes == pytest.approx(one.weights_bytes / 2, abs=8)
    layer = (shape.linear_params() // 32 + 2 * 4096) * 2 + 4 * lora_param_count(shape) // 32
    assert fsdp_unit_bytes(shape, "bf16", 16)["layer"] == layer  # 218 M bf16 + 1.3 M fp32 LoRA: 0.41 GiB
    assert 0.40 * GiB < layer < 0.42 * GiB
    gathered = two.item("fsdp_root_gathered") + two.item("fsdp_layers_gathered")
    assert gathered == (128256 * 4096 * 2 + 4096) * 2 + 2 * layer  # untied embedding + lm_head, final norm
    # the per-GPU peak: 15.0 GiB of weights -> 7.5, plus 2.8 gathered; activations unchanged
    assert one.allocated_bytes - two.allocated_bytes == pytest.approx(one.weights_bytes / 2 - gathered
                                                                      + one.item("lora_params") / 2
                                                                      + one.item("adamw_state") / 2, abs=16)
    assert two.total_bytes < one.total_bytes


def test_fsdp_with_qlora_is_refused_with_the_reason():
    with pytest.raises(PlanError, match="quant_state"):
        predict_per_gpu(preset_dict("tiny"), 128, 1, gpus=2, parallel="fsdp", qlora=True)
    rc, out, err = _run(["--model", "tiny", "--qlora", "--gpus", "2", "--parallel", "fsdp"])
    assert rc == 2 and out == ""
    assert err.startswith("turbotune plan: error: --parallel fsdp with --qlora is not supported")
    assert predict_per_gpu(preset_dict("tiny"), 128, 1, gpus=2, parallel="ddp", qlora=True).qlora  # DDP: fine


def test_bad_values_are_refused():
    with pytest.raises(PlanError, match="gpus must be at least 1"):
        predict_per_gpu(preset_dict("tiny"), 128, 1, gpus=0)
    with pytest.raises(PlanError, match="parallel must be one of"):
        predict_per_gpu(preset_dict("tiny"), 128, 1, gpus=2, parallel="zero3")


def test_search_uses_the_per_gpu_prediction():
    shape = model_shape(preset_dict("llama3-8b"))
    budget = 24 * GiB
    one, _ = max_seq_len(shape, budget, 1)
    fsdp, _ = max_seq_len(shape, budget, 1, gpus=4, parallel="fsdp")
    assert fsdp > one
    assert predict_per_gpu(shape, fsdp, 1, gpus=4, parallel="fsdp").total_bytes <= budget
    assert predict_per_gpu(shape, fsdp + 1, 1, gpus=4, parallel="fsdp").total_bytes > budget


def test_cli_flags_parse_and_print():
    rc, out, _ = _run(["--model", "llama3-8b", "--gpus", "2", "--parallel", "fsdp"])
    assert rc == 0
    assert "per GPU: FSDP2 over 2 GPUs, batch 2 per rank (predicted; not yet measured on several GPUs)" in out
    assert "FSDP2: root unit gathered" in out and "= total per GPU" in out
    rc, out, _ = _run(["--model", "tiny", "--gpus", "4"])
    assert rc == 0 and "per GPU: DDP over 4 GPUs" in out and "DDP: gradient all-reduce buffers" in out
    rc, one_text, _ = _run(["--model", "tiny"])
    assert "per GPU" not in one_text and "DDP" not in one_text
    rc, fsdp_one, _ = _run(["--model", "tiny", "--parallel", "fsdp"])
    assert fsdp_one == one_text  # one GPU: today's plan, whatever the mode

    rc, out, _ = _run(["--model", "llama3-8b", "--gpus", "2", "--parallel", "fsdp", "--json"])
    doc = json.loads(out)
    expected = predict_per_gpu(preset_dict("llama3-8b"), 2048, 2, gpus=2, parallel="fsdp")
    assert (doc["gpus"], doc["parallel"], doc["total_bytes"]) == (2, "fsdp", expected.total_bytes)
    assert doc["fits"] == (expected.total_bytes <= 24 * GiB)
    parser = plan_cli.add_plan_arguments(argparse.ArgumentParser())
    assert (parser.parse_args(["--model", "tiny"]).gpus, parser.parse_args(["--model", "tiny"]).parallel) == \
        (1, "ddp")
    with contextlib.redirect_stderr(io.StringIO()), pytest.raises(SystemExit):
        parser.parse_args(["--model", "tiny", "--parallel", "zero3"])
    assert "predicted; not yet measured on several GPUs" in " ".join(parser.format_help().split())


def test_summary_line_names_the_mode():
    one = predict_peak(preset_dict("tiny"), 128, 1)
    assert "per GPU" not in prediction_line(one)
    line = prediction_line(predict_per_gpu(preset_dict("tiny"), 128, 1, gpus=2, parallel="fsdp"))
    assert "; per GPU, FSDP2 over 2 GPUs; `turbotune plan` itemises it)" in line
