"""TreeAttentionWrapper (plan / run over fixed buffers): trees, cache layouts step by step,
capacities, CUDA graphs, and the torch backend's plan.

Triton kernels run in Triton's CPU interpreter without a GPU (TRITON_INTERPRET=1, set before
anything imports triton); the CUDA-graph tests need a GPU and skip without one.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import random  # noqa: E402

import pytest  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import a2r_kernels as ak  # noqa: E402
from a2r_kernels import reference  # noqa: E402
from _attention_helpers import (BACKENDS, DEVICE, KERNEL_BACKENDS, _backend_or_skip,  # noqa: E402
                                _pool, _wrapper, check_close, random_tree)


def _buffers(w):
    return {name: getattr(w, name).data_ptr() for name in (
        "work_info", "row_seq", "page_table", "merge_indptr", "merge_rows", "seq_lens",
        "partial_o", "partial_lse", "lse", "workspace")}


# (dtype, (Hq, Hkv), block_size): every dtype, GQA group 1 / 4 / 8 and block size 1 / 16 / 32
# at least twice each.
WRAPPER_CASES = [
    (torch.float32, (4, 4), 1), (torch.float16, (8, 2), 16), (torch.bfloat16, (8, 1), 32),
    (torch.float32, (8, 2), 32), (torch.bfloat16, (3, 3), 16), (torch.float16, (16, 2), 1),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", WRAPPER_CASES,
                         ids=lambda c: f"{str(c[0])[6:]}-{c[1][0]}/{c[1][1]}-bs{c[2]}")
def test_three_trees_through_one_wrapper_and_one_out(backend, case):
    """Three random trees planned into the same wrapper, run into the same out buffer: each step
    equals the per-path reference; no buffer is reallocated by a plan."""
    _backend_or_skip(backend)
    dtype, (hq, hkv), bs = case
    d = 40 if dtype == torch.float32 else 64
    rng = random.Random(WRAPPER_CASES.index(case))
    trees = [random_tree(rng, rng.randint(3, 8), rng.randint(2, 3), bs,
                         lengths=(0, 1, 7, 33)) for _ in range(3)]
    k, v = _pool(max(t[3] for t in trees), bs, hkv, d, dtype, seed=1)
    w = _wrapper(backend, hq, hkv, d, bs, dtype)
    before = _buffers(w)
    out = torch.empty(8, hq, d, dtype=dtype, device=DEVICE)
    sizes = []
    for step, (paths, tables, lengths, _) in enumerate(trees):
        layout = ak.TreeLayout.from_paths(paths, tables, lengths, bs, DEVICE)
        w.plan(layout)
        g = torch.Generator().manual_seed(step)
        q = torch.randn(len(paths), hq, d, generator=g).to(dtype).to(DEVICE)
        got, lse = w.run(q, k, v, out=out[:len(paths)], return_lse=True)
        assert got.data_ptr() == out.data_ptr()
        ref_out, ref_lse = reference.tree_decode_attention_by_path(q, k, v, layout, d ** -0.5)
        check_close(got, lse, ref_out, ref_lse, dtype)
        assert _buffers(w) == before
        sizes.append((layout.num_work, layout.num_partials, layout.num_seqs))
    assert len(set(sizes)) > 1, "the three steps should have different plans"


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_stale_work_items_of_a_larger_plan_are_cleared(backend):
    """A big plan then a small one: the small step must not run the big one's leftover items."""
    _backend_or_skip(backend)
    bs, hq, hkv, d, dtype = 4, 4, 2, 32, torch.float32
    k, v = _pool(40, bs, hkv, d, dtype, seed=2)
    w = _wrapper(backend, hq, hkv, d, bs, dtype)
    big = ak.TreeLayout.from_paths([[0, i + 1] for i in range(6)],
                                   [[0, 1, 2]] + [[3 + i] for i in range(6)], [10] + [3] * 6, bs,
                                   DEVICE, kv_chunk_size=4)
    small = ak.TreeLayout.from_paths([[0], [1]], [[20, 21], [22]], [5, 4], bs, DEVICE)
    q = torch.randn(6, hq, d, device=DEVICE)
    w.plan(big)
    w.run(q, k, v)
    w.plan(small)
    assert big.num_work > small.num_work
    out, lse = w.run(q[:2], k, v, return_lse=True)
    ref_out, ref_lse = reference.tree_decode_attention_by_path(q[:2], k, v, small, d ** -0.5)
    check_close(out, lse, ref_out, ref_lse, dtype)
    assert not w.work_info[small.num_work:].any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_past_the_plan_are_zero_with_neg_inf_lse(backend):
    """A q padded past the planned sequences (a captured batch size): padding rows merge
    nothing."""
    _backend_or_skip(backend)
    bs, hq, hkv, d, dtype = 16, 4, 2, 32, torch.float16
    k, v = _pool(8, bs, hkv, d, dtype, seed=3)
    w = _wrapper(backend, hq, hkv, d, bs, dtype)
    w.plan(ak.TreeLayout.from_paths([[0, 1], [0, 2], [0, 1, 2], [3], [0, 1, 3], [1]],
                                    [[0, 1], [2], [3], [4]], [20, 9, 16, 3], bs, DEVICE))
    w.run(torch.randn(6, hq, d, device=DEVICE).to(dtype), k, v)
    layout = ak.TreeLayout.from_paths([[0, 1], [0]], [[0, 1], [2]], [20, 9], bs, DEVICE)
    w.plan(layout)
    q = torch.randn(5, hq, d, device=DEVICE).to(dtype)
    out, lse = w.run(q, k, v, return_lse=True)
    ref_out, ref_lse = reference.tree_decode_attention_by_path(q[:2], k, v, layout, d ** -0.5)
    check_close(out[:2], lse[:2], ref_out, ref_lse, dtype)
    assert torch.equal(out[2:].float().cpu(), torch.zeros(3, hq, d))
    assert torch.isneginf(lse[2:]).all()


