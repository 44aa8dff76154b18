"""The fast step under an unmodified SFTTrainer / transformers.Trainer on a GPU: after the warm-up each pass
(a micro-batch, or the micro-batches of one optimizer step run together: step_coalescing.py) is replayed from
CUDA graphs (counters), replayed steps equal eager ones, and padded batches of changing lengths reuse a bounded
number of graphs.

Run on a GPU: pytest tests/gpu/test_trainer_step_gpu.py -q
"""
import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, max_position_embeddings=1024)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from turbotune.health.selftest import write_tiny_model
    folder = tmp_path_factory.mktemp("trainer-step")
    write_tiny_model(str(folder), TINY)  # a Llama and a one-character-per-token tokenizer
    return folder


def _texts(lengths):
    alphabet = "abcdefghijklmnopqrstuvwxyz"
    return [{"text": "".join(alphabet[(i + j) % 26] for j in range(n))} for i, n in enumerate(lengths)]


def _model(folder, checkpointing="auto"):
    from turbotune import FastModel
    from turbotune.training.trainer_step import trainer_step_of
    model, tok = FastModel.from_pretrained(str(folder), dtype=torch.bfloat16, max_seq_length=512, verbose=False)
    model = FastModel.get_peft_model(model, r=8, random_state=1, verbose=False,
                                     use_gradient_checkpointing=checkpointing)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.02)
    return model, tok, trainer_step_of(model)


def _sft(folder, tmp_path, rows, graphs=True, steps=6, batch=2, checkpointing="auto"):
    model, tok, step = _model(folder, checkpointing)
    from turbotune.model.checkpointing import get_offloaded_checkpointing
    if get_offloaded_checkpointing(model) is not None:  # the tiny model's layer inputs are far below the 1 MiB floor
        get_offloaded_checkpointing(model).config.min_offload_bytes = 0
    if not graphs:
        step.graphs.disabled_reason = "turned off"
    args = trl.SFTConfig(output_dir=str(tmp_path / f"sft-{graphs}"), per_device_train_batch_size=batch,
                         gradient_accumulation_steps=2, max_steps=steps, learning_rate=1e-3, logging_steps=1,
                         report_to=[], save_strategy="no", bf16=True, seed=3, max_length=200, packing=False,
                         dataset_text_field="text")
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                             processing_class=tok)
    trainer.train()
    return step, [h for h in trainer.state.log_history if "loss" in h]


def test_sfttrainer_replays_and_equals_eager(tiny_dir, tmp_path):
    rows = _texts([150] * 40)  # one shape: the all-ones mask is dropped, every micro-step has one key
    step, logs = _sft(tiny_dir, tmp_path, rows)
    assert step.graphs.disabled_reason is None
    assert step.graphs.captures == 1 and step.graphs.replays == 12 - step.graphs.warmup, vars(step.graphs)
    eager, eager_logs = _sft(tiny_dir, tmp_path, rows, graphs=False)
    assert eager.graphs.replays == 0
    for a, b in zip(logs, eager_logs):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-3, abs=1e-4), (logs, eager_logs)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=2e-2)


