"""The fast step under Hugging Face trainers (trainer_step.py): an unmodified SFTTrainer / transformers.Trainer on
a turbotune model logs the same per-step losses as on the stock transformers + PEFT model (fp32, CPU), for
padded batches of mixed lengths, TRL's packing and its padding-free batches; padding is really removed and TRL's
fused head really served by ours."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import make_tiny_model  # noqa: E402

from turbotune import FastModel  # noqa: E402
from turbotune.training import padding as padding_mod  # noqa: E402
from turbotune.training import trainer_step  # noqa: E402
from turbotune.training.padding import bucket_length, remove_padding  # noqa: E402

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def _rows(n=24):
    rows = []
    for i in range(n):  # answers of 2 to 20 words: batches pad to very different lengths
        answer = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(2 + (i * 7) % 19))
        rows.append({"messages": [{"role": "user", "content": f"Item {i}?"},
                                  {"role": "assistant", "content": answer}]})
    return rows


def _model(folder, patch):
    model, tok = FastModel.from_pretrained(str(folder), max_seq_length=256, patch=patch, verbose=False)
    model = FastModel.get_peft_model(model, r=8, lora_alpha=16, random_state=3407, verbose=False)
    with torch.no_grad():  # B away from zero, so the first steps move every adapter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.02)
    return model, tok


def _sft(folder, tmp_path, patch, **config):
    model, tok = _model(folder, patch)
    args = trl.SFTConfig(output_dir=str(tmp_path / f"sft-{patch}"), per_device_train_batch_size=4,
                         gradient_accumulation_steps=2, max_steps=4, learning_rate=5e-3, logging_steps=1,
                         report_to=[], save_strategy="no", bf16=False, fp16=False, seed=7,
                         **{"max_length": 128, **config})
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(_rows()),
                             processing_class=tok)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return model, logs


@pytest.mark.parametrize("config", [dict(packing=False), dict(packing=True), dict(padding_free=True, max_length=None)],
                         ids=["padded", "packing", "padding_free"])
def test_sfttrainer_losses_equal_stock(tiny_llama_dir, tmp_path, monkeypatch, config):
    served, packed = [], []
    real_head, real_remove = trainer_step.fused_head_forward, padding_mod.remove_padding
    monkeypatch.setattr(trainer_step, "fused_head_forward",
                        lambda *a, **k: (lambda out: served.append(out is not None) or out)(real_head(*a, **k)))
    monkeypatch.setattr(padding_mod, "remove_padding",
                        lambda b, **k: (lambda out: packed.append("attention_mask" in b and out is not b) or out)(
                            real_remove(b, **k)))
    model, ours = _sft(tiny_llama_dir, tmp_path, True, **config)
    assert trainer_step.trainer_step_of(model) is not None and served and all(served)  # ours, not TRL's head
    if config.get("packing") is False:
        assert any(packed), "the padded batches were not packed"
        window = trainer_step.trainer_step_of(model).window  # each step's 2 micro-batches ran as one pass
        assert (window.steps, window.micro_batches, window.passes) == (4, 8, 4)
    stock_model, stock = _sft(tiny_llama_dir, tmp_path, False, **config)
    assert trainer_step.trainer_step_of(stock_model) is None
    assert_same_logs(ours, stock, steps=4)


@pytest.mark.parametrize("window", [None, 8])
def test_sfttrainer_with_sequence_offsets_equals_stock(tiny_llama_dir, tmp_path, monkeypatch, window,
                                                       smol_tokenizer):
    """TURBOTUNE_FLASH_VARLEN=1: packed rows carry their samples' offsets and the patched attention uses them
    (the CPU runs the offsets' masked reference), with a sliding window where the model has one (a Mistral whose
    8-token window binds in every sample); the losses are still the stock model's."""
    from turbotune.model.kernels import varlen_attention as va
    if window is not None:
        tiny_llama_dir = make_tiny_model(tmp_path / "mistral", smol_tokenizer, "mistral", sliding_window=window)
    monkeypatch.setenv("TURBOTUNE_FLASH_VARLEN", "1")
    calls = []
    real = va.varlen_attention_reference
    monkeypatch.setattr(va, "varlen_attention_reference",
                        lambda *a, **k: calls.append(a[5] if len(a) > 5 else k.get("window")) or real(*a, **k))
    from turbotune.training.graphed_call import GraphedCall
    fed, grows, real_call = [], [], GraphedCall.__call__  # the graphs' key reads every `tensors` value as a tensor
    monkeypatch.setattr(GraphedCall, "__call__", lambda self, t, o, **kw: fed.append((t, o))  # (a GPU bug once)
                        or grows.append(kw.get("grow")) or real_call(self, t, o, **kw))
    _, ours = _sft(tiny_llama_dir, tmp_path, True, packing=False)
    assert calls and set(calls) == {window}, "the attention did not take the sequence offsets (and window)"
    assert fed and all(torch.is_tensor(v) for t, _ in fed for v in t.values())
    assert all(o.get("max_length_q") == t["input_ids"].shape[1] for t, o in fed if "cu_seq_lens_q" in t)
    # every packed call comes with the growth that lets it replay a longer graph (TURBOTUNE_GRAPH_STANDIN), and
    # grown to the next bucket it keeps the form its graph key needs
    packed = [(t, o, g) for (t, o), g in zip(fed, grows) if "cu_seq_lens_q" in t]
    assert packed and all(callable(g) for _, _, g in packed)
    t, o, g = packed[0]
    grown_t, grown_o = g(t, o, t["input_ids"].shape[1] + 128)
    assert grown_o["max_length_q"] == grown_t["input_ids"].shape[1] == t["input_ids"].shape[1] + 128
    monkeypatch.setenv("TURBOTUNE_FLASH_VARLEN", "0")
    _, stock = _sft(tiny_llama_dir, tmp_path, False, packing=False)
    assert_same_logs(ours, stock, steps=4)


