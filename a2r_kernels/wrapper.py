"""TreeAttentionWrapper: graph-safe plan / run for tree decode attention (API.md section 5).

FlashInfer's split, with every buffer allocated once at construction:

- ``plan(layout)`` (once per decode step, host side) copies the step's :class:`TreeLayout` into
  fixed plan buffers: the layout's int32 host plan is copied into a staging buffer (pinned memory
  on CUDA) and from there to the device in one non-blocking copy; a page table the layout reads
  by reference (``TreeKVCache.layout``, ``TreeLayout.from_block_tables``) is one device-to-device
  copy. Work items past the layout's are zeroed (``q_len = 0``): their programs exit at once.
- ``run(q, k_cache, v_cache)`` (per layer) launches the partial kernel over the *capacity*
  ``max_work`` work items and the merge over ``q.shape[0]`` sequences, reading only the fixed
  buffers: no host work beyond argument checks, no allocation when ``out`` is given, the same
  launches every call. Captured in a CUDA graph, it can be replayed after any later ``plan``.

Buffers (on ``device``):

- plan, int32, one buffer in ``_REGIONS`` order: ``work_info [max_work, 6]``,
  ``row_seq [max_seqs]``, ``merge_indptr [max_seqs + 1]``, ``merge_rows [max_partials]``,
  ``seq_lens [max_seqs]``, ``page_table [max_blocks]``. Past the planned sequences,
  ``merge_indptr`` repeats its last value, so a padded row (``num_seqs <= q.shape[0]``) merges
  nothing: out 0, lse ``-inf``.
- workspace, fp32: ``partial_o [max_partials, Hq, D]``, ``partial_lse [max_partials, Hq]``,
  ``lse [max_seqs, Hq]`` (a caller may pass its own, :meth:`TreeAttentionWrapper.workspace_numel`
  fp32 elements).
"""

from __future__ import annotations

import torch

from .backend import resolve_backend
from .attention_launch import (ATTENTION_DTYPES, WorkPlan, check_decode_inputs, check_out,
                               run_work_items, softmax_scale)
from .vocab import MAX_HEAD_DIM, WORK_FIELDS, positive_int
from .layout import TreeLayout
from .plan_builder import (DEFAULT_KV_CHUNK, KV_CHUNK_TOKENS_PER_SEQ, MAX_SEQS_PER_ITEM,
                           PLAN_FIELDS, aligned_slices)
from .torch_decode import TorchDecodePlan

# Regions of the plan buffer (the layout's PLAN_FIELDS), in order; the page table last, so that a
# layout whose page table lives on the device is staged without it (the host-to-device copy
# stops before that region).
_REGIONS = tuple(name for name in PLAN_FIELDS if name != "page_table") + ("page_table",)
_STAGING_RING = 2   # pinned staging buffers on CUDA (plan t reuses the buffer of plan t - 2)


