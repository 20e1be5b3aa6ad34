"""Turn benchmark JSON into markdown tables and log-log PNG plots.

    python benches/report.py results.json [more.json ...] [--modes fwd+bwd] [--out report.md] [--plots DIR]

Inputs: pytest-benchmark JSON written by ``pytest benches/ --benchmark-only --benchmark-json results.json`` (the
cases' ``extra_info`` and the skipped cases in ``fastcl.skipped``), and/or the JSON of ``python benches/targets.py
--json``. Later files override earlier ones for the same case.

Tables: one per device / loss / mode / D / dtype, one row per N: the median time of each implementation, the
speedup of fastcl (the 'triton' backend on GPU, else 'chunked') over each other implementation, and each one's peak
memory (CUDA: max allocated beyond the inputs; CPU: peak RSS growth in a fresh process); on GPU also fastcl's model
TFLOP/s and fraction of the roofline. Skipped cases show why (e.g. the predicted N x N memory).

Plots (matplotlib, optional): per device / mode / D / dtype a PNG with time vs N and memory vs N for each loss,
log-log, one line per implementation. Without matplotlib the tables are still printed and the plots are skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict

LOSS_TITLES = {"supcon": "SupCon (labels)", "ntxent": "NT-Xent", "infonce": "InfoNCE (symmetric)"}
MODE_ORDER = ("fwd", "bwd", "fwd+bwd")
SHORT = {"pytorch-metric-learning": "PML", "reference": "reference", "inf-cl": "Inf-CL"}


def label_of(impl: str, backend: str) -> str:
    return f"fastcl[{backend}]" if impl == "fastcl" else impl


def short(label: str) -> str:
    return SHORT.get(label, label)


class Results:
    def __init__(self):
        self.rows = {}  # (device_name, loss, mode, d, dtype, n, label) -> dict
        self.targets = []  # dicts: target, description, value, threshold, higher_is_better, met, source
        self.sources = []  # (path, device_name, date, threads, versions, load)
        self.floor_gflops = {}  # device_name -> the sgemm floor case's GFLOP/s (CPU)

    # -- loading ----------------------------------------------------------------------------------------------
    def load(self, path: str):
        with open(path) as f:
            data = json.load(f)
        if data.get("kind") == "fastcl-targets":
            self._load_targets(path, data)
        elif "benchmarks" in data:
            self._load_pytest_benchmark(path, data)
        else:
            raise SystemExit(f"{path}: neither pytest-benchmark JSON nor benches/targets.py JSON")

    def _load_pytest_benchmark(self, path, data):
        meta = data.get("fastcl", {})
        device_name = meta.get("device_name") or data.get("machine_info", {}).get("cpu", {}).get("brand_raw", "?")
        self.sources.append(
            (
                path,
                device_name,
                data.get("datetime", "?"),
                meta.get("threads"),
                meta.get("versions", {}),
                (meta.get("load_average_at_start"), meta.get("load_average_at_end")),
            )
        )
        for bench in data["benchmarks"]:
            info = bench.get("extra_info", {})
            if info.get("kind") == "sgemm-floor" and info.get("gflops"):  # the CPU floor case (test_sgemm_floor)
                self.floor_gflops[info.get("device", device_name)] = info["gflops"]
                continue
            if "impl" not in info:
                continue
            stats = bench.get("stats", {})
            row = dict(info)
            row["median_s"] = stats.get("median")
            row["min_s"] = stats.get("min")
            row["rounds_run"] = stats.get("rounds")
            self._put(info.get("device", device_name), row)
            comparator = info.get("comparator_case")
            if comparator and info.get("comparator_median_s"):  # the other side of a speed target
                other = {
                    **comparator,
                    "median_s": info["comparator_median_s"],
                    "device_type": comparator["device"],
                    "comparator_of": bench["name"],
                }
                key = self._key(info.get("device", device_name), other)
                if key not in self.rows or "skipped" in self.rows[key]:
                    self.rows[key] = other
            if "target" in info:
                self.targets.append(
                    {
                        "target": info["target"],
                        "description": f"{info.get('target_metric')} ({bench['name']})",
                        "value": info.get("target_value"),
                        "threshold": info.get("target_threshold"),
                        "higher_is_better": info.get("target_higher_is_better", True),
                        "met": info.get("target_met"),
                        "source": os.path.basename(path),
                        "device": info.get("device", device_name),
                        "comparator_median_s": info.get("comparator_median_s"),
                        "median_s": stats.get("median"),
                    }
                )
        for skipped in meta.get("skipped", []):
            case = skipped["case"]
            row = {**case, "skipped": skipped["reason"], "predicted_bytes": skipped.get("predicted_bytes")}
            self._put(device_name, row, keep_measured=True)

    def _load_targets(self, path, data):
        self.sources.append(
            (
                path,
                data.get("device_name"),
                data.get("date"),
                data.get("threads"),
                data.get("versions", {}),
                (data.get("load_average_at_start"), data.get("load_average_at_end")),
            )
        )
        for target in data.get("targets", []):
            self.targets.append({**target, "source": os.path.basename(path), "device": data.get("device_name")})
        for m in data.get("measurements", []):
            case = m.get("case", {})
            if not case:
                continue
            row = dict(case)
            if "error" in m:
                row["skipped"] = m["error"]
            else:
                times = sorted(m.get("times", []))
                row["median_s"] = (
                    times[len(times) // 2]
                    if len(times) % 2
                    else sum(times[len(times) // 2 - 1 : len(times) // 2 + 1]) / 2
                )
                row["peak_mem_mb"] = m["peak_bytes"] / 2**20
                row.update(m.get("roofline") or {})
            self._put(data.get("device_name"), row, keep_measured=True)

    @staticmethod
    def _key(device_name, row):
        return (
            device_name,
            row["loss"],
            row["mode"],
            row["d"],
            row["dtype"],
            row["n"],
            label_of(row["impl"], row["backend"]),
        )

    def _put(self, device_name, row, keep_measured=False):
        key = self._key(device_name, row)
        if keep_measured and key in self.rows and "skipped" in row and "skipped" not in self.rows[key]:
            return  # a skip record never hides a measurement
        self.rows[key] = row

    # -- tables -----------------------------------------------------------------------------------------------
    def groups(self, modes=None):
        grouped = defaultdict(dict)
        for (device, loss, mode, d, dtype, n, label), row in self.rows.items():
            if modes and mode not in modes:
                continue
            grouped[(device, loss, mode, d, dtype)].setdefault(n, {})[label] = row
        loss_rank = {name: i for i, name in enumerate(LOSS_TITLES)}
        return sorted(
            grouped.items(),
            key=lambda kv: (
                kv[0][0],
                kv[0][4],
                kv[0][3],
                MODE_ORDER.index(kv[0][2]) if kv[0][2] in MODE_ORDER else 9,
                loss_rank.get(kv[0][1], 9),
            ),
        )


def fmt_time(seconds):
    if seconds is None:
        return "-"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.0f} us"


def fmt_mem(mib):
    if mib is None:
        return "-"
    if mib >= 1024:
        return f"{mib / 1024:.2f} GiB"
    return f"{mib:.1f} MiB"


def predicted_bytes(row):
    """The row's predicted peak bytes: recorded, or from benchlib's formula (older JSON did not record it)."""
    if row.get("predicted_bytes"):
        return row["predicted_bytes"]
    try:
        import benchlib

        return benchlib.predicted_bytes(benchlib.Case.from_dict(row))
    except Exception:
        return None


def fmt_bytes(count):
    return f"{count / 2**30:.0f} GiB" if count >= 2**30 else f"{count / 2**20:.0f} MiB"


def skip_cell(row):
    reason = row["skipped"]
    if "predicted" in reason and predicted_bytes(row):
        return f"skip: needs ~{fmt_bytes(predicted_bytes(row))}"
    if "time cap" in reason:
        predicted = predicted_bytes(row)
        big = predicted is not None and row.get("impl") in ("reference", "pytorch-metric-learning")
        return f"skip: time cap (~{fmt_bytes(predicted)})" if big else "skip: time cap"
    if "not importable" in reason:
        return "not installed"
    if "CUDA" in reason:
        return "GPU only"
    return "skip"


def primary_label(labels):
    for candidate in ("fastcl[triton]", "fastcl[chunked]"):
        if candidate in labels:
            return candidate
    return None


def impl_order(labels):
    order = ["fastcl[triton]", "fastcl[chunked]", "reference", "pytorch-metric-learning", "inf-cl"]
    return sorted(labels, key=lambda label: order.index(label) if label in order else 99)


def _measured(row):
    return row is not None and "skipped" not in row and row.get("median_s")


def cpu_ratio_cells(ours, dense, floor_gflops):
    """``[chunked / dense, chunked / floor]``: the floor is the row's model FLOPs (``PRODUCTS[mode]`` x 2 N^2 D) at
    the sgemm rate measured in the same process (the row's own ``sgemm_gflops``, else the file's floor case)."""
    if not _measured(ours):
        return ["-", "-"]
    cells = [f"{ours['median_s'] / dense['median_s']:.2f}" if _measured(dense) else "-"]
    gflops = ours.get("sgemm_gflops") or floor_gflops
    if gflops:
        products = {"fwd": 1, "bwd": 2, "fwd+bwd": 3}.get(ours.get("mode"), 3)
        floor_s = products * 2.0 * ours["n"] ** 2 * ours["d"] / (gflops * 1e9)
        cells.append(f"{ours['median_s'] / floor_s:.2f}")
    else:
        cells.append("-")
    return cells


def markdown(results: Results, modes=None) -> str:
    out = []
    for (device, loss, mode, d, dtype), by_n in results.groups(modes):
        labels = impl_order({label for rows in by_n.values() for label in rows})
        main = primary_label(labels)
        measured_any = any("skipped" not in row for rows in by_n.values() for row in rows.values())
        if not measured_any:
            continue
        others = [label for label in labels if label != main]
        gpu = any(
            row.get("device_type") == "cuda" or "tflops" in row for rows in by_n.values() for row in rows.values()
        )
        out.append(f"#### {LOSS_TITLES.get(loss, loss)}, {mode}, D={d}, {dtype} - {device}\n")
        if "fastcl[chunked]" in labels and mode in ("fwd", "bwd"):
            out.append(
                "fastcl[chunked] computes its gradients during the forward call (nothing N x N is kept for "
                "backward): its `fwd` includes them and its `bwd` is only a rescale. Compare `fwd+bwd`.\n"
            )
        head = ["N"] + [f"{short(label)} time" for label in labels]
        head += [f"speedup vs {short(label)}" for label in others] if main else []
        head += [f"{short(label)} peak mem" for label in labels]
        if gpu and main:
            head += [f"{short(main)} TFLOP/s", f"{short(main)} of roofline"]
        cpu_ratios = not gpu and main == "fastcl[chunked]"
        if cpu_ratios:  # CPU: time ratio to dense (< 1: faster) and to the sgemm floor (6 N^2 D at R)
            head += ["chunked / dense", "chunked / floor"]
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---|" * len(head))
        for n in sorted(by_n):
            rows = by_n[n]
            cells = [f"{n:,}"]
            for label in labels:
                row = rows.get(label)
                cells.append("-" if row is None else skip_cell(row) if "skipped" in row else fmt_time(row["median_s"]))
            if main:
                ours = rows.get(main)
                for label in others:
                    theirs = rows.get(label)
                    if (
                        ours
                        and theirs
                        and "skipped" not in ours
                        and "skipped" not in theirs
                        and ours.get("median_s")
                        and theirs.get("median_s")
                    ):
                        cells.append(f"{theirs['median_s'] / ours['median_s']:.2f}x")
                    else:
                        cells.append("-")
            for label in labels:
                row = rows.get(label)
                cells.append("-" if row is None or "skipped" in row else fmt_mem(row.get("peak_mem_mb")))
            if gpu and main:
                ours = rows.get(main) or {}
                tflops, fraction = ours.get("tflops"), ours.get("roofline_fraction")
                cells.append("-" if tflops is None else f"{tflops:.0f}")
                cells.append("-" if fraction is None else f"{fraction:.0%}")
            if cpu_ratios:
                cells += cpu_ratio_cells(rows.get(main), rows.get("reference"), results.floor_gflops.get(device))
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def targets_markdown(results: Results) -> str:
    if not results.targets:
        return ""
    out = ["| target | measured | goal | met | device | source |", "|---|---|---|---|---|---|"]
    for t in results.targets:
        value, threshold = t.get("value"), t.get("threshold")
        op = ">=" if t.get("higher_is_better", True) else "<="
        goal = (
            "runs"
            if threshold in (None, 0.0, 1.0) and "runs" in (t.get("description") or t["target"])
            else f"{op} {threshold:g}"
        )
        shown = "-" if value is None else (f"{value:.3g}" if isinstance(value, float) else str(value))
        met = {True: "yes", False: "NO", None: "?"}[t.get("met")]
        out.append(
            f"| {t['target']} ({t.get('description', '')}) | {shown} | {goal} | {met} | {t.get('device')} | "
            f"{t.get('source')} |"
        )
    return "\n".join(out) + "\n"


# -- plots ------------------------------------------------------------------------------------------------------


def plot(results: Results, plot_dir: str, modes=("fwd+bwd",), prefix="bench") -> list:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    figures = defaultdict(lambda: defaultdict(dict))  # (device, mode, d, dtype) -> loss -> n -> {label: row}
    for (device, loss, mode, d, dtype, n, label), row in results.rows.items():
        if mode in modes and "skipped" not in row:
            figures[(device, mode, d, dtype)][loss].setdefault(n, {})[label] = row
    written = []
    os.makedirs(plot_dir, exist_ok=True)
    styles = {
        "fastcl[triton]": ("C0", "o", "-"),
        "fastcl[chunked]": ("C1", "s", "-"),
        "reference": ("C3", "^", "--"),
        "pytorch-metric-learning": ("C2", "v", ":"),
        "inf-cl": ("C4", "D", "-."),
    }
    for (device, mode, d, dtype), by_loss in sorted(figures.items()):
        losses = [loss for loss in LOSS_TITLES if loss in by_loss]
        fig, axes = plt.subplots(2, len(losses), figsize=(4.6 * len(losses), 7.5), squeeze=False)
        for col, loss in enumerate(losses):
            by_n = by_loss[loss]
            labels = impl_order({label for rows in by_n.values() for label in rows})
            for label in labels:
                ns = sorted(n for n in by_n if label in by_n[n])
                color, marker, line = styles.get(label, ("k", "x", "-"))
                times = [by_n[n][label].get("median_s") for n in ns]
                mems = [by_n[n][label].get("peak_mem_mb") for n in ns]
                pts = [(n, t) for n, t in zip(ns, times) if t]
                if pts:
                    axes[0][col].plot(*zip(*pts), marker=marker, linestyle=line, color=color, label=short(label))
                pts = [(n, max(m, 0.01)) for n, m in zip(ns, mems) if m is not None]
                if pts:
                    axes[1][col].plot(*zip(*pts), marker=marker, linestyle=line, color=color, label=short(label))
            all_n = sorted(by_n)
            if all_n:  # scale: one [n, d] tensor of the inputs (O(n*d) memory grows like this line)
                elem = {"fp32": 4, "bf16": 2, "fp16": 2, "fp64": 8}.get(dtype, 4)
                axes[1][col].plot(
                    all_n,
                    [n * d * elem / 2**20 for n in all_n],
                    color="0.6",
                    linestyle=(0, (1, 2)),
                    label=f"one [N, {d}] {dtype} tensor",
                )
            axes[0][col].set_title(f"{LOSS_TITLES.get(loss, loss)}, {mode}")
            axes[0][col].set_ylabel("median time (s)")
            axes[1][col].set_ylabel("peak memory (MiB)")
            for row in (0, 1):
                ax = axes[row][col]
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel("N (side of the N x N similarity matrix)")
                ax.grid(True, which="both", alpha=0.3)
                ax.legend(fontsize=8)
        fig.suptitle(f"fastcl benchmarks: {device}, D={d}, {dtype}", fontsize=11)
        fig.tight_layout()
        safe = "".join(ch if ch.isalnum() else "-" for ch in f"{device}-{mode}-d{d}-{dtype}").strip("-")
        while "--" in safe:
            safe = safe.replace("--", "-")
        path = os.path.join(plot_dir, f"{prefix}-{safe}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+")
    parser.add_argument("--modes", default=None, help="comma list of modes for the tables (default: all)")
    parser.add_argument("--plot-modes", default="fwd+bwd", help="comma list of modes to plot (default: fwd+bwd)")
    parser.add_argument("--plots", default=None, help="folder for the PNGs (default: next to the first JSON)")
    parser.add_argument("--prefix", default=None, help="PNG file name prefix (default: the first JSON's stem)")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--out", help="also write the markdown here")
    args = parser.parse_args(argv)

    results = Results()
    for path in args.json:
        results.load(path)
    modes = args.modes.split(",") if args.modes else None
    parts = ["## fastcl benchmark report\n"]
    for path, device, date, threads, versions, load in results.sources:
        extra = f", threads={threads}" if threads else ""
        parts.append(
            f"- `{os.path.basename(path)}`: {device}, {date}, torch {versions.get('torch')}, triton "
            f"{versions.get('triton')}{extra}, load average {load[0]} -> {load[1]}"
        )
    parts.append("")
    targets = targets_markdown(results)
    if targets:
        parts += ["### Targets\n", targets]
    parts += [
        "### Results\n",
        "Time: median wall time of one call. Speedup: the other implementation's median over "
        "fastcl's. Peak memory: CUDA max allocated beyond the inputs; CPU peak RSS growth in a fresh process.\n",
        markdown(results, modes),
    ]
    text = "\n".join(parts)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    if not args.no_plots:
        plot_dir = args.plots or os.path.dirname(os.path.abspath(args.json[0]))
        prefix = args.prefix or os.path.splitext(os.path.basename(args.json[0]))[0]
        written = plot(results, plot_dir, tuple(args.plot_modes.split(",")), prefix)
        if written:
            print("plots: " + ", ".join(written))
        else:
            try:
                import matplotlib  # noqa: F401

                print("plots: nothing to plot")
            except ImportError:
                print("plots skipped: matplotlib is not installed (pip install matplotlib)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
