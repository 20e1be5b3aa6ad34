import os
import pickle
import sys

import numpy as np
import pytest
import torch

from fastcl.train.data import (
    DatasetNotFoundError,
    MissingDependencyError,
    load_dataset,
    make_spurious_cues,
    spurious_cues_splits,
)

# ------------------------------------------------------------------ spurious-cues


def test_same_seed_same_bytes_other_seed_other_images():
    a = make_spurious_cues(64, seed=3, split="train")
    b = make_spurious_cues(64, seed=3, split="train")
    c = make_spurious_cues(64, seed=4, split="train")
    for name in ("images", "labels", "bg_aligned", "coobj_aligned", "bg", "coobj"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert not torch.equal(a.images, c.images)
    assert a.images.dtype == torch.uint8 and a.images.shape == (64, 3, 32, 32)


def test_generation_does_not_depend_on_thread_count_or_global_rng():
    threads = torch.get_num_threads()
    a = make_spurious_cues(32, seed=0, split="test")
    torch.set_num_threads(2)
    torch.manual_seed(123)
    b = make_spurious_cues(32, seed=0, split="test")
    torch.set_num_threads(threads)
    assert torch.equal(a.images, b.images)


def test_splits_are_different_draws():
    s = spurious_cues_splits(seed=0, train_samples=64, val_samples=64, test_samples=64)
    assert not torch.equal(s.train.images, s.val.images)
    assert not torch.equal(s.val.images, s.test.images)
    assert s.num_classes == 2 and s.cue_agreement == 0.95 and s.val.has_groups


def test_training_cues_agree_with_the_class_95_percent_of_the_time():
    ds = make_spurious_cues(4000, seed=0, split="train", image_size=16, classes=4)
    assert abs(ds.bg_aligned.float().mean().item() - 0.95) < 0.02
    assert abs(ds.coobj_aligned.float().mean().item() - 0.95) < 0.02
    # independent cues: both conflicting about 0.05 ** 2 of the time
    assert ((~ds.bg_aligned) & (~ds.coobj_aligned)).float().mean().item() < 0.01
    # balanced classes
    assert torch.bincount(ds.labels, minlength=4).tolist() == [1000] * 4
    ds = make_spurious_cues(2000, seed=0, split="train", image_size=16, cue_agreement=0.7)
    assert abs(ds.bg_aligned.float().mean().item() - 0.7) < 0.04


@pytest.mark.parametrize("split", ["val", "test"])
def test_evaluation_splits_are_exactly_group_balanced(split):
    k = 4
    ds = make_spurious_cues(4 * k * 10, seed=1, split=split, image_size=16, classes=k)
    cell = ds.labels * 4 + ds.bg_aligned.long() * 2 + ds.coobj_aligned.long()
    assert torch.bincount(cell, minlength=4 * k).tolist() == [10] * (4 * k)


def test_group_metadata_is_consistent():
    ds = make_spurious_cues(600, seed=2, split="test", classes=3, image_size=16)
    assert torch.equal(ds.bg_aligned, ds.bg == ds.labels)
    assert torch.equal(ds.coobj_aligned, ds.coobj == ds.labels)
    assert ds.bg.min() >= 0 and ds.bg.max() < 3 and ds.coobj.max() < 3
    # a conflicting cue points to each of the other classes
    conflict = ~ds.bg_aligned & (ds.labels == 0)
    assert set(ds.bg[conflict].tolist()) == {1, 2}


def _nearest_mean_accuracy(x_tr, y_tr, x_te, y_te, k):
    means = torch.stack([x_tr[y_tr == c].mean(0) for c in range(k)])
    return (torch.cdist(x_te, means).argmin(1) == y_te).float().mean().item()


def test_cues_are_easier_than_the_core_object():
    """On raw pixels a nearest-class-mean classifier reads the background (and co-object colour) far better than
    the core shape: the shortcut is the easy feature."""
    tr = make_spurious_cues(800, seed=0, split="test", classes=4)
    te = make_spurious_cues(800, seed=1, split="test", classes=4)
    x_tr, x_te = tr.images.flatten(1).float(), te.images.flatten(1).float()
    acc_bg = _nearest_mean_accuracy(x_tr, tr.bg, x_te, te.bg, 4)
    acc_core = _nearest_mean_accuracy(x_tr, tr.labels, x_te, te.labels, 4)
    assert acc_bg > 0.9
    assert acc_core < 0.6
    # colour statistics alone identify the co-object better than chance
    col_tr = tr.images.float().flatten(2).max(2).values
    col_te = te.images.float().flatten(2).max(2).values
    assert _nearest_mean_accuracy(col_tr, tr.coobj, col_te, te.coobj, 4) > 0.3


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="classes"):
        make_spurious_cues(8, seed=0, classes=9)
    with pytest.raises(ValueError, match="split"):
        make_spurious_cues(8, seed=0, split="dev")
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("imagenet")


