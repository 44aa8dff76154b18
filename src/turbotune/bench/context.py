"""`turbotune bench --max-context`: how long a sequence each method can train on one card.

Per method (each in its own worker process, as for throughput), at a ladder of sequence lengths with
micro-batch 1: one forward + backward + optimizer step, and its peak allocated GPU memory. The ladder stops
at the first out-of-memory. A straight line through the measured peaks (least squares: peak = a + b·L, the
per-token slope b) predicts the longest sequence that fits a card of a given size; `--confirm` then runs one
full step at that length to check the prediction. For turbotune rows the planner's prediction (planner.py)
is shown beside each measured peak, so the planner is checked at the same time.

Usable memory of a card (what the fit is solved against): its total, minus 1.5 GiB for the CUDA context and
cuBLAS / cuDNN workspaces that live outside the allocator's peak, times 0.95 for fragmentation.
"""
from __future__ import annotations

import gc
import time

GiB = 1024 ** 3
CONTEXT_RESERVE_BYTES = int(1.5 * GiB)
FRAGMENTATION_MARGIN = 0.95
CONFIRM_ROUND = 1024  # confirm at the predicted length rounded down to a multiple of this


# ----------------------------------------------------------------------------------------------------------
# Arithmetic (used by the worker and by the parent's table)
# ----------------------------------------------------------------------------------------------------------
def fit_line(points: list[tuple[float, float]]) -> tuple[float, float] | None:
    """Least-squares (intercept, slope) of y over x; None with fewer than two distinct x."""
    if len({x for x, _ in points}) < 2:
        return None
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    sxy = sum((x - mx) * (y - my) for x, y in points)
    slope = sxy / sxx
    return my - slope * mx, slope


def usable_bytes(card_bytes: int) -> int:
    return int(max(0, card_bytes - CONTEXT_RESERVE_BYTES) * FRAGMENTATION_MARGIN)


