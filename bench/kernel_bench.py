"""One benchmark for every kernel: turbotune's op against its plain-PyTorch reference (and HF's module where there
is one), forward and forward+backward, after checking that the op's outputs and gradients match the reference.

    python bench/kernel_bench.py [--op all|swiglu|geglu|rmsnorm|rope|fused_linear_ce|lora_mlp|nf4_dequant]
                            [--tokens 4096] [--hidden 4096] [--intermediate 11008] [--vocab 128256]
    TRITON_INTERPRET=1 python bench/kernel_bench.py --device cpu --tokens 64 --hidden 64 ...   # the CI smoke run

One table: per op and implementation, the largest difference from the reference ("check"), then
  wall: triton.testing.do_bench (median ms, L2 flushed; on the CPU the median of a few perf_counter runs):
        includes host overhead when the GPU waits for the CPU, which is what an isolated op shows;
  gpu:  the kernels' own durations from torch.profiler (ms): what the op costs inside a training step where the
        CPU runs ahead of the GPU (CUDA only);
  GB/s: bytes the op must move / gpu time (element-wise ops only).
Adding an op: a function decorated with @op("name") that returns Case rows (see below). Not run on a GPU in CI;
tests/test_kernel_bench.py runs every op once on the CPU on tiny shapes.
"""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

OPS: dict[str, Callable] = {}


def op(name):
    def register(fn):
        OPS[name] = fn
        return fn
    return register


@dataclass
class Case:
    """One row group: implementations of the same op on the same inputs. `impls` maps a name to a zero-argument
    callable returning a tensor or a tuple ("turbotune": what turbotune dispatches to, Triton on CUDA);
    `reference` names the one the others are checked against. `leaves` get gradients (fwd+bwd runs backward
    with `grads`); `bytes_fwd`/`bytes_fb` give GB/s (0: not shown)."""
    name: str
    impls: dict
    reference: str
    leaves: list
    grads: tuple
    bytes_fwd: int = 0
    bytes_fb: int = 0
    tol: float = 2e-2
    results: dict = field(default_factory=dict)


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def _run_fwd_bwd(case, fn):
    def run():
        for t in case.leaves:
            t.grad = None
        torch.autograd.backward(_as_tuple(fn()), case.grads)
    return run


def _no_grad(fn):
    def run():
        with torch.no_grad():
            return fn()
    return run


def _check(case, impl) -> float:
    """Largest |difference| / max |reference| over outputs and leaf gradients."""
    def collect(fn):
        for t in case.leaves:
            t.grad = None
        outs = _as_tuple(fn())
        torch.autograd.backward(outs, case.grads)
        return [o.detach().float() for o in outs] + [t.grad.float() for t in case.leaves]
    want, got = collect(case.impls[case.reference]), collect(case.impls[impl])
    return max(((g - w).abs().max() / w.abs().max().clamp_min(1e-12)).item() for w, g in zip(want, got))


def _wall_ms(fn, cuda):
    if cuda:
        import triton.testing
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _gpu_ms(fn, cuda, iters=20):
    if not cuda:
        return None
    from torch.profiler import ProfilerActivity, profile
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    total_us = sum(getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
                   for e in prof.key_averages())
    return total_us / iters / 1e3


# --------------------------------------------------------------------------------------------------- the ops
def _rand(*shape, dev, dt, grad=True, scale=1.0):
    return (torch.randn(*shape, device=dev, dtype=torch.float32) * scale).to(dt).requires_grad_(grad)


@op("swiglu")
@op("geglu")
def _act_mul(args, dev, dt, name):
    from transformers.activations import ACT2FN

    from turbotune.model.kernels.swiglu import geglu, geglu_reference, swiglu, swiglu_reference
    fast, ref, hf = {"swiglu": (swiglu, swiglu_reference, "silu"),
                     "geglu": (geglu, geglu_reference, "gelu_pytorch_tanh")}[name]
    gate = _rand(args.tokens, args.intermediate, dev=dev, dt=dt)
    up = _rand(args.tokens, args.intermediate, dev=dev, dt=dt)
    e = gate.numel() * gate.element_size()
    act = ACT2FN[hf]
    impls = {"turbotune": lambda: fast(gate, up), "torch": lambda: ref(gate, up), "hf": lambda: act(gate) * up}
    return [Case(name, impls, "torch", [gate, up], (torch.randn_like(gate),), 3 * e, 8 * e)]