def test_remove_padding_adds_fixed_size_offsets_with_the_switch(monkeypatch):
    from turbotune.model.kernels.varlen_attention import MAX_SEQUENCES
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])
    batch = {"input_ids": ids, "attention_mask": (ids != 0).long(), "labels": ids.masked_fill(ids == 0, -100)}
    monkeypatch.setenv("TURBOTUNE_FLASH_VARLEN", "0")
    assert "cu_seq_lens_q" not in remove_padding(batch, pad_id=0)  # the switch off: the document mask
    monkeypatch.setenv("TURBOTUNE_FLASH_VARLEN", "1")
    out = remove_padding(batch, pad_id=0)
    offsets = out["cu_seq_lens_q"]
    assert offsets.shape == (MAX_SEQUENCES + 1,) and offsets[:4].tolist() == [0, 3, 5, 256]
    assert (offsets[3:] == 256).all() and out["max_length_q"] == out["max_length_k"] == 256
    many = torch.ones(MAX_SEQUENCES, 2, dtype=torch.long)  # more samples than the offsets hold: the mask instead
    assert "cu_seq_lens_q" not in remove_padding({"input_ids": many, "attention_mask": many.clone(),
                                                  "labels": many.clone(), "position_ids": many.clone() * 0}, pad_id=0)


def assert_same_logs(ours, stock, steps):
    """Per logged step: loss, grad norm and TRL's token accuracy and entropy equal the stock model's."""
    assert len(ours) == len(stock) == steps
    for a, b in zip(ours, stock):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), (ours, stock)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert a["mean_token_accuracy"] == pytest.approx(b["mean_token_accuracy"], abs=1e-6)
        assert a["entropy"] == pytest.approx(b["entropy"], rel=1e-4)