def test_flat_graph_grads_equal_the_default_and_time_the_passes(tiny_dir, tmp_path, monkeypatch):
    """TURBOTUNE_GRAPH_GRADS=flat (one autograd input per replay, a step's new gradients in one allocation), =adopt
    (the shared gradient buffers are the .grads) and adopt with TURBOTUNE_CAPTURE_GRADS_IN_PLACE=1 (a capture after
    an earlier pass of the same step adds each gradient into .grad as autograd makes it) give foreach's losses and
    gradient norms on mixed lengths (four passes per optimizer step, one per micro-batch, so .grad is both created
    and added to, and the first capture, the third pass of the first step, comes after two eager passes of its own
    step: captured in place where switched on); the pass timeline records every replayed pass."""
    from turbotune.training.pass_timeline import PassTimeline
    lengths = [17 + (i * 37) % 180 for i in range(48)]
    monkeypatch.setenv("TURBOTUNE_COALESCE", "0")
    runs = {}
    for mode in ("foreach", "flat", "adopt", "adopt-in-place"):
        monkeypatch.setenv("TURBOTUNE_GRAPH_GRADS", mode.removesuffix("-in-place"))
        monkeypatch.setenv("TURBOTUNE_CAPTURE_GRADS_IN_PLACE", "1" if mode.endswith("-in-place") else "0")
        model, tok, step = _model(tiny_dir)
        step.graphs.timeline = PassTimeline()
        args = trl.SFTConfig(output_dir=str(tmp_path / mode), per_device_train_batch_size=4,
                             gradient_accumulation_steps=4, max_steps=12, learning_rate=1e-3, logging_steps=1,
                             report_to=[], save_strategy="no", bf16=True, seed=3, max_length=200, packing=False,
                             dataset_text_field="text")
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(_texts(lengths)),
                                 processing_class=tok)
        trainer.train()
        summary = step.graphs.timeline.summary(skip_fraction=0)
        assert step.graphs.replays >= 6 and len(step.graphs.timeline.passes) == step.graphs.replays
        assert summary is not None and summary["forward"] > 0 and summary["backward"] > 0, summary
        runs[mode] = [(h["loss"], h["grad_norm"]) for h in trainer.state.log_history if "loss" in h]
        if mode.startswith("adopt"):  # the shared buffers are the .grads
            assert step.graphs.grads_mode == "adopt" and step.graphs._grad_bufs is not None
        assert (step.graphs.captures_in_place >= 1) == (mode == "adopt-in-place"), vars(step.graphs)
    a = runs["foreach"]
    for b in (runs["flat"], runs["adopt"], runs["adopt-in-place"]):
        assert len(a) == len(b) == 12
        for (la, ga), (lb, gb) in zip(a, b):
            assert la == pytest.approx(lb, rel=1e-5, abs=1e-6) and ga == pytest.approx(gb, rel=1e-4), (a, b)


@pytest.mark.parametrize("lean, defer, any_shape", [("0", "0", "0"), ("1", "0", "0"), ("host", "0", "0"),
                                                     ("0", "1", "0"), ("0", "1", "1")])
def test_padded_changing_lengths_reuse_bounded_graphs(tiny_dir, tmp_path, monkeypatch, lean, defer, any_shape):
    """Also with TURBOTUNE_LEAN_CAPTURE=1 (captures without emptying the allocator's caches first), with
    TURBOTUNE_DEFER_BACKWARD=1 (each step's last backward replayed once the trainer asks for the gradients) and
    with TURBOTUNE_WARMUP_ANY_SHAPE=1 (the first capture after two eager calls of any shapes)."""
    from turbotune.training import deferred_backward
    monkeypatch.setenv("TURBOTUNE_LEAN_CAPTURE", lean)
    monkeypatch.setenv("TURBOTUNE_DEFER_BACKWARD", defer)
    monkeypatch.setenv("TURBOTUNE_WARMUP_ANY_SHAPE", any_shape)
    launched = deferred_backward.launched
    lengths = [17 + (i * 37) % 180 for i in range(80)]  # every micro-batch pads to another length
    step, logs = _sft(tiny_dir, tmp_path, _texts(lengths), steps=20, batch=4)
    assert step.graphs.disabled_reason is None
    # 40 micro-batches of 4 rows, two to a step, run together where both fit 4 x 200 tokens: packed totals of
    # up to 800 tokens fall in a handful of buckets (256 .. 896)
    assert 20 <= step.window.passes < 40, vars(step.window)
    assert 1 <= step.graphs.captures <= 7 and step.graphs.replays >= 10, vars(step.graphs)
    assert deferred_backward.launched - launched == (20 if defer == "1" else 0)
    monkeypatch.setenv("TURBOTUNE_DEFER_BACKWARD", "0")
    monkeypatch.setenv("TURBOTUNE_WARMUP_ANY_SHAPE", "0")
    eager, eager_logs = _sft(tiny_dir, tmp_path, _texts(lengths), graphs=False, steps=20, batch=4)
    for a, b in zip(logs, eager_logs):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-3, abs=1e-4), (logs, eager_logs)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=2e-2)


