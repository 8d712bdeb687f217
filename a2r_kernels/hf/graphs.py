"""Decode steps over fixed buffers padded to batch buckets, replayed as CUDA graphs (as in
gpt-fast and nano-vllm's ``capture_cudagraph``).

:class:`DecodeGraphRunner` knows nothing of models or caches: it is given a forward callable and
owns only the step's input buffers and the captured graphs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

# Decode batch buckets: powers of two up to this, then its multiples (nano-vllm's capture sizes):
# a shrinking batch uses a handful of graphs, and a batch just past a power of two pads fewer rows.
BUCKET_STEP = 16


def batch_bucket(batch: int) -> int:
    """The padded size of a decode batch of ``batch >= 1`` rows: the next power of two up to
    ``BUCKET_STEP`` (1, 2, 4, 8, 16), then the next multiple of it (32, 48, 64, ...)."""
    if batch <= BUCKET_STEP:
        return 1 << (batch - 1).bit_length()
    return -(-batch // BUCKET_STEP) * BUCKET_STEP


@dataclass
class StaticBatch:
    """The buffers of one prepared step, views of the runner's (``B`` = the bucket's rows).

    ``input_ids``, ``positions`` int64 ``[B, 1]``; ``slots`` int64 ``[B]``: row ``b < n`` writes
    its K/V into its reserved slot, a padding row into row 0's; ``row_source`` int64 ``[B]``
    (row 0 for a padding row) or None when no row is padding (an eager full bucket);
    ``num_live``: ``n``, the rows that are sequences.
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    row_source: torch.Tensor | None
    num_live: int


class DecodeGraphRunner:
    """A decode step of ``n`` rows run as ``B = batch_bucket(n)`` rows through fixed buffers.

    Args:
        forward: ``forward(batch: StaticBatch) -> logits [B, 1, V]``, the model's forward over the
            batch's buffers (whatever attention plan it reads must be made before :meth:`launch`
            and kept in fixed buffers too: a graph replays what it captured).
        device: where the buffers live.
        use_graphs: capture each bucket's forward into a ``torch.cuda.CUDAGraph`` (CUDA only).

    Buffers, of ``capacity`` rows (a bucket; a larger batch regrows them and drops the graphs):
    ``input_ids``, ``positions`` int64 ``[capacity, 1]`` (rows ``>= n`` keep stale values);
    ``slots``, ``row_source`` int64 ``[capacity]``.

    With graphs, the first step of a bucket runs eagerly (compiling the kernels), then the
    bucket's whole forward, all layers, is captured (one memory pool for all buckets) and replayed
    for every later step of that bucket. Whoever changes what a captured forward reads outside
    these buffers (a regrown attention plan) calls :meth:`drop_graphs`.
    """

    def __init__(self, forward: Callable[[StaticBatch], torch.Tensor], device,
                 use_graphs: bool):
        self.forward = forward
        self.device = device
        self.use_graphs = use_graphs
        self.capacity = 0
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None
        self.batch: StaticBatch | None = None   # the step prepare() made

    def drop_graphs(self) -> None:
        """Forget the captured graphs (they read buffers that are about to change)."""
        self.graphs.clear()
        self.pool = None

    def _grow(self, rows: int) -> None:
        capacity, device = batch_bucket(rows), self.device
        self.input_ids = torch.zeros(capacity, 1, dtype=torch.int64, device=device)
        self.positions = torch.zeros(capacity, 1, dtype=torch.int64, device=device)
        self.slots = torch.zeros(capacity, dtype=torch.int64, device=device)
        self.row_source = torch.zeros(capacity, dtype=torch.int64, device=device)
        self._rows = torch.arange(capacity, dtype=torch.int64, device=device)
        self.capacity = capacity
        self.drop_graphs()

    def reserve_rows(self, rows: int) -> int:
        """Make room for a step of ``rows`` live rows (regrowing drops the graphs); returns its
        bucket, the rows :meth:`prepare` will fill."""
        if rows > self.capacity:
            self._grow(rows)
        return batch_bucket(rows)

    def prepare(self, slots: torch.Tensor, positions: torch.Tensor) -> StaticBatch:
        """Fill the buffers of a step of ``n`` rows but the input ids: their reserved ``slots``
        int64 ``[n]`` and ``positions`` int64 (``[n]`` or more: the first ``n`` are taken), on
        the device. Copies in stream order only, so it may run while the last step is still on
        the GPU; :meth:`launch` runs the step."""
        n = slots.shape[0]
        batch = self.reserve_rows(n)
        # Eager steps of a full bucket skip the padding ops; a graph serves every n of its bucket.
        padded = self.use_graphs or batch > n
        self.positions[:n, 0].copy_(positions[:n])
        self.slots[:n].copy_(slots)
        if padded:
            self.slots[n:batch].copy_(slots[:1].expand(batch - n))
            self.row_source[:n].copy_(self._rows[:n])
            self.row_source[n:batch].zero_()
        self.batch = StaticBatch(self.input_ids[:batch], self.positions[:batch],
                                 self.slots[:batch], self.row_source[:batch] if padded else None,
                                 n)
        return self.batch

    def launch(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Run the prepared step on ``token_ids`` ``[n]`` (on the device). Returns fp32 logits
        ``[n, V]`` (a fresh tensor)."""
        batch = self.batch
        n, rows = batch.num_live, batch.input_ids.shape[0]
        self.input_ids[:n].copy_(token_ids.reshape(n, 1), non_blocking=True)
        if not self.use_graphs:
            return self.forward(batch)[:n, -1, :].float()
        if rows not in self.graphs:
            self.forward(batch)   # warm-up: compiles the kernels outside the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                logits = self.forward(batch)
            self.pool = graph.pool()
            self.graphs[rows] = (graph, logits)
        graph, logits = self.graphs[rows]
        graph.replay()
        # A copy: the graphs' pool reuses the output's memory.
        return logits[:n, -1, :].to(torch.float32, copy=True)
