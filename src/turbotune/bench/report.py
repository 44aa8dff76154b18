"""The bench's report: per-method figures (tokens/s, MFU, cost, ratios to hf) and the markdown header and table
that BENCHMARKS.md quotes. Pure functions of the results and header dicts, so they are tested without a GPU."""
from __future__ import annotations

import math

from turbotune.bench.presets import max_rel_diff, median, ratio

GiB = 1024 ** 3
COLUMNS = ["method", "tokens/s", "s/step", "peak alloc GiB", "peak reserved GiB", "MFU", "first loss",
           "last loss", "cost", "× hf speed", "× hf memory", "max loss diff"]
# bench --gpus: the number of ranks after the method, the scaling efficiency last
GPUS_COLUMNS = COLUMNS[:1] + ["GPUs"] + COLUMNS[1:] + ["scaling"]


def summarise(results: list[dict], header: dict, flops: dict | None, matmul_rate: float | None) -> None:
    """Adds tokens/s, s/step, MFU, cost and the ratios vs hf to each ok result, in place. A bench --gpus row
    (r["gpus"]) counts its ranks' tokens, MFU and cost over its GPUs, is compared with hf on as many GPUs, and
    gets its scaling efficiency against the same method's 1-GPU row."""
    wl = header["workload"]
    for r in results:
        if r.get("status") != "ok":
            continue
        gpus = r.get("gpus") or 1
        timed = r["step_times_s"][wl["warmup"]:]
        r["s_per_step"] = median(timed)
        # --trainer sft|dpo counts the real (non-padding) tokens the trainer fed; else every step has the same tokens
        # (bench --gpus: every rank's)
        tokens = r.get("tokens_per_step", wl["tokens_per_step"])
        r["tokens_per_s"] = r.get("real_tokens_per_s") or tokens / r["s_per_step"]
        r["first_loss"] = r["losses"][0] if r["losses"] else None
        r["last_loss"] = r["losses"][-1] if r["losses"] else None
        r["losses_finite"] = all(math.isfinite(x) for x in r["losses"])
        r["peak_alloc_bytes_or_rss"] = r.get("peak_alloc_bytes") if r.get("memory_kind") == "cuda" \
            else r.get("peak_rss_bytes")
        r["model_flops_per_s"] = flops["total"] * r["tokens_per_s"] if flops else None
        r["mfu"] = ratio(r["model_flops_per_s"], matmul_rate * gpus if matmul_rate else None)
        r["cost_usd"] = r["s_per_step"] * header["cost_steps"] / 3600.0 * header["price_usd_per_gpu_hour"] * gpus
    ok = [r for r in results if r.get("status") == "ok"]
    for r in ok:
        hf = next((h for h in ok if h["method"] == "hf" and h.get("gpus") == r.get("gpus")), None)
        if r.get("gpus"):
            one = next((o for o in ok if o["method"] == r["method"] and o["gpus"] == 1), None)
            r["scaling_efficiency"] = ratio(r["tokens_per_s"], r["gpus"] * one["tokens_per_s"]) \
                if one and r["gpus"] > 1 else None
        r["speedup_vs_hf"] = ratio(r["tokens_per_s"], hf["tokens_per_s"]) if hf else None
        r["memory_ratio_vs_hf"] = ratio(r["peak_alloc_bytes_or_rss"], hf["peak_alloc_bytes_or_rss"]) if hf else None
        # turbotune-train packs its rows into other batches, and under grpo each method samples its own
        # completions: their losses are not step-for-step comparable
        same_batches = r["method"] != "turbotune-train" and header.get("mode") != "grpo"
        r["max_loss_rel_diff_vs_hf"] = max_rel_diff(r["losses"], hf["losses"]) if hf and same_batches else None


def _fmt(v, spec: str, suffix: str = "", none: str = "n/a") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return none
    return format(v, spec) + suffix


def si(value: float, unit: str) -> str:
    """1.23e12, 'FLOP/s' -> '1.23 TFLOP/s'."""
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def format_table(results: list[dict]) -> str:
    gpus = any("gpus" in r for r in results)  # bench --gpus: two more columns
    columns = GPUS_COLUMNS if gpus else COLUMNS
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(["---"] + ["---:"] * (len(columns) - 1)) + "|"]
    for r in results:
        if r.get("status") != "ok":
            why = r.get("reason") or r.get("error") or "unknown error"
            label = "skipped" if r.get("status") == "skipped" else "failed"
            why = why if len(why) <= 160 else why[:157] + "..."
            cells = [r["method"], f"{label}: {_cell(why)}"] + ["—"] * (len(COLUMNS) - 2)
        else:
            cuda = r.get("memory_kind") == "cuda"
            cells = [
                r["method"], _fmt(r["tokens_per_s"], ",.0f"), _fmt(r["s_per_step"], ".3f"),
                _fmt(r["peak_alloc_bytes_or_rss"] / GiB if r.get("peak_alloc_bytes_or_rss") else None, ".2f"),
                _fmt(r.get("peak_reserved_bytes", 0) / GiB if cuda else None, ".2f"),
                _fmt(r["mfu"] * 100 if r["mfu"] is not None else None, ".1f", "%"),
                _fmt(r["first_loss"], ".4f"), _fmt(r["last_loss"], ".4f"), _fmt(r["cost_usd"], ",.2f", "", "n/a"),
                _fmt(r.get("speedup_vs_hf"), ".2f", "×"), _fmt(r.get("memory_ratio_vs_hf"), ".2f", "×"),
                _fmt(r["max_loss_rel_diff_vs_hf"] * 100 if r.get("max_loss_rel_diff_vs_hf") is not None else None,
                     ".3f", "%"),
            ]
            if cells[8] != "n/a":
                cells[8] = "$" + cells[8]
        if gpus:
            cells.insert(1, str(r.get("gpus") or "—"))
            eff = r.get("scaling_efficiency")
            cells.append(_fmt(eff * 100 if eff is not None else None, ".1f", "%", "—"))
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"- {r['method']}: " + "; ".join(r["notes"]) for r in results if r.get("notes")]
    return "\n".join(lines + ([""] + notes if notes else []))


