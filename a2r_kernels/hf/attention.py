"""The transformers side of :class:`~a2r_kernels.hf.TreeDecoder`: the attention function registered
under :data:`ATTN_IMPLEMENTATION` (``"a2r_tree"``) and :class:`HFTreeCacheAdapter`, the
``transformers.Cache`` that writes each layer's new K/V into a :class:`~a2r_kernels.TreeKVCache`.

Both read one :class:`ForwardContext` per forward (as nano-vllm's ``Context``): the decoder fills
it before the model's forward, the adapter's ``update`` writes K/V by it, and the attention
function takes one of three branches by it:

- *planned decode* (one new token per row, ``context.wrapper`` set): a
  :class:`~a2r_kernels.TreeAttentionWrapper` planned once for the step runs for every layer over
  the layer's pools. Shared prefixes are stored once and, with the Triton/CUDA backends, read once.
- *extend from empty* (every row starts empty, e.g. a fresh prompt): causal attention over the
  fresh K/V (SDPA, or flash-attn's kernel on CUDA when it is installed).
- *extend with past* (``T`` new tokens of rows that already hold tokens): each row's path is
  gathered from the pool and attended causally, new token ``t`` seeing the past and new tokens
  ``0..t``.

No dense mask is built on our path: the mask function registered for ``"a2r_tree"`` is
transformers' own ``sdpa_mask``, which returns ``None`` for an unpadded prefill and for
``q_len == 1``. Outside a decoder's forward (no context in the call, e.g. ``model.generate`` on a
model whose ``attn_implementation`` is ``"a2r_tree"``) the attention function is transformers'
SDPA one, so such a model stays usable with the usual API.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache

from ..cache import TreeKVCache
from ..wrapper import TreeAttentionWrapper

ATTN_IMPLEMENTATION = "a2r_tree"
# The forward kwarg that carries the ForwardContext down to the attention function (transformers
# forwards unknown kwargs from the model's forward to every attention call).
CONTEXT_KWARG = "a2r_tree_context"

_registered = False


def register() -> str:
    """Register :data:`ATTN_IMPLEMENTATION` with transformers' attention and mask interfaces.

    Idempotent; called on import of :mod:`a2r_kernels.hf`. Returns the implementation name, to
    pass as ``from_pretrained(..., attn_implementation=...)`` or
    ``model.set_attn_implementation(...)``.
    """
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(ATTN_IMPLEMENTATION, tree_attention_forward)
        AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
        _registered = True
    return ATTN_IMPLEMENTATION


@dataclass
class ForwardContext:
    """What one forward over a :class:`~a2r_kernels.TreeKVCache` writes and attends with.

    Rows ``b`` of the forward's ``input_ids`` ``[B, T]`` are the decoder's sequences ``seqs[b]``.

    Attributes:
        cache: the storage.
        slots: int64 ``[B * T]`` on the cache's device, the reserved slots of the new tokens
            (slot ``b * T + t`` for token ``t`` of row ``b``, ``TreeKVCache.reserve``'s order).
        past_lengths: per row, tokens held before this forward (extend; empty for a decode step).
        seqs: the rows' sequence ids (extend with past gathers their paths).
        wrapper: planned decode: the step's planned wrapper, run by every layer (``T == 1``).
        attn_out: planned decode: optional ``[num_layers, >= B, Hq, D]`` buffer each layer's
            attention is written into (fixed buffers of a captured CUDA graph).
        row_source: planned decode of a padded batch: int64 ``[B]``, the row whose K/V row ``b``
            writes (a padding row writes row 0's into row 0's slot: the same bytes); else None.
    """

    cache: TreeKVCache
    slots: torch.Tensor
    past_lengths: list[int] = field(default_factory=list)
    seqs: list[int] = field(default_factory=list)
    wrapper: TreeAttentionWrapper | None = None
    attn_out: torch.Tensor | None = None
    row_source: torch.Tensor | None = None
    # extend with past: per row (slots [L], causal mask [T, L]), built by layer 0 for all layers
    path_masks: list[tuple[torch.Tensor, torch.Tensor]] | None = None


def _slot_view(pool: torch.Tensor) -> torch.Tensor:
    """A layer's pool ``[num_blocks, block_size, Hkv, D]`` (contiguous) viewed as ``[num_blocks *
    block_size, Hkv, 1, D]``, the layout of the model's decode K/V ``[B, Hkv, T=1, D]``: they are
    written into it as they come."""
    return pool.view(-1, pool.shape[2], 1, pool.shape[3])


class HFTreeCacheAdapter(Cache):
    """A ``transformers.Cache`` over a :class:`~a2r_kernels.TreeKVCache`, one forward at a time.

    Named for what it is: an adapter between transformers' ``Cache`` protocol and the storage
    (:class:`~a2r_kernels.TreeKVCache`), which it neither owns nor sizes. Before each forward the
    decoder calls :meth:`begin` with the forward's :class:`ForwardContext`; during it every
    layer's :meth:`update` writes the new K/V ``[B, Hkv, T, D]`` into the context's slots and
    returns them unchanged (the attention function reads the pool itself); :meth:`end` clears it.
    """

    def __init__(self, tree: TreeKVCache):
        super().__init__(layers=[])
        self.tree = tree
        self.context: ForwardContext | None = None
        # Per layer, the pools as decode steps write them (views, made once).
        self._slot_views = [(_slot_view(k), _slot_view(v)) for k, v in zip(tree.k, tree.v)]

    def begin(self, context: ForwardContext) -> None:
        self.context = context

    def end(self) -> None:
        self.context = None

    # ---------------------------------------------------------------- transformers Cache API
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args, **kwargs):
        """Write this layer's new K/V ``[B, Hkv, T, D]`` into the reserved slots; return them."""
        context = self.context
        if context is None:
            raise RuntimeError("HFTreeCacheAdapter.update called outside a TreeDecoder forward")
        slots = context.slots
        batch, num_kv_heads, num_tokens, head_dim = key_states.shape
        if batch * num_tokens != slots.shape[0]:
            raise ValueError(f"key_states [B={batch}, Hkv, T={num_tokens}, D] does not match "
                             f"the {slots.shape[0]} reserved slots")
        k, v = key_states, value_states
        if num_tokens > 1:
            k = k.transpose(1, 2).reshape(batch * num_tokens, num_kv_heads, head_dim)
            v = v.transpose(1, 2).reshape(batch * num_tokens, num_kv_heads, head_dim)
        if context.row_source is not None:   # padding rows write row 0's K/V into its slot
            k, v = k.index_select(0, context.row_source), v.index_select(0, context.row_source)
        if k.dtype != self.tree.dtype:
            k, v = k.to(self.tree.dtype), v.to(self.tree.dtype)
        # The slots come from this forward's reserve and the shapes were checked above: the
        # unchecked scatter (write's range check would cost two reductions per layer). A decode
        # step's [B, Hkv, 1, D] goes into the slot views as it is.
        if num_tokens == 1:
            k_slots, v_slots = self._slot_views[layer_idx]
            k_slots.index_copy_(0, slots, k)
            v_slots.index_copy_(0, slots, v)
        else:
            self.tree.scatter(layer_idx, slots, k, v)
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        context = self.context
        return max(context.past_lengths, default=0) if context is not None else 0

    def get_mask_sizes(self, query_length, layer_idx: int = 0) -> tuple[int, int]:
        # transformers 5.0 passes cache_position (a [T] tensor) here, later releases the length T.
        if isinstance(query_length, torch.Tensor):
            query_length = query_length.shape[0]
        return self.get_seq_length() + query_length, 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1


