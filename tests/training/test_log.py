"""The run's plot: loss per step, and GRPO's mean reward beside it where the steps log one."""
import pytest

from turbotune.training.log import plot_losses, reward_series


def test_reward_series_takes_the_steps_that_log_a_reward():
    history = [{"step": 1, "loss": 0.0, "reward": 0.25}, {"step": 2, "loss": 0.0},
               {"step": 3, "loss": 0.0, "reward": 0.75}, {"step": 4, "loss": 0.1, "reward": None}]
    assert reward_series(history) == ([1, 3], [0.25, 0.75])
    assert reward_series([{"step": 1, "loss": 1.0}]) == ([], [])


@pytest.mark.parametrize("with_reward", [False, True])
def test_plot_is_written(tmp_path, with_reward):
    pytest.importorskip("matplotlib")
    history = [{"step": i, "loss": 1.0 / i, **({"reward": i / 10} if with_reward else {})} for i in range(1, 12)]
    path = plot_losses(tmp_path, history, title="grpo loss")
    assert path == tmp_path / "loss.png" and path.stat().st_size > 1000
    assert not (tmp_path / ".loss.tmp.png").exists()