def format_header(header: dict) -> str:
    v, wl, dev = header["versions"], header["workload"], header["device"]
    mm = header.get("matmul") or {}
    vers = " · ".join(f"{k} {v.get(k) or '—'}" for k in ["torch", "cuda", "transformers", "peft", "triton",
                                                          "bitsandbytes", "turbotune"])
    extra = " · ".join(f"{k} {v[k]}" for k in ["unsloth", "liger-kernel"] if v.get(k))
    model = f"preset `{header['preset']}`" if header["preset"] else f"`{header['model_dir']}`"
    fpt = header.get("flops_per_token") or {}
    rate = (f"{si(mm['flops_per_s'], 'FLOP/s')} ({mm['dtype']} {mm['size']}³ matmul, median of {mm['reps']})"
            if mm.get("flops_per_s") else "n/a")
    mem = ("peak alloc / reserved = torch.cuda.max_memory_allocated / max_memory_reserved during training"
           if dev["type"] == "cuda" else "CPU run: 'peak alloc' is the worker's peak RSS; reserved is n/a")
    lines = [
        f"## turbotune bench — {model}{' (QLoRA 4-bit)' if wl['qlora'] else ' (LoRA)'}",
        "",
        f"- device: {dev['name']}",
        f"- versions: {vers}" + (f" · {extra}" if extra else ""),
        f"- date: {header['date_utc']}" + (f"; turbotune commit {header['source']}" if header.get("source") else ""),
        f"- command: `{header['command']}`",
        f"- model: {model}, model_type {header.get('model_type')}, dtype {wl['dtype']}",
        f"- workload: seq {wl['seq_len']} × micro-batch {wl['micro_batch']} × grad-accum {wl['grad_accum']} = "
        f"{wl['tokens_per_step']:,} tokens/step; {wl['steps']} steps ({wl['warmup']} warm-up, "
        f"{wl['timed_steps']} timed, median); LoRA r {wl['lora_r']} α {wl['lora_alpha']} on 7 projections; "
        f"AdamW lr {wl['lr']}; seed {wl['seed']}",
        f"- MFU denominator: {rate}; model FLOPs/token "
        + (f"{si(fpt['total'], 'FLOP')} (4·N_matmul + 6·P_lora + causal attention; recompute not counted)"
           if fpt else "n/a (config not understood)"),
        f"- cost: s/step × {header['cost_steps']} steps at ${header['price_usd_per_gpu_hour']}/GPU-hour; {mem}",
    ]
    if header.get("mode") == "packing":
        pk = header["packing"]
        lines[0] = lines[0].replace("## turbotune bench", "## turbotune bench --packing")
        lines[7:] = [f"- workload: {wl['steps']} optimizer steps ({wl['warmup']} warm-up) of {pk['samples_per_step']} "
                     f"samples each, lengths uniform in {pk['lengths'][0]}–{pk['lengths'][1]} tokens; padded: "
                     f"{pk['padded_micro_batch']} samples per micro-batch, padded to the longest; packed: "
                     f"{pk['packed_micro_batch']} rows of {pk['seq_len']} per micro-batch, first fit over the step's "
                     f"samples; each step's loss divided by its target count (the same in both modes); "
                     f"LoRA r {wl['lora_r']} α {wl['lora_alpha']}; "
                     f"seed {wl['seed']}"]
    if header.get("mode") == "sft":
        lines[0] = lines[0].replace("## turbotune bench", "## turbotune bench --trainer sft")
        lines[7] = lines[7].replace("tokens/step;", "tokens/step at most;")
        lines.insert(8, f"- trainer: TRL {v.get('trl') or '—'} SFTTrainer, SFTConfig defaults plus this workload, "
                        f"packing=False; lengths {header['sft']['lengths']}"
                        + (" (long-tailed: median ~150, 90th percentile ~600 tokens, padded per micro-batch by "
                           "TRL's collator)" if header["sft"]["lengths"] == "mixed" else "")
                        + "; tokens/s counts real (non-padding) tokens over the timed steps")
    if header.get("mode") == "dpo":
        _dpo_lines(lines, header["dpo"], wl, v.get("trl"))
    if header.get("mode") == "grpo":
        _grpo_lines(lines, header["grpo"], wl, v.get("trl"))
    if header.get("mode") == "max_context":  # a ladder of single steps: no throughput, MFU or cost
        lines[0] = lines[0].replace("## turbotune bench", "## turbotune bench --max-context")
        lines[7:] = [f"- workload: one forward + backward + AdamW step at micro-batch 1 per length "
                     f"({', '.join(f'{n:,}' for n in header['lengths'])} tokens), stopping at the first OOM; "
                     f"LoRA r {wl['lora_r']} α {wl['lora_alpha']} on 7 projections; seed {wl['seed']}",
                     "- fit: least squares through the longest three measured peaks; usable card memory = "
                     "(total − 1.5 GiB) × 0.95"]
    if header.get("gpus"):
        lines[0] = lines[0].replace("## turbotune bench", f"## turbotune bench --gpus {header['gpus']['count']}")
        lines.insert(8, _gpus_line(header["gpus"], wl, dev["type"]))
    # the allocator's settings change peak reserved memory (bench/NOTES.md); the switches change the rows
    env = ([f"PYTORCH_CUDA_ALLOC_CONF={header['alloc_conf']}"] if header.get("alloc_conf") else []) \
        + [f"{k}={v}" for k, v in (header.get("switches_env") or {}).items()]
    if env:
        after = next(i for i, line in enumerate(lines) if line.startswith("- command:")) + 1
        lines.insert(after, f"- environment: {' '.join(env)}")
    return "\n".join(lines)


