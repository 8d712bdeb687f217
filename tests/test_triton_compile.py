"""Every Triton kernel, compiled for real GPU targets (sm_80, sm_90) on a machine without a GPU.

The other Triton tests run the kernels in the CPU interpreter, which never lowers them and so
cannot see compile-only errors (non-constexpr globals, ``tl.dot`` shapes or dtypes the target
lacks, loop-carried values whose type changes, ...). Here each launcher of
``a2r_kernels/triton/{attention,denoise,entropy_bound}.py`` is called with representative tensors, its launches
are recorded (the block sizes, warps and constexprs come from the launchers' own tables), and
every launch is specialised as ``JITFunction.run`` would and compiled by Triton's real pipeline
(TTIR -> TTGIR -> LLVM IR -> PTX -> cubin with Triton's bundled ptxas) for each target; see
``tests/_triton_aot.py``. Per compiled kernel the test checks:

* it compiles, for the target asked (``.target sm_80`` / ``sm_90a``), with a non-empty cubin;
* it can launch: shared memory <= the target's per-block limit, registers <= 255 and
  registers x threads <= 64 Ki (else ``cuLaunchKernel`` fails with "too many resources");
* the launcher picked the GPU variant: tree attention uses tensor-core MMA for fp16/bf16 and exact
  fp32 for fp32 (no TF32 instruction anywhere), the denoise constexprs follow the options;
* where the system's CUDA ptxas (``nvcc``'s, a different release) is on PATH, it assembles the
  same PTX too (for PTX newer than it reads, with ``.version`` lowered to its newest).

Compiles run in fresh subprocesses without ``TRITON_INTERPRET`` (``TRITON_INTERPRET=1`` at
``import triton`` replaces Triton's own standard library for the whole process, and the other
test modules set it at import), one per CPU core, each with a private empty Triton cache so every
run really compiles. Nothing here needs a GPU; without a CUDA-capable Triton build or ptxas the
module skips with the reason.

    pytest tests/test_triton_compile.py -q            # ~40 s on 2 cores (74 compiles)
    python tests/test_triton_compile.py --report      # registers / spills / shared per kernel
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

TARGETS = {"sm80": 80, "sm90": 90}
# SM counts of the GPUs these targets stand for (A100, H100 SXM): denoise_config sizes its V
# splits by them.
SM_COUNT = {80: 108, 90: 132}
WORKER_TIMEOUT_S = 900

# ------------------------------------------------------------------------------------ the matrix
# Tree-attention partial kernel: every dtype x head_dim, with GROUP, PAGE_SIZE and the row count
# (q_len * group, which picks BLOCK_M 16/32/64 and 4/8 warps in _tile_config) laid out as a Latin
# square so each value of each meets every dtype and every head_dim once.
#   (dtype, head_dim, group, page_size, q_len, q_layout)
_PARTIAL = [
    ("float16", 64, 1, 16, 5, "contiguous"),       # rows 5  -> BLOCK_M 16
    ("float16", 128, 4, 32, 8, "contiguous"),      # rows 32 -> BLOCK_M 32
    ("float16", 40, 8, 16, 8, "contiguous"),       # rows 64 -> BLOCK_M 64, 8 warps
    ("bfloat16", 64, 4, 16, 16, "contiguous"),     # rows 64
    ("bfloat16", 128, 8, 32, 1, "contiguous"),     # rows 8
    ("bfloat16", 40, 1, 32, 20, "contiguous"),     # rows 20
    ("float32", 64, 8, 32, 3, "contiguous"),       # rows 24
    ("float32", 128, 1, 16, 40, "contiguous"),     # rows 40
    ("float32", 40, 4, 16, 2, "contiguous"),       # rows 8
    # q sliced out of a fused qkv projection (row stride not a multiple of 16 elements) and q
    # with a non-unit head_dim stride: other pointer/stride specialisations.
    ("bfloat16", 64, 8, 32, 2, "qkv_slice"),
    ("float16", 128, 4, 16, 3, "transposed"),
    # the target tile: 16 sequences x GQA 4 = 64 rows, head_dim 128 -> BLOCK_N 64
    ("bfloat16", 128, 4, 16, 16, "contiguous"),
]
# LSE merges: every output dtype, head_dims 64 / 128 / 40 (BLOCK_D 64 with a mask).
_MERGE = [("float16", 64, "contiguous"), ("bfloat16", 128, "contiguous"),
          ("float32", 40, "contiguous"), ("bfloat16", 40, "transposed")]
# denoise_step: (dtype, batch, length, vocab, temperature, remasking, mode, seed, logits_layout).
# Vocabularies hit the three rows of denoise_config (151936 Qwen / 126464 LLaDA -> BLOCK_V 2048,
# 8 warps; 4000 -> 1024; 100 -> 128), and with the SM counts several V-split counts. The combine
# kernel meets all 8 (SAMPLE, REMASKING) pairs; sampling meets both seed types a real call
# passes (the op draws seeds in [0, 2**63): i64, and rarely below 2**31: i32); length 1 is
# specialised by Triton to a constexpr.
_DENOISE = [
    ("float32", 1, 32, 151936, 0.0, "low_confidence", "num_transfer", 0, "contiguous"),
    ("bfloat16", 1, 32, 151936, 0.0, "margin", "threshold", 0, "contiguous"),
    ("float16", 2, 64, 4000, 0.0, "entropy", "num_transfer", 0, "contiguous"),
    ("bfloat16", 2, 64, 4000, 0.7, "random", "num_transfer", 2**62 + 12345, "contiguous"),
    ("float32", 3, 7, 100, 1.0, "low_confidence", "threshold", 12345, "contiguous"),
    ("float16", 2, 256, 151936, 0.5, "margin", "num_transfer", 2**40 + 3, "contiguous"),
    ("bfloat16", 1, 1, 100, 0.9, "entropy", "threshold", 2**50 + 7, "contiguous"),
    ("float32", 2, 33, 126464, 0.0, "random", "num_transfer", 2**60 + 1, "transposed"),
]

# entropy_bound_step: (dtype, batch, length, vocab, seed): DiffusionGemma's target shape (BLOCK_V
# 2048, 8 warps), a small fp32 one (1024) and length 1 / V 7; both seed types.
_ENTROPY_BOUND = [("bfloat16", 8, 256, 262144, 2**62 + 5), ("float32", 2, 5, 1000, 12345),
                  ("float16", 1, 1, 7, 2**40 + 1)]

CASES: dict[str, dict] = {}
for _dt, _d, _g, _p, _ql, _lay in _PARTIAL:
    CASES[f"tree_partials-{_dt}-d{_d}-g{_g}-p{_p}-rows{_ql * _g}-{_lay}"] = dict(
        op="tree_partials", dtype=_dt, head_dim=_d, group=_g, page_size=_p, q_len=_ql,
        layout=_lay)
for _dt, _d, _lay in _MERGE:
    CASES[f"merge_partials-{_dt}-d{_d}"] = dict(op="merge_partials", dtype=_dt, head_dim=_d)
    CASES[f"merge_two_states-{_dt}-d{_d}-{_lay}"] = dict(op="merge_two_states", dtype=_dt,
                                                         head_dim=_d, layout=_lay)
for _dt, _b, _l, _v, _t, _r, _m, _s, _lay in _DENOISE:
    CASES[f"denoise-{_dt}-B{_b}L{_l}V{_v}-T{_t}-{_r}-{_m}-{_lay}"] = dict(
        op="denoise", dtype=_dt, batch=_b, length=_l, vocab=_v, temperature=_t, remasking=_r,
        mode=_m, seed=_s, layout=_lay)
for _dt, _b, _l, _v, _s in _ENTROPY_BOUND:
    CASES[f"entropy_bound-{_dt}-B{_b}L{_l}V{_v}"] = dict(op="entropy_bound", dtype=_dt, batch=_b,
                                                         length=_l, vocab=_v, seed=_s)
CASES = {key.replace("-contiguous", ""): value for key, value in CASES.items()}

# case id -> reason: a kernel of that case is known not to compile (xfail(strict=True), so the
# mark must go when the kernel is fixed). Empty: every kernel compiles.
KNOWN_FAILURES: dict[str, str] = {}


# --------------------------------------------------------------------- worker (fresh subprocess)
def _capture(case: dict, arch: int):
    """Run the launcher of ``case`` with representative CPU tensors; return its launches."""
    import torch

    import _triton_aot as _aot
    from a2r_kernels.triton import attention, denoise, entropy_bound

    dtype = getattr(torch, case["dtype"])
    if case["op"] == "tree_partials":
        head_dim, group, q_len = case["head_dim"], case["group"], case["q_len"]
        num_kv_heads, num_seqs, num_blocks, num_work = 2, q_len + 3, 7, 5
        num_q_heads = num_kv_heads * group
        if case["layout"] == "qkv_slice":     # q = qkv[:, :Hq * D].view(S, Hq, D)
            qkv = torch.empty(num_seqs, (num_q_heads + 2 * num_kv_heads) * head_dim + 8,
                              dtype=dtype)
            q = qkv[:, : num_q_heads * head_dim].view(num_seqs, num_q_heads, head_dim)
        elif case["layout"] == "transposed":  # head_dim stride != 1
            q = torch.empty(head_dim, num_q_heads, num_seqs, dtype=dtype).permute(2, 1, 0)
        else:
            q = torch.empty(num_seqs, num_q_heads, head_dim, dtype=dtype)
        k_cache = torch.empty(num_blocks, case["page_size"], num_kv_heads, head_dim, dtype=dtype)
        num_rows = num_work * q_len
        return _aot.capture_launches(
            attention, attention.tree_attention_partials,
            q, k_cache, torch.empty_like(k_cache),
            torch.empty(num_work, 6, dtype=torch.int32), torch.empty(num_seqs, dtype=torch.int32),
            torch.empty(num_blocks, dtype=torch.int32),
            torch.empty(num_rows, num_q_heads, head_dim), torch.empty(num_rows, num_q_heads),
            head_dim ** -0.5, q_len * group)
    if case["op"] == "merge_partials":
        num_seqs, num_heads, num_rows = 5, 6, 9
        return _aot.capture_launches(
            attention, attention.merge_partials,
            torch.empty(num_rows, num_heads, case["head_dim"]), torch.empty(num_rows, num_heads),
            torch.empty(num_seqs + 1, dtype=torch.int32), torch.empty(num_rows, dtype=torch.int32),
            torch.empty(num_seqs, num_heads, case["head_dim"], dtype=dtype),
            torch.empty(num_seqs, num_heads))
    if case["op"] == "merge_two_states":
        num_seqs, num_heads, head_dim = 5, 6, case["head_dim"]

        def state():
            if case["layout"] == "transposed":
                return torch.empty(head_dim, num_heads, num_seqs, dtype=dtype).permute(2, 1, 0)
            return torch.empty(num_seqs, num_heads, head_dim, dtype=dtype)
        return _aot.capture_launches(
            attention, attention.merge_two_states,
            state(), torch.empty(num_seqs, num_heads), state(), torch.empty(num_seqs, num_heads),
            torch.empty(num_seqs, num_heads, head_dim, dtype=dtype),
            torch.empty(num_seqs, num_heads))
    if case["op"] == "denoise":
        batch, length, vocab = case["batch"], case["length"], case["vocab"]
        if case["layout"] == "transposed":    # [B, V, L] storage: stride_l 1, stride_v L
            logits = torch.empty(batch, vocab, length, dtype=dtype).transpose(1, 2)
        else:
            logits = torch.empty(batch, length, vocab, dtype=dtype)   # never touched: no RSS
        threshold_mode = case["mode"] == "threshold"
        # denoise_config sizes V splits by the SM count of the device: stand in the target's.
        original_config, original_num_sms = denoise.denoise_config, denoise._num_sms
        denoise._num_sms = lambda device_index: SM_COUNT[arch]
        denoise.denoise_config = lambda num_positions, vocab_, device: original_config(
            num_positions, vocab_, torch.device("cuda", 0))
        try:
            return _aot.capture_launches(
                denoise, denoise.denoise_step,
                logits, torch.empty(batch, length, dtype=torch.int64), 126336,
                None if threshold_mode else torch.empty(batch, dtype=torch.int64),
                0.9 if threshold_mode else None, case["temperature"], case["remasking"],
                case["seed"], torch.empty(batch, length, dtype=torch.int64),
                torch.empty(batch, length), torch.empty(batch, length, dtype=torch.bool))
        finally:
            denoise.denoise_config, denoise._num_sms = original_config, original_num_sms
    if case["op"] == "entropy_bound":
        batch, length, vocab = case["batch"], case["length"], case["vocab"]
        original_config, original_num_sms = entropy_bound.entropy_bound_config, denoise._num_sms
        denoise._num_sms = lambda device_index: SM_COUNT[arch]
        entropy_bound.entropy_bound_config = lambda num_positions, vocab_, device: \
            original_config(num_positions, vocab_, torch.device("cuda", 0))
        shape = (batch, length)
        try:
            return _aot.capture_launches(
                entropy_bound, entropy_bound.entropy_bound_step,
                torch.empty(batch, length, vocab, dtype=dtype),
                torch.empty(shape, dtype=torch.int64), 0.1, case["seed"],
                torch.empty(shape, dtype=torch.int64), torch.empty(shape, dtype=torch.int64),
                torch.empty(shape), torch.empty(shape, dtype=torch.bool))
        finally:
            entropy_bound.entropy_bound_config, denoise._num_sms = (original_config,
                                                                    original_num_sms)
    raise ValueError(f"unknown op {case['op']!r}")


def _system_ptxas() -> tuple[str, int] | None:
    """(path, newest PTX ISA it reads, e.g. 90) of the CUDA toolkit's ptxas, if there is one."""
    from triton.backends.nvidia.compiler import ptx_get_version

    path = shutil.which("ptxas") or next(
        (p for p in ("/usr/local/cuda/bin/ptxas", "/usr/local/bin/ptxas") if os.path.exists(p)),
        None)
    if path is None:
        return None
    version = re.search(r"release (\d+\.\d+)", subprocess.run(
        [path, "--version"], capture_output=True, text=True).stdout)
    return (path, ptx_get_version(version.group(1))) if version else None


