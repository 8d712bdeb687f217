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

from typing import Sequence

import numpy as np
import torch

from .backend import as_device
from .block_table_tree import block_table_nodes
from .vocab import INT32_MAX, WORK_FIELDS, int_list, positive_int
# DEFAULT_KV_CHUNK, KV_CHUNK_TOKENS_PER_SEQ and PLAN_FIELDS are re-exported (named in docs here).
from .plan_builder import (DEFAULT_KV_CHUNK, KV_CHUNK_TOKENS_PER_SEQ,  # noqa: F401
                           MAX_SEQS_PER_ITEM, PLAN_FIELDS, build_host_plan, kv_chunk, seqs_per_item)

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


def _rows(x, name: str) -> list:
    """``x`` (a sequence of sequences, or a 2-D tensor) as a list of its rows."""
    if x is None or isinstance(x, (str, bytes)) or not hasattr(x, "__iter__"):
        raise ValueError(f"{name} must be a sequence of int sequences, got {type(x).__name__}")
    return list(x)


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
        chunk = kv_chunk(kv_chunk_size, block_size)
        per_item = seqs_per_item(max_seqs_per_item)

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
        return cls._plan(path_lists, tables, lengths, block_size, chunk, device, per_item)

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
        chunk = kv_chunk(kv_chunk_size, block_size)
        per_item = seqs_per_item(max_seqs_per_item)
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
        return cls._plan(paths, None, lengths, block_size, chunk, device, per_item,
                         page_starts=page_starts, page_table=pages, node_tables=node_tables,
                         max_block_id=max_block_id)

    @classmethod
    def _plan(cls, paths: list[list[int]], tables: list[list[int]] | None, lengths: list[int],
              block_size: int, chunk: int | None, device,
              per_item: int = MAX_SEQS_PER_ITEM, *, page_starts: list[int] | None = None,
              page_table: torch.Tensor | None = None, node_tables=None,
              max_block_id: int | None = None) -> "TreeLayout":
        """The plan of already validated inputs (what :meth:`from_paths` checks), which it keeps
        by reference. ``chunk`` is a fixed split-KV chunk (a multiple of block_size) or None
        (adaptive).

        Either ``tables`` (lists of block ids: the page table is their concatenation, uploaded
        with the plan), or an external ``page_table`` (int32 1-D on ``device``) with each node's
        ``page_starts`` in it, its ``node_tables`` (lists, or a callable making them, for the
        host-side users) and ``max_block_id``: then the plan costs O(sequences + path nodes +
        work items) host work, whatever the nodes' lengths (:func:`plan_builder.build_host_plan`).
        """
        plan = build_host_plan(paths, tables, lengths, block_size, chunk, per_item,
                               page_starts)
        return cls(
            paths=paths, node_lengths=lengths, block_size=block_size,
            device=torch.device(device), kv_chunk_size=chunk, max_seqs_per_item=per_item,
            host_plan=plan.buffer, slices=plan.slices, page_starts=plan.page_starts,
            page_table=page_table, node_tables=tables if tables is not None else node_tables,
            num_work=plan.num_work, num_partials=plan.num_partials,
            max_block_id=plan.table_max if max_block_id is None else max_block_id,
            max_seq_len=plan.max_seq_len, max_q_len=plan.max_q_len,
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