@pytest.mark.skipif(DEVICE != "cpu", reason="counts CPU allocations")
@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_run_with_out_allocates_nothing_on_cpu(backend):
    """torch's profiler records every CPU allocation: none inside run(out=...)."""
    _backend_or_skip(backend)
    bs, hq, hkv, d, dtype = 16, 8, 2, 64, torch.bfloat16
    k, v = _pool(10, bs, hkv, d, dtype, seed=4)
    w = _wrapper(backend, hq, hkv, d, bs, dtype)
    layout = ak.TreeLayout.from_paths([[0, 1], [0, 2], [0]], [[0, 1, 2], [3], [4, 5]],
                                      [40, 16, 17], bs, DEVICE)
    w.plan(layout)
    q = torch.randn(3, hq, d).to(dtype)
    out = torch.empty_like(q)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _, lse = w.run(q, k, v, out=out, return_lse=True)
    allocations = [(e.name, e.cpu_memory_usage) for e in prof.events() if e.cpu_memory_usage > 0]
    assert allocations == []
    assert w.lse.data_ptr() <= lse.data_ptr() < w.lse.data_ptr() + w.lse.nbytes
    ref_out, ref_lse = reference.tree_decode_attention_by_path(q, k, v, layout, d ** -0.5)
    check_close(out, lse, ref_out, ref_lse, dtype)


