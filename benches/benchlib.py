"""Shared pieces of the fastcl benchmarks: workloads, implementations, memory prediction and measurement, FLOPs.

Used by the pytest-benchmark suite (``test_*.py``), the standalone ``targets.py``, the fresh-process ``runner.py``
and ``gpu_correctness.py``. Nothing here needs pytest.

Sizes. ``n`` is the side of the ``n x n`` similarity matrix every loss forms, so the same ``n`` means the same
pairwise work for all three losses:

* SupCon: ``features [n/2, 2, d]`` (two views) with integer labels from ``NUM_CLASSES`` classes -> ``n`` anchors
  against ``n`` contrast rows.
* NT-Xent: ``z_a, z_b [n/2, d]`` -> the same ``n x n`` problem without labels.
* InfoNCE (symmetric, CLIP-style): ``query, key [n, d]`` -> one ``n x n`` logit matrix, both directions
  (``2n`` embeddings in all).

Modes. ``fwd``: the loss call with inputs that require grad (a training forward: it builds whatever the backward
needs; the chunked backend computes its gradients eagerly in this call). ``bwd``: ``torch.autograd.grad`` of a
loss whose forward ran untimed. ``fwd+bwd``: both.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import statistics
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

LOSSES = ("supcon", "ntxent", "infonce")
MODES = ("fwd", "bwd", "fwd+bwd")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
NUM_CLASSES = 100  # SupCon labels: a CIFAR-100-like label set
TEMPERATURE = {"supcon": 0.1, "ntxent": 0.5, "infonce": 0.07, "clip": 0.07}
# "clip": CLIP's symmetric InfoNCE with a learnable logit scale (open_clip's ClipLoss call, normalised features,
# gradients for both towers and the log-scale parameter); benchmarked by benches/test_clip_scale.py, not the sweep
CLIP_LOSS = "clip"
MIB = 2**20
SMALL_N = (64, 128, 256, 512)  # the quick suite's small sizes: per-call costs, where dense is hardest to beat

IMPL_FASTCL = "fastcl"
IMPL_REFERENCE = "reference"
IMPL_PML = "pytorch-metric-learning"
IMPL_INFCL = "inf-cl"
IMPL_OPEN_CLIP = "open_clip"
IMPLS = (IMPL_FASTCL, IMPL_REFERENCE, IMPL_PML, IMPL_INFCL, IMPL_OPEN_CLIP)

# Largest N each implementation is run at on each device, beyond the memory rule: a time cap that keeps the default
# sweep tractable (the dense forms would take minutes per call on 2 CPU cores). ``None``: no cap.
TIME_CAP_N = {
    ("cpu", IMPL_REFERENCE): 16384,
    ("cpu", IMPL_PML): 16384,
    ("cuda", "chunked"): 65536,
    ("cuda", IMPL_INFCL): 262144,
}


# ------------------------------------------------------------------------------------------------------------
# Cases
# ------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    impl: str  # IMPLS
    backend: str  # fastcl backend ('chunked' | 'triton'), 'reference', or the peer's entry point
    loss: str  # LOSSES
    mode: str  # MODES
    n: int
    d: int
    dtype: str  # DTYPES key
    device: str  # 'cpu' | 'cuda'

    @property
    def label(self) -> str:
        return f"{self.impl}[{self.backend}]" if self.impl == IMPL_FASTCL else self.impl

    @property
    def id(self) -> str:
        return f"{self.loss}-{self.mode}-{self.label}-n{self.n}-d{self.d}-{self.dtype}"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict) -> "Case":
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls)})

    def replace(self, **changes) -> "Case":
        return dataclasses.replace(self, **changes)


PEER_BACKEND = {
    (IMPL_PML, "supcon"): "SupConLoss",
    (IMPL_PML, "ntxent"): "NTXentLoss",
    (IMPL_PML, "infonce"): "NTXentLoss(ref_emb)",
    (IMPL_INFCL, "infonce"): "cal_flash_loss",
}


def implementations(loss: str, device: str) -> List[Tuple[str, str]]:
    """``(impl, backend)`` pairs that exist for ``loss`` (availability on the device is checked by ``unavailable``)."""
    pairs = [(IMPL_FASTCL, "triton"), (IMPL_FASTCL, "chunked"), (IMPL_REFERENCE, "reference")]
    pairs += [(impl, backend) for (impl, name), backend in PEER_BACKEND.items() if name == loss]
    return pairs


def device_of_choice() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _env_list(name: str, default, convert=str):
    raw = os.environ.get(name)
    if not raw:
        return list(default)
    return [convert(x.strip()) for x in raw.split(",") if x.strip()]


def sweep(device: str, quick: bool) -> List[Tuple[str, str, int, int, str]]:
    """``(loss, mode, n, d, dtype)`` points of the sweep; ``FASTCL_BENCH_{LOSSES,MODES,N,D,DTYPES}`` filter or replace.

    CPU: every mode at small and medium N for D = 128 and 256; only fwd+bwd at D = 128 for large N (one call of the
    chunked backend at N = 65536 takes tens of seconds on 2 cores). GPU: up to N = 2**20 in bf16 and fp32.
    """
    if device == "cpu":
        if quick:
            grid = [(m, n, 128, "fp32") for n in (1024, 2048) for m in MODES]
            grid += [("fwd+bwd", n, 128, "fp32") for n in SMALL_N]  # the fixed per-call costs at small N
        else:
            grid = [(m, n, d, "fp32") for d in (128, 256) for n in (1024, 4096, 8192) for m in MODES]
            grid += [("fwd+bwd", n, 128, "fp32") for n in (256, 16384, 32768, 65536)]
    else:
        if quick:
            grid = [(m, n, 128, dt) for dt in ("bf16", "fp32") for n in (4096, 16384, 65536) for m in MODES]
        else:
            grid = [
                (m, n, d, dt)
                for dt in ("bf16", "fp32")
                for d in (128, 256)
                for n in (4096, 16384, 65536)
                for m in MODES
            ]
            grid += [("fwd+bwd", n, 128, "bf16") for n in (1024, 262144, 1048576)]
    losses = _env_list("FASTCL_BENCH_LOSSES", LOSSES)
    modes = _env_list("FASTCL_BENCH_MODES", MODES)
    ns = _env_list("FASTCL_BENCH_N", [], int)
    ds = _env_list("FASTCL_BENCH_D", [], int)
    dtypes = _env_list("FASTCL_BENCH_DTYPES", [], str)
    if ns or ds or dtypes:  # an explicit grid: every combination of what was given (defaults fill the rest)
        grid = [
            (m, n, d, dt)
            for dt in (dtypes or ["fp32" if device == "cpu" else "bf16"])
            for d in (ds or [128])
            for n in (ns or [1024])
            for m in MODES
        ]
    points = [(loss, m, n, d, dt) for loss in losses for (m, n, d, dt) in grid if m in modes]
    # Small problems first (all losses and modes at one size before the next size): a time-boxed run
    # (FASTCL_BENCH_DEADLINE) then loses the largest sizes, not a whole loss.
    return sorted(
        set(points), key=lambda p: (p[4], p[3], p[2], LOSSES.index(p[0]) if p[0] in LOSSES else 9, MODES.index(p[1]))
    )


# ------------------------------------------------------------------------------------------------------------
# Availability
# ------------------------------------------------------------------------------------------------------------

_peer_cache: Dict[str, Optional[str]] = {}


def peer_import_error(impl: str) -> Optional[str]:
    """None when the peer imports, else a one-line reason."""
    if impl not in _peer_cache:
        try:
            if impl == IMPL_PML:
                import pytorch_metric_learning.losses  # noqa: F401
            elif impl == IMPL_INFCL:
                import inf_cl  # noqa: F401
            elif impl == IMPL_OPEN_CLIP:
                open_clip_loss_module()
            _peer_cache[impl] = None
        except Exception as exc:  # ImportError, or a missing dependency of the peer
            pip_name = {IMPL_PML: "pytorch-metric-learning", IMPL_INFCL: "inf-cl", IMPL_OPEN_CLIP: "open_clip_torch"}[impl]
            _peer_cache[impl] = f"{impl} not importable ({type(exc).__name__}: {exc}); pip install {pip_name}"
    return _peer_cache[impl]


def open_clip_loss_module():
    """open_clip's ``loss.py`` loaded by file path: it needs only torch (``import open_clip`` also wants
    torchvision, which ``pip install --no-deps open_clip_torch`` does not bring)."""
    import importlib.util

    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        raise ImportError("open_clip is not installed")
    path = os.path.join(spec.submodule_search_locations[0], "loss.py")
    module_spec = importlib.util.spec_from_file_location("open_clip_loss", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def unavailable(case: Case) -> Optional[str]:
    """Why ``case`` cannot run on this machine (None if it can), independent of its size."""
    if case.device == "cuda" and not torch.cuda.is_available():
        return "needs a CUDA device"
    if case.impl == IMPL_FASTCL and case.backend == "triton":
        if case.device != "cuda":
            return "fastcl backend='triton' needs a CUDA device (the CPU interpreter is for debugging, not timing)"
        from fastcl.ops.dispatch import triton_available

        if not triton_available():
            return "triton not installed"
    if case.impl == IMPL_INFCL and case.device != "cuda":
        return "inf-cl (cal_flash_loss) runs on CUDA only"
    if case.device == "cpu" and case.dtype in ("bf16", "fp16"):
        return "half precision is benchmarked on GPU only"
    if case.impl in (IMPL_PML, IMPL_INFCL, IMPL_OPEN_CLIP):
        return peer_import_error(case.impl)
    return None


AUTOTUNE_MAX_N = 262144  # above this, autotuning every Triton config takes minutes (each run is ~1 s at N = 2**20)


def time_capped(case: Case) -> Optional[str]:
    cap = TIME_CAP_N.get((case.device, case.backend)) or TIME_CAP_N.get((case.device, case.impl))
    if cap is not None and case.n > cap:
        return f"time cap: {case.label} is run up to N={cap} on {case.device} (see benchlib.TIME_CAP_N)"
    if (
        case.backend == "triton"
        and case.n > AUTOTUNE_MAX_N
        and os.environ.get("FASTCL_TRITON_AUTOTUNE", "1") != "0"
        and os.environ.get("FASTCL_BENCH_ALLOW_HUGE_AUTOTUNE") != "1"
    ):
        return (
            f"time cap: autotuning at N={case.n} takes minutes; run with FASTCL_TRITON_AUTOTUNE=0 (fixed config) "
            "or FASTCL_BENCH_ALLOW_HUGE_AUTOTUNE=1"
        )
    return None


# ------------------------------------------------------------------------------------------------------------
# Memory prediction
# ------------------------------------------------------------------------------------------------------------

# Peak extra bytes of the dense forms in units of (N x N elements of the input dtype), measured as peak RSS growth on
# CPU (fp32, fresh process per case, benches/runner.py) at N = 1024 and 2048, max over modes, plus ~15% margin
# (measured: reference SupCon / NT-Xent 10.3, InfoNCE 8.6; PML SupConLoss 13.8; PML NTXentLoss 17 * N**3 bytes).
# The reference (SupContrast / CLIP formulation) keeps logits, the shifted logits, exp, the masks and log_prob alive
# for backward, plus the gradient temporaries. PML's SupConLoss is similar. PML's NTXentLoss enumerates positive and
# negative pairs and builds an [n_pos_pairs, n_neg_pairs] matrix: it grows as N**3 (``PML_PAIR_FACTOR`` per N**3).
DENSE_FACTOR = {
    (IMPL_REFERENCE, "supcon"): 12,
    (IMPL_REFERENCE, "ntxent"): 12,
    (IMPL_REFERENCE, "infonce"): 10,
    (IMPL_OPEN_CLIP, CLIP_LOSS): 10,  # logits, their transpose's softmax and gradients: as the CLIP reference
    (IMPL_PML, "supcon"): 16,
}
PML_PAIR_FACTOR = {"ntxent": 18, "infonce": 36}  # bytes per N**3 (fp32); infonce runs both directions


def predicted_bytes(case: Case) -> int:
    """Rough upper estimate of the peak extra memory of one call (inputs excluded)."""
    n, d = case.n, case.d
    elem = torch.empty((), dtype=DTYPES[case.dtype]).element_size()
    if case.impl in (IMPL_REFERENCE, IMPL_PML, IMPL_OPEN_CLIP) and (case.impl, case.loss) in DENSE_FACTOR:
        return int(DENSE_FACTOR[(case.impl, case.loss)] * n * n * elem + 16 * n * d * 4)
    if case.impl == IMPL_PML:
        return int(PML_PAIR_FACTOR[case.loss] * n**3 * elem / 4)
    if case.impl == IMPL_INFCL:
        return int(16 * n * d * 4 + 64 * n)
    if case.backend == "chunked":
        from fastcl.ops.chunked import passes as chunked

        block_bytes = chunked.block_bytes(case.device)
        return int(10 * n * d * 4 + 4 * block_bytes + 64 * n)
    return int(6 * n * d * elem + 64 * n)  # triton: gradients, fp32 row statistics


def available_bytes(device: str) -> int:
    """Memory a case may use: MemAvailable on CPU, free device memory on CUDA."""
    if device == "cuda":
        free, _total = torch.cuda.mem_get_info()
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


MEMORY_FRACTION = 0.5


def memory_skip(case: Case) -> Optional[str]:
    """A skip reason when the predicted peak exceeds ``MEMORY_FRACTION`` of the available memory, else None."""
    need, have = predicted_bytes(case), available_bytes(case.device)
    if need > MEMORY_FRACTION * have:
        return (
            f"predicted {need / 2**30:.1f} GiB > {MEMORY_FRACTION:.0%} of {have / 2**30:.1f} GiB available on "
            f"{case.device} ({case.label}, N={case.n}, D={case.d}, {case.dtype})"
        )
    return None


def skip_reason(case: Case) -> Tuple[Optional[str], Optional[int]]:
    """``(reason, predicted_bytes)``: why the case is skipped, or ``(None, predicted)``."""
    reason = unavailable(case)
    if reason:
        return reason, None
    return memory_skip(case) or time_capped(case), predicted_bytes(case)


# ------------------------------------------------------------------------------------------------------------
# Workloads
# ------------------------------------------------------------------------------------------------------------


def make_inputs(case: Case, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Leaf tensors (requires_grad) and labels for the case, normalised rows, on the case's device and dtype."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    dtype, device = DTYPES[case.dtype], torch.device(case.device)

    def emb(*shape):
        x = torch.randn(*shape, generator=gen)
        return F.normalize(x, dim=-1).to(device=device, dtype=dtype).requires_grad_()

    if case.loss == "supcon":
        bsz = case.n // 2
        labels = torch.randint(0, NUM_CLASSES, (bsz,), generator=gen).to(device)
        return {"features": emb(bsz, 2, case.d), "labels": labels}
    if case.loss == "ntxent":
        return {"z_a": emb(case.n // 2, case.d), "z_b": emb(case.n // 2, case.d)}
    if case.loss == "infonce":
        return {"query": emb(case.n, case.d), "key": emb(case.n, case.d)}
    if case.loss == CLIP_LOSS:  # the log of the logit scale, a leaf as CLIP's parameter
        log_scale = torch.tensor(math.log(1 / TEMPERATURE[CLIP_LOSS]), device=device).requires_grad_()
        return {"image": emb(case.n, case.d), "text": emb(case.n, case.d), "log_scale": log_scale}
    raise ValueError(case.loss)


def loss_callable(case: Case) -> Callable[[Dict[str, torch.Tensor]], torch.Tensor]:
    """``fn(inputs) -> scalar loss`` for the case's implementation (same inputs, same pairwise work)."""
    t = TEMPERATURE[case.loss]
    if case.loss == CLIP_LOSS:
        return _clip_callable(case)
    if case.impl in (IMPL_FASTCL, IMPL_REFERENCE):
        import fastcl.functional as FF

        backend = case.backend
        if case.loss == "supcon":
            return lambda x: FF.supcon_loss(
                x["features"], x["labels"], temperature=t, base_temperature=t, backend=backend
            )
        if case.loss == "ntxent":
            return lambda x: FF.nt_xent_loss(x["z_a"], x["z_b"], temperature=t, backend=backend)
        return lambda x: FF.info_nce_loss(x["query"], x["key"], temperature=t, symmetric=True, backend=backend)

    if case.impl == IMPL_PML:
        from pytorch_metric_learning import losses as pml

        if case.loss == "supcon":
            fn = pml.SupConLoss(temperature=t)

            def supcon(x):
                f = x["features"]
                emb = f.transpose(0, 1).reshape(-1, f.shape[-1])  # view-major, as fastcl / SupContrast
                return fn(emb, x["labels"].repeat(f.shape[1]))

            return supcon
        fn = pml.NTXentLoss(temperature=t)
        if case.loss == "ntxent":

            def ntxent(x):
                b = x["z_a"].shape[0]
                ids = torch.arange(b, device=x["z_a"].device)
                return fn(torch.cat([x["z_a"], x["z_b"]]), torch.cat([ids, ids]))

            return ntxent

        def infonce(x):  # query i's positive is key i; both directions, averaged (CLIP)
            q, k = x["query"], x["key"]
            ids = torch.arange(q.shape[0], device=q.device)
            ref_ids = ids.clone()  # a distinct tensor: PML drops the diagonal when labels is ref_labels
            return 0.5 * (fn(q, ids, ref_emb=k, ref_labels=ref_ids) + fn(k, ids, ref_emb=q, ref_labels=ref_ids))

        return infonce

    if case.impl == IMPL_INFCL:
        from inf_cl import cal_flash_loss

        scale = 1.0 / t

        def infcl(x):  # per-row losses of one direction; normalise as fastcl does (normalize=True)
            q, k = F.normalize(x["query"], dim=-1), F.normalize(x["key"], dim=-1)
            d = q.shape[-1]
            return 0.5 * (
                cal_flash_loss(q, k, None, scale, head_dim=d).mean()
                + cal_flash_loss(k, q, None, scale, head_dim=d).mean()
            )

        return infcl
    raise ValueError(case.impl)