# ------------------------------------------------------------------ CIFAR


def _write_cifar10(root, n_per_batch=4):
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d = {b"data": rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8),
             b"labels": list(rng.integers(0, 10, n_per_batch))}
        with open(folder / name, "wb") as f:
            pickle.dump(d, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f)
    return folder


def test_missing_cifar_directory_says_what_to_download_and_where(tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset("cifar10", data_dir=str(tmp_path / "nowhere"))
    msg = str(e.value)
    assert "cifar-10-python.tar.gz" in msg and "cifar-10-batches-py" in msg and "nowhere" in msg
    with pytest.raises(DatasetNotFoundError, match="cifar-100-python"):
        load_dataset("cifar100", data_dir=str(tmp_path))
    with pytest.raises(DatasetNotFoundError, match="--data-dir"):
        load_dataset("cifar10")


def test_cifar10_pickles_are_read(tmp_path):
    folder = _write_cifar10(tmp_path)
    with open(folder / "data_batch_1", "rb") as f:
        first = pickle.load(f, encoding="bytes")
    for data_dir in (tmp_path, folder):  # the parent or the extracted folder itself
        s = load_dataset("cifar10", data_dir=str(data_dir))
        assert s.train.images.shape == (20, 3, 32, 32) and s.test.images.shape == (4, 3, 32, 32)
        assert s.num_classes == 10 and s.val is None and not s.train.has_groups
        assert s.class_names[3] == "c3"
        assert torch.equal(s.train.images[0].flatten(), torch.from_numpy(first[b"data"][0]))
        assert s.train.labels[:4].tolist() == [int(v) for v in first[b"labels"]]


def test_cifar100_uses_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name, n in (("train", 6), ("test", 2)):
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": np.zeros((n, 3072), np.uint8), b"fine_labels": [99] * n,
                         b"coarse_labels": [1] * n}, f)
    s = load_dataset("cifar100", data_dir=str(tmp_path), train_samples=4)
    assert s.num_classes == 100 and len(s.train) == 4 and s.train.labels.tolist() == [99] * 4


# ------------------------------------------------------------------ folder / urbancars


def test_missing_folder_and_urbancars_directories_raise_clear_errors(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="train/<class>"):
        load_dataset("folder", data_dir=str(tmp_path))
    with pytest.raises(DatasetNotFoundError, match="bg-0.95_co_occur_obj-0.95"):
        load_dataset("urbancars", data_dir=str(tmp_path))


def test_folder_without_pillow_says_how_to_install(tmp_path, monkeypatch):
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "test" / "a").mkdir(parents=True)
    (tmp_path / "train" / "a" / "x.png").write_bytes(b"")
    (tmp_path / "test" / "a" / "y.png").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "PIL", None)  # import PIL now raises ImportError
    with pytest.raises(MissingDependencyError, match="pip install pillow"):
        load_dataset("folder", data_dir=str(tmp_path))


