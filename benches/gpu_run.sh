#!/usr/bin/env bash
# Everything fastcl needs measured on a lent GPU, in one call of under 10 minutes, installing nothing from the
# network. Run from anywhere:
#
#   OUT=/some/dir bash benches/gpu_run.sh
#
# Stages, in this order (each time-boxed; the whole run keeps to FASTCL_GPU_BUDGET_S, default 560 s; logs and results
# in $OUT). The measurements open issues wait on come first, so a run cut short by the budget still answers them:
#   env       nvidia-smi, python / torch / triton versions                     -> env.txt
#   install   the peer wheels in $FASTCL_WHEELS (default .whl/ when present; benches/gpu_wheels.sh fetches them) into
#             a --target folder put on PYTHONPATH, then pip install --no-deps --no-build-isolation -e . (offline)
#   aot       python -m fastcl.aot --json (the covering sample, sm_80 + sm_90), in the background (CPU only)
#                                                                                            -> aot.json
#   correct   benches/gpu_correctness.py: triton vs float64 at N=16384, fp32 / bf16 / fp16   -> correctness.json
#   checks    benches/gpu_checks.py: first the bitwise probe of the logits product (64- vs 32-row tiles, x_ij vs
#             x_ji), then |logits| ~ 1e5 gradients, tf32x3 / tf32 accuracy, fp16 with a 2**16 / 2**20 loss
#             scale, the learnable scale, the device guard (two GPUs), deterministic mode       -> checks.json
#   sigmoid   benches/gpu_sigmoid.py: the sigmoid loss's Triton accuracy (bf16 / fp16 / fp32) and B = 65,536,
#             D = 768 bf16 fwd+bwd against siglip-kernel and open_clip's SigLipLoss             -> sigmoid.json
#   negatives FASTCL_BENCH_NM=4096x65536 FASTCL_BENCH_DTYPE=bf16 pytest benches/test_negatives.py: InfoNCE with a
#             queue (N = 4096, M = 65536, fwd+bwd), fastcl's extra-column pass against the dense formula on the
#             same card, time and max_memory_allocated                                    -> negatives.json
#   tests     python -m pytest tests -q (the tests detect CUDA; FASTCL_TRITON_AUTOTUNE=0: correctness only)
#   small_n   benches/gpu_small_n.py: N = 512 .. 65536, fp32 (tf32x3) and bf16, SupCon and symmetric InfoNCE,
#             fwd+bwd against the dense reference and Inf-CL (FASTCL_TRITON_AUTOTUNE=0)          -> small_n.json
#   targets   pytest benches/test_targets.py -m "not huge" (autotuned: ~14 configs x 3 kernels compiled per
#             kernel variant, which is most of this stage's time)                          -> targets.json
#   huge      pytest benches/test_targets.py -m huge (N = 2**20, FASTCL_TRITON_AUTOTUNE=0) -> huge.json
#   sweep     FASTCL_BENCH_QUICK=1 pytest benches/test_losses.py (FASTCL_TRITON_AUTOTUNE=0) -> sweep.json
#   clip      FASTCL_BENCH_QUICK=1 pytest benches/test_clip_scale.py: learnable-scale CLIP loss, fastcl (Triton,
#             chunked) against open_clip's ClipLoss (skipped where open_clip_torch is not installed)  -> clip.json
#   report    benches/report.py                                                  -> report.md, bench-*.png
# At the end everything is packed into $OUT/gpu_run.tar.gz; summary.txt and report.md stay beside it
# (FASTCL_GPU_KEEP_LOOSE=0 removes the loose files, for transports that take few files).
#
# Environment: OUT (default ./gpu_out), PYTHON (default python3), FASTCL_GPU_BUDGET_S, FASTCL_WHEELS (a folder of
# wheels installed offline first: the peers open_clip_torch, siglip-kernel, pytorch-metric-learning, inf-cl;
# default $ROOT/.whl when it holds any), FASTCL_GPU_RUN_DRY=1 (no GPU: exercise the plumbing on CPU at toy sizes;
# CI runs it).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/gpu_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
BUDGET="${FASTCL_GPU_BUDGET_S:-560}"
DRY="${FASTCL_GPU_RUN_DRY:-0}"
RESERVE=35 # kept for the report and the packing
START=$(date +%s)
SUMMARY="$OUT/summary.txt"
FAILED=0
export PYTHONUNBUFFERED=1
: >"$SUMMARY"

note() { echo "$*" | tee -a "$SUMMARY"; }
elapsed() { echo $(($(date +%s) - START)); }
left() { echo $((BUDGET - $(elapsed))); }