def test_stand_in_graphs_equal_eager(tiny_dir, tmp_path, monkeypatch):
    """TURBOTUNE_GRAPH_STANDIN=3: a new length replays a longer captured graph for its first two sightings
    (padding.grow_packed), captures at its third; no more graphs than without, the same losses as eager."""
    lengths = [17 + (i * 37) % 180 for i in range(80)]
    monkeypatch.setenv("TURBOTUNE_GRAPH_STANDIN", "3")
    step, logs = _sft(tiny_dir, tmp_path, _texts(lengths), steps=20, batch=4)
    assert step.graphs.disabled_reason is None and step.graphs.standins >= 1, vars(step.graphs)
    monkeypatch.setenv("TURBOTUNE_GRAPH_STANDIN", "0")
    plain, _ = _sft(tiny_dir, tmp_path, _texts(lengths), steps=20, batch=4)
    assert plain.graphs.standins == 0 and step.graphs.captures <= plain.graphs.captures, (vars(step.graphs),
                                                                                         vars(plain.graphs))
    eager, eager_logs = _sft(tiny_dir, tmp_path, _texts(lengths), graphs=False, steps=20, batch=4)
    for a, b in zip(logs, eager_logs):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-3, abs=1e-4), (logs, eager_logs)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=2e-2)


def test_next_step_pulled_ahead_equals_eager(tiny_dir, tmp_path, monkeypatch):
    """TURBOTUNE_PREFETCH_STEP=1 (step_prefetch.py): each step's batches are fetched (and copied to the device)
    before the previous step's log waits for it, while the graphs replay; the logs equal the eager run's."""
    from turbotune.training import step_prefetch
    lengths = [17 + (i * 37) % 180 for i in range(80)]
    monkeypatch.setenv("TURBOTUNE_PREFETCH_STEP", "1")
    before = step_prefetch.prefetches
    step, logs = _sft(tiny_dir, tmp_path, _texts(lengths), steps=20, batch=4)
    assert step.graphs.disabled_reason is None and step.graphs.replays >= 10, vars(step.graphs)
    # 20 micro-batches an epoch, two to a step: pulled after every step but the 10th (its epoch's loader is
    # spent) and the 20th (training ends)
    assert step_prefetch.prefetches - before == 18
    monkeypatch.setenv("TURBOTUNE_PREFETCH_STEP", "0")
    eager, eager_logs = _sft(tiny_dir, tmp_path, _texts(lengths), graphs=False, steps=20, batch=4)
    assert len(logs) == len(eager_logs) == 20
    for a, b in zip(logs, eager_logs):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-3, abs=1e-4), (logs, eager_logs)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=2e-2)


def test_transformers_trainer_replays(tiny_dir, tmp_path):
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments
    model, tok, step = _model(tiny_dir)
    data = [tok(r["text"]) for r in _texts([100] * 24)]
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, max_steps=5, learning_rate=1e-3, logging_steps=1,
                             report_to=[], save_strategy="no", bf16=True)
    Trainer(model=model, args=args, train_dataset=data,
            data_collator=DataCollatorForLanguageModeling(tok, mlm=False)).train()
    # each step's two micro-batches of 2 x ~100 tokens run as one pass (fits 2 x max_seq_length 512)
    assert step.window.passes == 5 and step.window.micro_batches == 10, vars(step.window)
    assert step.graphs.disabled_reason is None and step.graphs.replays == 5 - step.graphs.warmup


def test_shared_gradient_buffers_equal_eager(tiny_dir, tmp_path, monkeypatch):
    """Shared gradient buffers (graph_grads.shared_grads, the default; set here to be explicit): every backward graph copies into one set of gradient
    buffers; several captured lengths, and the losses still equal the eager run's."""
    monkeypatch.setenv("TURBOTUNE_SHARED_GRADS", "1")
    lengths = [17 + (i * 37) % 180 for i in range(80)]
    step, logs = _sft(tiny_dir, tmp_path, _texts(lengths), steps=12, batch=4)
    assert step.graphs._grad_bufs is not None and step.graphs.captures >= 2, vars(step.graphs)
    eager, eager_logs = _sft(tiny_dir, tmp_path, _texts(lengths), graphs=False, steps=12, batch=4)
    for a, b in zip(logs, eager_logs):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-3, abs=1e-4), (logs, eager_logs)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=2e-2)