def _system_ptxas_check(ptx: str, arch: int, system) -> str:
    """'ok', 'n/a: ...' or 'error: ...' for assembling ``ptx`` with the system ptxas."""
    if system is None:
        return "n/a: no CUDA toolkit ptxas on PATH"
    path, newest = system
    major, minor = map(int, re.search(r"\.version (\d+)\.(\d+)", ptx).groups())
    if major * 10 + minor > newest:
        ptx = re.sub(r"\.version \d+\.\d+", f".version {newest // 10}.{newest % 10}", ptx, count=1)
    gpu = "sm_90a" if arch == 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        result = subprocess.run([path, f"--gpu-name={gpu}", str(src), "-o", str(Path(tmp) / "k.o")],
                                capture_output=True, text=True)
    return "ok" if result.returncode == 0 else f"error: {result.stderr.strip()[-2000:]}"


def _compile_one(launch, target, usage_memo, system) -> dict:
    import _triton_aot as _aot

    arch = target.arch
    record = {"name": launch.name, "constexprs": launch.constexprs,
              "num_warps": launch.kwargs.get("num_warps", 4),
              "num_stages": launch.kwargs.get("num_stages")}
    started = time.perf_counter()
    try:
        compiled = _aot.compile_launch(launch, target)
    except Exception as exc:  # noqa: BLE001 - reported to the test, which fails with it
        record.update(ok=False, error=f"{type(exc).__name__}: {exc}")
        return record
    ptx = compiled.asm["ptx"]
    if compiled.hash not in usage_memo:
        usage_memo[compiled.hash] = (vars(_aot.resource_usage(compiled)),
                                     _system_ptxas_check(ptx, arch, system))
    usage, system_ptxas = usage_memo[compiled.hash]
    ptx_target = re.search(r"^\.target (\S+)", ptx, re.MULTILINE)
    record.update(
        ok=True, compile_s=round(time.perf_counter() - started, 2),
        signature={k: str(v) for k, v in compiled.src.signature.items()},
        ptx_target=ptx_target.group(1) if ptx_target else None,
        has_entry=re.search(rf"\.entry {re.escape(launch.name)}\b", ptx) is not None,
        cubin_bytes=len(compiled.asm.get("cubin") or b""),
        tensor_core_mma="mma.sync" in ptx or "wgmma.mma_async" in ptx,
        mma=("wgmma" if "wgmma.mma_async" in ptx else "mma.sync" if "mma.sync" in ptx else "-"),
        tf32=".tf32" in ptx, system_ptxas=system_ptxas, **usage)
    return record


