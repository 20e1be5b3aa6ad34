"""Run benchmark cases in fresh processes, so that a case's peak memory is its own.

Two ways in:

* ``python benches/runner.py --case '{"impl": ..., ...}' [--repeats 3]`` runs one case in this (new) process and
  prints one JSON line: ``{"case": ..., "peak_bytes": ..., "peak_method": ..., "times": [...]}``. ``targets.py``
  uses it, one subprocess per case. On CUDA the peak is ``torch.cuda.max_memory_allocated`` beyond the inputs.
* ``python benches/runner.py --serve`` (CPU only) is a small fork server for the pytest suite: it imports torch and
  fastcl once, runs no op (so no thread pool exists yet), and for every JSON case read from stdin forks a child that
  measures the case from a clean heap and reports on one stdout line. A fork costs milliseconds where a new
  interpreter costs seconds, and no case sees the heap of an earlier one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchlib


def run_case(case: benchlib.Case, repeats: int) -> dict:
    if case.device == "cuda":
        import torch

        inputs = benchlib.make_inputs(case)
        prepare, target = benchlib.build(case, inputs)
        benchlib.time_call(prepare, target)  # warm-up: compilation, autotuning
        times, peak = [], None
        for _ in range(repeats):
            result = benchlib.measure_peak_cuda(case, inputs, prepare, target)
            times += result["times"]
            peak = result if peak is None or result["peak_bytes"] > peak["peak_bytes"] else peak
        torch.cuda.synchronize()
        import statistics

        roofline = benchlib.gpu_roofline(case, statistics.median(times))
        return {
            "peak_bytes": peak["peak_bytes"],
            "peak_method": peak["peak_method"],
            "times": times,
            "roofline": roofline,
            "device_name": benchlib.device_name("cuda"),
        }
    return benchlib.measure_peak_cpu(case, repeats=repeats)


def _child(case_json: str, write_fd: int):
    try:
        benchlib.apply_threads()
        case = benchlib.Case.from_dict(json.loads(case_json))
        result = {"case": json.loads(case_json), **run_case(case, repeats=1)}
    except BaseException as exc:  # report, never raise out of a forked child
        result = {
            "case": json.loads(case_json),
            "error": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc()[-2000:],
        }
    with os.fdopen(write_fd, "w") as out:
        out.write(json.dumps(result))
    os._exit(0)


def serve():
    import fastcl.ops.chunked.passes
    import fastcl.functional  # noqa: F401  (imported before forking: children share it)

    print(json.dumps({"ready": True, "pid": os.getpid()}), flush=True)
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_fd)
            _child(line, write_fd)
        os.close(write_fd)
        with os.fdopen(read_fd) as inp:
            payload = inp.read()
        _, status = os.waitpid(pid, 0)
        if not payload:
            payload = json.dumps(
                {"case": json.loads(line), "error": f"child died (wait status {status}; killed for memory?)"}
            )
        print(payload, flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", action="store_true")
    parser.add_argument("--case", help="JSON of a benchlib.Case")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args(argv)
    benchlib.apply_threads()
    if args.serve:
        serve()
        return 0
    case = benchlib.Case.from_dict(json.loads(args.case))
    try:
        result = {"case": json.loads(args.case), **run_case(case, args.repeats)}
    except Exception as exc:
        result = {"case": json.loads(args.case), "error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(result), flush=True)
        return 1
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