# stage NAME MAX_SECONDS CMD...: run CMD with a time limit of min(MAX, time left - RESERVE), log to $OUT/NAME.log.
# Exports STAGE_DEADLINE (Unix time) for the benchmark stages, which stop starting new cases after it.
stage() {
    local name=$1 max=$2
    shift 2
    local limit=$(($(left) - RESERVE))
    if ((limit > max)); then limit=$max; fi
    if ((limit < 15)); then
        note "SKIP  $name: out of time ($(elapsed) s used of $BUDGET)"
        FAILED=1
        return 0
    fi
    export FASTCL_BENCH_DEADLINE=$(($(date +%s) + limit - 25))
    local t0=$(date +%s) rc=0
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1 || rc=$?
    unset FASTCL_BENCH_DEADLINE
    local status="ok   "
    if ((rc == 124 || rc == 137)); then status="TIME "; elif ((rc != 0)); then status="FAIL "; fi
    if ((rc != 0)); then FAILED=1; fi
    note "$status $name: rc=$rc, $(($(date +%s) - t0)) s (limit $limit s); log $name.log; $(tail -n 1 "$OUT/$name.log" | cut -c1-160)"
}

note "fastcl gpu_run $(date -u '+%Y-%m-%d %H:%M UTC'), budget $BUDGET s, python $PY, dry=$DRY"

# ---- env ------------------------------------------------------------------------------------------------------
{
    nvidia-smi || echo "nvidia-smi: not available"
    "$PY" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", torch.cuda.get_device_name(), "SMs", p.multi_processor_count, "memory GiB", round(p.total_memory / 2**30, 1))
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton missing")
EOF
} >"$OUT/env.txt" 2>&1 || true
note "env: $(grep -E '^(device|python)' "$OUT/env.txt" | tr '\n' ' ')"
if [[ "$DRY" != 1 ]] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    note "FAIL  no CUDA device visible to $PY (FASTCL_GPU_RUN_DRY=1 exercises the script on CPU)"
    exit 2
fi

# ---- install (offline) ----------------------------------------------------------------------------------------
# The peer wheels go to a folder of their own on PYTHONPATH (set here, so every later stage sees them); fastcl itself
# is an editable install without its dependencies (the image's torch and triton stay).
WHEELS="${FASTCL_WHEELS:-}"
if [[ -z "$WHEELS" ]] && compgen -G "$ROOT/.whl/*.whl" >/dev/null; then WHEELS="$ROOT/.whl"; fi
if [[ -n "$WHEELS" ]] && compgen -G "$WHEELS/*.whl" >/dev/null; then
    PEER_SITE="$(mktemp -d "${TMPDIR:-/tmp}/fastcl-peers.XXXXXX")"
    export PYTHONPATH="$PEER_SITE${PYTHONPATH:+:$PYTHONPATH}"
    export WHEELS PEER_SITE
fi
install() {
    if [[ -n "${PEER_SITE:-}" ]]; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$PEER_SITE" "$WHEELS"/*.whl
    fi
    "$PY" -m pip install --no-deps --no-build-isolation -e .
    "$PY" -c "import fastcl, fastcl.kernels.launch; print('fastcl', fastcl.__version__, 'from', fastcl.__file__)"
    "$PY" -c "import pytest_benchmark" || { echo "pytest-benchmark is required (carry its wheel in FASTCL_WHEELS)"; exit 1; }
    for mod in matplotlib pytorch_metric_learning inf_cl siglip_kernel open_clip; do
        if "$PY" -c "import $mod" 2>/dev/null; then echo "have $mod"; else echo "missing $mod (optional)"; fi
    done
}
export -f install
export PY
stage install 60 bash -c 'set -euo pipefail; install'

# ---- AOT lowering in the background (CPU only) while the GPU stages run ---------------------------------------
AOT_ARGS=(--json "$OUT/aot.json")
if [[ "$DRY" == 1 ]]; then AOT_ARGS+=(--arch 90 --dtype bf16 --dim 128 --jobs 2); else AOT_ARGS+=(--jobs 8); fi
(timeout 150 "$PY" -m fastcl.aot "${AOT_ARGS[@]}" >"$OUT/aot.log" 2>&1; echo $? >"$OUT/aot.rc") &
AOT_PID=$!

# ---- correctness at large N -----------------------------------------------------------------------------------
if [[ "$DRY" == 1 ]]; then
    stage correct 120 env TRITON_INTERPRET=1 "$PY" benches/gpu_correctness.py --device cpu --n 48 --n-dense 40 \
        --d 32 --dtypes fp32 --json "$OUT/correctness.json"
