"""Triton kernels for tree decode attention (cascade / Hydragen style, generalised to trees).

Two launches per call, both driven by a :class:`~a2r_kernels.layout.TreeLayout`:

1. ``_tree_attention_partial_kernel``: grid ``(num_work, num_kv_heads)``. A work item is one node
   chunk and a contiguous run of sequences under that node (up to ``max_seqs_per_item``; the
   items of one chunk are adjacent, so later ones read it from L2); all ``q_len * group`` query
   rows (sequences x the GQA group of the kv head) form the M side of one tile, so the chunk's
   K/V is streamed once for all of them (over several row tiles when there are more rows than
   ``BLOCK_M``, again from L2). Writes one fp32 partial state ``(o, lse)`` per (sequence, q head)
   and work item. KV loads are unpredicated: the tail tile re-reads its last valid token and
   masks the scores instead.
2. ``_merge_partials_kernel``: grid ``(num_seqs, num_q_heads)``. Merges each sequence's partial
   states by LSE in fp32 (``o = sum_r exp(lse_r - lse) o_r``, ``lse = logsumexp_r lse_r``) into
   the output dtype. A sequence with no partial gets ``o = 0``, ``lse = -inf``.

Formula: ``out[i, h] = softmax(sm_scale * q[i, h] K_i^T) V_i`` where ``K_i, V_i`` are the tokens of
the nodes on sequence i's path, read at kv head ``h // group``. Scores are computed in base 2
(``sm_scale * log2(e)`` folded into the scale) and the LSE is returned in natural log.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backend import triton_interpret
from ..vocab import LN2, LOG2E, WORK_INFO_COLUMNS

_LN2 = tl.constexpr(LN2)
_WORK_INFO_COLUMNS = tl.constexpr(WORK_INFO_COLUMNS)   # a constexpr: jit functions read only those


@triton.jit
def _tree_attention_partial_kernel(
    q_ptr, k_ptr, v_ptr, work_ptr, row_seq_ptr, page_table_ptr, part_o_ptr, part_lse_ptr,
    qk_scale,                                   # sm_scale * log2(e)
    stride_qs, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_por, stride_poh,                     # partial_o [R, Hq, D], unit stride in D
    stride_plr,                                 # partial_lse [R, Hq], unit stride in Hq
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr,
    PAGE_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    FP32_DOT: tl.constexpr,
):
    work = tl.program_id(0)
    kv_head = tl.program_id(1)
    # (q_start, q_len, page_start, kv_start, kv_end, partial_start): layout.WORK_FIELDS. An
    # unused item of a fixed-capacity plan (TreeAttentionWrapper) has q_len 0: no row tile.
    info = work_ptr + work * _WORK_INFO_COLUMNS
    q_start = tl.load(info + 0)
    q_len = tl.load(info + 1)
    page_start = tl.load(info + 2)
    kv_start = tl.load(info + 3)
    kv_end = tl.load(info + 4)
    partial_start = tl.load(info + 5)

    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    num_rows = q_len * GROUP
    # Offsets in int64: a pool view can have an int32 stride whose product with an index does
    # not fit (head-major pool [Hkv, num_blocks, ...]: kv_head * stride_kh passes 2**31 at
    # 200k blocks x 16 x 128 with kv_head >= 8).
    k_head_ptr = k_ptr + kv_head.to(tl.int64) * stride_kh
    v_head_ptr = v_ptr + kv_head.to(tl.int64) * stride_vh
    for m0 in range(0, num_rows, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < num_rows
        local_seq = offs_m // GROUP
        q_head = kv_head * GROUP + offs_m % GROUP
        seq = tl.load(row_seq_ptr + q_start + local_seq, mask=mask_m, other=0).to(tl.int64)
        q = tl.load(q_ptr + seq[:, None] * stride_qs + q_head[:, None] * stride_qh
                    + offs_d[None, :] * stride_qd,
                    mask=mask_m[:, None] & mask_d[None, :], other=0.0)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for n0 in range(kv_start, kv_end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < kv_end
            # Tokens past kv_end (the last tile only) re-read token kv_end - 1 instead of being
            # masked: the loads stay unpredicated and vectorised, and their scores are set to
            # -inf below. (Masked loads cost ~2.5x the loop's instructions on sm_90.)
            token = tl.minimum(offs_n, kv_end - 1)
            page = tl.load(page_table_ptr + page_start + token // PAGE_SIZE).to(tl.int64)
            slot = token % PAGE_SIZE
            k_ptrs = k_head_ptr + page[:, None] * stride_kb + slot[:, None] * stride_kt \
                + offs_d[None, :] * stride_kd
            v_ptrs = v_head_ptr + page[:, None] * stride_vb + slot[:, None] * stride_vt \
                + offs_d[None, :] * stride_vd
            if HEAD_DIM == BLOCK_D:
                k = tl.load(k_ptrs)
            else:   # columns past head_dim belong to the next head: never read them
                k = tl.load(k_ptrs, mask=mask_d[None, :], other=0.0)
            if FP32_DOT:
                s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = tl.where(mask_n[None, :], s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            # m_new is finite: every chunk iteration has at least its first token valid.
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if HEAD_DIM == BLOCK_D:
                v = tl.load(v_ptrs)
            else:
                v = tl.load(v_ptrs, mask=mask_d[None, :], other=0.0)
            if FP32_DOT:
                acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new

        nonempty = l_i > 0.0
        out = acc / tl.where(nonempty, l_i, 1.0)[:, None]
        lse = tl.where(nonempty, (m_i + tl.log2(tl.where(nonempty, l_i, 1.0))) * _LN2,
                       float("-inf"))
        row = (partial_start + local_seq).to(tl.int64)
        tl.store(part_o_ptr + row[:, None] * stride_por + q_head[:, None] * stride_poh
                 + offs_d[None, :], out, mask=mask_m[:, None] & mask_d[None, :])
        tl.store(part_lse_ptr + row * stride_plr + q_head, lse, mask=mask_m)


@triton.jit
def _merge_partials_kernel(
    part_o_ptr, part_lse_ptr, indptr_ptr, rows_ptr, out_ptr, lse_ptr,
    stride_por, stride_poh, stride_plr,
    stride_os, stride_oh, stride_od, stride_ls,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)   # int64 offsets: out may be any (strided) view
    start = tl.load(indptr_ptr + seq)
    end = tl.load(indptr_ptr + seq + 1)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM

    m = tl.full([], float("-inf"), tl.float32)
    l = tl.zeros([], tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for i in range(start, end):
        row = tl.load(rows_ptr + i).to(tl.int64)
        lse_r = tl.load(part_lse_ptr + row * stride_plr + head)
        o_r = tl.load(part_o_ptr + row * stride_por + head * stride_poh + offs_d, mask=mask_d, other=0.0)
        m_new = tl.maximum(m, lse_r)
        # Both -inf (only empty states so far): keep everything at zero instead of NaN.
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        w_old = tl.exp(m - m_ref)
        w_new = tl.exp(lse_r - m_ref)
        l = l * w_old + w_new
        # An empty state (lse -inf, weight 0) adds nothing, whatever its o holds (0 * NaN = NaN).
        acc = acc * w_old + tl.where(w_new > 0.0, o_r * w_new, 0.0)
        m = m_new

    nonempty = l > 0.0
    out = acc / tl.where(nonempty, l, 1.0)
    lse = tl.where(nonempty, m + tl.log(tl.where(nonempty, l, 1.0)), float("-inf"))
    tl.store(out_ptr + seq.to(tl.int64) * stride_os + head * stride_oh + offs_d * stride_od,
             out.to(out_ptr.dtype.element_ty), mask=mask_d)
    tl.store(lse_ptr + seq.to(tl.int64) * stride_ls + head, lse)


@triton.jit
def _merge_two_states_kernel(
    out_a_ptr, lse_a_ptr, out_b_ptr, lse_b_ptr, out_ptr, lse_ptr,
    stride_as, stride_ah, stride_ad, stride_las, stride_lah,
    stride_bs, stride_bh, stride_bd, stride_lbs, stride_lbh,
    stride_os, stride_oh, stride_od, stride_los, stride_loh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    lse_a = tl.load(lse_a_ptr + seq * stride_las + head * stride_lah).to(tl.float32)
    lse_b = tl.load(lse_b_ptr + seq * stride_lbs + head * stride_lbh).to(tl.float32)
    o_a = tl.load(out_a_ptr + seq * stride_as + head * stride_ah + offs_d * stride_ad,
                  mask=mask_d, other=0.0).to(tl.float32)
    o_b = tl.load(out_b_ptr + seq * stride_bs + head * stride_bh + offs_d * stride_bd,
                  mask=mask_d, other=0.0).to(tl.float32)
    m = tl.maximum(lse_a, lse_b)
    m_ref = tl.where(m == float("-inf"), 0.0, m)
    w_a = tl.exp(lse_a - m_ref)
    w_b = tl.exp(lse_b - m_ref)
    l = w_a + w_b
    nonempty = l > 0.0
    l_safe = tl.where(nonempty, l, 1.0)
    # An empty state (lse -inf, weight 0) adds nothing, whatever its out holds (0 * NaN = NaN).
    out = (tl.where(w_a > 0.0, o_a * w_a, 0.0) + tl.where(w_b > 0.0, o_b * w_b, 0.0)) / l_safe
    lse = tl.where(nonempty, m_ref + tl.log(l_safe), float("-inf"))
    tl.store(out_ptr + seq * stride_os + head * stride_oh + offs_d * stride_od,
             out.to(out_ptr.dtype.element_ty), mask=mask_d)
    tl.store(lse_ptr + seq * stride_los + head * stride_loh, lse)


# ---------------------------------------------------------------------------------- launchers
def _tile_config(num_rows: int, head_dim: int, fp32_dot: bool,
                 tile: tuple[int, int] | None = None) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) from a small table instead of blind autotuning; ``tile``
    = (BLOCK_N, num_warps) replaces the table's choice for fp16/bf16 tiles of BLOCK_M = 64 rows
    (the tile sweep of bench_tree_attention.py passes it; the ops never do).

    BLOCK_M covers the rows of a typical work item (q_len * group, at least 16 for tl.dot).
    Small row tiles (leaves: a few rows against their own KV) keep BLOCK_N at 32 for head_dim
    > 64 so K/V tiles stay near 16 KiB of registers. 64-row tiles (shared nodes; wgmma on
    sm_90, operands in shared memory) take BLOCK_N = 64 for head_dim <= 128: the per-iteration
    softmax bookkeeping (acc rescale, row max/sum) is amortised over twice the tokens, 67
    instead of 86 warp-instructions per KV token on sm_90 (benchmarks/sass_report.py), at 176
    registers (one 8-warp CTA per SM), no spills. Exact fp32 dots (no tensor cores) need
    narrower KV tiles and more warps to stay free of register spills (ptxas, sm_80/sm_90:
    tests/test_triton_compile.py --report).
    """
    block_m = min(max(triton.next_power_of_2(max(num_rows, 1)), 16), 64)
    if fp32_dot:
        return block_m, 16, 8
    if block_m == 64 and tile is not None:
        return (block_m, *tile)
    if block_m == 64 and head_dim <= 128:
        return block_m, 64, 8
    block_n = 64 if head_dim <= 64 else 32
    num_warps = 4 if block_m <= 32 else 8
    return block_m, block_n, num_warps


