"""The no-grad calls' graphs (training/forward_graphs.py): what they are keyed by, and that off a GPU they stay
eager with the same results. Capture and replay run in tests/gpu/test_trainer_step_gpu.py."""
import torch

from turbotune import FastModel
from turbotune.training.forward_graphs import ForwardGraphs
from turbotune.training.trainer_step import trainer_step_of


def test_adapter_state_tells_the_reference_pass_apart(tiny_llama_dir):
    """A reference pass runs the same shapes with the adapters disabled (PEFT's disable_adapter(), as TRL does) or
    under another adapter: a graph captured in one state must not replay in another."""
    model, _ = FastModel.from_pretrained(str(tiny_llama_dir), verbose=False)
    model = FastModel.get_peft_model(model, r=4, random_state=1, verbose=False)
    step = trainer_step_of(model)
    model.train()
    policy = step._adapter_state()
    with model.disable_adapter():
        reference = step._adapter_state()
    assert reference != policy and step._adapter_state() == policy
    model.eval()
    assert step._adapter_state() != policy


def test_cpu_calls_stay_eager():
    seen = []

    def fn(x, scale):
        seen.append(x.shape)
        return {"y": x * scale}

    graphs = ForwardGraphs(fn)
    x = torch.arange(6.0).reshape(2, 3)
    for _ in range(3):
        assert torch.equal(graphs({"x": x}, {"scale": 2.0}, state=("a",))["y"], x * 2)
    assert graphs.eager_calls == 3 and graphs.captures == graphs.replays == 0 and len(seen) == 3
