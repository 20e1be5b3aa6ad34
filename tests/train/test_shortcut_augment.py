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
