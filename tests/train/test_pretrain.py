"""fastcl-pretrain end to end on a tiny configuration: outputs, resume after kill -9, GradCache, torchrun."""

import inspect
import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import fastcl
from fastcl.train import cli, factory, pretrain
from fastcl.train.progress import ProgressBar
from fastcl.train.stages import CRASH_AFTER_STEPS_ENV

REPO = os.path.dirname(os.path.dirname(os.path.abspath(fastcl.__file__)))
TINY = ["--train-samples", "128", "--val-samples", "64", "--test-samples", "64", "--image-size", "16",
        "--widths", "8,16", "--proj-dim", "16", "--batch-size", "32", "--dfr-repeats", "2", "--threads", "1",
        "--quiet", "--no-plots"]
ROBUST_KEYS = ("id_acc", "bg_gap", "coobj_gap", "both_gap", "worst_group_acc")
# MoCo: a queue of 48 keys wraps within the first epoch (4 steps of 32), so a resumed run needs its exact ring state
QUEUE = ["--queue-size", "48", "--key-momentum", "0.9"]


def env():
    e = dict(os.environ)
    e["PYTHONPATH"] = REPO + os.pathsep + e.get("PYTHONPATH", "")  # the fastcl under test, in the children too
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    return e


def run_cli(args, check=True, crash_after_steps=0, **kw):
    """``python -m fastcl.train.pretrain ARGS``; ``crash_after_steps=N`` sets the test hook that kills the run after
    step N (exit status 137)."""
    e = env()
    if crash_after_steps:
        e[CRASH_AFTER_STEPS_ENV] = str(crash_after_steps)
    proc = subprocess.run([sys.executable, "-m", "fastcl.train.pretrain", *args], env=e, capture_output=True,
                          text=True, timeout=300, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def load(out):
    ckpt = torch.load(os.path.join(out, "checkpoint.pt"), map_location="cpu", weights_only=True)
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    return ckpt, summary


def records(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_end_to_end_writes_summary_metrics_and_checkpoint(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert pretrain.main([*TINY, "--epochs", "2", "--probe-every", "1", "--out", out]) == 0
    ckpt, s = load(out)
    for layer in ("pre_projection", "post_projection"):
        assert 0 <= s["linear_probe"][layer]["accuracy"] <= 1
        for key in ROBUST_KEYS:
            assert -1 <= s["robustness"][layer][key] <= 1, key
    assert s["config"]["loss"] == "supcon" and s["config"]["head"] == "mlp" and s["config"]["epochs"] == 2
    assert s["versions"]["fastcl"] == fastcl.__version__ and s["versions"]["torch"] == torch.__version__
    assert s["device"].startswith("cpu") and s["wall_time_s"] > 0 and s["peak_memory"]["host_rss_mb"] > 0
    assert s["world_size"] == 1 and s["resumed"] is False
    assert ckpt["epoch"] == 2 and ckpt["step"] == 8 and set(ckpt) >= {"model", "optimizer", "scheduler", "rng"}
    recs = records(out)
    assert [r["step"] for r in recs if r["type"] == "step"] == list(range(1, 9))
    assert [r["epoch"] for r in recs if r["type"] == "epoch"] == [1, 2]
    assert [r["epoch"] for r in recs if r["type"] == "probe"] == [1, 2]
    assert all(r["samples_per_s"] > 0 and r["loss"] > 0 for r in recs if r["type"] == "step")
    assert "linear probe accuracy" in capsys.readouterr().out
    assert not any(name.endswith(".tmp") or ".tmp" in name for name in os.listdir(out))


def test_plots_or_a_one_line_notice(tmp_path, capsys):
    out = str(tmp_path / "run")
    args = [a for a in TINY if a != "--no-plots"]
    assert pretrain.main([*args, "--epochs", "1", "--loss", "simclr", "--head", "fixed", "--out", out]) == 0
    from fastcl.train.plots import matplotlib_available

    if matplotlib_available():
        assert os.path.getsize(os.path.join(out, "loss.png")) > 0
        assert os.path.getsize(os.path.join(out, "probe.png")) > 0
    else:
        assert "plots skipped: matplotlib is not installed" in capsys.readouterr().err


@pytest.fixture(scope="module", params=["plain", "queue"])
def reference_run(request, tmp_path_factory):
    """``(out, arguments)`` of the uninterrupted 3-epoch run (in a child process, like the interrupted ones): plain
    SupCon, and MoCo (key model + queue)."""
    args = [*TINY, *(QUEUE if request.param == "queue" else []), "--epochs", "3"]
    out = str(tmp_path_factory.mktemp("ref") / "run")
    run_cli([*args, "--out", out])
    return out, args


def assert_same_result(out, ref):
    ckpt, s = load(out)
    ckpt_ref, s_ref = load(ref)
    assert ckpt["epoch"] == ckpt_ref["epoch"] == 3
    assert set(ckpt) == set(ckpt_ref)
    states = ["model", "key_model", "queue"] if "queue" in ckpt_ref else ["model"]
    for state in states:
        assert set(ckpt[state]) == set(ckpt_ref[state]), state
        for k, v in ckpt_ref[state].items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(ckpt[state][k], v), (state, k)
            else:
                assert ckpt[state][k] == v, (state, k)
    if "queue" in ckpt_ref:  # it wrapped: full, the write position moved on
        assert ckpt["queue"]["_extra_state"]["filled"] == 48
    assert s["linear_probe"] == s_ref["linear_probe"]
    assert s["robustness"] == s_ref["robustness"]
    assert s["resumed"] is True
    losses = [(r["step"], r["loss"]) for r in records(out) if r["type"] == "step"]
    assert losses == [(r["step"], r["loss"]) for r in records(ref) if r["type"] == "step"]


def test_crash_mid_epoch_then_resume_reaches_the_same_result(tmp_path, reference_run):
    ref, args = reference_run
    out = str(tmp_path / "run")
    crashed = run_cli([*args, "--out", out], check=False, crash_after_steps=6)
    assert crashed.returncode == 137  # died in epoch 2 without any cleanup
    ckpt = torch.load(os.path.join(out, "checkpoint.pt"), map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["step"] == 4
    assert not os.path.exists(os.path.join(out, "summary.json"))
    resumed = run_cli([*args, "--out", out, "--resume"])
    assert "resumed from" in resumed.stderr
    assert_same_result(out, ref)


def test_mid_epoch_checkpoint_then_resume_reaches_the_same_result(tmp_path, reference_run):
    """--checkpoint-every 2: a crash after step 6 (2 steps into epoch 2) resumes from step 6, not from step 4."""
    ref, args = reference_run
    out = str(tmp_path / "run")
    crashed = run_cli([*args, "--out", out, "--checkpoint-every", "2"], check=False, crash_after_steps=6)
    assert crashed.returncode == 137
    ckpt = torch.load(os.path.join(out, "checkpoint.pt"), map_location="cpu", weights_only=True)
    assert (ckpt["epoch"], ckpt["epoch_step"], ckpt["step"]) == (1, 2, 6)
    resumed = run_cli([*args, "--out", out, "--resume"])
    assert "1/3 epochs done and 2 steps of the next, step 6" in resumed.stderr
    assert_same_result(out, ref)


def test_sigkill_then_resume_reaches_the_same_result(tmp_path, reference_run):
    """A real kill -9 as soon as the first checkpoint exists (wherever the run is by then)."""
    ref, args = reference_run
    out = str(tmp_path / "run")
    proc = subprocess.Popen([sys.executable, "-m", "fastcl.train.pretrain", *args, "--out", out],
                            env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt_path = os.path.join(out, "checkpoint.pt")
    deadline = time.monotonic() + 240
    while not os.path.exists(ckpt_path) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    torch.load(ckpt_path, map_location="cpu", weights_only=True)  # never a half-written file
    run_cli([*args, "--out", out, "--resume"])
    assert_same_result(out, ref)


def test_resume_without_a_checkpoint_starts_from_scratch(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert pretrain.main([*TINY, "--epochs", "1", "--out", out, "--resume"]) == 0
    assert "no checkpoint" in capsys.readouterr().err
    _, s = load(out)
    assert s["resumed"] is False


def test_resume_with_other_training_arguments_is_refused(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert pretrain.main([*TINY, "--epochs", "1", "--out", out]) == 0
    capsys.readouterr()
    assert pretrain.main([*TINY, "--epochs", "1", "--out", out, "--resume", "--temperature", "0.5"]) == 2
    assert "different training arguments" in capsys.readouterr().err


@pytest.mark.parametrize("queue", [[], QUEUE], ids=["plain", "queue"])
def test_gradcache_run_equals_full_batch_run_without_batchnorm(tmp_path, queue):
    """With a queue the keys are embedded per micro-batch too: same keys, same queue, same step."""
    base = [*TINY, *queue, "--epochs", "1", "--no-batchnorm", "--probe-every", "0"]
    assert pretrain.main([*base, "--out", str(tmp_path / "full")]) == 0
    assert pretrain.main([*base, "--micro-batch-size", "5", "--out", str(tmp_path / "cached")]) == 0
    full, _ = load(str(tmp_path / "full"))
    cached, _ = load(str(tmp_path / "cached"))
    for state in ("model", "key_model", "queue") if queue else ("model",):
        for k, v in full[state].items():
            if isinstance(v, torch.Tensor):
                torch.testing.assert_close(cached[state][k], v, rtol=1e-4, atol=1e-5)


def test_gradcache_with_batchnorm_and_lars_runs(tmp_path):
    out = str(tmp_path / "run")
    assert pretrain.main([*TINY, "--epochs", "1", "--micro-batch-size", "8", "--optimizer", "lars",
                          "--probe-every", "0", "--out", out]) == 0
    _, s = load(out)
    assert s["config"]["micro_batch_size_used"] == 8 and s["config"]["optimizer"] == "lars"


def test_missing_cifar_directory_is_a_clear_error(tmp_path, capsys):
    code = pretrain.main(["--dataset", "cifar10", "--data-dir", str(tmp_path / "nope"), "--out", str(tmp_path / "o"),
                          "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert "cifar-10-python.tar.gz" in err and "nope" in err


def test_bad_arguments_are_rejected(tmp_path, capsys):
    with pytest.raises(SystemExit):
        pretrain.main(["--encoder", "vgg"])  # argparse's own check
    assert pretrain.main(["--batch-size", "0", "--out", str(tmp_path / "o")]) == 2
    assert "--batch-size must be positive" in capsys.readouterr().err
    assert pretrain.main([*TINY, "--batch-size", "256", "--out", str(tmp_path / "o")]) == 2
    assert "larger than the training set" in capsys.readouterr().err


def test_criterion_needs_gather_distributed_for_more_than_one_process():
    args = cli.build_parser().parse_args([])
    assert isinstance(factory.build_criterion(args, 1), fastcl.SupConLoss)
    if "gather_distributed" in inspect.signature(fastcl.SupConLoss).parameters:
        factory.build_criterion(args, 2)
    else:
        with pytest.raises(RuntimeError, match="gather_distributed"):
            factory.build_criterion(args, 2)


def test_progress_bar_lines_when_not_a_terminal():
    stream = io.StringIO()
    bar = ProgressBar(3, stream=stream, line_interval=0.0)
    for _ in range(3):
        bar.update(64, "epoch 1/1", loss=1.5)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3 and "\r" not in stream.getvalue()
    assert "3/3" in lines[-1] and "loss 1.5000" in lines[-1] and "samples/s" in lines[-1] and "ETA" in lines[-1]

    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty = Tty()
    bar = ProgressBar(2, stream=tty)
    bar.update(8)
    bar.update(8)
    assert tty.getvalue().startswith("\r") and tty.getvalue().endswith("\n")


@pytest.mark.skipif("gather_distributed" not in str(inspect.signature(fastcl.SupConLoss)),
                    reason="needs SupConLoss(gather_distributed=True) (fastcl.distributed)")
@pytest.mark.parametrize("loss, queue", [("supcon", []), ("simclr", []), ("supcon", QUEUE), ("simclr", QUEUE)],
                         ids=["supcon", "simclr", "supcon-queue", "simclr-queue"])
def test_torchrun_two_processes_equal_one_process_without_batchnorm(tmp_path, loss, queue):
    """With a queue: every rank enqueues the global batch's keys, so the 2-process queue is the 1-process one."""
    base = [*TINY, *queue, "--epochs", "1", "--no-batchnorm", "--loss", loss, "--probe-every", "0", "--device",
            "cpu"]
    run_cli([*base, "--out", str(tmp_path / "single")])
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
         "fastcl.train.pretrain", *base, "--out", str(tmp_path / "ddp")],
        env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single, s1 = load(str(tmp_path / "single"))
    ddp, s2 = load(str(tmp_path / "ddp"))
    assert s2["world_size"] == 2
    for state in ("model", "key_model", "queue") if queue else ("model",):
        for k, v in single[state].items():
            if isinstance(v, torch.Tensor):
                torch.testing.assert_close(ddp[state][k], v, rtol=1e-4, atol=1e-5)
    if queue:
        assert ddp["queue"]["_extra_state"] == single["queue"]["_extra_state"]
        assert ddp["queue"]["_extra_state"]["filled"] == 48
    l1 = [r["loss"] for r in records(str(tmp_path / "single")) if r["type"] == "step"]
    l2 = [r["loss"] for r in records(str(tmp_path / "ddp")) if r["type"] == "step"]
    assert l2 == pytest.approx(l1, rel=1e-4)


def test_library_and_application_are_apart_and_the_documented_entry_points_work():
    code = ("import sys, fastcl, fastcl.models, fastcl.evaluation\n"
            "from fastcl import SupConLoss\n"
            "assert not [m for m in sys.modules if m.startswith('fastcl.train')], 'the library imports the app'\n"
            "import os, fastcl.train.pretrain, fastcl.train.shortcuts\n"
            "root = os.path.dirname(fastcl.__file__)\n"
            "assert not [f for f in ('pretrain.py', 'demo.py') if os.path.exists(os.path.join(root, f))], 'a shim'\n")
    proc = subprocess.run([sys.executable, "-c", code], env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    help_text = run_cli(["--help"]).stdout
    assert help_text.startswith("usage: fastcl-pretrain") and "--stream" in help_text and "--overwrite" in help_text
    assert "crash" not in help_text  # the crash test hook is an environment variable, not an option
    with open(os.path.join(REPO, "pyproject.toml")) as f:
        assert 'fastcl-pretrain = "fastcl.train.pretrain:main"' in f.read()
