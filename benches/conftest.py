"""pytest configuration of the benchmark suite (``pytest benches/ --benchmark-only``).

* Device: CUDA when available, else CPU. ``FASTCL_BENCH_QUICK=1`` selects the small subset that CI runs.
* Peak memory: on CPU each case is re-run once in a child forked from a clean fork server (``runner.py --serve``),
  so the RSS high-water mark is the case's own; on CUDA ``torch.cuda.max_memory_allocated`` after a reset.
* Skips: cases that cannot run here (missing peer, wrong device), or whose predicted memory exceeds half of what is
  available, call ``pytest.skip`` with the reason; each is also written into the JSON (``fastcl.skipped``) so that
  ``report.py`` can show it.
* ``FASTCL_BENCH_DEADLINE`` (Unix time): benchmarks that would start after it are skipped, so a time-boxed run
  still ends normally and writes its JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchlib
import harness
from harness import DEVICE, QUICK

_START_LOAD = benchlib.load_average()
THREADS = benchlib.apply_threads()


def pytest_configure(config):
    config.addinivalue_line("markers", "targets: the CPU and GPU performance targets (benches/test_targets.py)")
    config.addinivalue_line("markers", "huge: N = 2**20 on GPU (run with FASTCL_TRITON_AUTOTUNE=0)")
    config.addinivalue_line("markers", "sweep: the implementation x size sweep (benches/test_losses.py)")


def pytest_report_header(config):
    return [
        f"fastcl benches: device={DEVICE} ({benchlib.device_name(DEVICE)}), quick={QUICK}, "
        f"threads={THREADS}, versions={benchlib.versions()}, load={_START_LOAD}"
    ]


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["fastcl"] = {
        "device": DEVICE,
        "device_name": benchlib.device_name(DEVICE),
        "versions": benchlib.versions(),
        "load_average_at_start": _START_LOAD,
        "quick": QUICK,
        "threads": THREADS,
    }


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["fastcl"] = {
        "device": DEVICE,
        "device_name": benchlib.device_name(DEVICE),
        "versions": benchlib.versions(),
        "quick": QUICK,
        "threads": THREADS,
        "load_average_at_start": _START_LOAD,
        "load_average_at_end": benchlib.load_average(),
        "skipped": harness.SKIPPED,
    }


class MemServer:
    """Client of ``runner.py --serve``: one JSON case in, one JSON result out, each case in a fresh fork."""

    def __init__(self):
        self.proc = None
        self.lock = threading.Lock()

    def _start(self):
        runner = os.path.join(os.path.dirname(os.path.abspath(__file__)), "runner.py")
        self.proc = subprocess.Popen(
            [sys.executable, runner, "--serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )
        hello = self.proc.stdout.readline()
        if not hello:
            raise RuntimeError("memory server did not start")

    def measure(self, case: benchlib.Case) -> dict:
        with self.lock:
            if self.proc is None or self.proc.poll() is not None:
                self._start()
            self.proc.stdin.write(case.to_json() + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
            if not line:
                self.proc = None
                return {"error": "memory server died"}
            return json.loads(line)

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None


@pytest.fixture(scope="session")
def memserver():
    server = MemServer()
    yield server
    server.close()


@pytest.fixture(scope="session")
def device():
    return DEVICE


@pytest.fixture(scope="session")
def quick():
    return QUICK
