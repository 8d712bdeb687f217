"""Run unmodified ``transformers`` causal LMs over a :class:`~a2r_kernels.TreeKVCache`.

Llama-, Qwen2- and Qwen3-style models keep their own modules (embeddings, RoPE, q/k norms,
projections, MLPs); only two things are ours:

- :class:`TreeCache`, a ``transformers.Cache`` whose ``update`` scatters each layer's new K/V into
  the slots reserved in the tree cache for this forward, and
- the attention function registered under :data:`ATTN_IMPLEMENTATION` (``"a2r_tree"``) in
  ``transformers.AttentionInterface``.

A forward goes one of two ways, chosen per call by :class:`TreeDecoder`:

- *decode* (one new token per sequence, ``[B, 1]``): every layer writes the new K/V into its
  reserved slot, then runs :func:`a2r_kernels.tree_decode_attention` over the step's
  :class:`~a2r_kernels.TreeLayout` (built once per step, reused by every layer). Shared prefixes
  are stored once and, with the Triton/CUDA backends, read once per step.
- *extend* (``T > 1`` new tokens per sequence, e.g. the prompt): K/V go into the reserved slots and
  attention is causal. Sequences without past tokens use SDPA (or flash-attn's kernel on CUDA when
  it is installed) over the fresh K/V; sequences with a past gather their path from the pool.

No dense mask is ever built on our path: the mask function registered for ``"a2r_tree"`` is
transformers' own ``sdpa_mask``, which returns ``None`` for an unpadded prefill and for ``q_len == 1``.
Outside a :class:`TreeCache` forward (e.g. ``model.generate`` on a model whose
``attn_implementation`` is ``"a2r_tree"``) the attention function is transformers' SDPA one, so such
a model stays usable with the usual API.

Example::

    import a2r_kernels.hf as akhf
    dec = akhf.TreeDecoder(model, num_blocks=64)
    root, logits = dec.prefill(input_ids)               # [1, P] -> logits [1, V] (fp32)
    kids = dec.fork(root, 4)                            # 4 branches share the prompt's blocks
    logits = dec.step(kids, torch.tensor([5, 9, 2, 7])) # [4, V]: one batch, tree attention
"""

from __future__ import annotations

import functools
import inspect
from itertools import chain
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache

from .backend import resolve_backend
from .vocab import attention_geometry, check_token_ids
from .cache import TreeKVCache
from .layout import host_to_device

ATTN_IMPLEMENTATION = "a2r_tree"
# Name of the forward kwarg that carries the TreeCache down to the attention function
# (transformers forwards unknown kwargs from the model's forward to every attention call).
_STATE_KWARG = "a2r_tree_cache"

_registered = False


@functools.lru_cache(maxsize=None)
def _cache_kwarg(forward) -> str:
    """The keyword a model's ``forward`` takes its ``Cache`` under: ``"cache"`` where transformers
    has renamed it (5.24 does, and warns on the old name), else ``"past_key_values"`` (5.0)."""
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def register() -> str:
    """Register :data:`ATTN_IMPLEMENTATION` with transformers' attention and mask interfaces.

    Idempotent; called on import of this module. Returns the implementation name, to pass as
    ``from_pretrained(..., attn_implementation=...)`` or ``model.set_attn_implementation(...)``.
    """
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(ATTN_IMPLEMENTATION, tree_attention_forward)
        AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
        _registered = True
    return ATTN_IMPLEMENTATION


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


def _slot_view(pool: torch.Tensor) -> torch.Tensor:
    """A layer's pool ``[num_blocks, block_size, Hkv, D]`` (contiguous) viewed as ``[num_blocks *
    block_size, Hkv, 1, D]``, the layout of the model's decode K/V ``[B, Hkv, T=1, D]``: they are
    written into it as they come, and gathered slots ``[T, Hkv, 1, D]`` permute to SDPA's ``[1,
    Hkv, T, D]`` in one view op."""
    return pool.view(-1, pool.shape[2], 1, pool.shape[3])


