"""The tree of a paged decode step: which tokens of which rows' block tables are one shared node.

Rows of a paged batch (``block_tables [S, W]``, ``seq_lens [S]``) that hold the same block id at
the same position and read the same number of its tokens share those tokens; a maximal run of
blocks with the same readers is one tree node. :func:`block_table_nodes` finds the nodes in
linear host work; :meth:`a2r_kernels.TreeLayout.from_block_tables` and
:class:`a2r_kernels.incremental_plan.IncrementalTreePlanner` plan them.
"""

from __future__ import annotations

import functools

import numpy as np

from .backend import cpu_extension
from .vocab import INT32_MAX


def _group_by_keys(keys: list[np.ndarray]) -> np.ndarray:
    """Group ids ``[E]`` (dense, any order) of the rows of the non-negative int64 key columns
    ``keys`` (each ``[E]``): two entries share a group iff every key is equal.

    Linear in E: an LSD radix sort, one stable ``argsort`` of 16-bit digits per pass (numpy's
    stable sort of 16-bit ints is a radix sort), least significant key and digit first.
    """
    num_entries = keys[0].size
    order = np.arange(num_entries)
    for key in reversed(keys):
        top = int(key.max()) if num_entries else 0
        for shift in range(0, max(top.bit_length(), 1), 16):
            digit = ((key[order] >> shift) & 0xFFFF).astype(np.uint16)
            order = order[np.argsort(digit, kind="stable")]
    new_group = np.ones(num_entries, dtype=bool)
    if num_entries > 1:
        differs = np.zeros(num_entries - 1, dtype=bool)
        for key in keys:
            ordered = key[order]
            differs |= ordered[1:] != ordered[:-1]
        new_group[1:] = differs
    group = np.empty(num_entries, dtype=np.int64)
    group[order] = np.cumsum(new_group) - 1
    return group


def block_table_nodes(host_tables: np.ndarray, lens: np.ndarray, block_size: int):
    """The tree of a paged decode step (what :meth:`TreeLayout.from_block_tables` plans): see
    :func:`block_table_nodes_numpy`, the reference. Runs the C++ twin in ``a2r_kernels._cpu``
    (same result, node ids included) when it was built and ``host_tables`` is a C-contiguous
    int32 array (what vLLM keeps), else the numpy reference."""
    ext = planner_extension()
    if ext is not None and host_tables.dtype == np.int32 and host_tables.flags.c_contiguous:
        lens = np.ascontiguousarray(lens, dtype=np.int64)
        result = ext.block_table_tree(host_tables, lens, block_size)
        if len(result) == 4:
            return result
        # (row,): a negative block id; the reference raises the error naming it.
    return block_table_nodes_numpy(host_tables, lens, block_size)


@functools.cache
def planner_extension():
    """``a2r_kernels._cpu`` when built with the planner (``block_table_tree``), else None."""
    ext = cpu_extension()
    return ext if ext is not None and hasattr(ext, "block_table_tree") else None


