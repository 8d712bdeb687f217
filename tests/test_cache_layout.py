"""TreeKVCache.layout: the plan of a decode step over the cache's nodes (shared bytes, the
attention reference, snapshots of the step, per-path slots), on the CPU and CUDA, and the device
block tables it reads by reference.
"""

import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import a2r_kernels as ak

from _cache_helpers import DIM, HEADS, append, assert_reads_back, make_cache, token_kv


# ---------------------------------------------------------------------------- layout
def test_layout_shared_bytes_below_unshared_and_chunk_passthrough():
    cache = make_cache(num_blocks=64, block_size=4)
    root = cache.new_sequence()
    cache.reserve([root], 30)
    kids = cache.fork(root, 4)
    cache.reserve(kids, 3)
    layout = cache.layout(kids, kv_chunk_size=8)
    assert isinstance(layout, ak.TreeLayout)
    assert layout.kv_chunk_size == 8 and layout.num_seqs == 4
    assert layout.seq_lens.tolist() == [33] * 4
    bytes_ = layout.kv_bytes(HEADS, DIM, cache.dtype)
    assert bytes_["shared"] == (30 + 4 * 3) * 2 * HEADS * DIM * 4
    assert bytes_["unshared"] == 4 * 33 * 2 * HEADS * DIM * 4
    # The root node is split into ceil(30 / 8) chunks, each read once for all 4 children.
    root_items = [w for w in layout.work_info.tolist() if w[1] == 4]
    assert len(root_items) == 4
    assert cache.layout([]).num_seqs == 0


def test_layout_against_attention_reference():
    """The layout drives the torch tree attention to the same result as attending over gather."""
    torch.manual_seed(0)
    cache = make_cache(num_blocks=32, block_size=4, num_layers=1)
    root = cache.new_sequence()
    slots = cache.reserve([root], 9)
    cache.write(0, slots, torch.randn(9, HEADS, DIM), torch.randn(9, HEADS, DIM))
    kids = cache.fork(root, 3)
    slots = cache.reserve(kids, 2)
    cache.write(0, slots, torch.randn(6, HEADS, DIM), torch.randn(6, HEADS, DIM))
    seqs = [kids[2], root, kids[0]]
    q = torch.randn(len(seqs), 2 * HEADS, DIM)
    out = ak.tree_decode_attention(q, cache.k[0], cache.v[0], cache.layout(seqs), backend="torch")
    for i, seq in enumerate(seqs):
        k, v = cache.gather(0, seq)
        k = k.repeat_interleave(2, dim=1)              # GQA: q head h reads kv head h // 2
        v = v.repeat_interleave(2, dim=1)
        scores = torch.einsum("hd,thd->ht", q[i], k) * DIM ** -0.5
        expected = torch.einsum("ht,thd->hd", scores.softmax(-1), v)
        torch.testing.assert_close(out[i], expected, rtol=1e-5, atol=1e-5)


PLAN_TENSORS = ("work_info", "row_seq", "page_table", "merge_indptr", "merge_rows", "seq_lens")