def test_plan_over_capacity_names_the_capacity():
    bs = 4
    w = ak.TreeAttentionWrapper(2, 1, 16, bs, max_seqs=2, max_nodes=3, max_blocks=8, max_work=4,
                                max_partials=5, dtype=torch.float32, device=DEVICE,
                                backend="torch")
    ok = ak.TreeLayout.from_paths([[0, 1], [0, 2]], [[0], [1], [2]], [4, 4, 4], bs, DEVICE)
    assert (ok.num_work, ok.num_partials) == (3, 4)
    w.plan(ok)
    over = {
        "max_seqs": ([[0], [0], [0]], [[0]], [4], {}),
        "max_nodes": ([[0, 1], [2, 3]], [[0], [1], [2], [3]], [1, 1, 1, 1], {}),
        "max_blocks": ([[0]], [list(range(9))], [36], {}),
        "max_work": ([[0]], [list(range(5))], [20], {"kv_chunk_size": 4}),
        "max_partials": ([[0], [0]], [[0, 1, 2]], [12], {"kv_chunk_size": 4,
                                                         "max_seqs_per_item": 2}),
    }
    for name, (paths, tables, lengths, kw) in over.items():
        layout = ak.TreeLayout.from_paths(paths, tables, lengths, bs, DEVICE, **kw)
        with pytest.raises(ValueError, match=name):
            w.plan(layout)
        assert w.layout is ok   # nothing changed
    with pytest.raises(ValueError, match="block_size"):
        w.plan(ak.TreeLayout.from_paths([[0]], [[0]], [3], 8, DEVICE))
    with pytest.raises(ValueError, match="layout must be"):
        w.plan("step")


def test_wrapper_bad_arguments():
    kw = dict(max_seqs=2, max_nodes=2, max_blocks=2, dtype=torch.float32, device=DEVICE)
    with pytest.raises(ValueError, match="num_kv_heads"):
        ak.TreeAttentionWrapper(3, 2, 16, 4, **kw)
    with pytest.raises(ValueError, match="max_seqs"):
        ak.TreeAttentionWrapper(2, 1, 16, 4, **{**kw, "max_seqs": 0})
    with pytest.raises(ValueError, match="dtype"):
        ak.TreeAttentionWrapper(2, 1, 16, 4, **{**kw, "dtype": torch.int32})
    with pytest.raises(ValueError, match="workspace"):
        ak.TreeAttentionWrapper(2, 1, 16, 4, **kw, workspace=torch.empty(3, device=DEVICE))
    with pytest.raises(ak.BackendUnavailable):
        ak.TreeAttentionWrapper(2, 1, 16, 4, **{**kw, "device": "cpu"}, backend="cuda")
    w = ak.TreeAttentionWrapper(2, 1, 16, 4, **kw, backend="torch")
    q = torch.zeros(1, 2, 16, device=DEVICE)
    k = torch.zeros(3, 4, 1, 16, device=DEVICE)
    with pytest.raises(ValueError, match="run before plan"):
        w.run(q, k, k)
    w.plan(ak.TreeLayout.from_paths([[0]], [[2]], [3], 4, DEVICE))
    with pytest.raises(ValueError, match="k_cache has only"):
        w.run(q, k[:2], k[:2])
    with pytest.raises(ValueError, match="q must be"):
        w.run(q.half(), k.half(), k.half())
    with pytest.raises(ValueError, match="q must be"):
        w.run(torch.zeros(1, 4, 16, device=DEVICE), k, k)
    with pytest.raises(ValueError, match="out must be"):
        w.run(q, k, k, out=torch.zeros(2, 2, 16, device=DEVICE))
    with pytest.raises(ValueError, match="lse must be"):
        w.run(q, k, k, lse=torch.zeros(1, 4, device=DEVICE)[:, ::2])
    with pytest.raises(ValueError, match="lse must be"):
        w.run(q, k, k, lse=torch.zeros(1, 2, device=DEVICE, dtype=torch.float16))


def test_caller_workspace_is_used():
    numel = ak.TreeAttentionWrapper.workspace_numel(4, 16, max_seqs=3, max_partials=10)
    workspace = torch.empty(numel + 5, device=DEVICE)
    w = ak.TreeAttentionWrapper(4, 2, 16, 4, max_seqs=3, max_nodes=4, max_blocks=8,
                                max_partials=10, dtype=torch.float32, device=DEVICE,
                                backend="torch", workspace=workspace)
    base, end = workspace.data_ptr(), workspace.data_ptr() + workspace.nbytes
    for t in (w.partial_o, w.partial_lse, w.lse):
        assert base <= t.data_ptr() and t.data_ptr() + t.nbytes <= end