def _worker(jobs_path: str, out_path: str) -> None:
    """Compile the (case id, arch) jobs of ``jobs_path``; write results as JSON to ``out_path``."""
    os.environ.pop("TRITON_INTERPRET", None)      # before triton is imported
    from triton.backends.compiler import GPUTarget
    from triton.runtime.jit import JITFunction

    import _triton_aot as _aot
    from a2r_kernels.triton import attention, denoise, entropy_bound

    jobs = json.loads(Path(jobs_path).read_text())
    results: dict = {"kernel_modules": {}, "jobs": {}, "probe": {}}
    for module in (attention, denoise, entropy_bound):
        results["kernel_modules"][module.__name__] = {
            name: type(value).__name__ for name, value in vars(module).items()
            if name.endswith("_kernel") and hasattr(value, "fn")}
        assert all(isinstance(v, JITFunction) for v in vars(module).values()
                   if hasattr(v, "fn") and hasattr(v, "arg_names"))
    system = _system_ptxas()
    for arch in sorted({arch for _, arch in jobs}):
        results["probe"][str(arch)] = _aot.probe(GPUTarget("cuda", arch, 32))
    usage_memo: dict = {}
    for case_id, arch in jobs:
        target = GPUTarget("cuda", arch, 32)
        entry: dict = {"kernels": []}
        if results["probe"][str(arch)] is None:
            try:
                launches = _capture(CASES[case_id], arch)
            except Exception as exc:  # noqa: BLE001
                entry["capture_error"] = f"{type(exc).__name__}: {exc}"
                launches = []
            entry["kernels"] = [_compile_one(launch, target, usage_memo, system)
                                for launch in launches]
        results["jobs"][f"{case_id}@{arch}"] = entry
        Path(out_path).write_text(json.dumps(results, default=str))   # partial results survive


