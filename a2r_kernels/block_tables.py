"""Device copies of the TreeKVCache nodes' block tables, kept across decode steps.

A decode step's plan reads each node's block table by reference (``TreeLayout.page_table`` is a
slice of this arena, ``page_starts[j]`` the node's offset in it), so planning a step costs
O(sequences + nodes), not O(blocks): the host only writes the blocks appended since the node was
last planned, and uploads the written range in one copy.

Storage: one int32 *arena* ``[capacity]`` on the cache's device and its host mirror (pinned on
CUDA; on the CPU the arena itself). A node owns a region ``[offset, offset + room)``; its table
is the prefix ``arena[offset : offset + len(blocks)]``. A node that outgrows its region moves to
a new one of twice its size at the top of the arena (amortised O(1) host work per block; its old
region is left as it was, so earlier layouts that read it stay valid). When the top reaches the
end, the plan starts a fresh arena (the old one stays alive for layouts still holding it) and
packs only its own nodes in it; other nodes move in when they are next planned. As long as no
block belongs to two nodes, a plan's nodes hold at most ``num_blocks`` blocks, so the arena of
``2 * num_blocks`` entries never has to grow (``TreeKVCache.block_table_capacity``).

A node's block list is append-only while it is planned from here; code that removes or replaces
blocks of a node (``TreeKVCache.unreserve``) calls :meth:`NodeBlockTables.invalidate`. A list
that is replaced as a whole (a new list object) is detected and copied again.
"""

from __future__ import annotations

import torch

from .plan_builder import SLICE_ALIGN


class NodeBlockTables:
    """The arena of block tables of one :class:`~a2r_kernels.TreeKVCache`.

    Args:
        capacity: int32 entries of the first arena (``2 * num_blocks`` leaves room for every
            live node to double); later arenas are at least as large.
        device: the cache's device.
    """

    def __init__(self, capacity: int, device: torch.device):
        self.device = device
        self.capacity = max(capacity, 1)
        self._state: dict[object, list] = {}   # node -> [list, offset, room, synced, max_id]
        self._new_arena(self.capacity)

    def _new_arena(self, capacity: int) -> None:
        on_cuda = self.device.type == "cuda"
        self.capacity = capacity
        self.host = torch.zeros(capacity, dtype=torch.int32, pin_memory=on_cuda)
        self.arena = (torch.zeros(capacity, dtype=torch.int32, device=self.device) if on_cuda
                      else self.host)
        self._host_np = self.host.numpy()
        self._state.clear()
        self.top = 0

    def invalidate(self, node) -> None:
        """``node``'s blocks were removed or replaced: copy its table again when next planned."""
        self._state.pop(node, None)

    def sync(self, nodes: list, blocks_of) -> tuple[list[int], torch.Tensor, int]:
        """Bring the tables of ``nodes`` up to date; return ``(page_starts, page_table,
        max_block_id)`` for a layout over them: ``page_table`` is the arena slice spanning their
        regions, ``page_starts[j]`` node ``j``'s offset in it, ``max_block_id`` the largest block
        id in their tables (-1 if none). ``blocks_of(node)`` is the node's block list."""
        # No wait for the last upload: it may still be queued behind the last step's kernels
        # and read the mirror late, but every entry written since then lies past what any
        # earlier layout reads (appends; a node whose blocks change moves to a new region), so a
        # late read only brings such entries over early. (torch keeps pinned memory a pending
        # copy reads alive until the copy is done, across _new_arena too.)
        lo_dirty, hi_dirty = self.capacity, 0
        writes = self._place(nodes, blocks_of, compact=False)
        if writes is None:   # out of room: a fresh arena, this plan's nodes packed at its start
            needed = sum(len(blocks_of(node)) for node in nodes)
            self._new_arena(max(self.capacity, needed))
            writes = self._place(nodes, blocks_of, compact=True)
        host = self._host_np
        for start, values in writes:
            host[start:start + len(values)] = values
            lo_dirty = min(lo_dirty, start)
            hi_dirty = max(hi_dirty, start + len(values))
        if hi_dirty > lo_dirty and self.arena is not self.host:
            self.arena[lo_dirty:hi_dirty].copy_(self.host[lo_dirty:hi_dirty], non_blocking=True)
        starts = [self._state[node][1] for node in nodes]
        lo = min(starts, default=0)
        lo -= lo % SLICE_ALIGN   # the slice keeps the arena's 16-byte alignment
        hi = max((self._state[node][1] + self._state[node][2] for node in nodes), default=0)
        max_id = max((self._state[node][4] for node in nodes), default=-1)
        return [s - lo for s in starts], self.arena[lo:hi], max_id

    def _place(self, nodes, blocks_of, compact: bool):
        """Region bookkeeping for ``nodes``; the host writes to make, or None when the arena is
        full (nothing changed that a fresh arena would not redo). A new region has room for
        twice the node's blocks (``compact``: exactly its blocks, so a fresh arena of
        ``sum(len(blocks))`` entries always holds them)."""
        writes = []
        state = self._state
        for node in nodes:
            blocks = blocks_of(node)
            entry = state.get(node)
            if entry is not None and entry[0] is blocks and len(blocks) >= entry[3]:
                if entry[3] == len(blocks):
                    continue                       # unchanged since the last plan
                if len(blocks) <= entry[2]:        # grown within its region
                    new = blocks[entry[3]:]
                    writes.append((entry[1] + entry[3], new))
                    entry[3] = len(blocks)
                    entry[4] = max(entry[4], max(new))
                    continue
                if entry[1] + entry[2] == self.top and entry[1] + 2 * len(blocks) <= self.capacity:
                    self.top = entry[1] + 2 * len(blocks)   # the topmost region grows in place
                    new = blocks[entry[3]:]
                    writes.append((entry[1] + entry[3], new))
                    entry[2], entry[3] = 2 * len(blocks), len(blocks)
                    entry[4] = max(entry[4], max(new))
                    continue
            room = len(blocks) if compact else 2 * len(blocks)   # empty nodes take no room
            if self.top + room > self.capacity:
                return None
            offset = self.top
            self.top += room
            state[node] = [blocks, offset, room, len(blocks), max(blocks, default=-1)]
            if blocks:
                writes.append((offset, blocks))
        return writes
