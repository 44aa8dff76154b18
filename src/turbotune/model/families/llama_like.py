"""Patched forwards shared by the Llama-shaped families (llama, qwen2, qwen3, mistral, gemma2, gemma3, phi3).

Each `make_*(spec, state)` returns a function to be bound to one submodule instance (see
registry.set_forward); `state` is the model's TurboState (toggles, fp32-adapter backend, originals). The
functions read the module's own attributes (q_proj, head_dim, variance_epsilon, ...) at call time, so they
work whether or not PEFT has wrapped the projections, and fall back to the stock forward wherever the
fast path does not apply (a KV cache during generation, an unsupported LoRA setting, a requested output).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from turbotune._compat import attention_function, cache_from_kwargs, has_cache, sdpa_masks_leave_windows_to_attention
from turbotune.model.head import output_projection
from turbotune.model.kernels.fused_lora import lora_linear, lora_mlp, lora_qkv
from turbotune.model.kernels.lora_parts import cached_lora_part
from turbotune.model.kernels.mlp_tiling import mlp_tile_budget, mlp_token_chunk, tiled_lora_mlp
from turbotune.model.kernels.rmsnorm import rms_norm
from turbotune.model.kernels.rope import apply_rope_, rope_reference
from turbotune.model.kernels.softcap_attention import softcap_attention, softcap_attention_enabled
from turbotune.model.kernels.swiglu import geglu, swiglu
from turbotune.model.kernels.varlen_attention import varlen_attention
from turbotune.model.kernels.windowed_attention import windowed_attention
from turbotune.model.recompute import checkpoint_phase, recomputing


def _parts(state, *linears):
    """LoRA parts for every projection (with the model's fp32-adapter backend), or None when any of them can't
    take the fused path."""
    parts = []
    for lin in linears:
        part = cached_lora_part(lin, state.fp32_adapter_backend)
        if part is None:
            return None
        parts.append(part)
    return parts


def _project_qkv(attn, state, x):
    """q, k, v [bsz, seq, heads * head_dim]: three projections (q/k/v_proj, one fused LoRA call) or one fused
    projection split three ways (Phi-3's qkv_proj: LoRA on the fused linear, as PEFT puts it there)."""
    toggles = state.toggles
    fused = getattr(attn, "qkv_proj", None)
    if fused is not None:
        parts = _parts(state, fused) if toggles.fused_lora else None
        qkv = lora_linear(x, parts[0], toggles.adapter_precision) if parts is not None else fused(x)
        nq = attn.config.num_attention_heads * attn.head_dim
        nkv = attn.config.num_key_value_heads * attn.head_dim
        # q and k as tensors of their own: RoPE rotates them in place, which autograd forbids on views of a custom
        # Function's output (v stays a view)
        return qkv[..., :nq].contiguous(), qkv[..., nq:nq + nkv].contiguous(), qkv[..., nq + nkv:]
    parts = _parts(state, attn.q_proj, attn.k_proj, attn.v_proj) if toggles.fused_lora else None
    if parts is not None:
        return lora_qkv(x, *parts, adapter_precision=toggles.adapter_precision)
    return attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)


def _rotate(q, k, position_embeddings, fused: bool):
    """RoPE on q and k [bsz, seq, heads, head_dim]. A partial rotary (cos narrower than head_dim: Phi-4-mini's
    partial_rotary_factor) rotates the leading dimensions only, out of place."""
    cos, sin = position_embeddings
    rot = cos.shape[-1]
    if rot != q.shape[-1]:
        qr, kr = rope_reference(q[..., :rot], k[..., :rot], cos, sin)
        return torch.cat([qr, q[..., rot:]], dim=-1), torch.cat([kr, k[..., rot:]], dim=-1)
    return apply_rope_(q, k, cos, sin) if fused else rope_reference(q, k, cos, sin)


def make_attention_forward(spec, state):
    toggles = state.toggles

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, *args, **kwargs):
        # Generation with a KV cache, or positional extras we don't know: the stock forward is exact there.
        if args or has_cache(kwargs) or position_embeddings is None:
            return state.original_forward(self)(hidden_states, position_embeddings, attention_mask, *args, **kwargs)
        cache_from_kwargs(kwargs)  # None here: drop the keywords
        offsets = _pop_sequence_offsets(kwargs)  # a packed row's samples (padding.py; TURBOTUNE_FLASH_VARLEN=0: none)
        bsz, seq, _ = hidden_states.shape
        d = self.head_dim

        q, k, v = _project_qkv(self, state, hidden_states)
        q, k, v = q.view(bsz, seq, -1, d), k.view(bsz, seq, -1, d), v.view(bsz, seq, -1, d)
        if getattr(self, "q_norm", None) is not None:  # Qwen3: an RMSNorm over each head of q and of k, before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = _rotate(q, k, position_embeddings, toggles.rope)

        extra = {}
        window = getattr(self.config, "sliding_window", None) if spec.sliding_window_from_config \
            else getattr(self, "sliding_window", None)
        softcap = getattr(self, "attn_logit_softcapping", None)  # Gemma 2: soft-capped scores (eager attention)
        if attention_mask is PLAIN_CAUSAL:  # whole sequences (masks_left_to_us): the tiled soft-capped kernels
            attn = softcap_attention(q, k, v, self.scaling, softcap, window).reshape(bsz, seq, -1)
            return _o_proj(self, state, attn), None
        if softcap is not None and offsets is not None and softcap_attention_enabled() \
                and not (self.training and self.attention_dropout):  # packed rows: the same kernels, per sample
            attn = softcap_attention(*(t.reshape(1, bsz * seq, *t.shape[2:]) for t in (q, k, v)), self.scaling,
                                     softcap, window, offsets=offsets[0])  # offsets over the rows, end to end
            return _o_proj(self, state, attn.reshape(bsz, seq, -1)), None
        if window is not None and attention_mask is None and seq > window and softcap is None:
            # No mask for a window that binds: the lm forward asked transformers for none (windows_left_to_us)
            dropout = self.attention_dropout if self.training else 0.0
            attn = windowed_attention(q, k, v, window, self.scaling, dropout).reshape(bsz, seq, -1)
            return _o_proj(self, state, attn), None
        if offsets is not None and softcap is None and not (self.training and self.attention_dropout):
            # Attention inside each sample from the offsets (over the rows end to end) and the window: no [L, L]
            # mask (kernels/varlen_attention.py)
            attn = varlen_attention(*(t.reshape(bsz * seq, *t.shape[2:]) for t in (q, k, v)), offsets[0],
                                    offsets[1], self.scaling, window)
            return _o_proj(self, state, attn.reshape(bsz, seq, -1)), None
        if window is not None:
            extra["sliding_window"] = window
        if softcap is not None:
            extra["softcap"] = softcap
        attn, weights = attention_function(self.config, self)(
            self, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling, **extra, **kwargs)
        return _o_proj(self, state, attn.reshape(bsz, seq, -1)), weights

    return forward