# -------------------------------------------------------------------- the attention function
def tree_attention_forward(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, scaling: float | None = None,
                           dropout: float = 0.0, **kwargs):
    """The ``"a2r_tree"`` attention function (``transformers.AttentionInterface`` signature).

    query ``[B, Hq, T, D]``; key, value the fresh ``[B, Hkv, T, D]`` (what the adapter's
    ``update`` returns). Returns ``(out [B, T, Hq, D], None)``. With a :class:`ForwardContext` in
    ``kwargs`` it takes one of the three branches of the module docstring; without one it is
    transformers' SDPA attention, unchanged.
    """
    context: ForwardContext | None = kwargs.pop(CONTEXT_KWARG, None)
    if context is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    if kwargs.get("sliding_window") is not None:
        raise ValueError("a2r_tree attention does not support sliding-window layers (layer "
                         f"{module.layer_idx} has sliding_window={kwargs['sliding_window']})")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    layer = module.layer_idx
    if context.wrapper is not None:                 # planned decode
        out = _planned_decode(context, layer, query, scaling)
    elif not any(context.past_lengths):             # extend from empty
        out = _causal_attention(query, key, value, scaling)
    else:                                           # extend with past
        out = _attend_with_past(context, layer, query, scaling)
    return out, None


def _planned_decode(context: ForwardContext, layer: int, query: torch.Tensor,
                    scaling: float) -> torch.Tensor:
    """query ``[B, Hq, 1, D]`` -> ``[B, 1, Hq, D]`` in query's dtype, by the step's wrapper."""
    tree = context.cache
    # The wrapper reads q in the pool's dtype: a pool narrower than the model (dtype=) or an
    # autocast forward would otherwise fail its dtype check. No-op when they agree.
    q = query[:, :, 0, :].to(tree.dtype)
    out = None if context.attn_out is None else context.attn_out[layer, :q.shape[0]]
    out = context.wrapper.run(q, tree.k[layer], tree.v[layer], out=out, sm_scale=scaling)
    return out.to(query.dtype).unsqueeze(1)


