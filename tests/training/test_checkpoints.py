"""Atomic writes: a failure mid-save leaves the previous checkpoint intact and no half-written one."""
import json

import pytest

from turbotune.training import checkpoints as ckpt
def test_write_atomically_failure_keeps_old(tmp_path):
    target = tmp_path / "checkpoint-1"
    ckpt.write_atomically(target, lambda d: (d / "a.txt").write_text("old"))

    def broken(d):
        (d / "a.txt").write_text("new, half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        ckpt.write_atomically(target, broken)
    assert (target / "a.txt").read_text() == "old"
    assert not list(tmp_path.glob(".*tmp*"))


def test_list_and_rotate(tmp_path):
    for step in (2, 10, 4):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        (d / "trainer_state.json").write_text(json.dumps({"step": step}))
    (tmp_path / "checkpoint-99").mkdir()  # no trainer_state.json: not a checkpoint
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2, 4, 10]
    assert ckpt.latest_checkpoint(tmp_path).name == "checkpoint-10"
    ckpt.rotate(tmp_path, keep=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [4, 10]


def test_clean_partial(tmp_path):
    (tmp_path / ".checkpoint-3.tmp-abc").mkdir()
    assert ckpt.clean_partial(tmp_path) == 1
    assert not list(tmp_path.iterdir())