def _clip_callable(case: Case):
    """open_clip's ``ClipLoss()(image, text, log_scale.exp())``, or fastcl's on the case's backend."""
    if case.impl == IMPL_OPEN_CLIP:
        criterion = open_clip_loss_module().ClipLoss()
    elif case.impl in (IMPL_FASTCL, IMPL_REFERENCE):
        import fastcl

        if case.impl == IMPL_REFERENCE:
            import fastcl.functional as FF

            return lambda x: FF.info_nce_loss(
                x["image"], x["text"], logit_scale=x["log_scale"].exp(), normalize=False, backend="reference"
            )
        criterion = fastcl.ClipLoss(backend=case.backend)
    else:
        raise ValueError(case.impl)
    return lambda x: criterion(x["image"], x["text"], x["log_scale"].exp())


def _sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def build(case: Case, inputs: Dict[str, torch.Tensor]):
    """``(prepare, target)``: ``target(prepare())`` is the timed work of the case's mode (synchronised on CUDA)."""
    fn = loss_callable(case)
    leaves = [v for v in inputs.values() if v.requires_grad]
    device = case.device

    def no_state():
        return None

    if case.mode == "fwd":

        def target(_):
            out = fn(inputs)
            _sync(device)
            return out

        return no_state, target
    if case.mode == "fwd+bwd":

        def target(_):
            grads = torch.autograd.grad(fn(inputs), leaves)
            _sync(device)
            return grads

        return no_state, target
    if case.mode == "bwd":

        def prepare():
            out = fn(inputs)
            _sync(device)
            return out

        def target(loss):
            grads = torch.autograd.grad(loss, leaves)
            _sync(device)
            return grads

        return prepare, target
    raise ValueError(case.mode)


