"""Triton kernels of ``denoise_step`` (formulas and RNG layout: :mod:`a2r_kernels.reference_denoise`).

Three launches, none of which materialises a ``[B, L, V]`` tensor:

1. ``_denoise_partial_kernel``, grid ``(B * L, num_splits)``: program ``(pos, split)`` reads the
   token at ``pos = b * L + l``; if it is not ``mask_id`` it reads no logits at all. Otherwise it
   streams its chunk ``[split * split_size, min((split + 1) * split_size, V))`` of the row once, in
   ``BLOCK_V`` chunks seen as ``[BLOCK_V / VEC, VEC]`` tiles: lane ``r`` loads the ``VEC``
   consecutive logits of its group (16 bytes) and folds the group into per-lane running statistics
   in fp32 registers: max ``m`` and ``s = sum e^(x - m)`` (online softmax, one rescale per group,
   one exp per logit), ``a = sum e^(x - m) (x - m)`` (for the entropy; rescaled as
   ``a' = e^(m - m') (a + (m - m') s)``), the first group holding the lane's max (the argmax is
   found at the end by re-reading one group: lowest index on ties), the second largest value, and
   for ``temperature > 0`` the Gumbel-max argmax of ``x / T + g`` with the logit there. It writes
   one partial state per (pos, split). Splitting V keeps the GPU busy when ``B * L`` is small (one
   row of a 150k vocabulary is 300 KB of bf16).
2. ``_denoise_combine_kernel``, grid ``(cdiv(B * L, BLOCK_P),)``: merges the split states of each
   position (the same rescaling) into ``x0`` and ``confidence`` (``-inf`` at unmasked positions,
   where ``x0`` is the token). Non-finite logits (the rule of :mod:`a2r_kernels.reference_denoise`)
   are classified by the row max, which every max above propagates NaN through (``_max_nan``), so
   they cost no extra pass: max NaN or ``-inf`` -> ``x0 = mask_id``, confidence NaN; max ``+inf`` ->
   confidence 1 (p(x0), margin) or 0 (entropy), x0 the lowest ``+inf`` index.
3. ``_denoise_select_kernel``, grid ``(B, cdiv(L, BLOCK_I))``: position ``i`` of row ``b`` gets its
   rank ``#{j masked: c_j > c_i or (c_j == c_i and j < i)}`` (an all-pairs count, ``L^2`` compares
   per row, cheap next to ``L * V`` logits); it is committed when ``rank < num_transfer[b]``
   (which clamps ``num_transfer`` to the masked count by itself), or in threshold mode when
   ``c_i >= threshold or rank == 0``. Committed positions get ``tokens[b, i] = x0[b, i]``. Masked
   positions are recognised by ``confidence > -inf``, not by ``tokens``, because this kernel is
   rewriting ``tokens`` while other programs of the same row read it; that test is also false for
   a NaN confidence, so a NaN position is neither ranked nor committed.

Random numbers: ``tl.philox(seed, c0, c1, c2, c3)[0]`` with counter ``(v, pos, 0, 0)`` for the Gumbel
noise of vocabulary entry ``v`` and ``(0, pos, 1, 0)`` for the ``"random"`` score; the uint32 ``r``
becomes ``u = ((r >> 9) + 0.5) * 2**-23``. Both counter words are 32-bit: no overflow for
``V < 2**32`` and ``B * L < 2**32``. A CUDA twin reproduces the stream with curand's Philox round
function and the same key ``(seed & 0xffffffff, seed >> 32)``.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..backend import triton_interpret
from ..vocab import (GUMBEL_STREAM, INT32_MAX, NEG_HUGE, RANDOM_SCORE_STREAM, REMASKING_CODES,
                     LOG2E as _LOG2E_VALUE)

_NUM_STATS = tl.constexpr(6)     # m, s, a, second, gumbel_best, gumbel_logit (fp32) / (pos, split)
_NUM_INDICES = tl.constexpr(2)   # argmax, gumbel argmax (int32) per (pos, split)
# The vocabulary's constants as constexprs (jit functions may read only those globals).
_INT32_MAX = tl.constexpr(INT32_MAX)
LOG2E = tl.constexpr(_LOG2E_VALUE)
_NEG_HUGE = tl.constexpr(NEG_HUGE)   # a finite shift whose exp2 underflows to exactly 0
_GUMBEL_STREAM = tl.constexpr(GUMBEL_STREAM)
_RANDOM_SCORE_STREAM = tl.constexpr(RANDOM_SCORE_STREAM)


@triton.jit
def _max_nan(a, b):
    """max(a, b), NaN if either is (tl.max / tl.maximum drop a NaN): the row max that classifies a
    row holding a NaN logit. max.NaN.f32 on sm_80+, as cheap as max.f32."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _top2_combine(first_a, second_a, first_b, second_b):
    """(largest, second largest) of the union of two (largest, second largest) pairs; the largest
    propagates NaN."""
    return (_max_nan(first_a, first_b),
            tl.maximum(tl.minimum(first_a, first_b), tl.maximum(second_a, second_b)))


