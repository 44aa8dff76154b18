"""Export: merged weights equal base + adapter, written 16-bit by default; the adapter copy is a plain PEFT adapter."""
import pytest
import torch

from turbotune.export.export import export
from turbotune.training.config import TrainConfig
from turbotune.cli.train import run_training


@pytest.fixture(scope="module")
def adapter(tiny_llama_dir, tmp_path_factory):
    """An adapter trained for two steps on the fp32-saved tiny model."""
    out = tmp_path_factory.mktemp("export-run")
    cfg = TrainConfig(model=str(tiny_llama_dir), output_dir=str(out / "run"), max_steps=2, batch_size=2,
                      grad_accum=1, max_seq_length=64, lora_r=4, lr=1e-2)
    run_training(cfg, progress=False)
    return out / "run" / "last_checkpoint"


def _saved_dtypes(folder) -> set:
    from safetensors import safe_open

    dtypes = set()
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            dtypes |= {st.get_slice(k).get_dtype() for k in st.keys()}
    return dtypes


def test_merge_and_copy(tiny_llama_dir, adapter, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged_dir = export(adapter, tmp_path / "merged", how="merged", dtype="fp32")  # fp32: comparable at 1e-4
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir))
    assert not any("lora" in n for n, _ in merged.named_parameters())
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir)), str(adapter))
    ids = torch.randint(0, 1000, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)
    assert (merged_dir / "tokenizer_config.json").is_file()

    copy_dir = export(adapter, tmp_path / "copy", how="adapter")
    assert (copy_dir / "adapter_model.safetensors").is_file()
    assert not (copy_dir / "trainer_state.pt").exists()


@pytest.mark.parametrize("saved,written,why", [
    (None, "BF16", "the base checkpoint is stored in float32; bf16 halves the size"),
    (torch.bfloat16, "BF16", "the base checkpoint's own dtype"),
    (torch.float16, "F16", "the base checkpoint's own dtype"),
])
def test_merged_export_is_16_bit(tiny_llama_dir, adapter, tmp_path, capsys, saved, written, why):
    """fp32 base → bf16; a 16-bit base keeps its dtype; a line says which and why; the merge itself is fp32."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = tiny_llama_dir
    if saved is not None:  # the same weights, saved in 16 bits
        base = tmp_path / "base"
        AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir)).to(saved).save_pretrained(str(base))
        AutoTokenizer.from_pretrained(str(tiny_llama_dir)).save_pretrained(str(base))
    out = export(adapter, tmp_path / "merged", base=str(base))
    assert _saved_dtypes(out) == {written}
    name = {"BF16": "bfloat16", "F16": "float16"}[written]
    assert f"[turbotune] merged weights written in {name} ({why}" in capsys.readouterr().out

    # Rounded once: the 16-bit weights are the fp32 merge of the same base, cast.
    full = export(adapter, tmp_path / "full", base=str(base), dtype="fp32")
    assert "merged weights written in float32 (as --dtype asked)" in capsys.readouterr().out
    assert _saved_dtypes(full) == {"F32"}
    low, high = load_file(str(out / "model.safetensors")), load_file(str(full / "model.safetensors"))
    for key, tensor in low.items():
        assert torch.equal(tensor, high[key].to(tensor.dtype)), key


@pytest.fixture(scope="module")
def qlora_adapter(tiny_llama_dir, tmp_path_factory):
    """An adapter trained on the 4-bit (NF4) tiny model, three steps at a high rate so B is far from zero."""
    pytest.importorskip("bitsandbytes")
    out = tmp_path_factory.mktemp("export-qlora")
    cfg = TrainConfig(model=str(tiny_llama_dir), output_dir=str(out / "run"), max_steps=3, batch_size=2,
                      grad_accum=1, max_seq_length=64, lora_r=8, lr=5e-2, load_in_4bit=True)
    run_training(cfg, progress=False)
    return out / "run" / "last_checkpoint"


def _merge_report(folder):
    import json
    return json.loads((folder / "turbotune_merge.json").read_text())


def test_qlora_merge_keeps_the_trained_behaviour(tiny_llama_dir, qlora_adapter, tmp_path):
    """Merged by default into the NF4 base as training saw it: the same logits as the adapter on the 4-bit
    model (stock bitsandbytes layers); merged into the original weights: off by the amount the export reports."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from turbotune import FastModel
    from turbotune.export.merge import logit_difference, logits, probe_ids

    model4, _ = FastModel.from_pretrained(str(tiny_llama_dir), load_in_4bit=True, patch=False, verbose=False)
    ids = probe_ids(model4.config.vocab_size)
    on_nf4 = PeftModel.from_pretrained(model4, str(qlora_adapter)).train()  # train mode: bitsandbytes' CPU
    with torch.no_grad():                                  # inference path would repack and compute in bf16
        reference = on_nf4(input_ids=ids).logits.float()

    nf4 = export(qlora_adapter, tmp_path / "nf4", dtype="fp32")
    original = export(qlora_adapter, tmp_path / "original", dtype="fp32", merge_into="original")
    as_nf4 = logit_difference(logits(AutoModelForCausalLM.from_pretrained(str(nf4)), ids), reference)
    as_orig = logit_difference(logits(AutoModelForCausalLM.from_pretrained(str(original)), ids), reference)
    assert _merge_report(nf4)["merged_into"] == "nf4" and _merge_report(original)["merged_into"] == "original"
    assert as_nf4["relative"] < 1e-5                      # fp32: the trained behaviour, to rounding
    assert as_orig["relative"] > 100 * max(as_nf4["relative"], 1e-7)
    assert _merge_report(original)["logits_relative_diff"] == pytest.approx(as_orig["relative"], rel=1e-3)

    written = export(qlora_adapter, tmp_path / "bf16")   # the default: NF4, written in bf16
    report = _merge_report(written)
    assert report["dtype"] == "bfloat16" and report["logits_relative_diff"] < 1e-2  # bf16 rounding only