def time_call(prepare, target) -> Tuple[float, object]:
    """``(seconds of target, result)``; ``prepare`` (the untimed forward of 'bwd') is outside the clock."""
    state = prepare()
    start = time.perf_counter()
    out = target(state)
    return time.perf_counter() - start, out


def time_round(prepare, target) -> Tuple[float, float]:
    """``(seconds of target, seconds of prepare + target)``: what one benchmark round times, and what it costs."""
    start = time.perf_counter()
    state = prepare()
    mid = time.perf_counter()
    target(state)
    stop = time.perf_counter()
    return stop - mid, stop - start


def apply_threads() -> int:
    """``FASTCL_BENCH_THREADS=k`` sets torch's intra-op threads (a CPU shared with other work); returns the count."""
    wanted = os.environ.get("FASTCL_BENCH_THREADS")
    if wanted:
        torch.set_num_threads(int(wanted))
    return torch.get_num_threads()


# ------------------------------------------------------------------------------------------------------------
# Peak memory
# ------------------------------------------------------------------------------------------------------------


def _proc_status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _max_rss_kib() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def measure_peak_cpu(case: Case, repeats: int = 1, warmup: bool = True) -> dict:
    """Run the case in *this* process and return its peak RSS growth and call times.

    Meant for a fresh process (``runner.py``): the baseline is the RSS after the inputs exist and a small warm-up
    call of the same implementation has loaded its libraries; the peak is ``VmHWM`` (reset to the baseline through
    ``/proc/self/clear_refs``) or, where that cannot be reset, ``ru_maxrss`` (then only growth beyond the earlier
    high-water mark is seen).
    """
    if warmup:
        small = case.replace(n=min(case.n, 256))
        prep, targ = build(small, make_inputs(small, seed=1))
        time_call(prep, targ)
        del prep, targ
    inputs = make_inputs(case)
    prepare, target = build(case, inputs)
    times, peaks = [], []
    method = "VmHWM"
    for _ in range(repeats):
        state = prepare()
        gc.collect()
        base = _proc_status_kib("VmRSS")
        if base is None or not _reset_peak_rss():
            method, base = "ru_maxrss", _max_rss_kib()
        start = time.perf_counter()
        out = target(state)
        times.append(time.perf_counter() - start)
        high = _proc_status_kib("VmHWM") if method == "VmHWM" else _max_rss_kib()
        peaks.append(max(0, high - base) * 1024)
        del out, state
    return {"peak_bytes": max(peaks), "peak_method": method, "times": times}