def _dpo_lines(lines: list[str], d: dict, wl: dict, trl: str | None) -> None:
    """A --trainer dpo header: its title, pairs in the workload line (two sequences each), and the trainer's line:
    the pairs' lengths, what tokens/s and MFU count."""
    lines[0] = lines[0].replace("## turbotune bench", "## turbotune bench --trainer dpo")
    lines[7] = lines[7].replace(f"micro-batch {wl['micro_batch']} ×",
                                f"2 (chosen, rejected) × micro-batch {wl['micro_batch']} (pairs) ×").replace(
        f"= {wl['tokens_per_step']:,} tokens/step;", f"= {2 * wl['tokens_per_step']:,} tokens/step at most;")
    completions = (f"{d['max_completion_tokens']}" if d["lengths"] == "fixed" else
                   f"the long-tailed mix capped at {d['max_completion_tokens']}")
    lines.insert(8, f"- trainer: TRL {trl or '—'} DPOTrainer, DPOConfig defaults plus this workload, beta "
                    f"{d['beta']:g}, ref_model=None (each row's note names the reference TRL used); "
                    f"lengths {d['lengths']}: prompts {d['prompt_tokens']} tokens, completions {completions} (eos "
                    "included); tokens/s counts the real tokens of both sequences of each pair (the prompt twice) "
                    "over the timed steps; MFU adds the reference forward (2·N_matmul + 2·P_lora + attention "
                    "forward per token)")


def _grpo_lines(lines: list[str], g: dict, wl: dict, trl: str | None) -> None:
    """A --trainer grpo header: its title, completions in the workload line, and the trainer's line."""
    lines[0] = lines[0].replace("## turbotune bench", "## turbotune bench --trainer grpo")
    lines[7] = lines[7].replace(f"micro-batch {wl['micro_batch']} ×",
                                f"micro-batch {wl['micro_batch']} (completions) ×")
    lines.insert(8, f"- trainer: TRL {trl or '—'} GRPOTrainer, GRPOConfig defaults plus this workload, "
                    f"{g['num_generations']} completions per prompt sampled by transformers' generate at temperature "
                    f"{g['temperature']:g}; prompts {g['prompt_tokens']} tokens, every completion exactly "
                    f"{g['completion_tokens']} (min_new_tokens); reward: the share of lower-half token ids; "
                    "tokens/s counts prompt + completion of every completion over the timed steps, generation "
                    "included; MFU adds the generation forward (2·N_matmul + 2·P_lora + attention forward per "
                    "token); losses not compared (each method samples its own completions)")


def _gpus_line(g: dict, wl: dict, device: str) -> str:
    """The header line of a bench --gpus run: what a rank trains, what the N-rank row adds up."""
    n, how = g["count"], {"ddp": "data parallel (DDP)", "fsdp": "sharded data parallel (FSDP2)"}[g["parallel"]]
    where = "GPUs" if device == "cuda" else "CPU processes (gloo)"
    return (f"- {where}: each method on 1 and on {n}, {how}; every rank trains the workload above (its own batches), "
            f"so the {n}-rank step trains {n}× the sequences (global batch {g['sequences_per_step'][str(n)]} "
            f"sequences, {n * wl['tokens_per_step']:,} tokens); tokens/s counts all ranks, peak memory is the "
            f"largest rank's, losses are rank 0's; scaling = tokens/s({n}) / ({n} × tokens/s(1)); MFU and cost "
            f"count every {'GPU' if device == 'cuda' else 'rank'}")
