"""FSDP2 under torchrun (2 CPU processes, gloo, `--fsdp`): each decoder layer and the root sharded, the same steps as
one process with the global batch, rank 0 alone writes a normal PEFT adapter, a sharded run resumes sharded."""
import io
import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
import test_distributed as ddp
from test_distributed import COMMON

from turbotune.errors import ConfigError
from turbotune.training.config import TrainConfig, check_values

# the DDP test's fixtures: the data file, and the one-process run with the global batch both are compared to
data_file, single_run = ddp.data_file, ddp.single_run


@pytest.fixture(scope="module")
def fsdp_run(tiny_llama_dir, data_file, tmp_path_factory):
    return ddp.finished_run(tiny_llama_dir, data_file, tmp_path_factory.mktemp("fsdp"), 4, extra=("--fsdp",))


def test_fsdp_equals_one_process_with_the_global_batch(fsdp_run, single_run):
    """Per-step losses and the final LoRA weights (fp32); the epoch's third global micro-batch has rows on rank 0
    only, so rank 1 runs an idle micro-step there."""
    out, _, stdout = fsdp_run
    ddp.assert_same_run(out, single_run[0])
    # sharded: 2 decoder layers + the root, each rank holding about half of the parameters
    line = next(ln for ln in stdout.splitlines() if "FSDP2:" in ln)
    held, total = (int(x.replace(",", "")) for x in line.split("holds ")[1].split(" parameters")[0].split(" of "))
    assert "2 decoder layers and the root" in line and 0.4 * total < held < 0.6 * total, line


def test_only_rank_0_writes_a_normal_peft_adapter(fsdp_run, single_run, tiny_llama_dir):
    """Rank 0 alone writes; the adapter loads with PEFT, and the optimizer state is one process's (whole tensors)."""
    out, rec, stdout = fsdp_run
    assert json.loads((rec / "writes-1.json").read_text()) == []
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "last_checkpoint", "loss.png",
                                                      "run_config.json", "training_log.json"]
    assert stdout.count("Step |") == 1
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir))
    model = PeftModel.from_pretrained(base, str(out / "last_checkpoint"))
    saved = load_file(str(out / "last_checkpoint" / "adapter_model.safetensors"))
    loaded = {n.replace(".default", ""): p for n, p in model.named_parameters() if "lora_" in n}
    assert loaded.keys() == saved.keys()
    for name, w in saved.items():
        assert torch.equal(loaded[name].detach(), w), name
    theirs, ours = (torch.load(run / "checkpoint-2" / "trainer_state.pt", weights_only=True)["optimizer"]
                    for run in (out, single_run[0]))
    assert theirs["param_groups"] == ours["param_groups"]
    torch.testing.assert_close(theirs["state"], ours["state"], rtol=1e-5, atol=1e-9)


# One optimizer step under torchrun --fsdp, resumed from a checkpoint: every rank builds the Trainer, rank 0 saves.
STEP = """
import os, sys
import torch
sys.path[:0] = {paths!r}
from test_fsdp import resumed_step
result = resumed_step({tiny!r}, {data!r}, {checkpoint!r}, {out!r}, batch_size=2)
if os.environ["RANK"] == "0":
    torch.save(result, {dump!r})
"""


def resumed_step(tiny_dir, data, checkpoint, out, batch_size):
    """(loss, tokens, gradients, LoRA weights after the update: whole, by name) of step 3 resumed from `checkpoint`
    (step 2): the epoch's last micro-batch is its second, with rows for rank 0 only (rank 1 runs an idle one)."""
    from turbotune.cli.train import load_everything
    from turbotune.training.trainer import Trainer

    def whole(t):
        return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()

    cfg = TrainConfig(model=str(tiny_dir), data=str(data), output_dir=str(out), batch_size=batch_size, max_steps=4,
                      distributed="fsdp", **COMMON)
    model, tok, dataset, _ = load_everything(cfg, io.StringIO())
    trainer = Trainer(cfg, model, tok, dataset, progress=False)
    trainer._resume_from(Path(checkpoint))
    loss, tokens = trainer._train_step()
    grads = {n: whole(p.grad) for n, p in model.named_parameters() if p.requires_grad}
    torch.nn.utils.clip_grad_norm_(trainer.params, cfg.max_grad_norm)
    trainer.optimizer.step()
    return loss, tokens, grads, {n: whole(p) for n, p in model.named_parameters() if p.requires_grad}


def test_fsdp_resumes_sharded_and_sums_gradients(fsdp_run, tiny_llama_dir, data_file, tmp_path):
    """The sharded run's checkpoint at step 2 resumed under --fsdp (the whole adapter and AdamW moments split over
    the ranks again), then step 3: the loss, the whole gradients and the updated LoRA weights equal one process's
    with the global batch. The gradients show the reduce-scatter sums, not averages, which losses alone can hardly
    show: AdamW's update barely changes when every gradient is halved."""
    here = Path(__file__).resolve().parent
    checkpoint = fsdp_run[0] / "checkpoint-2"
    script, dump = tmp_path / "step.py", tmp_path / "step.pt"
    script.write_text(STEP.format(paths=[str(here), str(here.parent)], tiny=str(tiny_llama_dir), data=str(data_file),
                                  checkpoint=str(checkpoint), out=str(tmp_path / "run"), dump=str(dump)))
    proc = subprocess.run([ddp.TORCHRUN, "--standalone", "--nproc-per-node", "2", str(script)], env=ddp._env(),
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loss, tokens, grads, weights = torch.load(dump, weights_only=True)
    want_loss, want_tokens, want_grads, want_weights = resumed_step(tiny_llama_dir, data_file, checkpoint,
                                                                    tmp_path / "one", batch_size=4)
    assert tokens == want_tokens
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=0)
    for got, want in ((grads, want_grads), (weights, want_weights)):
        assert got.keys() == want.keys() and len(want) > 0
        for name, w in want.items():
            assert w.abs().max() > 0, name
            torch.testing.assert_close(got[name], w, rtol=1e-5, atol=1e-7, msg=name)


def test_fsdp_refuses_a_4bit_base(tiny_llama_dir):
    """Asked for (--load-in-4bit), or found in the loaded model (a pre-quantised folder): refused before sharding."""
    from turbotune import FastModel
    from turbotune.model.state import turbo_state
    from turbotune.training.fsdp import ShardedModel

    with pytest.raises(ConfigError, match="4-bit .* not supported yet"):
        check_values(TrainConfig(distributed="fsdp", load_in_4bit=True, **COMMON))
    model, _ = FastModel.from_pretrained(str(tiny_llama_dir), verbose=False)
    model = FastModel.get_peft_model(model, r=4, use_gradient_checkpointing=False, verbose=False)
    turbo_state(model).quant_bits = 4  # as _read_quantization finds a bitsandbytes 4-bit weight
    with pytest.raises(ConfigError, match="4-bit .* not supported yet"):
        ShardedModel(model)
    with pytest.raises(ConfigError, match="'distributed' must be ddp or fsdp"):
        check_values(TrainConfig(distributed="zero3", **COMMON))
