"""`turbotune plan`: predict the peak GPU memory of one LoRA / QLoRA training step from the model config alone.

Nothing is loaded onto a GPU: the prediction is arithmetic on the config (hidden size, layers, heads, vocab, ...)
and on what turbotune's autograd Functions save. `predict_peak(config, seq_len, batch, ...)` returns a `Plan` with
the items below; `turbotune plan` prints them, the total, and the largest sequence length / batch that fit a GPU.

Symbols
-------
    N = B * L tokens per micro-batch      H hidden size        I intermediate (MLP) size     V vocab size
    n_h, n_kv attention / key-value heads, d head_dim, Dq = n_h * d, Dkv = n_kv * d         Λ decoder layers
    r LoRA rank    b bytes of an activation element (2: bf16/fp16, 4: fp32)
    a bytes of an adapter element: 4, because PEFT keeps LoRA A and B in fp32 under a 16-bit model
    "cast" = (a != b): the rank-r products run in fp32 and the wide inputs are cast to fp32 for them

1. Weights (static)
-------------------
The seven projections of every layer: q [H -> Dq], k, v [H -> Dkv], o [Dq -> H], gate, up [H -> I], down [I -> H].
    16-bit base:   2 bytes per weight.
    4-bit (NF4, bitsandbytes, blocksize 64), per weight tensor of n elements:
        packed codes      ceil(n / 2) bytes (two 4-bit codes per byte)
        absmax            one per block of 64: nb = ceil(n / 64)
            double quantisation (default): 1 byte per block (uint8), plus the second-level state:
                          4 * ceil(nb / 256) (fp32 absmax per 256 blocks) + 256 * 4 (its fp32 code table) + 4 (offset)
            without it:   4 bytes per block (fp32)
        NF4 code table    16 * 4 bytes
    (Checked against bitsandbytes' quant_state on an [8960, 1536] weight: 215,040 uint8 absmax, 840 fp32 absmax2.)
Embeddings [V, H] and lm_head [V, H] stay 16-bit (a tied lm_head is the embedding: counted once); RMSNorm weights
((2Λ + 1) * H) and projection biases (Qwen2: q, k, v; `attention_bias`: q, k, v, o; `mlp_bias`) stay 16-bit.
hf + QLoRA only: PEFT's `prepare_model_for_kbit_training` (the hf recipe) casts every non-4-bit parameter to fp32
(4 bytes); turbotune does not.

2. LoRA (static)
----------------
P = Λ * r * sum over the seven projections of (in + out)   (A is [r, in], B is [out, r]; this is PEFT's count)
    adapters 4 P (fp32)  +  gradients 4 P (fp32)  +  AdamW exp_avg and exp_avg_sq 8 P (fp32)  = 16 P bytes.
Gradients are counted for the whole step: with gradient accumulation they live through every micro-batch after
the first, and the AdamW state lives from the first optimizer step on.

3. Activations kept for backward
--------------------------------
Per token and per layer, what one decoder layer saves for its backward (S_layer) on turbotune's fused path, read
off the autograd Functions' `save_for_backward` (kernels/*.py) and the attention in models/llama_like.py:

    H b        layer input x: the input RMSNorm saves it (RMSNormFunction: x, weight, 1/rms); it is also the
               checkpoint input under recompute
    4          input RMSNorm 1/rms (fp32, one per row)
    H b        normed x, saved by LoRAQKVFunction (shared by q, k, v)
    3 r a      x A^T of q, k, v (LoRAQKVFunction keeps the [N, r] products instead of recomputing them)
    (Dq + 2 Dkv) b   q, k, v after the in-place RoPE (RoPEFunction saves only the shared cos / sin): SDPA's
               flash kernel saves q, k, v; they are the qkv outputs' own storage (flat outputs, viewed)
    Dq b       attention output: SDPA saves it, and LoRALinearFunction (o_proj) saves the same tensor as its x
               (transpose(1, 2) of flash's [B, L, n_h, d]-laid-out output is contiguous: no copy)
    4 n_h      SDPA logsumexp [B, n_h, L], fp32
    r a        o_proj x A^T
    H b + 4    mid residual (post-attention RMSNorm's x) and its 1/rms
    H b        normed x, saved by LoRAMLPFunction
    2 I b      gate pre-activation e and up g (the MLP's only [N, I] saves; h = act(e) * g is recomputed)
    3 r a      x Ag^T, x Au^T, h Ad^T            (these two lines are 0 when the MLP is tiled over tokens, below)
    -----------------------------------------------------------------------------------------------
    S_tt = b (4H + 2Dq + 2Dkv + 2I) + 8 + 4 n_h + 7 r a      (qwen2-1.5b, bf16, r 16: 55,800 bytes/token/layer)

The same for transformers + PEFT ("hf": stock layers, SDPA), where PyTorch saves an input of a product only when
the other factor needs a gradient (frozen W: `x W^T` saves nothing for W):

    4H + 4     input RMSNorm: its fp32 copy of x (x.to(float32), used by pow and mul) and rsqrt's output
    3 H a      q, k, v: PEFT casts x to the adapter dtype once per projection; each lora_A saves its own copy
               (H b, shared, when a == b)
    3 r a      lora_B's inputs x A^T
    (2Dq + 2Dkv) b + 4 n_h    SDPA: q, k, v, out, logsumexp (as above)
    Dq a       o_proj's fp32 copy of the attention output (0 when a == b)        + r a
    4H + 4     post-attention RMSNorm: fp32 copy and rsqrt
    2 H a      gate and up: one fp32 copy each (H b when a == b)                  + 2 r a
    3 I b      silu saves its input (gate), the product saves act(gate) and up
    I a        down's fp32 copy of h (I b when a == b)                            + r a
    -----------------------------------------------------------------------------------------------
    (qwen2-1.5b, bf16, r 16: 146,424 bytes/token/layer; the layer input itself is not saved: b != 4)
hf + QLoRA: the fp32 norm weights make the norm outputs fp32, bitsandbytes' Linear4bit returns its input's dtype,
so the residual stream and every activation become fp32: modelled as b = 4 (no casts). SDPA then runs in fp32,
without flash; if it falls back to the math kernel it also saves [B, n_h, L, L] attention weights, which this
planner does not model.

Kept across the whole step, by --checkpointing:
    none       Λ * N * S_layer                          (every layer's saved set)
    recompute  Λ * N * H * b                            (one layer input per layer: the non-reentrant checkpoint's)
               + N * (S_layer - H b) during the backward of a layer: its forward is recomputed, one layer at a time
    offload    N * H * b                                (layer inputs live on the host; the last layer's stays)
               + N * (S_layer - H b) for the one layer being recomputed
               + N * H * b in the backward: the input of the next layer to recompute, prefetched from the host
               (turbotune.model.checkpointing.OffloadedCheckpointing: at most two inputs on the GPU; its
               min_offload_bytes floor, which keeps inputs under 1 MiB on the GPU, is not modelled)
plus, always: the last layer's output saved by the final RMSNorm (N H b; hf: its fp32 copy, N H 4) and the rotary
cos / sin tables shared by all layers (2 N d b).

Backward working set of one layer (the largest temporaries on top of its saved set), in the "layer" phase:
    MLP        N I (b + a cast): turbotune's backward holds dh (later h, in place) and h cast to fp32 for dAd, or
               the fp32 copy of de / dg for dAg, dAu (the recomputed forward peaks the same way: h + fp32 h);
               no fp32 copy (N I b) from I >= 4096, where those products run as bf16x3 GEMMs on a GPU.
               hf: N I (b + 2 a cast): the base output plus PEFT's fp32 LoRA output and their fp32 sum (and the
               same sizes in backward); 2 N I b when a == b.
               turbotune, tiled: when one [N, I] tensor passes 512 MiB the MLP runs C tokens at a time
               (kernels/mlp_tiling.py, C = mlp_token_chunk(N, I, b)) and saves only its input; its backward
               recomputes each chunk: C (I (3 b + a cast) + H b) (the chunk's e, g, the peak above, its dx rows).
    attention  flash backward: dq, dk, dv (N (Dq + 2Dkv) b), fp32 dq accumulator (4 N Dq), GQA-expanded dk and
               dv (2 N Dq b when n_kv < n_h), softmax_d (4 N n_h)
    gradients  2 N H b: the gradient of the layer's output and the one of its input (hf: + 4 N H, RMSNorm's
               backward runs in fp32)
    4-bit      + the largest dequantised weight, max(in * out) * b (dequantised per call, never saved)
    T = max(MLP, attention) + gradients (+ 4-bit)

4. The loss (the "loss" phase, at the end of the forward / start of the backward)
-----------------------------------------------------------------------------------
turbotune, chunked linear + cross-entropy (kernels/fused_linear_ce.py): the backward is done in the forward,
C rows at a time, C = default_chunk_size(N, V, H) = clamp(next_pow2(ceil(N H / V)), 512, N):
    C V b      the one reused chunk buffer (logits, overwritten by their gradient; the Triton row kernel keeps
               its fp32 math in registers)
    N H b      grad_hidden, kept until the backward hands it out
    N H b      the final norm's output, alive while the loss runs
    20 N       per-token fp32 losses, int64 labels and shifted labels
hf, full logits: the model returns logits [N, V] (b_l bytes: 2, or 4 for hf + QLoRA's fp32 lm_head) and keeps
them in its output; the loss upcasts them (fp32 copy, freed), log_softmax saves its fp32 output, and in backward
its incoming fp32 gradient and its fp32 input gradient coexist with it:
    N V (b_l + 4 + 4 + 4)      (14 N V for bf16: 8.1 GiB at N = 4096, V = 151,936)      + 20 N

5. Peak, overheads
------------------
peak allocated = static + kept + max(layer phase, loss phase) + cuBLAS workspaces
    cuBLAS / cuBLASLt workspaces: 64 MiB (32 MiB per handle on Hopper; one handle for the main thread, one for
    the autograd engine's device thread), allocated through PyTorch's caching allocator.
This is the number to compare with `torch.cuda.max_memory_allocated()` (what `turbotune bench` reports).
On top of it, for what must fit the card:
    allocator fragmentation  +10% of the allocated peak (the caching allocator's reserved - allocated slack; the
                             calibration run below had reserved / allocated = 1.05 (hf) and 1.10 (turbotune))
    CUDA context             512 MiB (driver, CUDA runtime, cuBLAS and kernel images; outside the allocator)
total = peak allocated * 1.10 + 512 MiB.

Calibration (the one real measurement, BENCHMARKS.md: H200, qwen2-1.5b, bf16, seq 2048 x micro-batch 2, LoRA r 16 on
the seven projections, gradient checkpointing): measured peak allocated hf 11.68 GiB, turbotune 3.98 GiB;
`predict_peak(...).allocated_bytes` gives 11.681 GiB and 3.985 GiB (tests/planner/test_planner.py pins both within 5%).
That the agreement is this close is partly luck: the measurement ran torch 2.11 / transformers 5.17, the cuBLAS
workspace figure is a documented guess, and the working-set terms are upper-bound style estimates worth ~0.1 GiB.
Not calibrated: QLoRA (no measurement yet), none / offload checkpointing, other models.

Limits: dense decoder-only Llama-shaped models (llama, qwen2, mistral, ... with a gated MLP); MoE configs are
refused. LoRA on all seven projections, no dropout (the fused path). Batches without an attention mask (SDPA's flash
kernel, causal). The one-layer working set is an estimate of the largest temporaries, not a trace.
Several GPUs (`--gpus N`, turbotune's DDP or FSDP2): planner/parallel.py turns these items into one rank's.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from turbotune.planner.shapes import METHODS, PRESETS, ModelShape, PlanError, model_shape, preset_dict
from turbotune.planner.layers import (
    ADAPTER_BYTES,
    layer_saved_bytes_per_token,
    layer_working_bytes,
)

__all__ = ["PlanError", "ModelShape", "PlanItem", "Plan", "predict_peak", "resolve_config", "model_shape",
           "lora_param_count", "nf4_bytes", "weight_bytes", "layer_saved_bytes_per_token", "layer_working_bytes",
           "checkpointing_mode",
           "CHECKPOINTING_MODES", "METHODS"]

KiB, MiB, GiB = 1024, 1024 ** 2, 1024 ** 3

CHECKPOINTING_MODES = ("none", "recompute", "offload")
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
NF4_BLOCKSIZE = 64                     # bitsandbytes 4-bit blocksize
NF4_NESTED_BLOCKSIZE = 256             # double quantisation: one fp32 absmax per 256 first-level blocks
CUBLAS_WORKSPACE_BYTES = 64 * MiB      # two 32 MiB workspaces (main thread + autograd thread), in the allocator
FRAGMENTATION = 0.10                   # reserved ~= 1.10 x allocated
CUDA_CONTEXT_BYTES = 512 * MiB         # outside the caching allocator
SEQ_SEARCH_CAP = 1 << 20               # max-seq search stops here when the config has no max_position_embeddings
BATCH_SEARCH_CAP = 1 << 16


def resolve_config(model: str):
    """(display name, config) for a bench preset name, a local model folder, or a cached hub id.

    Nothing is loaded but the config: AutoConfig.from_pretrained for folders and hub ids (offline: only the local
    cache), the preset's dict for preset names.
    """
    if model in PRESETS:
        return model, preset_dict(model)
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise PlanError(f"{model}: no config.json there (a Hugging Face model folder is needed)")
        try:
            from transformers import AutoConfig
            return str(path), AutoConfig.from_pretrained(str(path))
        except Exception:  # e.g. a model type this transformers doesn't know: its raw config.json still works
            try:
                return str(path), json.loads((path / "config.json").read_text())
            except (OSError, ValueError) as exc:
                raise PlanError(f"{model}: can't read config.json ({exc})") from exc
    looks_like_hub_id = re.fullmatch(r"[\w.\-]+/[\w.\-]+", model) is not None
    if looks_like_hub_id:
        try:
            from transformers import AutoConfig
            return model, AutoConfig.from_pretrained(model)
        except Exception as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise PlanError(f"unknown model {model!r}: not a bench preset ({', '.join(PRESETS)}), not a local "
                            f"folder, and its config is not in the Hugging Face cache ({reason[:160]})") from exc
    raise PlanError(f"unknown model {model!r}: use a bench preset ({', '.join(PRESETS)}), a local model folder "
                    "with config.json, or a hub id (org/name) whose config is cached")


# --------------------------------------------------------------------------------------------- arithmetic
def nf4_bytes(n: int, double_quant: bool = True, blocksize: int = NF4_BLOCKSIZE) -> int:
    """Bytes of one bitsandbytes NF4 weight of n elements: packed codes + absmax (+ second level) + code table."""
    n = int(n)
    blocks = -(-n // blocksize)
    out = -(-n // 2) + 16 * 4  # two codes per byte; the 16-value NF4 table in fp32
    if double_quant:
        out += blocks + 4 * -(-blocks // NF4_NESTED_BLOCKSIZE) + 256 * 4 + 4
    else:
        out += 4 * blocks
    return out


def weight_bytes(shape: ModelShape, qlora: bool = False, double_quant: bool = True, dtype: str = "bf16",
                 upcast_unquantised: bool = False) -> dict:
    """{"linears": bytes of the seven projections x layers, "other": embeddings + lm_head + norms + biases}.

    upcast_unquantised: hf + QLoRA (prepare_model_for_kbit_training casts non-4-bit parameters to fp32).
    """
    b = DTYPE_BYTES[dtype]
    if qlora:
        linears = shape.layers * sum(nf4_bytes(i * o, double_quant) for i, o in shape.linear_shapes().values())
    else:
        linears = shape.linear_params() * b
    other_b = 4 if (qlora and upcast_unquantised) else b
    other = (shape.embedding_params() + shape.norm_params() + shape.bias_params()) * other_b
    return {"linears": int(linears), "other": int(other)}


def lora_param_count(config, r: int = 16) -> int:
    """LoRA parameters for rank r on the seven projections of every layer (A [r, in] + B [out, r]), as PEFT counts."""
    shape = model_shape(config)
    return shape.layers * sum(r * (i + o) for i, o in shape.linear_shapes().values())


def _chunk_size(n_tokens: int, vocab: int, hidden: int) -> int:
    from turbotune.model.kernels.fused_linear_ce import (
        default_chunk_size,  # the rule the kernel itself uses
    )
    return int(default_chunk_size(n_tokens, vocab, hidden))


def _dtype_name(dtype) -> str:
    """'bf16' | 'fp16' | 'fp32' from those names, 'bfloat16'-style names, or a torch.dtype."""
    name = str(dtype).replace("torch.", "")
    return {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}.get(name, name)


def checkpointing_mode(value) -> str:
    """Map turbotune train / FastModel settings (True, False, "offload", ...) to a planner mode."""
    if value in (False, None, "none", "false", "False"):
        return "none"
    if value == "offload":
        return "offload"
    if value in (True, "true", "True", "unsloth", "auto", "recompute"):
        return "recompute"
    raise PlanError(f"checkpointing must be one of {CHECKPOINTING_MODES}, got {value!r}")


# --------------------------------------------------------------------------------------------- the plan
@dataclass
class PlanItem:
    key: str
    label: str
    bytes: int
    phase: str        # "static" | "kept" | "layer" | "loss" | "workspace" | "overhead"
    counted: bool = True
    note: str = ""

    @property
    def gib(self) -> float:
        return self.bytes / GiB


@dataclass
class Plan:
    """Predicted peak GPU memory of one training step; `items` sum (where counted) to `total_bytes`."""
    model: str
    model_type: str
    method: str
    qlora: bool
    double_quant: bool
    dtype: str
    seq_len: int
    batch_size: int
    lora_r: int
    checkpointing: str
    items: list[PlanItem]
    peak_phase: str                 # "layer backward" or "loss"
    allocated_bytes: int            # compare with torch.cuda.max_memory_allocated()
    total_bytes: int                # allocated + fragmentation + CUDA context: what must fit the card
    base_params: int
    lora_params: int
    chunk_size: int | None = None
    per_layer_saved: dict = field(default_factory=dict)   # bytes per token, by term
    checkpointed_layers: int | None = None                # recompute: layers checkpointed (None: all)
    host_bytes: int = 0                                   # offload: pinned host memory for the layer inputs
    gpus: int = 1                                         # ranks; the items are one rank's (planner/parallel.py)
    parallel: str = "ddp"                                 # "ddp" | "fsdp" (only matters when gpus > 1)

    def item(self, key: str) -> int:
        return sum(i.bytes for i in self.items if i.key == key)

    def phase_bytes(self, phase: str) -> int:
        return sum(i.bytes for i in self.items if i.phase == phase)

    @property
    def weights_bytes(self) -> int:
        return self.item("weights_linears") + self.item("weights_other")

    @property
    def lora_bytes(self) -> int:
        return self.item("lora_params") + self.item("lora_grads") + self.item("adamw_state")

    @property
    def activation_bytes(self) -> int:
        """Activations at the peak: kept across the step + (if the peak is the layer phase) one layer's set."""
        return self.phase_bytes("kept") + (self.phase_bytes("layer") if self.peak_phase == "layer backward" else 0)

    @property
    def loss_bytes(self) -> int:
        return self.phase_bytes("loss")

    def to_dict(self) -> dict:
        d = asdict(self)
        for it, src in zip(d["items"], self.items):
            it["gib"] = round(src.gib, 4)
        d["allocated_gib"] = round(self.allocated_bytes / GiB, 4)
        d["total_gib"] = round(self.total_bytes / GiB, 4)
        return d