def _tensors(folder) -> dict:
    from safetensors.torch import load_file

    state = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state


def _same_export(streamed, in_memory, exact=True):
    """The same tensors (bit for bit, or fp32 within 1e-6), the same files beside them, the same merge report."""
    got, want = _tensors(streamed), _tensors(in_memory)
    assert sorted(got) == sorted(want)
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype, key
        if exact:
            assert torch.equal(got[key], tensor), key
        else:
            torch.testing.assert_close(got[key], tensor, rtol=0, atol=1e-6)
    others = {f.name for f in in_memory.iterdir() if not f.name.endswith(".safetensors")}
    assert others <= {f.name for f in streamed.iterdir()}
    ours, theirs = _merge_report(streamed), _merge_report(in_memory)
    assert ours.keys() == theirs.keys() and ours["dtype"] == theirs["dtype"]
    # The streamed probe runs the folder as written, loaded by transformers; the in-memory one the merged model
    # cast whole (its buffers too): in 16 bits they agree to that rounding (measured 0.0045 against 0.0045, bf16)
    rel = 1e-3 if ours["dtype"] == "float32" else 0.1
    assert ours["logits_max_abs_diff"] == pytest.approx(theirs["logits_max_abs_diff"], rel=rel, abs=1e-6)


@pytest.mark.parametrize("dtype", ["fp32", None])
def test_streamed_merge_is_the_in_memory_merge(adapter, tmp_path, capsys, dtype):
    """One base tensor at a time (stream_merge.py): the same weights as PEFT's merge_and_unload on the whole model,
    in fp32 and cast to bf16, with the same report; the in-memory merge is not what ran."""
    from turbotune.export.export import merge_adapter

    streamed = merge_adapter(adapter, tmp_path / "streamed", dtype=dtype)
    assert "merged in memory" not in capsys.readouterr().out
    in_memory = merge_adapter(adapter, tmp_path / "in-memory", dtype=dtype, streamed=False)
    _same_export(streamed, in_memory)


def test_streamed_merge_in_shards(adapter, tmp_path):
    """A shard size smaller than the model: several files and their index, loaded by transformers as one model."""
    import json

    from transformers import AutoModelForCausalLM

    from turbotune.export.export import merge_adapter

    whole = merge_adapter(adapter, tmp_path / "whole", dtype="fp32")
    sharded = merge_adapter(adapter, tmp_path / "sharded", dtype="fp32", max_shard_bytes=100_000)
    files = sorted(sharded.glob("*.safetensors"))
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(files) > 2 and set(index["weight_map"].values()) == {f.name for f in files}
    assert sorted(index["weight_map"]) == sorted(_tensors(whole))
    _same_export(sharded, whole)
    model = AutoModelForCausalLM.from_pretrained(str(sharded))
    for name, tensor in model.state_dict().items():
        if name in _tensors(whole):
            assert torch.equal(tensor, _tensors(whole)[name]), name


@pytest.mark.parametrize("into,dtype", [("auto", "fp32"), ("auto", None), ("original", "fp32")])
def test_streamed_qlora_merge_is_the_in_memory_merge(qlora_adapter, tmp_path, into, dtype):
    """Into the NF4 base: each 4-bit weight dequantised from bitsandbytes' own quantisation as the in-memory merge
    does, bit for bit; into the original weights likewise."""
    from turbotune.export.export import merge_adapter

    streamed = merge_adapter(qlora_adapter, tmp_path / "streamed", dtype=dtype, merge_into=into)
    in_memory = merge_adapter(qlora_adapter, tmp_path / "in-memory", dtype=dtype, merge_into=into, streamed=False)
    _same_export(streamed, in_memory)
    assert _merge_report(streamed)["merged_into"] == ("nf4" if into == "auto" else into)


def test_streamed_rslora_merge_is_the_in_memory_merge(tiny_llama_dir, tmp_path, capsys):
    """rsLoRA's scale alpha / sqrt(r), on the layers the adapter targets only."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from conftest import nonzero_lora_b
    from turbotune.export.export import merge_adapter

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir))
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "down_proj"], use_rslora=True)
    nonzero_lora_b(get_peft_model(model, config), std=0.2).save_pretrained(str(tmp_path / "rslora"))
    args = dict(base=str(tiny_llama_dir), dtype="fp32")
    streamed = merge_adapter(tmp_path / "rslora", tmp_path / "streamed", **args)
    assert "merged in memory" not in capsys.readouterr().out
    _same_export(streamed, merge_adapter(tmp_path / "rslora", tmp_path / "in-memory", streamed=False, **args))


def test_what_streaming_does_not_cover_is_merged_in_memory(tiny_llama_dir, tmp_path, capsys):
    """A DoRA adapter: merged by PEFT on the whole model, as before, and the line says why."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from conftest import nonzero_lora_b

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir))
    peft = nonzero_lora_b(get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True)))
    peft.save_pretrained(str(tmp_path / "dora"))
    out = export(tmp_path / "dora", tmp_path / "merged", base=str(tiny_llama_dir), dtype="fp32")
    assert "merged in memory (DoRA)" in capsys.readouterr().out
    assert _merge_report(out)["logits_relative_diff"] < 1e-5
