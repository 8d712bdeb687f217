"""The ``"torch"`` backend of :class:`~a2r_kernels.TreeAttentionWrapper`: tree decode attention as
one ``scaled_dot_product_attention`` per layer over the step's whole tree, planned once per step.

For row ``i`` of a step, ``out[i] = sum_t softmax_t(sm_scale * q_i . k_t) v_t`` over the tokens of
``layout.paths[i]`` (docs/API.md section 2), computed as one masked SDPA over every token of the
step's nodes:

- ``slots`` int64 ``[T]``: the flat pool slot (``block * block_size + offset``) of every token of
  the nodes on the step's paths, each node once: a prompt shared by every row is gathered once
  per layer, not once per row;
- ``mask`` ``[S, T]`` in the pool's dtype: 0 where row ``i``'s path holds token ``t``, ``-inf``
  elsewhere (the other rows' tokens).

The ``S`` queries are one batch ``[1, Hq, S, D]`` against the keys ``[1, Hkv, T, D]`` (GQA by
SDPA's ``enable_gqa``): a handful of aten ops per layer, where attending row by row gathers each
shared token once per row. The price is the masked scores, ``S * T`` instead of each row's own
path length: a compute choice of this backend, which grows with the siblings' tokens. The softmax
runs in the pool's dtype as SDPA computes it (``reference.tree_decode_attention``, the spec,
accumulates in fp32: they agree to the dtype's rounding).

The next decode step of the same rows, each row's last node grown by exactly one token and
nothing else changed (same paths, same blocks under every token planned before), is an *advance*:
the new tokens' slots and mask columns are appended (a softmax does not depend on the order of its
keys) instead of planning the tree again, O(rows + nodes) host work. Anything else (other rows, a
token given back and reserved again elsewhere, a fork) is planned from scratch.
"""

from __future__ import annotations

from itertools import chain

import numpy as np
import torch
import torch.nn.functional as F

from .layout import TreeLayout, host_to_device