def _item(key, label, nbytes, phase, note="") -> PlanItem:
    return PlanItem(key, label, int(nbytes), phase, True, note)


def _static_items(shape: ModelShape, qlora: bool, double_quant: bool, dtype: str, hf_upcast: bool,
                  lora_r: int) -> tuple[list[PlanItem], int]:
    """1. weights and 2. LoRA adapters, gradients, AdamW state. Returns (items, LoRA parameter count)."""
    L = shape.layers
    w = weight_bytes(shape, qlora, double_quant, dtype, upcast_unquantised=hf_upcast)
    fmt = ("4-bit NF4" + (" + double quant" if double_quant else "")) if qlora else f"16-bit ({dtype})" \
        if DTYPE_BYTES[dtype] == 2 else dtype
    other_fmt = "fp32 (PEFT's kbit prep)" if hf_upcast else ("16-bit" if DTYPE_BYTES[dtype] == 2 else dtype)
    p = lora_param_count(shape, lora_r)
    return [
        _item("weights_linears", f"weights: decoder linears, {fmt}", w["linears"], "static",
              f"{shape.linear_params() / 1e9:.3f} B params in the seven projections x {L} layers"),
        _item("weights_other", f"weights: embeddings{' (tied lm_head)' if shape.tied else ' + lm_head'}, norms, "
              f"biases, {other_fmt}", w["other"], "static",
              f"{(shape.embedding_params() + shape.norm_params() + shape.bias_params()) / 1e6:.1f} M params"),
        _item("lora_params", f"LoRA adapters A, B (fp32, r={lora_r})", 4 * p, "static", f"{p / 1e6:.2f} M params"),
        _item("lora_grads", "LoRA gradients (fp32)", 4 * p, "static"),
        _item("adamw_state", "AdamW state: exp_avg + exp_avg_sq (fp32)", 8 * p, "static"),
    ], p


