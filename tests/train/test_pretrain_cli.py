"""fastcl-pretrain as a user (or a hostile tester) runs it: nothing lost or mixed, damaged checkpoints named,
configuration errors in one line before any training, failures after training still summarised.

Every case runs the real command in a child process at tiny settings."""

import json
import os
import resource
import subprocess
import sys

import pytest
import torch

import fastcl
from fastcl.train import evaluate, pretrain
from fastcl.train.stages import CRASH_AFTER_STEPS_ENV

REPO = os.path.dirname(os.path.dirname(os.path.abspath(fastcl.__file__)))
TINY = ["--train-samples", "64", "--val-samples", "32", "--test-samples", "32", "--image-size", "16",
        "--widths", "4,8", "--proj-dim", "8", "--batch-size", "32", "--dfr-repeats", "1", "--threads", "1",
        "--probe-every", "0", "--quiet", "--no-plots"]


def env():
    e = dict(os.environ)
    e["PYTHONPATH"] = REPO + os.pathsep + e.get("PYTHONPATH", "")
    e["PYTHONDONTWRITEBYTECODE"] = "1"
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    return e


def cli(*args, preexec_fn=None):
    return subprocess.run([sys.executable, "-m", "fastcl.train.pretrain", *args], env=env(), capture_output=True,
                          text=True, timeout=300, preexec_fn=preexec_fn)


def ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def one_line_error(proc, code=2):
    """The process failed with ``code`` and said why in exactly one line, without a traceback."""
    assert proc.returncode == code, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("fastcl-pretrain: error: ")]
    assert len(errors) == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return errors[0]


def listing(out):
    return sorted(os.listdir(out))


def read(path):
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def two_epoch_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("base") / "run")
    ok(cli(*TINY, "--epochs", "2", "--out", out))
    return out


# ---- 1. an existing run directory is never touched without an explicit choice


def test_rerun_into_an_existing_run_is_refused_and_touches_nothing(two_epoch_run):
    out = two_epoch_run
    before = {name: read(os.path.join(out, name)) for name in listing(out)}
    assert {"checkpoint.pt", "checkpoint.prev.pt", "metrics.jsonl", "summary.json", "config.json"} <= set(before)
    line = one_line_error(cli(*TINY, "--epochs", "2", "--head", "fixed", "--out", out))
    assert "already holds a run" in line and "--resume" in line and "--overwrite" in line
    assert {name: read(os.path.join(out, name)) for name in listing(out)} == before


