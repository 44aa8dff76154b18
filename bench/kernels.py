"""Time turbotune's element-wise kernels against their PyTorch references and HF's modules on CUDA.

    python bench/kernels.py [--tokens 4096] [--hidden 4096] [--intermediate 11008] [--compile]

Prints one table: forward and forward+backward times two ways, and the achieved memory bandwidth of the
Triton version (bytes it must move / GPU time). Not run in CI.
  wall: triton.testing.do_bench (median ms, L2 flushed): includes host overhead when the GPU waits for the
        CPU, which is what an isolated op shows (Python + Triton launch cost ~20-40 us a launch);
  gpu:  sum of the kernels' own durations from torch.profiler (ms): what the op costs inside a training
        step where the CPU runs ahead of the GPU.
"""
from __future__ import annotations

import argparse

import torch
import triton.testing

from turbotune.model.kernels.rmsnorm import rms_norm, rms_norm_reference
from turbotune.model.kernels.rope import apply_rope_, rope_reference
from turbotune.model.kernels.swiglu import geglu, geglu_reference, swiglu, swiglu_reference


def _ms(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def _gpu_ms(fn, iters=20):
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


def _no_grad(fn):
    def run():
        with torch.no_grad():
            return fn()
    return run


def _fwd_bwd(fn, inputs, grad):
    """A closure running fn forward and backward (gradient `grad`) on fresh-leaf inputs."""
    def run():
        for t in inputs:
            t.grad = None
        out = fn()
        out = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward(out, grad)
    return run


def bench(args):
    dev, dt = "cuda", torch.bfloat16
    T, H, I = args.tokens, args.hidden, args.intermediate
    rows = []

    def add(name, impl, fwd, fwdbwd, nbytes_fwd, nbytes_fb):
        f, fb, gf, gfb = _ms(fwd), _ms(fwdbwd), _gpu_ms(fwd), _gpu_ms(fwdbwd)
        bw = (nbytes_fwd / gf / 1e6, nbytes_fb / gfb / 1e6) if impl == "triton" else None
        rows.append((name, impl, f, fb, gf, gfb, bw))

    maybe_compile = (lambda f: torch.compile(f)) if args.compile else None

    # --- SwiGLU / GeGLU: [T, I]
    from transformers.activations import ACT2FN
    gate = torch.randn(T, I, device=dev, dtype=dt, requires_grad=True)
    up = torch.randn(T, I, device=dev, dtype=dt, requires_grad=True)
    dh = torch.randn(T, I, device=dev, dtype=dt)
    e = gate.element_size() * T * I
    for name, op, ref, hf_act in (("swiglu", swiglu, swiglu_reference, "silu"),
                                  ("geglu", geglu, geglu_reference, "gelu_pytorch_tanh")):
        act = ACT2FN[hf_act]
        impls = {"triton": lambda: op(gate, up), "torch": lambda: ref(gate, up), "hf": lambda: act(gate) * up}
        if maybe_compile:
            cref = maybe_compile(ref)
            impls["torch.compile"] = lambda: cref(gate, up)
        for impl, fn in impls.items():
            add(name, impl, _no_grad(fn), _fwd_bwd(fn, [gate, up], dh), 3 * e, 3 * e + 5 * e)

    # --- RMSNorm: [T, H]
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    x = torch.randn(T, H, device=dev, dtype=dt, requires_grad=True)
    dy = torch.randn(T, H, device=dev, dtype=dt)
    e = x.element_size() * T * H
    for name, casting, offset, Mod in (("rmsnorm llama", "llama", 0.0, LlamaRMSNorm),
                                      ("rmsnorm gemma", "gemma", 1.0, GemmaRMSNorm)):
        mod = Mod(H, eps=1e-6).to(dev, dt)
        w = mod.weight
        impls = {"triton": lambda: rms_norm(x, w, 1e-6, offset, casting),
                 "torch": lambda: rms_norm_reference(x, w, 1e-6, offset, casting), "hf": lambda: mod(x)}
        if maybe_compile:
            cmod = maybe_compile(mod)
            impls["torch.compile"] = lambda: cmod(x)
        for impl, fn in impls.items():
            add(name, impl, _no_grad(fn), _fwd_bwd(fn, [x, w], dy), 2 * e, 2 * e + 3 * e)
        mod.weight.requires_grad_(False)  # frozen norm (LoRA): dx only
        for impl, fn in (("triton", lambda: rms_norm(x, w, 1e-6, offset, casting)), ("hf", lambda: mod(x))):
            add(name + " frozen", impl, _no_grad(fn), _fwd_bwd(fn, [x], dy), 2 * e, 5 * e)

    # --- RoPE: q [B, S, Hq, D], k [B, S, Hk, D] from one projection (views), GQA
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    D, Hq, Hk = args.head_dim, H // args.head_dim, max(1, H // args.head_dim // 4)
    B, S = max(1, T // 2048), min(T, 2048)
    qkv_src = torch.randn(B, S, (Hq + 2 * Hk) * D, device=dev, dtype=dt, requires_grad=True)
    inv = 1.0 / (10000.0 ** (torch.arange(0, D, 2, device=dev).float() / D))
    emb = torch.arange(S, device=dev).float()[:, None] * inv[None]
    emb = torch.cat((emb, emb), -1)
    cos, sin = emb.cos().to(dt)[None], emb.sin().to(dt)[None]
    gq = torch.randn(B, S, Hq, D, device=dev, dtype=dt)
    gk = torch.randn(B, S, Hk, D, device=dev, dtype=dt)
    e = qkv_src.element_size() * B * S * (Hq + Hk) * D

    def qk():
        t = qkv_src * 1  # a fresh non-leaf projection output, as in attention
        return t[..., :Hq * D].view(B, S, Hq, D), t[..., Hq * D:(Hq + Hk) * D].view(B, S, Hk, D)

    def hf():
        q, k = qk()
        qe, ke = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        return qe, ke

    impls = {"triton": lambda: apply_rope_(*qk(), cos, sin), "torch": lambda: rope_reference(*qk(), cos, sin),
             "hf": hf}
    for impl, fn in impls.items():
        grads = (gq, gk) if impl != "hf" else (gq.transpose(1, 2), gk.transpose(1, 2))
        # the `* 1` copy inside qk() is in every variant; bandwidth counts the rope read+write only
        add("rope", impl, _no_grad(fn), _fwd_bwd(fn, [qkv_src], grads), 2 * e, 4 * e)

    print(f"\ntokens={T} hidden={H} intermediate={I} head_dim={D} q_heads={Hq} kv_heads={Hk}  "
          f"({torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__})")
    print(f"{'op':<22}{'impl':<15}{'wall fwd':>9}{'wall f+b':>10}{'gpu fwd':>9}{'gpu f+b':>9}"
          f"{'fwd GB/s':>10}{'f+b GB/s':>10}   (ms; GB/s from gpu time)")
    for name, impl, f, fb, gf, gfb, bw in rows:
        bws = f"{bw[0]:>10.0f}{bw[1]:>10.0f}" if bw else ""
        print(f"{name:<22}{impl:<15}{f:>9.3f}{fb:>10.3f}{gf:>9.3f}{gfb:>9.3f}{bws}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=11008)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--compile", action="store_true", help="also time torch.compile of the reference")
    bench(p.parse_args())