def _flash_attn_func():
    """flash-attn's ``flash_attn_func`` when the package is installed, else None."""
    try:
        from flash_attn import flash_attn_func
    except Exception:  # not installed, or built for another torch
        return None
    return flash_attn_func


def _causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      scaling: float) -> torch.Tensor:
    """Causal attention of T fresh tokens over themselves.

    query [B, Hq, T, D]; key, value [B, Hkv, T, D] -> [B, T, Hq, D] in query's dtype.
    """
    flash = _flash_attn_func() if query.is_cuda else None
    if flash is not None and query.dtype in (torch.float16, torch.bfloat16):
        return flash(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                     softmax_scale=scaling, causal=True)
    out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling,
                                         enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2)


def _attend_with_past(context: ForwardContext, layer: int, query: torch.Tensor,
                      scaling: float) -> torch.Tensor:
    """T new tokens of sequences that already hold tokens: gather each path, causal with a
    bottom-right aligned mask (new token t sees the past and new tokens 0..t).

    query [B, Hq, T, D] -> [B, T, Hq, D] in query's dtype.
    """
    tree = context.cache
    num_tokens = query.shape[2]
    if context.path_masks is None:   # once per forward, not per layer: slots and masks
        context.path_masks = []
        for seq in context.seqs:
            slots = tree.path_slots(seq)                # [L], L = past + T
            total = slots.shape[0]
            q_pos = torch.arange(total - num_tokens, total, device=query.device)
            mask = torch.arange(total, device=query.device)[None, :] <= q_pos[:, None]
            context.path_masks.append((slots, mask))
    k_pool = tree.k[layer].view(-1, *tree.k[layer].shape[2:])   # [slots, Hkv, D]
    v_pool = tree.v[layer].view(-1, *tree.v[layer].shape[2:])
    outs = []
    for row, (slots, mask) in enumerate(context.path_masks):
        k = k_pool.index_select(0, slots).to(query.dtype).transpose(0, 1)[None]  # [1, Hkv, L, D]
        v = v_pool.index_select(0, slots).to(query.dtype).transpose(0, 1)[None]
        out = F.scaled_dot_product_attention(
            query[row:row + 1], k, v, attn_mask=mask, scale=scaling,
            enable_gqa=query.shape[1] != k.shape[1])
        outs.append(out.transpose(1, 2))
    return torch.cat(outs, dim=0)
