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
    args = ["--out", str(out), "--pretrain-args", TINY, "--quiet", "--max-iter", "50", "--finetune", "--ft-epochs", "2",
            "--ft-batch-size", "32", "--ft-weight-decays", "1e-4,1e-2"]
    assert shortcuts.main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    methods = shortcuts.METHODS + shortcuts.EXTENSION_METHODS
    assert set(summary["studies"]) == {"frozen", "finetune"}
    for study in shortcuts.STUDIES:
        assert list(summary["studies"][study]) == list(methods)
        for method in methods:
            assert set(summary["studies"][study][method]) == {"pre_projection", "post_projection"}
            for entry in summary["studies"][study][method].values():
                assert set(shortcuts.METRIC_KEYS) <= set(entry)
                assert all(math.isfinite(entry[k]) for k in shortcuts.METRIC_KEYS)
                n = 128 * len(shortcuts.METHOD_SETS[method])
                assert entry["train_samples"] == n
    assert summary["method_sets"]["lle"] == ["original", "bg", "coobj"]
    assert summary["method_sets"]["lle_wm"] == ["original", "bg", "coobj", "wm"]
    for study in shortcuts.STUDIES:
        lle = summary["studies"][study]["lle"]["pre_projection"]
        assert 0 <= lle["shift_heldout_acc"] <= 1 and set(lle["test_shift_weights"]) == set(shortcuts.SHIFTS)
        assert lle["shift_heldout_acc"] == pytest.approx(sum(lle[f"shift_acc_{s}"] for s in shortcuts.SHIFTS) / 3)
        assert sum(lle["test_shift_weights"].values()) == pytest.approx(1.0)
        groups = lle["test_shift_weights_by_group"]
        assert set(groups) == {"aligned", "bg_conflict", "coobj_conflict", "both_conflict"}
        mean = {s: sum(g[s] for g in groups.values()) / 4 for s in shortcuts.SHIFTS}  # balanced test groups
        assert mean == pytest.approx(lle["test_shift_weights"])
        assert set(summary["studies"][study]["lle_wm"]["post_projection"]["test_shift_weights"]) == {
            "original", "bg", "coobj", "wm"}
    ft = summary["studies"]["finetune"]["mixed"]["post_projection"]
    assert ft["selected_epoch"] in (1, 2) and ft["selected_weight_decay"] in (1e-4, 1e-2)
    assert ft["val_worst_group_acc"] == max(max(c) for c in ft["val_curves"].values())
    rates = summary["training_cue_rates"]
    assert rates["wm"]["watermark"] == 1.0 and rates["original"]["watermark"] < 1.0
    assert all(rates[s]["unchanged"] == 0.0 for s in ("bg", "coobj", "wm")) and rates["original"]["unchanged"] == 1.0
    assert rates["bg"]["bg_aligned"] < 0.2 and rates["original"]["bg_aligned"] > 0.8
    assert summary["pretrain_config"]["watermark"] == 0.9
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 * 2 * len(methods) and {r["study"] for r in lines} == {"frozen", "finetune"}
    table = (out / "table.md").read_text()
    assert "| lle | z |" in table and "end to end" in table and "4 shifts" in table
    side = table.split("frozen | end to end, and the paper**")[1]
    assert "| lle (paper, UrbanCars) | ResNet-50 |  | 96.7 |" in side
    lle_h = summary["studies"]["finetune"]["lle"]["pre_projection"]["worst_group_acc"]
    assert side.splitlines()[-2].startswith("| lle | h |") and f"| {100 * lle_h:.1f} |" in side.splitlines()[-2]
    assert (out / "gaps.svg").read_text().startswith("<svg")
    assert (out / "gaps-finetune.svg").read_text().startswith("<svg")

    # a second run in the same directory reuses the finished pretraining and gives the same numbers
    ckpt_time = os.path.getmtime(out / "pretrain" / "checkpoint.pt")
    assert shortcuts.main(args) == 0
    assert os.path.getmtime(out / "pretrain" / "checkpoint.pt") == ckpt_time
    again = json.loads((out / "summary.json").read_text())["studies"]
    for study, res in summary["studies"].items():
        for method in methods:
            for rep, entry in res[method].items():
                assert {k: again[study][method][rep][k] for k in shortcuts.METRIC_KEYS} == {
                    k: entry[k] for k in shortcuts.METRIC_KEYS}, (study, method, rep)

    # from the checkpoint, co-object removal, the 3-shift protocol only, frozen only; then the aggregate
    out2 = tmp_path / "study2"
    ckpt = out / "pretrain" / "checkpoint.pt"
    assert shortcuts.main(["--checkpoint", str(ckpt), "--out", str(out2), "--coobj-aug", "remove", "--seed", "1",
                           "--quiet", "--max-iter", "50", "--head-train-samples", "96", "--no-extension"]) == 0
    s2 = json.loads((out2 / "summary.json").read_text())
    assert set(s2["studies"]) == {"frozen"} and list(s2["studies"]["frozen"]) == list(shortcuts.METHODS)
    assert s2["training_cue_rates"]["coobj"]["coobj_aligned"] == 0.0
    assert s2["studies"]["frozen"]["erm"]["pre_projection"]["train_samples"] == 96
    agg_dir = tmp_path / "agg"
    assert shortcuts.main(["--aggregate", str(out), str(out2), "--out", str(agg_dir)]) == 0
    agg = json.loads((agg_dir / "summary.json").read_text())
    assert set(agg["studies"]) == {"frozen"} and list(agg["studies"]["frozen"]) == list(shortcuts.METHODS)
    cell = agg["studies"]["frozen"]["lle"]["post_projection"]["bg_gap"]
    vals = [summary["studies"]["frozen"]["lle"]["post_projection"]["bg_gap"],
            s2["studies"]["frozen"]["lle"]["post_projection"]["bg_gap"]]
    assert cell["values"] == vals and cell["mean"] == pytest.approx(sum(vals) / 2)
    assert cell["sd"] == pytest.approx(abs(vals[0] - vals[1]) / math.sqrt(2))
    assert "±" in (agg_dir / "table.md").read_text()