def _fp32_dot(dtype: torch.dtype) -> bool:
    # fp32 inputs take exact fp32 dots (no TF32). Triton's CPU interpreter computes bf16 dots
    # wrongly (it multiplies the raw bit patterns), so there bf16 is upcast as well.
    return dtype == torch.float32 or (dtype == torch.bfloat16 and triton_interpret())


def tree_attention_partials(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            work_info: torch.Tensor, row_seq: torch.Tensor, page_table: torch.Tensor,
                            partial_o: torch.Tensor, partial_lse: torch.Tensor, sm_scale: float,
                            max_rows: int, tile: tuple[int, int] | None = None) -> None:
    """Launch the partial kernel over every row of ``work_info``. Inputs are checked by the
    public op (or the TreeAttentionWrapper).

    q [S, Hq, D]; k_cache, v_cache [num_blocks, block_size, Hkv, D]; work_info int32 [W, WORK_INFO_COLUMNS]
    (rows with q_len 0 do nothing); partial_o fp32 [R, Hq, D] and partial_lse fp32 [R, Hq]
    (contiguous, written); ``max_rows`` = the most q_len * group of a work item (picks BLOCK_M;
    more rows loop over row tiles); ``tile``: see :func:`_tile_config`.
    """
    num_work = work_info.shape[0]
    if num_work == 0:
        return
    _, num_q_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    block_m, block_n, num_warps = _tile_config(max_rows, head_dim, q.dtype == torch.float32, tile)
    _tree_attention_partial_kernel[(num_work, num_kv_heads)](
        q, k_cache, v_cache, work_info, row_seq, page_table, partial_o, partial_lse,
        sm_scale * LOG2E,
        *q.stride(), *k_cache.stride(), *v_cache.stride(),
        partial_o.stride(0), partial_o.stride(1), partial_lse.stride(0),
        HEAD_DIM=head_dim, BLOCK_D=max(triton.next_power_of_2(head_dim), 16),
        GROUP=num_q_heads // num_kv_heads, PAGE_SIZE=k_cache.shape[1],
        BLOCK_M=block_m, BLOCK_N=block_n, FP32_DOT=_fp32_dot(q.dtype),
        num_warps=num_warps, num_stages=2,
    )