def _kept_items(shape: ModelShape, N: int, b: int, method: str, checkpointing: str, s_layer: int,
                checkpointed_layers: int | None) -> tuple[list[PlanItem], int]:
    """3. activations kept from forward to backward. Returns (items, checkpointed layers k)."""
    H, L = shape.hidden, shape.layers
    x_in = N * H * b  # one layer input (hf + QLoRA: fp32, the upcast embeddings start an fp32 residual stream)
    items: list[PlanItem] = []
    k = L  # checkpointed layers (recompute)
    if checkpointing == "none":
        items.append(_item("act_layers", f"activations: every layer's saved set ({L} x {s_layer:,} B/token)",
                           L * N * s_layer, "kept", "no checkpointing"))
    elif checkpointing == "recompute":
        k = L if checkpointed_layers is None else int(checkpointed_layers)
        if not 1 <= k <= L:
            raise PlanError(f"checkpointed_layers must be between 1 and {L}, got {checkpointed_layers}")
        items.append(_item("act_layer_inputs",
                           f"activations: checkpointed layer inputs ({k} x N·H·{x_in // (N * H)})", k * x_in,
                           "kept", "one per checkpointed decoder layer, kept from forward to backward"))
        if k < L:
            items.append(_item("act_layers", f"activations: {L - k} layers not checkpointed "
                               f"({L - k} x {s_layer:,} B/token)", (L - k) * N * s_layer, "kept",
                               f"{k} of {L} layers checkpointed"))
    else:
        items.append(_item("act_layer_inputs", "activations: last layer's input (the others on the host)", x_in,
                           "kept", f"{L - 1} layer inputs ({(L - 1) * x_in / GiB:.2f} GiB) offloaded to CPU memory"))
    last_hidden = N * H * (4 if method == "hf" else b) + 4 * N
    items.append(_item("act_last_hidden", "activations: final norm's saved input"
                       + (" (fp32 copy)" if method == "hf" and b != 4 else ""), last_hidden, "kept"))
    items.append(_item("act_rotary", "activations: rotary cos/sin (shared by all layers)", 2 * N * shape.head_dim * b,
                       "kept"))
    return items, k