class TorchDecodePlan:
    """The step plan of the ``"torch"`` backend: :meth:`plan` once per step, :meth:`run` per layer.

    Args:
        dtype: the pool's dtype (q, k_cache, v_cache and the mask).
        device: where the plan's tensors live (the pool's device).

    Attributes (after :meth:`plan`): ``slots`` int64 ``[T]`` and ``mask`` ``[S, T]`` (module
    docstring), ``num_seqs`` (``S``).
    """

    def __init__(self, dtype: torch.dtype, device):
        self.dtype = dtype
        self.device = torch.device(device)
        self.slots: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None
        self.num_seqs = 0
        self._paths: list[list[int]] | None = None   # the planned step's tree (host)
        self._lengths: list[int] = []
        self._tables: list[list[int]] = []           # each node's blocks under its tokens
        self._leaves: list[int] = []                 # the rows' last nodes, ascending, once each
        self._leaf_set: set[int] = set()
        self._leaf_columns: torch.Tensor | None = None   # [S, len(leaves)]: advance's new columns
        self._empty_rows: list[int] = []             # rows with no token: out 0, lse -inf
        self._padded: tuple[int, torch.Tensor] | None = None   # (rows, mask of that many rows)

    # ------------------------------------------------------------------ plan
    def plan(self, layout: TreeLayout) -> None:
        """Plan the step of ``layout`` (advancing the last plan when the step is its next one)."""
        paths, lengths = layout.paths, layout.node_lengths
        tables = layout.node_block_tables
        if not self._advance(paths, lengths, tables, layout.block_size):
            self._build(paths, lengths, tables, layout.block_size)

    def _build(self, paths: list[list[int]], node_lengths: list[int],
               node_tables: list[list[int]], block_size: int) -> None:
        # Host work in numpy, a few array ops whatever the tree: O(blocks + S * T) per plan.
        lengths = np.asarray(node_lengths, dtype=np.int64).reshape(-1)            # [M]
        num_blocks = -(-lengths // block_size)
        tables = [list(table[:count]) for table, count in zip(node_tables, num_blocks.tolist())]
        blocks = np.fromiter(chain.from_iterable(tables), dtype=np.int64,
                             count=int(num_blocks.sum()))
        slots = (blocks[:, None] * block_size + np.arange(block_size)).reshape(-1)
        # Each node's token t sits at slot t of its run of blocks: drop its last block's tail.
        offset = np.arange(slots.shape[0]) - np.repeat(
            (np.cumsum(num_blocks) - num_blocks) * block_size, num_blocks * block_size)
        slots = slots[offset < np.repeat(lengths, num_blocks * block_size)]
        # reads[i, j]: row i's path holds node j; expanded to the nodes' tokens, in slot order.
        reads = np.zeros((len(paths), lengths.shape[0]), dtype=bool)
        reads[np.repeat(np.arange(len(paths)), [len(path) for path in paths]),
              np.fromiter(chain.from_iterable(paths), dtype=np.int64)] = True
        hidden = ~np.repeat(reads, lengths, axis=1)                                # [S, T]
        empty = (reads @ lengths) == 0
        hidden[empty] = False   # a row without tokens sees everything; its output is zeroed
        # Non-blocking copies (no stream sync on CUDA: the host may plan while a step runs).
        self.slots = host_to_device(torch.from_numpy(slots), self.device)
        mask = torch.zeros(len(paths), slots.shape[0], dtype=self.dtype).masked_fill_(
            torch.from_numpy(hidden), float("-inf"))
        self.mask = host_to_device(mask, self.device)
        self.num_seqs = len(paths)
        self._paths = [list(path) for path in paths]
        self._lengths = lengths.tolist()
        self._tables = tables
        self._empty_rows = np.flatnonzero(empty).tolist()
        self._leaf_set = {path[-1] for path in paths if path}
        self._leaves = sorted(self._leaf_set)
        columns = torch.full((len(paths), len(self._leaves)), float("-inf"), dtype=self.dtype)
        columns.masked_fill_(torch.from_numpy(reads[:, self._leaves]), 0)
        self._leaf_columns = host_to_device(columns, self.device)
        self._padded = None

    def _advance(self, paths: list[list[int]], lengths: list[int], tables: list[list[int]],
                 block_size: int) -> bool:
        """Append the new tokens when this step is the planned one's next (module docstring) and
        return True; else return False, changing nothing."""
        if (self._paths is None or self._empty_rows or paths != self._paths
                or len(lengths) != len(self._lengths)):
            return False
        leaves = self._leaf_set
        for j, (new, old) in enumerate(zip(lengths, self._lengths)):
            if new != (old + 1 if j in leaves else old):
                return False
        for j, old_table in enumerate(self._tables):   # no token moved to another block
            if tables[j][:len(old_table)] != old_table:
                return False
        new_slots = []
        for j in self._leaves:
            position = self._lengths[j]
            if position % block_size == 0:   # the token opened a block
                self._tables[j] = self._tables[j] + [tables[j][position // block_size]]
            new_slots.append(self._tables[j][-1] * block_size + position % block_size)
            self._lengths[j] = position + 1
        added = host_to_device(torch.tensor(new_slots, dtype=torch.int64), self.device)
        self.slots = torch.cat([self.slots, added])
        self.mask = torch.cat([self.mask, self._leaf_columns], dim=1)
        self._padded = None
        return True

    # ------------------------------------------------------------------ run
    def _mask_for(self, rows: int) -> torch.Tensor:
        """The mask of ``rows >= num_seqs`` query rows: a padding row reads row 0's path (its
        output is zeroed after), so that every row of the batch has a key."""
        if rows == self.num_seqs:
            return self.mask
        if self._padded is None or self._padded[0] != rows:   # once per step, not per layer
            pad = self.mask[:1].expand(rows - self.num_seqs, -1)
            self._padded = (rows, torch.cat([self.mask, pad]))
        return self._padded[1]

    def run(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
            sm_scale: float, *, out: torch.Tensor | None = None,
            lse: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of the planned step.

        q ``[B, Hq, D]`` (``B >= num_seqs``; rows past the plan come out 0, LSE ``-inf``);
        k_cache, v_cache ``[num_blocks, block_size, Hkv, D]``, all in the plan's dtype (checked
        by the wrapper). Returns ``out`` ``[B, Hq, D]`` (written into ``out`` when given, else a
        view of SDPA's result); fills ``lse`` fp32 ``[B, Hq]`` when given.
        """
        rows, num_q_heads, head_dim = q.shape
        keys = _gather(k_cache, self.slots)          # [1, Hkv, T, D]
        values = _gather(v_cache, self.slots)
        if keys.shape[2] == 0:   # no tokens at all: every row is empty
            result = q.new_zeros(q.shape)
        else:
            mask = self._mask_for(rows)
            query = q.transpose(0, 1).unsqueeze(0)   # [1, Hq, B, D]
            result = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask,
                                                    scale=sm_scale,
                                                    enable_gqa=num_q_heads != keys.shape[1])
            result = result[0].transpose(0, 1)       # [B, Hq, D]
            for row in self._empty_rows:
                result[row].zero_()
            if rows > self.num_seqs:
                result[self.num_seqs:].zero_()
        if lse is not None:
            lse.copy_(self._lse(q, keys, sm_scale))
        if out is None:
            return result
        return out.copy_(result)

    def _lse(self, q: torch.Tensor, keys: torch.Tensor, sm_scale: float) -> torch.Tensor:
        """fp32 ``[B, Hq]``: ``logsumexp_t(sm_scale * q . k_t)`` over each row's path (``-inf``
        for a row without tokens and for rows past the plan)."""
        rows, num_q_heads, head_dim = q.shape
        num_kv_heads, num_tokens = keys.shape[1], keys.shape[2]
        lse = torch.full((rows, num_q_heads), float("-inf"), device=q.device)
        if num_tokens == 0:
            return lse
        seqs = self.num_seqs
        group = num_q_heads // num_kv_heads
        qf = q[:seqs].float().reshape(seqs, num_kv_heads, group, head_dim)
        scores = torch.einsum("shgd,htd->shgt", qf, keys[0].float()) * sm_scale
        scores = scores + self.mask.float()[:, None, None, :]
        lse[:seqs] = torch.logsumexp(scores, dim=-1).reshape(seqs, num_q_heads)
        for row in self._empty_rows:
            lse[row] = float("-inf")
        return lse


def _gather(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """The tokens at ``slots`` of a pool ``[num_blocks, block_size, Hkv, D]``, as SDPA's keys
    ``[1, Hkv, T, D]``. A pool whose blocks merge into one slot dimension (every pool of a
    :class:`~a2r_kernels.TreeKVCache`) is gathered along it, several times faster than indexing
    two dimensions; a strided one (vLLM's head-major views) by block and offset, never copied
    whole."""
    try:
        flat = cache.view(-1, cache.shape[2], cache.shape[3])   # [num_slots, Hkv, D]
        tokens = flat.index_select(0, slots)
    except RuntimeError:
        block_size = cache.shape[1]
        tokens = cache[slots // block_size, slots % block_size]
    return tokens.permute(1, 0, 2).unsqueeze(0)
