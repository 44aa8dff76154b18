"""`turbotune bench --gpus N`: each method on 1 rank and on N under torchrun (CPU ranks, gloo, here), one row per
run with all ranks' tokens/s, the largest rank's peak memory and the scaling efficiency; refused at once when the
GPUs are not there."""
from __future__ import annotations

import contextlib
import io
import json
import math
import sys
import time
from pathlib import Path
from unittest import mock

import pytest

from turbotune.bench import harness as bench
from turbotune.bench.multi_gpu import combine, rank_result_path

ARGS = ["--preset", "tiny", "--device", "cpu", "--gpus", "2", "--methods", "turbotune,hf,liger", "--steps", "2",
        "--warmup", "1", "--seq-len", "32", "--micro-batch", "1", "--grad-accum", "1"]


def _run(argv, json_path=None):
    """run_bench in this process (each run starts torchrun): (rc, stdout, json document or None)."""
    args = bench.build_parser().parse_args(argv + (["--json", str(json_path)] if json_path else []))
    out = io.StringIO()
    with mock.patch.object(sys, "argv", ["turbotune", "bench"] + argv), contextlib.redirect_stdout(out):
        rc = bench.run_bench(args)
    doc = json.loads(json_path.read_text()) if json_path and json_path.exists() else None
    return rc, out.getvalue(), doc


@pytest.fixture(scope="module")
def gpus_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench-gpus")
    t0 = time.perf_counter()
    rc, out, doc = _run(ARGS + ["--cache-dir", str(tmp / "cache")], tmp / "out.json")
    print(f"bench --gpus 2 (turbotune, hf; CPU): {time.perf_counter() - t0:.1f} s")
    return rc, out, doc


def _rows(doc, method):
    return {r["gpus"]: r for r in doc["methods"] if r["method"] == method}


def test_one_and_two_ranks_per_method_with_scaling(gpus_run):
    rc, out, doc = gpus_run
    assert rc == 0, out
    assert "## turbotune bench --gpus 2" in out
    assert "the 2-rank step trains 2× the sequences (global batch 2 sequences, 64 tokens)" in out
    assert "| method | GPUs | tokens/s | s/step |" in out and out.split("\n| method |")[1].split("\n")[0] \
        .endswith("| max loss diff | scaling |")
    for method in ("turbotune", "hf"):
        assert f"\n| {method} | 1 | " in out
        two = next(line for line in out.splitlines() if line.startswith(f"| {method} | 2 | "))
        assert two.endswith("% |")  # its scaling efficiency
    assert "| liger | — | skipped: " in out  # not a --gpus method (and not installed here)
    assert doc["header"]["gpus"] == {"count": 2, "parallel": "ddp", "sequences_per_step": {"1": 1, "2": 2}}


def test_json_has_every_rank_tokens_and_peak_memory(gpus_run):
    _, _, doc = gpus_run
    for method in ("turbotune", "hf"):
        rows = _rows(doc, method)
        one, two = rows[1], rows[2]
        assert one["status"] == two["status"] == "ok", (one.get("error"), two.get("error"))
        assert [r["rank"] for r in one["ranks"]] == [0] and [r["rank"] for r in two["ranks"]] == [0, 1]
        for r in two["ranks"]:
            assert r["tokens_per_step"] == 32 and r["tokens"] == 64 and r["peak_rss_bytes"] > 0
        assert two["tokens_per_step"] == 64 and two["tokens"] == 128
        assert two["peak_rss_bytes"] == max(r["peak_rss_bytes"] for r in two["ranks"])
        assert two["tokens_per_s"] == pytest.approx(64 / two["s_per_step"])
        assert two["scaling_efficiency"] == pytest.approx(two["tokens_per_s"] / (2 * one["tokens_per_s"]))
        assert "scaling_efficiency" in one and one["scaling_efficiency"] is None
        # rank 0 trains the 1-rank run's batches (the same first loss), rank 1 its own
        assert two["losses"] == two["ranks"][0]["losses"] and len(two["losses"]) == 2
        assert two["losses"][0] == pytest.approx(one["losses"][0], rel=1e-6)
        assert two["ranks"][1]["losses"][0] != pytest.approx(two["losses"][0], rel=1e-6)
        assert all(math.isfinite(x) for r in two["ranks"] for x in r["losses"])
    hf, ours = _rows(doc, "hf")[2], _rows(doc, "turbotune")[2]
    assert any("torch DDP over 2 ranks" in n for n in hf["notes"])
    assert any("turbotune's DDP over 2 ranks" in n for n in ours["notes"])
    # both step on the mean gradient of the same 2 ranks' batches: torch DDP and turbotune's all-reduce agree
    assert ours["losses"] == pytest.approx(hf["losses"], rel=1e-4)
    assert ours["speedup_vs_hf"] == pytest.approx(ours["tokens_per_s"] / hf["tokens_per_s"])  # hf on as many