def test_capture_at_first_sight_equals_eager(tiny_dir, tmp_path, monkeypatch):
    """Capture at first sight with half-octave buckets (the defaults; set here to be explicit): after the first capture, a new length is captured
    when first seen (no eager call first); the losses still equal the eager run's."""
    monkeypatch.setenv("TURBOTUNE_CAPTURE_FIRST_SIGHT", "1")
    monkeypatch.setenv("TURBOTUNE_BUCKETS", "2")
    lengths = [17 + (i * 37) % 180 for i in range(80)]
    step, logs = _sft(tiny_dir, tmp_path, _texts(lengths), steps=12, batch=4)
    g = step.graphs
    assert g.disabled_reason is None and g.captures >= 2 and g.eager_after_capture == 0, vars(g)
    eager, eager_logs = _sft(tiny_dir, tmp_path, _texts(lengths), graphs=False, steps=12, batch=4)
    for a, b in zip(logs, eager_logs):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-3, abs=1e-4), (logs, eager_logs)


def _dpo(folder, tmp_path, graphs=True, steps=6):
    model, tok, step = _model(folder)
    if not graphs:
        step.graphs.disabled_reason = "turned off"  # the reference passes' graphs follow the training call's
    alphabet = "abcdefghijklm"
    rows = [{"prompt": alphabet[i % 5:] * 3, "chosen": alphabet[:4 + i % 3] * 6, "rejected": alphabet[7:] * 5}
            for i in range(48)]
    args = trl.DPOConfig(output_dir=str(tmp_path / f"dpo-{graphs}"), per_device_train_batch_size=2,
                         gradient_accumulation_steps=2, max_steps=steps, learning_rate=1e-3, logging_steps=1,
                         report_to=[], save_strategy="no", bf16=True, seed=3, max_length=128)
    trainer = trl.DPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                             processing_class=tok)
    trainer.train()
    return step, [h for h in trainer.state.log_history if "loss" in h]


def test_dpo_reference_passes_replay_and_equal_eager(tiny_dir, tmp_path, monkeypatch):
    """DPOTrainer's reference forward (no grad, adapters disabled) replays from forward-only graphs
    (forward_graphs.py) once its shape and adapter state repeat; the losses equal the run with graphs off."""
    monkeypatch.setenv("TURBOTUNE_NO_GRAD_GRAPHS", "1")
    step, logs = _dpo(tiny_dir, tmp_path)
    ref = step.no_grad_graphs
    assert ref.disabled_reason is None and ref.captures >= 1 and ref.replays >= 6, vars(ref)
    assert ref.captures <= 8
    eager, eager_logs = _dpo(tiny_dir, tmp_path, graphs=False)
    assert eager.no_grad_graphs.replays == 0
    for a, b in zip(logs, eager_logs):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-3, abs=1e-4), (logs, eager_logs)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=2e-2)


@pytest.mark.parametrize("tiled", [False, True])
def test_offloaded_checkpointing_replays_and_equals_eager(tiny_dir, tmp_path, monkeypatch, tiled):
    """use_gradient_checkpointing="offload" (each layer's input parked in host memory) under SFTTrainer with
    TURBOTUNE_GRAPH_OFFLOAD=1: the copies to the host are joined inside the forward graph, the backward graph
    prefetches them back; replayed steps equal the eager run's. tiled: TURBOTUNE_OFFLOAD_MLP_TILE=1 with a
    budget small enough to tile the tiny MLP (64-token chunks), against the untiled eager run."""
    monkeypatch.setenv("TURBOTUNE_GRAPH_OFFLOAD", "1")
    calls = []
    if tiled:
        from turbotune.model.families import llama_like
        from turbotune.model.kernels import mlp_tiling
        monkeypatch.setenv("TURBOTUNE_OFFLOAD_MLP_TILE", "1")
        monkeypatch.setattr(mlp_tiling, "OFFLOAD_MLP_TILE_BUDGET_BYTES", 64 * TINY["intermediate_size"] * 2)
        monkeypatch.setattr(mlp_tiling, "TILE_MULTIPLE", 64)
        tiled_mlp = llama_like.tiled_lora_mlp
        monkeypatch.setattr(llama_like, "tiled_lora_mlp", lambda *a, **k: calls.append(k) or tiled_mlp(*a, **k))
    rows = _texts([150] * 40)
    step, logs = _sft(tiny_dir, tmp_path, rows, checkpointing="offload")
    from turbotune.model.checkpointing import get_offloaded_checkpointing
    offload = get_offloaded_checkpointing(step.peft_model)
    assert offload is not None and offload.stats["offloaded_inputs"] > 0, offload and offload.stats
    assert step.graphs.disabled_reason is None and step.graphs.replays >= 8, vars(step.graphs)
    assert bool(calls) == tiled and all(k["chunk_tokens"] == 64 for k in calls)
    monkeypatch.delenv("TURBOTUNE_OFFLOAD_MLP_TILE", raising=False)
    eager, eager_logs = _sft(tiny_dir, tmp_path, rows, graphs=False, checkpointing="offload")
    for a, b in zip(logs, eager_logs):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-3, abs=1e-4), (logs, eager_logs)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=2e-2)


