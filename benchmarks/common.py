"""Shared benchmark helpers: device names, timing, measured copy bandwidth, result files, plots.

Every ``benchmarks/bench_<family>.py`` uses these so numbers are comparable across scripts:

- :func:`device_name` keys result rows by the device they were measured on.
- :func:`time_fn` returns the median wall time of one call in seconds (CUDA: ``triton.testing.do_bench``
  with L2 flushing when Triton is importable, else CUDA events; CPU: ``time.perf_counter``).
- :func:`copy_gbps` measures the device's copy bandwidth in the same run, the roofline a memory-bound
  kernel's GB/s is compared against; :func:`fma_peak_gflops` one CPU core's fp32 FMA peak, the
  bound a compute-bound CPU kernel's GFLOP/s is compared against.
- :func:`write_results` upserts rows into a JSON list keyed by ``(device, provider, *shape keys)``.
- :func:`plot` draws one line per provider with matplotlib's Agg backend (no display needed).
- :func:`results_dir` is where result files go: ``$A2R_BENCH_RESULTS_DIR`` when set (``a2r bench``
  sets it: a scratch directory on CPU unless its ``--out DIR`` says otherwise), else
  ``benchmarks/results``.
- :data:`SKIPPED_EXIT_STATUS`: a script that cannot measure anything here (vLLM missing) exits
  with it, and ``a2r bench`` reports it as skipped, neither succeeded nor failed.

The API of this module is shared by every benchmark: add to it, do not change what exists.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from typing import Callable, Iterable, Sequence

import torch

# Both read by `a2r bench` (python/a2r/cli.py: BENCH_RESULTS_DIR_ENV, BENCH_SKIPPED_EXIT_STATUS;
# tests/test_cli.py holds them equal): benchmarks/ is not importable from the installed package.
RESULTS_DIR_ENV = "A2R_BENCH_RESULTS_DIR"
SKIPPED_EXIT_STATUS = 77   # automake's "skipped" test status


def results_dir() -> str:
    """The directory result files go to: ``$A2R_BENCH_RESULTS_DIR``, else ``benchmarks/results``."""
    return os.environ.get(RESULTS_DIR_ENV) or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results")


def device_name(device: torch.device | str) -> str:
    """Human-readable name of ``device``: the CUDA device name, or the host CPU for ``cpu``."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:  # /proc/cpuinfo has the marketing name on Linux; platform.processor() is often empty
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU {name} ({os.cpu_count()} threads)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], warmup: int = 5, rep: int = 20,
            device: torch.device | str | None = None) -> float:
    """Median seconds of one call of ``fn()``.

    ``device`` defaults to the current CUDA device when CUDA is available, else CPU. On CUDA,
    ``triton.testing.do_bench`` (which flushes L2 between calls) is used when Triton is importable;
    ``warmup`` and ``rep`` are then counts of calls, converted to do_bench's millisecond budgets
    from a first timed call. Without Triton, CUDA events time each call after an L2 flush. On CPU,
    each call is timed with ``time.perf_counter``.
    """
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda":
        try:
            import triton.testing
        except ImportError:
            triton = None
        if triton is not None:
            fn()
            torch.cuda.synchronize(device)
            start = time.perf_counter()
            fn()
            torch.cuda.synchronize(device)
            once_ms = max((time.perf_counter() - start) * 1e3, 1e-3)
            ms = triton.testing.do_bench(fn, warmup=max(once_ms * warmup, 1.0),
                                         rep=max(once_ms * rep, 5.0), return_mode="median")
            return ms * 1e-3
        flush = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device=device)
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(rep):
            flush.zero_()
            begin = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end) * 1e-3)
        return statistics.median(times)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rep):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_gbps(device: torch.device | str, nbytes: int = 256 * 1024 * 1024,
              warmup: int = 3, rep: int = 10) -> float:
    """Copy bandwidth of ``device`` measured now, in GB/s (1e9 bytes/s).

    Times ``dst.copy_(src)`` for ``nbytes``-byte buffers and counts read + write bytes
    (``2 * nbytes``), the same accounting a kernel's "bytes moved" uses.
    """
    device = torch.device(device)
    numel = max(nbytes // 4, 1)
    src = torch.empty(numel, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    seconds = time_fn(lambda: dst.copy_(src), warmup=warmup, rep=rep, device=device)
    return 2 * numel * 4 / seconds / 1e9


def fma_peak_gflops() -> float | None:
    """One CPU core's fp32 FMA peak in GFLOP/s: ``fma_peak.c`` (8-lane AVX2 FMAs, 12 independent
    chains, best of 10) built with the host C compiler (``$CC`` or ``cc``) and run once. None where
    it cannot run: no compiler, not x86-64 Linux, or a CPU without AVX2 + FMA."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f
                          if line.startswith("flags")), [])
    except OSError:
        return None
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None or platform.machine() not in ("x86_64", "AMD64") or not {
            "avx2", "fma"} <= set(flags):
        return None
    source = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fma_peak.c")
    with tempfile.TemporaryDirectory() as tmp:
        binary = os.path.join(tmp, "fma_peak")
        subprocess.run([compiler, "-O3", "-mavx2", "-mfma", source, "-o", binary], check=True)
        out = subprocess.run([binary], check=True, capture_output=True, text=True).stdout
    return float(out.split()[0])


def write_results(path: str, rows: Iterable[dict],
                  key_fields: Sequence[str] | None = None) -> list[dict]:
    """Upsert ``rows`` into the JSON list at ``path`` and return the merged list.

    A row replaces an existing one with the same key: ``key_fields`` when given, else
    ``device``, ``provider`` and every field whose value is not a float (the shape keys:
    ints, strings, bools). Rows keep their insertion order; new rows are appended.
    """
    rows = list(rows)

    def key(row: dict) -> tuple:
        if key_fields is not None:
            return tuple((name, row.get(name)) for name in key_fields)
        return tuple(sorted((name, json.dumps(value)) for name, value in row.items()
                            if not isinstance(value, float)))

    existing: list[dict] = []
    if os.path.exists(path):
        with open(path) as f:
            existing = json.load(f)
    position = {key(row): i for i, row in enumerate(existing)}
    for row in rows:
        k = key(row)
        if k in position:
            existing[position[k]] = row
        else:
            position[k] = len(existing)
            existing.append(row)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(existing, f, indent=1)
        f.write("\n")
    return existing


def plot(path: str, rows: Sequence[dict], x: str, y: str, *, provider: str = "provider",
         title: str = "", xlabel: str | None = None, ylabel: str | None = None,
         logx: bool = False, logy: bool = False, ref_line: float | None = None,
         ref_label: str = "copy bandwidth") -> None:
    """Save a PNG at ``path``: one line of ``row[y]`` against ``row[x]`` per ``row[provider]``.

    ``x`` values may be numbers or strings (strings are placed at evenly spaced positions in
    first-seen order). ``ref_line`` draws a horizontal reference, e.g. the measured copy GB/s.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    categorical = any(isinstance(row[x], str) for row in rows)
    ticks: list = []
    for row in rows:
        if row[x] not in ticks:
            ticks.append(row[x])
    providers: list[str] = []
    for row in rows:
        if row[provider] not in providers:
            providers.append(row[provider])
    for name in providers:
        points = [(ticks.index(r[x]) if categorical else r[x], r[y])
                  for r in rows if r[provider] == name]
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    if ref_line is not None:
        ax.axhline(ref_line, color="gray", linestyle="--", label=ref_label)
    if categorical:
        ax.set_xticks(range(len(ticks)))
        ax.set_xticklabels(ticks, rotation=30, ha="right", fontsize=8)
    if logx and not categorical:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(ylabel or y)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