def _pop_sequence_offsets(kwargs: dict):
    """(cu_seq_lens_q, max_length_q) of a packed row, taken out of the attention's keywords (the stock attention
    below gets none: SDPA would ignore them, flash would need its own layout); None without them."""
    offsets = kwargs.pop("cu_seq_lens_q", None)
    kwargs.pop("cu_seq_lens_k", None)
    longest = kwargs.pop("max_length_q", None)
    kwargs.pop("max_length_k", None)
    return None if offsets is None else (offsets, longest)


def _o_proj(attn_module, state, attn):
    parts = _parts(state, attn_module.o_proj) if state.toggles.fused_lora else None
    return lora_linear(attn, parts[0], state.toggles.adapter_precision) if parts is not None \
        else attn_module.o_proj(attn)


def windows_left_to_us(model, kwargs: dict):
    """The block in which transformers builds no SDPA mask for sliding-window layers (the patched attention
    applies the window itself when its mask is None), or a no-op context. Only where no KV cache can appear
    (with one, the stock attention runs and needs transformers' mask), no score soft-cap (which our windowed
    kernel lacks) and causal attention (EmbeddingGemma's bidirectional option is not)."""
    cfg = model.config
    use_cache = kwargs.get("use_cache")
    no_cache = not has_cache(kwargs) and not (use_cache if use_cache is not None else getattr(cfg, "use_cache", False))
    if no_cache and getattr(cfg, "sliding_window", None) and getattr(cfg, "_attn_implementation", None) == "sdpa" \
            and getattr(cfg, "attn_logit_softcapping", None) is None \
            and not getattr(cfg, "use_bidirectional_attention", False):
        return sdpa_masks_leave_windows_to_attention()
    return contextlib.nullcontext()