def merge_partials(partial_o: torch.Tensor, partial_lse: torch.Tensor, merge_indptr: torch.Tensor,
                   merge_rows: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> None:
    """Merge each sequence's partial states: out [S, Hq, D] (any float dtype), lse fp32 [S, Hq]."""
    num_seqs, num_heads, head_dim = out.shape
    if num_seqs == 0 or num_heads == 0:
        return
    _merge_partials_kernel[(num_seqs, num_heads)](
        partial_o, partial_lse, merge_indptr, merge_rows, out, lse,
        partial_o.stride(0), partial_o.stride(1), partial_lse.stride(0),
        *out.stride(), lse.stride(0),
        HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), num_warps=1,
    )


def merge_two_states(out_a, lse_a, out_b, lse_b, out, lse) -> None:
    """out, lse <- LSE merge of (out_a, lse_a) and (out_b, lse_b); all [S, H, D] / [S, H]."""
    num_seqs, num_heads, head_dim = out.shape
    if num_seqs == 0 or num_heads == 0:
        return
    _merge_two_states_kernel[(num_seqs, num_heads)](
        out_a, lse_a, out_b, lse_b, out, lse,
        *out_a.stride(), *lse_a.stride(), *out_b.stride(), *lse_b.stride(),
        *out.stride(), *lse.stride(),
        HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), num_warps=1,
    )

