"""Measure the CPU and GPU performance targets without pytest-benchmark: one fresh process per case.

    python benches/targets.py                      # the targets of this device (CUDA if present, else CPU)
    python benches/targets.py --json out.json      # also write the measurements
    python benches/targets.py --quick              # only the N = 8192 CPU speed target
    python benches/targets.py --enforce            # exit 1 when a target is missed
    FASTCL_BENCH_THREADS=1 python benches/targets.py   # pin torch's intra-op threads (a shared CPU)

Each case runs in a new interpreter (``runner.py --case``), so its peak RSS (CPU, ``VmHWM`` reset after the inputs
exist) or peak allocated CUDA memory is its own, and one case's heap never inflates the next one's. Times are
medians of ``repeats`` calls after a small warm-up (CUDA: a full-size warm-up, which includes autotuning).
The benchmark suite measures the same targets under pytest-benchmark (``benches/test_targets.py``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchlib
from benchlib import Case

RUNNER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "runner.py")


def supcon(impl, backend, n, dtype="fp32", device="cpu", loss="supcon"):
    return Case(impl, backend, loss, "fwd+bwd", n, 128, dtype, device)


def run_in_subprocess(case: Case, repeats: int, timeout: float, env: dict | None = None) -> dict:
    start = time.time()
    try:
        proc = subprocess.run(
            [sys.executable, RUNNER, "--case", case.to_json(), "--repeats", str(repeats)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, **(env or {})},
        )
    except subprocess.TimeoutExpired:
        return {"case": json.loads(case.to_json()), "error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        tail = (proc.stderr or proc.stdout)[-800:]
        return {"case": json.loads(case.to_json()), "error": f"exit {proc.returncode}: {tail}"}
    result = json.loads(lines[-1])
    result["wall_s"] = round(time.time() - start, 1)
    if "times" in result:
        result["median_s"] = statistics.median(result["times"])
    return result


def cpu_targets(quick: bool):
    """``(name, description, threshold, higher_is_better, how)`` with ``how(measure) -> (value, details)``."""
    targets = []

    def speedup(measure):
        ours = measure(supcon("fastcl", "chunked", 8192), 5)
        theirs = measure(supcon("reference", "reference", 8192), 3)
        if "error" in ours or "error" in theirs:
            return None, [ours, theirs]
        return theirs["median_s"] / ours["median_s"], [ours, theirs]

    targets.append(
        (
            "cpu-supcon-speedup-vs-reference-n8192",
            "SupCon fwd+bwd N=8192 (4096 x 2 views), D=128, fp32: chunked speedup over the dense reference",
            3.0,
            True,
            speedup,
        )
    )
    if quick:
        return targets

    def rss(measure):
        result = measure(supcon("fastcl", "chunked", 32768), 1)
        value = None if "error" in result else result["peak_bytes"] / benchlib.MIB
        return value, [result]

    targets.append(
        ("cpu-supcon-rss-n32768", "SupCon fwd+bwd N=32768: chunked peak RSS growth (MiB)", 1024.0, False, rss)
    )

    def runs(measure):
        result = measure(supcon("fastcl", "chunked", 65536), 1)
        value = None if "error" in result else result["peak_bytes"] / benchlib.MIB
        return value, [result]

    dense = benchlib.predicted_bytes(supcon("reference", "reference", 65536))
    targets.append(
        (
            "cpu-supcon-runs-n65536",
            f"SupCon fwd+bwd N=65536: chunked runs (peak RSS growth MiB; dense reference predicted "
            f"{dense / 1e9:.0f} GB)",
            None,
            False,
            runs,
        )
    )
    return targets


def gpu_targets(quick: bool):
    targets = []

    def roofline(measure):
        result = measure(supcon("fastcl", "triton", 65536, "bf16", "cuda"), 10)
        value = (result.get("roofline") or {}).get("roofline_fraction")
        return value, [result]

    targets.append(
        (
            "gpu-supcon-roofline-n65536",
            "SupCon bf16 D=128 fwd+bwd N=65536: fraction of the roofline",
            0.5,
            True,
            roofline,
        )
    )

    def vs_infcl(measure):
        ours = measure(Case("fastcl", "triton", "infonce", "fwd+bwd", 65536, 128, "bf16", "cuda"), 10)
        theirs = measure(Case("inf-cl", "cal_flash_loss", "infonce", "fwd+bwd", 65536, 128, "bf16", "cuda"), 5)
        if "error" in ours or "error" in theirs:
            return None, [ours, theirs]
        return theirs["median_s"] / ours["median_s"], [ours, theirs]

    targets.append(
        (
            "gpu-infonce-speedup-vs-infcl-n65536",
            "InfoNCE bf16 D=128 fwd+bwd N=65536: speedup over Inf-CL",
            2.0,
            True,
            vs_infcl,
        )
    )

    def vs_reference(measure):
        ours = measure(supcon("fastcl", "triton", 16384, "bf16", "cuda"), 20)
        theirs = measure(supcon("reference", "reference", 16384, "bf16", "cuda"), 10)
        if "error" in ours or "error" in theirs:
            return None, [ours, theirs]
        return theirs["median_s"] / ours["median_s"], [ours, theirs]

    targets.append(
        (
            "gpu-supcon-speedup-vs-reference-n16384",
            "SupCon bf16 D=128 fwd+bwd N=16384: speedup over the reference",
            10.0,
            True,
            vs_reference,
        )
    )
    if quick:
        return targets

    def huge(measure):
        result = measure(supcon("fastcl", "triton", 1048576, "bf16", "cuda"), 1, {"FASTCL_TRITON_AUTOTUNE": "0"})
        return (None if "error" in result else result["median_s"]), [result]

    targets.append(
        (
            "gpu-supcon-runs-n1m",
            "SupCon bf16 D=128 fwd+bwd N=1,048,576 runs (s; fixed config, no autotune)",
            None,
            False,
            huge,
        )
    )
    return targets


def fmt(value, digits=3):
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default=benchlib.device_of_choice())
    parser.add_argument("--json", help="write the measurements here")
    parser.add_argument("--quick", action="store_true", help="only the fast targets")
    parser.add_argument("--enforce", action="store_true", help="exit 1 if a target is missed")
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds per subprocess")
    args = parser.parse_args(argv)

    threads = benchlib.apply_threads()
    targets = cpu_targets(args.quick) if args.device == "cpu" else gpu_targets(args.quick)
    measurements = []

    def measure(case: Case, repeats: int, env: dict | None = None) -> dict:
        reason, predicted = benchlib.skip_reason(case)
        if reason:
            result = {"case": json.loads(case.to_json()), "error": f"skipped: {reason}", "predicted_bytes": predicted}
        else:
            result = run_in_subprocess(case, repeats, args.timeout, env)
        measurements.append(result)
        status = result.get("error") or (
            f"median {result['median_s']:.3f} s, peak "
            f"{result['peak_bytes'] / benchlib.MIB:.1f} MiB ({result['peak_method']})"
        )
        print(f"  {case.id}: {status}", file=sys.stderr, flush=True)
        return result

    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = {
        "kind": "fastcl-targets",
        "date": date,
        "device": args.device,
        "device_name": benchlib.device_name(args.device),
        "threads": threads,
        "versions": benchlib.versions(),
        "load_average_at_start": benchlib.load_average(),
    }
    rows, missed = [], 0
    for name, description, threshold, higher, how in targets:
        print(f"{name} ...", file=sys.stderr, flush=True)
        value, details = how(measure)
        if threshold is None:
            met = value is not None
        else:
            met = value is not None and (value >= threshold if higher else value <= threshold)
        missed += not met
        rows.append(
            {
                "target": name,
                "description": description,
                "value": value,
                "threshold": threshold,
                "higher_is_better": higher,
                "met": met,
                "details": [
                    {
                        "case": d.get("case", {}),
                        "median_s": d.get("median_s"),
                        "times": d.get("times"),
                        "peak_mib": (d["peak_bytes"] / benchlib.MIB) if "peak_bytes" in d else None,
                        "error": d.get("error"),
                    }
                    for d in details
                ],
            }
        )
    header["load_average_at_end"] = benchlib.load_average()

    print(
        f"\nfastcl targets on {header['device_name']}, {date}, torch {header['versions']['torch']}, "
        f"threads={threads}, load {header['load_average_at_start']} -> {header['load_average_at_end']}\n"
    )
    print("| target | what | measured | target | met |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        op = ">=" if row["higher_is_better"] else "<="
        goal = "runs" if row["threshold"] is None else f"{op} {row['threshold']:g}"
        print(
            f"| {row['target']} | {row['description']} | {fmt(row['value'])} | {goal} | "
            f"{'yes' if row['met'] else 'NO'} |"
        )
    print("\n| case | median s | times s | peak MiB |")
    print("| --- | --- | --- | --- |")
    for row in rows:
        for d in row["details"]:
            case = Case.from_dict(d["case"]) if d["case"] else None
            label = case.id if case else "?"
            if d["error"]:
                print(f"| {label} | {d['error'][:120]} | | |")
            else:
                times = ", ".join(f"{t:.3f}" for t in d["times"])
                print(f"| {label} | {d['median_s']:.3f} | {times} | {d['peak_mib']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**header, "targets": rows, "measurements": measurements}, f, indent=1)
    return 1 if (args.enforce and missed) else 0


if __name__ == "__main__":
    sys.exit(main())
