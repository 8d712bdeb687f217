"""TreeDecoder: one transformers causal LM over a tree-shared paged KV cache.

Composition, each part knowing only what it is given (no part points back at another):

- the storage, a :class:`~a2r_kernels.TreeKVCache` (``decoder.cache``);
- :class:`~a2r_kernels.hf.attention.HFTreeCacheAdapter`, the ``transformers.Cache`` that writes
  each layer's K/V into it by the forward's :class:`~a2r_kernels.hf.attention.ForwardContext`;
- :class:`DecodeAttention`, the decode steps' :class:`~a2r_kernels.TreeAttentionWrapper`
  (every backend: ``wrapper.plan(layout)`` once per step, ``wrapper.run`` per layer), regrown as
  the tree grows;
- :class:`~a2r_kernels.hf.graphs.DecodeGraphRunner` (``decoder.runner``), given a forward
  callable over the model, the adapter and the decode attention: it pads steps to batch buckets
  and replays them as CUDA graphs.
"""

from __future__ import annotations

import functools
import inspect
from typing import Sequence

import torch

from ..backend import resolve_backend
from ..cache import TreeKVCache
from ..layout import TreeLayout, host_to_device
from ..vocab import DEFAULT_BLOCK_SIZE, attention_geometry, check_token_ids, text_config
from ..wrapper import TreeAttentionWrapper, default_capacities
from .attention import (ATTN_IMPLEMENTATION, CONTEXT_KWARG, ForwardContext, HFTreeCacheAdapter,
                        register)
from .graphs import DecodeGraphRunner, StaticBatch


@functools.lru_cache(maxsize=None)
def cache_kwarg(forward) -> str:
    """The keyword a model's ``forward`` takes its ``Cache`` under: ``"cache"`` where transformers
    has renamed it (5.24 does, and warns on the old name), else ``"past_key_values"`` (5.0)."""
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def model_logits(model, adapter: HFTreeCacheAdapter, context: ForwardContext,
                 input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """``model``'s forward of ``input_ids`` ``[B, T]`` at ``position_ids`` ``[B, T]`` over
    ``adapter``, attending by ``context``: logits ``[B, 1, V]`` of each row's last token."""
    config = model.config
    saved_impl = config._attn_implementation
    switch = saved_impl != ATTN_IMPLEMENTATION   # a config write costs ~20 us per step
    adapter.begin(context)
    try:
        if switch:
            config._attn_implementation = ATTN_IMPLEMENTATION
        out = model(input_ids=input_ids, position_ids=position_ids, use_cache=True,
                    logits_to_keep=1,
                    **{cache_kwarg(type(model).forward): adapter, CONTEXT_KWARG: context})
    finally:
        if switch:
            config._attn_implementation = saved_impl
        adapter.end()
    return out.logits


class DecodeAttention:
    """The decode steps' attention: one :class:`~a2r_kernels.TreeAttentionWrapper`, planned
    once per step, sized to the steps' layouts and regrown (twice what a layout needs, so a tree
    that keeps growing regrows a logarithmic number of times).

    ``attn_out`` ``[num_layers, max_seqs, Hq, D]`` in the pool's dtype holds each layer's
    attention for the kernel backends (fixed buffers a CUDA graph captures); the ``"torch"``
    backend, never captured, returns SDPA's output as it is (``attn_out`` None).
    """

    def __init__(self, cache: TreeKVCache, num_q_heads: int, backend: str):
        self.cache = cache
        self.num_q_heads = num_q_heads
        self.backend = backend
        self.wrapper: TreeAttentionWrapper | None = None
        self.attn_out: torch.Tensor | None = None

    def plan(self, layout: TreeLayout, max_seqs: int) -> bool:
        """Plan the step of ``layout`` for batches of up to ``max_seqs`` rows; returns True when
        that took a new wrapper (what a captured graph read is gone)."""
        w, cache = self.wrapper, self.cache
        fits = w is not None and (w.max_seqs == max_seqs and layout.num_nodes <= w.max_nodes
                                  and layout.num_page_entries <= w.max_blocks
                                  and layout.num_work <= w.max_work
                                  and layout.num_partials <= w.max_partials)
        if not fits:
            old = (w.max_nodes, w.max_blocks, w.max_work, w.max_partials) if w else (0, 0, 0, 0)
            nodes = max(2 * layout.num_nodes, old[0])
            blocks = max(2 * layout.num_page_entries, old[1])
            work, partials = default_capacities(max_seqs, nodes, blocks, cache.block_size)
            self.wrapper = TreeAttentionWrapper(
                self.num_q_heads, cache.num_kv_heads, cache.head_dim, cache.block_size,
                max_seqs=max_seqs, max_nodes=nodes, max_blocks=blocks, dtype=cache.dtype,
                device=cache.device, backend=self.backend,
                max_work=max(work, 2 * layout.num_work, old[2]),
                max_partials=max(partials, 2 * layout.num_partials, old[3]))
            if self.backend != "torch" and (self.attn_out is None
                                            or self.attn_out.shape[1] != max_seqs):
                self.attn_out = torch.empty(cache.num_layers, max_seqs, self.num_q_heads,
                                            cache.head_dim, dtype=cache.dtype,
                                            device=cache.device)
        self.wrapper.plan(layout)
        return not fits


def _decode_forward(model, adapter: HFTreeCacheAdapter, attention: DecodeAttention,
                    batch: StaticBatch) -> torch.Tensor:
    """The runner's forward: the planned decode step over the batch's buffers."""
    context = ForwardContext(adapter.tree, batch.slots, wrapper=attention.wrapper,
                             attn_out=attention.attn_out, row_source=batch.row_source)
    return model_logits(model, adapter, context, batch.input_ids, batch.positions)


def _check_step_tokens(token_ids, num_seqs: int) -> None:
    """A decode step's ``token_ids``: int ``[num_seqs]`` or ``[num_seqs, 1]``, else ValueError."""
    if not isinstance(token_ids, torch.Tensor) or token_ids.numel() != num_seqs or (
            token_ids.dim() not in (1, 2)):
        got = (tuple(token_ids.shape) if isinstance(token_ids, torch.Tensor)
               else type(token_ids).__name__)
        raise ValueError(f"token_ids must be [B={num_seqs}] or [B, 1], got {got}")
    if token_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"token_ids must be int64, got {token_ids.dtype}")


