import pytest
import torch

from fastcl.train.augment import AugmentConfig, AugmentParams, BatchAugment, normalize, to_float

IDENTITY = AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, grayscale_p=0.0)
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def images(n=6, size=12, seed=0):
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_same_seed_same_views_and_params_are_deterministic():
    aug = BatchAugment(AugmentConfig(), MEAN, STD)
    x = images()
    a = aug(x, torch.Generator().manual_seed(3))
    b = aug(x, torch.Generator().manual_seed(3))
    c = aug(x, torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    params = aug.sample(len(x), torch.Generator().manual_seed(3))
    assert torch.equal(aug.apply(x, params), a)


def test_any_slice_of_a_batch_is_augmented_like_the_whole_batch():
    aug = BatchAugment(AugmentConfig(), MEAN, STD)
    x = images(10)
    params = aug.sample(10, torch.Generator().manual_seed(0))
    full = aug.apply(x, params)
    for s, e in [(0, 3), (3, 7), (7, 10)]:
        torch.testing.assert_close(aug.apply(x[s:e], params[s:e]), full[s:e], rtol=0, atol=1e-6)
    assert isinstance(params[2:5], AugmentParams) and len(params[2:5]) == 3


def test_identity_config_only_normalises():
    aug = BatchAugment(IDENTITY, MEAN, STD)
    x = images()
    out = aug(x, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, normalize(to_float(x), MEAN, STD), rtol=0, atol=1e-5)
    torch.testing.assert_close(aug.eval_transform(x), normalize(to_float(x), MEAN, STD))


def test_flip_is_a_horizontal_mirror():
    aug = BatchAugment(AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=1.0, jitter_p=0.0,
                                     grayscale_p=0.0), MEAN, STD)
    x = images()
    out = aug(x, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, normalize(to_float(x).flip(-1), MEAN, STD), rtol=0, atol=1e-5)


def test_grayscale_makes_channels_equal_and_views_stay_in_range():
    aug = BatchAugment(AugmentConfig(grayscale_p=1.0), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    out = aug(images(), torch.Generator().manual_seed(0))
    torch.testing.assert_close(out[:, 0], out[:, 1])
    torch.testing.assert_close(out[:, 1], out[:, 2])
    colour = BatchAugment(AugmentConfig(), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))(images(), torch.Generator())
    assert colour.min() >= 0 and colour.max() <= 1


def test_crop_zooms_in_and_jitter_changes_colours():
    x = images(64)
    g = torch.Generator().manual_seed(0)
    crop = BatchAugment(AugmentConfig(crop_scale=(0.2, 0.2), flip_p=0, jitter_p=0, grayscale_p=0), MEAN, STD)
    params = crop.sample(64, g)
    area = params.theta[:, 0, 0].abs() * params.theta[:, 1, 1]
    torch.testing.assert_close(area, torch.full((64,), 0.2), rtol=1e-5, atol=1e-6)
    jitter = BatchAugment(AugmentConfig(crop_scale=(1, 1), crop_ratio=(1, 1), flip_p=0, jitter_p=1.0,
                                        grayscale_p=0), MEAN, STD)
    p = jitter.sample(64, g)
    assert (p.jitter[:, :3] != 1).all() and (p.jitter[:, 3] != 0).all()
    assert not torch.allclose(jitter.apply(x, p), normalize(to_float(x), MEAN, STD))


def test_uint8_and_float_inputs_agree_and_out_size():
    aug = BatchAugment(AugmentConfig(), MEAN, STD, out_size=8)
    x = images()
    params = aug.sample(len(x), torch.Generator().manual_seed(1))
    a = aug.apply(x, params)
    b = aug.apply(x.float() / 255, params)
    assert a.shape == (6, 3, 8, 8) and a.dtype == torch.float32
    torch.testing.assert_close(a, b)
    assert aug.eval_transform(x).shape == (6, 3, 8, 8)


def test_bad_config_and_inputs_raise():
    with pytest.raises(ValueError, match="crop_scale"):
        AugmentConfig(crop_scale=(0.0, 1.0))
    with pytest.raises(ValueError, match="grayscale_p"):
        AugmentConfig(grayscale_p=1.5)
    aug = BatchAugment()
    with pytest.raises(ValueError, match="params describe"):
        aug.apply(images(4), aug.sample(3, torch.Generator()))
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        aug.apply(torch.zeros(3, 8, 8), aug.sample(3, torch.Generator()))