else
    stage correct 60 env FASTCL_TRITON_AUTOTUNE=0 "$PY" benches/gpu_correctness.py --n 16384 \
        --json "$OUT/correctness.json"
fi

# ---- on-card checks of what the interpreter cannot show ---------------------------------------------------------
if [[ "$DRY" == 1 ]]; then
    stage checks 120 env TRITON_INTERPRET=1 "$PY" benches/gpu_checks.py --device cpu --n 40 --d 16 \
        --json "$OUT/checks.json"
else
    stage checks 90 env FASTCL_TRITON_AUTOTUNE=0 "$PY" benches/gpu_checks.py --n 4096 --json "$OUT/checks.json"
fi

# ---- the sigmoid (SigLIP) loss: on-card accuracy, then B = 65,536, D = 768, bf16 against open_clip / siglip-kernel --
if [[ "$DRY" == 1 ]]; then
    stage sigmoid 120 env TRITON_INTERPRET=1 "$PY" benches/gpu_sigmoid.py --device cpu --n 40 --d 24 --check-n 24 \
        --reps 1 --json "$OUT/sigmoid.json"
else
    stage sigmoid 120 "$PY" benches/gpu_sigmoid.py --n 65536 --d 768 --json "$OUT/sigmoid.json"
fi

# ---- InfoNCE with a queue of extra negatives, against the dense formula -------------------------------------------
BENCH=("$PY" -m pytest -q -rs -p no:cacheprovider --benchmark-only --benchmark-columns=min,median,max,rounds)
if [[ "$DRY" == 1 ]]; then
    stage negatives 60 env FASTCL_BENCH_NM=64x256 "${BENCH[@]}" benches/test_negatives.py \
        --benchmark-json "$OUT/negatives.json"
else
    stage negatives 60 env FASTCL_BENCH_NM=4096x65536 FASTCL_BENCH_DTYPE=bf16 \
        "${BENCH[@]}" benches/test_negatives.py --benchmark-json "$OUT/negatives.json"
fi

# ---- the test suite on the card, then everyday batch sizes --------------------------------------------------------
if [[ "$DRY" == 1 ]]; then
    stage tests 60 "$PY" -m pytest tests -q --collect-only
    stage small_n 120 env TRITON_INTERPRET=1 "$PY" benches/gpu_small_n.py --device cpu --n 32 48 --d 16 --reps 1 \
        --dtypes fp32 --json "$OUT/small_n.json"
else
    stage tests 120 env FASTCL_TRITON_AUTOTUNE=0 "$PY" -m pytest tests -q -p no:cacheprovider
    stage small_n 90 env FASTCL_TRITON_AUTOTUNE=0 "$PY" benches/gpu_small_n.py --reps 5 --json "$OUT/small_n.json"
fi

wait "$AOT_PID" || true
AOT_RC=$(cat "$OUT/aot.rc" 2>/dev/null || echo "?")
if [[ "$AOT_RC" != 0 ]]; then FAILED=1; fi
note "$([[ "$AOT_RC" == 0 ]] && echo 'ok   ' || echo 'FAIL ') aot: rc=$AOT_RC; log aot.log; $(tail -n 1 "$OUT/aot.log" 2>/dev/null)"

# ---- benchmarks -----------------------------------------------------------------------------------------------
if [[ "$DRY" == 1 ]]; then
    export FASTCL_BENCH_N=256 FASTCL_BENCH_MODES=fwd+bwd FASTCL_BENCH_QUICK=1
    stage targets 60 "${BENCH[@]}" benches/test_targets.py -k gpu --benchmark-json "$OUT/targets.json"
    stage sweep 120 "${BENCH[@]}" benches/test_losses.py --benchmark-json "$OUT/sweep.json"
    stage clip 60 "${BENCH[@]}" benches/test_clip_scale.py -k 256 --benchmark-json "$OUT/clip.json"
else
    stage targets 210 "${BENCH[@]}" benches/test_targets.py -m "targets and not huge" \
        --benchmark-json "$OUT/targets.json"
    stage huge 60 env FASTCL_TRITON_AUTOTUNE=0 "${BENCH[@]}" benches/test_targets.py -m huge \
        --benchmark-json "$OUT/huge.json"
    stage sweep 240 env FASTCL_TRITON_AUTOTUNE=0 FASTCL_BENCH_QUICK=1 FASTCL_BENCH_BUDGET_S=0.2 \
        "${BENCH[@]}" benches/test_losses.py --benchmark-json "$OUT/sweep.json"
    stage clip 60 env FASTCL_TRITON_AUTOTUNE=0 FASTCL_BENCH_QUICK=1 \
        "${BENCH[@]}" benches/test_clip_scale.py --benchmark-json "$OUT/clip.json"