def test_too_few_gpus_is_refused_before_anything_loads(monkeypatch, tmp_path, capsys):
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() >= 2:
        pytest.skip("this machine has 2 GPUs")
    monkeypatch.setattr(bench, "prepare_model", mock.Mock(side_effect=AssertionError("loaded a model")))
    t0 = time.perf_counter()
    rc, out, _ = _run(["--preset", "tiny", "--device", "cuda", "--gpus", "2", "--cache-dir", str(tmp_path / "c")])
    assert rc == 2 and out == ""
    err = capsys.readouterr().err
    assert f"--gpus 2 needs 2 CUDA GPUs, but torch sees {torch.cuda.device_count()}" in err
    assert "--device cpu" in err and time.perf_counter() - t0 < 10
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("argv, message", [
    (["--gpus", "1"], "--gpus N compares 1 GPU with N: N must be at least 2"),
    (["--parallel", "fsdp"], "--parallel goes with --gpus N"),
    (["--gpus", "2", "--packing"], "--gpus measures the throughput run; run --packing without --gpus"),
])
def test_gpus_usage_errors(argv, message, capsys):
    rc, _, _ = _run(["--device", "cpu"] + argv)
    assert rc == 2 and message in capsys.readouterr().err


def test_first_rank_to_fail_names_the_row(tmp_path):
    """A rank's own error (the earliest) over the others' broken collectives; a run no rank reported on keeps
    run_worker's error."""
    rank0 = {"method": "hf", "status": "failed", "phase": "train", "end_time": 20.0, "losses": [], "step_times_s": [],
             "error": "RuntimeError: Connection closed by peer"}
    Path(rank_result_path(str(tmp_path / "hf.result.json"), 1)).write_text(json.dumps(
        {"method": "hf", "status": "failed", "phase": "train", "end_time": 10.0, "error": "OutOfMemoryError: CUDA"}))
    row = combine(rank0, tmp_path, 2, "ddp")
    assert row["status"] == "failed" and row["error"] == "rank 1 of 2: OutOfMemoryError: CUDA"
    assert [r["status"] for r in row["ranks"]] == ["failed", "failed"]
    lost = {"method": "hf", "status": "failed", "error": "timed out after 60 s", "losses": [], "step_times_s": []}
    row = combine(lost, tmp_path / "none", 2, "ddp")
    assert row["error"] == "timed out after 60 s"
    killed = dict(lost, error="[hf] =====", output_tail=["[hf]   exitcode  : -9 (pid: 7)", "[hf] ====="])
    assert combine(killed, tmp_path / "none", 2, "ddp")["error"] == \
        "a rank ended without a result (torchrun: exitcode  : -9 (pid: 7))"
    table = bench.format_table([row])
    assert "| hf | 2 | failed: timed out after 60 s |" in table and table.splitlines()[0].endswith("| scaling |")


def test_fsdp_rows_step_as_ddp_does(gpus_run, tmp_path):
    """--parallel fsdp (FSDP2, sum reduce-scatter then the mean): rank 0's losses are DDP's, each rank holds half."""
    rc, out, doc = _run(ARGS[:ARGS.index("--methods")] + ["--parallel", "fsdp", "--methods", "hf"]
                        + ARGS[ARGS.index("--methods") + 2:] + ["--cache-dir", str(tmp_path / "cache")],
                        tmp_path / "fsdp.json")
    assert rc == 0, out
    assert "sharded data parallel (FSDP2)" in out
    one, two = _rows(doc, "hf")[1], _rows(doc, "hf")[2]
    assert two["parallel"] == "fsdp" and [r["rank"] for r in two["ranks"]] == [0, 1]
    assert any("2 decoder layers and the root sharded" in n for n in two["notes"])
    assert two["losses"] == pytest.approx(_rows(gpus_run[2], "hf")[2]["losses"], rel=1e-4)
    assert two["losses"][0] == pytest.approx(one["losses"][0], rel=1e-6)


def test_methods_without_gpus_rows():
    from turbotune.bench.multi_gpu import not_parallel

    args = bench.build_parser().parse_args(["--gpus", "2", "--parallel", "fsdp", "--qlora"])
    assert "4-bit" in not_parallel("turbotune", args) and not_parallel("turbotune-bf16", args) is None
    assert "not run with --gpus" in not_parallel("unsloth", args)
    assert not_parallel("hf", bench.build_parser().parse_args(["--gpus", "2", "--qlora"])) is None
