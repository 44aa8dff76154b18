"""TRL's fused head (trainer_step.fused_head_forward) calls the inner model directly, not the patched lm forward:
it still leaves sliding windows and Gemma 2's soft-capped layers to turbotune's attention, and its per-token
log-probabilities equal the unpatched model's."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import make_tiny_model, nonzero_lora_b  # noqa: E402

from turbotune import FastModel  # noqa: E402
from turbotune.model.families import llama_like  # noqa: E402
from turbotune.training.trainer_step import fused_head_forward  # noqa: E402

CASES = {  # family, overrides, the attention function the patched model should reach
    "mistral": ("mistral", {"sliding_window": 8}, "windowed_attention"),
    "gemma2": ("gemma2", {"head_dim": 16, "sliding_window": 8, "query_pre_attn_scalar": 16,
                          "attn_logit_softcapping": 0.5}, "softcap_attention"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_head_leaves_masks_to_the_patched_attention(case, tmp_path, smol_tokenizer, monkeypatch):
    from trl.trainer.utils import add_fused_lm_head

    from turbotune._compat import unwrap_peft
    family, overrides, target = CASES[case]
    monkeypatch.setenv("TURBOTUNE_SOFTCAP_ATTENTION", "1")
    calls = []
    real = getattr(llama_like, target)
    monkeypatch.setattr(llama_like, target, lambda *a, **k: calls.append(1) or real(*a, **k))
    folder = make_tiny_model(tmp_path, smol_tokenizer, family, **overrides)
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    out = {}
    for patch in (False, True):
        model, _ = FastModel.from_pretrained(str(folder), verbose=False, patch=patch)
        model = nonzero_lora_b(FastModel.get_peft_model(model, r=8, random_state=5, verbose=False,
                                                        use_gradient_checkpointing=False))
        add_fused_lm_head(unwrap_peft(model), outputs=("log_probs",))  # as TRL's trainers do
        model.train()
        with torch.no_grad():
            out[patch] = fused_head_forward(model, labels=ids, input_ids=ids).log_probs
        assert bool(calls) == patch
    torch.testing.assert_close(out[True], out[False], rtol=1e-5, atol=1e-5)