def _check_model(config) -> None:
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError("model must be a decoder-only causal LM, got an encoder-decoder")
    layer_types = getattr(config, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        raise ValueError("model's layer_types must all be 'full_attention', got "
                         f"{sorted(set(layer_types))}")


def _use_graphs(cuda_graphs, device: torch.device, backend: str) -> bool:
    """The ``cuda_graphs`` argument checked and resolved (None: on CUDA unless torch)."""
    on_cuda = device.type == "cuda"
    if cuda_graphs is None:
        return on_cuda and backend != "torch"
    if not isinstance(cuda_graphs, bool):
        raise ValueError(f"cuda_graphs must be None, True or False, got {cuda_graphs!r}")
    if cuda_graphs and not on_cuda:
        raise ValueError(f"cuda_graphs=True needs the model on a CUDA device, got "
                         f"{device}; pass cuda_graphs=False")
    if cuda_graphs and backend == "torch":
        raise ValueError("cuda_graphs=True cannot capture backend='torch' (it allocates per "
                         "step); pass backend='triton' or 'cuda', or cuda_graphs=False")
    return cuda_graphs


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
        block_size: tokens per block (default ``vocab.DEFAULT_BLOCK_SIZE``, 16).
        backend: the decode attention's backend (``"auto" | "cuda" | "triton" | "torch"``).
        dtype: pool dtype, default the model's dtype.
        cuda_graphs: capture :meth:`step`'s forward in CUDA graphs, one per batch bucket
            (``None``: on CUDA unless ``backend`` is ``"torch"``). ``False`` runs the same
            padded static-buffer step eagerly; ``True`` off CUDA or with the torch backend is a
            ValueError.

    :meth:`step` (:meth:`plan_step` then :meth:`run_step`) pads the batch to a bucket (a power of
    two up to 16, then a multiple of 16) and runs it through fixed buffers (:attr:`runner`), its
    attention a :class:`~a2r_kernels.TreeAttentionWrapper` planned once per step on every
    backend. :meth:`extend` appends tokens with causal attention over each sequence's path.

    Attributes:
        cache: the :class:`~a2r_kernels.TreeKVCache` (``cache.blocks_used()``, ``cache.length``).
        runner: the :class:`~a2r_kernels.hf.graphs.DecodeGraphRunner` of the decode steps
            (``runner.capacity``, ``runner.graphs``).
        peak_blocks_used: most blocks in use at once since construction.
        bytes_per_block: K+V bytes of one block over all layers.
        forwarded_tokens: tokens run through the model since construction (prompts and steps).
        reused_tokens: prompt tokens whose KV :meth:`prefill` took from the cache instead.

    Automatic prefix reuse: :meth:`prefill` of a new root keys the prompt's full blocks in the
    cache, and a later prompt that starts with the same whole blocks (of a live or a freed,
    not yet evicted sequence) reuses them and forwards only the rest, at least its last token.
    Prompts appended by :meth:`extend` are keyed too; decode tokens are not.
    """

    def __init__(self, model, num_blocks: int, *, block_size: int = DEFAULT_BLOCK_SIZE,
                 backend: str = "auto", dtype: torch.dtype | None = None,
                 cuda_graphs: bool | None = None):
        register()
        config = text_config(model.config)
        _check_model(config)
        num_heads, num_kv_heads, head_dim = attention_geometry(config)
        param = next(model.parameters())
        self.model = model
        self.vocab_size = model.get_input_embeddings().num_embeddings   # token ids: [0, V)
        self.device = param.device
        self.cache = TreeKVCache(config.num_hidden_layers, num_kv_heads, head_dim, num_blocks,
                                 block_size=block_size, dtype=dtype or param.dtype,
                                 device=self.device)
        self.backend = resolve_backend("tree_decode_attention", backend, self.cache.device)
        self.num_q_heads = num_heads
        self.cuda_graphs = _use_graphs(cuda_graphs, self.device, self.backend)
        self._adapter = HFTreeCacheAdapter(self.cache)
        self._attention = DecodeAttention(self.cache, num_heads, self.backend)
        self.runner = DecodeGraphRunner(
            functools.partial(_decode_forward, model, self._adapter, self._attention),
            self.device, self.cuda_graphs)
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

    # ------------------------------------------------------------------ prompts
    def prefill(self, input_ids: torch.Tensor, seq: int | None = None) -> tuple[int, torch.Tensor]:
        """Run the prompt ``input_ids`` (``[P]`` or ``[1, P]``, P >= 1) into ``seq`` (default a
        new root). Returns ``(seq, logits)``, logits fp32 ``[1, V]`` for the next token.

        A new root reuses the cached whole blocks its first ``P - 1`` tokens start with (see the
        class docstring) and forwards only the other tokens, appended causally after them; the
        logits equal a full prefill's. ``length(seq)`` is P either way.
        """
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() not in (1, 2) or (
                input_ids.dim() == 2 and input_ids.shape[0] != 1) or input_ids.shape[-1] == 0:
            got = (tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor)
                   else type(input_ids).__name__)
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

    def extend(self, seqs: Sequence[int], token_ids: torch.Tensor) -> torch.Tensor:
        """Append ``T`` tokens to each of ``seqs`` (``token_ids`` int ``[B, T]``, row b -> seqs[b]).

        Causal attention: each new token sees its sequence's path and the new tokens up to itself
        (fresh K/V only, for sequences that are all empty). Positions continue each sequence:
        ``position_ids[b, t] = length(seqs[b]) + t``.

        Returns:
            fp32 ``[B, V]``: logits of the token after each sequence's last new token.
        """
        seqs = list(seqs)
        self._check_extend(seqs, token_ids)
        check_token_ids(token_ids, self.vocab_size, "token_ids")
        return self._extend(seqs, token_ids, token_ids)

    def _check_extend(self, seqs: list[int], token_ids) -> None:
        if token_ids.dim() != 2 or token_ids.shape[0] != len(seqs) or token_ids.shape[1] == 0:
            raise ValueError(f"token_ids must be [B={len(seqs)}, T>=1], got "
                             f"{tuple(token_ids.shape)}")
        if token_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"token_ids must be int64, got {token_ids.dtype}")
        self._check_not_planned(seqs)

    @torch.inference_mode()
    def _extend(self, seqs: list[int], token_ids: torch.Tensor, token_rows) -> torch.Tensor:
        """:meth:`extend` of checked arguments; ``token_rows``: the same ids as ``token_ids`` or
        as host lists ``[B][T]`` (what the reserve keys prompt blocks by)."""
        num_tokens = token_ids.shape[1]
        past = [self.cache.length(s) for s in seqs]
        # Prompt tokens are keyed for prefix reuse (read on the host, once per prompt); a single
        # token is not (that would be a host sync per call).
        slots = self.cache.reserve(seqs, num_tokens,    # raises CacheFullError, changes nothing
                                   token_ids=token_rows if num_tokens > 1 else None)
        self.peak_blocks_used = max(self.peak_blocks_used, self.cache.blocks_used())
        try:
            position_ids = (torch.tensor(past, dtype=torch.int64)[:, None]
                            + torch.arange(num_tokens, dtype=torch.int64)[None, :]
                            ).to(self.device)
            context = ForwardContext(self.cache, slots, past_lengths=past, seqs=seqs)
            logits = model_logits(self.model, self._adapter, context,
                                  token_ids.to(self.device, torch.int64), position_ids)
        except BaseException:
            # Anything failed after the reserve (e.g. out of memory in the forward): give the
            # tokens back, so the sequences hold no token whose K/V was never (fully) written
            # and a retry continues at the right positions.
            self.cache.unreserve(seqs, num_tokens)
            raise
        self.forwarded_tokens += len(seqs) * num_tokens
        return logits[:, -1, :].float()

    # ------------------------------------------------------------------ decode steps
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
        """Plan the step of ``seqs`` (their tokens reserved at ``slots``): the attention plan and
        the runner's buffers, host work and copies in stream order only."""
        try:
            layout = self.cache.layout(seqs)
            self.runner.reserve_rows(len(seqs))
            if self._attention.plan(layout, self.runner.capacity):
                self.runner.drop_graphs()   # they captured the old wrapper's buffers
            # seq_lens counts the reserved token: position = seq_lens - 1, on the device.
            self.runner.prepare(slots, layout.seq_lens - 1)
        except BaseException:   # as in extend: the sequences keep no unwritten token
            self.cache.unreserve(seqs, 1)
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
        self.cache.unreserve([seq for seq in planned if seq in drop], 1)
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
            self.cache.unreserve(self._planned[0], 1)
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
            logits = self.runner.launch(token_ids)
        except BaseException:   # as in extend: the sequences keep no unwritten token
            self.cache.unreserve(seqs, 1)
            raise
        self.forwarded_tokens += len(seqs)
        return logits