def test_transformers_trainer_losses_equal_stock(tiny_llama_dir, tmp_path):
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    def run(patch):
        model, tok = _model(tiny_llama_dir, patch)
        texts = [tok.apply_chat_template(r["messages"], tokenize=False) for r in _rows(16)]
        data = [tok(t) for t in texts]
        args = TrainingArguments(output_dir=str(tmp_path / f"hf-{patch}"), per_device_train_batch_size=4,
                                 gradient_accumulation_steps=2, max_steps=3, learning_rate=5e-3, logging_steps=1,
                                 report_to=[], save_strategy="no", use_cpu=True, seed=7)
        trainer = Trainer(model=model, args=args, train_dataset=data,
                          data_collator=DataCollatorForLanguageModeling(tok, mlm=False))
        trainer.train()
        if patch:  # the two micro-batches of each step ran as one pass
            window = trainer_step.trainer_step_of(model).window
            assert (window.steps, window.micro_batches, window.passes) == (3, 6, 3), vars(window)
        return [h["loss"] for h in trainer.state.log_history if "loss" in h]

    ours, stock = run(True), run(False)
    assert len(ours) == 3 and ours == pytest.approx(stock, rel=1e-5)


def test_remove_padding_packs_right_padded_rows():
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])
    mask = (ids != 0).long()
    labels = torch.tensor([[5, 6, 7, -100], [8, 9, -100, -100]])
    out = remove_padding({"input_ids": ids, "attention_mask": mask, "labels": labels}, pad_id=0)
    assert "attention_mask" not in out and out["input_ids"].shape == (1, 256)
    assert out["input_ids"][0, :5].tolist() == [5, 6, 7, 8, 9]
    assert out["position_ids"][0, :7].tolist() == [0, 1, 2, 0, 1, 0, 1]  # then the tail: a sample of its own
    assert out["labels"][0, :5].tolist() == [-100, 6, 7, -100, 9]       # no position predicts across a boundary
    assert (out["labels"][0, 5:] == -100).all()
    # the targets the causal loss scores are the padded batch's
    assert (out["labels"][0, 1:] != -100).sum() == (labels[:, 1:] != -100).sum()


def test_remove_padding_leaves_what_it_cannot_pack():
    ids = torch.tensor([[0, 6, 7], [8, 9, 4]])
    left = {"input_ids": ids, "attention_mask": (ids != 0).long(), "labels": ids}
    assert remove_padding(left) is left                                     # left padding
    full = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    assert set(remove_padding(full)) == {"input_ids", "labels"}             # no padding: the mask goes
    extra = {"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 0], [1, 1, 1]]), "labels": ids,
             "token_type_ids": ids}
    assert remove_padding(extra) is extra


@pytest.mark.parametrize("tokens,bucket", [(1, 256), (256, 256), (257, 320), (300, 320), (1000, 1024),
                                           (1025, 1280), (4096, 4096), (4097, 5120)])
