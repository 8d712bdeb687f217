"""TreeLayout: the plan of one tree-decode step (built once per step, reused by every layer).

A decode step of ``num_seqs`` sequences reads, for sequence ``i``, the tokens of the nodes on its
path ``paths[i]`` (root to leaf). Nodes shared by several sequences are the point: their KV must be
read from memory once per call, not once per sequence.

The plan turns the paths into *work items*. A work item is one contiguous run of sequences that
all contain one node, times one chunk of that node's tokens::

    (q_start, q_len, page_start, kv_start, kv_end, partial_start)

- ``q_start, q_len``: the run, as positions in the *kernel order* of sequences. ``row_seq[p]`` maps
  kernel position ``p`` to the caller's sequence index. The kernel order is the lexicographic order
  of the paths, so in a tree every node covers one contiguous run (the hint of Hydragen/cascade
  attention); inputs that are not a tree still work, a node just gets several runs.
- ``page_start``: index into ``page_table`` of the node's first block (the node's block table is
  ``page_table[page_start : page_start + ceil(len / block_size)]``).
- ``kv_start, kv_end``: the token chunk of the node, ``0 <= kv_start < kv_end <= len``. Long nodes
  are split into chunks (split-KV) so a long prefix with few branches still spreads over many
  programs; a run of many sequences is split into groups of at most ``max_seqs_per_item``, each
  its own work item over the same chunk (adjacent in the grid, so the chunk's second and later
  reads come from L2).
- ``partial_start``: the work item writes one partial state (fp32 ``o``, natural-log ``lse``) per
  sequence of its run, to partial rows ``partial_start + (p - q_start)``.

A second pass merges, for each sequence ``i``, the partial rows
``merge_rows[merge_indptr[i] : merge_indptr[i + 1]]`` by their LSE (fp32). A sequence whose path
has no tokens gets no partial row: its output is 0 and its LSE is ``-inf``.

All tensors are int32 on ``device``, contiguous slices of one buffer (one host-to-device copy
per step), each 16-byte aligned; the Python scalars beside them (``num_partials``,
``max_block_id``, ...) let the per-layer call check its inputs and size its buffers without a host
sync. Nothing in the per-layer call depends on anything but these tensors and the KV pool, so a
decode step that reuses one layout is CUDA-graph friendly.
"""

from __future__ import annotations

from itertools import accumulate, chain
from typing import Sequence

import numpy as np
import torch

from .backend import as_device
from .vocab import INT32_MAX, WORK_FIELDS, int_list, positive_int

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


