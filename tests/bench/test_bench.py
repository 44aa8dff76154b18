"""turbotune bench: the arithmetic, the error paths, and one real end-to-end run on the tiny preset (CPU)."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
import subprocess
import sys
from unittest import mock

import pytest

from turbotune.bench import harness as bench
from turbotune.bench.presets import (
    METHODS,
    PRESETS,
    MethodInfo,
    flops_per_token,
    make_batches,
    max_rel_diff,
    median,
    ratio,
)
from turbotune.planner.predict import model_shape

TINY_ARGS = ["--preset", "tiny", "--device", "cpu", "--steps", "3", "--warmup", "1", "--seq-len", "64",
             "--micro-batch", "2", "--grad-accum", "2"]


def _turbotune_importable() -> bool:
    try:
        from turbotune import FastModel  # noqa: F401
        return True
    except Exception:
        return False


def _run(argv, json_path=None):
    """run_bench in this process; returns (rc, stdout, json document or None)."""
    args = bench.build_parser().parse_args(argv + (["--json", str(json_path)] if json_path else []))
    out = io.StringIO()
    with mock.patch.object(sys, "argv", ["turbotune", "bench"] + argv), contextlib.redirect_stdout(out):
        rc = bench.run_bench(args)
    doc = json.loads(json_path.read_text()) if json_path and json_path.exists() else None
    return rc, out.getvalue(), doc


# ---------------------------------------------------------------------------------------------------------
# Arithmetic
# ---------------------------------------------------------------------------------------------------------
def test_flops_per_token_smollm2_by_hand():
    dims = model_shape(PRESETS["smollm2-135m"])
    assert (dims.layers, dims.hidden, dims.heads, dims.kv_heads, dims.head_dim) == (30, 576, 9, 3, 64)
    f = flops_per_token(dims, seq_len=2048, lora_r=16)
    # per layer: q 576·576 + k,v 2·576·192 + o 576·576 + gate,up,down 3·576·1536 = 3,538,944
    per_layer = 576 * 576 + 2 * 576 * 192 + 576 * 576 + 3 * 576 * 1536
    assert per_layer == 3_538_944
    n_matmul = 30 * per_layer + 576 * 49152  # + LM head (tied embeddings still cost a matmul)
    assert f["n_matmul"] == n_matmul == 134_479_872
    # LoRA r=16: r·(in+out) for each of the seven projections, 30 layers
    p_lora = 30 * 16 * ((576 + 576) * 2 + (576 + 192) * 2 + (576 + 1536) * 3)
    assert f["lora_params"] == p_lora == 4_884_480
    attention = 6 * 2048 * 576 * 30  # (4 fwd + 8 bwd)·seq·d·L, halved for the causal mask
    assert f["attention"] == attention
    assert f["total"] == 4 * n_matmul + 6 * p_lora + attention == 779_563_008
    assert f["full_finetune_total"] == 6 * n_matmul + attention


def test_flops_per_token_uses_heads_times_head_dim_and_gqa():
    cfg = {"num_hidden_layers": 1, "hidden_size": 8, "intermediate_size": 16, "num_attention_heads": 2,
           "num_key_value_heads": 1, "head_dim": 8, "vocab_size": 10}
    f = flops_per_token(model_shape(cfg), seq_len=4, lora_r=2)
    # q 8->16, k,v 8->8, o 16->8, gate/up 8->16, down 16->8, head 8->10
    assert f["n_matmul"] == 128 + 64 + 64 + 128 + 3 * 128 + 80
    assert f["lora_params"] == 2 * (24 + 16 + 16 + 24 + 3 * 24)
    assert f["attention"] == 6 * 4 * 16 * 1


def test_median_ratio_and_loss_diff():
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([4, 1, 3, 2]) == 2.5
    with pytest.raises(ValueError):
        median([])
    assert ratio(3.0, 2.0) == 1.5
    assert ratio(1.0, 0.0) is None and ratio(None, 1.0) is None and ratio(1.0, None) is None
    assert max_rel_diff([1.0, 2.2], [1.0, 2.0]) == pytest.approx(0.1)
    assert max_rel_diff([1.0], [1.0, 5.0]) == 0.0  # common prefix only
    assert max_rel_diff([], [1.0]) is None


def test_summarise_tokens_cost_mfu_and_ratios():
    header = {"workload": {"warmup": 1, "tokens_per_step": 1000}, "cost_steps": 3600,
              "price_usd_per_gpu_hour": 2.0}
    hf = {"method": "hf", "status": "ok", "step_times_s": [9.0, 2.0, 1.0, 3.0], "losses": [5.0, 4.0, 3.0, 2.0],
          "memory_kind": "cuda", "peak_alloc_bytes": 4 * 2 ** 30, "peak_reserved_bytes": 5 * 2 ** 30}
    tt = {"method": "turbotune", "status": "ok", "step_times_s": [30.0, 1.0, 1.0, 1.0],
          "losses": [5.0, 4.4, 3.0, 2.0], "memory_kind": "cuda", "peak_alloc_bytes": 2 ** 30,
          "peak_reserved_bytes": 2 ** 30}
    skipped = {"method": "unsloth", "status": "skipped", "reason": "package 'unsloth' is not installed"}
    results = [hf, tt, skipped]
    bench.summarise(results, header, {"total": 1e9}, matmul_rate=1e12)
    assert hf["s_per_step"] == 2.0 and hf["tokens_per_s"] == 500.0  # median of the timed steps [2, 1, 3]
    assert tt["s_per_step"] == 1.0 and tt["tokens_per_s"] == 1000.0
    assert hf["mfu"] == pytest.approx(0.5) and tt["mfu"] == pytest.approx(1.0)
    assert hf["cost_usd"] == pytest.approx(2.0 * 3600 / 3600 * 2.0)
    assert tt["speedup_vs_hf"] == pytest.approx(2.0) and tt["memory_ratio_vs_hf"] == pytest.approx(0.25)
    assert tt["max_loss_rel_diff_vs_hf"] == pytest.approx(0.1)
    table = bench.format_table(results)
    assert "| turbotune | 1,000 | 1.000 | 1.00 | 1.00 | 100.0% |" in table
    assert "2.00×" in table and "0.25×" in table
    assert "| unsloth | skipped: package 'unsloth' is not installed |" in table


def test_batches_are_seeded_and_in_range():
    a = make_batches(7, 4, 2, 16, 50)
    b = make_batches(7, 4, 2, 16, 50)
    assert a.shape == (4, 2, 16) and bool((a == b).all())
    assert int(a.min()) >= 0 and int(a.max()) < 50
    assert not bool((make_batches(8, 4, 2, 16, 50) == a).all())


def test_preset_configs_build():
    from transformers import AutoConfig

    for name, cfg in PRESETS.items():
        cfg = dict(cfg)
        config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        assert config.vocab_size == cfg["vocab_size"], name
        rope = getattr(config, "rope_parameters", None) or {}
        rope = rope.get("full_attention", rope)  # Gemma 3: one RoPE per layer type (global layers: rope_theta)
        theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
        assert theta == cfg["rope_theta"], name
    llama = dict(PRESETS["llama3-8b"])
    config = AutoConfig.for_model(llama.pop("model_type"), **llama)
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    assert rope["rope_type"] == "llama3" and rope["factor"] == 8.0
    assert model_shape(PRESETS["llama3-8b"]).head_dim == 128
    assert model_shape(PRESETS["qwen2-1.5b"]).head_dim == 128


# ---------------------------------------------------------------------------------------------------------
# Errors and skips (no worker starts)
# ---------------------------------------------------------------------------------------------------------
def test_skipped_method_when_package_is_missing(monkeypatch, tmp_path, capsys):
    fake = MethodInfo("fakeaccel", ("turbotune_no_such_package_xyz",), gpu_only=True)
    monkeypatch.setitem(METHODS, "fakeaccel", fake)
    rc, out, doc = _run(["--preset", "tiny", "--device", "cpu", "--methods", "fakeaccel",
                         "--cache-dir", str(tmp_path / "cache")], tmp_path / "skip.json")
    assert rc == 0
    assert "| fakeaccel | skipped: package 'turbotune_no_such_package_xyz' is not installed |" in out
    (m,) = doc["methods"]
    assert m["status"] == "skipped" and "turbotune_no_such_package_xyz" in m["reason"]
    assert not (tmp_path / "cache").exists()  # nothing was built for a run with nothing to run


def test_default_methods_leave_out_missing_optional_ones():
    names = [n for n, _ in bench.resolve_methods(None, "cpu")]
    assert names == ["hf", "turbotune"]


@pytest.mark.parametrize("argv, message", [
    (["--preset", "gpt5"], "unknown preset 'gpt5'; choose one of: tiny, smollm2-135m, qwen2-1.5b, llama3-8b"),
    (["--methods", "hf,vllm"], "unknown method(s) vllm"),
    (["--steps", "2", "--warmup", "2"], "--warmup (2) must be at least 0 and below --steps (2)"),
])
def test_usage_errors(argv, message, capsys):
    rc, _, _ = _run(["--device", "cpu"] + argv)
    assert rc == 2
    assert message in capsys.readouterr().err


def test_cuda_without_gpu_is_a_clear_error(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    rc, _, _ = _run(["--device", "cuda", "--preset", "tiny"])
    assert rc == 2
    assert "--device cuda asked for, but torch sees no CUDA GPU" in capsys.readouterr().err


def test_qlora_without_bitsandbytes_is_a_clear_error(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    rc, _, _ = _run(["--device", "cpu", "--qlora"])
    assert rc == 2
    assert "--qlora needs bitsandbytes" in capsys.readouterr().err


def test_module_entry_point_help():
    proc = subprocess.run([sys.executable, "-m", "turbotune.bench.harness", "--help"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and "--seq-len" in proc.stdout and "--methods" in proc.stdout


# ---------------------------------------------------------------------------------------------------------
# The real thing, end to end, on the tiny preset (each method in its own worker process)
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    methods = "hf,turbotune" if _turbotune_importable() else "hf"
    rc, out, doc = _run(TINY_ARGS + ["--methods", methods, "--cache-dir", str(tmp / "cache")], tmp / "out.json")
    return {"rc": rc, "out": out, "doc": doc, "methods": methods}


def _ok(doc, name):
    (m,) = [m for m in doc["methods"] if m["method"] == name]
    assert m["status"] == "ok", m.get("error") or m.get("reason")
    return m


def test_end_to_end_hf(tiny_run):
    out, doc = tiny_run["out"], tiny_run["doc"]
    assert "| method | tokens/s | s/step | peak alloc GiB | peak reserved GiB | MFU |" in out
    assert "\n| hf | " in out
    hf = _ok(doc, "hf")
    assert hf["tokens_per_s"] > 0 and hf["s_per_step"] > 0
    assert len(hf["losses"]) == 3 and len(hf["step_times_s"]) == 3
    assert all(math.isfinite(x) for x in hf["losses"])
    assert 0 < hf["losses"][0] < 2 * math.log(512)  # random init, random tokens: about ln(vocab)
    assert hf["peak_rss_bytes"] > 0 and hf["memory_kind"] == "rss"
    assert hf["speedup_vs_hf"] == pytest.approx(1.0) and hf["max_loss_rel_diff_vs_hf"] == 0.0
    assert hf["trainable_params"] == doc["header"]["flops_per_token"]["lora_params"]
    assert hf["mfu"] is not None and hf["mfu"] > 0
    # the header records versions, the command and the workload
    h = doc["header"]
    for pkg in ("torch", "transformers", "peft"):
        assert h["versions"][pkg], pkg
    assert "turbotune" in h["versions"] and "bitsandbytes" in h["versions"]
    assert h["workload"]["tokens_per_step"] == 2 * 64 * 2 and h["workload"]["timed_steps"] == 2
    assert h["command"].startswith("turbotune bench --preset tiny")
    assert h["matmul"]["flops_per_s"] > 0
    assert f"transformers {h['versions']['transformers']}" in out and "date:" in out
    assert doc["schema"] == "turbotune.bench.harness/1"


def test_end_to_end_turbotune_matches_hf(tiny_run):
    if "turbotune" not in tiny_run["methods"]:
        pytest.importorskip("turbotune.fast_model", reason="turbotune.FastModel is not importable yet")
        pytest.skip("turbotune.FastModel is not importable yet")
    doc, out = tiny_run["doc"], tiny_run["out"]
    assert "\n| turbotune | " in out
    hf, tt = _ok(doc, "hf"), _ok(doc, "turbotune")
    assert tt["tokens_per_s"] > 0
    assert all(math.isfinite(x) for x in tt["losses"])
    # same weights, same batches: the first step's loss (LoRA B = 0) is the base model's loss
    assert tt["losses"][0] == pytest.approx(hf["losses"][0], rel=1e-4)
    assert tt["trainable_params"] == hf["trainable_params"]
    assert tt["speedup_vs_hf"] is not None and tt["memory_ratio_vs_hf"] is not None


def test_worker_bootstrap_imports_first_then_runs_the_worker():
    """unsloth's worker imports unsloth before turbotune/transformers and still parses --spec."""
    cmd = bench.worker_command("hf", "SPEC.json", pre_import=("json",))
    assert cmd[1] == "-c" and cmd[-2:] == ["--spec", "SPEC.json"]
    proc = subprocess.run(cmd[:3] + ["--help"], capture_output=True, text=True, timeout=60, env=bench._worker_env())
    assert proc.returncode == 0 and "--spec" in proc.stdout, proc.stderr
    assert bench.worker_command("hf", "S.json")[1:3] == ["-m", "turbotune.bench.worker"]
    assert bench.worker_command("unsloth", "S.json")[2].index("import unsloth") < \
        bench.worker_command("unsloth", "S.json")[2].index("runpy")