def measure_peak_cuda(case: Case, inputs: Dict[str, torch.Tensor], prepare=None, target=None) -> dict:
    """CUDA peak allocated bytes of one call beyond what is allocated before it (inputs, saved forward state)."""
    if prepare is None:
        prepare, target = build(case, inputs)
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    state = prepare()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    out = target(state)
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() - base
    del out, state
    return {"peak_bytes": int(peak), "peak_method": "cuda.max_memory_allocated", "times": [elapsed]}


# ------------------------------------------------------------------------------------------------------------
# FLOPs and the roofline (GPU)
# ------------------------------------------------------------------------------------------------------------

# The work the roofline counts for one loss over an n x n similarity matrix:
#   matrix products of 2*n*n*d flops: forward logits (1); backward dA = dS @ C and dC = dS^T @ A (2);
#   exponentials of n*n: one pass in forward (the log-sum-exp), one in backward (softmax, which O(n*d) memory
#   cannot keep).
# An implementation may execute more (an O(n*d)-memory backward recomputes the logits; symmetric forms can fold
# dA and dC into one product when the anchors are the contrast set); the roofline and `tflops` count these 3 and 2.
PRODUCTS = {"fwd": 1, "bwd": 2, "fwd+bwd": 3}
EXP_PASSES = {"fwd": 1, "bwd": 1, "fwd+bwd": 2}