def run_compile_matrix(case_ids, archs, num_workers: int | None = None) -> dict:
    """Compile ``case_ids`` x ``archs`` in fresh worker subprocesses; merged results."""
    jobs = [(case_id, arch) for case_id in case_ids for arch in archs]
    num_workers = max(1, min(num_workers or os.cpu_count() or 1, len(jobs)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    merged: dict = {"kernel_modules": {}, "jobs": {}, "probe": {}, "workers": []}
    with tempfile.TemporaryDirectory(prefix="a2r_aot_") as tmp:
        procs = []
        for w in range(num_workers):
            jobs_path, out_path = Path(tmp) / f"jobs{w}.json", Path(tmp) / f"out{w}.json"
            jobs_path.write_text(json.dumps(jobs[w::num_workers]))
            cache = Path(tmp) / f"cache{w}"
            log = open(Path(tmp) / f"log{w}.txt", "w+")
            procs.append((subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--worker", str(jobs_path),
                 str(out_path)],
                env={**env, "TRITON_CACHE_DIR": str(cache)}, stdout=log, stderr=subprocess.STDOUT,
                cwd=str(Path(__file__).resolve().parent.parent)), out_path, log))
        deadline = time.monotonic() + WORKER_TIMEOUT_S
        for proc, out_path, log in procs:
            try:
                returncode = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                returncode = "timeout"
            log.seek(0)
            merged["workers"].append({"returncode": returncode, "log_tail": log.read()[-6000:]})
            log.close()
            if out_path.exists():
                part = json.loads(out_path.read_text())
                for key in ("kernel_modules", "jobs", "probe"):
                    merged[key].update(part[key])
    return merged