def default_capacities(max_seqs: int, max_nodes: int, max_blocks: int, block_size: int, *,
                       path_nodes: int | None = None) -> tuple[int, int]:
    """``(max_work, max_partials)`` that hold every plan of the default (adaptive) chunking of a
    tree within the capacities: at most ``max_seqs`` sequences, ``max_nodes`` nodes,
    ``max_blocks`` blocks of ``block_size`` tokens, and ``path_nodes`` (sequence, node) pairs,
    i.e. the paths' lengths summed (default ``2 * max_seqs``: two non-empty nodes per path on
    average, as a prompt tree or an explorer tree of any fan-out one level deep).

    Derivation, for a node of ``n`` tokens read by ``r`` sequences, with ``C = DEFAULT_KV_CHUNK``
    (256), ``K = KV_CHUNK_TOKENS_PER_SEQ`` (16), ``G = MAX_SEQS_PER_ITEM`` (16): it is split into
    ``c <= max(1, n // max(C, K * r))`` chunks, each covered by ``ceil(r / G)`` work items and
    giving one partial row per reader. So its partial rows ``c * r <= max(r, n / K) <= r + n / K``
    and its work items ``<= ceil(r / G)`` (one chunk) or ``<= 2 n / C`` (two or more, since
    ``C = G * K``). Summed over the nodes, with ``T = max_blocks * block_size`` tokens and
    ``P = path_nodes``: partials ``<= P + ceil(T / K)`` and work ``<= max_nodes + ceil(P / G) +
    ceil(2 T / C)``; the defaults add ``max_nodes`` of slack to each.

    A tree here: the sequences reading a node share their path up to it (always so for
    ``TreeKVCache.layout`` and the explorer). Paths that are not a tree, or a fixed
    ``kv_chunk_size``, can need more: size the wrapper from ``layout.num_work`` /
    ``layout.num_partials``. Bounding only by ``max_seqs`` and ``max_nodes`` would mean
    ``P = max_seqs * max_nodes`` (every sequence reading a chain of every node), a workspace of
    ``max_seqs * max_nodes * Hq * (D + 1) * 4`` bytes: hence ``path_nodes``.
    """
    tokens = max_blocks * block_size
    path_nodes = 2 * max_seqs if path_nodes is None else positive_int(path_nodes, "path_nodes")
    max_work = (2 * max_nodes + 2 * -(-tokens // DEFAULT_KV_CHUNK)
                + -(-path_nodes // MAX_SEQS_PER_ITEM))
    max_partials = -(-tokens // KV_CHUNK_TOKENS_PER_SEQ) + path_nodes + max_nodes
    return max_work, max_partials


def _sizing_hint(capacity: str, layout: TreeLayout) -> str:
    """How to size ``max_work`` / ``max_partials`` (constructor arguments) for ``layout``."""
    if capacity not in ("max_work", "max_partials"):
        return ""
    path_nodes = sum(map(len, layout.paths))
    return (f" (a TreeAttentionWrapper argument; its default holds tree layouts whose paths have "
            f"at most 2 * max_seqs nodes together, this one's have {path_nodes}: pass "
            f"{capacity}=ak.wrapper.default_capacities(..., path_nodes={path_nodes})"
            f"[{int(capacity == 'max_partials')}] or >= layout.num_"
            f"{capacity.removeprefix('max_')})")


class TreeAttentionWrapper:
    """Tree decode attention with a fixed workspace: ``plan`` once per step, ``run`` per layer.

    ``w.plan(layout); out = w.run(q, k_cache, v_cache)`` equals
    ``ak.tree_decode_attention(q, k_cache, v_cache, layout)`` (see there for the formula).

    Args:
        num_q_heads, num_kv_heads, head_dim: the attention geometry (``num_q_heads`` a multiple
            of ``num_kv_heads``, ``head_dim <= MAX_HEAD_DIM``); ``q`` is ``[S, num_q_heads, head_dim]``,
            the pools ``[num_blocks, block_size, num_kv_heads, head_dim]``.
        block_size: tokens per block of the pool.
        max_seqs: most sequences of a plan (and rows of ``q``).
        max_nodes: most nodes of a plan's layout.
        max_blocks: most page-table entries of a plan (``layout.num_page_entries``: the nodes'
            blocks for ``from_paths``; the table given to ``from_block_tables``; the cache's
            device block tables, ``cache.block_table_capacity``, for ``TreeKVCache.layout``).
        dtype: dtype of q, the pools and the output (fp16 / bf16 / fp32).
        device: where everything lives.
        backend: ``"auto" | "cuda" | "triton" | "cpu" | "torch"``; ``"torch"`` runs
            :class:`~a2r_kernels.torch_decode.TorchDecodePlan` (one masked SDPA per call over the
            step's tree, planned by :meth:`plan` and advanced from one decode step to the next;
            it allocates and cannot be captured).
        max_work, max_partials: work items and partial rows a plan may have. The defaults
            (:func:`default_capacities`) hold every tree layout of the default chunking within
            ``max_seqs``, ``max_nodes`` and ``max_blocks`` whose paths have at most
            ``2 * max_seqs`` nodes together; for deeper trees pass
            ``default_capacities(..., path_nodes=P)`` (P: the paths' lengths summed), for any
            other layout at least its ``num_work`` / ``num_partials``.
        workspace: optional fp32 tensor on ``device`` of at least :meth:`workspace_numel`
            elements, carved into the partial states and the LSE buffer.

    ``plan`` raises ``ValueError`` naming the capacity a layout exceeds, before it changes
    anything.
    """

    def __init__(self, num_q_heads: int, num_kv_heads: int, head_dim: int, block_size: int, *,
                 max_seqs: int, max_nodes: int, max_blocks: int, dtype: torch.dtype, device,
                 backend: str = "auto", max_work: int | None = None,
                 max_partials: int | None = None, workspace: torch.Tensor | None = None):
        self.num_q_heads = positive_int(num_q_heads, "num_q_heads")
        self.num_kv_heads = positive_int(num_kv_heads, "num_kv_heads")
        self.head_dim = positive_int(head_dim, "head_dim")
        self.block_size = positive_int(block_size, "block_size")
        self.max_seqs = positive_int(max_seqs, "max_seqs")
        self.max_nodes = positive_int(max_nodes, "max_nodes")
        self.max_blocks = positive_int(max_blocks, "max_blocks")
        if num_q_heads % num_kv_heads:
            raise ValueError(f"num_q_heads ({num_q_heads}) must be a multiple of num_kv_heads "
                             f"({num_kv_heads})")
        if head_dim > MAX_HEAD_DIM:
            raise ValueError(f"head_dim must be in [1, {MAX_HEAD_DIM}], got {head_dim}")
        if dtype not in ATTENTION_DTYPES:
            raise ValueError(f"dtype must be one of {ATTENTION_DTYPES}, got {dtype!r}")
        self.dtype = dtype
        self.device = torch.empty(0, device=device).device   # normalised ("cuda" -> "cuda:0")
        self.backend = resolve_backend("tree_decode_attention", backend, self.device)
        work, partials = default_capacities(max_seqs, max_nodes, max_blocks, block_size)
        self.max_work = work if max_work is None else positive_int(max_work, "max_work")
        self.max_partials = (partials if max_partials is None
                             else positive_int(max_partials, "max_partials"))

        sizes = {"work_info": self.max_work * len(WORK_FIELDS), "row_seq": self.max_seqs,
                 "merge_indptr": self.max_seqs + 1, "merge_rows": self.max_partials,
                 "seq_lens": self.max_seqs, "page_table": self.max_blocks}
        self._region, offset = aligned_slices(sizes, _REGIONS)   # 16-byte aligned regions
        self._plan_buffer = torch.zeros(offset, dtype=torch.int32, device=self.device)
        on_cuda = self.device.type == "cuda"
        # Host staging: on CUDA a ring of pinned buffers, so the copy is asynchronous and plan()
        # waits only for the copy of the plan before last (the GPU may still run the last step
        # while the host plans the next); on the CPU the plan buffer itself, written in place.
        self._stagings = ([torch.zeros(offset, dtype=torch.int32, pin_memory=True)
                           for _ in range(_STAGING_RING)] if on_cuda else [self._plan_buffer])
        self._staged = ([torch.cuda.Event() for _ in self._stagings] if on_cuda
                        else [None])             # each staging buffer's copy has been read
        self._staged_work = [0] * len(self._stagings)   # work rows each buffer last held
        self._next_staging = 0
        self.work_info = self._view(self._plan_buffer, "work_info").view(self.max_work,
                                                                         len(WORK_FIELDS))
        self.row_seq = self._view(self._plan_buffer, "row_seq")
        self.merge_indptr = self._view(self._plan_buffer, "merge_indptr")
        self.merge_rows = self._view(self._plan_buffer, "merge_rows")
        self.seq_lens = self._view(self._plan_buffer, "seq_lens")
        self.page_table = self._view(self._plan_buffer, "page_table")

        numel = self.workspace_numel(num_q_heads, head_dim, self.max_seqs, self.max_partials)
        if workspace is None:
            workspace = torch.empty(numel, dtype=torch.float32, device=self.device)
        elif (not isinstance(workspace, torch.Tensor) or workspace.dtype != torch.float32
              or workspace.device != self.device or not workspace.is_contiguous()
              or workspace.numel() < numel):
            got = (f"{workspace.dtype} [{workspace.numel()}] on {workspace.device}"
                   if isinstance(workspace, torch.Tensor) else type(workspace).__name__)
            raise ValueError(f"workspace must be a contiguous float32 tensor of at least {numel} "
                             f"elements on {self.device}, got {got}")
        self.workspace = workspace
        o_numel = self.max_partials * num_q_heads * head_dim
        lse_numel = self.max_partials * num_q_heads
        self.partial_o = workspace[:o_numel].view(self.max_partials, num_q_heads, head_dim)
        self.partial_lse = workspace[o_numel:o_numel + lse_numel].view(self.max_partials,
                                                                       num_q_heads)
        self.lse = workspace[o_numel + lse_numel:numel].view(self.max_seqs, num_q_heads)

        self._layout: TreeLayout | None = None
        # The torch backend's own plan (it reads none of the kernel buffers above).
        self._torch_plan = (TorchDecodePlan(dtype, self.device) if self.backend == "torch"
                            else None)
        # BLOCK_M of the Triton kernel from the capacity, not the plan: the same compiled kernel
        # every call (a run longer than the tile loops over row tiles).
        group = num_q_heads // num_kv_heads
        self._max_rows = min(self.max_seqs, MAX_SEQS_PER_ITEM) * group

    @staticmethod
    def workspace_numel(num_q_heads: int, head_dim: int, max_seqs: int, max_partials: int) -> int:
        """fp32 elements of the workspace: partial o and lse, and the output lse."""
        return max_partials * num_q_heads * (head_dim + 1) + max_seqs * num_q_heads

    def _view(self, buffer: torch.Tensor, name: str) -> torch.Tensor:
        start, end = self._region[name]
        return buffer[start:end]

    def __repr__(self) -> str:
        return (f"TreeAttentionWrapper({self.num_q_heads}/{self.num_kv_heads} heads, "
                f"head_dim={self.head_dim}, block_size={self.block_size}, max_seqs="
                f"{self.max_seqs}, max_nodes={self.max_nodes}, max_blocks={self.max_blocks}, "
                f"max_work={self.max_work}, max_partials={self.max_partials}, {self.dtype}, "
                f"{self.device}, backend={self.backend!r})")

    # ------------------------------------------------------------------ plan
    def plan(self, layout: TreeLayout) -> None:
        """Copy ``layout``'s plan into the fixed buffers (host work O(plan size), no device
        allocation, no host sync on CUDA beyond waiting for the previous plan's staging copy).

        Raises ValueError when ``layout`` is not a TreeLayout of this block size on this device,
        or exceeds a capacity (the message names it: max_seqs, max_nodes, max_blocks, max_work,
        max_partials). Nothing changes then.
        """
        if not isinstance(layout, TreeLayout):
            raise ValueError(f"layout must be an ak.TreeLayout, got {type(layout).__name__}")
        if layout.block_size != self.block_size:
            raise ValueError(f"layout.block_size {layout.block_size} must equal the wrapper's "
                             f"block_size {self.block_size}")
        if layout.device.type != self.device.type or \
                layout.device.index not in (None, self.device.index):
            raise ValueError(f"layout is on {layout.device} but the wrapper is on {self.device}")
        for what, used, capacity in (("max_seqs", layout.num_seqs, self.max_seqs),
                                     ("max_nodes", layout.num_nodes, self.max_nodes),
                                     ("max_blocks", layout.num_page_entries, self.max_blocks),
                                     ("max_work", layout.num_work, self.max_work),
                                     ("max_partials", layout.num_partials, self.max_partials)):
            if used > capacity:
                raise ValueError(f"layout needs {used} but the wrapper was built with "
                                 f"{what}={capacity}{_sizing_hint(what, layout)}")
        if self._torch_plan is not None:   # a2r_kernels/torch_decode.py: no kernel plan to stage
            self._torch_plan.plan(layout)
            self._layout = layout
            return
        ring = self._next_staging
        self._next_staging = (ring + 1) % len(self._stagings)
        staging, staged = self._stagings[ring], self._staged[ring]
        if staged is not None:
            staged.synchronize()   # this buffer's last copy (two plans ago) has read it
        num_seqs = layout.num_seqs
        for name in ("work_info", "row_seq", "merge_indptr", "merge_rows", "seq_lens"):
            values = layout.host_plan(name).reshape(-1)
            start = self._region[name][0]
            staging[start:start + values.numel()].copy_(values)
        work_start = self._region["work_info"][0]
        stale = staging[work_start + layout.num_work * len(WORK_FIELDS):
                        work_start + self._staged_work[ring] * len(WORK_FIELDS)]
        stale.zero_()   # q_len 0: the programs of unused work items exit at once
        self._staged_work[ring] = layout.num_work
        indptr_start, indptr_end = self._region["merge_indptr"]
        staging[indptr_start + num_seqs + 1:indptr_end].fill_(layout.num_partials)
        host_pages = layout.host_plan("page_table")
        if host_pages is not None:
            start = self._region["page_table"][0]
            staging[start:start + host_pages.numel()].copy_(host_pages)
        if staging is not self._plan_buffer:
            end = (self._region["page_table"][0] + (host_pages.numel() if host_pages is not None
                                                   else 0))
            # The whole work region goes over, so rows the last plans used are zero now.
            self._plan_buffer[:end].copy_(staging[:end], non_blocking=True)
            staged.record()
        if host_pages is None:   # a page table on the device, read by reference: d2d
            pages = layout.external_page_table   # (layout.page_table would upload the plan)
            self.page_table[:pages.numel()].copy_(pages, non_blocking=True)
        self._layout = layout

    @property
    def layout(self) -> TreeLayout | None:
        """The layout of the last :meth:`plan` (None before the first)."""
        return self._layout

    # ------------------------------------------------------------------ run
    def run(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *,
            out: torch.Tensor | None = None, lse: torch.Tensor | None = None,
            return_lse: bool = False, sm_scale: float | None = None):
        """Tree decode attention of the planned step (formula: :func:`tree_decode_attention`).

        Args:
            q: ``[S, num_q_heads, head_dim]`` in the wrapper's dtype, any strides (the
                ``"cuda"`` backend copies a q without unit stride in head_dim), with
                ``layout.num_seqs <= S <= max_seqs``: rows past the plan's sequences (padding
                of a captured batch) come out 0 with LSE ``-inf``.
            k_cache, v_cache: ``[num_blocks, block_size, num_kv_heads, head_dim]``.
            out: optional output ``[S, num_q_heads, head_dim]`` in q's dtype; with it, nothing
                is allocated (the ``"cuda"`` backend writes an ``out`` without unit stride in
                head_dim through a contiguous copy).
            lse: optional fp32 ``[S, num_q_heads]`` (unit stride in heads) for the LSE; default
                a view of the workspace, overwritten by the next call.
            return_lse: also return the LSE (natural log).
            sm_scale: softmax scale, default ``head_dim ** -0.5``.

        Returns ``out`` (and ``lse`` with ``return_lse``).
        """
        layout = self._layout
        if layout is None:
            raise ValueError("run before plan: call plan(layout) first")
        check_decode_inputs(q, k_cache, v_cache)
        num_seqs = q.shape[0]
        if tuple(q.shape[1:]) != (self.num_q_heads, self.head_dim) or q.dtype != self.dtype \
                or q.device != self.device:
            raise ValueError(f"q must be [S, {self.num_q_heads}, {self.head_dim}] {self.dtype} on "
                             f"{self.device}, got {tuple(q.shape)} {q.dtype} on {q.device}")
        if not layout.num_seqs <= num_seqs <= self.max_seqs:
            raise ValueError(f"q has {num_seqs} sequences; the plan has {layout.num_seqs} and "
                             f"max_seqs is {self.max_seqs}")
        if tuple(k_cache.shape[1:]) != (self.block_size, self.num_kv_heads, self.head_dim):
            raise ValueError(f"k_cache must be [num_blocks, {self.block_size}, "
                             f"{self.num_kv_heads}, {self.head_dim}], got {tuple(k_cache.shape)}")
        if layout.max_block_id >= k_cache.shape[0]:
            raise ValueError(f"the plan reads block {layout.max_block_id} but k_cache has only "
                             f"{k_cache.shape[0]} blocks")
        sm_scale = softmax_scale(sm_scale, self.head_dim)
        torch_plan = self._torch_plan
        if out is not None or torch_plan is None:   # the torch backend returns SDPA's output
            out = check_out(q, out)
        if lse is None:   # the torch backend computes an LSE only when asked
            lse = self.lse[:num_seqs] if return_lse or torch_plan is None else None
        elif not isinstance(lse, torch.Tensor) or lse.shape != q.shape[:2] or \
                lse.dtype != torch.float32 or lse.device != q.device or \
                (lse.stride(1) != 1 and lse.shape[1] > 1):
            raise ValueError(f"lse must be float32 {tuple(q.shape[:2])} on {q.device} with unit "
                             f"stride in heads")
        if torch_plan is not None:   # a2r_kernels/torch_decode.py
            out = torch_plan.run(q, k_cache, v_cache, sm_scale, out=out, lse=lse)
        else:
            self._dispatch(q, k_cache, v_cache, sm_scale, out, lse)
        return (out, lse) if return_lse else out

    def _dispatch(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  sm_scale: float, out: torch.Tensor, lse: torch.Tensor) -> None:
        """The planned step on a kernel backend, inputs checked: the fixed plan buffers through
        the one launcher of work items."""
        plan = WorkPlan(self.work_info, self.row_seq, self.page_table, self.merge_indptr,
                        self.merge_rows)
        run_work_items(self.backend, q, k_cache, v_cache, plan, sm_scale, out, lse,
                       self.partial_o, self.partial_lse, self._max_rows)