def blocks_read(layout):
    """Per work item, the block ids it reads: what the kernels see through page_start, whether
    the layout concatenates its tables or reads the cache's device block tables by reference."""
    pages = layout.page_table.tolist()
    bs = layout.block_size
    return [pages[w[2] + w[3] // bs:w[2] + -(-w[4] // bs)] for w in layout.work_info.tolist()]


def assert_same_plan(a, b):
    """Two TreeLayouts hold the same plan: same inputs, same int32 tensors, same scalars, and
    work items that read the same blocks (page_start may point into different page tables)."""
    for name in ("paths", "node_block_tables", "node_lengths", "block_size", "kv_chunk_size",
                 "num_partials", "max_block_id", "max_seq_len", "max_q_len"):
        assert getattr(a, name) == getattr(b, name), name
    for name in PLAN_TENSORS:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype == torch.int32 and x.device == y.device, name
        assert x.is_contiguous(), name
        if name == "work_info":
            x, y = x[:, [0, 1, 3, 4, 5]], y[:, [0, 1, 3, 4, 5]]
        if name != "page_table":
            assert torch.equal(x, y), name
        # The tensors share one buffer; each slice keeps the 16-byte alignment Triton expects.
        assert x.numel() == 0 or x.data_ptr() % 16 == 0, name
    assert blocks_read(a) == blocks_read(b)


def test_layout_is_a_snapshot_of_the_step():
    """A layout keeps the blocks and lengths of the step it was built for, whatever the cache
    does afterwards (it must not alias the cache's growing block lists)."""
    cache = make_cache(num_blocks=64, block_size=4)
    root = cache.new_sequence()
    cache.reserve([root], 6)
    kids = cache.fork(root, 3)
    cache.reserve(kids, 4)
    layout = cache.layout(kids)
    before = ([list(t) for t in layout.node_block_tables], list(layout.node_lengths),
              blocks_read(layout), layout.seq_slots().clone())
    cache.reserve(kids, 5)   # every kid's node gets more tokens and a new block
    cache.free(kids[1])
    assert [list(t) for t in layout.node_block_tables] == before[0]
    assert layout.node_lengths == before[1]
    assert blocks_read(layout) == before[2]   # the device tables it reads by reference
    assert_same_plan(layout, ak.TreeLayout.from_paths(layout.paths, before[0], before[1], 4))
    assert_same_plan(layout.to("cpu"), layout)
    assert torch.equal(layout.seq_slots(), before[3])


@st.composite
def random_trees(draw):
    """A random tree of sequences, as a list of ops to replay on a cache."""
    ops = []
    num_live = 0
    for _ in range(draw(st.integers(1, 12))):
        kinds = ["new", "fork", "grow", "grow", "free"] if num_live else ["new"]
        kind = draw(st.sampled_from(kinds))
        if kind == "new":
            ops.append(("new",))
            num_live += 1
        elif kind == "fork":
            ops.append(("fork", draw(st.integers(0, 10**6)), draw(st.integers(1, 3))))
            num_live += ops[-1][2]
        elif kind == "grow":
            ops.append(("grow", draw(st.integers(0, 10**6)), draw(st.integers(0, 6))))
        else:
            ops.append(("free", draw(st.integers(0, 10**6))))
            num_live -= 1
    return ops, draw(st.integers(1, 5)), draw(st.randoms(use_true_random=False))


@settings(max_examples=60, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(random_trees())
def test_layout_seq_slots_match_path_slots(tree):
    ops, block_size, rng = tree
    cache = make_cache(num_blocks=200, block_size=block_size, num_layers=1)
    live, growable = [], []
    for op in ops:
        if op[0] == "new":
            seq = cache.new_sequence()
            live.append(seq)
            growable.append(seq)
        elif op[0] == "fork" and live:
            parent = live[op[1] % len(live)]
            kids = cache.fork(parent, op[2])
            if parent in growable:
                growable.remove(parent)
            live += kids
            growable += kids
        elif op[0] == "grow" and growable:
            cache.reserve([growable[op[1] % len(growable)]], op[2])
        elif op[0] == "free" and live:
            seq = live.pop(op[1] % len(live))
            if seq in growable:
                growable.remove(seq)
            cache.free(seq)
    seqs = rng.sample(live, k=len(live))
    if seqs:
        seqs.append(seqs[0])   # a sequence listed twice gets two identical rows
    layout = cache.layout(seqs, kv_chunk_size=2 * block_size)
    assert layout.seq_lens.tolist() == [cache.length(s) for s in seqs]
    # cache.layout plans without from_paths' checks: the plan must be the one from_paths makes.
    assert_same_plan(layout, ak.TreeLayout.from_paths(
        layout.paths, layout.node_block_tables, layout.node_lengths, block_size,
        kv_chunk_size=2 * block_size))
    seq_slots = layout.seq_slots()
    for i, seq in enumerate(seqs):
        row = seq_slots[i]
        expected = cache.path_slots(seq)
        assert torch.equal(row[: expected.numel()], expected)
        assert (row[expected.numel():] == -1).all()


# ---------------------------------------------------------------------------- CUDA
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_roundtrip_and_layout_device():
    cache = make_cache(num_blocks=16, block_size=4, dtype=torch.bfloat16, device="cuda")
    assert cache.device.type == "cuda"
    model = {}
    root = cache.new_sequence()
    model[root] = []
    slots = append(cache, [root], [list(range(6))], model)
    assert slots.device == cache.device
    kids = cache.fork(root, 2)
    for kid in kids:
        model[kid] = list(model[root])
    append(cache, kids, [[40, 41, 42], [60, 61, 62]], model)
    for seq in model:
        assert_reads_back(cache, seq, model[seq])
    assert cache.layout(kids).work_info.device == cache.device
    with pytest.raises(ValueError, match="slots must be on"):
        cache.write(0, slots.cpu(), *token_kv(range(6), torch.bfloat16, "cuda"))


# ------------------------------------------------------------------ device block tables
@pytest.mark.parametrize("seed", range(3))
def test_layout_reads_the_device_block_tables_by_reference(seed):
    """Layouts of many steps (forks, growth in place and by moving, unreserve, frees, fresh
    arenas) read the blocks from_paths would, from the cache's arena without copying the
    tables; a layout keeps reading its step's blocks while the cache goes on."""
    rng = random.Random(seed)
    cache = make_cache(num_blocks=40, block_size=2, num_layers=1)
    live = [cache.new_sequence()]
    cache.reserve(live, 3)
    arenas, kept = set(), []
    for step in range(60):
        action = rng.random()
        while cache.num_free_blocks < 12:    # keep room: free the oldest, restart when empty
            cache.free(live.pop(0))
            if not live:
                live = [cache.new_sequence()]
        growable = [s for s in live if not cache.is_forked(s)]
        if action < 0.15 and len(live) < 6:
            live += cache.fork(rng.choice(live), rng.randint(1, 2))
        elif action < 0.25 and len(live) > 1:
            cache.free(live.pop(rng.randrange(len(live))))
        elif action < 0.35 and growable:
            seq = rng.choice(growable)
            cache.reserve([seq], 3)
            cache.layout(live)               # a step whose forward fails:
            cache.unreserve([seq], 3)       # blocks popped, the arena copy must be rewritten
            other = [s for s in growable if s != seq]
            if other:                        # someone else takes the freed blocks first
                cache.reserve(other[:1], 3)
            cache.reserve([seq], 3)          # as many blocks as before, other ids
        growable = [s for s in live if not cache.is_forked(s)]
        try:
            cache.reserve(growable, rng.randint(1, 3))
        except ak.CacheFullError:
            pass
        layout = cache.layout(live)
        assert layout.page_table.untyped_storage().data_ptr() == \
            cache._tables.arena.untyped_storage().data_ptr()
        arenas.add(cache._tables.arena.untyped_storage().data_ptr())
        assert_same_plan(layout, ak.TreeLayout.from_paths(
            layout.paths, layout.node_block_tables, layout.node_lengths, 2))
        kept.append((layout, blocks_read(layout)))
        for old, read in kept:   # regions are never rewritten below what a layout reads
            assert blocks_read(old) == read
    assert len(arenas) > 1, "the test should also start fresh arenas"