def sgemm_rate(size: int = 2048, repeats: int = 5, fresh: bool = False) -> float:
    """FLOP/s of a square ``size``^3 fp32 CPU matmul, median of ``repeats`` after a warm-up, at the current thread
    count; measured once per process and thread count (the CPU floor's ``R``), again with ``fresh``."""
    key = ("sgemm", size, torch.get_num_threads())
    if fresh or key not in _rate_cache:
        a, b = torch.randn(size, size), torch.randn(size, size)
        a @ b
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        _rate_cache[key] = 2.0 * size**3 / statistics.median(times)
    return _rate_cache[key]


def cpu_floor_s(case: Case, rate: float) -> float:
    """The CPU floor: the model's matrix products (``PRODUCTS[mode]`` x ``2 N^2 D``, so ``6 N^2 D`` for
    fwd+bwd) at the sgemm rate ``rate``; exponentials and everything else count as zero."""
    return model_flops(case) / rate


def model_flops(case: Case) -> float:
    return PRODUCTS[case.mode] * 2.0 * case.n * case.n * case.d


def exp_count(case: Case) -> float:
    return EXP_PASSES[case.mode] * float(case.n) * case.n


_rate_cache: Dict[Tuple[str, str], Optional[float]] = {}


def _cuda_time(fn, warmup=3, reps=10) -> float:
    for _ in range(warmup):
        fn()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop) / 1e3 / reps


