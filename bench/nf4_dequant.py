"""Time the variants of turbotune's NF4 dequantisation kernel against bitsandbytes on CUDA.

    PYTHONPATH=src python bench/nf4_dequant.py [--json PATH] [--profile-top 3] [--bpp ..] [--warps ..] [--pair ..]

For llama3-8b's seven projection shapes (blocksize 64, double quantisation, bf16 out), every variant of
`dequantize_nf4_triton` (bytes_per_program x num_warps x pair_table) is first checked against
`bitsandbytes.functional.dequantize_4bit` bit for bit, then timed with bitsandbytes. Prints one table and the
best variant. Not run in CI.
  wall: triton.testing.do_bench (median us, L2 flushed before each call). The 256 MB flush outlasts the launch,
        so for a one-kernel op this is close to GPU time (bitsandbytes runs 3 kernels with double quant).
  gpu:  the op's own kernel durations from torch.profiler (us, L2 flushed, flush kernels left out), for
        bitsandbytes, the default and the `--profile-top` fastest variants of each shape.
  TB/s: 2.5 bytes per element (0.5 packed read + 2 bf16 written) / wall time;  x bnb: bitsandbytes' wall time /
        the variant's (> 1 is faster).
The best variant has the least wall time summed over one llama layer (q, o, k, v, gate, up, down).
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys

import bitsandbytes
import bitsandbytes.functional as bnbF
import torch
import triton
import triton.testing

import turbotune.model.kernels.nf4_dequant as nd
from turbotune.model.quant import nf4_code, nf4_storage

# [out, in] -> how many a llama3-8b layer has: q, o | k, v | gate, up | down
LAYER = {(4096, 4096): 2, (1024, 4096): 2, (14336, 4096): 2, (4096, 14336): 1}
DEFAULT = (nd._BYTES_PER_PROGRAM, nd._NUM_WARPS, nd._PAIR_TABLE)
BNB = "bitsandbytes"
DEV = "cuda"
FLUSH_KEYS = ("fill", "zero", "memset")  # the L2 flush's kernels, not the op's


def _name(v):
    return BNB if v == BNB else f"bpp{v[0]} w{v[1]} {'pair' if v[2] else '2x16'}"


def _wall_us(fn):
    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median") * 1e3


def _gpu_us(fn, flush, iters=10):
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            flush.zero_()
            fn()
        torch.cuda.synchronize()
    total = sum(getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
                for e in prof.key_averages() if not any(k in e.key.lower() for k in FLUSH_KEYS))
    return total / iters


def bench_shape(shape, variants, profile_top, flush):
    g = torch.Generator(device=DEV).manual_seed(0)
    w = (torch.randn(shape, generator=g, device=DEV) * 0.02).to(torch.bfloat16)
    packed, qs = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    del w
    ref = bnbF.dequantize_4bit(packed, qs)
    st, code, out = nf4_storage(packed, qs), nf4_code(DEV), torch.empty_like(ref)

    def ours(v):
        return lambda: nd.dequantize_nf4_triton(
            st.packed, st.absmax, code, st.blocksize, out, absmax2=st.absmax2, code2=st.code2,
            blocksize2=st.blocksize2, offset=st.offset, bytes_per_program=v[0], num_warps=v[1], pair_table=v[2])

    fns = {BNB: lambda: bnbF.dequantize_4bit(packed, qs)}
    rows = {}
    for v in variants:
        out.fill_(float("nan"))
        ours(v)()
        ok = torch.equal(out, ref)
        rows[v] = {"ok": ok}
        if ok:
            fns[v] = ours(v)
        else:
            print(f"MISMATCH {shape} {_name(v)}: {(out != ref).sum().item()} of {ref.numel()} elements differ",
                  file=sys.stderr)
    rows[BNB] = {"ok": True}
    for v, fn in fns.items():
        rows[v]["wall_us"] = _wall_us(fn)
    if profile_top > 0:
        fastest = sorted((v for v in fns if v != BNB), key=lambda v: rows[v]["wall_us"])[:profile_top]
        for v in dict.fromkeys([BNB, DEFAULT, *fastest]):
            if v in fns:
                rows[v]["gpu_us"] = _gpu_us(fns[v], flush)
    n = ref.numel()
    for r in rows.values():
        if "wall_us" in r:
            r["tb_s"] = 2.5 * n / (r["wall_us"] * 1e-6) / 1e12
            r["x_bnb"] = rows[BNB]["wall_us"] / r["wall_us"]
    return rows


def main(args):
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    variants = list(itertools.product(args.bpp, args.warps, [bool(p) for p in args.pair]))
    if DEFAULT not in variants:
        variants.insert(0, DEFAULT)
    flush = torch.empty(256 << 20, dtype=torch.int8, device=DEV)
    results = {shape: bench_shape(shape, variants, args.profile_top, flush) for shape in LAYER}

    dev = torch.cuda.get_device_name()
    print(f"\nNF4 dequant, llama3-8b projections, blocksize 64, double quant, bf16 out  ({dev}, torch "
          f"{torch.__version__}, triton {triton.__version__}, bitsandbytes {bitsandbytes.__version__})")
    print(f"{'shape':<14}{'variant':<22}{'wall us':>9}{'gpu us':>9}{'TB/s':>7}{'x bnb':>7}  (* = default)")
    for shape, rows in results.items():
        order = [BNB] + sorted((v for v in rows if v != BNB), key=lambda v: rows[v].get("wall_us", float("inf")))
        for v in order:
            r = rows[v]
            if not r["ok"]:
                print(f"{shape!s:<14}{_name(v):<22}  MISMATCH vs bitsandbytes (not timed)")
                continue
            gpu = f"{r['gpu_us']:>9.1f}" if "gpu_us" in r else f"{'-':>9}"
            mark = " *" if v == DEFAULT else ""
            print(f"{shape!s:<14}{_name(v):<22}{r['wall_us']:>9.1f}{gpu}{r['tb_s']:>7.2f}{r['x_bnb']:>7.2f}{mark}")

    # per llama layer: wall time summed over its seven projections; only variants exact on every shape
    good = [v for v in variants if all(results[s][v]["ok"] for s in LAYER)]
    layer_us = {v: sum(k * results[s][v]["wall_us"] for s, k in LAYER.items()) for v in good + [BNB]}
    ranked = sorted(good, key=layer_us.get)
    line = f"\nper llama layer (q,o,k,v,gate,up,down; wall us): {BNB} {layer_us[BNB]:.1f}"
    if DEFAULT in layer_us:
        line += f" | default {_name(DEFAULT)} {layer_us[DEFAULT]:.1f} ({layer_us[BNB] / layer_us[DEFAULT]:.2f}x)"
    print(line)
    for v in ranked[:5]:
        print(f"  {_name(v):<22}{layer_us[v]:>9.1f} us  {layer_us[BNB] / layer_us[v]:.2f}x bnb")
    best = ranked[0] if ranked else None
    if best is not None:
        print(f"BEST: bytes_per_program={best[0]}, num_warps={best[1]}, pair_table={best[2]}  "
              f"({layer_us[best]:.1f} us per layer, {layer_us[BNB] / layer_us[best]:.2f}x bitsandbytes)")
    bad = [(s, v) for s in LAYER for v in variants if not results[s][v]["ok"]]

    if args.json:
        doc = {"device": dev, "torch": torch.__version__, "triton": triton.__version__,
               "bitsandbytes": bitsandbytes.__version__, "blocksize": 64, "double_quant": True, "out": "bf16",
               "layer_counts": {str(s): k for s, k in LAYER.items()}, "default": _name(DEFAULT),
               "best": None if best is None else {"bytes_per_program": best[0], "num_warps": best[1],
                                                  "pair_table": best[2], "layer_us": layer_us[best]},
               "layer_us": {_name(v): t for v, t in layer_us.items()},
               "rows": [{"shape": list(s), "variant": _name(v), **r} for s, rows in results.items()
                        for v, r in rows.items()],
               "mismatches": [{"shape": list(s), "variant": _name(v)} for s, v in bad]}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
    if bad:
        sys.exit(f"{len(bad)} (shape, variant) pairs differ from bitsandbytes")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="write every row, the per-layer sums and the best variant here")
    p.add_argument("--bpp", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192], help="bytes_per_program")
    p.add_argument("--warps", type=int, nargs="+", default=[2, 4, 8], help="num_warps")
    p.add_argument("--pair", type=int, nargs="+", default=[0, 1], choices=[0, 1], help="pair_table off / on")
    p.add_argument("--profile-top", type=int, default=3,
                   help="torch.profiler GPU time for bitsandbytes, the default and this many fastest variants "
                        "per shape (0: none)")
    main(p.parse_args())
