"""PNG plots of a pretraining run (matplotlib, imported lazily; skipped with a one-line notice if absent).

* :func:`plot_loss`: training loss per step (and the epoch means) from ``metrics.jsonl`` records.
* :func:`plot_probe`: linear-probe accuracy of the pre-projection (h) and post-projection (z) features: per
  epoch when the run probed during training, plus the final probe and, when available, DFR worst-group
  accuracy.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

__all__ = ["matplotlib_available", "plot_loss", "plot_probe"]


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _notice(stream: TextIO | None) -> None:
    print("plots skipped: matplotlib is not installed (pip install matplotlib)", file=stream or sys.stderr)


def plot_loss(records: Sequence[Mapping[str, Any]], path: str, *, title: str = "",
              stream: TextIO | None = None) -> bool:
    """Loss per optimisation step (light) and per epoch (markers). Returns whether the file was written."""
    plt = _pyplot()
    if plt is None:
        _notice(stream)
        return False
    steps = [(r["step"], r["loss"]) for r in records if r.get("type") == "step"]
    epochs = [(r["step"], r["loss"]) for r in records if r.get("type") == "epoch"]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    if steps:
        ax.plot(*zip(*steps), lw=0.8, alpha=0.5, label="step")
    if epochs:
        ax.plot(*zip(*epochs), "o-", lw=1.5, label="epoch mean")
    ax.set_xlabel("optimisation step")
    ax.set_ylabel("contrastive loss")
    ax.set_title(title or "training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def plot_probe(records: Sequence[Mapping[str, Any]], summary: Mapping[str, Any], path: str, *, title: str = "",
               stream: TextIO | None = None) -> bool:
    """Probe accuracy, pre (h) vs post (z) projection. Returns whether the file was written."""
    plt = _pyplot()
    if plt is None:
        _notice(stream)
        return False
    probes = [r for r in records if r.get("type") == "probe"]
    lp = summary.get("linear_probe", {})
    rob = summary.get("robustness", {})
    ncols = 2 if probes else 1
    fig, axes = plt.subplots(1, ncols, figsize=(5 * ncols + 1, 4), dpi=120, squeeze=False)
    if probes:
        ax = axes[0][0]
        ep = [r["epoch"] for r in probes]
        ax.plot(ep, [r["pre_projection"] for r in probes], "o-", label="pre-projection h")
        ax.plot(ep, [r["post_projection"] for r in probes], "s-", label="post-projection z")
        ax.set_xlabel("epoch")
        ax.set_ylabel("linear probe accuracy (test)")
        ax.set_title("during training")
        ax.grid(alpha=0.3)
        ax.legend()
    ax = axes[0][-1]
    names, pre, post = [], [], []
    if lp:
        names.append("linear probe\naccuracy")
        pre.append(lp["pre_projection"]["accuracy"])
        post.append(lp["post_projection"]["accuracy"])
    if rob:
        for key, label in (("id_acc", "DFR\nI.D. acc"), ("worst_group_acc", "DFR\nworst group")):
            names.append(label)
            pre.append(rob["pre_projection"][key])
            post.append(rob["post_projection"][key])
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], pre, width=0.4, label="pre-projection h")
    ax.bar([x + 0.2 for x in xs], post, width=0.4, label="post-projection z")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(names)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title("final evaluation")
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