@triton.jit
def _uniform_from_philox(seed, c0, c1, STREAM: tl.constexpr):
    """fp32 uniform in (0, 1) at Philox counter (c0, c1, STREAM, 0); c0, c1 uint32 blocks."""
    zero = c0 * 0
    r, _, _, _ = tl.philox(seed, c0, c1, zero + STREAM, zero)
    return ((r >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07    # 2**-23


@triton.jit(do_not_specialize=["seed", "mask_id"])
def _denoise_partial_kernel(
    logits_ptr, tokens_ptr, stats_ptr, indices_ptr,
    length, vocab, split_size,
    stride_logits_b, stride_logits_l, stride_logits_v,
    stride_tokens_b, stride_tokens_l,
    mask_id, seed, inv_temperature,
    NUM_SPLITS: tl.constexpr, BLOCK_V: tl.constexpr, VEC: tl.constexpr,
    SAMPLE: tl.constexpr, NEED_ENTROPY: tl.constexpr, NEED_SECOND: tl.constexpr,
):
    # A chunk of BLOCK_V logits is a [LANES, VEC] tile: lane r holds the VEC consecutive entries
    # [start + r * VEC, start + (r + 1) * VEC) (one 16-byte load per thread). The running
    # statistics are per lane and updated once per group of VEC entries, so the per-entry work
    # is one convert, one max, one subtract, one multiply, one exp2 and one add: the chunk's
    # rescale factor and the argmax bookkeeping are per group, not per entry (with per-entry
    # online softmax, two exps per entry made the pass ALU/MUFU-bound rather than memory-bound
    # at V ~ 1e5).
    # Overflow: every finite input must give the reference's answer, also logits near
    # +-finfo.max. So the max is subtracted before scaling by log2(e) ((x - m) * LOG2E, never
    # the fused x * LOG2E - m * LOG2E, whose terms overflow to +-inf beyond 2.4e38 and give
    # inf - inf = NaN), and every shift that multiplies a sum (m_old - m_new) is clamped to the
    # finite -1e30 like the logits' shifts: m_old - m_new can overflow to -inf (finfo.min - a
    # positive max), and 0 * -inf would be NaN where the reference adds 0.
    LANES: tl.constexpr = BLOCK_V // VEC
    pos = tl.program_id(0)
    split = tl.program_id(1)
    b = (pos // length).to(tl.int64)
    l = (pos % length).to(tl.int64)
    token = tl.load(tokens_ptr + b * stride_tokens_b + l * stride_tokens_l)
    v_begin = split * split_size
    v_end = tl.minimum(v_begin + split_size, vocab)
    # An unmasked position loops zero times: its logits are never read.
    v_end = tl.where(token == mask_id, v_end, v_begin)
    row_ptr = logits_ptr + b * stride_logits_b + l * stride_logits_l

    lanes = tl.arange(0, LANES)
    within = tl.arange(0, VEC)
    tile = lanes[:, None] * VEC + within[None, :]             # [LANES, VEC] offsets in a chunk
    neg_inf = float("-inf")
    lane_max = tl.full([LANES], neg_inf, tl.float32)
    lane_sum = tl.zeros([LANES], tl.float32)                   # sum e^(x - lane_max)
    lane_xlogx = tl.zeros([LANES], tl.float32)                 # sum e^(x - lane_max) (x - lane_max)
    lane_group = tl.zeros([LANES], tl.int32)                   # first group holding lane_max
    lane_second = tl.full([LANES], neg_inf, tl.float32)
    lane_gumbel = tl.full([LANES], neg_inf, tl.float32)
    lane_gumbel_arg = tl.full([LANES], _INT32_MAX, tl.int32)   # none yet
    lane_gumbel_logit = tl.full([LANES], neg_inf, tl.float32)

    for start in range(v_begin, v_end, BLOCK_V):
        cols = start + tile
        x = tl.load(row_ptr + cols.to(tl.int64) * stride_logits_v, mask=cols < v_end,
                    other=neg_inf).to(tl.float32)
        if NEED_SECOND:
            # the group's top two (the max twice when it occurs twice), in one reduction
            group_max, group_second = tl.reduce((x, tl.full(x.shape, neg_inf, tl.float32)), 1,
                                                _top2_combine)
            lane_second = tl.maximum(tl.maximum(lane_second, group_second),
                                     tl.minimum(lane_max, group_max))
        else:
            group_max = tl.reduce(x, 1, _max_nan)
        # Chunks come in increasing order, so a strict > keeps a lane's first group of a tie.
        lane_group = tl.where(group_max > lane_max, start + lanes * VEC, lane_group)
        new_max = _max_nan(lane_max, group_max)
        # Shift by 0 for a lane that has seen only -inf: exp2(-inf) = 0, never (-inf) - (-inf).
        safe_max = tl.where(new_max > neg_inf, new_max, 0.0)
        alpha = tl.exp2((lane_max - safe_max) * LOG2E)
        if NEED_ENTROPY:
            # A -inf logit must add 0, not 0 * (-inf): its shift is clamped to a finite -1e30,
            # whose weight exp2(-1.4e30) is exactly 0 (one max instead of a compare and 2 selects).
            x_shifted = tl.maximum(x - safe_max[:, None], _NEG_HUGE)
            weight = tl.exp2(x_shifted * LOG2E)
            contrib = weight * x_shifted
            # -1e30 also where lane_max is -inf (then lane_sum is 0)
            max_shift = tl.maximum(lane_max - safe_max, _NEG_HUGE)
            lane_xlogx = alpha * (lane_xlogx + max_shift * lane_sum) + tl.sum(contrib, axis=1)
        else:
            weight = tl.exp2((x - safe_max[:, None]) * LOG2E)
        lane_sum = alpha * lane_sum + tl.sum(weight, axis=1)
        lane_max = new_max
        if SAMPLE:
            u = _uniform_from_philox(seed, cols.to(tl.uint32), (cols * 0 + pos).to(tl.uint32),
                                     _GUMBEL_STREAM)
            noisy = tl.where(x > neg_inf, x * inv_temperature - tl.log(-tl.log(u)), neg_inf)
            group_best = tl.max(noisy, axis=1)
            # lowest index of the group's best (ties have probability ~0, kept exact anyway)
            best_at = tl.min(tl.where(noisy == group_best[:, None], within[None, :], VEC), axis=1)
            best_logit = tl.max(tl.where(within[None, :] == best_at[:, None], x, neg_inf), axis=1)
            # A lane's first group counts even when all its keys are -inf: finite logits whose
            # x / T overflows to -inf tie at -inf, and the reference's argmax takes the lowest
            # index (with its logit) among them.
            better = (group_best > lane_gumbel) | (lane_gumbel_arg == _INT32_MAX)
            lane_gumbel = tl.where(better, group_best, lane_gumbel)
            lane_gumbel_arg = tl.where(better, start + lanes * VEC + best_at, lane_gumbel_arg)
            lane_gumbel_logit = tl.where(better, best_logit, lane_gumbel_logit)

    row_max = tl.reduce(lane_max, 0, _max_nan)
    safe_row_max = tl.where(row_max > neg_inf, row_max, 0.0)
    scale = tl.exp(lane_max - safe_row_max)
    row_sum = tl.sum(lane_sum * scale, axis=0)
    # Argmax (lowest index of the max): groups are disjoint and ordered, so it lies in the lowest
    # group among the lanes that reached the max; read that one group again (VEC entries) to
    # find it. A split with no finite logit reports 0, as torch.argmax does for an all -inf row.
    found = row_max > neg_inf
    group = tl.min(tl.where(lane_max == row_max, lane_group, _INT32_MAX), axis=0)
    group = tl.where(found, group, 0)
    group_cols = group + within
    read_end = tl.where(found, v_end, 0)      # nothing to read when nothing was found
    again = tl.load(row_ptr + group_cols.to(tl.int64) * stride_logits_v,
                    mask=group_cols < read_end, other=neg_inf).to(tl.float32)
    argmax = tl.where(found, group + tl.min(tl.where(again == row_max, within, VEC), axis=0), 0)
    stats = stats_ptr + (pos * NUM_SPLITS + split) * 6
    indices = indices_ptr + (pos * NUM_SPLITS + split) * 2
    tl.store(stats + 0, row_max)
    tl.store(stats + 1, row_sum)
    if NEED_ENTROPY:
        shift = tl.maximum(lane_max - safe_row_max, _NEG_HUGE)   # finite: see the loop
        tl.store(stats + 2, tl.sum(scale * (lane_xlogx + shift * lane_sum), axis=0))
    if NEED_SECOND:
        # The second largest value: the winning lane's runner-up, or another lane's maximum.
        owner = (lane_group == group) & (lane_max == row_max)
        tl.store(stats + 3, tl.max(tl.where(owner, lane_second, lane_max), axis=0))
    tl.store(indices + 0, argmax)
    if SAMPLE:
        gumbel_best = tl.max(lane_gumbel, axis=0)
        gumbel_arg = tl.min(tl.where(lane_gumbel == gumbel_best, lane_gumbel_arg, _INT32_MAX),
                            axis=0)
        gumbel_owner = (lane_gumbel_arg == gumbel_arg) & (lane_gumbel == gumbel_best)
        tl.store(stats + 4, gumbel_best)
        tl.store(stats + 5, tl.max(tl.where(gumbel_owner, lane_gumbel_logit, neg_inf), axis=0))
        tl.store(indices + 1, gumbel_arg)


@triton.jit(do_not_specialize=["seed", "mask_id"])
def _denoise_combine_kernel(
    stats_ptr, indices_ptr, tokens_ptr, x0_ptr, confidence_ptr,
    num_positions, length,
    stride_tokens_b, stride_tokens_l,
    mask_id, seed,
    NUM_SPLITS: tl.constexpr, SPLITS_POW2: tl.constexpr, BLOCK_P: tl.constexpr,
    SAMPLE: tl.constexpr, REMASKING: tl.constexpr,
):
    neg_inf = float("-inf")
    pos = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    splits = tl.arange(0, SPLITS_POW2)
    pos_valid = pos < num_positions
    valid = pos_valid[:, None] & (splits[None, :] < NUM_SPLITS)
    slot = pos[:, None] * NUM_SPLITS + splits[None, :]
    part_max = tl.load(stats_ptr + slot * _NUM_STATS + 0, mask=valid, other=neg_inf)
    part_sum = tl.load(stats_ptr + slot * _NUM_STATS + 1, mask=valid, other=0.0)
    part_argmax = tl.load(indices_ptr + slot * _NUM_INDICES + 0, mask=valid, other=_INT32_MAX)

    row_max = tl.reduce(part_max, 1, _max_nan)
    # NaN (a NaN logit) or -inf (no logit above -inf): no distribution; +inf: a point mass.
    undefined = ~(row_max > neg_inf)
    point_mass = row_max == float("inf")
    is_max = part_max == row_max[:, None]
    # Unmasked positions have no live split: shift by 0 and divide by 1 to keep their
    # (discarded) score free of NaN.
    row_max = tl.where(row_max > neg_inf, row_max, 0.0)
    scale = tl.exp(part_max - row_max[:, None])
    row_sum = tl.sum(part_sum * scale, axis=1)
    row_sum = tl.where(row_sum > 0, row_sum, 1.0)
    argmax = tl.min(tl.where(is_max, part_argmax, _INT32_MAX), axis=1)

    if SAMPLE:
        part_gumbel = tl.load(stats_ptr + slot * _NUM_STATS + 4, mask=valid, other=neg_inf)
        part_gumbel_logit = tl.load(stats_ptr + slot * _NUM_STATS + 5, mask=valid, other=neg_inf)
        part_gumbel_arg = tl.load(indices_ptr + slot * _NUM_INDICES + 1, mask=valid,
                                  other=_INT32_MAX)
        gumbel_best = tl.max(part_gumbel, axis=1)
        is_best = part_gumbel == gumbel_best[:, None]
        x0 = tl.min(tl.where(is_best, part_gumbel_arg, _INT32_MAX), axis=1)
        owner = is_best & (part_gumbel_arg == x0[:, None])
        x0_logit = tl.max(tl.where(owner, part_gumbel_logit, neg_inf), axis=1)
    else:
        x0 = argmax
        x0_logit = row_max

    if REMASKING == 0:      # low_confidence: p(x0)
        score = tl.exp(x0_logit - row_max) / row_sum
    elif REMASKING == 1:    # margin: p1 - p2, with p1 = 1 / row_sum
        part_second = tl.load(stats_ptr + slot * _NUM_STATS + 3, mask=valid, other=neg_inf)
        owner = is_max & (part_argmax == argmax[:, None])
        second = tl.max(tl.where(owner, part_second, part_max), axis=1)
        score = (1.0 - tl.exp(second - row_max)) / row_sum
    elif REMASKING == 2:    # entropy: sum p log p = a / s - log s
        part_xlogx = tl.load(stats_ptr + slot * _NUM_STATS + 2, mask=valid, other=0.0)
        shift = tl.maximum(part_max - row_max[:, None], _NEG_HUGE)   # finite: 0 * shift is 0
        xlogx = tl.sum(scale * (part_xlogx + shift * part_sum), axis=1)
        score = xlogx / row_sum - tl.log(row_sum)
    else:                   # random
        score = _uniform_from_philox(seed, (pos * 0).to(tl.uint32), pos.to(tl.uint32),
                                     _RANDOM_SCORE_STREAM)
    # the point mass: p(x0) = p1 = 1, p2 = 0, entropy 0 ("random" keeps its uniform score)
    if REMASKING == 2:
        score = tl.where(point_mass, 0.0, score)
    elif REMASKING != 3:
        score = tl.where(point_mass, 1.0, score)
    score = tl.where(undefined, float("nan"), score)

    b = (pos // length).to(tl.int64)
    l = (pos % length).to(tl.int64)
    token = tl.load(tokens_ptr + b * stride_tokens_b + l * stride_tokens_l, mask=pos_valid,
                    other=0)
    masked = token == mask_id
    x0 = tl.where(undefined, token, x0.to(tl.int64))   # token == mask_id where masked
    tl.store(x0_ptr + pos, tl.where(masked, x0, token), mask=pos_valid)
    tl.store(confidence_ptr + pos, tl.where(masked, score, neg_inf), mask=pos_valid)


@triton.jit
def _denoise_select_kernel(
    confidence_ptr, x0_ptr, tokens_ptr, transferred_ptr, num_transfer_ptr,
    length, stride_tokens_b, stride_tokens_l, threshold,
    USE_THRESHOLD: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
):
    neg_inf = float("-inf")
    b = tl.program_id(0)
    i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    i_valid = i < length
    row = b.to(tl.int64) * length
    conf_i = tl.load(confidence_ptr + row + i, mask=i_valid, other=neg_inf)
    masked_i = conf_i > neg_inf
    rank = tl.zeros([BLOCK_I], tl.int32)
    for j_start in range(0, length, BLOCK_J):
        j = j_start + tl.arange(0, BLOCK_J)
        conf_j = tl.load(confidence_ptr + row + j, mask=j < length, other=neg_inf)
        ahead = (conf_j[None, :] > conf_i[:, None]) | (
            (conf_j[None, :] == conf_i[:, None]) & (j[None, :] < i[:, None]))
        ahead = ahead & (conf_j > neg_inf)[None, :]
        rank += tl.sum(ahead.to(tl.int32), axis=1)
    if USE_THRESHOLD:
        chosen = masked_i & ((conf_i >= threshold) | (rank == 0))
    else:
        quota = tl.load(num_transfer_ptr + b)
        chosen = masked_i & (rank.to(tl.int64) < quota)
    tl.store(transferred_ptr + row + i, chosen.to(tl.uint8), mask=i_valid)
    x0 = tl.load(x0_ptr + row + i, mask=i_valid & chosen, other=0)
    tl.store(tokens_ptr + b.to(tl.int64) * stride_tokens_b + i.to(tl.int64) * stride_tokens_l, x0,
             mask=i_valid & chosen)


def _vector_width(logits: torch.Tensor, block_v: int) -> int:
    """Logits per lane group: 16 bytes (8 bf16/fp16, 4 fp32), at most the chunk."""
    return max(1, min(16 // logits.element_size(), block_v))


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def denoise_config(num_positions: int, vocab: int, device: torch.device) -> dict:
    """Launch parameters of the partial kernel, from a small table (no autotuning).

    ``block_v``/``num_warps``: 2048/8 for large vocabularies (8 bf16 = 16 bytes per thread and
    chunk), smaller power-of-two blocks for small ones. ``num_splits``: enough (position, split)
    programs for ~4 waves of the SMs, but at least 8 chunks of ``block_v`` per split. Under the
    CPU interpreter the widest block is used (numpy cost is per chunk, not per element) and V is
    not split.
    """
    if triton_interpret():
        return {"block_v": min(4096, triton.next_power_of_2(max(vocab, 16))), "num_warps": 4,
                "num_splits": 1}
    if vocab >= 16384:
        block_v, num_warps = 2048, 8
    elif vocab >= 2048:
        block_v, num_warps = 1024, 4
    else:
        block_v, num_warps = max(triton.next_power_of_2(vocab), 32), 4
    target_programs = 4 * _num_sms(device.index if device.index is not None else
                                   torch.cuda.current_device())
    max_splits = max(1, triton.cdiv(vocab, 8 * block_v))
    num_splits = max(1, min(triton.cdiv(target_programs, max(num_positions, 1)), max_splits))
    return {"block_v": block_v, "num_warps": num_warps, "num_splits": num_splits}


def _vocab_split(vocab: int, block_v: int, num_splits: int) -> tuple[int, int]:
    """``(num_splits, split_size)`` of a split-V launch: at most ``num_splits`` splits of whole
    ``block_v`` chunks, none of them empty."""
    num_splits = min(num_splits, triton.cdiv(vocab, block_v))
    split_size = triton.cdiv(triton.cdiv(vocab, num_splits), block_v) * block_v
    return triton.cdiv(vocab, split_size), split_size


def denoise_step(logits: torch.Tensor, tokens: torch.Tensor, mask_id: int,
                 num_transfer: torch.Tensor | None, threshold: float | None,
                 temperature: float, remasking: str, seed: int,
                 x0: torch.Tensor, confidence: torch.Tensor, transferred: torch.Tensor,
                 config: dict | None = None) -> None:
    """Launch the three kernels; results go to the pre-allocated outputs, ``tokens`` in place.

    logits [B, L, V] fp32/fp16/bf16, any strides; tokens int64 [B, L], any strides;
    num_transfer int64 [B] contiguous on the logits' device, or None with a float ``threshold``;
    x0 int64, confidence fp32, transferred bool: contiguous [B, L]. ``seed`` in ``[0, 2**63)``.
    ``config`` overrides :func:`denoise_config` (``block_v``, ``num_warps``, ``num_splits``; tests
    use it to exercise several chunks and splits on small vocabularies). Inputs are assumed
    checked by the public op.
    """
    batch, length, vocab = logits.shape
    num_positions = batch * length
    if num_positions == 0:
        return
    config = {**denoise_config(num_positions, vocab, logits.device), **(config or {})}
    block_v = config["block_v"]
    num_splits, split_size = _vocab_split(vocab, block_v, config["num_splits"])
    sample = temperature > 0
    code = REMASKING_CODES[remasking]

    stats = torch.empty(num_positions, num_splits, _NUM_STATS.value, dtype=torch.float32,
                        device=logits.device)
    indices = torch.empty(num_positions, num_splits, _NUM_INDICES.value, dtype=torch.int32,
                          device=logits.device)
    _denoise_partial_kernel[(num_positions, num_splits)](
        logits, tokens, stats, indices,
        length, vocab, split_size,
        logits.stride(0), logits.stride(1), logits.stride(2),
        tokens.stride(0), tokens.stride(1),
        mask_id, seed, (1.0 / temperature) if sample else 1.0,
        NUM_SPLITS=num_splits, BLOCK_V=block_v, VEC=_vector_width(logits, block_v), SAMPLE=sample,
        NEED_ENTROPY=code == REMASKING_CODES["entropy"],
        NEED_SECOND=code == REMASKING_CODES["margin"],
        num_warps=config["num_warps"],
    )
    block_p = 64
    _denoise_combine_kernel[(triton.cdiv(num_positions, block_p),)](
        stats, indices, tokens, x0, confidence,
        num_positions, length, tokens.stride(0), tokens.stride(1),
        mask_id, seed,
        NUM_SPLITS=num_splits, SPLITS_POW2=triton.next_power_of_2(num_splits), BLOCK_P=block_p,
        SAMPLE=sample, REMASKING=code,
        num_warps=4,
    )
    block_i, block_j = 64, 64
    _denoise_select_kernel[(batch, triton.cdiv(length, block_i))](
        confidence, x0, tokens, transferred.view(torch.uint8),
        num_transfer if num_transfer is not None else x0,   # unused in threshold mode
        length, tokens.stride(0), tokens.stride(1),
        float(threshold) if threshold is not None else 0.0,
        USE_THRESHOLD=threshold is not None, BLOCK_I=block_i, BLOCK_J=block_j,
        num_warps=4,
    )