class _PlainCausal:
    """Stands for a causal (sliding-window) mask over whole sequences: no padding, no packing, no cache."""
    def __repr__(self):
        return "turbotune.PLAIN_CAUSAL"


PLAIN_CAUSAL = _PlainCausal()


@contextlib.contextmanager
def masks_left_to_us(model, args, kwargs: dict):
    """The masks our patched attention builds itself, for a call of the model (the lm forward, or its inner model
    from trainer_step's fused head): soft-capped layers' PLAIN_CAUSAL (put into `kwargs`) and sliding windows."""
    plain_causal_masks(model, args, kwargs)
    with windows_left_to_us(model, kwargs):
        yield


def plain_causal_masks(model, args, kwargs: dict) -> None:
    """Soft-capped attention (Gemma 2) on kernels/softcap_attention.py: where the batch is whole sequences, hand
    every layer PLAIN_CAUSAL instead of the [B, 1, L, L] masks transformers would build for eager attention (the
    model takes a prepared {layer type: mask} mapping, as generate() passes it). The patched attention applies the
    causal order and its layer's window itself; a recomputed layer gets the same object back. Only in training,
    with the switch on, no attention dropout, no padding mask, no position ids (packed rows), no KV cache."""
    cfg = model.config
    layer_types = getattr(cfg, "layer_types", None)
    use_cache = kwargs.get("use_cache")
    if not (softcap_attention_enabled() and model.training and getattr(cfg, "attn_logit_softcapping", None)
            and layer_types and not getattr(cfg, "attention_dropout", 0.0) and len(args) <= 1
            and kwargs.get("attention_mask") is None and kwargs.get("position_ids") is None
            and not has_cache(kwargs) and not (use_cache if use_cache is not None else getattr(cfg, "use_cache", False))
            and not getattr(cfg, "use_bidirectional_attention", False)):
        return
    kwargs["attention_mask"] = {kind: PLAIN_CAUSAL for kind in set(layer_types)}


def make_mlp_forward(spec, state):
    toggles, act = state.toggles, spec.act

    def forward(self, x):
        if _decoding(x):  # one new token per row, no grad: the stock forward is exact and launches less from Python
            return state.original_forward(self)(x)
        if getattr(self, "gate_up_proj", None) is not None:
            return _fused_gate_up_mlp(self, state, x, act)
        parts = _parts(state, self.gate_proj, self.up_proj, self.down_proj) if toggles.fused_lora else None
        if parts is not None:
            # Very long sequences (or any length under offloaded checkpointing, mlp_tile_budget): tile over
            # tokens so no [tokens, intermediate] tensor outlives one chunk.
            chunk = mlp_token_chunk(x.numel() // x.shape[-1], parts[0].out_features, x.element_size(),
                                    mlp_tile_budget("offload" if state.offload is not None else None)) \
                if toggles.mlp_tiling else None
            unused = spec.mlp_output_only_to_residual and recomputing()
            if chunk is not None:
                return tiled_lora_mlp(x, *parts, act=act, adapter_precision=toggles.adapter_precision,
                                      chunk_tokens=chunk, output_unused=unused)
            return lora_mlp(x, *parts, act=act, adapter_precision=toggles.adapter_precision,
                            output_unused=unused, checkpoint_phase=checkpoint_phase())
        if not toggles.act_mul:
            return state.original_forward(self)(x)
        gate, up = self.gate_proj(x), self.up_proj(x)
        h = swiglu(gate, up) if act == "silu" else geglu(gate, up)
        return self.down_proj(h)

    return forward


