"""fastcl-shortcuts end to end: pretraining, the six fits on h and z, the outputs, aggregation and errors."""

import json
import math
import os

import pytest
import torch

# ------------------------------------------------------------------ the command


TINY = "--train-samples 128 --val-samples 64 --test-samples 64 --epochs 1 --batch-size 64 --widths 8,16"


def test_cli_end_to_end(tmp_path):
    from fastcl.train import shortcuts

    out = tmp_path / "study"
    assert shortcuts.main(["--out", str(out), "--pretrain-args", TINY, "--quiet", "--max-iter", "50"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["methods"]) == set(shortcuts.METHODS)
    for method in shortcuts.METHODS:
        assert set(summary["methods"][method]) == {"pre_projection", "post_projection"}
        for entry in summary["methods"][method].values():
            assert set(shortcuts.METRIC_KEYS) <= set(entry)
            assert all(math.isfinite(entry[k]) for k in shortcuts.METRIC_KEYS)
    lle = summary["methods"]["lle"]["pre_projection"]
    assert 0 <= lle["shift_train_acc"] <= 1 and set(lle["test_shift_weights"]["clean"]) == set(shortcuts.SHIFTS)
    rates = summary["training_cue_rates"]
    assert rates["wm"]["watermark"] == 1.0 and rates["original"]["watermark"] < 1.0
    assert summary["pretrain_config"]["watermark"] == 0.9
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 * len(shortcuts.METHODS)
    assert "| lle | z |" in (out / "table.md").read_text()
    assert (out / "gaps.svg").read_text().startswith("<svg")

    # a second run in the same directory reuses the finished pretraining and gives the same numbers
    ckpt_time = os.path.getmtime(out / "pretrain" / "checkpoint.pt")
    assert shortcuts.main(["--out", str(out), "--pretrain-args", TINY, "--quiet", "--max-iter", "50"]) == 0
    assert os.path.getmtime(out / "pretrain" / "checkpoint.pt") == ckpt_time
    again = json.loads((out / "summary.json").read_text())["methods"]
    for method in shortcuts.METHODS:
        for rep, entry in summary["methods"][method].items():
            assert {k: again[method][rep][k] for k in shortcuts.METRIC_KEYS} == {
                k: entry[k] for k in shortcuts.METRIC_KEYS}, (method, rep)

    # from the checkpoint, co-object removal, a second study; then the aggregate of the two
    out2 = tmp_path / "study2"
    ckpt = out / "pretrain" / "checkpoint.pt"
    assert shortcuts.main(["--checkpoint", str(ckpt), "--out", str(out2), "--coobj-aug", "remove", "--seed", "1",
                           "--quiet", "--max-iter", "50", "--head-train-samples", "96"]) == 0
    s2 = json.loads((out2 / "summary.json").read_text())
    assert s2["training_cue_rates"]["coobj"]["coobj_aligned"] == 0.0
    assert s2["methods"]["erm"]["pre_projection"]["train_samples"] == 96
    agg_dir = tmp_path / "agg"
    assert shortcuts.main(["--aggregate", str(out), str(out2), "--out", str(agg_dir)]) == 0
    agg = json.loads((agg_dir / "summary.json").read_text())
    cell = agg["methods"]["lle"]["post_projection"]["bg_gap"]
    vals = [summary["methods"]["lle"]["post_projection"]["bg_gap"], s2["methods"]["lle"]["post_projection"]["bg_gap"]]
    assert cell["values"] == vals and cell["mean"] == pytest.approx(sum(vals) / 2)
    assert cell["sd"] == pytest.approx(abs(vals[0] - vals[1]) / math.sqrt(2))
    assert "±" in (agg_dir / "table.md").read_text()


def test_cli_errors(tmp_path, capsys):
    from fastcl.train import shortcuts

    assert shortcuts.main(["--checkpoint", str(tmp_path / "nope.pt"), "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        shortcuts.main(["--aggregate", str(tmp_path / "missing"), "--out", str(tmp_path)])
    bogus = tmp_path / "bogus.pt"
    torch.save({"something": 1}, bogus)
    assert shortcuts.main(["--checkpoint", str(bogus), "--out", str(tmp_path)]) == 2
    assert "not a fastcl-pretrain checkpoint" in capsys.readouterr().err
    assert os.path.isdir(tmp_path)
