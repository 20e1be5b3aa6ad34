"""The files of a run directory and their safe writing: atomic writes, checkpoints with rotation, resuming.

Every file is written beside its final name (``NAME.tmpPID``), fsynced, then renamed over it, so a reader sees the old
or the new file, never a part of one; temporaries of killed processes are removed by
:func:`remove_stale_temporaries`. A checkpoint is also read back and checked before it is rotated in
(``checkpoint.pt`` -> ``checkpoint.prev.pt``).

One contract for reading checkpoints, used by ``fastcl-pretrain --resume`` and by ``fastcl-shortcuts``: every read
goes through the same check (a dict with the keys a ``fastcl-pretrain`` checkpoint has, in a format version this
code reads); a file that fails it raises :class:`CheckpointError`, whose message names the file, what is wrong and
what to do. :func:`read_checkpoint` reads one file; :func:`load_checkpoint` finds the checkpoint to resume from in a
run directory.
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import random
import re
from typing import Any

import torch

from fastcl.train.errors import ConfigError, RunError

__all__ = ["CHECKPOINT", "CONFIG", "METRICS", "NON_FINITE_JSON", "PREVIOUS_CHECKPOINT", "RUN_FILES", "SUMMARY",
           "CheckpointError", "atomic_json", "atomic_write", "json_safe", "load_checkpoint", "read_checkpoint",
           "read_metrics", "remove_stale_temporaries", "rng_restore", "rng_snapshot", "run_files", "save_checkpoint"]

CHECKPOINT = "checkpoint.pt"
PREVIOUS_CHECKPOINT = "checkpoint.prev.pt"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CONFIG = "config.json"
# the files a run writes in --out: their presence marks a run directory, --overwrite deletes them
RUN_FILES = (CHECKPOINT, PREVIOUS_CHECKPOINT, METRICS, SUMMARY, CONFIG, "loss.png", "probe.png")
CHECKPOINT_VERSION = 2


def run_files(out: str) -> list[str]:
    """The files of a run (:data:`RUN_FILES`) present in ``out``."""
    if not os.path.isdir(out):
        return []
    return [f for f in RUN_FILES if os.path.exists(os.path.join(out, f))]


def _tmp_name(path: str) -> str:
    return f"{path}.tmp{os.getpid()}"


def _fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):  # make a rename durable
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_tmp(path: str, write) -> str:
    """Write through ``write(file)`` into ``path.tmpPID`` and fsync it; on any failure (disk full, ...) the
    temporary file is removed and the error re-raised."""
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e.__context__, KeyboardInterrupt) and not isinstance(e, KeyboardInterrupt):
            # Ctrl-C during torch.save's writes: its zip writer then fails on closing, which hides the interrupt
            raise e.__context__ from None
        raise
    return tmp


def atomic_write(path: str, write) -> None:
    """Replace ``path`` atomically: a reader sees the old or the new file, never a part of one."""
    os.replace(_write_tmp(path, write), path)
    _fsync_dir(path)


NON_FINITE_JSON = ("nan", "inf", "-inf")  # how atomic_json writes NaN and the infinities


def json_safe(obj: Any) -> Any:
    """``obj`` with its NaN and infinite floats as strings (``'nan'``, ``'inf'``, ``'-inf'``), tuples as lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def atomic_json(path: str, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically (values JSON cannot hold, NaN and infinities included,
    are written as strings)."""
    text = json.dumps(json_safe(obj), indent=2, default=str, allow_nan=False)
    atomic_write(path, lambda f: f.write(text.encode()))


def remove_stale_temporaries(out_dir: str) -> list[str]:
    """Delete ``*.tmpPID`` files in ``out_dir`` left by processes that no longer run (a kill during a write);
    returns their names."""
    removed = []
    for path in glob.glob(os.path.join(glob.escape(out_dir), "*.tmp*")):
        m = re.search(r"\.tmp(\d+)$", path)
        if m is None:
            continue
        pid = int(m.group(1))
        if pid != os.getpid():
            try:
                os.kill(pid, 0)
                continue  # that process still runs (another rank or run): not ours to delete
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
        with contextlib.suppress(OSError):
            os.remove(path)
            removed.append(os.path.basename(path))
    return removed


class CheckpointError(ConfigError):
    """``--resume`` found a checkpoint it cannot use; the message names the file and what to do."""


_CHECKPOINT_KEYS = ("version", "epoch", "step", "epoch_step", "model", "optimizer", "scheduler", "rng", "config")


def _read_checkpoint(path: str) -> dict[str, Any]:
    """``torch.load`` of a checkpoint with its keys checked; raises ``ValueError`` saying what is wrong."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, random bytes, unpickling errors, I/O errors ...
        raise ValueError(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'unreadable'}") from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"holds a {type(ckpt).__name__}, not a fastcl-pretrain checkpoint")
    missing = [k for k in _CHECKPOINT_KEYS if k not in ckpt]
    if ckpt.get("version") not in (None, CHECKPOINT_VERSION) and "version" not in missing:
        raise ValueError(f"checkpoint format {ckpt.get('version')} (this fastcl-pretrain writes and reads "
                         f"{CHECKPOINT_VERSION})")
    if missing:
        raise ValueError(f"not a fastcl-pretrain checkpoint (no {', '.join(missing)})")
    return ckpt


def read_checkpoint(path: str) -> dict[str, Any]:
    """The checkpoint in the file ``path``, checked; raises :class:`CheckpointError` naming the file and what is
    wrong when it is missing, unreadable or not a ``fastcl-pretrain`` checkpoint."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} does not exist (a fastcl-pretrain checkpoint is OUT/{CHECKPOINT})")
    try:
        return _read_checkpoint(path)
    except ValueError as e:
        raise CheckpointError(f"{path} cannot be used: {e}") from None


def save_checkpoint(path: str, state: dict[str, Any]) -> None:
    """Write ``state`` beside ``path``, read it back and check it, then rotate: the current ``path`` becomes
    ``checkpoint.prev.pt`` and the new file takes its place. A failure leaves the current checkpoint and no
    temporary file; it raises :class:`RunError`."""
    prev = os.path.join(os.path.dirname(path), PREVIOUS_CHECKPOINT)
    try:
        tmp = _write_tmp(path, lambda f: torch.save(state, f))
    except OSError as e:
        raise RunError(f"could not write the checkpoint {path}: {e.strerror or e} (the previous checkpoint, if "
                       f"any, is intact; free space and rerun with --resume)") from None
    try:
        back = _read_checkpoint(tmp)
        if back["epoch"] != state["epoch"] or back["step"] != state["step"]:
            raise ValueError(f"reads back epoch {back['epoch']} step {back['step']}")
        if os.path.exists(path):
            os.replace(path, prev)
        os.replace(tmp, path)
    except BaseException as e:  # also Ctrl-C: no temporary stays behind
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, ValueError):
            raise RunError(f"the checkpoint written to {path} did not read back ({e}); the previous checkpoint is "
                           f"intact: check the disk and rerun with --resume") from None
        if isinstance(e, OSError):
            raise RunError(f"could not rotate the checkpoint {path} in: {e.strerror or e} (the previous checkpoint "
                           f"is {path if os.path.exists(path) else prev}; rerun with --resume)") from None
        raise
    _fsync_dir(path)


def load_checkpoint(out_dir: str) -> tuple[dict[str, Any], str] | None:
    """The checkpoint to resume from and its path, ``None`` when ``out_dir`` has none. ``checkpoint.pt`` is
    used; ``checkpoint.prev.pt`` only when ``checkpoint.pt`` is missing (a kill between the two renames of a
    rotation). A damaged file raises :class:`CheckpointError` naming it and what to do."""
    path, prev = os.path.join(out_dir, CHECKPOINT), os.path.join(out_dir, PREVIOUS_CHECKPOINT)
    if not os.path.exists(path):
        if not os.path.exists(prev):
            return None
        path = prev
    try:
        return _read_checkpoint(path), path
    except ValueError as e:
        problem = f"{path} is damaged ({e})"
    if path != prev and os.path.exists(prev):
        try:
            good = _read_checkpoint(prev)
        except ValueError:
            pass
        else:
            raise CheckpointError(f"{problem}; the previous checkpoint {prev} (epoch {good['epoch']}, step "
                                  f"{good['step']}) is intact: move it to {path} and rerun with --resume, or "
                                  f"start over with --overwrite")
    raise CheckpointError(f"{problem} and there is no intact earlier checkpoint: start over with --overwrite "
                          f"(or restore {path} from a copy)")


def read_metrics(path: str) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl`` (none when it is missing; a line cut by a kill is skipped)."""
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                with contextlib.suppress(json.JSONDecodeError):  # a line cut by a kill
                    out.append(json.loads(line))
    return out


def rng_snapshot(device: torch.device, generators: dict[str, torch.Generator]) -> dict[str, Any]:
    """The random states a checkpoint holds: torch, Python, CUDA (on GPU) and the named generators."""
    snap: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        snap["cuda"] = torch.cuda.get_rng_state(device)
    for name, g in generators.items():
        snap[name] = g.get_state()
    return snap


def rng_restore(snap: dict[str, Any], device: torch.device, generators: dict[str, torch.Generator]) -> None:
    """Set the random states of :func:`rng_snapshot` back."""
    torch.set_rng_state(snap["torch"])
    random.setstate(snap["python"])
    if device.type == "cuda" and "cuda" in snap:
        torch.cuda.set_rng_state(snap["cuda"], device)
    for name, g in generators.items():
        g.set_state(snap[name])