@op("rmsnorm")
def _rmsnorm(args, dev, dt, name):
    from turbotune.model.kernels.rmsnorm import rms_norm, rms_norm_reference
    x = _rand(args.tokens, args.hidden, dev=dev, dt=dt)
    e = x.numel() * x.element_size()
    cases = []
    for flavour, offset in (("llama", 0.0), ("gemma", 1.0)):
        w = _rand(args.hidden, dev=dev, dt=dt, scale=0.1)
        impls = {"turbotune": lambda w=w, o=offset, f=flavour: rms_norm(x, w, 1e-6, o, f),
                 "torch": lambda w=w, o=offset, f=flavour: rms_norm_reference(x, w, 1e-6, o, f)}
        cases.append(Case(f"rmsnorm {flavour}", impls, "torch", [x, w], (torch.randn_like(x),), 2 * e, 5 * e))
    return cases


@op("rope")
def _rope(args, dev, dt, name):
    from turbotune.model.kernels.rope import apply_rope_, rope_reference
    d = args.head_dim
    hq, hk = max(1, args.hidden // d), max(1, args.hidden // d // 4)
    b, s = max(1, args.tokens // 2048), min(args.tokens, 2048)
    src = _rand(b, s, (hq + hk) * d, dev=dev, dt=dt)
    inv = 1.0 / (10000.0 ** (torch.arange(0, d, 2, device=dev).float() / d))
    emb = torch.arange(s, device=dev).float()[:, None] * inv[None]
    emb = torch.cat((emb, emb), -1)
    cos, sin = emb.cos().to(dt)[None], emb.sin().to(dt)[None]

    def qk():  # a fresh non-leaf projection output, as in attention (the copy is in every variant)
        t = src * 1
        return t[..., :hq * d].view(b, s, hq, d), t[..., hq * d:].view(b, s, hk, d)
    e = src.numel() * src.element_size()
    impls = {"turbotune": lambda: apply_rope_(*qk(), cos, sin), "torch": lambda: rope_reference(*qk(), cos, sin)}
    grads = (torch.randn(b, s, hq, d, device=dev, dtype=dt), torch.randn(b, s, hk, d, device=dev, dtype=dt))
    return [Case("rope", impls, "torch", [src], grads, 2 * e, 4 * e)]


@op("fused_linear_ce")
def _fused_ce(args, dev, dt, name):
    from turbotune.model.kernels.fused_linear_ce import fused_linear_cross_entropy, linear_cross_entropy_reference
    h = _rand(args.tokens, args.hidden, dev=dev, dt=dt)
    w = _rand(args.vocab, args.hidden, dev=dev, dt=dt, scale=0.02)
    y = torch.randint(0, args.vocab, (args.tokens,), device=dev)
    impls = {"turbotune": lambda: fused_linear_cross_entropy(h, w, y),
             "torch": lambda: linear_cross_entropy_reference(h, w, y)}
    return [Case("fused_linear_ce", impls, "torch", [h, w], (torch.ones((), device=dev),))]


@op("lora_mlp")
def _lora_mlp(args, dev, dt, name):
    from turbotune.model.kernels.fused_lora import LoRAPart, lora_mlp, lora_mlp_reference
    r, hid, inter = 16, args.hidden, args.intermediate

    def part(out_f, in_f):
        return LoRAPart(weight=torch.randn(out_f, in_f, device=dev, dtype=dt) * 0.02, bias=None,
                        A=_rand(r, in_f, dev=dev, dt=torch.float32, scale=0.02),
                        B=_rand(out_f, r, dev=dev, dt=torch.float32, scale=0.02), scaling=1.0)
    parts = (part(inter, hid), part(inter, hid), part(hid, inter))
    x = _rand(args.tokens, hid, dev=dev, dt=dt)
    leaves = [x] + [t for p in parts for t in (p.A, p.B)]
    impls = {"turbotune": lambda: lora_mlp(x, *parts), "torch": lambda: lora_mlp_reference(x, *parts)}
    return [Case("lora_mlp (fp32 adapters)", impls, "torch", leaves, (torch.randn_like(x),))]


@op("nf4_dequant")
def _nf4(args, dev, dt, name):
    import bitsandbytes.functional as bnbF

    from turbotune.model.quant import dequantize_nf4
    w = torch.randn(args.intermediate, args.hidden, device=dev, dtype=torch.float32).to(dt) * 0.02
    packed, qs = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    impls = {"turbotune": lambda: dequantize_nf4(packed, qs, backend="triton"),
             "torch": lambda: dequantize_nf4(packed, qs, backend="torch")}
    return [Case("nf4_dequant", impls, "torch", [], (), 0, 0, tol=0.0)]


# --------------------------------------------------------------------------------------------------- driver
def run(args) -> list[Case]:
    cuda = args.device == "cuda"
    dt = torch.bfloat16 if cuda else torch.float32
    names = list(OPS) if args.op == "all" else args.op.split(",")
    cases = []
    for name in names:
        for case in OPS[name](args, args.device, dt, name):
            for impl, fn in case.impls.items():
                grads = bool(case.leaves)
                res = {"check": _check(case, impl) if grads else _max_diff(case, impl)}
                fwd, fb = _no_grad(fn), (_run_fwd_bwd(case, fn) if grads else None)
                res["wall"] = (_wall_ms(fwd, cuda), _wall_ms(fb, cuda) if fb else None)
                res["gpu"] = (_gpu_ms(fwd, cuda), _gpu_ms(fb, cuda) if fb else None)
                case.results[impl] = res
            cases.append(case)
    return cases


def _max_diff(case, impl) -> float:
    want, got = case.impls[case.reference]().float(), case.impls[impl]().float()
    return (got - want).abs().max().item()


def report(cases, args) -> str:
    def ms(v):
        return f"{v:>9.3f}" if v is not None else f"{'-':>9}"
    lines = [f"{'op':<26}{'impl':<9}{'check':>9}{'wall fwd':>9}{'wall f+b':>9}{'gpu fwd':>9}{'gpu f+b':>9}"
             f"{'GB/s f+b':>9}"]
    for c in cases:
        for impl, r in c.results.items():
            gbs = c.bytes_fb / r["gpu"][1] / 1e6 if c.bytes_fb and r["gpu"][1] else None
            ok = "" if r["check"] <= c.tol else "  MISMATCH"
            lines.append(f"{c.name:<26}{impl:<9}{r['check']:>9.1e}{ms(r['wall'][0])}{ms(r['wall'][1])}"
                         f"{ms(r['gpu'][0])}{ms(r['gpu'][1])}{(f'{gbs:>9.0f}' if gbs else f'{chr(45):>9}')}{ok}")
    dev = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    lines.append(f"tokens={args.tokens} hidden={args.hidden} intermediate={args.intermediate} vocab={args.vocab} "
                 f"({dev}, torch {torch.__version__}); ms, check = max |diff| / max |reference|")
    return "\n".join(lines)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--op", default="all", help=f"all or a comma-separated list of {', '.join(OPS)}")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=11008)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--head-dim", type=int, default=128)
    args = p.parse_args(argv)
    unknown = [n for n in args.op.split(",") if n != "all" and n not in OPS]
    if unknown:
        p.error(f"unknown op(s) {unknown}; choose from {', '.join(OPS)}")
    return args


if __name__ == "__main__":
    ARGS = parse()
    CASES = run(ARGS)
    print(report(CASES, ARGS))
    raise SystemExit(1 if any(r["check"] > c.tol for c in CASES for r in c.results.values()) else 0)