class _TorchDecodePlan:
    """The ``"torch"`` backend's tree decode attention for one step, planned once for all layers.

    For sequence ``i`` of the step, ``out[i] = sum_t softmax_t(sm_scale * q_i . k_t) v_t`` over
    the tokens of its path (API.md section 2), as one ``scaled_dot_product_attention`` per layer
    over the step's whole tree:

    - ``slots`` int64 ``[T]``: the flat pool slot of every token of the nodes on the step's paths,
      each node once: a prompt shared by every branch is gathered once per layer;
    - ``mask`` ``[S, T]`` in the pool's dtype: 0 where row ``i``'s path holds token ``t``, ``-inf``
      elsewhere (the other branches' tokens). Every row has a key (its own reserved token);
    - ``positions`` int64 ``[S]``: each row's path length minus one, its new token's position.

    The ``S`` queries are the rows of one batch, ``[1, Hq, S, D]``, against the keys ``[1, Hkv,
    T, D]`` (GQA by SDPA's ``enable_gqa``): a handful of aten ops per layer, where attending row
    by row needs each shared token gathered once per row. The price is the masked scores, ``S * T``
    instead of each row's own path length: a compute choice of this backend, which grows with the
    siblings' tokens. The cache still stores every token once; the Triton and CUDA kernels read
    each row's path only.

    A plan made by :meth:`for_step` can :meth:`advance` to the next step of the same sequences:
    the common decode step costs two concatenations on the host, not a new plan.
    """

    _seqs: list[int] | None = None   # for_step's sequences, while the plan can advance

    def __init__(self, paths: list[list[int]], node_lengths: list[int],
                 node_block_tables: list[list[int]], block_size: int, dtype: torch.dtype,
                 device):
        # Host work in numpy, a few array ops whatever the tree: O(blocks + S * T) per plan.
        lengths = np.asarray(node_lengths, dtype=np.int64)                     # [M]
        num_blocks = -(-lengths // block_size)
        blocks = np.fromiter(chain.from_iterable(
            table[:count] for table, count in zip(node_block_tables, num_blocks.tolist())),
            dtype=np.int64, count=int(num_blocks.sum()))
        slots = (blocks[:, None] * block_size + np.arange(block_size)).reshape(-1)
        # Each node's token t sits at slot t of its run of blocks: drop its last block's tail.
        offset = np.arange(slots.shape[0]) - np.repeat(
            (np.cumsum(num_blocks) - num_blocks) * block_size, num_blocks * block_size)
        slots = slots[offset < np.repeat(lengths, num_blocks * block_size)]
        # reads[i, j]: row i's path holds node j; expanded to the nodes' tokens, in slot order.
        reads = np.zeros((len(paths), lengths.shape[0]), dtype=bool)
        reads[np.repeat(np.arange(len(paths)), [len(path) for path in paths]),
              np.fromiter(chain.from_iterable(paths), dtype=np.int64)] = True
        # Non-blocking copies (no stream sync on CUDA: the host may plan while a step runs).
        self.slots = host_to_device(torch.from_numpy(slots), device)
        mask = torch.zeros(len(paths), slots.shape[0], dtype=dtype).masked_fill_(
            torch.from_numpy(~np.repeat(reads, lengths, axis=1)), float("-inf"))
        self.mask = host_to_device(mask, device)
        self.positions = host_to_device(torch.from_numpy(reads @ lengths - 1), device)

    @classmethod
    def from_layout(cls, layout, dtype: torch.dtype) -> "_TorchDecodePlan":
        return cls(layout.paths, layout.node_lengths, layout.node_block_tables,
                   layout.block_size, dtype, layout.device)

    @classmethod
    def for_step(cls, cache: TreeKVCache, seqs: list[int], batch: int) -> "_TorchDecodePlan":
        """The plan of a decode step of ``seqs`` (their tokens reserved) in ``batch >= len(seqs)``
        rows, read from the cache's tree; a padding row (``>= len(seqs)``) reads row 0's path."""
        nodes, paths = cache._step_tree(seqs)
        num_seqs = len(paths)
        plan = cls(paths + [paths[0]] * (batch - num_seqs), [node.length for node in nodes],
                   [node.blocks for node in nodes], cache.block_size, cache.dtype, cache.device)
        plan._seqs = list(seqs)
        plan._leaves = [nodes[path[-1]] for path in paths]   # where each sequence grows
        plan._leaf_lengths = [leaf.length for leaf in plan._leaves]
        # [batch, num_seqs]: row b sees the next token of sequence b (a padding row: of row 0).
        rows = torch.arange(batch)
        own = torch.full((batch, num_seqs), float("-inf"), dtype=cache.dtype)
        own[rows, rows.masked_fill(rows >= num_seqs, 0)] = 0
        plan._own_token_mask = host_to_device(own, cache.device)
        return plan

    def advance(self, seqs: list[int], batch: int, new_slots: torch.Tensor) -> bool:
        """When ``seqs`` in ``batch`` rows are :meth:`for_step`'s, each grown by exactly one token
        since (reserved at ``new_slots`` int64 ``[len(seqs)]``), make this their next step's plan
        and return True: the new tokens' keys are appended (a softmax does not depend on the
        order of its keys). Else return False, changing nothing."""
        if self._seqs != seqs or self.mask.shape[0] != batch or any(
                leaf.length != length + 1 for leaf, length in zip(self._leaves,
                                                                  self._leaf_lengths)):
            return False
        self._leaf_lengths = [length + 1 for length in self._leaf_lengths]
        self.slots = torch.cat([self.slots, new_slots])
        self.mask = torch.cat([self.mask, self._own_token_mask], dim=1)
        self.positions = self.positions + 1
        return True

    def attend(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               sm_scale: float) -> torch.Tensor:
        """query ``[S, Hq, 1, D]`` (the model's, any float dtype); keys, values: a layer's pools
        viewed as ``[num_blocks * block_size, Hkv, 1, D]`` (:func:`_slot_view`) -> ``[S, 1, Hq,
        D]`` in query's dtype (softmax in the pool's dtype, as SDPA computes it)."""
        q = query.transpose(0, 2)   # [1, Hq, S, D]
        if q.dtype != keys.dtype:   # a pool narrower than the model (dtype=), or autocast
            q = q.to(keys.dtype)
        # Gather along the contiguous slot dim (several times faster than along a strided one).
        k = keys.index_select(0, self.slots).permute(2, 1, 0, 3)   # [1, Hkv, T, D]
        v = values.index_select(0, self.slots).permute(2, 1, 0, 3)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, scale=sm_scale,
                                             enable_gqa=q.shape[1] != k.shape[1])
        out = out.permute(2, 0, 1, 3)   # [S, 1, Hq, D]
        return out if out.dtype == query.dtype else out.to(query.dtype)