def matmul_rate(dtype: str) -> Optional[float]:
    """Measured dense matmul FLOP/s of torch.matmul (8192^3) in ``dtype`` on the current CUDA device."""
    key = ("mm", dtype)
    if key not in _rate_cache:
        try:
            size = 8192
            a = torch.randn(size, size, device="cuda", dtype=DTYPES[dtype])
            b = torch.randn(size, size, device="cuda", dtype=DTYPES[dtype])
            seconds = _cuda_time(lambda: torch.matmul(a, b))
            _rate_cache[key] = 2.0 * size**3 / seconds
            del a, b
        except Exception:
            _rate_cache[key] = None
    return _rate_cache[key]


def exp_rate() -> Optional[float]:
    """Measured exp2/s of the GPU's special-function units (fp32, register-resident chains in a Triton kernel)."""
    key = ("exp", "fp32")
    if key not in _rate_cache:
        try:
            from exp_kernel import exp_throughput

            _rate_cache[key] = exp_throughput()
        except Exception:
            _rate_cache[key] = None
    return _rate_cache[key]


def gpu_roofline(case: Case, seconds: float) -> dict:
    """Achieved model TFLOP/s and fractions of the matmul floor and of the roofline for a measured time."""
    flops = model_flops(case)
    info = {"tflops": flops / seconds / 1e12, "model_flops": flops}
    mm = matmul_rate(case.dtype)
    if mm:
        t_mm = flops / mm
        info.update(matmul_tflops_measured=mm / 1e12, matmul_floor_s=t_mm, matmul_floor_fraction=t_mm / seconds)
        t_roof = t_mm
        ex = exp_rate()
        if ex:
            t_exp = exp_count(case) / ex
            info.update(exp_rate_measured=ex, exp_floor_s=t_exp)
            t_roof = max(t_mm, t_exp)
        info.update(roofline_s=t_roof, roofline_fraction=t_roof / seconds)
    return info


# ------------------------------------------------------------------------------------------------------------
# Device description
# ------------------------------------------------------------------------------------------------------------


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import platform

    return f"{model or platform.processor() or 'CPU'} ({os.cpu_count()} CPUs, {torch.get_num_threads()} threads)"


def versions() -> dict:
    info = {"torch": torch.__version__}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        import fastcl

        info["fastcl"] = fastcl.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["cuda"] = torch.version.cuda
    return info


def load_average() -> Optional[List[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def rounds_for(seconds_per_call: float, device: str, quick: bool) -> int:
    """Timed rounds given the cost of one round (setup included): ~budget seconds in all, 1 for very long calls."""
    budget = float(os.environ.get("FASTCL_BENCH_BUDGET_S", (1.0 if quick else 3.0) if device == "cpu" else 0.5))
    if seconds_per_call > 20:
        return 1
    lo = 2 if seconds_per_call > 5 else 3
    hi = 20 if device == "cpu" else 100
    return int(min(hi, max(lo, math.ceil(budget / max(seconds_per_call, 1e-6)))))