def _layer_items(shape: ModelShape, N: int, b: int, a: int, method: str, qlora: bool, checkpointing: str,
                 s_recompute: int) -> list[PlanItem]:
    """One decoder layer's backward: the prefetched input, the recomputed saved set, its working set."""
    H = shape.hidden
    items: list[PlanItem] = []
    if checkpointing == "offload":
        items.append(_item("layer_prefetch", "offload: the next layer's input, prefetched from the host", N * H * b,
                           "layer"))
    if checkpointing != "none":
        items.append(_item("layer_recompute", f"one layer recomputed in backward ({s_recompute:,} B/token)",
                           N * s_recompute, "layer", "its saved set, rebuilt from the checkpoint input"))
    work = layer_working_bytes(shape, N, method, b, a, qlora, checkpointing)
    if qlora and method == "turbotune" and checkpointing != "none" and work["mlp_chunk"] is None:
        items.append(_item("layer_held_weight", "4-bit: up weight kept from recompute to backward",
                           shape.intermediate * H * b, "layer", "dequantised once for both (kernels/fused_lora.py)"))
    items.append(_item(
        "layer_working", "one layer's backward working set", work["total"], "layer",
        f"max(MLP {work['mlp'] / GiB:.2f}, attention {work['attention'] / GiB:.2f}) + gradients "
        f"{work['gradients'] / GiB:.2f}" + (f" + dequantised weight {work['dequant'] / GiB:.2f}" if qlora else "")
        + " GiB" + (f"; MLP tiled over {work['mlp_chunk']} tokens" if work["mlp_chunk"] else "")))
    return items