def test_overwrite_replaces_every_file_of_the_earlier_run(tmp_path):
    out = str(tmp_path / "run")
    ok(cli(*TINY, "--epochs", "2", "--out", out))
    proc = ok(cli(*TINY, "--epochs", "1", "--head", "fixed", "--out", out, "--overwrite"))
    assert "--overwrite: deleted" in proc.stderr
    # one epoch: no rotation yet, so the two-epoch run's checkpoint.prev.pt must be gone, not left beside
    assert listing(out) == ["checkpoint.pt", "config.json", "metrics.jsonl", "summary.json"]
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    ckpt = torch.load(os.path.join(out, "checkpoint.pt"), map_location="cpu", weights_only=True)
    assert summary["config"]["head"] == config["head"] == ckpt["config"]["head"] == "fixed"
    with open(os.path.join(out, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    assert [r["step"] for r in recs if r["type"] == "step"] == [1, 2]


def test_resume_and_overwrite_together_are_refused(tmp_path):
    line = one_line_error(cli(*TINY, "--out", str(tmp_path / "o"), "--resume", "--overwrite"))
    assert "--overwrite" in line and "--resume" in line


# ---- 2. damaged checkpoints, failed writes, temporaries


@pytest.mark.parametrize("damage", ["truncated", "empty", "random"])
def test_a_damaged_checkpoint_is_named_and_the_previous_one_is_kept(tmp_path, two_epoch_run, damage):
    out = str(tmp_path / "run")
    os.makedirs(out)
    for name in listing(two_epoch_run):
        with open(os.path.join(out, name), "wb") as f:
            f.write(read(os.path.join(two_epoch_run, name)))
    good = read(os.path.join(out, "checkpoint.pt"))
    bad = {"truncated": good[: len(good) // 2], "empty": b"",
           "random": torch.randint(0, 256, (5000,), generator=torch.Generator().manual_seed(1),
                                   dtype=torch.uint8).numpy().tobytes()}[damage]
    with open(os.path.join(out, "checkpoint.pt"), "wb") as f:
        f.write(bad)
    line = one_line_error(cli(*TINY, "--epochs", "2", "--out", out, "--resume"))
    assert f"{os.path.join(out, 'checkpoint.pt')} is damaged" in line
    assert f"{os.path.join(out, 'checkpoint.prev.pt')} (epoch 1, step 2) is intact" in line
    assert read(os.path.join(out, "checkpoint.pt")) == bad  # left for the user to inspect
    # doing what the message says loses one epoch, no more
    os.replace(os.path.join(out, "checkpoint.prev.pt"), os.path.join(out, "checkpoint.pt"))
    proc = ok(cli(*TINY, "--epochs", "2", "--out", out, "--resume"))
    assert "1/2 epochs done" in proc.stderr


def test_a_damaged_checkpoint_without_a_previous_one_says_start_over(tmp_path):
    out = str(tmp_path / "run")
    os.makedirs(out)
    with open(os.path.join(out, "checkpoint.pt"), "wb") as f:
        f.write(b"PK\x03\x04 not really a zip")
    line = one_line_error(cli(*TINY, "--out", out, "--resume"))
    assert "checkpoint.pt is damaged" in line and "--overwrite" in line


def _limit_file_size():
    resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))  # metrics / config fit, the ~40 kB checkpoint not


@pytest.mark.skipif(not hasattr(resource, "RLIMIT_FSIZE"), reason="needs RLIMIT_FSIZE")
def test_a_failed_checkpoint_write_leaves_no_temporary_and_says_so(tmp_path):
    out = str(tmp_path / "run")
    proc = cli(*TINY, "--epochs", "1", "--out", out, preexec_fn=_limit_file_size)
    line = one_line_error(proc, code=1)
    assert "could not write the checkpoint" in line and "File too large" in line
    assert not [name for name in listing(out) if ".tmp" in name]
    with open(os.path.join(out, "summary.json")) as f:  # the summary says training did not complete
        summary = json.load(f)
    assert summary["training"]["completed"] is False and "could not write" in summary["training"]["error"]


def test_temporaries_of_killed_processes_are_removed(tmp_path, two_epoch_run):
    out = str(tmp_path / "run")
    os.makedirs(out)
    dead_pid = 2**22 + 12345  # above the default pid_max: no such process
    stale = os.path.join(out, f"checkpoint.pt.tmp{dead_pid}")
    with open(stale, "wb") as f:
        f.write(b"half a checkpoint")
    proc = ok(cli(*TINY, "--epochs", "1", "--out", out, "--resume"))
    assert "removed 1 temporary file(s)" in proc.stderr
    assert not os.path.exists(stale)


# ---- 3.-6. check before training; one line and exit 2 for configuration errors


@pytest.mark.parametrize("args, message", [
    (["--val-samples", "0"], "--val-samples must be at least 4 x --classes = 8"),
    (["--test-samples", "0"], "--test-samples must be at least 4 x --classes = 8"),
    (["--train-samples", "0"], "--train-samples must be positive"),
    (["--lr", "-0.1"], "--lr must be a positive number"),
    (["--lr", "nan"], "--lr must be a positive number"),
    (["--classes", "9"], "--classes must lie in [2, 8]"),
    (["--image-size", "8"], "--image-size must be at least 16"),
    (["--device", "gpu"], "--device 'gpu'"),
    (["--micro-batch-size", "1"], "BatchNorm statistics would come from 1 sample(s) per micro-batch"),
    (["--stream"], "--stream reads image files"),
    (["--encoder", "vgg"], "invalid choice: 'vgg'"),
    (["--probe-every", "-2"], "--probe-every must be >= 0 (or -1 for every max(1, epochs // 5)), got -2"),
])
def test_configuration_errors_are_one_line_before_training(tmp_path, args, message):
    out = str(tmp_path / "o")
    a = [x for x in TINY if x != "--quiet"]
    line = one_line_error(cli(*a, *args, "--out", out))
    assert message in line, line
    assert not os.path.exists(os.path.join(out, "metrics.jsonl"))  # nothing trained, nothing written


def test_crash_test_hook_is_an_environment_variable_not_an_option(tmp_path, monkeypatch, capsys):
    """FASTCL_TEST_CRASH_AFTER_STEPS is the crash hook of the resume tests; --crash-after-steps is no option."""
    with pytest.raises(SystemExit):
        pretrain.main([*TINY, "--out", str(tmp_path / "o"), "--crash-after-steps", "1"])
    assert "unrecognized arguments: --crash-after-steps" in capsys.readouterr().err
    monkeypatch.setenv(CRASH_AFTER_STEPS_ENV, "soon")
    assert pretrain.main([*TINY, "--epochs", "1", "--out", str(tmp_path / "o")]) == 2
    assert f"{CRASH_AFTER_STEPS_ENV} must be a whole number >= 0, got 'soon'" in capsys.readouterr().err


def test_out_that_is_a_file_or_not_writable(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    assert "is a file" in one_line_error(cli(*TINY, "--out", str(path)))
    assert "not writable" in one_line_error(cli(*TINY, "--out", str(path / "sub")))
    assert "--out must name a directory" in one_line_error(cli(*TINY, "--out", ""))
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        try:
            assert "not writable" in one_line_error(cli(*TINY, "--out", str(ro / "run")))
        finally:
            ro.chmod(0o755)


def test_resume_after_the_training_set_changed_is_refused(tmp_path):
    """Images added to a folder dataset between a kill and --resume: the epochs and the schedule would no longer be
    the checkpoint's, so the resume stops with one line saying what changed."""
    Image = pytest.importorskip("PIL.Image")
    data = tmp_path / "data"

    def images(split, n):
        for c in ("a", "b"):
            os.makedirs(data / split / c, exist_ok=True)
            for i in range(n):
                Image.new("RGB", (20, 20), (10 * i, 0, 100 * (c == "b"))).save(data / split / c / f"{i}.png")

    images("train", 12)
    images("test", 2)
    args = ["--dataset", "folder", "--data-dir", str(data), "--image-size", "16", "--widths", "4,8", "--proj-dim",
            "8", "--batch-size", "8", "--epochs", "2", "--threads", "1", "--probe-every", "0", "--quiet",
            "--no-plots", "--out", str(tmp_path / "run")]
    crashed = subprocess.run([sys.executable, "-m", "fastcl.train.pretrain", *args], env=env() | {
        CRASH_AFTER_STEPS_ENV: "4"}, capture_output=True, text=True, timeout=300)
    assert crashed.returncode == 137, crashed.stderr  # 3 steps per epoch: killed in the second epoch
    images("train", 30)
    line = one_line_error(cli(*args, "--resume"))
    assert "training set has 60 images" in line and "written with 24" in line, line


def test_batchnorm_micro_batches_warn(tmp_path):
    proc = ok(cli(*[x for x in TINY if x != "--quiet"], "--epochs", "1", "--micro-batch-size", "8",
                  "--out", str(tmp_path / "o")))
    assert "warning: BatchNorm statistics are computed per micro-batch of 8 samples" in proc.stderr
    proc = ok(cli(*TINY, "--epochs", "1", "--micro-batch-size", "8", "--no-batchnorm", "--out", str(tmp_path / "p")))
    assert "BatchNorm" not in proc.stderr


# ---- 3. failures after training leave the checkpoint and a summary of what was not evaluated


def test_divergence_leaves_a_summary_saying_why(tmp_path):
    out = str(tmp_path / "run")
    line = one_line_error(cli(*TINY, "--epochs", "2", "--batch-size", "16", "--lr", "1e9", "--out", out), code=1)
    assert "training diverged" in line and "lower --lr" in line
    with open(os.path.join(out, "summary.json")) as f:
        s = json.load(f)
    assert s["training"]["completed"] is False and "diverged" in s["training"]["error"]
    assert s["not_evaluated"] == [{"what": "everything", "why": "training stopped"}]


def test_evaluation_failure_keeps_checkpoint_and_partial_summary(tmp_path, monkeypatch, capsys):
    """The DFR probe fails (as a diverged or degenerate run can make it): the linear probe results, the
    checkpoint and a summary naming what was not evaluated remain; exit status 1."""
    def broken(*a, **k):
        raise ValueError("train_feats contains NaN or infinite values")

    monkeypatch.setattr(evaluate, "group_balanced_linear_probe", broken)
    out = str(tmp_path / "run")
    assert pretrain.main([*TINY, "--epochs", "1", "--out", out]) == 1
    err = capsys.readouterr().err
    assert "not everything was evaluated (robustness.pre_projection: ValueError: train_feats contains NaN" in err
    with open(os.path.join(out, "summary.json")) as f:
        s = json.load(f)
    assert [m["what"] for m in s["not_evaluated"]] == ["robustness.pre_projection", "robustness.post_projection"]
    assert 0 <= s["linear_probe"]["pre_projection"]["accuracy"] <= 1
    assert s["training"]["completed"] is True and s["checkpoint"].endswith("checkpoint.pt")
    assert torch.load(s["checkpoint"], map_location="cpu", weights_only=True)["epoch"] == 1


def test_ctrl_c_is_one_line_and_resume_continues(tmp_path, monkeypatch, capsys):
    """Ctrl-C (KeyboardInterrupt) stops the run with one line saying how to continue, exit status 130, the last
    checkpoint kept and no temporary file; --resume then finishes the run."""
    real = pretrain.train

    def train_then_interrupt(run):
        real(run)
        raise KeyboardInterrupt

    monkeypatch.setattr(pretrain, "train", train_then_interrupt)
    out = str(tmp_path / "run")
    assert pretrain.main([*TINY, "--epochs", "1", "--out", out]) == 130
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err[-1].startswith("fastcl-pretrain: interrupted") and f"{out}/checkpoint.pt" in err[-1], err
    assert "--resume" in err[-1] and not [line for line in err if "Traceback" in line], err
    assert not [name for name in listing(out) if ".tmp" in name] and "summary.json" not in listing(out)
    monkeypatch.undo()
    assert pretrain.main([*TINY, "--epochs", "1", "--out", out, "--resume"]) == 0
    with open(os.path.join(out, "summary.json")) as f:
        assert json.load(f)["training"]["completed"] is True


def test_non_finite_weights_are_not_evaluated(tmp_path, monkeypatch):
    real = pretrain.train

    def train_then_break(run):
        real(run)
        with torch.no_grad():
            next(run.model.parameters()).fill_(float("nan"))

    monkeypatch.setattr(pretrain, "train", train_then_break)
    out = str(tmp_path / "run")
    assert pretrain.main([*TINY, "--epochs", "1", "--out", out]) == 1
    with open(os.path.join(out, "summary.json")) as f:
        s = json.load(f)
    assert s["not_evaluated"][0]["what"] == "everything" and "not finite" in s["not_evaluated"][0]["why"]