# ----------------------------------------------------------------------------------------- tests
def _selected_cases(session_items) -> list[str]:
    """Case ids the session will run (all of them when a whole-matrix test is selected)."""
    selected = set()
    for item in session_items:
        path = getattr(item, "path", None)
        if path is None or Path(path).resolve() != Path(__file__).resolve():
            continue
        params = getattr(getattr(item, "callspec", None), "params", {})
        if "case_id" not in params:
            return list(CASES)
        selected.add(params["case_id"])
    return [case_id for case_id in CASES if case_id in selected]


@pytest.fixture(scope="module")
def matrix(request) -> dict:
    saved = os.environ.get("TRITON_INTERPRET")
    results = run_compile_matrix(_selected_cases(request.session.items), list(TARGETS.values()))
    assert os.environ.get("TRITON_INTERPRET") == saved, "the parent environment must not change"
    blocked = {arch: why for arch, why in results["probe"].items() if why is not None}
    if results["probe"] and len(blocked) == len(results["probe"]):
        pytest.skip(f"this Triton build cannot compile for CUDA here: {blocked}")
    return results


def _job(matrix: dict, case_id: str, arch: int) -> dict:
    key = f"{case_id}@{arch}"
    if matrix["probe"].get(str(arch)) is not None:
        pytest.skip(f"cannot compile for sm_{arch} here: {matrix['probe'][str(arch)]}")
    if key not in matrix["jobs"]:
        logs = "\n".join(w["log_tail"] for w in matrix["workers"])
        pytest.fail(f"no result for {key}: a worker died or timed out "
                    f"({[w['returncode'] for w in matrix['workers']]}):\n{logs}")
    return matrix["jobs"][key]