def _loss_items(shape: ModelShape, N: int, b: int, method: str, hf_upcast: bool) -> tuple[list[PlanItem], int | None]:
    """4. the loss: turbotune's chunked linear+CE, or hf's full logits. Returns (items, chunk size or None)."""
    H, V = shape.hidden, shape.vocab
    if method == "turbotune":
        chunk = _chunk_size(N, V, H)
        return [_item("loss_chunk", f"loss: chunked linear+CE, one [{chunk} x {V}] chunk buffer", chunk * V * b,
                      "loss", "default_chunk_size: clamp(next_pow2(ceil(N·H/V)), 512, N) rows"),
                _item("loss_hidden", "loss: grad_hidden [N, H] + final norm output", 2 * N * H * b + 20 * N,
                      "loss")], chunk
    bl = 4 if hf_upcast else b
    return [_item("loss_logits", f"loss: full logits [N, {V}] ({bl} B) + fp32 log-softmax, its grad in and out",
                  N * V * (bl + 12), "loss", f"{bl + 12} bytes per logit at the log-softmax backward"),
            _item("loss_hidden", "loss: labels, per-token losses", 20 * N, "loss")], None


def _peak(items: list[PlanItem]) -> tuple[str, int, int]:
    """Count the larger of the layer and loss phases, add workspaces and overheads (appended to `items`).
    Returns (peak phase, allocated bytes, total bytes)."""
    layer_phase = sum(i.bytes for i in items if i.phase == "layer")
    loss_phase = sum(i.bytes for i in items if i.phase == "loss")
    peak_phase = "layer backward" if layer_phase >= loss_phase else "loss"
    for i in items:
        if i.phase == ("loss" if peak_phase == "layer backward" else "layer"):
            i.counted = False
    items.append(_item("cublas_workspace", "cuBLAS workspaces", CUBLAS_WORKSPACE_BYTES, "workspace"))
    allocated = sum(i.bytes for i in items if i.counted)
    frag = int(FRAGMENTATION * allocated)
    items.append(_item("fragmentation", f"allocator fragmentation (+{FRAGMENTATION:.0%} of the allocated peak)",
                       frag, "overhead"))
    items.append(_item("cuda_context", "CUDA context (outside the allocator)", CUDA_CONTEXT_BYTES, "overhead"))
    return peak_phase, allocated, allocated + frag + CUDA_CONTEXT_BYTES