def test_folder_images_are_read_and_resized(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    for split, n in (("train", 3), ("test", 2)):
        for c, colour in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
            os.makedirs(tmp_path / split / c)
            for i in range(n):
                Image.new("RGB", (20, 10), colour).save(tmp_path / split / c / f"{i}.png")
    s = load_dataset("folder", data_dir=str(tmp_path), image_size=8)
    assert s.train.images.shape == (6, 3, 8, 8) and s.class_names == ["cat", "dog"]
    assert s.train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert s.train.images[0, 0].min() == 255 and s.train.images[-1, 2].min() == 255


def test_urbancars_release_layout_gives_groups(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    names = ("urban", "country")
    for ratio, split in (("bg-0.95_co_occur_obj-0.95", "train"), ("bg-0.5_co_occur_obj-0.5", "val"),
                         ("bg-0.5_co_occur_obj-0.5", "test")):
        for o in names:
            for b in names:
                for c in names:
                    folder = tmp_path / "urbancars" / ratio / split / f"obj-{o}_bg-{b}_co_occur_obj-{c}"
                    os.makedirs(folder)
                    Image.new("RGB", (12, 12), (40, 80, 120)).save(folder / "0.jpg")
    s = load_dataset("urbancars", data_dir=str(tmp_path), image_size=8)  # finds DIR/urbancars/...
    assert s.num_classes == 2 and s.cue_agreement == 0.95 and s.val is not None
    for split in (s.train, s.val, s.test):
        assert split.images.shape == (8, 3, 8, 8) and split.has_groups
        assert split.bg_aligned.sum() == 4 and split.coobj_aligned.sum() == 4
        assert torch.equal(split.bg_aligned, split.bg == split.labels)
    assert s.train.labels.tolist() == [0] * 4 + [1] * 4


def test_an_unreadable_folder_image_is_named(tmp_path):
    """A corrupt file with an image extension stops the in-memory folder loader with a one-line error naming it."""
    from fastcl.train.data import UnreadableImageError

    Image = pytest.importorskip("PIL.Image")
    for split in ("train", "test"):
        os.makedirs(tmp_path / split / "cat")
        Image.new("RGB", (20, 10), (255, 0, 0)).save(tmp_path / split / "cat" / "0.png")
    bad = tmp_path / "train" / "cat" / "1.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    with pytest.raises(UnreadableImageError, match="could not read image") as e:
        load_dataset("folder", data_dir=str(tmp_path), image_size=8)
    assert isinstance(e.value, ValueError) and str(bad) in str(e.value) and "\n" not in str(e.value)


def test_folder_images_of_16_bits_keep_their_grey_level(tmp_path):
    """A 16-bit greyscale PNG is read at its grey level (the high byte), not clipped to white."""
    Image = pytest.importorskip("PIL.Image")
    for split in ("train", "test"):
        os.makedirs(tmp_path / split / "cat")
        Image.fromarray(np.full((10, 20), 100 * 257, np.uint16)).save(tmp_path / split / "cat" / "0.png")
    s = load_dataset("folder", data_dir=str(tmp_path), image_size=8)
    assert s.train.images.shape == (1, 3, 8, 8) and (s.train.images.int() - 100).abs().max() <= 1


def test_a_damaged_cifar_file_is_named_with_what_to_do(tmp_path):
    """A truncated batch (an interrupted download) or one that is not a CIFAR batch: a ValueError naming the file and
    saying to download the release again (fastcl-pretrain prints it as one line, exit status 2)."""
    folder = _write_cifar10(tmp_path)
    with open(folder / "data_batch_3", "rb") as f:
        whole = f.read()
    for damage in (whole[: len(whole) // 2], b"garbage\n", pickle.dumps({b"other": 1})):
        with open(folder / "data_batch_3", "wb") as f:
            f.write(damage)
        with pytest.raises(ValueError) as e:
            load_dataset("cifar10", data_dir=str(tmp_path))
        msg = str(e.value)
        assert str(folder / "data_batch_3") in msg and "cifar-10-python.tar.gz" in msg and "\n" not in msg, msg