def test_worker_that_dies_is_reported_failed_with_its_last_line(monkeypatch, tmp_path):
    """A worker killed before writing its result (a segfault, the OOM killer) still yields a row."""
    monkeypatch.setattr(bench, "worker_command", lambda method, spec_path: [
        sys.executable, "-c", "import sys; print('loading...'); print('fatal: device lost'); sys.exit(3)"])
    r = bench.run_worker("hf", {"device": "cpu"}, tmp_path, timeout=60)
    assert r["status"] == "failed" and r["error"] == "fatal: device lost" and r["returncode"] == 3
    monkeypatch.setattr(bench, "worker_command", lambda method, spec_path: [
        sys.executable, "-c", "import time; time.sleep(30)"])
    r = bench.run_worker("hf", {"device": "cpu"}, tmp_path, timeout=1)
    assert r["status"] == "failed" and "timed out" in r["error"]
    results = [r, {"method": "turbotune", "status": "ok", "step_times_s": [1.0, 1.0], "losses": [1.0, 1.0],
                   "memory_kind": "rss", "peak_rss_bytes": 2 ** 30}]
    bench.summarise(results, {"workload": {"warmup": 1, "tokens_per_step": 10}, "cost_steps": 1,
                              "price_usd_per_gpu_hour": 1.0}, None, None)
    table = bench.format_table(results)
    assert "| hf | failed: timed out after 1 s |" in table
    assert "| turbotune | 10 | 1.000 | 1.00 | n/a | n/a |" in table  # no hf row to compare with: ratios n/a


