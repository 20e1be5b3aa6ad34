"""The run directory's file I/O: atomic JSON, the one checked read of a checkpoint, finding the one to resume from."""

import json
import os

import pytest
import torch

from fastcl.train.checkpoint import (
    CHECKPOINT,
    PREVIOUS_CHECKPOINT,
    CheckpointError,
    atomic_json,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)

STATE = {"version": 2, "epoch": 1, "step": 4, "epoch_step": 0, "model": {}, "optimizer": {}, "scheduler": {},
         "rng": [], "config": {"dataset": "spurious-cues"}}


def test_atomic_json_writes_the_object_and_leaves_no_temporary(tmp_path):
    path = str(tmp_path / "summary.json")
    atomic_json(path, {"a": (1, 2), "b": None})
    atomic_json(path, {"a": [3]})
    with open(path) as f:
        assert json.load(f) == {"a": [3]}
    assert os.listdir(tmp_path) == ["summary.json"]


def test_atomic_json_writes_numbers_json_cannot_hold_as_strings(tmp_path):
    """NaN and infinities (a metric of an empty cue group) are written as strings: the file stays strict JSON."""
    path = str(tmp_path / "summary.json")
    atomic_json(path, {"a": float("nan"), "b": [1.5, float("inf"), (float("-inf"),)], "c": {"d": None}})

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    with open(path) as f:
        assert json.loads(f.read(), parse_constant=refuse) == {"a": "nan", "b": [1.5, "inf", ["-inf"]],
                                                               "c": {"d": None}}


def test_read_checkpoint_names_the_file_and_what_is_wrong(tmp_path):
    with pytest.raises(CheckpointError, match="nope.pt does not exist"):
        read_checkpoint(str(tmp_path / "nope.pt"))
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="other.pt cannot be used: not a fastcl-pretrain checkpoint"):
        read_checkpoint(str(tmp_path / "other.pt"))
    torch.save(STATE | {"version": 99}, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="checkpoint format 99"):
        read_checkpoint(str(tmp_path / "future.pt"))
    torch.save(STATE, tmp_path / CHECKPOINT)
    assert read_checkpoint(str(tmp_path / CHECKPOINT))["step"] == 4


def test_load_checkpoint_finds_the_one_to_resume_from(tmp_path):
    assert load_checkpoint(str(tmp_path)) is None
    torch.save(STATE, tmp_path / PREVIOUS_CHECKPOINT)  # a kill between the two renames of a rotation
    ckpt, path = load_checkpoint(str(tmp_path))
    assert path.endswith(PREVIOUS_CHECKPOINT) and ckpt["epoch"] == 1
    torch.save(STATE | {"epoch": 2, "step": 8}, tmp_path / CHECKPOINT)
    ckpt, path = load_checkpoint(str(tmp_path))
    assert path.endswith(CHECKPOINT) and ckpt["epoch"] == 2


@pytest.mark.parametrize("stage", ["read back", "rotation"])
def test_an_interrupted_checkpoint_write_leaves_no_temporary(tmp_path, monkeypatch, stage):
    """Ctrl-C (KeyboardInterrupt) while the new checkpoint is read back or rotated in: the temporary file is removed,
    the interrupt goes on, and the current checkpoint is intact."""
    from fastcl.train import checkpoint

    path = str(tmp_path / CHECKPOINT)
    save_checkpoint(path, STATE)

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    if stage == "read back":
        monkeypatch.setattr(checkpoint, "_read_checkpoint", interrupt)
    else:
        monkeypatch.setattr(checkpoint.os, "replace", interrupt)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, STATE | {"epoch": 2, "step": 8})
    monkeypatch.undo()
    assert os.listdir(tmp_path) == [CHECKPOINT]
    assert read_checkpoint(path)["epoch"] == 1


def test_ctrl_c_while_torch_save_writes_stays_an_interrupt(tmp_path, monkeypatch):
    """Ctrl-C in the middle of ``torch.save``'s writes: its zip writer fails on closing (a RuntimeError about the
    file position); the interrupt, not that error, comes out, and no temporary file stays."""
    import io

    from fastcl.train import checkpoint

    path = str(tmp_path / CHECKPOINT)
    save_checkpoint(path, STATE)

    class InterruptedFile(io.FileIO):
        writes = 0

        def write(self, b):
            InterruptedFile.writes += 1
            if InterruptedFile.writes == 3:
                raise KeyboardInterrupt
            return super().write(b)

    monkeypatch.setattr(checkpoint, "open", lambda name, mode: InterruptedFile(name, mode), raising=False)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, STATE | {"epoch": 2, "step": 8, "model": {"w": torch.zeros(1000)}})
    monkeypatch.undo()
    assert os.listdir(tmp_path) == [CHECKPOINT]
    assert read_checkpoint(path)["epoch"] == 1
