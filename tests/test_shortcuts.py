"""Issue 12: the watermark cue, shortcut-breaking augmentations, Last Layer Ensemble fitting, fastcl-shortcuts."""

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from fastcl.eval import fit_last_layer_ensemble, linear_probe, watermark_metrics
from fastcl.heads import LastLayerEnsemble
from fastcl.train.data import (
    add_watermark,
    compose_cue_layers,
    load_dataset,
    make_spurious_cues,
    render_background,
    watermark_pattern,
)
from fastcl.train.shortcut_augment import (
    SwapParams,
    background_region,
    coobj_region,
    insert_watermark,
    remove_coobj,
    sample_cue_swap,
    swap_background,
    swap_coobj,
)

# ------------------------------------------------------------------ generator layers and the watermark cue


@pytest.mark.parametrize("split,classes,size", [("train", 2, 32), ("test", 3, 17 + 16), ("val", 8, 16)])
def test_layers_recompose_the_same_bytes_and_do_not_change_the_data(split, classes, size):
    plain = make_spurious_cues(40, seed=5, split=split, classes=classes, image_size=size)
    data, layers = make_spurious_cues(40, seed=5, split=split, classes=classes, image_size=size, return_layers=True)
    for name in ("images", "labels", "bg_aligned", "coobj_aligned", "bg", "coobj"):
        assert torch.equal(getattr(plain, name), getattr(data, name)), name
    assert plain.watermark is None and data.watermark is None
    assert torch.equal(compose_cue_layers(layers), plain.images)
    assert len(layers) == 40 and torch.equal(compose_cue_layers(layers[7:9]), plain.images[7:9])


def test_default_splits_unchanged_by_the_watermark_options():
    a = load_dataset("spurious-cues", seed=1, train_samples=64, val_samples=32, test_samples=32)
    b = load_dataset("spurious-cues", seed=1, train_samples=64, val_samples=32, test_samples=32, watermark=0.0,
                     watermark_elsewhere=0.5, watermark_class=1)
    for split in ("train", "val", "test"):
        assert torch.equal(getattr(a, split).images, getattr(b, split).images)
    assert a.info == b.info and "watermark" not in a.info


def test_watermark_cue_on_training_images_of_one_class_only():
    n = 2000
    clean = make_spurious_cues(n, seed=0, split="train", image_size=16, classes=4)
    wm = make_spurious_cues(n, seed=0, split="train", image_size=16, classes=4, watermark=0.9,
                            watermark_elsewhere=0.05, watermark_class=2)
    for name in ("labels", "bg", "coobj"):
        assert torch.equal(getattr(clean, name), getattr(wm, name))
    on = wm.watermark
    rate_class = on[wm.labels == 2].double().mean().item()
    rate_else = on[wm.labels != 2].double().mean().item()
    assert abs(rate_class - 0.9) < 0.04 and abs(rate_else - 0.05) < 0.02
    changed = (wm.images != clean.images).flatten(1).any(1)
    assert torch.equal(changed, on)  # exactly the watermarked images differ ...
    assert torch.equal(wm.images, add_watermark(clean.images, on))  # ... by the documented composite
    for split in ("val", "test"):  # evaluation splits stay clean
        t = make_spurious_cues(64, seed=0, split=split, image_size=16, watermark=0.9)
        assert not t.watermark.any()
        assert torch.equal(t.images, make_spurious_cues(64, seed=0, split=split, image_size=16).images)


