"""The kernel plan of a tree decode step: work items, merge rows, one int32 host buffer.

:class:`~a2r_kernels.TreeLayout` checks its inputs and keeps the plan; this module builds it from
already checked paths and nodes (the module docstring of :mod:`a2r_kernels.layout` defines the
work items ``WORK_FIELDS`` and the merge CSR). Host work is O(sequences + path nodes + work
items): short leaves are Python ints, long runs that split into many items are numpy blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate, chain

import numpy as np
import torch

from .vocab import WORK_FIELDS, positive_int

# Split-KV chunk sizing. Every (sequence, q head) a work item covers costs one fp32 partial state,
# written once and read once by the merge: 8 * head_dim bytes, against 4 * head_dim bytes of bf16
# K+V per token and kv head. For a node read by a run of q_len sequences, a chunk of c tokens
# therefore moves 2 * q_len * group / c partial bytes per KV byte: with a fixed 256-token chunk,
# an 8k prefix under 64 branches at group 4 would move twice as many partial bytes as KV bytes.
# So the chunk grows with the run: c = max(DEFAULT_KV_CHUNK, KV_CHUNK_TOKENS_PER_SEQ * q_len)
# (ratio group / 8), while splitting the run into groups of MAX_SEQS_PER_ITEM sequences keeps
# the number of programs for one prefix at about len / 256, the same as before, each streaming
# as many tokens as before. Constants to be tuned on the GPU (bench_tree_attention.py sweeps them).
DEFAULT_KV_CHUNK = 256          # shortest chunk: one program streams a few pages per row tile
KV_CHUNK_TOKENS_PER_SEQ = 16    # adaptive chunk tokens per sequence of the run
MAX_SEQS_PER_ITEM = 16          # sequences per work item: 64 query rows at group 4 (one MMA tile)

# The plan's int32 tensors are slices of one buffer (one host-to-device copy per step instead of
# six); each slice starts at a multiple of this many int32s (16 bytes), so every pointer keeps
# the 16-byte alignment that Triton specialises on.
SLICE_ALIGN = 4

# The plan tensors, in the order of the host buffer (the page table is not always part of it:
# a layout may read an external block-table tensor by reference).
PLAN_FIELDS = ("work_info", "row_seq", "page_table", "merge_indptr", "merge_rows", "seq_lens")

# Runs whose chunks x sequence groups are at most this many work items are written as Python
# ints; larger ones as one numpy block (cheaper per item, dearer per call).
_FEW_ITEMS = 4


def round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def kv_chunk(kv_chunk_size, block_size: int) -> int | None:
    """A fixed ``kv_chunk_size`` rounded up to a multiple of block_size; None (adaptive) as is."""
    if kv_chunk_size is None:
        return None
    return round_up(positive_int(kv_chunk_size, "kv_chunk_size"), block_size)


def seqs_per_item(max_seqs_per_item) -> int:
    """``max_seqs_per_item`` checked, ``MAX_SEQS_PER_ITEM`` for None."""
    if max_seqs_per_item is None:
        return MAX_SEQS_PER_ITEM
    return positive_int(max_seqs_per_item, "max_seqs_per_item")


def aligned_slices(sizes: dict[str, int], names) -> tuple[dict[str, tuple[int, int]], int]:
    """``(slices, total)``: field ``name``'s ``(start, end)`` in one int32 buffer holding the
    fields ``names`` in order, each starting at a multiple of ``SLICE_ALIGN``; ``total`` is the
    buffer's length."""
    slices, total = {}, 0
    for name in names:
        slices[name] = (total, total + sizes[name])
        total += round_up(sizes[name], SLICE_ALIGN)
    return slices, total


@dataclass
class HostPlan:
    """A built plan: the int32 CPU ``buffer`` and each field's ``slices`` in it (``PLAN_FIELDS``;
    no ``"page_table"`` when the page table is read by reference), each node's ``page_starts``,
    and the scalars a layout carries (``table_max``: the largest block id of the node tables
    given to :func:`build_host_plan`, -1 without them)."""

    buffer: torch.Tensor
    slices: dict[str, tuple[int, int]]
    page_starts: list[int]
    num_work: int
    num_partials: int
    max_q_len: int
    max_seq_len: int
    table_max: int