def predict_max_tokens(fit: tuple[float, float] | None, card_bytes: int) -> int | None:
    """Longest L with intercept + slope·L within the card's usable memory (None if the fit can't say)."""
    if fit is None:
        return None
    a, b = fit
    if b <= 0:
        return None
    return max(0, int((usable_bytes(card_bytes) - a) // b))


def parse_lengths(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip().lower().replace("_", "")
        if not part:
            continue
        mult = 1024 if part.endswith("k") else 1
        value = int(float(part.rstrip("k")) * mult)
        if value < 1:
            raise ValueError(f"sequence lengths must be positive, got {part!r}")
        out.append(value)
    if not out:
        raise ValueError("no sequence lengths given")
    return sorted(set(out))


def parse_memory(text: str) -> int:
    """'80GB', '80GiB', '80' (GiB) -> bytes. GB is read as GiB, as cards are sold ('80 GB' H100 = 80 GiB)."""
    t = text.strip().lower().replace(" ", "")
    for suffix in ("gib", "gb", "g"):
        if t.endswith(suffix):
            t = t[: -len(suffix)]
            break
    return int(float(t) * GiB)


# ----------------------------------------------------------------------------------------------------------
# Worker side
# ----------------------------------------------------------------------------------------------------------
def _free(cuda: bool) -> None:
    import torch

    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _one_step(model, opt, ids, cuda: bool) -> tuple[float, float, int | None]:
    """(loss, seconds, peak allocated bytes) of one forward + backward + optimizer step on `ids`."""
    import torch

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return float(loss.detach().float()), dt, (int(torch.cuda.max_memory_allocated()) if cuda else None)


def run_max_context(model, spec: dict, result: dict, log) -> None:
    """The ladder, the fit and (with spec['confirm']) the confirming step; fills result['context']."""
    import torch

    from turbotune.bench.presets import make_batches

    method, cuda = spec["method"], spec["device"] == "cuda"
    device = spec["device"]
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec["lr"], **({"fused": True} if cuda else {}))
    card = spec.get("card_memory_bytes") or (torch.cuda.get_device_properties(0).total_memory if cuda else None)
    points = []
    ctx = {"points": points, "card_memory_bytes": card}
    result["context"] = ctx

    from turbotune.model.checkpointing import get_offloaded_checkpointing
    offloader = get_offloaded_checkpointing(model)  # None unless the method offloads

    def attempt(length: int) -> dict:
        mode = layers = None
        if method == "turbotune-auto":
            from turbotune.training.auto_checkpointing import plan_checkpointing
            choice = plan_checkpointing(model, length, 1, budget_bytes=card)  # plan for the card asked about
            mode, layers = choice.mode, choice.layers
        elif method.startswith("turbotune"):
            mode = "offload" if method == "turbotune-min-memory" else "recompute"
        elif method in ("hf", "liger", "unsloth"):
            mode = "recompute"
        ids = make_batches(spec["seed"], 1, 1, length, spec["vocab_size"])[0].to(device)
        _free(cuda)
        host_before = offloader.stats["offloaded_bytes"] if offloader is not None else None
        try:
            loss, dt, peak = _one_step(model, opt, ids, cuda)
        except torch.OutOfMemoryError as exc:
            del ids
            opt.zero_grad(set_to_none=True)
            _free(cuda)
            return {"seq_len": length, "status": "oom", "checkpointing": mode, "checkpointed_layers": layers,
                    "error": str(exc).splitlines()[0][:200]}
        log(method, f"seq {length:,}: peak {peak / GiB if peak else float('nan'):.2f} GiB, {dt:.2f} s, "
                    f"loss {loss:.4f}")
        host = offloader.stats["offloaded_bytes"] - host_before if offloader is not None else None
        return {"seq_len": length, "status": "ok", "checkpointing": mode, "checkpointed_layers": layers,
                "peak_alloc_bytes": peak, "step_s": dt,
                "loss": loss, "tokens_per_s": length / dt, "host_offloaded_bytes": host}

    for length in spec["lengths"]:
        p = attempt(length)
        points.append(p)
        if p["status"] != "ok":
            log(method, f"seq {length:,}: out of memory; longer lengths skipped")
            break
    good = [p for p in points if p["status"] == "ok" and p["peak_alloc_bytes"]]
    # The longest three, where the per-token terms dominate the fixed ones, and only points measured in the
    # longest one's checkpointing mode (turbotune-auto changes mode along the ladder).
    same = [p for p in good if (p["checkpointing"], p.get("checkpointed_layers"))
            == (good[-1]["checkpointing"], good[-1].get("checkpointed_layers"))] if good else []
    fit = fit_line([(p["seq_len"], p["peak_alloc_bytes"]) for p in same[-3:]])
    ctx["fit"] = {"intercept_bytes": fit[0], "slope_bytes_per_token": fit[1]} if fit else None
    ctx["predicted_max_tokens"] = predict_max_tokens(fit, card) if card else None
    pred = ctx["predicted_max_tokens"]
    if spec.get("confirm") and (pred or spec.get("confirm_at")):
        length = spec.get("confirm_at") or max(CONFIRM_ROUND, pred // CONFIRM_ROUND * CONFIRM_ROUND)
        log(method, f"confirming: one full step at {length:,} tokens"
            + (f" (--confirm-at; predicted longest {pred:,})" if spec.get("confirm_at") and pred else ""))
        ctx["confirm"] = attempt(length)


# ----------------------------------------------------------------------------------------------------------
# Parent side: planner predictions and the tables
# ----------------------------------------------------------------------------------------------------------
def add_planner_predictions(results: list[dict], model_cfg: dict, qlora: bool, lora_r: int) -> None:
    """Each measured point of hf / turbotune rows gets the planner's predicted peak allocated bytes."""
    from turbotune.planner.predict import PlanError, predict_peak

    for r in results:
        ctx = r.get("context") or {}
        method = r["method"]
        if method not in ("hf",) and not method.startswith("turbotune"):
            continue
        pts = list(ctx.get("points", [])) + ([ctx["confirm"]] if ctx.get("confirm") else [])
        for p in pts:
            if p.get("checkpointing") is None:
                continue
            try:
                plan = predict_peak(model_cfg, p["seq_len"], 1, qlora=qlora and method != "turbotune-bf16",
                                    lora_r=lora_r,
                                    checkpointing=p["checkpointing"], method="hf" if method == "hf" else "turbotune",
                                    checkpointed_layers=p.get("checkpointed_layers"))
            except (PlanError, KeyError, TypeError, ValueError):
                continue
            p["planner_alloc_bytes"] = plan.allocated_bytes
            p["planner_host_bytes"] = plan.host_bytes


def _gib(v) -> str:
    return f"{v / GiB:.2f}" if v else "n/a"


def format_context_tables(results: list[dict], lengths: list[int]) -> str:
    card = next((r["context"].get("card_memory_bytes") for r in results if r.get("context")), None)
    head = ["method"] + [f"{n:,}" for n in lengths] + ["slope MiB / 1k tokens",
                                                     f"predicted max tokens ({_gib(card)} GiB card)", "confirm"]
    lines = ["Peak allocated GiB for one step at micro-batch 1:", "",
             "| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    planner, host = [], []
    for r in results:
        if r.get("status") != "ok" or not r.get("context"):
            why = r.get("reason") or r.get("error") or r.get("status")
            lines.append("| " + " | ".join([r["method"], f"{r.get('status')}: {str(why)[:120]}"]
                                           + ["—"] * (len(head) - 2)) + " |")
            continue
        ctx = r["context"]
        by_len = {p["seq_len"]: p for p in ctx["points"]}
        cells = [r["method"]]
        for n in lengths:
            p = by_len.get(n)
            cells.append("—" if p is None else ("OOM" if p["status"] != "ok" else _gib(p["peak_alloc_bytes"])))
        fit = ctx.get("fit")
        cells.append(f"{fit['slope_bytes_per_token'] * 1024 / 2 ** 20:.1f}" if fit else "n/a")
        pred = ctx.get("predicted_max_tokens")
        cells.append(f"{pred:,}" if pred else "n/a")
        c = ctx.get("confirm")
        cells.append("not run" if c is None else (f"{c['seq_len']:,}: ok, {_gib(c['peak_alloc_bytes'])} GiB, "
                                                  f"{c['step_s']:.0f} s" if c["status"] == "ok"
                                                  else f"{c['seq_len']:,}: OOM"))
        lines.append("| " + " | ".join(cells) + " |")
        for p in ctx["points"] + ([c] if c else []):
            if p.get("planner_alloc_bytes") and p.get("peak_alloc_bytes"):
                err = p["planner_alloc_bytes"] / p["peak_alloc_bytes"] - 1
                ck = p["checkpointing"] + (f" ({p['checkpointed_layers']} layers)" if p.get("checkpointed_layers")
                                           else "")
                planner.append(f"| {r['method']} | {p['seq_len']:,} | {ck} | "
                               f"{_gib(p['peak_alloc_bytes'])} | {_gib(p['planner_alloc_bytes'])} | {err:+.1%} |")
            if p.get("host_offloaded_bytes"):
                host.append(f"| {r['method']} | {p['seq_len']:,} | {_gib(p['host_offloaded_bytes'])} | "
                            f"{_gib(p.get('planner_host_bytes'))} |")
    if planner:
        lines += ["", "The planner (`turbotune plan`) against the measured peaks:", "",
                  "| method | seq | checkpointing | measured GiB | predicted GiB | error |",
                  "|---|---:|---|---:|---:|---:|"] + planner
    if host:
        lines += ["", "Layer inputs offloaded to pinned host memory in the step (all held at the end of the "
                  "forward):", "", "| method | seq | measured GiB | planner GiB |", "|---|---:|---:|---:|"] + host
    return "\n".join(lines)
