"""The watermark cue of the spurious-cues generator and the shortcut-breaking augmentations built on its layers."""


import pytest
import torch

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
    insert_random_watermark,
    insert_watermark,
    random_watermark_masks,
    remove_coobj,
    sample_cue_swap,
    sample_watermark,
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
    p1 = sample_cue_swap(data.bg, 3, torch.Generator().manual_seed(7))
    p2 = sample_cue_swap(data.bg, 3, torch.Generator().manual_seed(7))
    p3 = sample_cue_swap(data.bg, 3, torch.Generator().manual_seed(8))
    assert torch.equal(p1.target, p2.target) and p1.apply.all()
    assert not torch.equal(p1.target, p3.target)
    partial = SwapParams(p1.target, torch.arange(48) % 3 != 0)  # a hand-made partial swap keeps the others
    for fn, params in ((swap_background, partial), (swap_coobj, sample_cue_swap(data.coobj, 3, torch.Generator()))):
        batched, _ = fn(data, layers, params)
        again, _ = fn(data, layers, params)
        assert torch.equal(batched.images, again.images)
        for i in (0, 5, 17, 47):
            idx = torch.tensor([i])
            one, _ = fn(data.subset(idx), layers[idx], params[idx])
            assert torch.equal(one.images, batched.images[idx])
        skipped = ~params.apply
        assert torch.equal(batched.images[skipped], data.images[skipped])


@pytest.mark.parametrize("k", [2, 3, 5])
def test_cue_swap_always_changes_the_cue_uniformly_over_the_others(k):
    n = 6000
    cue = torch.arange(n) % k
    params = sample_cue_swap(cue, k, torch.Generator().manual_seed(0))
    assert (params.target != cue).all() and params.apply.all()
    for c in range(k):
        counts = torch.bincount(params.target[cue == c], minlength=k).double() / (n / k)
        want = torch.full((k,), 1 / (k - 1), dtype=torch.float64)
        want[c] = 0
        assert torch.allclose(counts, want, atol=0.04)


def test_shifted_sets_have_no_unchanged_copy():
    """The study's shifted training sets (BG, CoObj, watermark): no image equals its source, byte for byte, the
    swapped cue conflicts with the label wherever it agreed before, and every image carries a new watermark."""
    from fastcl.train.shortcuts import _shifted_sets

    train, layers = make_spurious_cues(2048, seed=0, split="train", watermark=0.9, return_layers=True)
    sets = _shifted_sets(train, layers, 2, "swap", 0.5, seed=0)
    assert set(sets) == {"original", "bg", "coobj", "wm"}
    for shift in ("bg", "coobj", "wm"):
        same = (sets[shift].images == train.images).flatten(1).all(1)
        assert not same.any(), (shift, int(same.sum()))
    assert torch.equal(sets["bg"].bg_aligned, ~train.bg_aligned)
    assert torch.equal(sets["coobj"].coobj_aligned, ~train.coobj_aligned)
    assert sets["bg"].bg_aligned.double().mean() < 0.1 and sets["coobj"].coobj_aligned.double().mean() < 0.1
    marked = train.watermark
    assert 0.4 < marked.double().mean() < 0.5 and sets["wm"].watermark.all()
    assert not (sets["wm"].images[marked] == train.images[marked]).flatten(1).all(1).any()


def test_random_watermark_draws_and_composite():
    g = torch.Generator().manual_seed(0)
    params = sample_watermark(500, g)
    assert params.glyphs.shape == (500, 8, 5, 3) and params.glyphs.flatten(2).any(2).all()
    assert set(params.scale.tolist()) == {1, 2}
    assert len(set(params.opacity.tolist())) == 9 and len(set(params.height.tolist())) == 9
    masks = random_watermark_masks(params, 32)
    assert masks.shape == (500, 32, 32) and set(masks.unique().tolist()) == {0.0, 1.0}
    # the text starts at the left edge, at the drawn height (moved up to fit), and is as tall as 5 glyph pixels
    rows = masks.any(2)
    for i in range(0, 500, 37):
        k, top = int(params.scale[i]), min(round(float(params.height[i]) * 32), 32 - 5 * int(params.scale[i]))
        assert masks[i, :, 0].any() == params.glyphs[i, 0, :, 0].any()
        assert rows[i].nonzero().min() >= top and rows[i].nonzero().max() < top + 5 * k
        glyph = params.glyphs[i, 0].repeat_interleave(k, 0).repeat_interleave(k, 1).float()
        assert torch.equal(masks[i, top:top + 5 * k, :3 * k], glyph)
    assert len({tuple(m.flatten().tolist()) for m in masks}) == 500  # every mark its own

    data = make_spurious_cues(500, seed=1, split="test")
    out = insert_random_watermark(data, params)
    assert out.watermark.all() and torch.equal(out.labels, data.labels)
    alpha = (params.opacity.view(-1, 1, 1) * masks).unsqueeze(1).double()
    x = data.images.double()
    assert torch.all((out.images.double() - (x + alpha * (255 - x))).abs() <= 0.5 + 1e-3)  # float32 composite, rounded
    assert torch.equal(out.images[:, :, masks[0] == 0][0], data.images[:, :, masks[0] == 0][0])
    assert torch.equal(insert_random_watermark(data.subset(torch.tensor([7])), params[7:8]).images, out.images[7:8])
    with pytest.raises(ValueError, match="params describe"):
        insert_random_watermark(data, params[:3])
    with pytest.raises(ValueError, match="n must be"):
        sample_watermark(-1, g)


def test_augmentation_argument_errors(cues):
    data, layers = cues
    with pytest.raises(ValueError, match="classes must be"):
        sample_cue_swap(data.bg, 1, torch.Generator())
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