def test_error_line_keeps_the_exception_type():
    from turbotune.bench.worker import _last_line

    try:
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")
    except RuntimeError as exc:
        assert _last_line(exc) == "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"


def test_qlora_run_has_a_16bit_turbotune_row(tmp_path):
    """--qlora with turbotune-bf16: the same run holds the 4-bit rows and a 16-bit reference row."""
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "q.json"
    rc = bench.main(["--preset", "tiny", "--device", "cpu", "--qlora", "--methods", "turbotune,turbotune-bf16",
                     "--steps", "2", "--warmup", "1", "--seq-len", "32", "--micro-batch", "1", "--grad-accum", "1",
                     "--cache-dir", str(tmp_path / "cache"), "--json", str(out)])
    assert rc == 0
    rows = {m["method"]: m for m in json.loads(out.read_text())["methods"]}
    assert rows["turbotune"]["status"] == rows["turbotune-bf16"]["status"] == "ok"
    assert any("16-bit base" in n for n in rows["turbotune-bf16"]["notes"])
    assert not any("16-bit base" in n for n in rows["turbotune"]["notes"])
    assert rows["turbotune-bf16"]["total_params"] > rows["turbotune"]["total_params"]  # 4-bit packs 2 per byte


def test_trainer_sft_mixed_lengths_with_profile(tmp_path):
    """`--trainer sft --lengths mixed`: every method trained by TRL's SFTTrainer on the same rows, real tokens/s,
    the same losses, and with --profile one extra (untimed) step under torch.profiler."""
    pytest.importorskip("trl")
    rc, out, doc = _run(TINY_ARGS + ["--trainer", "sft", "--lengths", "mixed", "--methods", "hf,turbotune",
                                     "--cache-dir", str(tmp_path / "cache"), "--profile", str(tmp_path / "prof")],
                        tmp_path / "sft.json")
    assert rc == 0 and "## turbotune bench --trainer sft" in out and "lengths mixed" in out
    hf, ours = _ok(doc, "hf"), _ok(doc, "turbotune")
    for m in (hf, ours):
        assert len(m["losses"]) == len(m["step_times_s"]) == 3 and m["real_tokens_per_s"] > 0
        assert (tmp_path / "prof" / f"profile-{m['method']}.txt").is_file()
    assert hf["real_tokens_per_step"] == ours["real_tokens_per_step"]       # the same rows, the same order
    assert max_rel_diff(ours["losses"], hf["losses"]) < 1e-5
    for m in (hf, ours):  # the optimizer that ran, named (a library may change TRL's default)
        assert any(n.startswith("optimizer torch AdamW") and "weight decay 0" in n for n in m["notes"]), m["notes"]