def test_watermark_composite_is_exact_and_translucent():
    imgs = make_spurious_cues(8, seed=2, split="test").images
    mask = watermark_pattern(32)
    assert mask.shape == (32, 32) and 60 < mask.sum() < 300 and set(mask.unique().tolist()) == {0.0, 1.0}
    out = add_watermark(imgs, opacity=0.5)
    assert torch.equal(out[:, :, mask == 0], imgs[:, :, mask == 0])  # nothing outside the glyphs moves
    x, y = imgs[:, :, mask > 0].double(), out[:, :, mask > 0].double()
    assert torch.all((y - (x + 0.5 * (255 - x))).abs() <= 0.5 + 1e-6)  # half-way to white, rounded
    assert torch.equal(add_watermark(imgs, opacity=0.0), imgs)
    which = torch.tensor([True, False] * 4)
    part = add_watermark(imgs, which)
    assert torch.equal(part[which], out[which]) and torch.equal(part[~which], imgs[~which])
    assert torch.equal(add_watermark(imgs[3:4]), out[3:4])  # one image alone = in the batch
    with pytest.raises(ValueError, match="uint8"):
        add_watermark(imgs.float())
    with pytest.raises(ValueError, match="opacity"):
        add_watermark(imgs, opacity=1.5)
    with pytest.raises(ValueError, match="watermark_class"):
        make_spurious_cues(8, seed=0, watermark=0.5, watermark_class=2)


# ------------------------------------------------------------------ shortcut-breaking augmentations


@pytest.fixture(scope="module")
def cues():
    return make_spurious_cues(48, seed=3, split="train", classes=3, watermark=0.5, watermark_elsewhere=0.3,
                              return_layers=True)


def test_background_swap_is_an_exact_composite(cues):
    data, layers = cues
    params = sample_cue_swap(data.bg, 3, torch.Generator().manual_seed(0))
    out, new_layers = swap_background(data, layers, params)
    assert (out.bg != data.bg).all() and torch.equal(out.bg, params.target)
    assert torch.equal(out.bg_aligned, out.bg == out.labels)
    for name in ("labels", "coobj", "coobj_aligned", "watermark"):
        assert torch.equal(getattr(out, name), getattr(data, name)), name
    region = background_region(layers)
    changed = (out.images != data.images).any(1)
    assert not (changed & ~region).any()  # the core object and co-object pixels the background can't reach
    assert changed.double().mean() > 0.5  # the background does change
    assert (~region).sum() > 0
    # swapping back to the original cue restores every byte
    back, _ = swap_background(out, new_layers, SwapParams(data.bg, torch.ones(48, dtype=torch.bool)))
    assert torch.equal(back.images, data.images)


def test_background_swap_renders_the_target_class_texture():
    # two classes: background 0 is horizontal stripes, background 1 vertical stripes
    data, layers = make_spurious_cues(64, seed=0, split="test", return_layers=True)
    out, new_layers = swap_background(data, layers, sample_cue_swap(data.bg, 2, torch.Generator().manual_seed(1)))
    bg = new_layers.background.mean(1)  # [N, S, S]
    along_x = bg.var(dim=2).mean(1)  # variation within a row
    along_y = bg.var(dim=1).mean(1)  # variation within a column
    vertical = along_x > along_y
    assert torch.equal(vertical, out.bg == 1)
    assert torch.equal(vertical, data.bg == 0)


@pytest.mark.parametrize("mode", ["swap", "remove"])
def test_coobj_swap_and_removal_are_exact_composites(cues, mode):
    data, layers = cues
    if mode == "swap":
        params = sample_cue_swap(data.coobj, 3, torch.Generator().manual_seed(4))
        out, new_layers = swap_coobj(data, layers, params)
        assert (out.coobj != data.coobj).all() and torch.equal(out.coobj_aligned, out.coobj == out.labels)
    else:
        out, new_layers = remove_coobj(data, layers)
        assert (out.coobj == -1).all() and not out.coobj_aligned.any() and (new_layers.coobj_alpha == 0).all()
    for name in ("labels", "bg", "bg_aligned", "watermark"):
        assert torch.equal(getattr(out, name), getattr(data, name)), name
    changed = (out.images != data.images).any(1)
    region = coobj_region(layers, new_layers)
    assert not (changed & ~region).any()
    assert changed.flatten(1).any(1).all()  # every image's co-object changed somewhere
    assert region.double().mean() < 0.25  # a small object, not a re-render of the image
    if mode == "swap":
        back, _ = swap_coobj(out, new_layers, SwapParams(data.coobj, torch.ones(48, dtype=torch.bool)))
        assert torch.equal(back.images, data.images)