def predict_peak(config, seq_len: int, batch: int, qlora: bool = False, lora_r: int = 16,
                 checkpointing: str = "recompute", method: str = "turbotune", dtype: str = "bf16",
                 double_quant: bool = True, name: str | None = None, checkpointed_layers: int | None = None) -> Plan:
    """Predict the peak GPU memory of one LoRA (or QLoRA) training step (module docstring for every formula).

    config: a config dict, a transformers PretrainedConfig, or a ModelShape. checkpointing: "none" | "recompute"
    | "offload" (True / False are accepted too). method: "turbotune" (fused path) | "hf" (transformers + PEFT).
    checkpointed_layers (recompute only): how many decoder layers are checkpointed, the others keeping their
    whole saved set (default: all of them).
    """
    shape = model_shape(config)
    dtype = _dtype_name(dtype)
    if method not in METHODS:
        raise PlanError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if dtype not in DTYPE_BYTES:
        raise PlanError(f"dtype must be one of {', '.join(DTYPE_BYTES)}, got {dtype!r}")
    checkpointing = checkpointing_mode(checkpointing)
    for label, v in (("seq_len", seq_len), ("batch", batch), ("lora_r", lora_r)):
        if int(v) < 1:
            raise PlanError(f"{label} must be at least 1, got {v}")
    seq_len, batch, lora_r = int(seq_len), int(batch), int(lora_r)
    hf_upcast = method == "hf" and qlora  # prepare_model_for_kbit_training: fp32 norms/embeddings -> fp32 activations
    b = 4 if hf_upcast else DTYPE_BYTES[dtype]
    N, L = batch * seq_len, shape.layers
    items, p = _static_items(shape, qlora, double_quant, dtype, hf_upcast, lora_r)
    per_layer = layer_saved_bytes_per_token(shape, method, lora_r, b, ADAPTER_BYTES, n_tokens=N,
                                            checkpointing=checkpointing)
    s_layer = sum(per_layer.values())                 # bytes/token, the layer input included when the layer saves it
    s_recompute = s_layer - per_layer["layer_input"]  # what a recomputed layer adds on top of its checkpoint input
    kept, k = _kept_items(shape, N, b, method, checkpointing, s_layer, checkpointed_layers)
    items += kept
    items += _layer_items(shape, N, b, ADAPTER_BYTES, method, qlora, checkpointing, s_recompute)
    loss, chunk = _loss_items(shape, N, b, method, hf_upcast)
    items += loss
    peak_phase, allocated, total = _peak(items)
    host = (L - 1) * N * shape.hidden * b if checkpointing == "offload" else 0
    return Plan(model=name or shape.model_type, model_type=shape.model_type, method=method, qlora=bool(qlora),
                double_quant=bool(double_quant), dtype=dtype, seq_len=seq_len, batch_size=batch, lora_r=lora_r,
                checkpointed_layers=(k if checkpointing == "recompute" and k < L else None), host_bytes=host,
                checkpointing=checkpointing, items=items, peak_phase=peak_phase, allocated_bytes=int(allocated),
                total_bytes=int(total), base_params=shape.total_params(), lora_params=p, chunk_size=chunk,
                per_layer_saved=per_layer)