def host_to_device(host: torch.Tensor, device) -> torch.Tensor:
    """``host`` (a contiguous CPU tensor) on ``device`` without a host sync.

    A plain ``.to(cuda)`` of pageable memory waits for the stream to drain, so the host could not
    plan a decode step while the last one runs on the GPU. On CUDA the values are staged in
    pinned memory and copied non-blocking in stream order (torch's caching host allocator keeps
    the pinned copy until the copy has run; ``host`` may change right after). Elsewhere: as is.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def _block_table_tensor(block_tables) -> torch.Tensor:
    """``block_tables`` (int tensor ``[S, B]``, or lists of ints of any lengths) as an int tensor
    ``[S, B]`` (lists: on the CPU, short rows padded with 0)."""
    if isinstance(block_tables, torch.Tensor):
        if block_tables.dim() != 2 or block_tables.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"block_tables must be int32 [num_seqs, max_blocks], got "
                             f"{block_tables.dtype} {tuple(block_tables.shape)}")
        return block_tables
    rows = [int_list(row, f"block_tables[{i}]", high=INT32_MAX)
            for i, row in enumerate(_rows(block_tables, "block_tables"))]
    width = max(map(len, rows), default=0)
    return torch.tensor([row + [0] * (width - len(row)) for row in rows],
                        dtype=torch.int32).view(len(rows), width)


def _seq_len_tensor(seq_lens, num_seqs: int) -> torch.Tensor:
    """``seq_lens`` (tensor or list) as a CPU int tensor ``[num_seqs]``."""
    if isinstance(seq_lens, torch.Tensor):
        if seq_lens.dtype.is_floating_point or seq_lens.dtype == torch.bool:
            raise ValueError(f"seq_lens must hold ints, got {seq_lens.dtype}")
        lens = seq_lens.to("cpu")
    else:
        lens = torch.tensor(int_list(seq_lens, "seq_lens"), dtype=torch.int64)
    if lens.shape != (num_seqs,):
        raise ValueError(f"seq_lens must be [num_seqs={num_seqs}] (one per block_tables row), "
                         f"got shape {tuple(lens.shape)}")
    return lens


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def _rows(x, name: str) -> list:
    """``x`` (a sequence of sequences, or a 2-D tensor) as a list of its rows."""
    if x is None or isinstance(x, (str, bytes)) or not hasattr(x, "__iter__"):
        raise ValueError(f"{name} must be a sequence of int sequences, got {type(x).__name__}")
    return list(x)


def _kv_chunk(kv_chunk_size, block_size: int) -> int | None:
    """A fixed ``kv_chunk_size`` rounded up to a multiple of block_size; ``None`` (adaptive) as is."""
    if kv_chunk_size is None:
        return None
    return _round_up(positive_int(kv_chunk_size, "kv_chunk_size"), block_size)


def _seqs_per_item(max_seqs_per_item) -> int:
    if max_seqs_per_item is None:
        return MAX_SEQS_PER_ITEM
    return positive_int(max_seqs_per_item, "max_seqs_per_item")


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
    """The tree of a paged decode step (what :meth:`TreeLayout.from_block_tables` plans).

    ``host_tables``: int ``[S, W]`` block ids (numpy, host); ``lens``: int ``[S]`` tokens per row,
    ``0 <= lens <= W * block_size`` (checked by the caller). Row ``i`` reads token ``t`` at
    ``(host_tables[i, t // block_size], t % block_size)``.

    Returns ``(paths, lengths, page_starts, max_block_id)``: per row its node ids (root to
    leaf), per node its tokens and the flat index ``row * W + col`` of its first block in
    ``host_tables`` (its first reader's row), and the largest block id read (-1 if none).
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
    if np.array_equal(cols[first], cols) and np.array_equal(fill[first], fill):
        is_first = first == entry
        group = (np.cumsum(is_first) - 1)[first]
    else:
        group = _group_by_keys([cols, blocks, fill])
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


# The plan's int32 tensors are slices of one buffer (one host-to-device copy per step instead of
# six); each slice starts at a multiple of this many int32s (16 bytes), so every pointer keeps
# the 16-byte alignment that Triton specialises on.
_SLICE_ALIGN = 4


# The plan tensors, in the order of the host buffer (the page table is not always part of it:
# a layout may read an external block-table tensor by reference).
PLAN_FIELDS = ("work_info", "row_seq", "page_table", "merge_indptr", "merge_rows", "seq_lens")


class TreeLayout:
    """Plan of one tree decode step. Build with :meth:`from_paths`, :meth:`from_block_tables` or
    ``TreeKVCache.layout``.

    Attributes (tensors are int32 on ``device``, made by one host-to-device copy on first use):
        work_info      : [num_work, 6]  rows ``WORK_FIELDS``, see the module docstring
        row_seq        : [num_seqs]     kernel position -> caller's sequence index
        page_table     : [num_pages]    block ids; node ``j``'s table starts at ``page_starts[j]``
                         (the nodes' tables concatenated, or an external table read by reference:
                         a ``TreeKVCache``'s device block tables, the ``block_tables`` given to
                         :meth:`from_block_tables`)
        merge_indptr   : [num_seqs + 1] CSR over partial rows, by caller's sequence index
        merge_rows     : [num_partials] partial row ids
        seq_lens       : [num_seqs]     tokens on each path
    Host attributes: ``paths``, ``node_lengths``, ``node_block_tables`` (lists of ints; the block
    tables are materialised on first access), ``page_starts``, ``block_size``, ``device``, and the
    scalars ``num_partials``, ``max_block_id``, ``max_seq_len``, ``max_q_len``.
    """

    def __init__(self, *, paths, node_lengths, block_size, device, kv_chunk_size,
                 max_seqs_per_item, host_plan, slices, page_starts, page_table, node_tables,
                 num_work, num_partials, max_block_id, max_seq_len, max_q_len):
        self.paths: list[list[int]] = paths
        self.node_lengths: list[int] = node_lengths
        self.block_size = block_size
        self.device = device
        self.kv_chunk_size = kv_chunk_size
        self.max_seqs_per_item = max_seqs_per_item
        self.page_starts: list[int] = page_starts
        self.num_work = num_work
        self.num_partials = num_partials
        self.max_block_id = max_block_id
        self.max_seq_len = max_seq_len
        self.max_q_len = max_q_len
        # int32 CPU buffer of the plan and each field's (start, end) in it ("page_table" absent
        # when the layout reads an external device table, ``self._external_pages``).
        self._host_plan = host_plan
        self._slices = slices
        self._external_pages = page_table
        self._node_tables = node_tables      # list of lists, or a callable making it
        self._device_plan: dict[str, torch.Tensor] | None = None
        self._seq_slots: torch.Tensor | None = None
        self._shared_plan: tuple | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_paths(cls, paths: Sequence[Sequence[int]], node_block_tables: Sequence[Sequence[int]],
                   node_lengths: Sequence[int], block_size: int, device="cpu", *,
                   kv_chunk_size: int | None = None,
                   max_seqs_per_item: int | None = None) -> "TreeLayout":
        """Plan one decode step.

        Args:
            paths: ``paths[i]`` lists node ids from root to leaf for query sequence ``i``. A node
                may appear in many paths but at most once per path.
            node_block_tables: ``node_block_tables[j]``: block ids holding node ``j``'s tokens, in
                order (list of ints or 1-D tensor).
            node_lengths: ``node_lengths[j]``: tokens of node ``j`` (they start at slot 0 of its
                first block); 0 is allowed.
            block_size: tokens per block of the pool.
            device: where the plan's tensors live (the device of q and the pool).
            kv_chunk_size: split-KV chunk in tokens (rounded up to a multiple of ``block_size``);
                default (None) adaptive: for a node of ``len`` tokens read by ``q_len`` sequences,
                ``len`` split into ``max(1, len // max(DEFAULT_KV_CHUNK, KV_CHUNK_TOKENS_PER_SEQ *
                q_len))`` chunks of equal length (rounded up to blocks; see the constants' comment).
            max_seqs_per_item: most sequences one work item covers (default ``MAX_SEQS_PER_ITEM``);
                longer runs become several work items over the same chunk.
        """
        block_size = positive_int(block_size, "block_size")
        device = as_device(device)
        chunk = _kv_chunk(kv_chunk_size, block_size)
        seqs_per_item = _seqs_per_item(max_seqs_per_item)

        lengths = int_list(node_lengths, "node_lengths", low=0, high=INT32_MAX)
        num_nodes = len(lengths)
        block_tables = _rows(node_block_tables, "node_block_tables")
        if len(block_tables) != num_nodes:
            raise ValueError(f"node_block_tables has {len(block_tables)} entries but "
                             f"node_lengths has {num_nodes}: one per node expected")
        # Block ids index an int32 page table: beyond INT32_MAX is an error, not an overflow.
        tables = [int_list(t, f"node_block_tables[{j}]", low=0, high=INT32_MAX)
                  for j, t in enumerate(block_tables)]
        for j, (table, length) in enumerate(zip(tables, lengths)):
            if length > len(table) * block_size:
                raise ValueError(f"node_lengths[{j}]={length} does not fit in its "
                                 f"{len(table)} blocks of block_size={block_size}")

        path_lists: list[list[int]] = []
        for i, path in enumerate(_rows(paths, "paths")):
            path = int_list(path, f"paths[{i}]")
            if path and (min(path) < 0 or max(path) >= num_nodes):
                bad = next(j for j in path if not 0 <= j < num_nodes)
                raise ValueError(f"paths[{i}] names node {bad}, expected 0 <= node < {num_nodes}")
            if len(set(path)) != len(path):
                raise ValueError(f"paths[{i}] repeats a node: {path}")
            path_lists.append(path)
        return cls._plan(path_lists, tables, lengths, block_size, chunk, device, seqs_per_item)

    @classmethod
    def from_block_tables(cls, block_tables, seq_lens, block_size: int, device="cpu", *,
                          kv_chunk_size: int | None = None,
                          max_seqs_per_item: int | None = None) -> "TreeLayout":
        """Plan a paged decode step, discovering the sharing from the block tables.

        Row ``i`` reads tokens ``t < seq_lens[i]`` at ``(block_tables[i, t // block_size],
        t % block_size)``, as :func:`a2r_kernels.paged_decode_attention` does. Rows that hold the
        same block id at the same position and read the same number of its tokens share them:
        every full block, and a partial last block read to the same length. Those tokens become
        one tree node read once per call (a maximal run of blocks with the same readers is one
        node). A block that one row reads in part (its last block) and another row reads further
        is not shared between the two (vLLM never shares a partial block); each reads it as paged
        decode would, so the result is the same either way.

        Args:
            block_tables: int32 ``[num_seqs, max_blocks]`` (a tensor on any device, or lists of
                ints, rows of any lengths). Entries past a row's ``ceil(seq_lens[i] / block_size)``
                blocks are ignored.
            seq_lens: ``[num_seqs]`` ints (tensor or list), ``0 <= seq_lens[i] <= max_blocks *
                block_size``.
            block_size: tokens per block of the pool.
            device: where the plan lives; the node tables are read by reference from a
                contiguous int32 copy of ``block_tables`` on ``device`` (``block_tables`` itself
                when it already is one).
            kv_chunk_size, max_seqs_per_item: as in :meth:`from_paths`.

        Host work is O(table entries + largest block id), vectorised (a sort of the used
        entries only when a block id is read at two positions or to two lengths).
        ``kv_bytes(layout, ...)["shared"]`` counts each shared block's tokens once.
        """
        block_size = positive_int(block_size, "block_size")
        chunk = _kv_chunk(kv_chunk_size, block_size)
        seqs_per_item = _seqs_per_item(max_seqs_per_item)
        device = as_device(device)
        tables = _block_table_tensor(block_tables)                 # int [S, B], CPU or device
        num_seqs, width = tables.shape
        lens = _seq_len_tensor(seq_lens, num_seqs).to(torch.int64)     # int64 [S], CPU
        if num_seqs and (int(lens.min()) < 0 or int(lens.max()) > width * block_size):
            raise ValueError(f"seq_lens must lie in [0, max_blocks * block_size = "
                             f"{width * block_size}], got values in [{int(lens.min())}, "
                             f"{int(lens.max())}]")
        host_tables = tables.cpu().numpy().astype(np.int64)          # [S, B]
        paths, lengths, page_starts, max_block_id = block_table_nodes(host_tables, lens.numpy(),
                                                                      block_size)

        def node_tables() -> list[list[int]]:
            flat = host_tables.reshape(-1)
            return [flat[s:s + -(-n // block_size)].tolist() for s, n in zip(page_starts, lengths)]

        pages = tables.to(device, torch.int32).contiguous().view(-1)
        return cls._plan(paths, None, lengths, block_size, chunk, device, seqs_per_item,
                         page_starts=page_starts, page_table=pages, node_tables=node_tables,
                         max_block_id=max_block_id)

    @classmethod
    def _plan(cls, paths: list[list[int]], tables: list[list[int]] | None, lengths: list[int],
              block_size: int, chunk: int | None, device,
              seqs_per_item: int = MAX_SEQS_PER_ITEM, *, page_starts: list[int] | None = None,
              page_table: torch.Tensor | None = None, node_tables=None,
              max_block_id: int | None = None) -> "TreeLayout":
        """The plan of already validated inputs (what :meth:`from_paths` checks), which it keeps
        by reference. ``chunk`` is a fixed split-KV chunk (a multiple of block_size) or None
        (adaptive).

        Either ``tables`` (lists of block ids: the page table is their concatenation, uploaded
        with the plan), or an external ``page_table`` (int32 1-D on ``device``) with each node's
        ``page_starts`` in it, its ``node_tables`` (lists, or a callable making them, for the
        host-side users) and ``max_block_id``: then the plan costs O(sequences + path nodes +
        work items) host work, whatever the nodes' lengths.
        """
        min_chunk = chunk if chunk is not None else _round_up(DEFAULT_KV_CHUNK, block_size)
        num_seqs = len(paths)
        num_nodes = len(lengths)

        # Kernel order: lexicographic by path, so sequences under a node are contiguous.
        order = sorted(range(num_seqs), key=paths.__getitem__)

        if tables is not None:
            page_starts = []
            offset = 0
            for table in tables:
                page_starts.append(offset)
                offset += len(table)
            node_tables = tables

        # Kernel positions of the sequences that read each node, ascending.
        node_positions: list[list[int]] = [[] for _ in range(num_nodes)]
        for p, seq in enumerate(order):
            for j in paths[seq]:
                node_positions[j].append(p)

        # Work items: Python ints for the common short items (leaves), numpy blocks for the
        # runs that split into many (a long shared prefix), so host work grows with the number
        # of runs, not with their chunks. Partial rows: every (sequence, node) pair is one
        # arithmetic segment (first, stride, count) of rows, expanded by numpy at the end.
        work_parts: list = []
        work: list[int] = []   # WORK_FIELDS per item, flattened
        num_work = 0
        segments: list[list[int]] = [[] for _ in range(num_seqs)]   # (first, stride, count)...
        num_partials = 0
        max_q_len = 0
        table_max = -1
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
            if positions[-1] - positions[0] + 1 == len(positions):   # one run: always in a tree
                runs = [(positions[0], len(positions))]
            else:
                runs = []
                start = prev = positions[0]
                for p in positions[1:]:
                    if p != prev + 1:
                        runs.append((start, prev - start + 1))
                        start = p
                    prev = p
                runs.append((start, prev - start + 1))
            for run_start, run_len in runs:
                run_chunk = chunk
                if run_chunk is None:   # adaptive: at least the target, balanced (no short tail)
                    target = max(min_chunk, KV_CHUNK_TOKENS_PER_SEQ * run_len)
                    num_chunks = max(1, length // target)
                    run_chunk = _round_up(-(-length // num_chunks), block_size)
                num_chunks = -(-length // run_chunk)
                num_groups = -(-run_len // seqs_per_item)
                # Chunk-major: the run's groups over one chunk are adjacent work items (they run
                # together and the chunk comes from DRAM once). Item (c, g) writes partial rows
                # base + c * run_len + (its sequences' offsets in the run).
                base = num_partials
                if num_chunks * num_groups <= 4:
                    for kv_start in range(0, length, run_chunk):
                        kv_end = min(kv_start + run_chunk, length)
                        for q_start in range(run_start, run_start + run_len, seqs_per_item):
                            q_len = min(seqs_per_item, run_start + run_len - q_start)
                            work += (q_start, q_len, page_starts[j], kv_start, kv_end,
                                     base + (kv_start // run_chunk) * run_len + q_start - run_start)
                else:
                    kv_start = np.arange(num_chunks, dtype=np.int64)[:, None] * run_chunk
                    offset = np.arange(num_groups, dtype=np.int64)[None, :] * seqs_per_item
                    items = np.empty((num_chunks, num_groups, len(WORK_FIELDS)), dtype=np.int64)
                    items[..., 0] = run_start + offset
                    items[..., 1] = np.minimum(seqs_per_item, run_len - offset)
                    items[..., 2] = page_starts[j]
                    items[..., 3] = kv_start
                    items[..., 4] = np.minimum(kv_start + run_chunk, length)
                    items[..., 5] = base + (kv_start // run_chunk) * run_len + offset
                    work_parts += (work, items.reshape(-1))
                    work = []
                num_work += num_chunks * num_groups
                max_q_len = max(max_q_len, min(seqs_per_item, run_len))
                for r, seq in enumerate(order[run_start:run_start + run_len], base):
                    segments[seq] += (r, run_len, num_chunks)
                num_partials += num_chunks * run_len
        work_parts.append(work)

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
        seq_lens = [sum(map(lengths.__getitem__, path)) for path in paths]

        # One int32 buffer holds every tensor of the plan: one copy to the device.
        sizes = {"work_info": num_work * len(WORK_FIELDS), "row_seq": num_seqs,
                 "page_table": page_starts[-1] + len(tables[-1]) if tables else 0,
                 "merge_indptr": num_seqs + 1, "merge_rows": num_partials, "seq_lens": num_seqs}
        slices = {}
        total = 0
        for name in PLAN_FIELDS:
            if name == "page_table" and tables is None:
                continue
            slices[name] = (total, total + sizes[name])
            total += _round_up(sizes[name], _SLICE_ALIGN)
        host_plan = torch.empty(total, dtype=torch.int32)
        host = host_plan.numpy()
        pos = slices["work_info"][0]
        for part in work_parts:
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
        return cls(
            paths=paths, node_lengths=lengths, block_size=block_size,
            device=torch.device(device), kv_chunk_size=chunk, max_seqs_per_item=seqs_per_item,
            host_plan=host_plan, slices=slices, page_starts=page_starts, page_table=page_table,
            node_tables=node_tables, num_work=num_work,
            num_partials=num_partials,
            max_block_id=table_max if max_block_id is None else max_block_id,
            max_seq_len=max(seq_lens, default=0), max_q_len=max_q_len,
        )

    # ------------------------------------------------------------------ plan tensors
    def host_plan(self, name: str) -> torch.Tensor | None:
        """The int32 CPU view of plan field ``name`` (``PLAN_FIELDS``); None for a page table
        read by reference (then :attr:`page_table` is that device tensor)."""
        if name not in self._slices:
            return None
        start, end = self._slices[name]
        view = self._host_plan[start:end]
        return view.view(-1, len(WORK_FIELDS)) if name == "work_info" else view

    def _plan_tensor(self, name: str) -> torch.Tensor:
        if self._device_plan is None:   # one host-to-device copy for every field
            data = host_to_device(self._host_plan, self.device)
            plan = {}
            for field_name, (start, end) in self._slices.items():
                plan[field_name] = data[start:end]
            plan["work_info"] = plan["work_info"].view(self.num_work, len(WORK_FIELDS))
            if self._external_pages is not None:
                plan["page_table"] = self._external_pages
            self._device_plan = plan
        return self._device_plan[name]

    work_info = property(lambda self: self._plan_tensor("work_info"),
                         doc="int32 [num_work, 6] on device: the work items (WORK_FIELDS)")
    row_seq = property(lambda self: self._plan_tensor("row_seq"),
                       doc="int32 [num_seqs] on device: kernel position -> sequence index")
    page_table = property(lambda self: self._plan_tensor("page_table"),
                          doc="int32 [num_pages] on device: block ids (node j's at page_starts[j])")
    merge_indptr = property(lambda self: self._plan_tensor("merge_indptr"),
                            doc="int32 [num_seqs + 1] on device: CSR of partial rows per sequence")
    merge_rows = property(lambda self: self._plan_tensor("merge_rows"),
                          doc="int32 [num_partials] on device: partial row ids")
    seq_lens = property(lambda self: self._plan_tensor("seq_lens"),
                        doc="int32 [num_seqs] on device: tokens on each path")

    @property
    def node_block_tables(self) -> list[list[int]]:
        """``node_block_tables[j]``: the block ids of node ``j``, ``ceil(node_lengths[j] /
        block_size)`` of them or more (lists; made on first access for by-reference layouts)."""
        if callable(self._node_tables):
            self._node_tables = self._node_tables()
        return self._node_tables

    @property
    def external_page_table(self) -> torch.Tensor | None:
        """The device page table this layout reads by reference (a ``TreeKVCache``'s block
        tables, ``from_block_tables``' table), or None when its tables are part of the plan."""
        return self._external_pages

    @property
    def num_page_entries(self) -> int:
        """Entries of :attr:`page_table` (what ``TreeAttentionWrapper(max_blocks=)`` must hold)."""
        if self._external_pages is not None:
            return self._external_pages.numel()
        start, end = self._slices["page_table"]
        return end - start

    # ------------------------------------------------------------------ properties
    @property
    def num_seqs(self) -> int:
        return len(self.paths)

    @property
    def num_nodes(self) -> int:
        return len(self.node_lengths)

    def seq_slots(self) -> torch.Tensor:
        """int64 ``[num_seqs, max_seq_len]``: flat pool slot (``block * block_size + offset``) of
        every token on each path, padded with -1. The per-path definition and benchmarks use it;
        built once."""
        if self._seq_slots is None:
            slots = torch.full((self.num_seqs, self.max_seq_len), -1, dtype=torch.int64)
            for i, path in enumerate(self.paths):
                pos = 0
                for j in path:
                    n = self.node_lengths[j]
                    if n == 0:
                        continue
                    slots[i, pos:pos + n] = self._node_slots(j)
                    pos += n
            self._seq_slots = slots.to(self.device)
        return self._seq_slots

    def _node_slots(self, j: int) -> torch.Tensor:
        """int64 ``[node_lengths[j]]`` (CPU): the flat pool slot of each token of node ``j``."""
        t = torch.arange(self.node_lengths[j])
        table = torch.tensor(self.node_block_tables[j], dtype=torch.int64)
        return table[t // self.block_size] * self.block_size + t % self.block_size

    def shared_node_slots(self) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """The torch backend's plan, built once: ``(private, shared)``.

        ``private``: int64 ``[num_seqs, T]``, the flat pool slots of the tokens of the nodes only
        that sequence reads, padded with -1. ``shared``: one ``(seqs, slots)`` per non-empty node
        read by two or more sequences: int64 ``[s]`` sequence indices and int64 ``[n]`` the node's
        slots, so the reference reads the node's KV once for all of them.
        """
        if self._shared_plan is None:
            readers: dict[int, list[int]] = {}
            for i, path in enumerate(self.paths):
                for j in path:
                    readers.setdefault(j, []).append(i)
            private_lens = [sum(self.node_lengths[j] for j in path if len(readers[j]) == 1)
                            for path in self.paths]
            private = torch.full((self.num_seqs, max(private_lens, default=0)), -1,
                                 dtype=torch.int64)
            for i, path in enumerate(self.paths):
                pos = 0
                for j in path:
                    if len(readers[j]) == 1 and self.node_lengths[j] > 0:
                        private[i, pos:pos + self.node_lengths[j]] = self._node_slots(j)
                        pos += self.node_lengths[j]
            shared = [(torch.tensor(seqs, dtype=torch.int64, device=self.device),
                       self._node_slots(j).to(self.device))
                      for j, seqs in readers.items() if len(seqs) > 1 and self.node_lengths[j] > 0]
            self._shared_plan = (private.to(self.device), shared)
        return self._shared_plan

    def kv_bytes(self, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> dict[str, int]:
        """K and V bytes one call reads (all heads, one layer): the traffic, not the footprint.

        ``shared``: what the tree kernel reads: every node's tokens once per run of readers
        (sequences adjacent in kernel order, the sorted paths: the work items of one chunk
        over the groups of a run are launched side by side and read the chunk once). In a tree
        a node has one run. A block held by two nodes (at two path positions, or read to two
        lengths) is read, and counted, once per node; distinct bytes can be fewer.
        ``unshared``: every sequence reading its whole path (paged decode), ``sum(seq_lens)``
        tokens.
        """
        per_token = 2 * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
        last_reader = [-2] * self.num_nodes   # kernel position of each node's previous reader
        read_tokens = 0
        for position, path in enumerate(sorted(self.paths)):
            for j in path:
                if last_reader[j] != position - 1:   # a new run of readers reads the node again
                    read_tokens += self.node_lengths[j]
                last_reader[j] = position
        path_tokens = sum(self.node_lengths[j] for path in self.paths for j in path)
        return {"shared": read_tokens * per_token, "unshared": path_tokens * per_token}

    def to(self, device) -> "TreeLayout":
        """The same plan with its tensors on ``device``."""
        return TreeLayout.from_paths(self.paths, self.node_block_tables, self.node_lengths,
                                     self.block_size, device, kv_chunk_size=self.kv_chunk_size,
                                     max_seqs_per_item=self.max_seqs_per_item)


def kv_bytes(layout: TreeLayout, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> dict[str, int]:
    """K and V bytes one tree decode call reads with sharing (``"shared"``: what the tree kernel
    reads) and without (``"unshared"``: paged decode); see :meth:`TreeLayout.kv_bytes`."""
    return layout.kv_bytes(num_kv_heads, head_dim, dtype)