# ------------------------------------------------------------------------- CUDA graphs (GPU)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_cuda_graph_capture_replan_replay(backend):
    """run captured once in a torch.cuda.CUDAGraph; three later plans replayed against eager;
    run allocates no device memory."""
    _backend_or_skip(backend)
    bs, hq, hkv, d, dtype = 16, 32, 8, 128, torch.bfloat16
    rng = random.Random(7)
    trees = [random_tree(rng, 8, 3, bs, lengths=(0, 1, 17, 100, 300)) for _ in range(4)]
    k, v = _pool(max(t[3] for t in trees), bs, hkv, d, dtype, seed=5)
    w = ak.TreeAttentionWrapper(hq, hkv, d, bs, max_seqs=8, max_nodes=64, max_blocks=1024,
                                dtype=dtype, device=DEVICE, backend=backend)
    q = torch.zeros(8, hq, d, dtype=dtype, device=DEVICE)
    out = torch.zeros_like(q)

    def layout_of(tree):
        paths, tables, lengths, _ = tree
        paths = (paths + [[]] * 8)[:8]          # the captured batch: 8 rows
        return ak.TreeLayout.from_paths(paths, tables, lengths, bs, DEVICE)

    w.plan(layout_of(trees[0]))
    w.run(q, k, v, out=out)                     # warm-up: compile outside the capture
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()["allocation.all.allocated"]
    w.run(q, k, v, out=out)
    torch.cuda.synchronize()
    assert torch.cuda.memory_stats()["allocation.all.allocated"] == before
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        w.run(q, k, v, out=out)
    for step, tree in enumerate(trees[1:]):
        layout = layout_of(tree)
        torch.cuda.synchronize()
        before = torch.cuda.memory_stats()["allocation.all.allocated"]
        w.plan(layout)                          # host staging + one copy: no device allocation
        torch.cuda.synchronize()
        assert torch.cuda.memory_stats()["allocation.all.allocated"] == before
        q.copy_(torch.randn(8, hq, d, generator=torch.Generator().manual_seed(step)).to(dtype))
        graph.replay()
        eager = ak.tree_decode_attention(q, k, v, layout, backend=backend)
        torch.testing.assert_close(out, eager, atol=1.6e-2, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cache_layouts_step_by_step(backend):
    """Decode steps of a TreeKVCache tree, each planned into one wrapper (the page table copied
    from the cache's device block tables), equal the reference."""
    _backend_or_skip(backend)
    bs, hq, hkv, d, dtype = 4, 4, 2, 16, torch.float32
    cache = ak.TreeKVCache(1, hkv, d, num_blocks=64, block_size=bs, dtype=dtype, device=DEVICE)
    g = torch.Generator().manual_seed(0)

    def append(seqs, n):
        slots = cache.reserve(seqs, n)
        kv = torch.randn(2, slots.numel(), hkv, d, generator=g).to(DEVICE)
        cache.write(0, slots, kv[0], kv[1])

    root = cache.new_sequence()
    append([root], 9)
    kids = cache.fork(root, 3)
    w = _wrapper(backend, hq, hkv, d, bs, dtype, max_blocks=cache.block_table_capacity)
    for step in range(4):
        if step == 2:
            kids = kids[:2] + cache.fork(kids[2], 2)
        append(kids, 2 if step == 0 else 1)
        layout = cache.layout(kids)
        w.plan(layout)
        q = torch.randn(len(kids), hq, d, generator=g).to(DEVICE)
        out, lse = w.run(q, cache.k[0], cache.v[0], return_lse=True)
        ref_out, ref_lse = reference.tree_decode_attention_by_path(q, cache.k[0], cache.v[0],
                                                                   layout, d ** -0.5)
        check_close(out, lse, ref_out, ref_lse, dtype)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_cuda_graph_over_cache_layouts(backend):
    """A decode loop as an engine runs it: cache.layout + plan per step outside the graph, one
    captured run replayed; the page table comes from the cache's device block tables."""
    _backend_or_skip(backend)
    bs, hq, hkv, d, dtype = 16, 8, 2, 64, torch.float16
    cache = ak.TreeKVCache(1, hkv, d, num_blocks=256, block_size=bs, dtype=dtype, device=DEVICE)
    g = torch.Generator(device=DEVICE).manual_seed(0)

    def append(seqs, n):
        slots = cache.reserve(seqs, n)
        kv = torch.randn(2, slots.numel(), hkv, d, generator=g, device=DEVICE).to(dtype)
        cache.write(0, slots, kv[0], kv[1])

    root = cache.new_sequence()
    append([root], 300)
    kids = cache.fork(root, 6)
    append(kids, 1)
    w = ak.TreeAttentionWrapper(hq, hkv, d, bs, max_seqs=6, max_nodes=8,
                                max_blocks=cache.block_table_capacity, dtype=dtype,
                                device=DEVICE, backend=backend)
    q = torch.zeros(6, hq, d, dtype=dtype, device=DEVICE)
    out = torch.zeros_like(q)
    w.plan(cache.layout(kids))
    w.run(q, cache.k[0], cache.v[0], out=out)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        w.run(q, cache.k[0], cache.v[0], out=out)
    for step in range(20):                     # leaves cross block boundaries and move regions
        append(kids, 1)
        layout = cache.layout(kids)
        w.plan(layout)
        q.copy_(torch.randn(6, hq, d, generator=g, device=DEVICE).to(dtype))
        graph.replay()
        ref_out, ref_lse = reference.tree_decode_attention_by_path(q, cache.k[0], cache.v[0],
                                                                   layout, d ** -0.5)
        torch.testing.assert_close(out.float(), ref_out, atol=2e-3, rtol=0)


def test_default_capacities_hold_the_plans_they_promise():
    """default_capacities(max_seqs, max_nodes, max_blocks) holds the default plan of any
    two-level tree (random trees, explorer trees up to N=1000, P=100k) of that size."""
    from a2r_kernels.wrapper import default_capacities

    def fits(paths, tables, lengths, bs):
        layout = ak.TreeLayout.from_paths(paths, tables, lengths, bs)
        max_work, max_partials = default_capacities(len(paths), len(lengths),
                                                    sum(map(len, tables)), bs)
        return layout.num_work <= max_work and layout.num_partials <= max_partials

    for seed in range(100):
        rng = random.Random(seed)
        bs = rng.choice([1, 4, 16, 32])
        paths, tables, lengths, _ = random_tree(rng, rng.randint(1, 64), 2, bs,
                                                lengths=(0, 1, 17, 300, 5000))
        assert fits(paths, tables, lengths, bs), seed
    for n in (1, 4, 16, 64, 256, 1000):
        for prefix in (0, 15, 512, 8192, 100000):
            for bs in (1, 16):
                blocks = -(-prefix // bs)
                assert fits([[0, 1 + i] for i in range(n)], [list(range(blocks))] + [[0]] * n,
                            [prefix] + [bs] * n, bs), (n, prefix, bs)


# ------------------------------------------------------------------ the torch backend's plan
def _torch_step(plan, cache, seqs, g, hq=4):
    """Plan the step of ``seqs`` (their tokens reserved and written) and check it against the
    per-path reference; returns the plan's slots."""
    layout = cache.layout(seqs)
    plan.plan(layout)
    q = torch.randn(len(seqs), hq, cache.head_dim, generator=g).to(DEVICE)
    lse = torch.empty(len(seqs), hq, device=DEVICE)
    out = plan.run(q, cache.k[0], cache.v[0], cache.head_dim ** -0.5, lse=lse)
    ref_out, ref_lse = reference.tree_decode_attention_by_path(q, cache.k[0], cache.v[0], layout,
                                                               cache.head_dim ** -0.5)
    check_close(out, lse, ref_out, ref_lse, torch.float32)
    return plan.slots.tolist()


def test_torch_plan_advances_and_refuses_a_moved_token():
    """The torch backend's plan appends the new tokens of the next step of the same rows (its
    keys so far unchanged). Issue 20 item 1: after a step's tokens are given back and appended
    again in the other order (so the rows swap the blocks those tokens opened), the next step
    grows every row by one token again, yet the plan must not advance from the given-back
    slots: it plans from scratch, and both equal the reference."""
    from a2r_kernels.torch_decode import TorchDecodePlan

    bs, hkv, d = 4, 2, 16
    cache = ak.TreeKVCache(1, hkv, d, num_blocks=32, block_size=bs, dtype=torch.float32,
                           device=DEVICE)
    g = torch.Generator().manual_seed(5)

    def append(seqs, n=1):
        slots = cache.reserve(seqs, n)
        kv = torch.randn(2, slots.numel(), hkv, d, generator=g).to(DEVICE)
        cache.write(0, slots, kv[0], kv[1])

    root = cache.new_sequence()
    append([root], 7)
    a, b = cache.fork(root, 2)
    append([a, b], 3)
    plan = TorchDecodePlan(torch.float32, DEVICE)
    append([a, b])                    # a, b hold 4 tokens each: a full block
    first = _torch_step(plan, cache, [a, b], g)
    append([a, b])                    # the next step: each row's token opens a block
    second = _torch_step(plan, cache, [a, b], g)
    assert second[:len(first)] == first and len(second) == len(first) + 2   # advanced
    cache.unreserve([a, b], 1)        # the step is given back ...
    append([b, a])                    # ... and appended in the other order: the blocks swap
    append([a, b])                    # the next step: one more token each
    third = _torch_step(plan, cache, [a, b], g)
    assert third[:len(second)] != second   # planned from scratch


def test_deep_trees_fit_the_capacities_of_their_path_nodes():
    """default_capacities(..., path_nodes=P) holds the default plan of any tree whose paths have
    P nodes together (the derivation in its docstring): random trees up to 7 levels deep, chains
    of short nodes read by every sequence (the worst case for partial rows), wide long nodes
    (several work items per chunk)."""
    from a2r_kernels.wrapper import default_capacities

    def check(paths, tables, lengths, bs):
        layout = ak.TreeLayout.from_paths(paths, tables, lengths, bs)
        path_nodes = sum(map(len, paths))
        max_work, max_partials = default_capacities(len(paths), len(lengths),
                                                    layout.num_page_entries, bs,
                                                    path_nodes=path_nodes)
        assert layout.num_work <= max_work and layout.num_partials <= max_partials, \
            (layout.num_work, max_work, layout.num_partials, max_partials)

    for seed in range(150):
        rng = random.Random(seed)
        bs = rng.choice([1, 4, 16, 32])
        paths, tables, lengths, _ = random_tree(rng, rng.randint(1, 48), rng.randint(1, 7), bs,
                                                lengths=(0, 1, 17, 300, 600, 5000))
        check(paths, tables, lengths, bs)
    for seqs in (1, 15, 16, 17, 40, 100):
        for depth in (1, 3, 8):
            for length in (1, 16, 255, 513, 4097, 20000):
                bs = 16
                blocks = -(-length // bs)
                tables = [list(range(blocks)) for _ in range(depth)] + [[0]] * seqs
                paths = [list(range(depth)) + [depth + i] for i in range(seqs)]
                check(paths, tables, [length] * depth + [1] * seqs, bs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deep_tree_of_the_issue_fits_when_sized_by_path_nodes(backend):
    """16 paths of 7 nodes (a chain of 6 shared by all), 22 nodes of 1 token, block size 1: the
    default capacities (2 path nodes per sequence) refuse it, naming max_partials and how to size
    it; sized by its 112 path nodes it plans and runs like tree_decode_attention."""
    from a2r_kernels.wrapper import default_capacities

    _backend_or_skip(backend)
    paths = [[0, 1, 2, 3, 4, 5, 6 + i] for i in range(16)]
    layout = ak.TreeLayout.from_paths(paths, [[j] for j in range(22)], [1] * 22, 1, DEVICE)
    hq, hkv, d = 4, 2, 16
    geometry = dict(max_seqs=16, max_nodes=22, max_blocks=22, dtype=torch.float32,
                    device=DEVICE, backend=backend)
    default = ak.TreeAttentionWrapper(hq, hkv, d, 1, **geometry)
    with pytest.raises(ValueError, match=r"max_partials=56 .*path_nodes=112"):
        default.plan(layout)
    max_work, max_partials = default_capacities(16, 22, 22, 1, path_nodes=112)
    w = ak.TreeAttentionWrapper(hq, hkv, d, 1, max_work=max_work, max_partials=max_partials,
                                **geometry)
    w.plan(layout)
    k_cache, v_cache = _pool(22, 1, hkv, d, torch.float32, seed=3)
    q = torch.randn(16, hq, d, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    expected = ak.tree_decode_attention(q, k_cache, v_cache, layout, backend="torch")
    torch.testing.assert_close(w.run(q, k_cache, v_cache), expected, atol=1e-5, rtol=1e-5)


def _kernel_read_tokens(layout) -> int:
    """Tokens the tree kernel reads, from its work items: each item's KV range, except an item
    that continues the previous one over the same chunk for the next sequences of its run (the
    groups of a run are adjacent items and read the chunk once)."""
    tokens, previous = 0, None
    for q_start, q_len, page_start, kv_start, kv_end, _ in layout.work_info.tolist():
        continues = previous is not None and previous[2:5] == [page_start, kv_start, kv_end] \
            and previous[0] + previous[1] == q_start
        tokens += 0 if continues else kv_end - kv_start
        previous = [q_start, q_len, page_start, kv_start, kv_end]
    return tokens


def test_kv_bytes_shared_is_what_the_kernel_reads():
    """kv_bytes(...)["shared"] is the kernel's read traffic (docs/API.md section 5): block 7 at
    two path positions belongs to two nodes and is read twice (64 tokens, where the distinct
    tokens are 48); a node read by two runs of sequences (paths that are not a tree) is read
    once per run; on random trees and block tables it equals the count from the work items."""
    per_token = 2 * 3 * 8 * 2                                          # Hkv 3, D 8, fp16
    issue = ak.TreeLayout.from_block_tables([[7, 1], [2, 7]], [32, 32], 16)
    assert ak.kv_bytes(issue, 3, 8, torch.float16) == {"shared": 64 * per_token,
                                                       "unshared": 64 * per_token}
    assert _kernel_read_tokens(issue) == 64
    # node 3 (600 tokens, 3 chunks) read by sequences 0 and 2, which sort apart: two runs
    two_runs = ak.TreeLayout.from_paths([[0, 3], [1, 4], [0, 3, 5], [2, 3]],
                                        [[0], [1], [2], list(range(40)), [41], [42]],
                                        [16, 16, 16, 600, 5, 5], 16)
    assert [p for p in sorted(two_runs.paths)] == [[0, 3], [0, 3, 5], [1, 4], [2, 3]]
    shared = ak.kv_bytes(two_runs, 3, 8, torch.float16)["shared"]
    assert shared == (16 * 3 + 600 * 2 + 5 * 2) * per_token == _kernel_read_tokens(two_runs) * per_token
    for seed in range(60):
        rng = random.Random(seed)
        bs = rng.choice([1, 4, 16])
        if seed % 2:
            paths, tables, lengths, _ = random_tree(rng, rng.randint(1, 40), rng.randint(1, 4),
                                                    bs, lengths=(0, 1, 17, 300, 700))
            if seed % 4 == 1:   # not a tree: some sequences read a node under another prefix
                shared_node = rng.randrange(len(lengths))
                paths = [path if rng.random() < 0.6 or shared_node in path
                         else path + [shared_node] for path in paths]
            layout = ak.TreeLayout.from_paths(paths, tables, lengths, bs)
        else:
            num_seqs, width = rng.randint(1, 12), rng.randint(1, 6)
            table = [[rng.randrange(8) for _ in range(width)] for _ in range(num_seqs)]
            lens = [rng.randint(0, width * bs) for _ in range(num_seqs)]
            layout = ak.TreeLayout.from_block_tables(table, lens, bs)
        expected = _kernel_read_tokens(layout) * per_token
        assert ak.kv_bytes(layout, 3, 8, torch.float16)["shared"] == expected, seed