def _decoding(x) -> bool:
    """A generation step after the prompt: [batch, 1, hidden] without grad (the attention takes the stock forward
    there too, as it has a KV cache)."""
    return x.dim() == 3 and x.shape[1] == 1 and not torch.is_grad_enabled()


def _fused_gate_up_mlp(mlp, state, x, act):
    """Phi-3's MLP: one gate_up_proj (gate then up halves, LoRA on the fused linear), the gated activation, then
    down_proj; each projection through the fused LoRA linear."""
    toggles = state.toggles
    parts = _parts(state, mlp.gate_up_proj, mlp.down_proj) if toggles.fused_lora else None
    if parts is None and not toggles.act_mul:
        return state.original_forward(mlp)(x)
    gate_up = lora_linear(x, parts[0], toggles.adapter_precision) if parts is not None else mlp.gate_up_proj(x)
    gate, up = gate_up.chunk(2, dim=-1)
    h = swiglu(gate, up) if act == "silu" else geglu(gate, up)
    return lora_linear(h, parts[1], toggles.adapter_precision) if parts is not None else mlp.down_proj(h)


def make_norm_forward(spec, state):
    def forward(self, hidden_states):
        eps = getattr(self, "variance_epsilon", None)
        if eps is None:
            eps = self.eps
        return rms_norm(hidden_states, self.weight, eps, offset=spec.rms_offset, casting=spec.rms_casting)

    return forward


def make_lm_forward(spec, state):
    """Causal-LM head: with labels in training, a chunked linear + cross-entropy; no [tokens, vocab] logits."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from turbotune.model.kernels.fused_linear_ce import fused_linear_cross_entropy

    toggles = state.toggles

    def forward(self, *args, **kwargs):
        if spec is None:  # the generic path keeps the stock attention, which needs transformers' masks
            return _forward(self, *args, **kwargs)
        with masks_left_to_us(self, args, kwargs):
            return _forward(self, *args, **kwargs)

    def _forward(self, *args, labels=None, **kwargs):
        projection = output_projection(self.get_output_embeddings())  # None: a head we don't compute ourselves
        if labels is None or not self.training or not toggles.fused_ce or projection is None or has_cache(kwargs) \
                or kwargs.get("use_cache"):
            return state.original_forward(self)(*args, labels=labels, **kwargs)
        num_items = kwargs.pop("num_items_in_batch", None)
        shift_labels = kwargs.pop("shift_labels", None)
        kwargs.pop("logits_to_keep", None)
        kwargs.pop("return_dict", None)
        outputs = self.model(*args, **kwargs)
        hidden = outputs[0] if isinstance(outputs, tuple) else outputs.last_hidden_state
        if shift_labels is None:
            # Same shift as transformers' ForCausalLMLoss: token t predicts label t+1; the last predicts nothing.
            shift_labels = F.pad(labels[..., 1:], (0, 1), value=-100)
        cfg = self.config
        loss = fused_linear_cross_entropy(
            hidden.reshape(-1, hidden.shape[-1]), projection[0], shift_labels.reshape(-1).to(hidden.device),
            bias=projection[1], num_items_in_batch=num_items,
            softcap=getattr(cfg, "final_logit_softcapping", None),
            logit_scale=getattr(cfg, "logit_scale", None) or 1.0)
        return CausalLMOutputWithPast(loss=loss, logits=None,
                                      hidden_states=getattr(outputs, "hidden_states", None),
                                      attentions=getattr(outputs, "attentions", None))

    return forward


def register_llama_shaped(name: str, model_types: tuple[str, ...], **spec):
    """Register a family that runs on these shared forwards; `spec` holds only how it differs (FamilySpec's
    fields: norm casting and offset, activation, whether the MLP's output only joins the residual stream)."""
    from turbotune.model.families.registry import FamilySpec, register_family

    return register_family(FamilySpec(name=name, model_types=model_types,
                                      make_attention_forward=make_attention_forward,
                                      make_mlp_forward=make_mlp_forward, make_norm_forward=make_norm_forward,
                                      make_lm_forward=make_lm_forward, **spec))