def test_insert_watermark_marks_every_image_once(cues):
    data, _ = cues
    out = insert_watermark(data)
    assert out.watermark.all()
    assert torch.equal(out.images[data.watermark], data.images[data.watermark])  # already marked: unchanged
    clean, _ = make_spurious_cues(48, seed=3, split="train", classes=3, return_layers=True)
    assert torch.equal(out.images, add_watermark(clean.images))  # same as marking the clean image once


def test_swaps_are_deterministic_and_batched_equals_per_sample(cues):
    data, layers = cues
    p1 = sample_cue_swap(data.bg, 3, torch.Generator().manual_seed(7), p=0.6)
    p2 = sample_cue_swap(data.bg, 3, torch.Generator().manual_seed(7), p=0.6)
    p3 = sample_cue_swap(data.bg, 3, torch.Generator().manual_seed(8), p=0.6)
    assert torch.equal(p1.target, p2.target) and torch.equal(p1.apply, p2.apply)
    assert not (torch.equal(p1.target, p3.target) and torch.equal(p1.apply, p3.apply))
    assert 0 < p1.apply.sum() < 48
    for fn, params in ((swap_background, p1), (swap_coobj, sample_cue_swap(data.coobj, 3, torch.Generator(), 0.6))):
        batched, _ = fn(data, layers, params)
        again, _ = fn(data, layers, params)
        assert torch.equal(batched.images, again.images)
        for i in (0, 5, 17, 47):
            idx = torch.tensor([i])
            one, _ = fn(data.subset(idx), layers[idx], params[idx])
            assert torch.equal(one.images, batched.images[idx])
        skipped = ~params.apply
        assert torch.equal(batched.images[skipped], data.images[skipped])


def test_swap_probability_makes_the_cue_independent_of_the_label():
    n, k = 6000, 3
    cue = torch.arange(n) % k  # fully aligned with label = arange % k
    params = sample_cue_swap(cue, k, torch.Generator().manual_seed(0), p=(k - 1) / k)
    new = torch.where(params.apply, params.target, cue)
    assert (params.target != cue).all()
    for c in range(k):
        counts = torch.bincount(new[cue == c], minlength=k).double() / (n / k)
        assert torch.allclose(counts, torch.full((k,), 1 / k, dtype=torch.float64), atol=0.03)


def test_augmentation_argument_errors(cues):
    data, layers = cues
    with pytest.raises(ValueError, match="p must be"):
        sample_cue_swap(data.bg, 3, torch.Generator(), p=1.5)
    with pytest.raises(ValueError, match="cue values"):
        sample_cue_swap(data.bg, 2, torch.Generator())
    with pytest.raises(ValueError, match="params describe"):
        swap_background(data, layers, sample_cue_swap(data.bg[:4], 3, torch.Generator()))
    with pytest.raises(ValueError, match="layers describe"):
        swap_background(data, layers[:5], sample_cue_swap(data.bg, 3, torch.Generator()))
    with pytest.raises(ValueError, match="which"):
        insert_watermark(data, torch.ones(3, dtype=torch.bool))


def test_render_background_matches_the_generator(cues):
    data, layers = cues
    again = render_background(data.bg, layers.period, layers.phase, layers.tint, 32)
    assert torch.equal(again, layers.background)


# ------------------------------------------------------------------ metrics and Last Layer Ensemble


def test_watermark_metrics_by_hand():
    y = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2])
    clean = torch.tensor([0, 0, 1, 1, 0, 2, 2, 1])  # 6/8 right, 3 predicted as 0
    marked = torch.tensor([0, 0, 0, 0, 0, 2, 0, 1])  # 3/8 right, 6 predicted as 0
    m = watermark_metrics(clean, marked, y, watermark_class=0)
    assert m["wm_clean_acc"] == 0.75 and m["wm_acc"] == 0.375
    assert m["wm_gap"] == pytest.approx(-0.375) and m["wm_shift"] == pytest.approx(3 / 8)
    logits = F.one_hot(marked, 3).float()
    assert watermark_metrics(clean, logits, y, 0) == m
    with pytest.raises(ValueError, match="same shape"):
        watermark_metrics(clean, marked[:4], y, 0)


