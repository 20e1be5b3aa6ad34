"""fastcl-pretrain's data paths on a folder of JPEGs: images per second and peak memory, in memory vs streaming.

    python benches/loader_bench.py                          # 20,000 + 5,000 generated 256 px JPEGs, 64 px crops
    python benches/loader_bench.py --images 2000 --small 500 --root /tmp/jpegs   # quick

Not a test (not collected by pytest). Each measurement runs in a fresh process (peak memory is per process):

* ``in-memory``: ``load_dataset("folder")`` decodes the whole split into one ``uint8`` tensor (Pillow, resized to
  a square), then one epoch of batches is indexed out of it. Time includes the decode (it happens once per run).
* ``stream wK``: :class:`fastcl.train.data.loader.StreamingBatches` with K ``DataLoader`` workers (K = 0: decoded in
  the main process), one epoch of batches: paths only in memory, aspect-preserving resize + random crop.

Memory is the peak, sampled every 50 ms, of the summed proportional set size (PSS, ``/proc/PID/smaps_rollup``)
of the measuring process and its workers: shared pages (the torch library) are counted once, so the total is
what the job really occupies. The machine may be shared: rates are medians of ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

CLASSES = 10


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


def generate(root: str, n: int, seed: int = 0) -> None:
    """``root/train/cK/iiiii.jpg`` (n images, 256 px short side, long side 256-340 px, either orientation)
    and a small ``root/test``; skipped when already there."""
    import torch
    from PIL import Image

    marker = os.path.join(root, f".complete-{n}")
    if os.path.exists(marker):
        return
    g = torch.Generator().manual_seed(seed)
    for split, count in (("train", n), ("test", 20 * CLASSES)):
        for c in range(CLASSES):
            os.makedirs(os.path.join(root, split, f"c{c}"), exist_ok=True)
        for i in range(count):
            long = 256 + int(torch.randint(0, 85, (1,), generator=g))
            w, h = (long, 256) if i % 2 else (256, long)
            small = (torch.rand(6, 6, 3, generator=g) * 255).byte().numpy()
            im = Image.fromarray(small).resize((w, h), Image.BILINEAR)
            im.save(os.path.join(root, split, f"c{i % CLASSES}", f"{i:06d}.jpg"), quality=90)
    open(marker, "w").close()


def link_subset(src: str, dst: str, n: int) -> None:
    """``dst`` = the first ``n`` training images of ``src`` (symlinks) and its test split."""
    if os.path.exists(os.path.join(dst, f".complete-{n}")):
        return
    for split in ("train", "test"):
        for c in range(CLASSES):
            d = os.path.join(dst, split, f"c{c}")
            os.makedirs(d, exist_ok=True)
            files = sorted(os.listdir(os.path.join(src, split, f"c{c}")))
            if split == "train":
                files = files[: n // CLASSES]
            for f in files:
                link = os.path.join(d, f)
                if not os.path.lexists(link):
                    os.symlink(os.path.join(src, split, f"c{c}", f), link)
    open(os.path.join(dst, f".complete-{n}"), "w").close()


# --------------------------------------------------------------------------------------------------
# Memory sampling
# --------------------------------------------------------------------------------------------------


def _pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _children(pid: int) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(name))
            except (OSError, IndexError, ValueError):
                pass
    return out


class PeakMemory:
    """Peak summed PSS (MB) of this process and its children, sampled in a thread."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval, self.peak_kb, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            total = _pss_kb(me) + sum(_pss_kb(p) for p in _children(me))
            self.peak_kb = max(self.peak_kb, total)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_mb(self) -> float:
        return self.peak_kb / 1024


# --------------------------------------------------------------------------------------------------
# One measurement (child process)
# --------------------------------------------------------------------------------------------------


def measure(mode: str, root: str, image_size: int, batch: int, workers: int) -> dict:
    import torch

    torch.set_num_threads(1)
    from fastcl.train.data import load_dataset
    from fastcl.train.data.loader import EpochBatchSampler, InMemoryBatches, StreamingBatches, load_streaming

    cpu = torch.device("cpu")
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        if mode == "in-memory":
            splits = load_dataset("folder", data_dir=root, image_size=image_size)
            sampler = EpochBatchSampler(len(splits.train), batch)
            src = InMemoryBatches(splits.train, sampler, cpu)
        else:
            splits = load_streaming("folder", data_dir=root, image_size=image_size)
            sampler = EpochBatchSampler(len(splits.train), batch)
            src = StreamingBatches(splits.train, sampler, cpu, workers=workers, prefetch=2)
        n = 0
        checksum = 0
        for x, _ in src.epoch(0):
            n += x.shape[0]
            checksum += int(x[:, :, 0, 0].sum())  # touch the data
        elapsed = time.perf_counter() - t0
        del src
    return {"mode": mode, "workers": workers, "images": n, "train_files": len(splits.train),
            "seconds": elapsed, "images_per_s": n / elapsed, "peak_pss_mb": mem.peak_mb, "checksum": checksum}


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------


def run_child(mode: str, root: str, args: argparse.Namespace, workers: int = 0) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--root", root, "--image-size", str(args.image_size),
           "--batch-size", str(args.batch_size), "--workers", str(workers)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default="/tmp/fastcl-loader-bench", help="where the JPEGs are generated (kept)")
    p.add_argument("--images", type=int, default=20000)
    p.add_argument("--small", type=int, default=5000, help="the smaller folder of the memory-growth comparison")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--workers", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.root, args.image_size, args.batch_size, args.workers)))
        return

    big, small = os.path.join(args.root, f"n{args.images}"), os.path.join(args.root, f"n{args.small}")
    t = time.perf_counter()
    generate(big, args.images)
    link_subset(big, small, args.small)
    print(f"data: {args.images} + {args.small} (links) JPEGs under {args.root} ({time.perf_counter() - t:.0f}s); "
          f"{os.cpu_count()} CPUs (possibly shared); crops {args.image_size} px, batch {args.batch_size}",
          file=sys.stderr)
    plan = [("in-memory", small, 0), ("in-memory", big, 0), ("stream", big, 0), ("stream", big, 1),
            ("stream", big, 2), ("stream", small, 2)]
    rows = []
    for mode, root, workers in plan:
        results = [run_child(mode, root, args, workers) for _ in range(args.repeats)]
        r = dict(results[0])
        r["images_per_s"] = statistics.median(x["images_per_s"] for x in results)
        r["peak_pss_mb"] = max(x["peak_pss_mb"] for x in results)
        rows.append(r)
        print(f"  {mode:9s} w{workers} {r['train_files']:6d} files: {r['images_per_s']:7.0f} images/s, "
              f"peak {r['peak_pss_mb']:6.0f} MB", file=sys.stderr)
    print()
    print("| path | workers | files | images/s | peak memory (PSS, MB) |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['mode']} | {r['workers'] if r['mode'] == 'stream' else '-'} | {r['train_files']:,} | "
              f"{r['images_per_s']:.0f} | {r['peak_pss_mb']:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