def test_trainer_sft_optim_reaches_every_method(tmp_path):
    """--optim is the optimizer every row's TRL config names (as a tutorial script writes it); the rows say so."""
    pytest.importorskip("trl")
    rc, out, doc = _run(TINY_ARGS + ["--trainer", "sft", "--methods", "hf,turbotune", "--optim", "sgd",
                                     "--cache-dir", str(tmp_path / "cache")], tmp_path / "sgd.json")
    assert rc == 0
    hf, ours = _ok(doc, "hf"), _ok(doc, "turbotune")
    for m in (hf, ours):
        assert any(n.startswith("optimizer torch SGD (optim=sgd)") for n in m["notes"]), m["notes"]
    assert max_rel_diff(ours["losses"], hf["losses"]) < 1e-5


def test_trainer_sft_own_trainer_row_on_the_same_length_mix(tmp_path, capsys):
    """`turbotune-train` under --trainer sft: turbotune's own Trainer packs rows of the same mix into full rows
    (each step nearly --seq-len x micro-batch x accumulation real tokens); its losses are not
    compared step for step (other batches); elsewhere the method is refused."""
    pytest.importorskip("trl")
    rc, out, doc = _run(TINY_ARGS + ["--trainer", "sft", "--lengths", "mixed", "--methods", "turbotune,turbotune-train",
                                     "--cache-dir", str(tmp_path / "cache")], tmp_path / "own.json")
    assert rc == 0
    sft, own = _ok(doc, "turbotune"), _ok(doc, "turbotune-train")
    assert len(own["losses"]) == len(own["step_times_s"]) == 3 and own["real_tokens_per_s"] > 0
    assert min(own["real_tokens_per_step"]) >= 0.8 * 2 * 2 * 64  # packed: rows of 64 nearly full
    assert sum(own["real_tokens_per_step"]) >= sum(sft["real_tokens_per_step"])
    assert own["max_loss_rel_diff_vs_hf"] is None and any("packed into rows" in n for n in own["notes"])
    capsys.readouterr()
    assert bench.main(TINY_ARGS + ["--methods", "turbotune-train", "--cache-dir", str(tmp_path / "cache")]) != 0
    assert "--trainer sft" in capsys.readouterr().err


