"""IncrementalTreePlanner: the plan of a paged decode step, kept between steps.

:meth:`TreeLayout.from_block_tables` discovers the tree of a decode batch from its block tables
in O(table entries) host work every step. Between two decode steps of an engine such as vLLM,
almost nothing changes: every row grows by one token, and now and then a row crosses a block
boundary and gets one fresh block at the end of its table. The sharing (which rows read which
blocks) changes only when the batch gains or loses a request, or when rows are reordered.

The planner splits the plan of a step in two:

* the *shared part*: every node of the tree except each row's private leaf (the tokens after
  the last block the row shares with another row), planned by ``TreeLayout._plan`` when the
  sharing changes (a *replan*: :func:`a2r_kernels.block_table_tree.block_table_nodes`,
  O(table entries));
* the *tails*: row ``i``'s tokens ``[tail_start[i], seq_lens[i])``, read by row ``i`` only,
  from its own table row by reference (``page_start = i * W + tail_start[i] // block_size``),
  in fixed chunks of ``chunk`` tokens (the last one shorter). ``tail_start`` is a multiple of
  ``block_size`` (a node starts at a block boundary).

A step is *incremental* when, against the last step, the batch has the same rows (same count,
same table width), no row shrank, every row that grew may grow (its tail starts at a block
boundary), the table entries the last step read are unchanged, and the entries new to this step
are fresh (no row read them before, none twice). Then only the tails change: when every tail
keeps its number of work items (the common step) only the last items' ends, ``seq_lens`` and
the tail lengths are written, in place; else the tail items, partial rows and merge CSR are
rewritten, O(rows + work items). The check reads the table entries the last step read, once
(O(rows + entries), a memcmp per row). Anything else is a replan (O(table entries)).

Where ``a2r_kernels._cpu`` was built and the host table is a C-contiguous int32 array (what
vLLM keeps), the check, the step's writes and the replan's tree run in C++
(``csrc/cpu/block_table_plan.cpp``: a few calls per step, no numpy call per row); the numpy
code here and in :mod:`a2r_kernels.block_table_tree` is the reference they are tested
against, and runs otherwise.

The plan equals a fresh ``from_block_tables`` plan (same paths, node tokens, readers and KV
bytes; the long private tails are chunked by the fixed chunk instead of the adaptive one, so
work items differ, not the result): ``tests/test_incremental_plan.py`` holds the two equal over
random step sequences.

Buffers: the int32 host plan lives in one numpy buffer that the planner reuses (grown by
doubling when a plan needs more), so a step allocates no tensor storage. A layout returned by
:meth:`IncrementalTreePlanner.plan` is valid until the next call (its host plan is overwritten
then); copy what must outlive it (``TreeAttentionWrapper.plan`` does).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .block_table_tree import planner_extension, block_table_nodes
from .layout import TreeLayout
from .plan_builder import (DEFAULT_KV_CHUNK, PLAN_FIELDS, aligned_slices, kv_chunk, round_up,
                           seqs_per_item)
from .vocab import INT32_MAX, WORK_FIELDS, positive_int
from .wrapper import TreeAttentionWrapper, default_capacities

__all__ = ["DecodeStepPlanner", "IncrementalTreePlanner"]

_HOST_FIELDS = tuple(name for name in PLAN_FIELDS if name != "page_table")
_NUM_FIELDS = len(WORK_FIELDS)
# Statuses of the C++ append_step (csrc/cpu/block_table_plan.h).
_APPENDED, _NOT_APPENDED, _BAD_BLOCK_ID, _GROW_BLOCK_IDS, _BAD_LENGTH = range(5)


class _Paths(Sequence):
    """``layout.paths`` of an incremental plan, made on first use: row ``i``'s shared path,
    then its tail node when the tail holds tokens (its node length is not 0)."""

    def __init__(self, shared: list[list[int]], tail_node: list[int], lengths: list[int]):
        self._parts = (shared, tail_node, lengths)
        self._paths: list[list[int]] | None = None

    def _materialise(self) -> list[list[int]]:
        if self._paths is None:
            shared, tail_node, lengths = self._parts
            self._paths = [path + [node] if lengths[node] else path
                           for path, node in zip(shared, tail_node)]
        return self._paths

    def __len__(self) -> int:
        return len(self._parts[0])

    def __getitem__(self, index):
        return self._materialise()[index]

    def __eq__(self, other) -> bool:
        return list(self._materialise()) == list(other)


class _SharedPart:
    """What a replan fixes until the next one (see the module docstring). Arrays by row index
    unless named ``*_by_pos`` (kernel order)."""

    def __init__(self, tables: np.ndarray, lens: np.ndarray, block_size: int,
                 chunk: int | None, seqs_per_item: int, page_table: torch.Tensor, device):
        num_rows, width = tables.shape
        paths, lengths, page_starts, max_block_id = block_table_nodes(tables, lens, block_size)
        # Plain Python on the rows' few nodes: cheaper than numpy calls at these sizes.
        readers = [0] * len(lengths)
        for path in paths:
            for j in path:
                readers[j] += 1
        shared_paths, tail_node, tail_start = [], [], []
        extra = len(lengths)
        for path, length in zip(paths, lens.tolist()):
            if path and readers[path[-1]] == 1:          # a private leaf: the row's tail
                shared_paths.append(path[:-1])
                tail_node.append(path[-1])
                tail_start.append(length - lengths[path[-1]])
            else:                                         # an empty tail, after the last node
                shared_paths.append(path)
                tail_node.append(extra)
                tail_start.append(length)
                extra += 1
        lengths = lengths + [0] * (extra - len(lengths))
        page_starts = page_starts + [0] * (extra - len(page_starts))
        for node in tail_node:                            # tails are planned per step
            lengths[node] = 0
        plan = TreeLayout._plan(shared_paths, None, lengths, block_size, chunk, device,
                                seqs_per_item, page_starts=page_starts, page_table=page_table,
                                node_tables=list, max_block_id=max_block_id)
        self.num_rows, self.width = num_rows, width
        self.paths = shared_paths
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.page_starts = np.asarray(page_starts, dtype=np.int64)
        self.tail_node = np.asarray(tail_node, dtype=np.int64)
        self.tail_node_list = tail_node
        self.tail_start = np.asarray(tail_start, dtype=np.int64)
        self.page_starts[self.tail_node] = (np.arange(num_rows) * width
                                            + self.tail_start // block_size)
        self.page_starts_list = self.page_starts.tolist()
        self.can_grow = self.tail_start % block_size == 0
        self.unique_tokens = sum(n for n, count in zip(self.lengths.tolist(), readers) if count)
        self.work = plan.host_plan("work_info").numpy().copy()
        self.row_seq = plan.host_plan("row_seq").numpy().copy()
        self.pos_of_row = np.empty(num_rows, dtype=np.int64)
        self.pos_of_row[self.row_seq] = np.arange(num_rows)
        self.indptr = indptr = plan.host_plan("merge_indptr").numpy().astype(np.int64)
        self.count = np.diff(indptr)                      # shared partial rows per row
        self.rows = plan.host_plan("merge_rows").numpy().copy()
        self.local = np.arange(self.rows.size) - np.repeat(indptr[:-1], self.count)
        self.num_partials = plan.num_partials
        self.max_q_len = plan.max_q_len
        self.max_block_id = max_block_id
        # The entries the step read, and which block ids they hold (fresh-block checks).
        self.kept = np.array(tables, dtype=np.int32, copy=True)
        self.in_use = np.zeros(max_block_id + 1, dtype=bool)
        ext = planner_extension()
        if ext is not None and tables.dtype == np.int32 and tables.flags.c_contiguous:
            ext.mark_used_blocks(tables, lens, block_size, self.in_use)
        else:
            num_used = -(-lens // block_size)
            self.in_use[tables[np.arange(width)[None, :] < num_used[:, None]]] = True
        self.slot: np.ndarray | None = None   # scratch of the numpy check (duplicates)
        self.lens = lens.copy()

    def grow_block_ids(self, size: int) -> None:
        """Room in ``in_use`` and ``slot`` for block ids below ``size`` (doubling)."""
        size = max(size, 2 * self.in_use.size)
        in_use = np.zeros(size, dtype=bool)
        in_use[:self.in_use.size] = self.in_use
        self.in_use, self.slot = in_use, None


class IncrementalTreePlanner:
    """Plans the decode steps of a paged batch, keeping the tree between steps.

    ``planner.plan(tables, seq_lens)`` returns what ``TreeLayout.from_block_tables(tables,
    seq_lens, block_size, device)`` would plan (module docstring), usually without discovering
    the tree again.

    Args:
        block_size: tokens per block of the pool.
        device: where the layouts' tensors live (the device of q and the pool).
        kv_chunk_size, max_seqs_per_item: as :meth:`TreeLayout.from_paths`, for the shared part;
            the tails are chunked by ``kv_chunk_size`` (default ``DEFAULT_KV_CHUNK`` rounded up
            to whole blocks).

    Counters: ``replans`` and ``incremental_steps`` since construction.
    """

    def __init__(self, block_size: int, device="cpu", *, kv_chunk_size: int | None = None,
                 max_seqs_per_item: int | None = None):
        self.block_size = positive_int(block_size, "block_size")
        self.device = torch.device(device)
        self.kv_chunk_size = kv_chunk(kv_chunk_size, self.block_size)
        self.max_seqs_per_item = seqs_per_item(max_seqs_per_item)
        self.tail_chunk = self.kv_chunk_size or round_up(DEFAULT_KV_CHUNK, self.block_size)
        self.replans = 0
        self.incremental_steps = 0
        self._shared: _SharedPart | None = None
        self._buffer = np.zeros(1024, dtype=np.int32)
        self._host_plan = torch.from_numpy(self._buffer)
        self._kv_tokens = (0, 0)
        self._tails: _Tails | None = None # the tails' plan structure of the last step
        self._cached_inputs: tuple | None = None   # see _inputs

    def reset(self) -> None:
        """Forget the kept tree: the next :meth:`plan` replans."""
        self._shared = None

    def kv_tokens(self) -> tuple[int, int]:
        """Of the last plan: ``(tokens read with sharing, tokens of all paths)`` (KV bytes are
        these times ``2 * num_kv_heads * head_dim * element size``, per layer)."""
        return self._kv_tokens

    def plan(self, block_tables, seq_lens, page_table: torch.Tensor | None = None) -> TreeLayout:
        """The layout of this step.

        Args:
            block_tables: int ``[S, W]`` block ids on the host (numpy array, or a CPU tensor,
                read in place); row ``i`` reads token ``t`` at ``(block_tables[i, t //
                block_size], t % block_size)``; entries past a row's used blocks are ignored.
            seq_lens: int ``[S]`` (numpy or CPU tensor), ``0 <= seq_lens[i] <= W * block_size``.
            page_table: the same table as int32 ``[S * W]`` (or ``[S, W]``, viewed flat) on
                ``device``, which the layout reads by reference (e.g. vLLM's device block
                table); default: ``block_tables`` itself when it is a contiguous int32 table
                and ``device`` is the CPU.

        Returns a :class:`TreeLayout`, valid until the next call.
        """
        tables, pages, ext = self._inputs(block_tables, page_table)
        lens = self._check_lens(seq_lens, tables.shape[0])
        shared = self._shared
        if shared is None or not self._append_only(shared, tables, lens, ext):
            self._check_range(tables, lens)
            shared = self._shared = _SharedPart(tables, lens, self.block_size,
                                                self.kv_chunk_size, self.max_seqs_per_item,
                                                pages, self.device)
            self.replans += 1
        else:
            self.incremental_steps += 1
        return self._layout(shared, lens, pages)

    # ------------------------------------------------------------------ inputs
    def _inputs(self, block_tables, page_table) -> tuple:
        """``(tables as numpy, flat page table, the C++ planner or None)``. An engine hands over
        the same buffers every step, often as fresh views (vLLM slices its table per step):
        checked once per (table, page table) memory with the same shape, dtype and strides.
        The cache holds the checked views, so their memory cannot be freed and handed to
        another buffer while the signature is compared against it."""
        signature = _signature(block_tables, page_table)
        cached = self._cached_inputs
        if cached is not None and signature[0] is not None and cached[0] == signature:
            return cached[1]
        tables = block_tables.numpy() if isinstance(block_tables, torch.Tensor) else block_tables
        if not isinstance(tables, np.ndarray) or tables.ndim != 2 or \
                tables.dtype.kind not in "iu":
            raise ValueError(f"block_tables must be an int [num_seqs, max_blocks] host array, "
                             f"got {getattr(tables, 'dtype', type(tables).__name__)} "
                             f"{getattr(tables, 'shape', '')}")
        pages = self._page_table(tables, page_table)
        ext = planner_extension()
        if tables.dtype != np.int32 or not tables.flags.c_contiguous:
            ext = None                     # the numpy reference reads any int table
        inputs = (tables, pages, ext)
        self._cached_inputs = (signature, inputs)
        return inputs

    @staticmethod
    def _check_lens(seq_lens, num_rows: int) -> np.ndarray:
        lens = seq_lens.numpy() if isinstance(seq_lens, torch.Tensor) else np.asarray(seq_lens)
        if lens.shape != (num_rows,) or lens.dtype.kind not in "iu":
            raise ValueError(f"seq_lens must be ints [num_seqs={num_rows}], got "
                             f"{lens.dtype} {lens.shape}")
        return lens.astype(np.int64)   # a copy: kept as the step's lengths

    def _check_range(self, tables: np.ndarray, lens: np.ndarray) -> None:
        """ValueError unless ``0 <= lens <= W * block_size`` (the incremental step checks the
        same in C++)."""
        capacity = tables.shape[1] * self.block_size
        if lens.size and (int(lens.min()) < 0 or int(lens.max()) > capacity):
            raise ValueError(f"seq_lens must lie in [0, max_blocks * block_size = {capacity}], "
                             f"got values in [{int(lens.min())}, {int(lens.max())}]")

    def _page_table(self, tables: np.ndarray, page_table) -> torch.Tensor:
        if page_table is None:
            if self.device.type != "cpu" or tables.dtype != np.int32 or \
                    not tables.flags.c_contiguous:
                raise ValueError("page_table is required unless block_tables is a contiguous "
                                 "int32 host table and the device is the CPU")
            return torch.from_numpy(tables).view(-1)
        if not isinstance(page_table, torch.Tensor) or page_table.dtype != torch.int32 or \
                page_table.numel() != tables.size or page_table.device.type != self.device.type:
            raise ValueError(f"page_table must be int32 with {tables.size} entries on "
                             f"{self.device}, got {getattr(page_table, 'dtype', None)} "
                             f"{tuple(getattr(page_table, 'shape', ()))}")
        return page_table.reshape(-1)

    # ------------------------------------------------------------------ the incremental check
    def _append_only(self, shared: _SharedPart, tables: np.ndarray, lens: np.ndarray,
                     ext) -> bool:
        """True when this step only grows the tails of the kept plan (module docstring); then
        the fresh entries are recorded in ``shared``. The C++ twin ``ext`` (``a2r_kernels._cpu``,
        for int32 C-contiguous tables), else :meth:`_append_only_numpy` (the reference)."""
        if tables.shape != (shared.num_rows, shared.width):
            return False
        if ext is None:
            return self._append_only_numpy(shared, tables, lens)
        status, value = ext.append_step(tables, shared.kept, lens, shared.lens,
                                        shared.can_grow, shared.in_use, self.block_size)
        if status == _GROW_BLOCK_IDS:
            shared.grow_block_ids(value + 1)
            status, value = ext.append_step(tables, shared.kept, lens, shared.lens,
                                            shared.can_grow, shared.in_use, self.block_size)
        if status == _BAD_LENGTH:
            self._check_range(tables, lens)   # raises
        if status == _BAD_BLOCK_ID:
            raise ValueError(f"block_tables[{value}] holds a block id outside "
                             f"[0, {INT32_MAX}] within seq_lens")
        if status != _APPENDED:
            return False
        shared.max_block_id = max(shared.max_block_id, value)
        return True

    def _append_only_numpy(self, shared: _SharedPart, tables: np.ndarray,
                           lens: np.ndarray) -> bool:
        """:meth:`_append_only` in numpy, on tables of any int dtype and layout."""
        self._check_range(tables, lens)
        grew = lens - shared.lens
        if (grew < 0).any() or ((grew > 0) & ~shared.can_grow).any():
            return False
        old_used = -(-shared.lens // self.block_size)
        if old_used.size:
            low, high = int(old_used.min()), int(old_used.max())
            if not np.array_equal(tables[:, :low], shared.kept[:, :low]):
                return False
            if high > low:
                differs = tables[:, low:high] != shared.kept[:, low:high]
                if (differs & (np.arange(low, high)[None, :] < old_used[:, None])).any():
                    return False
        used = -(-lens // self.block_size)
        rows = np.nonzero(used > old_used)[0]
        if rows.size:
            count = used[rows] - old_used[rows]
            first = np.repeat(np.cumsum(count) - count, count)
            row = np.repeat(rows, count)
            col = np.repeat(old_used[rows], count) + np.arange(first.size) - first
            fresh = tables[row, col].astype(np.int64)
            if int(fresh.min()) < 0 or int(fresh.max()) > INT32_MAX:
                raise ValueError(f"block_tables[{int(row[0])}] holds a block id outside "
                                 f"[0, {INT32_MAX}] within seq_lens")
            top = int(fresh.max())
            if top >= shared.in_use.size:
                shared.grow_block_ids(top + 1)
            if shared.in_use[fresh].any():
                return False                  # a block read before, now at a new place
            if shared.slot is None or shared.slot.size < shared.in_use.size:
                shared.slot = np.zeros(shared.in_use.size, dtype=np.int64)
            where = np.arange(fresh.size)
            shared.slot[fresh] = where
            if (shared.slot[fresh] != where).any():
                return False                  # one fresh block in two places
            shared.in_use[fresh] = True
            shared.kept[row, col] = tables[row, col]
            shared.max_block_id = max(shared.max_block_id, top)
        shared.lens[:] = lens
        return True

    # ------------------------------------------------------------------ the step's layout
    def _layout(self, shared: _SharedPart, lens: np.ndarray, pages: torch.Tensor) -> TreeLayout:
        tails = self._tails
        if tails is None or tails.shared is not shared or not self._advance_tails(tails, lens):
            tails = self._tails = self._write_plan(shared, lens)
        tail_tokens, tokens, longest = tails.sums
        self._kv_tokens = (shared.unique_tokens + tail_tokens, tokens)
        lengths_list, starts_list = tails.lengths.tolist(), shared.page_starts_list
        kept, block_size = shared.kept, self.block_size

        def node_tables() -> list[list[int]]:
            flat = kept.reshape(-1)
            return [flat[s:s + -(-n // block_size)].tolist()
                    for s, n in zip(starts_list, lengths_list)]

        return TreeLayout(
            paths=_Paths(shared.paths, shared.tail_node_list, lengths_list),
            node_lengths=lengths_list, block_size=block_size, device=self.device,
            kv_chunk_size=self.kv_chunk_size, max_seqs_per_item=self.max_seqs_per_item,
            host_plan=tails.host_plan, slices=tails.slices, page_starts=starts_list,
            page_table=pages, node_tables=node_tables, num_work=tails.num_work,
            num_partials=tails.num_partials, max_block_id=shared.max_block_id,
            max_seq_len=longest, max_q_len=tails.max_q_len)

    def _advance_tails(self, tails: _Tails, lens: np.ndarray) -> bool:
        """The common step: every tail keeps its work items (their count), so only the tails'
        last items end later, and the lengths grow: written in place, True. False (nothing
        written) when a tail needs another item. C++ when built, else numpy."""
        shared, chunk = tails.shared, self.tail_chunk
        ext = planner_extension()
        if ext is None and tails.item_row is None:
            return False                      # written by the C++ planner: rewrite
        if ext is not None:
            sums = ext.advance_tails(lens, shared.tail_start, tails.chunks, tails.item_first,
                                     shared.tail_node, chunk, tails.work, tails.seq_lens,
                                     tails.lengths)
            if sums is None:
                return False
            tails.sums = sums
            return True
        tail_len = lens - shared.tail_start
        if not np.array_equal(tails.chunks, -(-tail_len // chunk)):
            return False
        work = tails.work.reshape(-1, _NUM_FIELDS)
        work[:, 4] = np.minimum(tails.kv_start + chunk, tail_len[tails.item_row])
        tails.seq_lens[:] = lens
        tails.lengths[shared.tail_node] = tail_len
        tails.sums = _tail_sums(tail_len, lens)
        return True

    def _buffer_for(self, sizes: dict[str, int]) -> tuple[dict, int]:
        """The fields' slices in the host buffer (grown when too small) and its used length."""
        slices, total = aligned_slices(sizes, _HOST_FIELDS)
        if total > self._buffer.size:
            self._buffer = np.zeros(max(total, 2 * self._buffer.size), dtype=np.int32)
            self._host_plan = torch.from_numpy(self._buffer)
        return slices, total

    def _tails_of(self, shared: _SharedPart, slices: dict, total: int, num_tail: int,
                  **parts) -> _Tails:
        work_start, work_end = slices["work_info"]
        return _Tails(
            shared=shared, slices=slices, host_plan=self._host_plan[:total],
            work=self._buffer[work_start + shared.work.size:work_end],
            seq_lens=self._buffer[slice(*slices["seq_lens"])],
            num_work=shared.work.shape[0] + num_tail, num_partials=shared.num_partials + num_tail,
            max_q_len=max(shared.max_q_len, 1 if num_tail else 0), **parts)

    def _write_plan(self, shared: _SharedPart, lens: np.ndarray) -> _Tails:
        """Write the whole host plan (shared part, tails, merge CSR, lengths) into the buffer;
        return the tails' structure (the views the common step writes). In C++ when built
        (O(rows + work items), no numpy call per item), else :meth:`_write_plan_numpy`."""
        ext = planner_extension()
        if ext is None:
            return self._write_plan_numpy(shared, lens)
        num_rows = shared.num_rows
        chunks = np.empty(num_rows, dtype=np.int64)
        item_first = np.empty(num_rows, dtype=np.int64)
        num_tail = ext.tail_chunks(lens, shared.tail_start, self.tail_chunk, chunks, item_first)
        slices, total = self._buffer_for({
            "work_info": shared.work.size + num_tail * _NUM_FIELDS, "row_seq": num_rows,
            "merge_indptr": num_rows + 1, "merge_rows": shared.rows.size + num_tail,
            "seq_lens": num_rows})
        lengths = shared.lengths.copy()
        sums = ext.write_step_plan(
            shared.work.reshape(-1), shared.row_seq, shared.indptr, shared.rows,
            shared.pos_of_row, shared.tail_start, shared.tail_node, shared.num_partials,
            shared.width, self.block_size, self.tail_chunk, lens, chunks, item_first,
            self._buffer, [slices[name][0] for name in _HOST_FIELDS], lengths)
        return self._tails_of(shared, slices, total, num_tail, chunks=chunks,
                              item_first=item_first, item_row=None, kv_start=None,
                              lengths=lengths, sums=sums)

    def _write_plan_numpy(self, shared: _SharedPart, lens: np.ndarray) -> _Tails:
        """:meth:`_write_plan` in numpy (the reference)."""
        num_rows, block_size, chunk = shared.num_rows, self.block_size, self.tail_chunk
        tail_len = lens - shared.tail_start
        chunks = -(-tail_len // chunk)
        num_tail = int(chunks.sum())
        # Tail work items (row order, chunk order) and their partial rows after the shared ones.
        item_row = np.repeat(np.arange(num_rows), chunks)
        item_first = np.cumsum(chunks) - chunks
        first_of_item = np.repeat(item_first, chunks)
        kv_start = (np.arange(num_tail) - first_of_item) * chunk
        tail_items = np.empty((num_tail, _NUM_FIELDS), dtype=np.int64)
        tail_items[:, 0] = shared.pos_of_row[item_row]
        tail_items[:, 1] = 1
        tail_items[:, 2] = item_row * shared.width + shared.tail_start[item_row] // block_size
        tail_items[:, 3] = kv_start
        tail_items[:, 4] = np.minimum(kv_start + chunk, tail_len[item_row])
        tail_items[:, 5] = shared.num_partials + np.arange(num_tail)
        # Merge CSR by row: its shared partial rows, then its tail's.
        count = shared.count + chunks
        indptr = np.zeros(num_rows + 1, dtype=np.int64)
        np.cumsum(count, out=indptr[1:])
        merge_rows = np.empty(int(indptr[-1]), dtype=np.int64)
        merge_rows[np.repeat(indptr[:-1], shared.count) + shared.local] = shared.rows
        merge_rows[np.repeat(indptr[:-1] + shared.count, chunks)
                   + np.arange(num_tail) - first_of_item] = tail_items[:, 5]

        values = {"work_info": (shared.work.reshape(-1), tail_items.reshape(-1)),
                  "row_seq": (shared.row_seq,), "merge_indptr": (indptr,),
                  "merge_rows": (merge_rows,), "seq_lens": (lens,)}
        slices, total = self._buffer_for({name: sum(part.size for part in parts)
                                          for name, parts in values.items()})
        for name in _HOST_FIELDS:
            pos = slices[name][0]
            for part in values[name]:
                self._buffer[pos:pos + part.size] = part
                pos += part.size
        lengths = shared.lengths.copy()
        lengths[shared.tail_node] = tail_len
        return self._tails_of(shared, slices, total, num_tail, chunks=chunks,
                              item_first=item_first, item_row=item_row, kv_start=kv_start,
                              lengths=lengths, sums=_tail_sums(tail_len, lens))


def _signature(block_tables, page_table) -> tuple:
    """What must not change for :meth:`IncrementalTreePlanner._inputs` to reuse its checks: each
    table's type, memory, shape, dtype and strides (None for what is neither a tensor nor an
    array: never reused)."""
    return _memory(block_tables), _memory(page_table)


def _memory(value) -> tuple | None:
    if isinstance(value, torch.Tensor):
        return ("tensor", value.device, value.data_ptr(), value.shape, value.dtype, value.stride())
    if isinstance(value, np.ndarray):
        return ("array", value.ctypes.data, value.shape, value.dtype, value.strides)
    return None


def _tail_sums(tail_len: np.ndarray, lens: np.ndarray) -> tuple[int, int, int]:
    """(tail tokens, tokens, longest row) of a step."""
    return int(tail_len.sum()), int(lens.sum()), int(lens.max()) if lens.size else 0


@dataclass
class _Tails:
    """The tails' part of the host plan of the last step (IncrementalTreePlanner._write_plan):
    per row its item count ``chunks`` and first tail item ``item_first``; per tail item its
    row and first token (numpy path; None when the C++ planner wrote the plan); views of the
    buffer the common step writes (``work``: the tail items, flat; ``seq_lens``); every
    node's ``lengths`` (tails included); ``sums``: ``(tail tokens, tokens, longest row)``."""

    shared: _SharedPart
    chunks: np.ndarray
    item_first: np.ndarray
    item_row: np.ndarray | None
    kv_start: np.ndarray | None
    slices: dict
    host_plan: torch.Tensor
    work: np.ndarray
    seq_lens: np.ndarray
    lengths: np.ndarray
    sums: tuple
    num_work: int
    num_partials: int
    max_q_len: int


class DecodeStepPlanner:
    """The decode-step plan of one KV-cache group, kept between steps.

    An :class:`IncrementalTreePlanner` over the engine's host block table (no device read),
    and optionally a :class:`~a2r_kernels.TreeAttentionWrapper` whose fixed buffers each step
    is planned into (what a captured CUDA graph replays). Per step the host does O(rows)
    work (plus one read of the table entries) unless the batch's sharing changed, and
    allocates no tensor storage.

    Args:
        block_size: tokens per KV block.
        device: the model's device.
        wrapper_shape: ``(num_q_heads, num_kv_heads, head_size, dtype, max_seqs, num_blocks)``
            to plan into a wrapper (made at the first step, when the table's width is known),
            or None (the public op runs the layout).
    """

    def __init__(self, block_size: int, device, wrapper_shape: tuple | None = None):
        self.planner = IncrementalTreePlanner(block_size, device)
        self.wrapper: TreeAttentionWrapper | None = None
        self._wrapper_shape = wrapper_shape
        self._block_size = block_size
        self._device = torch.device(device)

    def plan(self, host_table, device_table: torch.Tensor, seq_lens_host) -> TreeLayout:
        """``host_table``: int32 ``[S, W]`` block ids on the host (CPU tensor or numpy);
        ``device_table``: the same table on ``device`` (the same tensor on the CPU), contiguous
        rows, read by reference; ``seq_lens_host``: int ``[S]`` on the host."""
        layout = self.planner.plan(host_table, seq_lens_host, device_table.view(-1))
        if self._wrapper_shape is not None:
            if self.wrapper is None:
                self.wrapper = self._make_wrapper(device_table.shape[1])
            self.wrapper.plan(layout)
        return layout

    def _make_wrapper(self, width: int) -> TreeAttentionWrapper:
        num_q_heads, num_kv_heads, head_size, dtype, max_seqs, num_blocks = self._wrapper_shape
        # vLLM's tables form a trie (prefix caching shares whole prefixes): at most 2 S - 1
        # nodes, plus a tail per row. Work and partial rows: the shared part's adaptive chunks
        # over at most the pool's tokens, and each row's tail in fixed chunks.
        max_nodes = 3 * max_seqs
        work, partials = default_capacities(max_seqs, max_nodes, num_blocks, self._block_size)
        tails = -(-num_blocks * self._block_size // self.planner.tail_chunk) + max_seqs
        return TreeAttentionWrapper(num_q_heads, num_kv_heads, head_size, self._block_size,
                                    max_seqs=max_seqs, max_nodes=max_nodes,
                                    max_blocks=max_seqs * width, dtype=dtype,
                                    device=self._device, max_work=work + tails,
                                    max_partials=partials + tails)