class TreeCache(Cache):
    """A ``transformers.Cache`` over a :class:`~a2r_kernels.TreeKVCache`, one forward at a time.

    Before each forward, :class:`TreeDecoder` calls :meth:`begin` with the sequences of the
    batch (row ``b`` of ``input_ids`` is ``seqs[b]``), the slots it reserved for their new
    tokens and, for a decode step, the step's :class:`~a2r_kernels.TreeLayout`. During the
    forward every layer's ``update`` writes K/V ``[B, Hkv, T, D]`` into those slots (slot
    ``b * T + t`` for token ``t`` of row ``b``, the order of ``TreeKVCache.reserve``).
    """

    def __init__(self, tree: TreeKVCache, backend: str = "auto"):
        super().__init__(layers=[])
        self.tree = tree
        self.backend = resolve_backend("tree_decode_attention", backend, tree.device)
        self._seqs: list[int] = []
        self._slots: torch.Tensor | None = None
        self._layout = None
        self._past_lengths: list[int] = []
        self._query_length = 0
        self._path_slots: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._torch_plan: _TorchDecodePlan | None = None
        self._static: _StaticDecode | None = None
        # Per layer, the pools as decode steps write them and the torch plan gathers (views, once).
        self._slot_views = [(_slot_view(k), _slot_view(v)) for k, v in zip(tree.k, tree.v)]

    def begin_static(self, static: "_StaticDecode", layout) -> None:
        """Begin a forward of a padded decode batch over ``static``'s buffers (its slots, its
        row map for the K/V writes, its attention: the wrapper planned for ``layout``, or the
        torch backend's plan)."""
        self.begin([], [], static.slots[:static.batch], 1)
        self._layout, self._static, self._torch_plan = layout, static, static.torch_plan

    # ---------------------------------------------------------------- per-forward state
    def begin(self, seqs: Sequence[int], past_lengths: Sequence[int], slots: torch.Tensor,
              query_length: int, layout=None) -> None:
        self._seqs = list(seqs)
        self._past_lengths = list(past_lengths)
        self._slots = slots
        self._query_length = query_length
        self._layout = layout
        self._path_slots = None   # extend with past: per-row slots and masks, built on layer 0
        # The torch backend's attention plan, once per step (not per layer).
        self._torch_plan = (_TorchDecodePlan.from_layout(layout, self.tree.dtype)
                            if layout is not None and self.backend == "torch" else None)

    def end(self) -> None:
        self._seqs, self._past_lengths, self._slots, self._layout = [], [], None, None
        self._path_slots = self._torch_plan = self._static = None

    # ---------------------------------------------------------------- transformers Cache API
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args, **kwargs):
        """Write this layer's new K/V ``[B, Hkv, T, D]`` into the reserved slots.

        Returns what the attention function reads: the fresh K/V for an extend without past,
        else the layer's pool views ``[num_blocks, block_size, Hkv, D]``.
        """
        if self._slots is None:
            raise RuntimeError("TreeCache.update called outside a TreeDecoder forward")
        batch, num_kv_heads, num_tokens, head_dim = key_states.shape
        if batch * num_tokens != self._slots.shape[0]:
            raise ValueError(f"key_states [B={batch}, Hkv, T={num_tokens}, D] does not match "
                             f"the {self._slots.shape[0]} reserved slots")
        dtype = self.tree.dtype
        k, v = key_states, value_states
        if num_tokens > 1:
            k = k.transpose(1, 2).reshape(batch * num_tokens, num_kv_heads, head_dim)
            v = v.transpose(1, 2).reshape(batch * num_tokens, num_kv_heads, head_dim)
        if self._static is not None and self._static.padded:
            # Padding rows write row 0's K/V into row 0's slot.
            rows = self._static.row_source[:batch]
            k, v = k.index_select(0, rows), v.index_select(0, rows)
        if k.dtype != dtype:
            k, v = k.to(dtype), v.to(dtype)
        # The slots come from this forward's reserve and the shapes were checked above: an
        # unchecked scatter (write's range check would cost two reductions per layer). A decode
        # step's [B, Hkv, 1, D] goes into the _slot_views as it is.
        if num_tokens == 1:
            k_slots, v_slots = self._slot_views[layer_idx]
            k_slots.index_copy_(0, self._slots, k)
            v_slots.index_copy_(0, self._slots, v)
        else:
            self.tree._scatter(layer_idx, self._slots, k, v)
        if self._torch_plan is not None:
            return self._slot_views[layer_idx]
        if self._layout is None and not any(self._past_lengths):
            return key_states, value_states
        return self.tree.k[layer_idx], self.tree.v[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return max(self._past_lengths, default=0)

    def get_mask_sizes(self, query_length, layer_idx: int = 0) -> tuple[int, int]:
        # transformers 5.0 passes cache_position (a [T] tensor) here, later releases the length T.
        if isinstance(query_length, torch.Tensor):
            query_length = query_length.shape[0]
        return self.get_seq_length() + query_length, 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    # ---------------------------------------------------------------- attention
    def attend(self, module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               scaling: float) -> torch.Tensor:
        """Attention of this forward's queries ``[B, Hq, T, D]`` -> ``[B, T, Hq, D]``."""
        layer = module.layer_idx
        if self._torch_plan is not None:   # decode on the torch backend: the step's plan
            return self._torch_plan.attend(query, key, value, scaling)   # the _slot_views
        if self._static is not None:     # padded decode batch: the step's wrapper plan
            return self._static.attend(layer, query[:, :, 0, :].to(key.dtype), key, value,
                                       scaling).to(query.dtype).unsqueeze(1)
        if self._layout is not None:     # decode: one token per sequence, tree attention
            from .attention import tree_decode_attention

            # The kernel reads q in the pool's dtype: a pool narrower than the model (dtype=) or
            # an autocast forward would otherwise fail its dtype check. No-op when they agree.
            out = tree_decode_attention(query[:, :, 0, :].to(key.dtype), key, value,
                                        self._layout, sm_scale=scaling, backend=self.backend)
            return out.to(query.dtype).unsqueeze(1)
        if not any(self._past_lengths):  # extend from empty: causal over the fresh K/V
            return _causal_attention(query, key, value, scaling)
        return self._attend_with_past(layer, query, scaling)

    def _attend_with_past(self, layer: int, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """T new tokens of sequences that already hold tokens: gather each path, causal with
        a bottom-right aligned mask (new token t sees the past and new tokens 0..t)."""
        num_tokens = query.shape[2]
        if self._path_slots is None:   # once per forward, not per layer: slots and masks
            self._path_slots = []
            for seq in self._seqs:
                slots = self.tree.path_slots(seq)                # [L], L = past + T
                total = slots.shape[0]
                q_pos = torch.arange(total - num_tokens, total, device=query.device)
                mask = torch.arange(total, device=query.device)[None, :] <= q_pos[:, None]
                self._path_slots.append((slots, mask))
        k_pool = self.tree.k[layer].view(-1, *self.tree.k[layer].shape[2:])   # [slots, Hkv, D]
        v_pool = self.tree.v[layer].view(-1, *self.tree.v[layer].shape[2:])
        outs = []
        for row, (slots, mask) in enumerate(self._path_slots):
            k = k_pool.index_select(0, slots).to(query.dtype).transpose(0, 1)[None]  # [1, Hkv, L, D]
            v = v_pool.index_select(0, slots).to(query.dtype).transpose(0, 1)[None]
            out = F.scaled_dot_product_attention(
                query[row:row + 1], k, v, attn_mask=mask, scale=scaling,
                enable_gqa=query.shape[1] != k.shape[1])
            outs.append(out.transpose(1, 2))
        return torch.cat(outs, dim=0)


def tree_attention_forward(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, scaling: float | None = None,
                           dropout: float = 0.0, **kwargs):
    """The ``"a2r_tree"`` attention function (``transformers.AttentionInterface`` signature).

    query ``[B, Hq, T, D]``; key/value as returned by the cache's ``update``. Returns
    ``(out [B, T, Hq, D], None)``. With a :class:`TreeCache` in ``kwargs`` it runs our path (see the
    module docstring); without one it is transformers' SDPA attention, unchanged.
    """
    tree_cache = kwargs.pop(_STATE_KWARG, None)
    if tree_cache is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    if kwargs.get("sliding_window") is not None:
        raise ValueError("a2r_tree attention does not support sliding-window layers "
                         f"(layer {module.layer_idx} has sliding_window={kwargs['sliding_window']})")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    return tree_cache.attend(module, query, key, value, scaling), None


def _text_config(model):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _check_step_tokens(token_ids, num_seqs: int) -> None:
    """A decode step's ``token_ids``: int ``[num_seqs]`` or ``[num_seqs, 1]``, else ValueError."""
    if not isinstance(token_ids, torch.Tensor) or token_ids.numel() != num_seqs or (
            token_ids.dim() not in (1, 2)):
        got = tuple(token_ids.shape) if isinstance(token_ids, torch.Tensor) else type(token_ids).__name__
        raise ValueError(f"token_ids must be [B={num_seqs}] or [B, 1], got {got}")
    if token_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"token_ids must be int64, got {token_ids.dtype}")


# Decode batch buckets: powers of two up to this, then its multiples (nano-vllm's capture sizes):
# a shrinking batch uses a handful of graphs, and a batch just past a power of two pads fewer rows.
_BUCKET_STEP = 16


def _batch_bucket(batch: int) -> int:
    """The padded size of a decode batch of ``batch >= 1`` rows: the next power of two up to
    ``_BUCKET_STEP`` (1, 2, 4, 8, 16), then the next multiple of it (32, 48, 64, ...)."""
    if batch <= _BUCKET_STEP:
        return 1 << (batch - 1).bit_length()
    return -(-batch // _BUCKET_STEP) * _BUCKET_STEP


class _StaticDecode:
    """:meth:`TreeDecoder.step` over fixed buffers, padded to a batch bucket (as in gpt-fast and
    nano-vllm's ``capture_cudagraph``), with CUDA graphs when ``use_graphs``.

    A step of ``n`` sequences runs ``B = _batch_bucket(n)`` rows. Buffers, on the decoder's
    device, of ``capacity`` rows (a bucket; a larger batch regrows them and drops the graphs):

    - ``input_ids``, ``positions`` int64 ``[capacity, 1]``: rows ``>= n`` keep stale values;
    - ``slots`` int64 ``[capacity]`` and ``row_source`` int64 ``[capacity]``: row ``b < n`` writes
      its own K/V into its reserved slot; a padding row writes row 0's K/V into row 0's slot
      (identical bytes, so the duplicate write is deterministic and no other slot changes);
    - ``attn_out`` ``[num_layers, capacity, Hq, D]`` in the pool's dtype: each layer's attention.

    Attention: one :class:`~a2r_kernels.TreeAttentionWrapper` planned once per step (outside the
    graph) and run by every layer; its padding rows come out 0. The ``"torch"`` backend (never
    captured) runs the step's :class:`_TorchDecodePlan` instead, planned from the cache's tree
    without a :class:`~a2r_kernels.TreeLayout` (whose kernel plan it does not read), a padding row
    attending over row 0's path; the wrapper's torch backend is the node-by-node reference with
    several times the ops.

    With graphs, the first step of a bucket runs eagerly (compiling the kernels), then the
    bucket's whole forward, all layers, is captured into a ``torch.cuda.CUDAGraph`` (one memory
    pool for all buckets) and replayed for every later step of that bucket.
    """

    def __init__(self, decoder: "TreeDecoder", use_graphs: bool):
        self.decoder = decoder
        self.use_graphs = use_graphs
        self.capacity = 0
        self.wrapper = None
        self.torch_plan: _TorchDecodePlan | None = None
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None
        self.num_live = self.batch = 0
        self.padded = False
        self.layout = None   # of the step prepare() planned

    def _drop_graphs(self) -> None:
        # Captured graphs read the buffers they were captured with: new buffers, new graphs.
        self.graphs.clear()
        self.pool = None

    def _grow(self, batch: int) -> None:
        cache, device = self.decoder.cache, self.decoder.device
        capacity = _batch_bucket(batch)
        self.input_ids = torch.zeros(capacity, 1, dtype=torch.int64, device=device)
        self.positions = torch.zeros(capacity, 1, dtype=torch.int64, device=device)
        self.slots = torch.zeros(capacity, dtype=torch.int64, device=device)
        self.row_source = torch.zeros(capacity, dtype=torch.int64, device=device)
        self._rows = torch.arange(capacity, dtype=torch.int64, device=device)
        self.attn_out = torch.empty(cache.num_layers, capacity, self.decoder.num_q_heads,
                                    cache.head_dim, dtype=cache.dtype, device=device)
        self.capacity, self.wrapper = capacity, None
        self._drop_graphs()

    def _plan(self, seqs: list[int], slots: torch.Tensor):
        """Plan the step's attention; returns its layout (None for the torch backend) and the
        rows' positions, int64 ``[n]`` or more on the device."""
        dec = self.decoder
        if dec.backend == "torch":
            rows = self.batch if self.padded else len(seqs)
            if self.torch_plan is None or not self.torch_plan.advance(seqs, rows, slots):
                self.torch_plan = _TorchDecodePlan.for_step(dec.cache, seqs, rows)
            return None, self.torch_plan.positions
        layout = dec.cache.layout(seqs)
        # seq_lens counts the reserved token: position = seq_lens - 1, on the device.
        positions = layout.seq_lens - 1
        from .wrapper import TreeAttentionWrapper, default_capacities

        w = self.wrapper
        if w is None or not (layout.num_nodes <= w.max_nodes
                             and layout.num_page_entries <= w.max_blocks
                             and layout.num_work <= w.max_work
                             and layout.num_partials <= w.max_partials):
            # Twice what this layout needs (and at least the old capacities), so a tree that
            # keeps growing regrows (and recaptures) a logarithmic number of times.
            old = (w.max_nodes, w.max_blocks, w.max_work, w.max_partials) if w else (0, 0, 0, 0)
            nodes = max(2 * layout.num_nodes, old[0])
            blocks = max(2 * layout.num_page_entries, old[1])
            work, partials = default_capacities(self.capacity, nodes, blocks,
                                                dec.cache.block_size)
            self.wrapper = TreeAttentionWrapper(
                dec.num_q_heads, dec.cache.num_kv_heads, dec.cache.head_dim,
                dec.cache.block_size, max_seqs=self.capacity, max_nodes=nodes,
                max_blocks=blocks, dtype=dec.cache.dtype, device=dec.device,
                backend=dec.backend, max_work=max(work, 2 * layout.num_work, old[2]),
                max_partials=max(partials, 2 * layout.num_partials, old[3]))
            self._drop_graphs()
        self.wrapper.plan(layout)
        return layout, positions

    def attend(self, layer: int, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
               scaling: float) -> torch.Tensor:
        """The wrapper's attention: q ``[B, Hq, D]`` in the pool's dtype -> ``[B, Hq, D]``
        (padding rows 0)."""
        out = self.attn_out[layer, :q.shape[0]]
        return self.wrapper.run(q, k_pool, v_pool, out=out, sm_scale=scaling)

    def _forward(self, layout) -> torch.Tensor:
        dec = self.decoder
        dec.hf_cache.begin_static(self, layout)
        try:
            return dec._model_logits(self.input_ids[:self.batch], self.positions[:self.batch])
        finally:
            dec.hf_cache.end()

    def prepare(self, slots: torch.Tensor, seqs: list[int]) -> None:
        """Plan the decode step of the ``n`` sequences ``seqs``, whose tokens are reserved
        (``slots`` int64 ``[n]``): the attention plan and every static buffer but the input ids.
        Host work and copies in stream order only, so it may run while the last step is still on
        the GPU; :meth:`launch` runs the step."""
        n = len(seqs)
        if n > self.capacity:
            self._grow(n)
        batch = _batch_bucket(n)
        self.num_live, self.batch = n, batch
        # Eager steps of a full bucket skip the padding ops; a graph serves every n of its bucket.
        self.padded = self.use_graphs or batch > n
        self.layout, positions = self._plan(seqs, slots)
        self.positions[:n, 0].copy_(positions[:n])
        self.slots[:n].copy_(slots)
        if self.padded:
            self.slots[n:batch].copy_(slots[:1].expand(batch - n))
            self.row_source[:n].copy_(self._rows[:n])
            self.row_source[n:batch].zero_()

    def launch(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Run the step :meth:`prepare` planned on ``token_ids`` ``[n]`` (on the device). Returns
        fp32 logits ``[n, V]`` (a fresh tensor)."""
        n, batch, layout = self.num_live, self.batch, self.layout
        self.input_ids[:n].copy_(token_ids.reshape(n, 1), non_blocking=True)
        if not self.use_graphs:
            return self._forward(layout)[:n, -1, :].float()
        if batch not in self.graphs:
            self._forward(layout)   # warm-up: compiles the kernels outside the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                logits = self._forward(layout)
            self.pool = graph.pool()
            self.graphs[batch] = (graph, logits)
        graph, logits = self.graphs[batch]
        graph.replay()
        # A copy: the graphs' pool reuses the output's memory.
        return logits[:n, -1, :].to(torch.float32, copy=True)


class TreeDecoder:
    """Drive one transformers causal LM over a tree-shared paged KV cache.

    The lower-level API under :func:`a2r.sample_parallel`: prefill a prompt once, fork it into
    branches (zero copy), decode all live branches as one batch per step, fork branches again for
    multi-level exploration, free finished ones.

    Args:
        model: a transformers causal LM whose layers call ``past_key_values.update`` and the
            ``AttentionInterface`` (Llama, Qwen2, Qwen3, Mistral, ... without sliding windows).
        num_blocks: blocks in the KV pool: a prompt of P tokens and branches of S_i stored tokens
            need ``ceil(P / block_size) + sum_i ceil(S_i / block_size)`` (forks copy nothing).
        block_size: tokens per block.
        backend: ``tree_decode_attention`` backend (``"auto" | "cuda" | "triton" | "torch"``).
        dtype: pool dtype, default the model's dtype.
        cuda_graphs: capture :meth:`step`'s forward in CUDA graphs, one per batch bucket
            (``None``: on CUDA unless ``backend`` is ``"torch"``). ``False`` runs the same
            padded static-buffer step eagerly; ``True`` off CUDA or with the torch backend is a
            ValueError.

    :meth:`step` pads the batch to a bucket (a power of two up to 16, then a multiple of 16) and
    runs it through fixed buffers
    (:class:`_StaticDecode`); :meth:`extend` with ``T == 1`` is the same step unpadded.

    Attributes:
        cache: the :class:`~a2r_kernels.TreeKVCache` (``cache.blocks_used()``, ``cache.length``).
        peak_blocks_used: most blocks in use at once since construction.
        bytes_per_block: K+V bytes of one block over all layers.
        forwarded_tokens: tokens run through the model since construction (prompts and steps).
        reused_tokens: prompt tokens whose KV :meth:`prefill` took from the cache instead.

    Automatic prefix reuse: :meth:`prefill` of a new root keys the prompt's full blocks in the
    cache, and a later prompt that starts with the same whole blocks (of a live or a freed,
    not yet evicted sequence) reuses them and forwards only the rest, at least its last token.
    Prompts appended by :meth:`extend` are keyed too; decode tokens are not.
    """

    def __init__(self, model, num_blocks: int, *, block_size: int = 16, backend: str = "auto",
                 dtype: torch.dtype | None = None, cuda_graphs: bool | None = None):
        register()
        config = _text_config(model)
        if getattr(config, "is_encoder_decoder", False):
            raise ValueError("model must be a decoder-only causal LM, got an encoder-decoder")
        layer_types = getattr(config, "layer_types", None) or []
        if any(t != "full_attention" for t in layer_types):
            raise ValueError("model's layer_types must all be 'full_attention', got "
                             f"{sorted(set(layer_types))}")
        num_heads, num_kv_heads, head_dim = attention_geometry(config)
        param = next(model.parameters())
        self.model = model
        self.vocab_size = model.get_input_embeddings().num_embeddings   # token ids: [0, V)
        self.device = param.device
        self.cache = TreeKVCache(config.num_hidden_layers, num_kv_heads, head_dim, num_blocks,
                                 block_size=block_size, dtype=dtype or param.dtype,
                                 device=self.device)
        self.hf_cache = TreeCache(self.cache, backend)
        self.backend = self.hf_cache.backend
        self.num_q_heads = num_heads
        on_cuda = self.device.type == "cuda"
        if cuda_graphs is None:
            cuda_graphs = on_cuda and self.backend != "torch"
        elif not isinstance(cuda_graphs, bool):
            raise ValueError(f"cuda_graphs must be None, True or False, got {cuda_graphs!r}")
        elif cuda_graphs and not on_cuda:
            raise ValueError(f"cuda_graphs=True needs the model on a CUDA device, got "
                             f"{self.device}; pass cuda_graphs=False")
        elif cuda_graphs and self.backend == "torch":
            raise ValueError("cuda_graphs=True cannot capture backend='torch' (it allocates per "
                             "step); pass backend='triton' or 'cuda', or cuda_graphs=False")
        self.cuda_graphs = cuda_graphs
        self._static = _StaticDecode(self, cuda_graphs)
        self._planned: tuple[list[int], torch.Tensor] | None = None   # (seqs, slots) of plan_step
        self.bytes_per_block = self.cache.nbytes // num_blocks
        self.peak_blocks_used = 0
        self.forwarded_tokens = 0
        self.reused_tokens = 0

    # ------------------------------------------------------------------ tree bookkeeping
    def new_sequence(self) -> int:
        """An empty sequence (a new root)."""
        return self.cache.new_sequence()

    def fork(self, seq: int, n: int) -> list[int]:
        """``n`` children of ``seq`` sharing all its tokens (no copy); ``seq`` becomes read-only."""
        self._check_not_planned([seq])
        return self.cache.fork(seq, n)

    def free(self, seq: int) -> None:
        """Release ``seq``; its blocks return to the pool when no descendant uses them."""
        self._check_not_planned([seq])
        self.cache.free(seq)

    def _check_not_planned(self, seqs) -> None:
        # A planned sequence holds a reserved slot that run_step will write.
        if self._planned is not None and not set(self._planned[0]).isdisjoint(seqs):
            raise ValueError("a sequence of the planned decode step cannot be forked, freed or "
                             "extended: run_step, drop_from_step or cancel_step first")

    def length(self, seq: int) -> int:
        return self.cache.length(seq)

    @property
    def peak_kv_bytes(self) -> int:
        """Most K+V bytes held at once (``peak_blocks_used * bytes_per_block``)."""
        return self.peak_blocks_used * self.bytes_per_block

    # ------------------------------------------------------------------ forwards
    def prefill(self, input_ids: torch.Tensor, seq: int | None = None) -> tuple[int, torch.Tensor]:
        """Run the prompt ``input_ids`` (``[P]`` or ``[1, P]``, P >= 1) into ``seq`` (default a
        new root). Returns ``(seq, logits)``, logits fp32 ``[1, V]`` for the next token.

        A new root reuses the cached whole blocks its first ``P - 1`` tokens start with (see the
        class docstring) and forwards only the other tokens, appended causally after them; the
        logits equal a full prefill's. ``length(seq)`` is P either way.
        """
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() not in (1, 2) or (
                input_ids.dim() == 2 and input_ids.shape[0] != 1) or input_ids.shape[-1] == 0:
            got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be [P] or [1, P] with P >= 1, got {got}")
        input_ids = input_ids.reshape(1, -1)
        prompt = input_ids[0].tolist()   # the one host read of the prompt (a sync on CUDA)
        check_token_ids(prompt, self.vocab_size, "input_ids")
        if seq is not None:
            return seq, self.extend([seq], input_ids)
        # The last token is always forwarded: its logits are the result.
        seq = self.cache.new_sequence(prefix=prompt[:-1])
        reused = self.cache.length(seq)
        try:
            self._check_extend([seq], input_ids[:, reused:])
            logits = self._extend([seq], input_ids[:, reused:], [prompt[reused:]])
        except BaseException:
            self.cache.free(seq)   # the reused blocks go back to the cache
            raise
        self.reused_tokens += reused
        return seq, logits

    def step(self, seqs: Sequence[int], token_ids: torch.Tensor) -> torch.Tensor:
        """Append one token per sequence (``token_ids`` ``[B]`` or ``[B, 1]``) as one decode batch.
        Returns fp32 logits ``[B, V]`` for each sequence's next token."""
        _check_step_tokens(token_ids, len(seqs))
        check_token_ids(token_ids, self.vocab_size, "token_ids", sync=False)
        self.plan_step(seqs)
        return self._run_planned(token_ids)

    # A decode step in two halves, so that the host plans step t + 1 while step t runs on the
    # GPU: plan_step (slots and attention plan, host work) and run_step (the forward).
    @torch.inference_mode()
    def plan_step(self, seqs: Sequence[int]) -> None:
        """Reserve the next token's slot of each of ``seqs`` and plan that decode step, without a
        host sync: on CUDA this can run while the previous step is still on the GPU.
        :meth:`run_step` runs it; until then only :meth:`drop_from_step` (or :meth:`cancel_step`)
        may touch these sequences. Raises CacheFullError / ValueError and changes nothing."""
        seqs = list(seqs)
        if len(seqs) == 0:
            raise ValueError("seqs must name at least one sequence")
        if self._planned is not None:
            raise ValueError(f"a step of {len(self._planned[0])} sequences is already planned: "
                             "run_step or cancel_step first")
        slots = self.cache.reserve(seqs, 1)   # raises CacheFullError, changes nothing
        self._prepare(seqs, slots)
        self.peak_blocks_used = max(self.peak_blocks_used, self.cache.blocks_used())

    def _prepare(self, seqs: list[int], slots: torch.Tensor) -> None:
        try:
            self._static.prepare(slots, seqs)
        except BaseException:   # as in extend: the sequences keep no unwritten token
            self.cache._unreserve(seqs, 1)
            raise
        self._planned = (seqs, slots)

    @torch.inference_mode()
    def drop_from_step(self, seqs: Sequence[int]) -> None:
        """Take ``seqs`` (e.g. branches that just finished) out of the planned step: their slots
        go back to the pool (block accounting as if never reserved) and the step is re-planned
        for the others (none left: nothing planned)."""
        planned, slots = self._planned if self._planned is not None else ([], None)
        drop = set(seqs)
        if not drop <= set(planned):
            raise ValueError(f"seqs {sorted(drop - set(planned))} are not in the planned step")
        keep = [row for row, seq in enumerate(planned) if seq not in drop]
        self.cache._unreserve([seq for seq in planned if seq in drop], 1)
        self._planned = None
        if keep:
            rows = host_to_device(torch.tensor(keep, dtype=torch.int64), self.device)
            self._prepare([planned[row] for row in keep], slots.index_select(0, rows))

    @property
    def planned_step(self) -> list[int] | None:
        """The sequences of the step :meth:`plan_step` planned and no run has taken yet, or
        None."""
        return None if self._planned is None else list(self._planned[0])

    def cancel_step(self) -> None:
        """Give back the planned step's slots, if a step is planned (e.g. on an error)."""
        if self._planned is not None:
            self.cache._unreserve(self._planned[0], 1)
            self._planned = None

    @torch.inference_mode()
    def run_step(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Run the step :meth:`plan_step` planned: one token per planned sequence (``token_ids``
        ``[B]`` or ``[B, 1]``, in their order, on the device). Returns fp32 logits ``[B, V]``."""
        if self._planned is None:
            raise ValueError("no decode step is planned: call plan_step(seqs) first")
        _check_step_tokens(token_ids, len(self._planned[0]))
        check_token_ids(token_ids, self.vocab_size, "token_ids", sync=False)
        return self._run_planned(token_ids)

    @torch.inference_mode()
    def _run_planned(self, token_ids: torch.Tensor) -> torch.Tensor:
        seqs = self._planned[0]
        self._planned = None
        try:
            logits = self._static.launch(token_ids)
        except BaseException:   # as in extend: the sequences keep no unwritten token
            self.cache._unreserve(seqs, 1)
            raise
        self.forwarded_tokens += len(seqs)
        return logits

    def _model_logits(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """The model's forward over :attr:`hf_cache` (already begun): logits ``[B, 1, V]``."""
        config = self.model.config
        saved_impl = config._attn_implementation
        switch = saved_impl != ATTN_IMPLEMENTATION   # a config write costs ~20 us per step
        try:
            if switch:
                config._attn_implementation = ATTN_IMPLEMENTATION
            out = self.model(input_ids=input_ids, position_ids=position_ids, use_cache=True,
                             logits_to_keep=1,
                             **{_cache_kwarg(type(self.model).forward): self.hf_cache,
                                _STATE_KWARG: self.hf_cache})
        finally:
            if switch:
                config._attn_implementation = saved_impl
        return out.logits

    def extend(self, seqs: Sequence[int], token_ids: torch.Tensor) -> torch.Tensor:
        """Append ``T`` tokens to each of ``seqs`` (``token_ids`` int ``[B, T]``, row b -> seqs[b]).

        ``T == 1`` is a decode step (tree attention over one layout); ``T > 1`` is causal
        attention (fresh K/V for empty sequences, gathered paths otherwise). Positions continue
        each sequence: ``position_ids[b, t] = length(seqs[b]) + t``.

        Returns:
            fp32 ``[B, V]``: logits of the token after each sequence's last new token.
        """
        seqs = list(seqs)
        self._check_extend(seqs, token_ids)
        check_token_ids(token_ids, self.vocab_size, "token_ids")
        return self._extend(seqs, token_ids, token_ids)

    def _check_extend(self, seqs: list[int], token_ids) -> None:
        if token_ids.dim() != 2 or token_ids.shape[0] != len(seqs) or token_ids.shape[1] == 0:
            raise ValueError(f"token_ids must be [B={len(seqs)}, T>=1], got {tuple(token_ids.shape)}")
        if token_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"token_ids must be int64, got {token_ids.dtype}")
        self._check_not_planned(seqs)

    @torch.inference_mode()
    def _extend(self, seqs: list[int], token_ids: torch.Tensor, token_rows) -> torch.Tensor:
        """:meth:`extend` of checked arguments; ``token_rows``: the same ids as ``token_ids`` or
        as host lists ``[B][T]`` (what the reserve keys prompt blocks by)."""
        num_tokens = token_ids.shape[1]
        past = [self.cache.length(s) for s in seqs]
        # Prompt tokens are keyed for prefix reuse (read on the host, once per prompt); decode
        # tokens are not (that would be a host sync per step).
        slots = self.cache.reserve(seqs, num_tokens,    # raises CacheFullError, changes nothing
                                   token_ids=token_rows if num_tokens > 1 else None)
        self.peak_blocks_used = max(self.peak_blocks_used, self.cache.blocks_used())
        try:
            if num_tokens == 1:   # decode: the plan of the step, built once for every layer
                layout = self.cache.layout(seqs)
                # seq_lens counts the reserved token: position = seq_lens - 1, on the device.
                position_ids = (layout.seq_lens - 1).to(torch.int64).unsqueeze(1)
            else:
                layout = None
                position_ids = (torch.tensor(past, dtype=torch.int64)[:, None]
                                + torch.arange(num_tokens, dtype=torch.int64)[None, :]
                                ).to(self.device)
            self.hf_cache.begin(seqs, past, slots, num_tokens, layout)
            logits = self._model_logits(token_ids.to(self.device, torch.int64), position_ids)
        except BaseException:
            # Anything failed after the reserve (e.g. out of memory in the forward): give the
            # tokens back, so the sequences hold no token whose K/V was never (fully) written
            # and a retry continues at the right positions.
            self.cache._unreserve(seqs, num_tokens)
            raise
        finally:
            self.hf_cache.end()
        self.forwarded_tokens += len(seqs) * num_tokens
        return logits[:, -1, :].float()


register()