def _params():
    for case_id in CASES:
        for target, arch in TARGETS.items():
            marks = ([pytest.mark.xfail(strict=True, reason=KNOWN_FAILURES[case_id])]
                     if case_id in KNOWN_FAILURES else [])
            yield pytest.param(case_id, arch, id=f"{case_id}@{target}", marks=marks)


def _check_kernel(kernel: dict, case: dict, arch: int) -> None:
    from _triton_aot import TARGET_LIMITS

    name, constexprs = kernel["name"], kernel["constexprs"]
    assert kernel["ok"], f"{name} does not compile for sm_{arch}:\n{kernel.get('error')}"
    assert kernel["ptx_target"] == ("sm_90a" if arch == 90 else f"sm_{arch}")
    assert kernel["has_entry"], f"{name}: no .entry {name} in the PTX"
    assert kernel["cubin_bytes"] > 0, f"{name}: ptxas produced no cubin"
    limits = TARGET_LIMITS[arch]
    threads = kernel["num_warps"] * 32
    assert kernel["shared_bytes"] <= limits["max_shared"], (
        f"{name} needs {kernel['shared_bytes']} B of shared memory; sm_{arch} allows "
        f"{limits['max_shared']} per block")
    assert kernel["registers"] <= limits["max_regs_per_thread"]
    assert kernel["registers"] * threads <= limits["regs_per_sm"], (
        f"{name}: {kernel['registers']} registers x {threads} threads exceed the "
        f"{limits['regs_per_sm']} registers of an SM: the launch would fail")
    assert not kernel["system_ptxas"].startswith("error"), (
        f"{name}: the CUDA toolkit's ptxas rejects the PTX Triton accepted:\n"
        f"{kernel['system_ptxas']}")

    if name == "_tree_attention_partial_kernel":
        fp32 = case["dtype"] == "float32"
        assert constexprs["FP32_DOT"] == fp32, "bf16/fp16 must take the tensor-core dot on a GPU"
        assert constexprs["HEAD_DIM"] == case["head_dim"]
        assert constexprs["GROUP"] == case["group"]
        assert constexprs["PAGE_SIZE"] == case["page_size"]
        if fp32:
            assert not kernel["tf32"], "fp32 attention must not round its dots to TF32"
        else:
            assert kernel["tensor_core_mma"], f"{case['dtype']} dots must use tensor cores"
    elif name == "_denoise_partial_kernel":
        assert constexprs["SAMPLE"] == (case["temperature"] > 0)
        assert constexprs["NEED_SECOND"] == (case["remasking"] == "margin")
        assert constexprs["NEED_ENTROPY"] == (case["remasking"] == "entropy")
    elif name == "_denoise_combine_kernel":
        assert constexprs["SAMPLE"] == (case["temperature"] > 0)
        assert constexprs["REMASKING"] == ["low_confidence", "margin", "entropy",
                                           "random"].index(case["remasking"])
    elif name == "_denoise_select_kernel":
        assert constexprs["USE_THRESHOLD"] == (case["mode"] == "threshold")


@pytest.mark.parametrize("case_id, arch", list(_params()))
def test_kernel_compiles_for_target(matrix, case_id, arch):
    job = _job(matrix, case_id, arch)
    assert "capture_error" not in job, f"the launcher failed: {job['capture_error']}"
    launches_per_call = {"tree_partials": 1, "merge_partials": 1, "merge_two_states": 1,
                         "denoise": 3, "entropy_bound": 3}
    names = [kernel["name"] for kernel in job["kernels"]]
    assert len(names) == launches_per_call[CASES[case_id]["op"]], names
    for kernel in job["kernels"]:
        _check_kernel(kernel, CASES[case_id], arch)


