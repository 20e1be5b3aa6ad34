"""The training loader: per-rank epoch batches (DistributedSampler semantics, mid-epoch resume), aspect-preserving
decoding, and fastcl-pretrain's streaming path end to end (workers, 2 gloo processes, kill and resume)."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastcl
from fastcl.train.data import ImageSet
from fastcl.train.data.loader import (
    EpochBatchSampler,
    InMemoryBatches,
    StreamingBatches,
    StreamingImageSet,
    decode_resized,
    iter_image_batches,
    load_streaming,
)
from fastcl.train.stages import CRASH_AFTER_STEPS_ENV

REPO = os.path.dirname(os.path.dirname(os.path.abspath(fastcl.__file__)))
Image = pytest.importorskip("PIL.Image", reason="the streaming path decodes with Pillow here (pip install pillow)")


# ---- sampler


def test_ranks_read_disjoint_shards_that_make_up_the_global_batches():
    n, batch, world = 103, 12, 3
    single = EpochBatchSampler(n, batch, seed=5)
    ranks = [EpochBatchSampler(n, batch, rank=r, world_size=world, seed=5) for r in range(world)]
    for epoch in (0, 1):
        single.set_epoch(epoch)
        for s in ranks:
            s.set_epoch(epoch)
        glob = list(single)
        per_rank = [list(s) for s in ranks]
        assert len(glob) == 103 // 12 == 8 and all(len(p) == 8 for p in per_rank)
        for step in range(8):
            parts = [p[step] for p in per_rank]
            assert all(len(x) == 4 for x in parts)
            assert sum(parts, []) == glob[step]  # rank r holds rows [4r, 4r + 4) of the global batch
        seen = sum(glob, [])
        assert len(set(seen)) == len(seen) == 96  # no sample twice in an epoch; 7 dropped with the last batch
    single.set_epoch(0)
    e0 = list(single)
    single.set_epoch(1)
    assert list(single) != e0  # a new permutation each epoch
    single.set_epoch(0)
    assert list(single) == e0  # ... that depends on (seed, epoch) only


def test_resume_mid_epoch_skips_the_batches_already_done():
    s = EpochBatchSampler(50, 10, rank=1, world_size=2, seed=0)
    s.set_epoch(3)
    full = list(s)
    s.set_epoch(3, start_step=2)
    assert list(s) == full[2:] and len(s) == 3
    with pytest.raises(ValueError, match="start_step"):
        s.set_epoch(3, start_step=6)
    with pytest.raises(ValueError, match="multiple of world_size"):
        EpochBatchSampler(50, 9, world_size=2)
    with pytest.raises(ValueError, match="fewer than one batch"):
        EpochBatchSampler(5, 8)


def test_in_memory_batches_follow_the_sampler():
    images = torch.arange(20, dtype=torch.uint8).view(20, 1, 1, 1).expand(20, 3, 2, 2).contiguous()
    train = ImageSet(images, torch.arange(20))
    sampler = EpochBatchSampler(20, 8, rank=1, world_size=2, seed=3)
    src = InMemoryBatches(train, sampler, torch.device("cpu"))
    sampler.set_epoch(2)
    expected = list(sampler)
    got = [(x, y) for x, y in src.epoch(2)]
    assert [y.tolist() for _, y in got] == expected
    assert all(torch.equal(x[:, 0, 0, 0].long(), y) for x, y in got)


# ---- decoding


def _two_halves(path, w, h):
    """Left half red, right half blue."""
    x = torch.zeros(h, w, 3, dtype=torch.uint8)
    x[:, : w // 2, 0] = 255
    x[:, w // 2:, 2] = 255
    Image.fromarray(x.numpy()).save(path)


def test_decode_keeps_the_aspect_ratio_and_crops_the_long_side(tmp_path):
    path = str(tmp_path / "wide.png")
    _two_halves(path, 80, 40)  # short side 40 -> 10: a 20 x 10 image, then a 10 x 10 crop
    centre = decode_resized(path, 10)
    assert centre.shape == (3, 10, 10) and centre.dtype == torch.uint8
    # centre crop = columns 5..14 of 20: five red, then five blue (one blended column each side of the edge)
    assert (centre[0, :, :4] > 200).all() and (centre[2, :, :4] < 55).all()
    assert (centre[2, :, 6:] > 200).all() and (centre[0, :, 6:] < 55).all()
    left = decode_resized(path, 10, offset=0.0)  # columns 0..9: all red
    assert (left[0] > 200).all() and (left[2] < 55).all()
    right = decode_resized(path, 10, offset=0.999)  # columns 10..19: all blue
    assert (right[2] > 200).all() and (right[0] < 55).all()
    tall = str(tmp_path / "tall.png")
    Image.fromarray(torch.full((60, 30, 3), 77, dtype=torch.uint8).numpy()).save(tall)
    assert torch.equal(decode_resized(tall, 15), torch.full((3, 15, 15), 77, dtype=torch.uint8))


def test_decode_reads_every_image_mode_as_rgb(tmp_path):
    """Greyscale, 16-bit greyscale, palette and RGBA files and an image smaller than the crop all decode to
    ``uint8 [3, S, S]`` with their grey levels (16-bit: the high byte, not clipped at 255)."""
    grey = np.full((30, 40), 100, np.uint8)
    files = {"grey.png": Image.fromarray(grey), "grey16.png": Image.fromarray(grey.astype(np.uint16) * 257),
             "palette.png": Image.fromarray(np.stack([grey] * 3, -1)).convert("P", palette=Image.Palette.ADAPTIVE),
             "rgba.png": Image.fromarray(np.stack([grey] * 3 + [np.full_like(grey, 255)], -1)),
             "tiny.png": Image.fromarray(np.full((3, 5), 100, np.uint8))}
    for name, im in files.items():
        path = str(tmp_path / name)
        im.save(path)
        x = decode_resized(path, 16)
        assert x.shape == (3, 16, 16) and x.dtype == torch.uint8, name
        assert (x.int() - 100).abs().max() <= 1, (name, x.unique())


def test_jpeg_reduced_scale_decode_matches_a_full_decode(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = torch.nn.functional.interpolate(torch.rand(1, 3, 8, 12, generator=g), size=(256, 384), mode="bilinear")
    path = str(tmp_path / "smooth.jpg")
    Image.fromarray((base[0].permute(1, 2, 0) * 255).round().byte().numpy()).save(path, quality=95)
    got = decode_resized(path, 32).float()
    with Image.open(path) as im:  # reference: full decode, one antialiased resize, centre crop
        full = torch.from_numpy(np.array(im.convert("RGB").resize((48, 32), Image.LANCZOS)))
    ref = full.permute(2, 0, 1)[:, :, 8:40].float()
    assert (got - ref).abs().mean() < 3.0  # intensity levels out of 255


# ---- streaming sets and batches


def _folder(root, n_per_class=12, classes=("a", "b"), size=(48, 32), fmt="png"):
    """DIR/{train,test}/<class>/i.png: image i of class c is filled with value 10 * i + c (decodable back)."""
    for split in ("train", "test"):
        for c, name in enumerate(classes):
            os.makedirs(os.path.join(root, split, name), exist_ok=True)
            for i in range(n_per_class):
                v = 10 * i + c
                Image.fromarray(torch.full((size[1], size[0], 3), v, dtype=torch.uint8).numpy()).save(
                    os.path.join(root, split, name, f"{i:03d}.{fmt}"))
    return root


def test_load_streaming_lists_files_and_streams_batches_with_workers(tmp_path):
    root = _folder(str(tmp_path / "data"))
    splits = load_streaming("folder", data_dir=root, image_size=16)
    assert splits.image_size == 16 and splits.channels == 3 and splits.num_classes == 2
    assert len(splits.train) == len(splits.test) == 24 and splits.info["streaming"]
    value = torch.tensor([10 * int(os.path.basename(p)[:3]) + int(os.path.basename(os.path.dirname(p)) == "b")
                          for p in splits.train.paths])
    sampler = EpochBatchSampler(24, 8, seed=1)
    src = StreamingBatches(splits.train, sampler, torch.device("cpu"), workers=2, prefetch=2, seed=1)
    for epoch in (0, 1):  # persistent workers across epochs
        sampler_ref = EpochBatchSampler(24, 8, seed=1)
        sampler_ref.set_epoch(epoch)
        batches = list(src.epoch(epoch))
        for (x, y), rows in zip(batches, sampler_ref):
            assert x.shape == (8, 3, 16, 16) and x.dtype == torch.uint8
            assert x[:, 0, 0, 0].long().tolist() == value[rows].tolist()
            assert y.tolist() == splits.train.labels[rows].tolist()
    assert [x.shape[0] for x in iter_image_batches(splits.test, 10, workers=1)] == [10, 10, 4]
    sub = splits.test.subset(torch.tensor([3, 5]))
    assert isinstance(sub, StreamingImageSet) and sub.paths == [splits.test.paths[3], splits.test.paths[5]]


def test_random_crops_do_not_depend_on_the_worker_count(tmp_path):
    root = str(tmp_path / "wide")
    os.makedirs(os.path.join(root, "x"))
    paths = []
    for i in range(6):
        p = os.path.join(root, "x", f"{i}.png")
        img = torch.arange(64, dtype=torch.uint8).mul(3).view(1, 64, 1).expand(16, 64, 3).contiguous()
        Image.fromarray(img.numpy()).save(p)
        paths.append(p)
    train = StreamingImageSet(paths, torch.zeros(6, dtype=torch.long), 16)
    out = []
    for workers in (0, 2):
        sampler = EpochBatchSampler(6, 6, seed=4)
        src = StreamingBatches(train, sampler, torch.device("cpu"), workers=workers, seed=4)
        out.append(torch.cat([x for x, _ in src.epoch(1)]))
    assert torch.equal(out[0], out[1])
    assert len({int(x[0, 0, 0]) for x in out[0]}) > 1  # the crops differ between images


def test_missing_folder_and_bad_train_samples(tmp_path):
    from fastcl.train.data import DatasetNotFoundError

    with pytest.raises(DatasetNotFoundError, match="train/ and test/"):
        load_streaming("folder", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="train_samples must be positive"):
        load_streaming("folder", data_dir=str(tmp_path), train_samples=0)


def _rank_main(rank, world, port, root, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        splits = load_streaming("folder", data_dir=root, image_size=16)
        sampler = EpochBatchSampler(len(splits.train), 8, rank=rank, world_size=world, seed=2)
        src = StreamingBatches(splits.train, sampler, torch.device("cpu"), workers=1, seed=2)
        full = [x[:, 0, 0, 0].tolist() for x, _ in src.epoch(1)]
        resumed = [x[:, 0, 0, 0].tolist() for x, _ in src.epoch(1, start_step=1)]
        gathered = [None] * world
        dist.all_gather_object(gathered, {"full": full, "resumed": resumed})
        if rank == 0:
            with open(os.path.join(result_dir, "out.json"), "w") as f:
                json.dump(gathered, f)
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_stream_their_own_shards_and_resume_mid_epoch(tmp_path):
    root = _folder(str(tmp_path / "data"))
    mp.start_processes(_rank_main, args=(2, _free_port(), root, str(tmp_path)), nprocs=2, start_method="spawn")
    with open(tmp_path / "out.json") as f:
        ranks = json.load(f)
    splits = load_streaming("folder", data_dir=root, image_size=16)
    value = [10 * int(os.path.basename(p)[:3]) + int(os.path.basename(os.path.dirname(p)) == "b")
             for p in splits.train.paths]
    single = EpochBatchSampler(24, 8, seed=2)
    single.set_epoch(1)
    expected = [[value[i] for i in rows] for rows in single]
    assert [ranks[0]["full"][s] + ranks[1]["full"][s] for s in range(3)] == expected
    assert [r["resumed"] for r in ranks] == [r["full"][1:] for r in ranks]


# ---- fastcl-pretrain --stream


def _env():
    e = dict(os.environ)
    e["PYTHONPATH"] = REPO + os.pathsep + e.get("PYTHONPATH", "")
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    return e


def _cli(*args, crash_after_steps=0):
    env = _env()
    if crash_after_steps:
        env[CRASH_AFTER_STEPS_ENV] = str(crash_after_steps)  # the test hook: exit status 137 after that step
    return subprocess.run([sys.executable, "-m", "fastcl.train.pretrain", *args], env=env, capture_output=True,
                          text=True, timeout=300)


def test_pretrain_streaming_kill_and_resume_mid_epoch_equals_uninterrupted(tmp_path):
    root = _folder(str(tmp_path / "data"), n_per_class=16, size=(40, 24), fmt="jpg")
    base = ["--dataset", "folder", "--data-dir", root, "--stream", "--workers", "1", "--image-size", "16",
            "--widths", "4,8", "--proj-dim", "8", "--batch-size", "8", "--epochs", "2", "--threads", "1",
            "--probe-every", "0", "--quiet", "--no-plots", "--checkpoint-every", "3"]
    ref = _cli(*base, "--out", str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr
    assert "streamed by 1 worker(s)" in ref.stderr
    crashed = _cli(*base, "--out", str(tmp_path / "run"), crash_after_steps=6)
    assert crashed.returncode == 137
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert (ckpt["epoch"], ckpt["epoch_step"], ckpt["step"]) == (1, 2, 6)  # 4 steps per epoch
    resumed = _cli(*base, "--out", str(tmp_path / "run"), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a = torch.load(tmp_path / "ref" / "checkpoint.pt", map_location="cpu", weights_only=True)
    b = torch.load(tmp_path / "run" / "checkpoint.pt", map_location="cpu", weights_only=True)
    for k, v in a["model"].items():
        assert torch.equal(b["model"][k], v), k
    with open(tmp_path / "run" / "summary.json") as f:
        s = json.load(f)
    assert s["dataset"]["streaming"] is True and s["resumed"] is True and not s["not_evaluated"]


def test_folder_split_without_images_names_the_folder(tmp_path):
    """Both folder loaders (in memory and streaming) say which split has no images, with the layout hint."""
    from fastcl.train.data import DatasetNotFoundError, load_folder

    os.makedirs(tmp_path / "train" / "cat")
    os.makedirs(tmp_path / "test" / "cat")
    Image.new("RGB", (8, 8)).save(tmp_path / "train" / "cat" / "a.png")
    for load in (lambda: load_folder(str(tmp_path)), lambda: load_streaming("folder", data_dir=str(tmp_path))):
        with pytest.raises(DatasetNotFoundError, match=r"no images .* under .*test.*class-per-subfolder"):
            load()


@pytest.mark.parametrize("workers", [0, 1])
def test_an_unreadable_image_is_named_in_one_line(tmp_path, workers):
    """A corrupt image stops listing (channel statistics) and streaming (training batches, evaluation batches, with
    or without worker processes) with an UnreadableImageError whose message is one line naming the file."""
    from fastcl.train.data import UnreadableImageError

    root = _folder(str(tmp_path / "data"), n_per_class=4)
    bad = os.path.join(root, "train", "a", "002.png")
    with open(bad, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(UnreadableImageError, match="could not read image") as e:
        load_streaming("folder", data_dir=root, image_size=16)
    assert bad in str(e.value) and "\n" not in str(e.value)
    paths = [os.path.join(root, "train", c, f"{i:03d}.png") for c in "ab" for i in range(4)]
    train = StreamingImageSet(paths, torch.tensor([0] * 4 + [1] * 4), 16)
    src = StreamingBatches(train, EpochBatchSampler(8, 8, seed=0), torch.device("cpu"), workers=workers)
    for batches in (lambda: list(src.epoch(0)), lambda: list(iter_image_batches(train, 4, workers=workers))):
        with pytest.raises(UnreadableImageError) as e:
            batches()
        assert str(e.value).startswith(f"could not read image {bad!r}: ") and "\n" not in str(e.value)


def test_pretrain_with_an_unreadable_image_stops_in_one_line(tmp_path):
    """fastcl-pretrain --stream: a corrupt image among those read for the channel statistics is a configuration
    error before training (exit 2); one met while training stops the run (exit 1) with a summary saying why. Both
    errors are one line naming the file."""
    root = str(tmp_path / "data")
    for split in ("train", "test"):
        for c in ("a", "b"):
            os.makedirs(os.path.join(root, split, c))
            for i in range(132 if split == "train" else 4):  # 264 training images
                Image.fromarray(np.full((20, 20, 3), i, np.uint8)).save(os.path.join(root, split, c, f"{i:03d}.png"))
    # the statistics read 256 images spread over the split: the first is one of them, image 16 is not
    first, skipped = (os.path.join(root, "train", "a", f"{i:03d}.png") for i in (0, 16))
    base = ["--dataset", "folder", "--data-dir", root, "--stream", "--image-size", "16", "--widths", "4,8",
            "--proj-dim", "8", "--batch-size", "88", "--epochs", "1", "--threads", "1", "--probe-every", "0",
            "--quiet", "--no-plots"]
    for bad, out, code in ((first, tmp_path / "listing", 2), (skipped, tmp_path / "training", 1)):
        with open(bad, "rb") as f:
            good = f.read()
        with open(bad, "wb") as f:
            f.write(b"not an image")
        proc = _cli(*base, "--out", str(out))
        with open(bad, "wb") as f:
            f.write(good)
        assert proc.returncode == code, proc.stderr
        assert "Traceback" not in proc.stderr, proc.stderr
        errors = [line for line in proc.stderr.splitlines() if line.startswith("fastcl-pretrain: error: ")]
        assert len(errors) == 1 and f"could not read image {bad!r}" in errors[0], proc.stderr
    with open(tmp_path / "training" / "summary.json") as f:
        s = json.load(f)
    assert s["training"]["completed"] is False and skipped in s["training"]["error"]