def block_table_nodes_numpy(host_tables: np.ndarray, lens: np.ndarray, block_size: int):
    """The tree of a paged decode step (what :meth:`TreeLayout.from_block_tables` plans).

    ``host_tables``: int ``[S, W]`` block ids (numpy, host); ``lens``: int ``[S]`` tokens per row,
    ``0 <= lens <= W * block_size`` (checked by the caller). Row ``i`` reads token ``t`` at
    ``(host_tables[i, t // block_size], t % block_size)``.

    Returns ``(paths, lengths, page_starts, max_block_id)``: per row its node ids (root to
    leaf; nodes numbered in the order of their first entry, row-major), per node its tokens
    and the flat index ``row * W + col`` of its first block in ``host_tables`` (its first
    reader's row), and the largest block id read (-1 if none).
    O(S * W) host work, vectorised; no sort (block ids read at two positions or to two lengths
    go through :func:`_group_by_keys`, also linear).
    """
    num_seqs, width = host_tables.shape
    lens = np.asarray(lens, dtype=np.int64)
    num_used = (lens + block_size - 1) // block_size                # blocks each row reads
    used = np.arange(width)[None, :] < num_used[:, None]
    blocks = host_tables[used].astype(np.int64)                   # row-major: row, then pos
    num_entries = blocks.size
    rows = np.repeat(np.arange(num_seqs), num_used)
    entry = np.arange(num_entries)
    cols = entry - np.repeat(np.cumsum(num_used) - num_used, num_used)
    if num_entries and blocks.min() < 0:
        bad = int(rows[blocks < 0][0])
        raise ValueError(f"block_tables[{bad}] holds a negative block id within seq_lens")
    if num_entries and blocks.max() > INT32_MAX:
        bad = int(rows[blocks > INT32_MAX][0])
        raise ValueError(f"block_tables[{bad}] holds a block id above {INT32_MAX}")
    last = cols == num_used[rows] - 1
    fill = np.where(last, lens[rows] - cols * block_size, block_size)
    max_block_id = int(blocks.max()) if num_entries else -1

    # Group the used entries by (position, block id, tokens read): one group per shared block.
    # Without a sort when every block id is read at one position to one length (what paged
    # engines hand over): an entry's group is the first entry with its block id.
    first_of_block = np.empty(max_block_id + 1, dtype=np.int64)
    first_of_block[blocks[::-1]] = entry[::-1]   # repeated ids: the last write (first) wins
    first = first_of_block[blocks]
    if not (np.array_equal(cols[first], cols) and np.array_equal(fill[first], fill)):
        keyed = _group_by_keys([cols, blocks, fill])
        keyed_first = np.empty(int(keyed.max()) + 1, dtype=np.int64)
        keyed_first[keyed[::-1]] = entry[::-1]
        first = keyed_first[keyed]                  # the first entry of the entry's group
    # Groups numbered by first entry (row-major), the order the C++ twin numbers them in.
    group = (np.cumsum(first == entry) - 1)[first]
    num_groups = int(group.max()) + 1 if num_entries else 0
    counts = np.bincount(group, minlength=num_groups)
    group_first = np.empty(num_groups, dtype=np.int64)      # each group's first entry
    group_first[group[::-1]] = entry[::-1]
    # A group merges into the next one when all its readers continue into the same group and
    # nobody else reads that one: then both have the same readers, so one node holds both.
    nxt = np.full(num_entries, -1, dtype=np.int64)
    if num_entries > 1:
        nxt[:-1] = np.where(last[:-1], -1, group[1:])
    group_next = nxt[group_first]
    disagree = np.zeros(num_groups, dtype=bool)
    disagree[group[nxt != group_next[group]]] = True
    merges = ~disagree & (group_next >= 0)
    merges &= counts == counts[np.clip(group_next, 0, None)]
    # Chains of merged groups, in linear time: a merged group's readers all read its target
    # next, so along any row a node is a run of consecutive entries; a run starts at an entry
    # whose predecessor in the row does not merge into it, and its group is the chain's head.
    is_head = np.ones(num_groups, dtype=bool)
    is_head[group_next[merges]] = False
    run_start = np.ones(num_entries, dtype=bool)
    if num_entries > 1:
        run_start[1:] = last[:-1] | ~merges[group[:-1]]
    run_head = group[run_start]                                   # each run's head group
    node = (np.cumsum(is_head) - 1)[run_head][np.cumsum(run_start) - 1]   # [E]
    num_nodes = int(is_head.sum())
    node_of_group = np.empty(num_groups, dtype=np.int64)
    node_of_group[group] = node
    group_fill = fill[group_first]
    node_len = np.bincount(node_of_group, weights=group_fill, minlength=num_nodes)
    # A node's table starts at its head group's first entry (the first reader's row).
    node_start = (rows * width + cols)[group_first[is_head]]
    # Paths: each row's entries, one per node (consecutive entries of one node collapse).
    starts = np.ones(num_entries, dtype=bool)
    if num_entries > 1:
        starts[1:] = (node[1:] != node[:-1]) | (rows[1:] != rows[:-1])
    path_nodes = node[starts].tolist()
    per_row = np.bincount(rows[starts], minlength=num_seqs).tolist()
    paths, pos = [], 0
    for count in per_row:
        paths.append(path_nodes[pos:pos + count])
        pos += count
    lengths = node_len.astype(np.int64).tolist()
    page_starts = node_start.tolist()
    return paths, lengths, page_starts, max_block_id
