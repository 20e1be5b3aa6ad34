#!/usr/bin/env bash
# Fetch the peer libraries the GPU stages compare against, as wheels for the lent GPU machine's Python (3.12,
# x86_64 Linux), into .whl/ at the repository root. The device machine has no network: its run carries the folder
# (the device tool's `carry: [".whl"]`), and benches/gpu_run.sh installs it offline into a folder of its own on
# PYTHONPATH. Run here, where pip reaches the package index:
#
#   bash benches/gpu_wheels.sh            # then: run(command="OUT=$OUT bash benches/gpu_run.sh", carry=[".whl"])
#
# The peers, all pure Python: siglip-kernel (the sigmoid loss's GPU bar), open_clip_torch (SigLipLoss, ClipLoss;
# its loss module needs only torch, and ftfy / wcwidth let the package import), pytorch-metric-learning and inf-cl
# (the contrastive peers of gpu_small_n.py and gpu_correctness.py). Everything else they need (torch, triton,
# numpy, timm, torchvision, huggingface-hub, regex, tqdm, scikit-learn) is in the machine's image.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/.whl"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
PEERS=(siglip-kernel==0.1.2 open_clip_torch==3.3.0 ftfy wcwidth pytorch-metric-learning==2.9.0 inf-cl==1.2.1)
mkdir -p "$DEST"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DEST" "${PEERS[@]}"
ls -l "$DEST"
du -sh "$DEST"
