"""Triton kernels of ``entropy_bound_step`` (formulas and RNG layout:
:mod:`a2r_kernels.reference_entropy_bound`).

Three launches, none of which materialises a ``[B, L, V]`` tensor:

1. ``_eb_partial_kernel``, grid ``(B * L, num_splits)``: program ``(pos, split)`` streams its chunk
   of the row once, in ``BLOCK_V`` chunks seen as ``[BLOCK_V / VEC, VEC]`` tiles (the layout of
   ``triton/denoise.py``): per lane, max ``m``, ``s = sum e^(x - m)``,
   ``a = sum e^(x - m) (x - m)`` (entropy ``log s - a / s``), the first group holding the max
   (argmax, found at the end by re-reading that group), the Gumbel-max argmax of ``x + g`` with
   ``g`` from ``denoise_step``'s Philox stream, and a flag for NaN logits. The Gumbel
   draws of a chunk are skipped when no logit of it can reach the split's best noisy value
   (``max x + GUMBEL_BOUND < best``), which changes no result (see the reference).
2. ``_eb_combine_kernel``, grid ``(cdiv(B * L, BLOCK_P),)``: merges the split states of each
   position into ``sample``, ``argmax`` and ``entropy`` (``+inf``, with sample = argmax = 0, at
   positions without a distribution; 0, with sample = argmax, at a ``+inf`` point mass).
3. ``_eb_select_kernel``, grid ``(B, cdiv(L, BLOCK_I))``: position ``i`` of row ``b`` sums the
   entropies of the positions ahead of it in the stable ascending order,
   ``#{j: e_j < e_i or (e_j == e_i and j < i)}`` (all pairs, ``L^2`` compares per row, cheap next
   to ``L * V`` logits), and is accepted when that sum is ``<= entropy_bound`` and ``e_i`` is
   finite. ``canvas[b, i]`` becomes ``sample`` when accepted, else the renoise token
   ``(r * V) >> 32`` of Philox counter ``(0, pos, 2, 0)``. The sum is the reference's
   ``cumsum - e`` in another summation order: the two agree except where an exclusive sum lies
   within fp32 rounding of the bound.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..vocab import GUMBEL_BOUND, RENOISE_STREAM
from .denoise import (_GUMBEL_STREAM, _INT32_MAX, _NEG_HUGE, LOG2E, _uniform_from_philox,
                      _vector_width, _vocab_split)
from .denoise import denoise_config as entropy_bound_config

_NUM_STATS = tl.constexpr(5)     # m, s, a, gumbel_best, has_nan (fp32) per (pos, split)
_NUM_INDICES = tl.constexpr(2)   # argmax, gumbel argmax (int32) per (pos, split)
_GUMBEL_BOUND = tl.constexpr(GUMBEL_BOUND)
_RENOISE_STREAM = tl.constexpr(RENOISE_STREAM)


@triton.jit(do_not_specialize=["seed"])
def _eb_partial_kernel(
    logits_ptr, stats_ptr, indices_ptr,
    length, vocab, split_size,
    stride_logits_b, stride_logits_l, stride_logits_v,
    seed,
    NUM_SPLITS: tl.constexpr, BLOCK_V: tl.constexpr, VEC: tl.constexpr,
):
    LANES: tl.constexpr = BLOCK_V // VEC
    pos = tl.program_id(0)
    split = tl.program_id(1)
    b = (pos // length).to(tl.int64)
    l = (pos % length).to(tl.int64)
    v_begin = split * split_size
    v_end = tl.minimum(v_begin + split_size, vocab)
    row_ptr = logits_ptr + b * stride_logits_b + l * stride_logits_l

    lanes = tl.arange(0, LANES)
    within = tl.arange(0, VEC)
    tile = lanes[:, None] * VEC + within[None, :]
    neg_inf = float("-inf")
    lane_max = tl.full([LANES], neg_inf, tl.float32)
    lane_sum = tl.zeros([LANES], tl.float32)
    lane_xlogx = tl.zeros([LANES], tl.float32)
    lane_group = tl.zeros([LANES], tl.int32)
    lane_nan = tl.zeros([LANES], tl.int32)
    lane_gumbel = tl.full([LANES], neg_inf, tl.float32)
    lane_gumbel_arg = tl.zeros([LANES], tl.int32)

    for start in range(v_begin, v_end, BLOCK_V):
        cols = start + tile
        x = tl.load(row_ptr + cols.to(tl.int64) * stride_logits_v, mask=cols < v_end,
                    other=neg_inf).to(tl.float32)
        lane_nan = tl.maximum(lane_nan, tl.max((x != x).to(tl.int32), axis=1))
        group_max = tl.max(x, axis=1)
        lane_group = tl.where(group_max > lane_max, start + lanes * VEC, lane_group)
        new_max = tl.maximum(lane_max, group_max)
        safe_max = tl.where(new_max > neg_inf, new_max, 0.0)
        alpha = tl.exp2((lane_max - safe_max) * LOG2E)
        x_shifted = tl.maximum(x - safe_max[:, None], _NEG_HUGE)
        weight = tl.exp2(x_shifted * LOG2E)
        # Clamped like x_shifted: finfo.min - a positive max is -inf, and alpha (0) * -inf is
        # NaN where the reference adds 0 (triton/denoise.py, "Overflow").
        max_shift = tl.maximum(lane_max - safe_max, _NEG_HUGE)
        lane_xlogx = alpha * (lane_xlogx + max_shift * lane_sum) + tl.sum(weight * x_shifted,
                                                                          axis=1)
        lane_sum = alpha * lane_sum + tl.sum(weight, axis=1)
        lane_max = new_max
        # Gumbel draws only when some logit of the chunk can still reach the split's best.
        if tl.max(group_max, axis=0) + _GUMBEL_BOUND >= tl.max(lane_gumbel, axis=0):
            u = _uniform_from_philox(seed, cols.to(tl.uint32), (cols * 0 + pos).to(tl.uint32),
                                     _GUMBEL_STREAM)
            noisy = tl.where(x > neg_inf, x - tl.log(-tl.log(u)), neg_inf)
            group_best = tl.max(noisy, axis=1)
            best_at = tl.min(tl.where(noisy == group_best[:, None], within[None, :], VEC), axis=1)
            better = group_best > lane_gumbel
            lane_gumbel = tl.where(better, group_best, lane_gumbel)
            lane_gumbel_arg = tl.where(better, start + lanes * VEC + best_at, lane_gumbel_arg)

    row_max = tl.max(lane_max, axis=0)
    safe_row_max = tl.where(row_max > neg_inf, row_max, 0.0)
    scale = tl.exp(lane_max - safe_row_max)
    row_sum = tl.sum(lane_sum * scale, axis=0)
    shift = tl.maximum(lane_max - safe_row_max, _NEG_HUGE)
    row_xlogx = tl.sum(scale * (lane_xlogx + shift * lane_sum), axis=0)
    found = row_max > neg_inf
    group = tl.min(tl.where(lane_max == row_max, lane_group, _INT32_MAX), axis=0)
    group = tl.where(found, group, 0)
    group_cols = group + within
    read_end = tl.where(found, v_end, 0)
    again = tl.load(row_ptr + group_cols.to(tl.int64) * stride_logits_v,
                    mask=group_cols < read_end, other=neg_inf).to(tl.float32)
    argmax = tl.where(found, group + tl.min(tl.where(again == row_max, within, VEC), axis=0), 0)
    gumbel_best = tl.max(lane_gumbel, axis=0)
    gumbel_arg = tl.min(tl.where(lane_gumbel == gumbel_best, lane_gumbel_arg, _INT32_MAX), axis=0)

    stats = stats_ptr + (pos * NUM_SPLITS + split) * _NUM_STATS
    indices = indices_ptr + (pos * NUM_SPLITS + split) * _NUM_INDICES
    tl.store(stats + 0, row_max)
    tl.store(stats + 1, row_sum)
    tl.store(stats + 2, row_xlogx)
    tl.store(stats + 3, gumbel_best)
    tl.store(stats + 4, tl.max(lane_nan, axis=0).to(tl.float32))
    tl.store(indices + 0, argmax)
    tl.store(indices + 1, gumbel_arg)


@triton.jit
def _eb_combine_kernel(
    stats_ptr, indices_ptr, sample_ptr, argmax_ptr, entropy_ptr, num_positions,
    NUM_SPLITS: tl.constexpr, SPLITS_POW2: tl.constexpr, BLOCK_P: tl.constexpr,
):
    neg_inf = float("-inf")
    pos = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    splits = tl.arange(0, SPLITS_POW2)
    pos_valid = pos < num_positions
    valid = pos_valid[:, None] & (splits[None, :] < NUM_SPLITS)
    slot = pos[:, None] * NUM_SPLITS + splits[None, :]
    part_max = tl.load(stats_ptr + slot * _NUM_STATS + 0, mask=valid, other=neg_inf)
    part_sum = tl.load(stats_ptr + slot * _NUM_STATS + 1, mask=valid, other=0.0)
    part_xlogx = tl.load(stats_ptr + slot * _NUM_STATS + 2, mask=valid, other=0.0)
    part_gumbel = tl.load(stats_ptr + slot * _NUM_STATS + 3, mask=valid, other=neg_inf)
    part_nan = tl.load(stats_ptr + slot * _NUM_STATS + 4, mask=valid, other=0.0)
    part_argmax = tl.load(indices_ptr + slot * _NUM_INDICES + 0, mask=valid, other=_INT32_MAX)
    part_gumbel_arg = tl.load(indices_ptr + slot * _NUM_INDICES + 1, mask=valid, other=_INT32_MAX)

    row_max = tl.max(part_max, axis=1)
    argmax = tl.min(tl.where(part_max == row_max[:, None], part_argmax, _INT32_MAX), axis=1)
    # A position with a NaN logit, or none above -inf, has no distribution; one with +inf is
    # the point mass on its first +inf (its s and a are NaN: overridden below).
    has_dist = (tl.max(part_nan, axis=1) == 0) & (row_max > neg_inf)
    point_mass = has_dist & (row_max == float("inf"))
    safe_row_max = tl.where(has_dist, row_max, 0.0)
    live = part_max > neg_inf
    scale = tl.where(live, tl.exp(part_max - safe_row_max[:, None]), 0.0)
    row_sum = tl.sum(part_sum * scale, axis=1)
    row_sum = tl.where(has_dist, row_sum, 1.0)
    shift = tl.maximum(part_max - safe_row_max[:, None], _NEG_HUGE)
    xlogx = tl.sum(scale * (part_xlogx + shift * part_sum), axis=1)
    entropy = tl.log(row_sum) - xlogx / row_sum
    gumbel_best = tl.max(part_gumbel, axis=1)
    sample = tl.min(tl.where(part_gumbel == gumbel_best[:, None], part_gumbel_arg, _INT32_MAX),
                    axis=1)
    entropy = tl.where(point_mass, 0.0, entropy)
    sample = tl.where(point_mass, argmax, sample)
    tl.store(entropy_ptr + pos, tl.where(has_dist, entropy, float("inf")), mask=pos_valid)
    tl.store(argmax_ptr + pos, tl.where(has_dist, argmax, 0).to(tl.int64), mask=pos_valid)
    tl.store(sample_ptr + pos, tl.where(has_dist, sample, 0).to(tl.int64), mask=pos_valid)


@triton.jit(do_not_specialize=["seed", "vocab"])
def _eb_select_kernel(
    entropy_ptr, sample_ptr, canvas_ptr, accepted_ptr,
    length, vocab, stride_canvas_b, stride_canvas_l, entropy_bound, seed,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
):
    b = tl.program_id(0)
    i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    i_valid = i < length
    row = b.to(tl.int64) * length
    e_i = tl.load(entropy_ptr + row + i, mask=i_valid, other=float("inf"))
    ahead_sum = tl.zeros([BLOCK_I], tl.float32)
    for j_start in range(0, length, BLOCK_J):
        j = j_start + tl.arange(0, BLOCK_J)
        e_j = tl.load(entropy_ptr + row + j, mask=j < length, other=float("inf"))
        ahead = (e_j[None, :] < e_i[:, None]) | (
            (e_j[None, :] == e_i[:, None]) & (j[None, :] < i[:, None]))
        ahead = ahead & (j < length)[None, :]
        ahead_sum += tl.sum(tl.where(ahead, e_j[None, :], 0.0), axis=1)
    accepted = (e_i < float("inf")) & (ahead_sum <= entropy_bound) & i_valid
    tl.store(accepted_ptr + row + i, accepted.to(tl.uint8), mask=i_valid)
    pos = (row + i).to(tl.uint32)
    zero = pos * 0
    r, _, _, _ = tl.philox(seed, zero, pos, zero + _RENOISE_STREAM, zero)
    noise = ((r.to(tl.uint64) * vocab.to(tl.uint64)) >> 32).to(tl.int64)
    sample = tl.load(sample_ptr + row + i, mask=i_valid, other=0)
    tl.store(canvas_ptr + b.to(tl.int64) * stride_canvas_b + i.to(tl.int64) * stride_canvas_l,
             tl.where(accepted, sample, noise), mask=i_valid)


def entropy_bound_step(logits: torch.Tensor, canvas: torch.Tensor, entropy_bound: float,
                       seed: int, sample: torch.Tensor, argmax: torch.Tensor,
                       entropy: torch.Tensor, accepted: torch.Tensor,
                       config: dict | None = None) -> None:
    """Launch the three kernels; results go to the pre-allocated outputs, ``canvas`` in place.

    logits [B, L, V] fp32/fp16/bf16 with last-dim stride 1 (other strides free); canvas int64
    [B, L], any strides; sample, argmax int64, entropy fp32, accepted bool: contiguous [B, L].
    ``seed`` in ``[0, 2**63)``. ``config`` overrides :func:`entropy_bound_config` (``block_v``,
    ``num_warps``, ``num_splits``). Inputs are assumed checked by the public op.
    """
    batch, length, vocab = logits.shape
    num_positions = batch * length
    if num_positions == 0:
        return
    config = {**entropy_bound_config(num_positions, vocab, logits.device), **(config or {})}
    block_v = config["block_v"]
    num_splits, split_size = _vocab_split(vocab, block_v, config["num_splits"])
    stats = torch.empty(num_positions, num_splits, _NUM_STATS.value, dtype=torch.float32,
                        device=logits.device)
    indices = torch.empty(num_positions, num_splits, _NUM_INDICES.value, dtype=torch.int32,
                          device=logits.device)
    _eb_partial_kernel[(num_positions, num_splits)](
        logits, stats, indices, length, vocab, split_size,
        logits.stride(0), logits.stride(1), logits.stride(2), seed,
        NUM_SPLITS=num_splits, BLOCK_V=block_v, VEC=_vector_width(logits, block_v),
        num_warps=config["num_warps"],
    )
    block_p = 64
    _eb_combine_kernel[(triton.cdiv(num_positions, block_p),)](
        stats, indices, sample, argmax, entropy, num_positions,
        NUM_SPLITS=num_splits, SPLITS_POW2=triton.next_power_of_2(num_splits), BLOCK_P=block_p,
        num_warps=4,
    )
    block_i, block_j = 64, 64
    _eb_select_kernel[(batch, triton.cdiv(length, block_i))](
        entropy, sample, canvas, accepted.view(torch.uint8),
        length, vocab, canvas.stride(0), canvas.stride(1), float(entropy_bound), seed,
        BLOCK_I=block_i, BLOCK_J=block_j, num_warps=4,
    )