def test_quarter_octave_buckets(tokens, bucket, monkeypatch):
    """TURBOTUNE_BUCKETS=4: quarters of the octave, at most a quarter of padding."""
    assert bucket_length(tokens, per_octave=4) == bucket
    monkeypatch.setenv("TURBOTUNE_BUCKETS", "4")
    assert bucket_length(tokens) == bucket and bucket - tokens <= max(256, tokens // 4)


@pytest.mark.parametrize("tokens,bucket", [(1, 256), (257, 384), (700, 768), (1025, 1536), (3000, 3072),
                                           (4097, 6144)])
def test_half_octave_buckets_by_default(tokens, bucket):
    """The default: half as many lengths as quarters (fewer captures), at most half an octave of padding."""
    assert bucket_length(tokens) == bucket == bucket_length(tokens, per_octave=2)
    assert bucket - tokens <= max(256, tokens // 2)


def test_parameter_count_read_once_equals_transformers(tiny_llama_dir):
    """What the Trainer asks every micro-step (num_parameters, or floating_point_ops on older transformers) is the
    base model's answer, counted once."""
    from turbotune._compat import unwrap_peft
    model, _ = _model(tiny_llama_dir, True)
    base = unwrap_peft(model)
    for kw in ({}, {"exclude_embeddings": True}, {"only_trainable": True}):
        assert model.num_parameters(**kw) == type(base).num_parameters(base, **kw) > 0
    if hasattr(type(base), "floating_point_ops"):
        inputs = {"input_ids": torch.ones(2, 7, dtype=torch.long)}
        assert model.floating_point_ops(inputs) == type(base).floating_point_ops(base, inputs)
    trainer_step.uninstall(model)
    assert trainer_step.trainer_step_of(model) is None and "num_parameters" not in model.__dict__


def test_packed_rows_grow_to_their_bucket():
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    batch = {"input_ids": ids, "position_ids": torch.tensor([[0, 1, 2, 0, 1]]), "labels": ids.clone()}
    out = remove_padding(batch)
    assert out["input_ids"].shape == (1, 256) and out["input_ids"][0, :5].tolist() == [5, 6, 7, 8, 9]
    assert out["position_ids"][0, :8].tolist() == [0, 1, 2, 0, 1, 0, 1, 2] and (out["labels"][0, 5:] == -100).all()
    flash = dict(batch, cu_seq_lens_q=torch.tensor([0, 3, 5]))
    assert remove_padding(flash) is flash  # its boundaries describe the row as it is


def test_auto_checkpointing_planned_from_the_fed_batch(tiny_llama_dir, tmp_path, monkeypatch):
    """use_gradient_checkpointing="auto" under SFTTrainer: planned once, at the first training call, for the
    batch's rows at the model's max_seq_length (before padding removal), whatever TRL's switch says."""
    import turbotune.training.auto_checkpointing as ac
    seen = []
    real = ac.plan_checkpointing
    monkeypatch.setattr(ac, "plan_checkpointing",
                        lambda m, seq, rows, *a: seen.append((seq, rows)) or real(m, seq, rows))
    model, tok = FastModel.from_pretrained(str(tiny_llama_dir), max_seq_length=256, verbose=False)
    model = FastModel.get_peft_model(model, r=4, use_gradient_checkpointing="auto", verbose=False)
    args = trl.SFTConfig(output_dir=str(tmp_path / "auto"), per_device_train_batch_size=4, max_steps=2,
                         report_to=[], save_strategy="no", bf16=False, fp16=False, max_length=128)
    trl.SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(_rows(8)),
                   processing_class=tok).train()
    step = trainer_step.trainer_step_of(model)
    assert seen == [(256, 4)] and step.trainer_checkpointing  # TRL asked for checkpointing; the plan stood


def test_fused_head_refuses_what_it_does_not_compute(tiny_llama_dir):
    """TRL's head asking for fields ours does not compute, or for an fp32 head, stays TRL's; a temperature (GRPO's)
    is served, folded into the logit scale (with a soft-cap it is not: tests/training/test_grpo.py)."""
    from trl.trainer.utils import add_fused_lm_head

    from turbotune._compat import unwrap_peft
    for kw, served in [(dict(outputs=("log_probs", "entropy", "is_top1")), True),
                       (dict(temperature=0.7), True), (dict(outputs=("log_probs", "log_sum_sq_probs")), False),
                       (dict(outputs=("log_probs", "mean_logits")), True),
                       (dict(cast_lm_head_to_fp32=True), False)]:
        model, _ = _model(tiny_llama_dir, True)
        assert trainer_step.fused_head_refusal(model) is not None  # no TRL head yet: nothing to stand in for
        add_fused_lm_head(unwrap_peft(model), **kw)
        assert (trainer_step.fused_head_refusal(model) is None) is served, kw


def test_train_mode_walk_skipped_only_when_nothing_changes(tiny_llama_dir, monkeypatch):
    """model.train() every micro-step: no walk over the modules when all are already training; a module put in
    eval mode since, or model.eval(), still gets the full walk (the same modes as nn.Module.train)."""
    model, _ = _model(tiny_llama_dir, True)
    walks = []
    real = type(model).train
    monkeypatch.setattr(type(model), "train", lambda self, mode=True: walks.append(mode) or real(self, mode))
    model.train()
    model.train()
    assert walks == [True]                                   # the second call changed nothing: skipped
    layer = model.get_base_model().model.layers[0]
    layer.mlp.eval()
    model.train()
    assert walks == [True, True] and layer.mlp.training       # the full walk put it back
    model.eval()
    assert walks[-1] is False and not any(m.training for m in model.modules())
    model.train()
    assert all(m.training for m in model.modules())


def test_own_loop_micro_step_makes_the_hook_pass_through(tiny_llama_dir, monkeypatch):
    """turbotune's own loops drive the micro-step themselves: under them the Hugging Face hook must not remove
    padding, plan checkpointing or capture graphs of its own (on a GPU, a capture nested in the loop's graph
    broke it)."""
    from turbotune.training.cuda_graphs import GraphedMicroStep
    model, _ = _model(tiny_llama_dir, patch=True)
    hook = trainer_step.trainer_step_of(model)
    assert hook is not None and hook.passthrough is None
    calls = []
    monkeypatch.setattr(padding_mod, "remove_padding", lambda b, **k: calls.append(1) or b)
    micro = GraphedMicroStep(model, [p for p in model.parameters() if p.requires_grad], enabled=False)
    assert hook.passthrough
    ids = torch.randint(2, 100, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    model.train()
    loss = micro({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    assert torch.isfinite(loss) and not calls and hook.graphs.eager_calls == 0


@pytest.mark.parametrize("switch", ["0", "1"])
def test_offloaded_checkpointing_and_the_graphs_switch(tiny_llama_dir, monkeypatch, switch):
    """Offloaded checkpointing is captured in the trainer step's graphs (TURBOTUNE_GRAPH_OFFLOAD, on by default):
    the offload is asked for reusable pinned buffers (what a replay needs); =0 keeps the graphs off. On the CPU the
    graphs stay off either way."""
    from turbotune.model.checkpointing import get_offloaded_checkpointing
    monkeypatch.setenv("TURBOTUNE_GRAPH_OFFLOAD", switch)
    model, _ = FastModel.from_pretrained(str(tiny_llama_dir), verbose=False)
    model = FastModel.get_peft_model(model, r=4, random_state=1, verbose=False, use_gradient_checkpointing="offload")
    offload, step = get_offloaded_checkpointing(model), trainer_step.trainer_step_of(model)
    reason = step.graphs.why_off()
    if switch == "1":
        assert offload.config.static_host_buffers and "CUDA" in reason
    else:
        assert not offload.config.static_host_buffers and "offloaded checkpointing" in reason


@pytest.mark.parametrize("old_transformers", [False, True])
@pytest.mark.parametrize("planned_at", ["load", "first_step"])
def test_auto_plan_without_checkpointing_stays_off_under_sfttrainer(tiny_llama_dir, tmp_path, monkeypatch,
                                                                    old_transformers, planned_at):
    """A plan of "none" (a card with room) is not undone by TRL's switch, also on transformers without the
    activation_checkpointing_* names (before 5.2x, e.g. the GPU machine's 5.17), where the switches the plan
    calls and the ones the trainer calls have one name: the bench's llama3-8b "auto" rows trained with
    recompute on that machine (fifteenth session)."""
    import peft

    import turbotune.training.auto_checkpointing as ac
    from turbotune._compat import is_checkpointing, unwrap_peft
    if old_transformers:  # the PEFT wrapper no longer finds the new names on the model (the trainer then neither)
        getattr_ = peft.PeftModel.__getattr__

        def old_names_only(self, name):
            if name.startswith("activation_checkpointing_"):
                raise AttributeError(name)
            return getattr_(self, name)
        monkeypatch.setattr(peft.PeftModel, "__getattr__", old_names_only)
    real = ac.choose_checkpointing
    monkeypatch.setattr(ac, "choose_checkpointing",
                        lambda m, seq, rows, *a, **k: ac.CheckpointingChoice("none", 1, 2, "room to spare")
                        if real(m, seq, rows, *a, **k) else None)
    model, tok = FastModel.from_pretrained(str(tiny_llama_dir), max_seq_length=256, verbose=False)
    model = FastModel.get_peft_model(model, r=4, use_gradient_checkpointing="auto", verbose=False)
    if planned_at == "load":  # as the bench's turbotune-auto loader does
        assert ac.plan_checkpointing(model, 256, 4).mode == "none"
    base = unwrap_peft(model)
    args = trl.SFTConfig(output_dir=str(tmp_path / "auto"), per_device_train_batch_size=4, max_steps=2,
                         report_to=[], save_strategy="no", bf16=False, fp16=False, max_length=128,
                         gradient_checkpointing=True)
    seen = []
    layer = type(base.model.layers[0])
    forward = layer.__call__
    monkeypatch.setattr(layer, "__call__", lambda self, *a, **k: seen.append(is_checkpointing(base)
                                                                               or self.gradient_checkpointing)
                        or forward(self, *a, **k))
    trl.SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(_rows(8)),
                   processing_class=tok).train()
    assert seen and not any(seen) and not is_checkpointing(base)
    assert trainer_step.trainer_step_of(model).trainer_checkpointing   # TRL did ask


@pytest.mark.parametrize("defer", ["1", "0"])
def test_start_line_names_the_fast_features(tiny_llama_dir, tmp_path, monkeypatch, capsys, defer):
    """One line at the first training call says which fast features are on, and why one is off."""
    monkeypatch.setenv("TURBOTUNE_DEFER_BACKWARD", defer)
    model, tok = FastModel.from_pretrained(str(tiny_llama_dir), max_seq_length=256, verbose=False)
    model = FastModel.get_peft_model(model, r=4, verbose=True)
    args = trl.SFTConfig(output_dir=str(tmp_path / "line"), per_device_train_batch_size=2,
                         gradient_accumulation_steps=2, max_steps=1, report_to=[], save_strategy="no", bf16=False,
                         fp16=False, max_length=128)
    trl.SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(_rows(8)),
                   processing_class=tok).train()
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "[turbotune] trainer step:" in ln]
    assert len(lines) == 1, lines
    line = lines[0]
    assert "gradient checkpointing: recompute" in line and "run together" in line and "CUDA graphs off" in line
    assert ("last backward launched at the trainer's first gradient read" in line) == (defer == "1")
    assert ("TURBOTUNE_DEFER_BACKWARD=0" in line) == (defer == "0")


def test_start_line_says_when_the_chosen_checkpointing_was_switched(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    """The start line reports what the layers will do, and warns where that is not what turbotune chose."""
    import turbotune.training.auto_checkpointing as ac
    from turbotune._compat import checkpointing_enable
    monkeypatch.setattr(ac, "choose_checkpointing",
                        lambda m, seq, rows, *a, **k: ac.CheckpointingChoice("none", 1, 2, "room to spare"))
    model, tok = FastModel.from_pretrained(str(tiny_llama_dir), max_seq_length=256, verbose=False)
    model = FastModel.get_peft_model(model, r=4, use_gradient_checkpointing="auto", verbose=True)
    assert ac.plan_checkpointing(model, 256, 4).mode == "none"
    checkpointing_enable(model)  # behind turbotune's back, after the plan
    args = trl.SFTConfig(output_dir=str(tmp_path / "switched"), per_device_train_batch_size=2, max_steps=1,
                         report_to=[], save_strategy="no", bf16=False, fp16=False, max_length=128)
    with pytest.warns(RuntimeWarning, match="chose gradient checkpointing 'none'.*set to 'recompute'"):
        trl.SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(_rows(4)),
                       processing_class=tok).train()
    line = [ln for ln in capsys.readouterr().err.splitlines() if "[turbotune] trainer step:" in ln][0]
    assert "gradient checkpointing: recompute (turbotune chose none; something switched it since)" in line
