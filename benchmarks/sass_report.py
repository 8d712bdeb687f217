"""Static instruction budget of the hot loops, from the compiled SASS (no GPU needed).

The Triton kernels are compiled for sm_90 exactly as their launchers would launch them on an H100
(``tests/_triton_aot.py``), disassembled with Triton's bundled ``cuobjdump``, and each kernel's
innermost streaming loop is summarised: SASS instructions and MUFU (exp2/log2) per iteration,
warp-instructions per element streamed, and the bandwidth at which instruction issue would
saturate (an H100 SM issues 4 warp-instructions and 16 MUFU results per clock). This says whether
a kernel meant to be memory-bound has the instruction budget for it; it is not a timing. Rows go to ``benchmarks/results/sass_report.json``.

Shapes: the issue targets, bf16: denoise at V = 126464 (B=8, L=256: one V split per position) for
each remasking mode; tree attention with BLOCK_M = 64 (16 sequences x GQA 4) and BLOCK_M = 16
(a leaf, GQA 4), head_dim 128, block size 16.

The CUDA backend's denoise kernel (``csrc/denoise.cu``, one template instance per remasking
mode) is compiled the same way, by ``nvcc -cubin`` with the CMake build's flags, when ``nvcc``
and ``c++filt`` (to name the template instances) are on PATH; its rows say ``cuda denoise ...``.
The streaming loop there is the one with the most 16-byte loads (the aligned copy, unrolled).

Usage: ``python benchmarks/sass_report.py [--arch 90]``
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# The AOT compile harness is a test tool (tests/_triton_aot.py), not part of the package.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
os.environ.pop("TRITON_INTERPRET", None)   # must be off when triton is first imported

import torch  # noqa: E402

from common import write_results  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
# csrc/denoise.cu's Extra template argument per remasking mode (random needs no more than p(x0)).
CUDA_DENOISE_EXTRA = {"low_confidence": 0, "margin": 1, "entropy": 2}
CUDA_DENOISE_THREADS = 256   # kPredictThreads


def _denoise_launch(remasking: str, num_sms: int):
    import _triton_aot as _aot
    from a2r_kernels.triton import denoise

    batch, length, vocab = 8, 256, 126464
    logits = torch.empty(batch, length, vocab, dtype=torch.bfloat16)   # never touched
    # denoise_config sizes the V splits by the device's SM count: stand in the H100's.
    original_config, original_num_sms = denoise.denoise_config, denoise._num_sms
    denoise._num_sms = lambda device_index: num_sms
    denoise.denoise_config = lambda positions, vocab_, device: original_config(
        positions, vocab_, torch.device("cuda", 0))
    try:
        launches = _aot.capture_launches(
            denoise, denoise.denoise_step, logits, torch.empty(batch, length, dtype=torch.int64),
            126336, torch.empty(batch, dtype=torch.int64), None, 0.0, remasking, 0,
            torch.empty(batch, length, dtype=torch.int64), torch.empty(batch, length),
            torch.empty(batch, length, dtype=torch.bool))
    finally:
        denoise.denoise_config, denoise._num_sms = original_config, original_num_sms
    launch = next(l for l in launches if l.name == "_denoise_partial_kernel")
    # one loop iteration streams BLOCK_V logits over num_warps * 32 threads
    # one loop iteration streams BLOCK_V logits (2 bytes each) over the CTA
    return launch, launch.constexprs["BLOCK_V"], 2, f"denoise {remasking}", dict(
        B=batch, L=length, V=vocab)


def _tree_launch(rows: int):
    import _triton_aot as _aot
    from a2r_kernels.triton import attention

    num_q_heads, num_kv_heads, head_dim, num_blocks = 32, 8, 128, 64
    q = torch.empty(64, num_q_heads, head_dim, dtype=torch.bfloat16)
    k = torch.empty(num_blocks, 16, num_kv_heads, head_dim, dtype=torch.bfloat16)
    launches = _aot.capture_launches(
        attention, attention.tree_attention_partials, q, k, torch.empty_like(k),
        torch.empty(4, 6, dtype=torch.int32), torch.empty(64, dtype=torch.int32),
        torch.empty(num_blocks, dtype=torch.int32), torch.empty(64, num_q_heads, head_dim),
        torch.empty(64, num_q_heads), head_dim ** -0.5, rows)
    launch = launches[0]
    # one KV-loop iteration streams BLOCK_N tokens: K and V rows of one kv head, 4 * D bytes each
    return launch, launch.constexprs["BLOCK_N"], 4 * head_dim, f"tree partial rows={rows}", dict(
        Hq=num_q_heads, Hkv=num_kv_heads, D=head_dim, rows=rows,
        BLOCK_M=launch.constexprs["BLOCK_M"], BLOCK_N=launch.constexprs["BLOCK_N"])


def _cuda_denoise_cases(arch: int) -> tuple[list[tuple], str | None]:
    """(cases, None), or ([], why not): the bf16 ``denoise_predict_kernel`` instances of
    csrc/denoise.cu compiled for sm_<arch>, as (name, loops, registers, spill bytes, warps,
    logits per iteration, shape)."""
    from triton import knobs

    import _triton_aot as _aot

    nvcc, cxxfilt = shutil.which("nvcc"), shutil.which("c++filt")
    if nvcc is None or cxxfilt is None:
        return [], "nvcc or c++filt not on PATH"
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "denoise.cubin")
        # The flags of CMakeLists.txt's a2r_cuda_kernels target (Release: -O3).
        build = subprocess.run(
            [nvcc, "-cubin", f"-arch=sm_{arch}", "-O3", "-std=c++17", "--expt-relaxed-constexpr",
             "-lineinfo", "-Xptxas=-v", "-I", os.path.join(ROOT, "csrc"),
             os.path.join(ROOT, "csrc", "denoise.cu"), "-o", cubin],
            capture_output=True, text=True, check=True)
        sass = subprocess.run([knobs.nvidia.cuobjdump.path, "-sass", cubin],
                              capture_output=True, text=True, check=True).stdout
    usage = {}   # mangled name -> (registers, spill bytes), from ptxas -v
    for mangled, block in re.findall(r"Compiling entry function '(\S+)'(.*?)(?=Compiling|\Z)",
                                     build.stdout + build.stderr, flags=re.S):
        regs = re.search(r"Used (\d+) registers", block)
        spills = re.findall(r"(\d+) bytes spill (?:stores|loads)", block)
        usage[mangled] = (int(regs.group(1)) if regs else -1, sum(map(int, spills)))
    parts = re.split(r"\n\s*Function : (\S+)", sass)
    cases = []
    for mangled, listing in zip(parts[1::2], parts[2::2]):
        name = subprocess.run([cxxfilt, mangled], capture_output=True, text=True).stdout
        match = re.search(r"denoise_predict_kernel<__nv_bfloat16, \(.*?Extra\)(\d), false>", name)
        if match is None:
            continue
        mode = next(m for m, e in CUDA_DENOISE_EXTRA.items() if e == int(match.group(1)))
        loops = [loop for loop in _aot.parse_sass_loops(listing)
                 if "LDG.E.EF.128" in loop.full_opcodes]
        if not loops:
            raise RuntimeError(f"cuda denoise {mode}: no 16-byte streaming loop in the SASS")
        body = max(loops, key=lambda loop: loop.full_opcodes.count("LDG.E.EF.128"))
        logits = body.full_opcodes.count("LDG.E.EF.128") * 8 * CUDA_DENOISE_THREADS
        regs, spills = usage.get(mangled, (-1, -1))
        cases.append((f"cuda denoise {mode}", body, regs, spills, CUDA_DENOISE_THREADS // 32,
                      logits, dict(B=8, L=256, V=126464)))
    return sorted(cases, key=lambda case: CUDA_DENOISE_EXTRA[case[0].split()[-1]]), None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--num-sms", type=int, default=132, help="SMs (H100 SXM: 132)")
    parser.add_argument("--clock-ghz", type=float, default=1.755,
                        help="SM clock for the issue-bound ceiling (H100 SXM under load ~1.755)")
    args = parser.parse_args(argv)

    from triton.backends.compiler import GPUTarget

    import _triton_aot as _aot

    blocker = _aot.compile_blocker()
    if blocker is not None:
        sys.exit(f"sass_report: cannot compile here: {blocker}")
    target = GPUTarget("cuda", args.arch, 32)
    cases = [_denoise_launch(r, args.num_sms) for r in CUDA_DENOISE_EXTRA]
    cases += [_tree_launch(64), _tree_launch(4)]
    rows = []
    print(f"# sm_{args.arch}, static SASS of each streaming loop. Per element streamed by the CTA: "
          f"warp-instructions and MUFU ops; 'ceiling' = the bandwidth at which instruction issue "
          f"(4 warp-instructions per SM per clock) saturates, {args.num_sms} SMs at "
          f"{args.clock_ghz} GHz: a kernel is memory-bound only if this is above the DRAM's.")
    print(f"{'kernel':>28} {'instr':>6} {'MUFU':>5} {'MMA':>4} {'elems':>6} {'warp-ins/el':>11} "
          f"{'MUFU/el':>8} {'ceiling GB/s':>12} {'regs':>5} {'spills':>6}")
    measured = []   # (name, loop body, registers, spill bytes, warps, elements, bytes/elem, shape)
    for launch, elems, bytes_per_elem, name, shape in cases:
        compiled = _aot.compile_launch(launch, target)
        loops = _aot.sass_loops(compiled)
        if not loops:
            raise RuntimeError(f"{name}: no loop found in the SASS")
        # the streaming loop: the largest innermost loop that loads from global memory
        innermost = [loop for loop in loops if loop.by_opcode.get("LDG", 0)
                     and not any(loop.contains(other) for other in loops)]
        body = max(innermost or loops, key=lambda loop: loop.instructions)
        usage = _aot.resource_usage(compiled)
        measured.append((name, body, usage.registers,
                         usage.spill_store_bytes + usage.spill_load_bytes,
                         launch.kwargs["num_warps"], elems, bytes_per_elem, shape))
    cuda_cases, why_not = _cuda_denoise_cases(args.arch)
    if why_not is not None:
        print(f"# csrc/denoise.cu skipped: {why_not}")
    measured += [(name, body, regs, spills, warps, elems, 2, shape)
                 for name, body, regs, spills, warps, elems, shape in cuda_cases]
    for name, body, registers, spill_bytes, warps, elems, bytes_per_elem, shape in measured:
        ops = body.by_opcode
        warp_instr = body.instructions * warps / elems          # per element of the CTA
        mufu = ops.get("MUFU", 0) * warps * 32 / elems          # thread-level MUFU ops per element
        mma = sum(n for op, n in ops.items() if op in ("HMMA", "HGMMA", "WGMMA"))
        ceiling = bytes_per_elem / (warp_instr / 4) * args.num_sms * args.clock_ghz
        rows.append(dict(device=f"sm_{args.arch} (static SASS)", provider=name, **shape,
                         num_warps=warps, loop_instructions=body.instructions,
                         elements_per_iteration=elems, bytes_per_element=bytes_per_elem,
                         warp_instructions_per_element=warp_instr, mufu_per_element=mufu,
                         mma_per_iteration=mma, issue_ceiling_gbps=ceiling,
                         registers=registers, spill_bytes=spill_bytes, opcodes=ops))
        print(f"{name:>28} {body.instructions:>6} {ops.get('MUFU', 0):>5} {mma:>4} {elems:>6} "
              f"{warp_instr:>11.3f} {mufu:>8.2f} {ceiling:>12.0f} {registers:>5} "
              f"{spill_bytes:>6}")
    path = os.path.join(RESULTS, "sass_report.json")
    write_results(path, rows, key_fields=("device", "provider"))
    print(f"# wrote {path}")


if __name__ == "__main__":
    main()