def _shift_data(n_per=400, seed=0):
    """Three shifts with 4 features: feature 3 tells the shift (its mean is -4, 0 or +4); the class is the sign of
    feature k in shift k (the other two features are noise there)."""
    g = torch.Generator().manual_seed(seed)
    xs, ys, ss = [], [], []
    for k in range(3):
        x = torch.randn(n_per, 4, generator=g, dtype=torch.float64)
        x[:, 3] = 4.0 * (k - 1) + 0.5 * torch.randn(n_per, generator=g, dtype=torch.float64)
        xs.append(x)
        ys.append((x[:, k] > 0).long())
        ss.append(torch.full((n_per,), k))
    return torch.cat(xs), torch.cat(ys), torch.cat(ss)


def test_lle_recovers_each_shift_head_and_the_shift_classifier():
    x, y, s = _shift_data()
    ens = fit_last_layer_ensemble(x, y, s, 3, weight_decay=1e-2)
    assert isinstance(ens, LastLayerEnsemble) and not ens.training and ens.weight.dtype == torch.float64
    logits, shift_logits = ens.forward_all(x)
    assert (shift_logits.argmax(1) == s).double().mean() > 0.99
    for k in range(3):
        own = logits[s == k, k].argmax(1)
        assert (own == y[s == k]).double().mean() > 0.97  # head k solves shift k ...
        direction = ens.weight[k, 1] - ens.weight[k, 0]
        assert direction[k].abs() > 4 * direction[[j for j in range(3) if j != k]].abs().max()  # ... with feature k
    # eval mode: the shift-probability-weighted combination of the heads
    manual = torch.einsum("bk,bkc->bc", shift_logits.softmax(1), logits)
    assert torch.allclose(ens(x), manual, rtol=0, atol=1e-12)
    assert (ens(x).argmax(1) == y).double().mean() > 0.95
    # one head on everything cannot: the class feature depends on the shift
    single = linear_probe(x, y, x, y, weight_decay=1e-2)
    assert single.test_acc < 0.85


def test_lle_fit_equals_independent_per_shift_problems():
    # Without standardisation the objective splits: head k is a logistic regression on shift k alone with the
    # weight decay scaled by N / N_k, the shift predictor one on the shift index with weight decay / shift_weight.
    x, y, s = _shift_data(n_per=150, seed=1)
    keep = torch.cat([torch.arange(0, 150), torch.arange(150, 250), torch.arange(300, 450)])  # uneven shifts
    x, y, s = x[keep], y[keep], s[keep]
    n, wd, sw = len(y), 5e-2, 0.5
    ens = fit_last_layer_ensemble(x, y, s, 3, weight_decay=wd, shift_weight=sw, standardize=False, tol=1e-10)
    for k in range(3):
        m = s == k
        ref = linear_probe(x[m], y[m], x[m], y[m], weight_decay=wd * n / int(m.sum()), standardize=False, tol=1e-10)
        assert torch.allclose(ens.weight[k], ref.weight, atol=1e-5), k
        assert torch.allclose(ens.bias[k], ref.bias, atol=1e-5), k
    ref = linear_probe(x, s, x, s, weight_decay=wd / sw, standardize=False, tol=1e-10)
    assert torch.allclose(ens.shift_predictor.weight, ref.weight, atol=1e-5)
    assert torch.allclose(ens.shift_predictor.bias, ref.bias, atol=1e-5)


def test_lle_standardisation_is_folded_into_the_module():
    x, y, s = _shift_data(n_per=100, seed=2)
    x32 = (x * torch.tensor([100.0, 0.01, 3.0, 1.0], dtype=torch.float64) + 7).float()
    ens = fit_last_layer_ensemble(x32, y, s, 3)
    assert ens.weight.dtype == torch.float32
    assert (ens(x32).argmax(1) == y).double().mean() > 0.95
    with pytest.raises(ValueError, match="shifts must lie"):
        fit_last_layer_ensemble(x32, y, s, 2)
    with pytest.raises(ValueError, match="shift_weight"):
        fit_last_layer_ensemble(x32, y, s, 3, shift_weight=-1.0)


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