@pytest.mark.parametrize("arch", list(TARGETS.values()), ids=list(TARGETS))
def test_every_kernel_is_compiled(matrix, arch):
    """A new ``_*_kernel`` in the kernel modules must get a case here."""
    declared = {name for kernels in matrix["kernel_modules"].values() for name in kernels}
    compiled = {kernel["name"] for key, job in matrix["jobs"].items() if key.endswith(f"@{arch}")
                for kernel in job["kernels"] if kernel.get("ok")}
    assert declared, "the worker found no kernels"
    for module, kernels in matrix["kernel_modules"].items():
        assert set(kernels.values()) == {"JITFunction"}, f"{module} was loaded for the interpreter"
    assert declared <= compiled, f"never compiled for sm_{arch}: {sorted(declared - compiled)}"


@pytest.mark.parametrize("arch", list(TARGETS.values()), ids=list(TARGETS))
def test_matrix_covers_the_variants(matrix, arch):
    """The case table keeps meeting every code-selecting variant (guards edits of the table)."""
    kernels = [kernel for key, job in matrix["jobs"].items() if key.endswith(f"@{arch}")
               for kernel in job["kernels"] if kernel.get("ok")]

    def seen(name, *fields):
        return {tuple(k["constexprs"][f] for f in fields) for k in kernels if k["name"] == name}

    assert seen("_denoise_combine_kernel", "SAMPLE", "REMASKING") == {
        (sample, code) for sample in (False, True) for code in range(4)}
    assert seen("_denoise_select_kernel", "USE_THRESHOLD") == {(False,), (True,)}
    assert seen("_tree_attention_partial_kernel", "BLOCK_M") == {(16,), (32,), (64,)}
    assert seen("_tree_attention_partial_kernel", "FP32_DOT") == {(False,), (True,)}
    logits_types = {k["signature"]["logits_ptr"] for k in kernels
                    if k["name"] == "_denoise_partial_kernel"}
    assert logits_types == {"*fp32", "*fp16", "*bf16"}
    seed_types = {k["signature"]["seed"] for k in kernels
                  if k["name"] == "_denoise_partial_kernel" and k["constexprs"]["SAMPLE"]}
    assert seed_types == {"i32", "i64"}
    assert any(k["signature"]["length"] == "constexpr" for k in kernels
               if k["name"] == "_denoise_partial_kernel"), "length == 1 is specialised"


# ------------------------------------------------------------------------------------------ CLI
def _report(as_json: str | None) -> None:
    results = run_compile_matrix(list(CASES), list(TARGETS.values()))
    rows = []
    for key, job in results["jobs"].items():
        for kernel in job["kernels"]:
            rows.append({"case": key, **kernel})
    header = (f"{'kernel':32} {'case':70} {'warps':>5} {'regs':>4} {'spill st/ld':>11} "
              f"{'stack':>5} {'shared':>7} {'mma':>8} {'s':>5}")
    print(header)
    for row in rows:
        if not row.get("ok"):
            print(f"{row['name']:32} {row['case']:70} FAILED: {row.get('error', '')[:200]}")
            continue
        spills = f"{row['spill_store_bytes']}/{row['spill_load_bytes']}"
        print(f"{row['name']:32} {row['case']:70} {row['num_warps']:5} {row['registers']:4} "
              f"{spills:>11} {row['stack_bytes']:5} {row['shared_bytes']:7} {row['mma']:>8} "
              f"{row['compile_s']:5}")
    for worker in results["workers"]:
        if worker["returncode"] != 0:
            print(f"worker exited with {worker['returncode']}:\n{worker['log_tail']}")
    if as_json:
        Path(as_json).write_text(json.dumps(rows, indent=1, default=str))


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        _worker(sys.argv[2], sys.argv[3])
    elif len(sys.argv) >= 2 and sys.argv[1] == "--report":
        _report(sys.argv[2] if len(sys.argv) > 2 else None)
    else:
        sys.exit("usage: test_triton_compile.py --report [out.json] | --worker jobs.json out.json")