fi

# ---- report ---------------------------------------------------------------------------------------------------
JSONS=()
for f in targets huge sweep; do
    if [[ -s "$OUT/$f.json" ]]; then JSONS+=("$OUT/$f.json"); fi
done
if ((${#JSONS[@]} > 0)); then
    RESERVE=5 stage report 30 "$PY" benches/report.py "${JSONS[@]}" --out "$OUT/report.md" --plots "$OUT" \
        --prefix bench
else
    note "FAIL  report: no benchmark JSON was written"
    FAILED=1
fi
if [[ -s "$OUT/correctness.json" ]]; then
    "$PY" - "$OUT/correctness.json" >>"$OUT/report.md" <<'EOF' || true
import json, sys
data = json.load(open(sys.argv[1]))
print(f"\n### GPU correctness ({data['device']}, N={data['n']}, D={data['d']}): {data['failed']} failed\n")
print("| check | loss rel err | grad rel err | tolerances | ok |")
print("|---|---|---|---|---|")
for r in data["results"]:
    print(f"| {r['check']} | {r['loss_rel_err']:.2e} | {r['grad_rel_err']:.2e} | {r['loss_tol']:.0e} / {r['grad_tol']:.0e} | {'yes' if r['ok'] else 'NO'} |")
EOF
fi

if [[ -s "$OUT/checks.json" ]]; then
    "$PY" - "$OUT/checks.json" >>"$OUT/report.md" <<'EOF' || true
import json, sys
data = json.load(open(sys.argv[1]))
print(f"\n### GPU checks ({data['device']}, N={data['n']}, D={data['d']}): {data['failed']} failed\n")
print("| check | error | tolerance | ok |")
print("|---|---|---|---|")
for r in data["results"]:
    err = f"{r['error']:.2e}" if isinstance(r.get("error"), float) else r.get("error", r.get("skipped", ""))
    tol = f"{r['tolerance']:.0e}" if "tolerance" in r else ""
    print(f"| {r['check']} | {err} | {tol} | {'yes' if r['ok'] else 'NO'} |")
EOF
fi
if [[ -s "$OUT/small_n.json" ]]; then
    "$PY" - "$OUT/small_n.json" >>"$OUT/report.md" <<'EOF' || true
import json, sys
data = json.load(open(sys.argv[1]))
print(f"\n### Everyday batch sizes ({data['device']}), fwd+bwd, medians\n")
print("| loss | dtype | N | triton ms | reference ms | reference / triton | Inf-CL ms |")
print("|---|---|---|---|---|---|---|")
for r in data["results"]:
    ref = f"{r['reference_s'] * 1e3:.3f}" if "reference_s" in r else "-"
    ratio = f"{r['reference_over_triton']:.2f}" if "reference_s" in r else "-"
    inf = f"{r['infcl_s'] * 1e3:.3f}" if "infcl_s" in r else "-"
    print(f"| {r['loss']} | {r['dtype']} | {r['n']} | {r['triton_s'] * 1e3:.3f} | {ref} | {ratio} | {inf} |")
EOF
fi

if [[ -s "$OUT/sigmoid.json" ]]; then
    "$PY" - "$OUT/sigmoid.json" >>"$OUT/report.md" <<'EOF' || true
import json, sys
data = json.load(open(sys.argv[1]))
print(f"\n### Sigmoid (SigLIP) loss ({data['device']}): {data['failed']} accuracy checks failed\n")
print("| implementation | N | D | dtype | fwd+bwd ms | peak MiB |")
print("|---|---|---|---|---|---|")
for r in data["timings"]:
    ms = f"{r['ms']:.2f}" if "ms" in r else r.get("error", "")
    peak = f"{r['peak_mib']:.0f}" if "peak_mib" in r else "-"
    print(f"| {r['name']} | {r['n']} | {r['d']} | {r['dtype']} | {ms} | {peak} |")
EOF
fi

note "done in $(elapsed) s; $([[ $FAILED == 0 ]] && echo 'all stages ok' || echo 'some stages failed or ran out of time')"
(cd "$OUT" && tar -czf gpu_run.tar.gz --exclude=gpu_run.tar.gz -- *) || true
if [[ "${FASTCL_GPU_KEEP_LOOSE:-1}" == 0 ]]; then
    find "$OUT" -mindepth 1 -maxdepth 1 ! -name gpu_run.tar.gz ! -name summary.txt ! -name report.md -exec rm -rf {} +
fi
exit $FAILED