def test_unsloth_block_compile_failure_runs_it_again_without(monkeypatch, tmp_path):
    """Unsloth's per-layer compile failing in torch's compiler (gemma2-9b, torch 2.11): the row runs again with
    UNSLOTH_BLOCK_COMPILE=0 and says so; other failures and other methods are reported as they are."""
    calls = []

    def fake(method, spec, workdir, timeout, command=None, env=None):
        calls.append((method, env))
        if method == "unsloth" and not env:
            return {"method": method, "status": "failed", "error": "torch._inductor.exc.InductorError: AssertionError:"}
        return {"method": method, "status": "ok" if method == "unsloth" else "failed", "error": "InductorError"}

    monkeypatch.setattr(bench, "run_worker", fake)
    monkeypatch.delenv("UNSLOTH_BLOCK_COMPILE", raising=False)
    args = mock.Mock(packing=False, timeout=10)
    results = bench.run_methods(args, [("unsloth", None), ("hf", None)], {"device": "cuda"})
    assert calls == [("unsloth", None), ("unsloth", {"UNSLOTH_BLOCK_COMPILE": "0"}), ("hf", None)]
    assert results[0]["status"] == "ok" and "UNSLOTH_BLOCK_COMPILE=0" in results[0]["notes"][0]
    assert "InductorError" in results[0]["notes"][0] and results[1]["status"] == "failed"