def test_finetune_selects_on_validation_and_leaves_the_model_alone():
    from fastcl.models import encoders as E
    from fastcl.models import heads as H
    from fastcl.models.contrastive import ContrastiveModel
    from fastcl.train.data import make_spurious_cues
    from fastcl.train.shortcut_finetune import FinetuneConfig, finetune, predict, predict_shift

    torch.manual_seed(0)
    model = ContrastiveModel(E.ConvNet(3, (4, 8)), H.MLPHead(8, 8, 6)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train = make_spurious_cues(64, seed=0, split="train", image_size=16)
    other = make_spurious_cues(64, seed=1, split="train", image_size=16)
    val = make_spurious_cues(32, seed=0, split="val", image_size=16)
    config = FinetuneConfig(epochs=3, batch_size=16, weight_decays=(0.0, 1e-3))
    logs = []
    clf, rec = finetune(model, "post_projection", [train, other], val, 2, 0.95, config, lle=True, log=logs.append)
    assert len(logs) == 6 and set(rec["val_curves"]) == {"0", "0.001"}
    curves = rec["val_curves"]
    best = max(max(c) for c in curves.values())
    assert rec["val_worst_group_acc"] == best
    first = next((wd, e + 1) for wd, c in curves.items() for e, v in enumerate(c) if v == best)
    assert (f"{rec['selected_weight_decay']:g}", rec["selected_epoch"]) == first
    assert not clf.training and clf.lle and clf.last.num_shifts == 2
    logits = predict(clf, val.images, 7)
    assert logits.shape == (32, 2) and predict_shift(clf, val.images, 9).shape == (32, 2)
    from fastcl.evaluation.shortcut_metrics import multi_shortcut_metrics
    m = multi_shortcut_metrics(logits, val.labels, val.bg_aligned, val.coobj_aligned, 0.95, bg=val.bg,
                               coobj=val.coobj)
    assert m["worst_group_acc"] == pytest.approx(best)  # the returned model is the selected one
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    one, rec1 = finetune(model, "pre_projection", [train], val, 2, 0.95, FinetuneConfig(epochs=1, batch_size=16,
                                                                                        weight_decays=(0.0,)))
    assert not one.lle and one.projection is None and predict(one, val.images, 32).shape == (32, 2)
    with pytest.raises(ValueError, match="predict_shift needs"):
        predict_shift(one, val.images, 8)
    with pytest.raises(ValueError, match="epochs must be"):
        FinetuneConfig(epochs=0)
    with pytest.raises(ValueError, match="weight_decays"):
        FinetuneConfig(weight_decays=())
    with pytest.raises(ValueError, match="representation"):
        finetune(model, "h", [train], val, 2, 0.95, config)


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


def test_finetune_records_a_diverged_setting_as_nan_and_selects_another():
    """A weight decay that makes SGD diverge (NaN logits) is recorded as NaN on its validation curve and never
    selected; the study goes on and selects the setting that trains."""
    import math

    from fastcl.models import encoders as E
    from fastcl.models import heads as H
    from fastcl.models.contrastive import ContrastiveModel
    from fastcl.train.data import make_spurious_cues
    from fastcl.train.shortcut_finetune import FinetuneConfig, finetune

    torch.manual_seed(0)
    model = ContrastiveModel(E.ConvNet(3, (4, 8)), H.MLPHead(8, 8, 6)).eval()
    train = make_spurious_cues(64, seed=0, split="train", image_size=16)
    val = make_spurious_cues(32, seed=0, split="val", image_size=16)
    config = FinetuneConfig(epochs=2, batch_size=16, weight_decays=(1e8, 0.0))
    _, rec = finetune(model, "pre_projection", [train], val, 2, 0.95, config)
    assert all(math.isnan(v) for v in rec["val_curves"]["1e+08"])
    assert rec["selected_weight_decay"] == 0.0 and math.isfinite(rec["val_worst_group_acc"])
    assert rec["val_worst_group_acc"] == max(rec["val_curves"]["0"])


def test_aggregate_reads_non_finite_metrics_written_as_strings(tmp_path):
    """A summary.json holds NaN and infinite metrics as strings (strict JSON); aggregating reads them back as
    numbers, whichever run comes first."""
    from fastcl.train.checkpoint import atomic_json
    from fastcl.train.shortcuts import REPRESENTATIONS, aggregate

    def summary(value):
        return {"studies": {"frozen": {"dfr": {rep: {"bg_gap": value, "method": "dfr"} for rep in REPRESENTATIONS}}}}

    paths = []
    for i, value in enumerate((float("nan"), 0.5)):
        paths.append(str(tmp_path / f"{i}.json"))
        atomic_json(paths[-1], summary(value))
    runs = []
    for p in paths:
        with open(p) as f:
            runs.append(json.load(f))
    for order in (runs, runs[::-1]):
        cell = aggregate(order)["studies"]["frozen"]["dfr"]["pre_projection"]
        assert set(cell) == {"bg_gap"} and math.isnan(cell["bg_gap"]["mean"])
        assert sorted(cell["bg_gap"]["values"], key=math.isnan) == [0.5, pytest.approx(float("nan"), nan_ok=True)]