def test_offloaded_checkpointing_with_mixed_lengths(tiny_dir, tmp_path, monkeypatch):
    """Offloaded checkpointing with several captured lengths: a new length after the first capture runs once
    eagerly (its pinned host buffers can't be made during a capture; the bench's mixed run lost its graphs to
    that on an H200, twelfth session); the losses equal the eager run's."""
    monkeypatch.setenv("TURBOTUNE_GRAPH_OFFLOAD", "1")
    lengths = [17 + (i * 37) % 180 for i in range(80)]
    step, logs = _sft(tiny_dir, tmp_path, _texts(lengths), steps=12, batch=4, checkpointing="offload")
    g = step.graphs
    assert g.disabled_reason is None and g.captures >= 2 and g.replays >= 1, vars(g)
    eager, eager_logs = _sft(tiny_dir, tmp_path, _texts(lengths), graphs=False, steps=12, batch=4,
                             checkpointing="offload")
    for a, b in zip(logs, eager_logs):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-3, abs=1e-4), (logs, eager_logs)


def _grpo(folder, tmp_path, graphs=True):
    model, tok, step = _model(folder)
    if not graphs:
        step.graphs.disabled_reason = "turned off"  # the no-grad graphs follow the training call's
    # prompts of one length, so every generation's no-grad passes have one shape, captured at its second call
    prompts = [{"prompt": ("abcdefghij"[i % 5:] + "abcdefghij"[:i % 5]) * 2} for i in range(16)]
    args = trl.GRPOConfig(output_dir=str(tmp_path / f"grpo-{graphs}"), per_device_train_batch_size=4,
                          num_generations=4, gradient_accumulation_steps=2, max_steps=6, max_completion_length=8,
                          learning_rate=1e-3, logging_steps=1, report_to=[], save_strategy="no", bf16=True,
                          seed=7, beta=0.04, num_iterations=2, temperature=0.7)
    trainer = trl.GRPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(prompts),
                              processing_class=tok, reward_funcs=lambda completions, **kw: [float(len(set(c)))
                                                                                           for c in completions])
    trainer.train()
    return step, [h for h in trainer.state.log_history if "loss" in h]


def test_grpo_log_prob_passes_replay_and_equal_eager(tiny_dir, tmp_path):
    """GRPOTrainer's no-grad passes (the reference with adapters off, the old policy's with them on: beta > 0 and
    two iterations) replay from forward-only graphs (the default); losses and gradient norms equal the run with
    graphs off (the same rollouts: generation does not go through these graphs)."""
    step, logs = _grpo(tiny_dir, tmp_path)
    ref = step.no_grad_graphs
    assert ref.disabled_reason is None and ref.captures >= 1 and ref.replays >= 1, \
        (ref.captures, ref.replays, ref.eager_calls)
    eager, eager_logs = _grpo(tiny_dir, tmp_path, graphs=False)
    assert eager.no_grad_graphs.replays == 0
    assert any(h.get("reward_std", 0) > 0 for h in logs), logs  # advantages that are not all zero
    assert len(logs) == len(eager_logs) == 6
    for a, b in zip(logs, eager_logs):  # GRPO's loss is ~0 on policy: the gradients carry the check
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-2, abs=1e-4), (logs, eager_logs)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=5e-2, abs=1e-5), (logs, eager_logs)
