"""Public decode-attention ops: tree (shared prefixes read once), paged (no sharing), LSE merge.

Each op checks its inputs (``ValueError`` naming the argument), allocates outputs, and dispatches
to a backend (see :mod:`a2r_kernels.backend`).
"""

from __future__ import annotations

import torch

from . import reference
from .attention_launch import (ATTENTION_DTYPES, WorkPlan, alloc_partials, check_decode_inputs,
                               check_out, run_work_items, softmax_scale, unit_last_stride)
from .backend import resolve_backend
from .layout import TreeLayout
from .plan_builder import DEFAULT_KV_CHUNK


def _alloc_outputs(q: torch.Tensor, out: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    out = check_out(q, out)
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
    return out, lse


def tree_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          layout: TreeLayout, *, sm_scale: float | None = None,
                          backend: str = "auto", return_lse: bool = False,
                          out: torch.Tensor | None = None):
    """One decode step of many sequences whose KV forms a tree of shared nodes.

    ``out[i, h] = softmax(sm_scale * q[i, h] . K_i^T) V_i`` where ``K_i, V_i`` are the tokens of
    the nodes of ``layout.paths[i]`` concatenated (no causal mask: a decode token sees its whole
    path), read at kv head ``h // (num_q_heads // num_kv_heads)`` (GQA). A node shared by several
    sequences is read from memory once per call, on every backend.

    Args:
        q: ``[num_seqs, num_q_heads, head_dim]`` fp16/bf16/fp32, any strides.
        k_cache, v_cache: ``[num_blocks, block_size, num_kv_heads, head_dim]``, q's dtype and device
            (e.g. ``TreeKVCache.k[layer]``), any strides; the ``"cuda"`` backend needs unit
            stride in ``head_dim`` (``ValueError`` otherwise: the pool is never copied).
        layout: the step's plan (:meth:`TreeLayout.from_paths` or ``TreeKVCache.layout``); build it
            once per decode step and reuse it for every layer.
        sm_scale: softmax scale, default ``head_dim ** -0.5``.
        backend: ``"auto" | "cuda" | "triton" | "cpu" | "torch"`` (``"auto"``: the CPU kernel for
            CPU tensors where ``a2r_kernels._cpu`` was built; see :mod:`a2r_kernels.backend`).
        return_lse: also return the natural-log LSE, fp32 ``[num_seqs, num_q_heads]`` (``-inf``
            for a sequence whose path holds no token; its output row is 0).
        out: optional preallocated output, q's shape and dtype.

    Returns:
        ``out`` ``[num_seqs, num_q_heads, head_dim]`` in q's dtype, plus ``lse`` if requested.

    The call does no host work beyond shape checks and no host sync (CUDA-graph friendly).

    Example::

        >>> layout = ak.TreeLayout.from_paths([[0, 1], [0, 2]], [[3, 4], [0], [7]], [20, 5, 0], 16)
        >>> out = ak.tree_decode_attention(q, k_pool, v_pool, layout)
    """
    check_decode_inputs(q, k_cache, v_cache)
    if not isinstance(layout, TreeLayout):
        raise ValueError(f"layout must be an ak.TreeLayout, got {type(layout).__name__}")
    if q.shape[0] != layout.num_seqs:
        raise ValueError(f"q has {q.shape[0]} sequences but layout has {layout.num_seqs} paths")
    if k_cache.shape[1] != layout.block_size:
        raise ValueError(f"k_cache block_size {k_cache.shape[1]} must equal layout.block_size "
                         f"{layout.block_size}")
    if layout.max_block_id >= k_cache.shape[0]:
        raise ValueError(f"layout reads block {layout.max_block_id} but k_cache has only "
                         f"{k_cache.shape[0]} blocks")
    if layout.device != q.device and not (layout.device.type == q.device.type and
                                          layout.device.index in (None, q.device.index)):
        raise ValueError(f"layout is on {layout.device} but q is on {q.device}: build the layout "
                         f"on q's device")
    sm_scale = softmax_scale(sm_scale, q.shape[2])
    backend = resolve_backend("tree_decode_attention", backend, q.device)
    out, lse = _alloc_outputs(q, out)
    if backend == "torch":
        ref_out, ref_lse = reference.tree_decode_attention(q, k_cache, v_cache, layout, sm_scale)
        out.copy_(ref_out)
        lse.copy_(ref_lse)
    else:
        plan = WorkPlan(layout.work_info, layout.row_seq, layout.page_table,
                        layout.merge_indptr, layout.merge_rows)
        run_work_items(backend, q, k_cache, v_cache, plan, sm_scale, out, lse,
                       *alloc_partials(q, layout.num_partials),
                       max_rows=layout.max_q_len * (q.shape[1] // k_cache.shape[2]))
    return (out, lse) if return_lse else out


def _paged_chunk(block_size: int) -> int:
    """Split-KV chunk of paged decode: DEFAULT_KV_CHUNK tokens, whole blocks (at least one)."""
    return max(1, DEFAULT_KV_CHUNK // block_size) * block_size


def _paged_work_items(block_tables: torch.Tensor, seq_lens: torch.Tensor, block_size: int):
    """The paged (unshared) case as tree work items, built on device without a host sync.

    Sequence i is a path of one node (its block table row). Every sequence is split into the same
    number of chunks (from the static ``max_blocks``); chunks past a sequence's end are empty and
    contribute ``lse = -inf``.
    """
    num_seqs, max_blocks = block_tables.shape
    device = block_tables.device
    chunk = _paged_chunk(block_size)
    num_splits = max(1, -(-max_blocks * block_size // chunk))
    seq = torch.arange(num_seqs, device=device, dtype=torch.int32).repeat_interleave(num_splits)
    split = torch.arange(num_splits, device=device, dtype=torch.int32).repeat(num_seqs)
    kv_start = split * chunk
    # Clamped to the table's capacity (as the reference does): with check_bounds=False a too
    # large seq_len must not send the kernels past the end of its block_tables row.
    kv_end = torch.minimum(kv_start + chunk, seq_lens.to(torch.int32)[seq.long()])
    kv_end = torch.maximum(kv_end.clamp(max=max_blocks * block_size), kv_start)
    work_info = torch.stack([seq, torch.ones_like(seq), seq * max_blocks, kv_start, kv_end,
                             seq * num_splits + split], dim=1).contiguous()
    row_seq = torch.arange(num_seqs, device=device, dtype=torch.int32)
    merge_indptr = torch.arange(num_seqs + 1, device=device, dtype=torch.int32) * num_splits
    merge_rows = torch.arange(num_seqs * num_splits, device=device, dtype=torch.int32)
    return work_info, row_seq, merge_indptr, merge_rows, num_seqs * num_splits


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, *,
                           sm_scale: float | None = None, backend: str = "auto",
                           return_lse: bool = False, out: torch.Tensor | None = None,
                           check_bounds: bool = True):
    """Plain paged decode attention (no sharing): ``q[i]`` over its own ``seq_lens[i]`` tokens.

    The same algorithm as :func:`tree_decode_attention`: a plan of one node per sequence (its
    block-table row, in ``cdiv(max_blocks * block_size, chunk)`` chunks), built on the device
    without a host sync, run by the tree kernels. To share blocks that rows have in common, plan
    the tables with :meth:`TreeLayout.from_block_tables` instead.

    Args:
        q: ``[num_seqs, num_q_heads, head_dim]``.
        k_cache, v_cache: ``[num_blocks, block_size, num_kv_heads, head_dim]``.
        block_tables: int32 ``[num_seqs, max_blocks]``; token t of sequence i is at
            ``(block_tables[i, t // block_size], t % block_size)``.
        seq_lens: int32 ``[num_seqs]``, ``0 <= seq_lens[i] <= max_blocks * block_size``.
        check_bounds: validate ``seq_lens`` and the used block ids against the pool (one host
            sync); pass False inside CUDA graphs once the tables are known to be valid.

    Returns ``out`` (q's dtype) and, with ``return_lse``, fp32 ``lse`` ``[num_seqs, num_q_heads]``.
    """
    check_decode_inputs(q, k_cache, v_cache)
    num_seqs = q.shape[0]
    block_size = k_cache.shape[1]
    if not isinstance(block_tables, torch.Tensor) or block_tables.dim() != 2 or \
            block_tables.shape[0] != num_seqs or block_tables.dtype != torch.int32:
        raise ValueError(f"block_tables must be int32 [num_seqs={num_seqs}, max_blocks], got "
                         f"{getattr(block_tables, 'dtype', None)} "
                         f"{tuple(getattr(block_tables, 'shape', ()))}")
    if not isinstance(seq_lens, torch.Tensor) or seq_lens.shape != (num_seqs,) or \
            seq_lens.dtype != torch.int32:
        raise ValueError(f"seq_lens must be int32 [num_seqs={num_seqs}], got "
                         f"{getattr(seq_lens, 'dtype', None)} {tuple(getattr(seq_lens, 'shape', ()))}")
    for name, t in (("block_tables", block_tables), ("seq_lens", seq_lens)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if check_bounds and num_seqs > 0:
        max_tokens = block_tables.shape[1] * block_size
        pages_used = (seq_lens.long() + block_size - 1) // block_size
        used = torch.arange(block_tables.shape[1], device=q.device)[None, :] < pages_used[:, None]
        bad_len = ((seq_lens < 0) | (seq_lens > max_tokens)).any()
        bad_block = (used & ((block_tables < 0) | (block_tables >= k_cache.shape[0]))).any()
        bad_len, bad_block = torch.stack([bad_len, bad_block]).tolist()
        if bad_len:
            raise ValueError(f"seq_lens must lie in [0, max_blocks * block_size = {max_tokens}]")
        if bad_block:
            raise ValueError(f"block_tables holds a block id outside [0, {k_cache.shape[0]}) "
                             f"within seq_lens")
    sm_scale = softmax_scale(sm_scale, q.shape[2])
    backend = resolve_backend("paged_decode_attention", backend, q.device)
    out, lse = _alloc_outputs(q, out)
    if backend == "torch":
        ref_out, ref_lse = reference.paged_decode_attention(q, k_cache, v_cache, block_tables,
                                                            seq_lens, sm_scale)
        out.copy_(ref_out)
        lse.copy_(ref_lse)
    elif num_seqs > 0:   # the tree kernels over a plan of one node per sequence
        work_info, row_seq, indptr, rows, num_partials = _paged_work_items(
            block_tables, seq_lens, block_size)
        plan = WorkPlan(work_info, row_seq, block_tables.contiguous().view(-1), indptr, rows)
        run_work_items(backend, q, k_cache, v_cache, plan, sm_scale, out, lse,
                       *alloc_partials(q, num_partials),
                       max_rows=q.shape[1] // k_cache.shape[2])
    return (out, lse) if return_lse else out


def merge_attention_states(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                           lse_b: torch.Tensor, *, backend: str = "auto"):
    """Merge two attention states over disjoint key sets into the state over their union.

    ``lse = logaddexp(lse_a, lse_b)``; ``out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b``
    (fp32 math). An empty state (``lse = -inf``) contributes nothing, whatever its ``out`` holds
    (NaN included); where both are empty, ``out = 0`` and ``lse = -inf``.

    Args:
        out_a, out_b: ``[num_seqs, num_heads, head_dim]``, same dtype (fp16/bf16/fp32).
        lse_a, lse_b: fp32 ``[num_seqs, num_heads]``, natural log.

    Returns ``(out, lse)``: out in out_a's dtype, lse fp32.
    """
    for name, t in (("out_a", out_a), ("out_b", out_b)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"{name} must be [num_seqs, num_heads, head_dim]")
    if out_b.shape != out_a.shape or out_b.dtype != out_a.dtype or out_b.device != out_a.device:
        raise ValueError(f"out_b must match out_a ({tuple(out_a.shape)}, {out_a.dtype}, "
                         f"{out_a.device})")
    if out_a.dtype not in ATTENTION_DTYPES:
        raise ValueError(f"out_a dtype must be one of {ATTENTION_DTYPES}, got {out_a.dtype}")
    for name, t in (("lse_a", lse_a), ("lse_b", lse_b)):
        if not isinstance(t, torch.Tensor) or t.shape != out_a.shape[:2] or \
                t.dtype != torch.float32 or t.device != out_a.device:
            raise ValueError(f"{name} must be float32 {tuple(out_a.shape[:2])} on {out_a.device}")
    backend = resolve_backend("merge_attention_states", backend, out_a.device)
    out = torch.empty_like(out_a, memory_format=torch.contiguous_format)
    lse = torch.empty(out_a.shape[:2], dtype=torch.float32, device=out_a.device)
    if backend == "torch":
        ref_out, ref_lse = reference.merge_attention_states(out_a, lse_a, out_b, lse_b)
        out.copy_(ref_out)
        lse.copy_(ref_lse)
    elif backend == "cpu":
        from . import _cpu_ops
        _cpu_ops.merge_states(out_a, lse_a, out_b, lse_b, out, lse)
    elif backend == "triton":
        from .triton import attention as kernels
        kernels.merge_two_states(out_a, lse_a, out_b, lse_b, out, lse)
    else:
        from . import _cuda_ops
        _cuda_ops.merge_states(unit_last_stride(out_a), lse_a, unit_last_stride(out_b), lse_b,
                               out, lse)
    return out, lse
