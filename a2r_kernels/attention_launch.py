"""What the decode-attention ops (:mod:`a2r_kernels.attention`) and :class:`TreeAttentionWrapper`
(:mod:`a2r_kernels.wrapper`) share: their input checks, and the one launcher that runs a plan's
work items and LSE merge on a kernel backend (``"cpu"``, ``"triton"``, ``"cuda"``).

The ``"torch"`` backend is not launched here: it is the spec (:mod:`a2r_kernels.reference`),
which the callers run over the layout itself.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .vocab import MAX_HEAD_DIM

ATTENTION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
KERNEL_BACKENDS = ("cpu", "triton", "cuda")


class WorkPlan(NamedTuple):
    """The int32 plan tensors of a step (a :class:`~a2r_kernels.TreeLayout`'s, or the fixed
    buffers of a wrapper), on q's device: ``work_info [W, 6]`` (layout.WORK_FIELDS; items with
    ``q_len = 0`` do nothing), ``row_seq [>= S]``, ``page_table [P]``, ``merge_indptr [>= S + 1]``
    (entries past ``S + 1`` are not read), ``merge_rows [M]``."""

    work_info: torch.Tensor
    row_seq: torch.Tensor
    page_table: torch.Tensor
    merge_indptr: torch.Tensor
    merge_rows: torch.Tensor


def check_decode_inputs(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """``ValueError`` naming the argument unless q is ``[S, Hq, D]`` and the pools are
    ``[num_blocks, block_size, Hkv, D]`` of q's dtype (fp16/bf16/fp32) and device, with
    ``Hq % Hkv == 0`` and ``0 < D <= MAX_HEAD_DIM``."""
    if not isinstance(q, torch.Tensor) or q.dim() != 3:
        raise ValueError(f"q must be [num_seqs, num_q_heads, head_dim], got "
                         f"{tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__}")
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(cache, torch.Tensor) or cache.dim() != 4:
            raise ValueError(f"{name} must be [num_blocks, block_size, num_kv_heads, head_dim]")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache shape {tuple(v_cache.shape)} must equal k_cache shape "
                         f"{tuple(k_cache.shape)}")
    if q.dtype not in ATTENTION_DTYPES:
        raise ValueError(f"q dtype must be one of {ATTENTION_DTYPES}, got {q.dtype}")
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if cache.dtype != q.dtype:
            raise ValueError(f"{name} dtype {cache.dtype} must equal q dtype {q.dtype}")
        if cache.device != q.device:
            raise ValueError(f"{name} is on {cache.device} but q is on {q.device}")
    _, num_q_heads, head_dim = q.shape
    num_kv_heads, cache_head_dim = k_cache.shape[2], k_cache.shape[3]
    if cache_head_dim != head_dim:
        raise ValueError(f"k_cache head_dim {cache_head_dim} must equal q head_dim {head_dim}")
    if num_kv_heads == 0 or num_q_heads % num_kv_heads != 0:
        raise ValueError(f"num_q_heads ({num_q_heads}) must be a multiple of num_kv_heads "
                         f"({num_kv_heads}) in k_cache [num_blocks, block_size, num_kv_heads, head_dim]")
    if not 0 < head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in [1, {MAX_HEAD_DIM}], got {head_dim}")


def softmax_scale(sm_scale: float | None, head_dim: int) -> float:
    """``sm_scale`` as a float (default ``head_dim ** -0.5``); ``ValueError`` unless positive
    and finite."""
    if sm_scale is None:
        return head_dim ** -0.5
    sm_scale = float(sm_scale)
    if not sm_scale > 0.0 or sm_scale == float("inf"):
        raise ValueError(f"sm_scale must be a positive finite float, got {sm_scale}")
    return sm_scale


def check_out(q: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """``out`` (checked: q's shape, dtype and device, any strides), or a new contiguous one."""
    if out is None:
        return torch.empty_like(q, memory_format=torch.contiguous_format)
    if not isinstance(out, torch.Tensor) or out.shape != q.shape or out.dtype != q.dtype or \
            out.device != q.device:
        got = (f"{tuple(out.shape)} {out.dtype} on {out.device}" if isinstance(out, torch.Tensor)
               else type(out).__name__)
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} on {q.device}, got {got}")
    return out


def alloc_partials(q: torch.Tensor, num_partials: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``partial_o [R, Hq, D]`` and ``partial_lse [R, Hq]``, ``R = max(num_partials, 1)``
    (never a zero-size buffer for a kernel)."""
    rows = max(num_partials, 1)
    num_q_heads, head_dim = q.shape[1:]
    return (torch.empty((rows, num_q_heads, head_dim), dtype=torch.float32, device=q.device),
            torch.empty((rows, num_q_heads), dtype=torch.float32, device=q.device))


def unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last dimension has unit stride, else a contiguous copy."""
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def run_work_items(backend: str, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   plan: WorkPlan, sm_scale: float, out: torch.Tensor, lse: torch.Tensor,
                   partial_o: torch.Tensor, partial_lse: torch.Tensor, max_rows: int) -> None:
    """Tree decode attention of ``plan`` on a kernel backend: one partial state per work item
    and q head, then the per-sequence LSE merge into ``out`` and ``lse``.

    Args (checked by the caller):
        backend: ``"cpu"``, ``"triton"`` or ``"cuda"``.
        q: ``[S, Hq, D]``, any strides; k_cache, v_cache: ``[num_blocks, block_size, Hkv, D]``,
            any strides (``"cuda"``: unit stride in D).
        plan: the step's :class:`WorkPlan`; sequence ``i < S`` merges partial rows
            ``merge_rows[merge_indptr[i]:merge_indptr[i + 1]]``.
        sm_scale: softmax scale.
        out: ``[S, Hq, D]`` in q's dtype, any strides; lse: fp32 ``[S, Hq]`` (written).
        partial_o, partial_lse: fp32 ``[R, Hq, D]``, ``[R, Hq]`` workspace, ``R`` at least the
            plan's partial rows.
        max_rows: the most ``q_len * group`` of a work item (Triton's row tile).
    """
    num_seqs = q.shape[0]
    indptr = plan.merge_indptr[:num_seqs + 1]
    if backend == "cpu":
        from . import _cpu_ops
        _cpu_ops.tree_attention_partials(q, k_cache, v_cache, plan.work_info, plan.row_seq,
                                         plan.page_table, partial_o, partial_lse, sm_scale)
        _cpu_ops.merge_partials(partial_o, partial_lse, indptr, plan.merge_rows, out, lse)
    elif backend == "triton":
        from .triton import attention as kernels
        kernels.tree_attention_partials(q, k_cache, v_cache, plan.work_info, plan.row_seq,
                                        plan.page_table, partial_o, partial_lse, sm_scale,
                                        max_rows)
        kernels.merge_partials(partial_o, partial_lse, indptr, plan.merge_rows, out, lse)
    elif backend == "cuda":
        from . import _cuda_ops
        # The CUDA kernels take unit-stride head_dim rows. q and out may be any views (the
        # public contract): q is small, copy it; out is written through a contiguous buffer.
        target = unit_last_stride(out)
        _cuda_ops.tree_attention_partials(unit_last_stride(q), k_cache, v_cache, plan.work_info,
                                          plan.row_seq[:num_seqs], plan.page_table, partial_o,
                                          partial_lse, sm_scale)
        _cuda_ops.merge_partials(partial_o, partial_lse, indptr, plan.merge_rows, target, lse)
        if target is not out:
            out.copy_(target)
    else:
        raise ValueError(f"run_work_items runs the kernel backends {KERNEL_BACKENDS}, "
                         f"got {backend!r}")
