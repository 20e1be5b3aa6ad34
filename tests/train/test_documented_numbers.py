"""The numbers the docs quote are the numbers the code gives: the run that docs/projection-head-study.md marks as
checked by the tests is rerun from the command written there and compared with the row written there.

When a change to the code moves a number by more than the stated tolerance, this test fails until the doc (and its
study table) is regenerated. The command and the row are parsed from the doc itself, so there is one copy of each.
"""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import fastcl

REPO = Path(fastcl.__file__).resolve().parent.parent
DOC = REPO / "docs" / "projection-head-study.md"
SECTION = "## Checked by the tests"
MODULE_PREFIX = ["python", "-m", "fastcl.train.pretrain"]
LAYERS = {"h (pre)": "pre_projection", "z (post)": "post_projection"}
COLUMNS = {
    "linear probe acc": ("linear_probe", "accuracy"),
    "DFR I.D. acc": ("robustness", "id_acc"),
    "DFR worst-group": ("robustness", "worst_group_acc"),
    "DFR BG gap": ("robustness", "bg_gap"),
    "DFR CoObj gap": ("robustness", "coobj_gap"),
    "DFR BG+CoObj gap": ("robustness", "both_gap"),
}


def documented_run(text: str):
    """``(arguments, tolerance in pp, {layer label: {column: value}})`` from the doc's checked section."""
    if SECTION not in text:
        raise AssertionError(f"{DOC} has no {SECTION!r} section")
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"^    (python -m fastcl\.train\.pretrain .*)$", section, flags=re.M) or re.findall(
        r"`(python -m fastcl\.train\.pretrain [^`]*)`", section
    )
    assert len(commands) == 1, f"the checked section must hold one pretrain command, found {commands}"
    arguments = shlex.split(commands[0])
    assert arguments[:3] == MODULE_PREFIX and "--out" not in arguments, arguments
    tolerance = re.search(r"within\s+([0-9.]+)\s+percentage\s+points?", section)
    assert tolerance, "the checked section must state its tolerance ('within X percentage points')"
    rows = {}
    header = None
    for line in section.splitlines():
        if not line.startswith("|") or set(line) <= set("|- "):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = cells
            continue
        rows[cells[0]] = {name: float(value.replace("−", "-")) for name, value in zip(header[1:], cells[1:])}
    assert header is not None and set(header[1:]) == set(COLUMNS), header
    assert set(rows) == set(LAYERS), rows
    return arguments[3:], float(tolerance.group(1)), rows


def off_by_more(rows: dict, summary: dict, tolerance: float) -> dict:
    """``{(layer label, column): (documented, measured)}`` for every cell where a run's ``summary.json`` and the
    documented row differ by more than ``tolerance`` percentage points."""
    off = {}
    for label, layer in LAYERS.items():
        for column, (section, key) in COLUMNS.items():
            measured = 100.0 * float(summary[section][layer][key])  # NaN is written as "nan"
            if not abs(measured - rows[label][column]) <= tolerance:  # (NaN is off too)
                off[(label, column)] = (rows[label][column], round(measured, 2))
    return off


def test_the_documented_section_parses():
    arguments, tolerance, rows = documented_run(DOC.read_text())
    assert "--seed" in arguments and 0 < tolerance <= 2
    assert all(0 <= rows[layer]["DFR worst-group"] <= 100 for layer in LAYERS)


def test_parsing_refuses_a_doc_without_the_row():
    with pytest.raises(AssertionError, match="section"):
        documented_run("# a doc\n\nno checked run here\n")


def test_a_number_moved_past_the_tolerance_is_reported():
    _, tolerance, rows = documented_run(DOC.read_text())
    summary = {section: {layer: {} for layer in LAYERS.values()} for section in ("linear_probe", "robustness")}
    for label, layer in LAYERS.items():
        for column, (section, key) in COLUMNS.items():
            summary[section][layer][key] = rows[label][column] / 100.0
    assert off_by_more(rows, summary, tolerance) == {}
    summary["robustness"]["post_projection"]["worst_group_acc"] += (tolerance + 0.5) / 100.0
    summary["linear_probe"]["pre_projection"]["accuracy"] -= (tolerance - 0.5) / 100.0  # within: not reported
    assert list(off_by_more(rows, summary, tolerance)) == [("z (post)", "DFR worst-group")]
    summary["robustness"]["pre_projection"]["bg_gap"] = float("nan")
    assert ("h (pre)", "DFR BG gap") in off_by_more(rows, summary, tolerance)


@pytest.mark.slow
def test_the_documented_run_gives_the_documented_numbers(tmp_path):
    arguments, tolerance, rows = documented_run(DOC.read_text())
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    out = tmp_path / "run"
    command = [sys.executable, "-m", "fastcl.train.pretrain", *arguments, "--out", str(out), "--quiet", "--no-plots"]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    off = off_by_more(rows, json.loads((out / "summary.json").read_text()), tolerance)
    assert not off, f"documented vs measured, off by more than {tolerance} pp (regenerate the doc): {off}"


def test_the_study_table_script_averages_the_runs_it_is_given(tmp_path):
    """``docs/projection_head_table.py``, the command the study table names, on two made-up runs of one head."""
    runs = []
    for seed, worst_group in ((0, 0.60), (1, 0.50)):
        run = tmp_path / f"mlp-s{seed}"
        run.mkdir()
        (run / "config.json").write_text(json.dumps({"epochs": 15, "head": "mlp", "kappa": 1.05, "seed": seed}))
        layer = {"id_acc": 0.8, "worst_group_acc": worst_group, "bg_gap": -0.0001, "coobj_gap": -0.1, "both_gap": -0.2}
        summary = {
            "linear_probe": {name: {"accuracy": 0.6} for name in LAYERS.values()},
            "robustness": {name: dict(layer) for name in LAYERS.values()},
        }
        (run / "summary.json").write_text(json.dumps(summary))
        runs.append(str(run))
    script = REPO / "docs" / "projection_head_table.py"
    proc = subprocess.run([sys.executable, str(script), *runs], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| mlp | h (pre)"))
    # worst-group mean 55.0 and sample sd 7.1; a mean that rounds to zero prints without a sign of -0.0
    assert row == "| mlp | h (pre) | 60.0 ± 0.0 | 80.0 ± 0.0 | 55.0 ± 7.1 | +0.0 ± 0.0 | −10.0 ± 0.0 | −20.0 ± 0.0 |"
    assert "seed 0: 60.0 / 60.0, seed 1: 50.0 / 50.0" in proc.stdout
