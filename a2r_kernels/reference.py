"""Plain-torch references of every op, accumulating in fp32. They are the spec the kernels match.

They run on any device and are the ``backend="torch"`` implementation of each public op.
"""

from __future__ import annotations

import torch

from .layout import TreeLayout


def _gather_tokens(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """``cache[slot // block_size, slot % block_size]`` for every flat slot id: ``[*slots.shape,
    num_kv_heads, head_dim]``. Indexes the pool view as it is: a strided view (vLLM's head-major
    CPU cache, a transposed key tile) is never copied whole, as ``reshape(-1, ...)`` would."""
    block_size = cache.shape[1]
    return cache[slots // block_size, slots % block_size]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor,
            sm_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked GQA decode attention in fp32.

    q [S, Hq, D]; k, v [S, T, Hkv, D]; valid bool [S, T] -> (out fp32 [S, Hq, D], lse fp32 [S, Hq]).
    A row with no valid key gets out 0 and lse -inf.
    """
    num_seqs, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    group = num_q_heads // num_kv_heads
    qf = q.float().reshape(num_seqs, num_kv_heads, group, head_dim)
    scores = torch.einsum("shgd,sthd->shgt", qf, k.float()) * sm_scale
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)                                   # [S, Hkv, G]
    finite = torch.isfinite(lse)
    probs = torch.exp(scores - torch.where(finite, lse, 0.0)[..., None])    # 0 where masked
    out = torch.einsum("shgt,sthd->shgd", probs, v.float())
    return (out.reshape(num_seqs, num_q_heads, head_dim),
            lse.reshape(num_seqs, num_q_heads))


def _attend_shared(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   sm_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GQA decode attention of several sequences over the same keys, in fp32.

    q [S, Hq, D]; k, v [T, Hkv, D] with T >= 1 -> (out fp32 [S, Hq, D], lse fp32 [S, Hq]). The
    queries of all S sequences (x the GQA group) of a kv head form one matrix against its keys.
    """
    num_seqs, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_q_heads // num_kv_heads
    rows = (q.float().reshape(num_seqs, num_kv_heads, group, head_dim)
            .permute(1, 0, 2, 3).reshape(num_kv_heads, num_seqs * group, head_dim))
    scores = torch.bmm(rows, k.float().permute(1, 2, 0)) * sm_scale        # [Hkv, S*G, T]
    lse = torch.logsumexp(scores, dim=-1)                                   # [Hkv, S*G]
    out = torch.bmm(torch.exp(scores - lse[..., None]), v.float().permute(1, 0, 2))

    def per_sequence(x: torch.Tensor) -> torch.Tensor:   # [Hkv, S*G, ...] -> [S, Hq, ...]
        x = x.reshape(num_kv_heads, num_seqs, group, *x.shape[2:]).transpose(0, 1)
        return x.reshape(num_seqs, num_q_heads, *x.shape[3:])

    return per_sequence(out), per_sequence(lse)


def tree_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          layout: TreeLayout, sm_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``out[i] = softmax(sm_scale * q[i] K_i^T) V_i`` over the tokens of ``layout.paths[i]``.

    q [S, Hq, D]; k_cache, v_cache [num_blocks, block_size, Hkv, D] -> (out fp32 [S, Hq, D],
    lse fp32 [S, Hq], natural log).

    Computed node by node, so that a node read by several sequences is gathered once (the
    contract holds for every backend, and CPU decoding of many branches stays cheap): each
    sequence attends to the tokens only it reads in one batched pass, each shared node is one
    pass of all its readers' queries over its keys, and the partial states are combined with
    :func:`merge_attention_states` (exact up to fp32 rounding).
    :func:`tree_decode_attention_by_path` is the literal definition; tests hold the two equal.
    """
    private, shared = layout.shared_node_slots()
    gather = private.clamp_min(0)
    out, lse = _attend(q, _gather_tokens(k_cache, gather), _gather_tokens(v_cache, gather),
                       private >= 0, sm_scale)
    for seqs, slots in shared:       # the node's KV is gathered once for all its readers
        node_out, node_lse = _attend_shared(q[seqs], _gather_tokens(k_cache, slots),
                                            _gather_tokens(v_cache, slots), sm_scale)
        out[seqs], lse[seqs] = merge_attention_states(out[seqs], lse[seqs], node_out, node_lse)
    return out, lse


def tree_decode_attention_by_path(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                  layout: TreeLayout,
                                  sm_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The literal definition of :func:`tree_decode_attention`: every sequence gathers its whole
    path (shared nodes once per sequence) and attends over it in one softmax."""
    slots = layout.seq_slots()                                               # [S, T], -1 pad
    valid = slots >= 0
    gather = slots.clamp_min(0)
    return _attend(q, _gather_tokens(k_cache, gather), _gather_tokens(v_cache, gather), valid,
                   sm_scale)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor,
                           sm_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention of ``q[i]`` over the first ``seq_lens[i]`` tokens of ``block_tables[i]``.

    q [S, Hq, D]; block_tables int32 [S, max_blocks]; seq_lens int32 [S] -> (out fp32, lse fp32).
    """
    block_size = k_cache.shape[1]
    max_tokens = block_tables.shape[1] * block_size
    t = torch.arange(max_tokens, device=q.device)
    slots = block_tables.long()[:, t // block_size] * block_size + t % block_size   # [S, T]
    valid = t[None, :] < seq_lens.long()[:, None]
    slots = torch.where(valid, slots, 0)
    return _attend(q, _gather_tokens(k_cache, slots), _gather_tokens(v_cache, slots), valid,
                   sm_scale)


def merge_attention_states(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                           lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the union of two disjoint key sets from the two partial states.

    out_* [S, H, D]; lse_* float32 [S, H] ->
    ``lse = logaddexp(lse_a, lse_b)``, ``out = exp(lse_a - lse) out_a + exp(lse_b - lse) out_b``
    (fp32; out 0 and lse -inf where both are empty). An empty state (lse -inf, weight 0)
    contributes nothing, whatever its ``out`` holds (NaN included).
    """
    lse_a, lse_b = lse_a.float(), lse_b.float()
    lse = torch.logaddexp(lse_a, lse_b)
    safe = torch.where(torch.isfinite(lse), lse, 0.0)
    w_a = torch.exp(lse_a - safe)[..., None]
    w_b = torch.exp(lse_b - safe)[..., None]
    # where, not w * out: 0 * NaN is NaN.
    return (torch.where(w_a > 0, w_a * out_a.float(), 0.0)
            + torch.where(w_b > 0, w_b * out_b.float(), 0.0)), lse


try:  # the denoise reference lives in its own module; re-exported so this file indexes every op
    from .reference_denoise import *  # noqa: F401,F403
except ImportError:  # pragma: no cover - only while the module is being written
    pass