@dataclass
class _WorkItems:
    parts: list              # flat WORK_FIELDS values: lists of ints and int64 numpy blocks
    num_work: int
    segments: list           # per sequence: flat (first row, stride, count) of its partial rows
    num_partials: int
    max_q_len: int
    table_max: int


def _runs(positions: list[int]) -> list[tuple[int, int]]:
    """The maximal runs ``(start, length)`` of consecutive ints in ascending ``positions``."""
    if positions[-1] - positions[0] + 1 == len(positions):   # one run: always in a tree
        return [(positions[0], len(positions))]
    runs = []
    start = prev = positions[0]
    for p in positions[1:]:
        if p != prev + 1:
            runs.append((start, prev - start + 1))
            start = p
        prev = p
    runs.append((start, prev - start + 1))
    return runs


def _run_item_block(run_start: int, run_len: int, page_start: int, length: int, run_chunk: int,
                    num_chunks: int, num_groups: int, per_item: int, base: int) -> np.ndarray:
    """The work items of a run over a node as int64 ``[num_chunks * num_groups * 6]``, chunk
    major; item (c, g) writes partial rows ``base + c * run_len + (offsets in the run)``."""
    kv_start = np.arange(num_chunks, dtype=np.int64)[:, None] * run_chunk
    offset = np.arange(num_groups, dtype=np.int64)[None, :] * per_item
    items = np.empty((num_chunks, num_groups, len(WORK_FIELDS)), dtype=np.int64)
    items[..., 0] = run_start + offset
    items[..., 1] = np.minimum(per_item, run_len - offset)
    items[..., 2] = page_start
    items[..., 3] = kv_start
    items[..., 4] = np.minimum(kv_start + run_chunk, length)
    items[..., 5] = base + (kv_start // run_chunk) * run_len + offset
    return items.reshape(-1)


def _work_items(order: list[int], node_positions: list[list[int]], lengths: list[int],
                tables: list[list[int]] | None, page_starts: list[int], block_size: int,
                chunk: int | None, per_item: int) -> _WorkItems:
    """Every node's work items and every sequence's partial-row segments (see ``_WorkItems``)."""
    min_chunk = chunk if chunk is not None else round_up(DEFAULT_KV_CHUNK, block_size)
    parts: list = []
    work: list[int] = []   # WORK_FIELDS per item, flattened
    num_work = num_partials = max_q_len = 0
    table_max = -1
    segments: list[list[int]] = [[] for _ in order]
    for j, positions in enumerate(node_positions):
        length = lengths[j]
        if not positions or length == 0:
            continue
        if tables is not None:
            table = tables[j]
            num_pages = -(-length // block_size)
            table_max = max(table_max, max(table) if len(table) == num_pages
                            else max(table[:num_pages]))
        if length <= min_chunk and len(positions) == 1:   # a leaf of one sequence: the common case
            work += (positions[0], 1, page_starts[j], 0, length, num_partials)
            num_work += 1
            segments[order[positions[0]]] += (num_partials, 1, 1)
            num_partials += 1
            max_q_len = max_q_len or 1
            continue
        for run_start, run_len in _runs(positions):
            run_chunk = chunk
            if run_chunk is None:   # adaptive: at least the target, balanced (no short tail)
                target = max(min_chunk, KV_CHUNK_TOKENS_PER_SEQ * run_len)
                run_chunk = round_up(-(-length // max(1, length // target)), block_size)
            num_chunks = -(-length // run_chunk)
            num_groups = -(-run_len // per_item)
            # Chunk-major: the run's groups over one chunk are adjacent work items (they run
            # together and the chunk comes from DRAM once).
            base = num_partials
            if num_chunks * num_groups <= _FEW_ITEMS:
                for kv_start in range(0, length, run_chunk):
                    kv_end = min(kv_start + run_chunk, length)
                    for q_start in range(run_start, run_start + run_len, per_item):
                        q_len = min(per_item, run_start + run_len - q_start)
                        work += (q_start, q_len, page_starts[j], kv_start, kv_end,
                                 base + (kv_start // run_chunk) * run_len + q_start - run_start)
            else:
                parts += (work, _run_item_block(run_start, run_len, page_starts[j], length,
                                                run_chunk, num_chunks, num_groups, per_item, base))
                work = []
            num_work += num_chunks * num_groups
            max_q_len = max(max_q_len, min(per_item, run_len))
            for r, seq in enumerate(order[run_start:run_start + run_len], base):
                segments[seq] += (r, run_len, num_chunks)
            num_partials += num_chunks * run_len
    parts.append(work)
    return _WorkItems(parts, num_work, segments, num_partials, max_q_len, table_max)


def _merge_csr(segments: list[list[int]], num_partials: int) -> tuple[list[int], np.ndarray]:
    """``(merge_indptr, merge_rows)`` of the sequences' partial-row segments."""
    rows_per_seq = [sum(seq_segments[2::3]) for seq_segments in segments]
    indptr = [0, *accumulate(rows_per_seq)]
    flat_segments = np.fromiter(chain.from_iterable(segments), dtype=np.int64)
    first, stride, count = flat_segments[0::3], flat_segments[1::3], flat_segments[2::3]
    if count.size and int(count.max()) > 1:   # expand the segments into row ids
        seg_start = np.repeat(np.cumsum(count) - count, count)
        rows = np.repeat(first, count) + np.repeat(stride, count) * (
            np.arange(num_partials, dtype=np.int64) - seg_start)
    else:
        rows = first
    return indptr, rows


def build_host_plan(paths: list[list[int]], tables: list[list[int]] | None, lengths: list[int],
                    block_size: int, chunk: int | None, per_item: int,
                    page_starts: list[int] | None = None) -> HostPlan:
    """The plan of checked inputs (what ``TreeLayout.from_paths`` checks).

    ``paths[i]``: sequence ``i``'s node ids; ``lengths[j]``: node ``j``'s tokens; ``chunk``: a
    fixed split-KV chunk (a multiple of ``block_size``) or None (adaptive); ``per_item``: most
    sequences per work item. Either ``tables`` (each node's block ids: the page table is their
    concatenation, written into the buffer) or, for a page table read by reference,
    ``page_starts`` (each node's first entry in it).
    """
    num_seqs = len(paths)
    # Kernel order: lexicographic by path, so sequences under a node are contiguous.
    order = sorted(range(num_seqs), key=paths.__getitem__)
    if tables is not None:
        page_starts = [0, *accumulate(map(len, tables))][:-1]
    # Kernel positions of the sequences that read each node, ascending.
    node_positions: list[list[int]] = [[] for _ in lengths]
    for p, seq in enumerate(order):
        for j in paths[seq]:
            node_positions[j].append(p)
    items = _work_items(order, node_positions, lengths, tables, page_starts, block_size, chunk,
                        per_item)
    indptr, rows = _merge_csr(items.segments, items.num_partials)
    seq_lens = [sum(map(lengths.__getitem__, path)) for path in paths]

    # One int32 buffer holds every tensor of the plan: one copy to the device.
    sizes = {"work_info": items.num_work * len(WORK_FIELDS), "row_seq": num_seqs,
             "page_table": page_starts[-1] + len(tables[-1]) if tables else 0,
             "merge_indptr": num_seqs + 1, "merge_rows": items.num_partials,
             "seq_lens": num_seqs}
    fields = [name for name in PLAN_FIELDS if name != "page_table" or tables is not None]
    slices, total = aligned_slices(sizes, fields)
    buffer = torch.empty(total, dtype=torch.int32)
    host = buffer.numpy()
    pos = slices["work_info"][0]
    for part in items.parts:
        host[pos:pos + len(part)] = part
        pos += len(part)
    for name, values in (("row_seq", order), ("merge_indptr", indptr), ("merge_rows", rows),
                         ("seq_lens", seq_lens)):
        start, end = slices[name]
        host[start:end] = values
    if tables is not None:
        pos = slices["page_table"][0]
        for table in tables:
            host[pos:pos + len(table)] = table
            pos += len(table)
    return HostPlan(buffer, slices, page_starts, items.num_work, items.num_partials,
                    items.max_q_len, max(seq_lens, default=0), items.table_max)
