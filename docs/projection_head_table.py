"""The results table of docs/projection-head-study.md from finished ``fastcl-pretrain`` run directories.

    python docs/projection_head_table.py runs/mlp-s0 runs/mlp-s1 ... runs/none-s2

Runs are grouped by (epochs, head) from each run's ``config.json``; every cell is the mean ± sample standard deviation
over the group's seeds, in percentage points, of ``summary.json``'s linear-probe accuracy and DFR metrics
(``robustness.<layer>.*``). Per-seed worst-group accuracies of ``h`` and ``z`` follow each table.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

LAYERS = (("pre_projection", "h (pre)"), ("post_projection", "z (post)"))
COLUMNS = (
    ("linear probe acc", ("linear_probe", "accuracy"), False),
    ("DFR I.D. acc", ("robustness", "id_acc"), False),
    ("DFR worst-group", ("robustness", "worst_group_acc"), False),
    ("DFR BG gap", ("robustness", "bg_gap"), True),
    ("DFR CoObj gap", ("robustness", "coobj_gap"), True),
    ("DFR BG+CoObj gap", ("robustness", "both_gap"), True),
)
HEAD_NAMES = {"mlp": "mlp", "fixed": "fixed (κ = {kappa})", "none": "none", "linear": "linear"}


def metric(summary: dict, layer: str, section: str, key: str) -> float:
    """One metric of one layer in percentage points."""
    return 100.0 * summary[section][layer][key]


def cell(values: list, signed: bool) -> str:
    mean = statistics.fmean(values)
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    mean = 0.0 if round(mean, 1) == 0 else mean  # no "-0.0"
    text = f"{mean:+.1f}" if signed else f"{mean:.1f}"
    return f"{text.replace('-', '−')} ± {spread:.1f}"


def load(run_dirs: list) -> dict:
    """``{(epochs, head, kappa): [(seed, summary), ...]}`` sorted by seed."""
    groups = defaultdict(list)
    for run in map(Path, run_dirs):
        config = json.loads((run / "config.json").read_text())
        summary = json.loads((run / "summary.json").read_text())
        groups[(config["epochs"], config["head"], config["kappa"])].append((config["seed"], summary))
    order = list(HEAD_NAMES)
    keys = sorted(groups, key=lambda k: (-k[0], order.index(k[1]) if k[1] in order else len(order), k[2]))
    return {key: sorted(groups[key], key=lambda item: item[0]) for key in keys}


def table(groups: dict) -> str:
    lines = []
    for epochs in sorted({key[0] for key in groups}, reverse=True):
        lines += [f"{epochs} epochs:", "", "| head | features | " + " | ".join(c[0] for c in COLUMNS) + " |"]
        lines.append("| --- " * (len(COLUMNS) + 2) + "|")
        notes = []
        for (group_epochs, head, kappa), runs in groups.items():
            if group_epochs != epochs:
                continue
            name = HEAD_NAMES.get(head, head).format(kappa=kappa)
            for layer, label in LAYERS:
                cells = [cell([metric(s, layer, sec, key) for _, s in runs], signed) for _, (sec, key), signed in COLUMNS]
                lines.append(f"| {name} | {label} | " + " | ".join(cells) + " |")
            per_seed = ", ".join(
                f"seed {seed}: {metric(s, 'pre_projection', 'robustness', 'worst_group_acc'):.1f} / "
                f"{metric(s, 'post_projection', 'robustness', 'worst_group_acc'):.1f}"
                for seed, s in runs
            )
            notes.append(f"- {name}, worst-group h / z per seed: {per_seed}")
        lines += ["", *notes, ""]
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    print(table(load(sys.argv[1:])))
