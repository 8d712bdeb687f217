"""IncrementalTreePlanner (a2r_kernels.incremental_plan) against a fresh from_block_tables plan.

Random vLLM-like step sequences: requests decode one token per step (a fresh block at every
block boundary), new requests join (some sharing an existing request's full prompt blocks, as
prefix caching gives them), requests finish or are preempted (their rows leave; vLLM moves the
last row into the hole), rows are swapped. After every step the incremental plan must read the
same tree as a fresh plan (paths, node tokens, readers, KV bytes), and its work items, run by a
direct interpreter of the int32 plan (what the Triton, CUDA and CPU kernels execute), must give
the reference attention output.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import a2r_kernels as ak
from a2r_kernels import reference
from a2r_kernels import block_table_tree, incremental_plan
from a2r_kernels.incremental_plan import IncrementalTreePlanner
from a2r_kernels.layout import WORK_FIELDS


@pytest.fixture(autouse=True, params=["compiled", "numpy"])
def planner_path(request, monkeypatch):
    """Every test on both planner paths: the C++ one of a2r_kernels._cpu (when built) and the
    numpy reference."""
    if request.param == "numpy":
        for module in (block_table_tree, incremental_plan):
            monkeypatch.setattr(module, "planner_extension", lambda: None)
    elif block_table_tree.planner_extension() is None:
        pytest.skip("a2r_kernels._cpu was not built")
    return request.param


class _Engine:
    """A toy paged engine: a block pool with reference counts, requests as block lists."""

    def __init__(self, rng, block_size: int, width: int, num_blocks: int):
        self.rng, self.block_size, self.width = rng, block_size, width
        self.free = list(range(num_blocks))
        rng.shuffle(self.free)
        self.refs = np.zeros(num_blocks, dtype=np.int64)
        self.rows: list[dict] = []          # batch order: {"blocks": [...], "len": int}

    def _alloc(self) -> int | None:
        if not self.free:
            return None
        block = self.free.pop()
        self.refs[block] = 1
        return block

    def join(self) -> None:
        """A new request: a copy of a random row's full blocks (prefix cache hit) or none, then
        fresh blocks for the rest of its prompt."""
        bs = self.block_size
        blocks: list[int] = []
        if self.rows and self.rng.random() < 0.7:
            donor = self.rows[self.rng.integers(len(self.rows))]
            full = donor["len"] // bs
            blocks = donor["blocks"][:int(self.rng.integers(0, full + 1))]
            for b in blocks:
                self.refs[b] += 1
        length = len(blocks) * bs + int(self.rng.integers(1, 3 * bs))
        if -(-length // bs) > self.width - 2:
            length = len(blocks) * bs + 1
        while len(blocks) * bs < length:
            block = self._alloc()
            if block is None:
                for b in blocks:
                    self._release(b)
                return
            blocks.append(block)
        self.rows.append({"blocks": blocks, "len": length})

    def _release(self, block: int) -> None:
        self.refs[block] -= 1
        if self.refs[block] == 0:
            self.free.append(block)

    def leave(self) -> None:
        """A request finishes or is preempted: its row goes, the last row moves into it."""
        i = int(self.rng.integers(len(self.rows)))
        for b in self.rows[i]["blocks"]:
            self._release(b)
        last = self.rows.pop()
        if i < len(self.rows):
            self.rows[i] = last

    def decode(self) -> None:
        for row in list(self.rows):
            if row["len"] >= self.width * self.block_size:
                continue
            if row["len"] == len(row["blocks"]) * self.block_size:
                block = self._alloc()
                if block is None:
                    continue
                row["blocks"].append(block)
            row["len"] += 1

    def tables(self, garbage: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """int32 [S, W] (entries past a row's blocks hold garbage) and int64 [S]."""
        tables = garbage[:len(self.rows)].copy()
        for i, row in enumerate(self.rows):
            tables[i, :len(row["blocks"])] = row["blocks"]
        return tables, np.array([row["len"] for row in self.rows], dtype=np.int64)


def _structure(layout) -> list:
    """Per row, its nodes as (flat slots of the node's tokens, set of rows reading the node)."""
    readers: dict[int, set] = {}
    for i, path in enumerate(layout.paths):
        for j in path:
            readers.setdefault(j, set()).add(i)
    bs = layout.block_size
    out = []
    for path in layout.paths:
        nodes = []
        for j in path:
            n, table = layout.node_lengths[j], layout.node_block_tables[j]
            if n:
                nodes.append((tuple(table[t // bs] * bs + t % bs for t in range(n)),
                              frozenset(readers[j])))
        out.append(nodes)
    return out


def _run_plan(layout, q, k_cache, v_cache, sm_scale):
    """Execute the layout's int32 plan directly: every work item's partial state over its chunk,
    then the per-sequence LSE merge. Checks that each partial row is written once and merged
    once."""
    work = layout.host_plan("work_info").tolist()
    row_seq = layout.host_plan("row_seq").tolist()
    indptr = layout.host_plan("merge_indptr").tolist()
    merge_rows = layout.host_plan("merge_rows").tolist()
    pages = layout.page_table.cpu()
    assert layout.work_info.shape == (layout.num_work, len(WORK_FIELDS))
    bs, (num_seqs, hq, d) = layout.block_size, q.shape
    group = hq // k_cache.shape[2]
    part_o = torch.zeros(layout.num_partials, hq, d, dtype=torch.float64)
    part_lse = torch.full((layout.num_partials, hq), float("-inf"), dtype=torch.float64)
    written = np.zeros(layout.num_partials, dtype=np.int64)
    for q_start, q_len, page_start, kv_start, kv_end, partial in work:
        t = torch.arange(kv_start, kv_end)
        blocks = pages[page_start + t // bs].long()
        keys = k_cache[blocks, t % bs].double().repeat_interleave(group, 1)     # [T, Hq, D]
        values = v_cache[blocks, t % bs].double().repeat_interleave(group, 1)
        for r in range(q_len):
            seq = row_seq[q_start + r]
            scores = torch.einsum("hd,thd->ht", q[seq].double(), keys) * sm_scale
            lse = torch.logsumexp(scores, -1)
            part_o[partial + r] = torch.einsum("ht,thd->hd", torch.exp(scores - lse[:, None]),
                                               values)
            part_lse[partial + r] = lse
            written[partial + r] += 1
    assert (written == 1).all()
    assert sorted(merge_rows) == list(range(layout.num_partials))
    out = torch.zeros(num_seqs, hq, d, dtype=torch.float64)
    for i in range(num_seqs):
        rows = merge_rows[indptr[i]:indptr[i + 1]]
        if rows:
            lse = torch.logsumexp(part_lse[rows], 0)
            out[i] = (torch.exp(part_lse[rows] - lse)[..., None] * part_o[rows]).sum(0)
    return out


@pytest.mark.parametrize("seed", range(6))
def test_incremental_plan_equals_fresh_plan_over_random_steps(seed):
    rng = np.random.default_rng(seed)
    block_size = int(rng.choice([1, 2, 4]))
    width, num_blocks = 10, 120
    engine = _Engine(rng, block_size, width, num_blocks)
    garbage = rng.integers(0, num_blocks, (40, width)).astype(np.int32)
    planner = IncrementalTreePlanner(block_size, kv_chunk_size=2 * block_size,
                                     max_seqs_per_item=int(rng.integers(1, 4)))
    k_cache = torch.randn(num_blocks, block_size, 2, 8, generator=torch.Generator().manual_seed(seed))
    v_cache = torch.randn_like(k_cache)
    for _ in range(4):
        engine.join()
    for step in range(60):
        event = rng.random()
        if event < 0.1:
            engine.join()
        elif event < 0.17 and len(engine.rows) > 1:
            engine.leave()
        elif event < 0.2 and len(engine.rows) > 1:
            i, j = rng.choice(len(engine.rows), 2, replace=False)
            engine.rows[i], engine.rows[j] = engine.rows[j], engine.rows[i]
        engine.decode()
        tables, lens = engine.tables(garbage)
        layout = planner.plan(tables, lens)
        fresh = ak.TreeLayout.from_block_tables(torch.from_numpy(tables), lens.tolist(),
                                                block_size, kv_chunk_size=2 * block_size)
        assert _structure(layout) == _structure(fresh), step
        per_token = 2 * 2 * 8 * 4
        assert ak.kv_bytes(layout, 2, 8, torch.float32) == ak.kv_bytes(fresh, 2, 8, torch.float32)
        shared, total = planner.kv_tokens()
        assert (shared * per_token, total * per_token) == tuple(
            ak.kv_bytes(fresh, 2, 8, torch.float32).values())
        assert layout.max_block_id == fresh.max_block_id
        for name in ("seq_lens", "row_seq"):      # by row, and a permutation of the rows
            assert sorted(layout.host_plan(name).tolist()) == sorted(fresh.host_plan(name).tolist())
        assert layout.host_plan("seq_lens").tolist() == lens.tolist()
        assert layout.max_seq_len == fresh.max_seq_len and layout.num_seqs == len(lens)
        q = torch.randn(len(lens), 4, 8, generator=torch.Generator().manual_seed(step))
        expected, _ = reference.tree_decode_attention_by_path(q, k_cache, v_cache, fresh, 0.3)
        torch.testing.assert_close(_run_plan(layout, q, k_cache, v_cache, 0.3).float(),
                                   expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ak.tree_decode_attention(q, k_cache, v_cache, layout,
                                                            sm_scale=0.3, backend="torch"),
                                   expected, atol=1e-5, rtol=1e-5)
    # most steps only grew the tails
    assert planner.incremental_steps > planner.replans > 0


def test_block_boundaries_are_incremental_and_joins_replan():
    bs, width = 4, 12
    prompt = list(range(100, 105))                 # 5 shared full blocks
    tables = np.zeros((3, width), dtype=np.int32)
    for i in range(3):
        tables[i, :5] = prompt
    lens = np.full(3, 5 * bs, dtype=np.int64)
    planner = IncrementalTreePlanner(bs)
    planner.plan(tables, lens)
    assert planner.replans == 1
    next_block = 10
    for step in range(3 * bs):
        lens += 1
        for i in range(3):                         # a fresh block at each boundary
            if lens[i] > bs * np.count_nonzero(tables[i]):
                tables[i, (lens[i] - 1) // bs] = next_block
                next_block += 1
        layout = planner.plan(tables, lens)
        assert planner.replans == 1, step
    assert layout.num_nodes >= 4 and planner.kv_tokens() == (5 * bs + 3 * 3 * bs,
                                                             3 * (5 * bs + 3 * bs))
    tables[1, 5] = tables[0, 5]                    # a row's table changes: replan
    assert planner.plan(tables, lens) is not None and planner.replans == 2
    more = np.vstack([tables, tables[:1]])         # a request joins
    more[3, 5:] = 0
    planner.plan(more, np.append(lens, 5 * bs))
    assert planner.replans == 3


def test_repeated_fresh_block_replans():
    bs = 2
    tables = np.array([[1, 0, 0], [2, 0, 0]], dtype=np.int32)
    lens = np.array([2, 2])
    planner = IncrementalTreePlanner(bs)
    planner.plan(tables, lens)
    tables[:, 1] = 7                               # both rows get block 7 at column 1
    layout = planner.plan(tables, lens + 1)
    assert planner.replans == 2
    fresh = ak.TreeLayout.from_block_tables(torch.from_numpy(tables), [3, 3], bs)
    assert _structure(layout) == _structure(fresh)


@pytest.mark.parametrize("row", [0, 2])
def test_changed_shared_block_replans(row):
    """Rows 0..2 share blocks [1, 2]; one row's copy of block 2 changes in place (the first
    reader's, or a later reader's): the check reads every row's entries, not one per node."""
    bs = 2
    tables = np.array([[1, 2, 5, 0], [1, 2, 6, 0], [1, 2, 7, 0]], dtype=np.int32)
    lens = np.array([6, 6, 6])
    planner = IncrementalTreePlanner(bs)
    planner.plan(tables, lens)
    tables[row, 1] = 9
    layout = planner.plan(tables, lens)
    assert planner.replans == 2
    fresh = ak.TreeLayout.from_block_tables(torch.from_numpy(tables), lens.tolist(), bs)
    assert _structure(layout) == _structure(fresh)


def test_plan_reuses_its_host_buffer_and_validates():
    planner = IncrementalTreePlanner(4)
    tables = np.array([[3, 4, 0], [3, 5, 0]], dtype=np.int32)
    first = planner.plan(tables, np.array([6, 6])).host_plan("work_info").data_ptr()
    second = planner.plan(tables, np.array([7, 7])).host_plan("work_info").data_ptr()
    assert first == second
    with pytest.raises(ValueError, match="seq_lens"):
        planner.plan(tables, np.array([13, 1]))
    with pytest.raises(ValueError, match="block_tables"):
        planner.plan(tables.astype(np.float32), np.array([1, 1]))
    with pytest.raises(ValueError, match="page_table"):
        planner.plan(tables.astype(np.int64), np.array([1, 1]))
    with pytest.raises(ValueError, match="block id"):
        planner.plan(tables, np.array([6, 6]))
        bad = tables.copy()
        bad[0, 2] = -1
        planner.plan(bad, np.array([9, 7]))


@pytest.mark.parametrize("case", ["block_read_elsewhere", "shared_partial_block_grows"])
def test_growth_that_changes_the_sharing_replans(case):
    """Rows that grow into a block another row reads, or out of a partial block they share, are
    not tails that grow: the planner replans and matches the fresh plan."""
    bs = 2
    if case == "block_read_elsewhere":
        # row 1 reads block 9 at column 1 to one token; row 0 grows into it
        tables = np.array([[5, 0], [5, 9]], dtype=np.int32)
        before, after = np.array([2, 3]), np.array([3, 3])
        grown = np.array([[5, 9], [5, 9]], dtype=np.int32)
    else:
        # both rows read block 4 to one token; row 0 grows to two
        tables = grown = np.array([[4, 0], [4, 0]], dtype=np.int32)
        before, after = np.array([1, 1]), np.array([2, 1])
    planner = IncrementalTreePlanner(bs)
    planner.plan(tables, before)
    layout = planner.plan(grown, after)
    fresh = ak.TreeLayout.from_block_tables(torch.from_numpy(grown), after.tolist(), bs)
    assert planner.replans == 2
    assert _structure(layout) == _structure(fresh)
    assert ak.kv_bytes(layout, 1, 1, torch.float32) == ak.kv_bytes(fresh, 1, 1, torch.float32)


def test_decode_step_planner_fixed_buffers_no_allocation():
    """What the vLLM builder does every step (a2r_kernels.vllm): plan from the host table into a
    TreeAttentionWrapper (a request joins half-way). After the first step, every step (new tokens, fresh blocks, a request
    joining) writes the same buffers in place and allocates no tensor storage; the wrapper's
    result equals the reference each step."""
    from torch.profiler import ProfilerActivity, profile

    from a2r_kernels.incremental_plan import DecodeStepPlanner

    bs, width, rows, num_blocks = 4, 6, 5, 40
    step_planner = DecodeStepPlanner(bs, "cpu", (4, 2, 8, torch.float32, 8, num_blocks))
    table = torch.zeros(8, width, dtype=torch.int32)     # vLLM's buffer: max_num_seqs rows
    table[:rows, :2] = torch.tensor([1, 2], dtype=torch.int32)   # a shared prompt
    table[:rows, 2] = torch.arange(10, 10 + rows)
    lens = torch.zeros(8, dtype=torch.int32)
    lens[:rows] = 2 * bs + 1
    gen = torch.Generator().manual_seed(0)
    k_cache = torch.randn(num_blocks, bs, 2, 8, generator=gen)
    v_cache = torch.randn_like(k_cache)
    fresh_block = iter(range(20, num_blocks))

    def advance(num_rows):   # the engine's side of a step: one token each, fresh blocks
        for i in range(num_rows):
            if int(lens[i]) % bs == 0:
                table[i, int(lens[i]) // bs] = next(fresh_block)
        lens[:num_rows] += 1

    def plan(num_rows):
        view = table[:num_rows]
        return step_planner.plan(view, view, lens[:num_rows])

    advance(rows)
    plan(rows)
    wrapper = step_planner.wrapper
    pointers = [t.data_ptr() for t in (wrapper.work_info, wrapper.merge_rows, wrapper.page_table,
                                       wrapper.partial_o)]
    host_plan = step_planner.plan(table[:rows], table[:rows], lens[:rows]).host_plan("work_info")
    allocated = []
    for n in range(2 * bs):
        num_rows = rows + (n >= bs)                       # a request joins half-way
        if n == bs:
            table[rows, :2] = torch.tensor([1, 2], dtype=torch.int32)
            lens[rows] = 2 * bs
        advance(num_rows)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            layout = plan(num_rows)
        if n != bs:   # not the join's replan
            allocated += [e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0]
        assert [t.data_ptr() for t in (wrapper.work_info, wrapper.merge_rows, wrapper.page_table,
                                       wrapper.partial_o)] == pointers
        assert layout.host_plan("work_info").data_ptr() == host_plan.data_ptr()
        q = torch.randn(num_rows, 4, 8, generator=gen)
        expected, _ = reference.tree_decode_attention_by_path(q, k_cache, v_cache, layout, 0.5)
        torch.testing.assert_close(wrapper.run(q, k_cache, v_cache, sm_scale=0.5), expected)
    assert allocated == []
    assert step_planner.planner.replans == 2             # the first step and the join


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_decode_step_planner_cuda_graph_replays_later_plans():
    """The vLLM backend's CUDA path: a decode step (wrapper.run over the planner's fixed
    buffers) captured once in a CUDA graph with padded rows, then replayed after later plans
    (tokens appended, fresh blocks, a request joining): each replay equals the reference."""
    from a2r_kernels.incremental_plan import DecodeStepPlanner

    bs, width, num_blocks, capacity = 16, 12, 96, 8
    step_planner = DecodeStepPlanner(bs, "cuda", (8, 2, 64, torch.float16, capacity, num_blocks))
    host = torch.zeros(capacity, width, dtype=torch.int32)
    host[:, :3] = torch.tensor([1, 2, 3], dtype=torch.int32)       # a shared prompt
    host[:, 3] = torch.arange(10, 10 + capacity)
    lens = torch.zeros(capacity, dtype=torch.int32)
    lens[:5] = 3 * bs + 3
    device_table = host.cuda()
    gen = torch.Generator(device="cuda").manual_seed(0)
    k_cache = torch.randn(num_blocks, bs, 2, 64, generator=gen, device="cuda").half()
    v_cache = torch.randn_like(k_cache)
    q = torch.zeros(capacity, 8, 64, dtype=torch.float16, device="cuda")
    out = torch.empty_like(q)
    fresh_block = iter(range(30, num_blocks))

    def plan(rows):
        device_table.copy_(host)
        return step_planner.plan(host[:rows], device_table[:rows], lens[:rows])

    plan(5)
    wrapper = step_planner.wrapper
    wrapper.run(q, k_cache, v_cache, out=out)        # warm-up (Triton compile) before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        wrapper.run(q, k_cache, v_cache, out=out)
    for step in range(3 * bs):
        rows = 5 + (step >= bs)
        for i in range(rows):
            if int(lens[i]) % bs == 0:
                host[i, int(lens[i]) // bs] = next(fresh_block)
        lens[:rows] += 1
        layout = plan(rows)
        q.copy_(torch.randn(capacity, 8, 64, generator=gen, device="cuda").half())
        graph.replay()
        expected, _ = reference.tree_decode_attention_by_path(q[:rows], k_cache, v_cache,
                                                              layout, 64 ** -0.5)
        torch.testing.assert_close(out[:rows].float(), expected, atol=2e-3, rtol=2e-3)
        assert (out[rows:] == 0).all()
    assert step_planner.planner.replans == 2


def test_fresh_views_of_the_same_tables_reuse_the_input_checks(monkeypatch):
    """vLLM hands its block table over as a new slice every step: the checks of the table and the
    page table run once per memory, not once per view; other memory is checked again."""
    planner = IncrementalTreePlanner(4)
    table = torch.tensor([[3, 4, 0], [3, 5, 0]], dtype=torch.int32)
    checked = []
    page_table = planner._page_table
    monkeypatch.setattr(planner, "_page_table",
                        lambda tables, pages: checked.append(1) or page_table(tables, pages))
    for length in (6, 7, 8):
        planner.plan(table[:2], np.array([length, length]), table.view(-1)[:6])
    assert len(checked) == 1
    other = table.clone()
    planner.plan(other[:2], np.array([9, 9]), other.view(-1))
    assert len(checked) == 2
