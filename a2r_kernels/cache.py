"""TreeKVCache: a paged KV cache whose sequences form a tree and share their common prefix.

Storage is one pool per K and V, ``[num_layers, num_blocks, block_size, num_kv_heads, head_dim]``,
allocated once at construction. ``cache.k[layer]`` / ``cache.v[layer]`` are views
``[num_blocks, block_size, num_kv_heads, head_dim]`` of it, the ``k_cache`` / ``v_cache`` arguments
of :func:`a2r_kernels.tree_decode_attention`. Token ``t`` of a block ``b`` lives at the flat slot
``b * block_size + t`` of the view ``[num_blocks * block_size, num_kv_heads, head_dim]``.

Bookkeeping is a tree of *nodes*, all host-side Python:

- A node owns a list of blocks and a token count. Its tokens start at slot 0 of its first block,
  so its block table is just its block list; it holds ``ceil(length / block_size)`` blocks.
- A sequence id names a leaf node. Its tokens are those of the nodes on its path, root to leaf.
- ``fork(seq, n)`` is zero copy: ``seq``'s node is frozen and ``n`` new empty nodes hang below it.
  The children write their own tokens into fresh blocks; the free tail of the parent's partial
  last block stays unused (at most one partial block per fork), so no KV is copied or stored twice.
- A node counts its users: the live sequence whose leaf it is, plus its live child nodes. When
  the count drops to zero its blocks go back to the free list and it releases its parent in turn.

Automatic prefix reuse (vLLM's automatic prefix caching, nano-vllm's hash-chained blocks):
:mod:`a2r_kernels.prefix_index` explains the keys. Decode tokens are not keyed (their ids would
cost a host sync), so the blocks a branch generates are never reused; ``fork`` is zero cost.

Per decode step the model runner calls ``reserve`` (slots of the new tokens), then per layer
``write`` (scatter the new K and V) and the attention kernel over ``layout(seqs)`` (the plan of the
step, built once and reused by every layer: FlashInfer's plan/run split). ``reserve`` and
``layout`` are O(number of sequences + nodes on their paths) host work, never O(tokens);
``write`` does no host sync for CUDA slot tensors, so the per-layer part can be graph-captured.

Example::

    cache = ak.TreeKVCache(num_layers=2, num_kv_heads=2, head_dim=64, num_blocks=256)
    root = cache.new_sequence()
    slots = cache.reserve([root], num_tokens=prompt_len)        # prefill the shared prompt
    for layer in range(2):
        cache.write(layer, slots, k_prompt[layer], v_prompt[layer])
    kids = cache.fork(root, 8)                                   # 8 branches, nothing copied
    slots = cache.reserve(kids)                                  # one decode token each
    layout = cache.layout(kids)                                  # plan once per step
    for layer in range(2):
        cache.write(layer, slots, k_new, v_new)                  # [8, num_kv_heads, head_dim]
        out = ak.tree_decode_attention(q, cache.k[layer], cache.v[layer], layout)
"""

from __future__ import annotations

import heapq
import operator
from collections import OrderedDict
from typing import Iterable

import torch

from .errors import CacheFullError
from .host_memory import zeros_huge
from .vocab import DEFAULT_BLOCK_SIZE, as_int, non_negative_int, positive_int
from .block_tables import NodeBlockTables
from .prefix_index import ROOT_ID, PrefixIndex, token_list, token_rows
from .layout import TreeLayout, host_to_device
from .plan_builder import kv_chunk, seqs_per_item

_POOL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class _Node:
    """One run of tokens of the tree: its own blocks, behind the tokens of its ancestors."""

    __slots__ = ("parent", "blocks", "length", "prefix_length", "users", "frozen", "path",
                 "chain", "token_ids")

    def __init__(self, parent: "_Node | None"):
        self.parent = parent
        self.blocks: list[int] = []   # block ids, in token order; len == ceil(length / block_size)
        self.length = 0               # tokens owned by this node
        # Tokens of the ancestors: fixed, because every ancestor is frozen.
        self.prefix_length = 0 if parent is None else parent.prefix_length + parent.length
        self.users = 1                # the sequence that created it (released by free)
        self.frozen = False           # True once forked: read-only from then on
        self.path: tuple[_Node, ...] = (self,) if parent is None else parent.path + (self,)
        # Prefix-reuse keys: ``chain[0]`` is the content id this node's first block chains from
        # (``ROOT_ID`` for a root), then one content id per full block of the node. None: the
        # node's blocks are never keyed (it starts mid-block, or some of its tokens were
        # appended without their ids).
        self.chain: list[int] | None = [ROOT_ID]
        self.token_ids: list[int] = []   # the node's own tokens, kept while chain is not None


def _seq_id(seq, what: str) -> int:
    """``seq`` as an int sequence id (a bool is not one: ``True`` is not sequence 1)."""
    try:
        return as_int(seq, what)
    except ValueError:
        raise ValueError(f"{what} must be an int sequence id, got {seq!r}") from None


class TreeKVCache:
    """Tree-shared paged KV cache (API.md section 1).

    Args:
        num_layers: transformer layers; one K and one V pool slice per layer.
        num_kv_heads: KV heads per token.
        head_dim: channels per head.
        num_blocks: blocks in the pool (shared by all layers: block ``b`` of every layer belongs
            to the same tokens).
        block_size: tokens per block.
        dtype: pool dtype, one of float16 / bfloat16 / float32.
        device: where the pool lives.

    Attributes:
        k, v: per-layer views ``[num_blocks, block_size, num_kv_heads, head_dim]`` of the pools.
        k_pool, v_pool: the pools, ``[num_layers, num_blocks, block_size, num_kv_heads, head_dim]``,
            contiguous, zero-initialised; on the host advised to transparent huge pages
            (:mod:`a2r_kernels.host_memory`).

    Sequence ids are ints, never reused. A forked sequence stays readable (``length``, ``gather``,
    ``layout``) until freed but can no longer grow; its children do.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, num_blocks: int,
                 block_size: int = DEFAULT_BLOCK_SIZE, dtype: torch.dtype = torch.bfloat16,
                 device="cpu"):
        self.num_layers = num_layers = positive_int(num_layers, "num_layers")
        self.num_kv_heads = num_kv_heads = positive_int(num_kv_heads, "num_kv_heads")
        self.head_dim = head_dim = positive_int(head_dim, "head_dim")
        self.num_blocks = num_blocks = positive_int(num_blocks, "num_blocks")
        self.block_size = block_size = positive_int(block_size, "block_size")
        if dtype not in _POOL_DTYPES:
            raise ValueError(f"dtype must be one of {_POOL_DTYPES}, got {dtype!r}")
        self.dtype = dtype

        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        # On the host, backed by 2 MiB pages where the OS has them (host_memory: the CPU
        # kernel's reads of one head's rows touch a new 4 KiB page per token).
        self.k_pool = zeros_huge(shape, dtype, device)
        self.v_pool = zeros_huge(shape, dtype, device)
        self.device = self.k_pool.device   # normalised ("cuda" -> "cuda:0")
        self.k = [self.k_pool[layer] for layer in range(num_layers)]
        self.v = [self.v_pool[layer] for layer in range(num_layers)]
        # [num_layers, num_slots, num_kv_heads, head_dim]: what write() scatters into.
        slots_shape = (num_layers, num_blocks * block_size, num_kv_heads, head_dim)
        self._k_slots = self.k_pool.view(slots_shape)
        self._v_slots = self.v_pool.view(slots_shape)

        # Min-heap of free never-keyed block ids: lowest block first, so runs are reproducible.
        self._free_blocks: list[int] = list(range(num_blocks))
        # Free keyed blocks, least recently freed first: still matchable, evicted in this order
        # once the heap is empty.
        self._evictable: OrderedDict[int, None] = OrderedDict()
        # Nodes holding each block: 1 for a node's own block, more when prefix reuse shares it.
        self._block_refcount: list[int] = [0] * num_blocks
        self._prefix = PrefixIndex(num_blocks, block_size)   # the keyed blocks
        self._seq_node: dict[int, _Node] = {}
        self._seq_parent: dict[int, int | None] = {}
        self._next_seq = 0
        # Every node's block table on the device, extended as the node grows: layout() plans by
        # reference into it (O(sequences + nodes) per step, not O(blocks)).
        self._tables = NodeBlockTables(2 * num_blocks, self.device)

    # ------------------------------------------------------------------ properties
    @property
    def num_free_blocks(self) -> int:
        """Blocks no live sequence uses: never-keyed ones plus cached (evictable) keyed ones."""
        return len(self._free_blocks) + len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        """Free blocks that still hold a freed sequence's keyed KV (reusable until evicted)."""
        return len(self._evictable)

    @property
    def block_refcount(self) -> list[int]:
        """Per block: the live nodes holding it (a copy): 1 for a node's own block, more while
        prefix reuse shares it, 0 while it is free."""
        return list(self._block_refcount)

    @property
    def sequences(self) -> list[int]:
        """Live sequence ids, ascending (forked parents included until freed)."""
        return sorted(self._seq_node)

    @property
    def block_table_capacity(self) -> int:
        """Entries of the device block-table arena that ``layout`` plans read by reference: the
        ``max_blocks`` a :class:`~a2r_kernels.TreeAttentionWrapper` needs for this cache's
        layouts (``2 * num_blocks``; larger only if blocks came to belong to several nodes)."""
        return self._tables.capacity

    @property
    def nbytes(self) -> int:
        """Bytes of the K and V pools together."""
        return 2 * self.k_pool.numel() * self.k_pool.element_size()

    def blocks_used(self) -> int:
        """Blocks held by live nodes: ``num_blocks - num_free_blocks``."""
        return self.num_blocks - self.num_free_blocks

    def __repr__(self) -> str:
        return (f"TreeKVCache(num_layers={self.num_layers}, num_kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, block_size={self.block_size}, dtype={self.dtype}, "
                f"device={self.device}, blocks used/free={self.blocks_used()}/"
                f"{self.num_free_blocks} of {self.num_blocks}, sequences={len(self._seq_node)})")

    # ------------------------------------------------------------------ sequence lookup
    def _node(self, seq, index: int | None = None) -> _Node:
        """The leaf node of live sequence ``seq`` (``seqs[index]`` in error messages)."""
        node = self._seq_node.get(seq) if type(seq) is int else None
        if node is not None:
            return node
        what = "seq" if index is None else f"seqs[{index}]"
        seq_id = _seq_id(seq, what)
        node = self._seq_node.get(seq_id)
        if node is None:
            if 0 <= seq_id < self._next_seq:
                raise ValueError(f"{what}: sequence {seq_id} was freed")
            raise ValueError(f"{what}: unknown sequence {seq_id}")
        return node

    def _seq_list(self, seqs, what: str = "seqs") -> list[int]:
        if type(seqs) in (list, tuple) and all(type(s) is int for s in seqs):
            return list(seqs)   # the per-step common case, without per-item checks
        if isinstance(seqs, torch.Tensor):
            seqs = seqs.tolist() if seqs.dim() == 1 else [seqs]   # a 0-d tensor is one id
        elif not isinstance(seqs, Iterable) or isinstance(seqs, (str, bytes)):
            seqs = [seqs]
        return [_seq_id(s, f"{what}[{i}]") for i, s in enumerate(seqs)]

    def length(self, seq: int) -> int:
        """Tokens of ``seq``: those of its shared ancestors plus its own."""
        node = self._node(seq)
        return node.prefix_length + node.length

    def parent(self, seq: int) -> int | None:
        """The sequence ``seq`` was forked from (its id, even if since freed); None for roots."""
        self._node(seq)
        return self._seq_parent[_seq_id(seq, "seq")]

    def is_forked(self, seq: int) -> bool:
        """True once ``seq`` has been forked (it is then read-only)."""
        return self._node(seq).frozen

    # ------------------------------------------------------------------ tree operations
    def new_sequence(self, prefix=None) -> int:
        """Start a sequence (a new root). Allocates no blocks.

        Args:
            prefix: token ids (list of ints or an int tensor ``[L]`` / ``[1, L]``) the caller
                means to append first, or None. The new sequence then already holds the longest
                run of whole blocks of ``prefix`` whose KV the pool caches (written by a live or
                freed sequence through ``reserve(..., token_ids=...)``); ``length(seq)`` says how
                many tokens (a multiple of ``block_size``, at most ``len(prefix)``). Append the
                rest of ``prefix`` with ``reserve(..., token_ids=rest)``. Pass at most all but
                the last prompt token when the forward needs logits.
        """
        node = _Node(None)
        if prefix is not None:
            self._reuse_prefix(node, token_list(prefix, "prefix"))
        return self._add_sequence(node, parent_seq=None)

    def match_prefix(self, prefix) -> int:
        """Tokens of ``prefix`` that ``new_sequence(prefix)`` would reuse now (changes nothing)."""
        return len(self._prefix.match(token_list(prefix, "prefix"))) * self.block_size

    def _reuse_prefix(self, node: _Node, prefix: list[int]) -> None:
        for block, content_id in self._prefix.match(prefix):
            if self._block_refcount[block] == 0:
                del self._evictable[block]   # cached and free: live again
            self._block_refcount[block] += 1
            node.blocks.append(block)
            node.chain.append(content_id)
        node.length = len(node.blocks) * self.block_size
        node.token_ids = prefix[:node.length]

    def _add_sequence(self, node: _Node, parent_seq: int | None) -> int:
        seq = self._next_seq
        self._next_seq += 1
        self._seq_node[seq] = node
        self._seq_parent[seq] = parent_seq
        return seq

    def fork(self, seq: int, n: int) -> list[int]:
        """Make ``n`` children of ``seq`` that share all of its tokens; return their ids.

        Zero copy and allocation free: ``seq``'s node is frozen and shared, each child gets an
        empty node below it and writes its own tokens into fresh blocks. ``seq`` stays readable;
        ``reserve`` on it raises from now on. A child can be forked again; forking ``seq`` a
        second time adds more children below the same shared node.
        """
        node = self._node(seq)
        n = positive_int(n, "n")
        node.frozen = True
        node.users += n
        parent_seq = _seq_id(seq, "seq")
        kids = [_Node(node) for _ in range(n)]
        # A child's blocks can be keyed only when it starts on a block boundary behind keyed
        # blocks (a child that starts mid-block has no block aligned with a root's).
        aligned = node.chain is not None and (node.prefix_length + node.length) % self.block_size == 0
        for kid in kids:
            kid.chain = [node.chain[-1]] if aligned else None
        return [self._add_sequence(kid, parent_seq) for kid in kids]

    def free(self, seq: int) -> None:
        """Release ``seq``. Blocks return to the pool once no live sequence uses them: a forked
        parent's tokens stay until its last descendant is freed."""
        node = self._node(seq)
        seq_id = _seq_id(seq, "seq")
        del self._seq_node[seq_id]
        del self._seq_parent[seq_id]
        while node is not None:
            node.users -= 1
            if node.users > 0:
                break
            for block in node.blocks:
                self._release_block(block)
            node.blocks = []
            node = node.parent

    def _release_block(self, block: int) -> None:
        """One node fewer holds ``block``; when none does, it is free (cached if keyed)."""
        self._block_refcount[block] -= 1
        if self._block_refcount[block]:
            return
        if self._prefix.is_keyed(block):
            self._evictable[block] = None     # most recently freed: evicted last
        else:
            heapq.heappush(self._free_blocks, block)

    def _take_block(self) -> int:
        """A free block for new tokens: the lowest never-keyed one, else evict the least
        recently freed keyed one (its KV is about to be overwritten: drop its key)."""
        if self._free_blocks:
            block = heapq.heappop(self._free_blocks)
        else:
            block, _ = self._evictable.popitem(last=False)
            self._prefix.unregister(block)
        self._block_refcount[block] = 1
        return block

    # ------------------------------------------------------------------ slots and data
    def reserve(self, seqs, num_tokens: int = 1, *, token_ids=None) -> torch.Tensor:
        """Append ``num_tokens`` tokens to each of ``seqs`` and return their slots.

        Args:
            seqs: sequence ids (list, tuple, 1-D tensor, or a single int), no duplicates, none of
                them forked.
            num_tokens: tokens per sequence, >= 0.
            token_ids: optional, the ids of the appended tokens: an int tensor (read on the
                host) or nested lists ``[len(seqs), num_tokens]``. Full blocks they complete
                become reusable by ``new_sequence(prefix=...)``, so the caller must write their
                KV before the next ``new_sequence``. Without them the sequences' blocks from
                here on are never keyed.

        Returns:
            int64 ``[len(seqs) * num_tokens]`` on the cache's device, seq-major (all tokens of
            ``seqs[0]``, then ``seqs[1]``, ...): the flat slots ``block * block_size + offset`` to
            pass to :meth:`write`.

        Raises:
            CacheFullError: the free blocks cannot hold every new token. Nothing changes.
            ValueError: unknown / freed / forked / duplicate sequence, bad ``num_tokens``.
        """
        num_tokens = non_negative_int(num_tokens, "num_tokens")
        seq_ids = self._seq_list(seqs)
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError(f"seqs has duplicate sequence ids: {seq_ids}")
        if token_ids is not None:
            token_ids = token_rows(token_ids, len(seq_ids), num_tokens)
        bs = self.block_size
        nodes = []
        needed = 0
        for i, seq in enumerate(seq_ids):
            node = self._node(seq, i)
            if node.frozen:
                raise ValueError(f"seqs[{i}]: sequence {seq} was forked; append to its children")
            nodes.append(node)
            needed += -(-(node.length + num_tokens) // bs) - len(node.blocks)
        if needed > self.num_free_blocks:
            raise CacheFullError(
                f"reserve needs {needed} new blocks for {len(seq_ids)} sequences x {num_tokens} "
                f"tokens but only {self.num_free_blocks} of {self.num_blocks} are free")

        if not nodes or num_tokens == 0:
            return torch.empty(0, dtype=torch.int64, device=self.device)
        # Checks done: mutate.
        slots: list[int] = []
        if token_ids is None:   # tokens we cannot name: nothing of these nodes is keyed from now
            for node in nodes:
                node.chain, node.token_ids = None, []
        if num_tokens == 1:   # the decode step: one slot per sequence, in its last block
            for node in nodes:
                pos = node.length
                if pos == len(node.blocks) * bs:
                    node.blocks.append(self._take_block())
                slots.append(node.blocks[-1] * bs + pos % bs)
                node.length = pos + 1
            self._key_rows(nodes, token_ids)
            # No host sync on CUDA: the next step is reserved while the last one runs.
            return host_to_device(torch.tensor(slots, dtype=torch.int64), self.device)
        long_runs = num_tokens > 64   # prefill: build slots with tensor ops, not Python ints
        parts: list[torch.Tensor] = []
        for node in nodes:
            start, end = node.length, node.length + num_tokens
            first_block = start // bs
            while len(node.blocks) * bs < end:
                node.blocks.append(self._take_block())
            node.length = end
            if long_runs:
                table = torch.tensor(node.blocks[first_block:], dtype=torch.int64)
                run = (table[:, None] * bs + torch.arange(bs)).flatten()
                parts.append(run[start - first_block * bs:end - first_block * bs])
                continue
            pos = start
            while pos < end:   # one range per block
                block_end = min(end, (pos // bs + 1) * bs)
                base = node.blocks[pos // bs] * bs - (pos // bs) * bs
                slots.extend(range(base + pos, base + block_end))
                pos = block_end
        self._key_rows(nodes, token_ids)
        if long_runs:
            return torch.cat(parts).to(self.device)
        return torch.tensor(slots, dtype=torch.int64, device=self.device)

    def _key_rows(self, nodes: list[_Node], token_ids: list[list[int]] | None) -> None:
        if token_ids is not None:
            for node, row in zip(nodes, token_ids):
                if node.chain is not None:
                    self._prefix.key_new_blocks(node, row)

    def unreserve(self, seqs, num_tokens: int) -> None:
        """Undo the last ``reserve(seqs, num_tokens)``: drop those tokens and return the blocks
        they alone used (block accounting and prefix keys as if never reserved). For a forward
        that failed or was cancelled after its reserve: nothing may have touched ``seqs`` in
        between. ValueError (changing nothing) for a forked sequence or one shorter than
        ``num_tokens``."""
        num_tokens = non_negative_int(num_tokens, "num_tokens")
        seq_ids = self._seq_list(seqs)
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError(f"seqs has duplicate sequence ids: {seq_ids}")
        for i, seq in enumerate(seq_ids):   # check all before changing any
            node = self._node(seq, i)
            if node.frozen or node.length < num_tokens:
                raise ValueError(f"seqs[{i}]: sequence {seq} has no {num_tokens} reserved tokens "
                                 "to give back")
        bs = self.block_size
        for i, seq in enumerate(seq_ids):
            node = self._node(seq, i)
            node.length -= num_tokens
            self._tables.invalidate(node)   # blocks are popped: its device table is rewritten
            while len(node.blocks) > -(-node.length // bs):
                block = node.blocks.pop()
                self._prefix.unregister(block)   # its KV was never (fully) written
                self._release_block(block)
            full = node.length // bs
            if node.chain is not None and len(node.chain) - 1 > full:
                # The reserve completed (and keyed) the block that is partial again: unkey it.
                # It was partial before, so it is this node's own block, held by nobody else.
                if full < len(node.blocks):
                    self._prefix.unregister(node.blocks[full])
                del node.chain[full + 1:]
            if node.chain is not None:
                del node.token_ids[node.length:]

    def _check_layer(self, layer) -> None:
        if type(layer) is not int or not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be an int in [0, {self.num_layers}), got {layer!r}")

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Scatter ``k``, ``v`` into layer ``layer``: ``k_pool[layer].flat[slots[t]] = k[t]``.

        Args:
            layer: 0 <= layer < num_layers.
            slots: int64 ``[T]`` on the cache's device, flat slot ids (from :meth:`reserve`).
            k, v: ``[T, num_kv_heads, head_dim]``, the pool's dtype and device, any strides.

        Slot values are range-checked when ``slots`` is on the CPU; on CUDA they are not (that
        would be a host sync per layer): pass slots from :meth:`reserve`.
        """
        self._check_layer(layer)
        if not isinstance(slots, torch.Tensor) or slots.dim() != 1 or slots.dtype != torch.int64:
            raise ValueError("slots must be a 1-D int64 tensor [T], got "
                             + (f"{slots.dtype} {tuple(slots.shape)}"
                                if isinstance(slots, torch.Tensor) else type(slots).__name__))
        if slots.device != self.device:
            raise ValueError(f"slots must be on the cache's device {self.device}, "
                             f"got {slots.device}")
        num_tokens = slots.shape[0]
        expected = (num_tokens, self.num_kv_heads, self.head_dim)
        for name, x in (("k", k), ("v", v)):
            if not isinstance(x, torch.Tensor) or tuple(x.shape) != expected:
                got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise ValueError(f"{name} must have shape [T={num_tokens}, num_kv_heads="
                                 f"{self.num_kv_heads}, head_dim={self.head_dim}], got {got}")
            if x.dtype != self.dtype:
                raise ValueError(f"{name} must have the pool's dtype {self.dtype}, got {x.dtype}")
            if x.device != self.device:
                raise ValueError(f"{name} must be on the cache's device {self.device}, "
                                 f"got {x.device}")
        if num_tokens == 0:
            return
        if slots.device.type == "cpu":
            num_slots = self.num_blocks * self.block_size
            lo, hi = int(slots.min()), int(slots.max())
            if lo < 0 or hi >= num_slots:
                raise ValueError(f"slots must lie in [0, num_blocks * block_size = {num_slots}), "
                                 f"got values in [{lo}, {hi}]")
        self.scatter(layer, slots, k, v)

    def scatter(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """:meth:`write` without its checks (two index copies, no host sync, no reduction): for a
        model runner's per-layer call with ``slots`` straight from :meth:`reserve` and ``k``,
        ``v`` ``[T, num_kv_heads, head_dim]`` in the pool's dtype on its device. Anything else
        is undefined (an out-of-range slot on CUDA is a device-side error)."""
        self._k_slots[layer].index_copy_(0, slots, k)
        self._v_slots[layer].index_copy_(0, slots, v)

    def path_slots(self, seq: int) -> torch.Tensor:
        """int64 ``[length(seq)]`` on the cache's device: flat slot of every token of ``seq``,
        root first (the shared ancestors' tokens, then its own)."""
        bs = self.block_size
        tables, lengths = [], []
        for node in self._node(seq).path:
            if node.length:
                tables.append(torch.tensor(node.blocks, dtype=torch.int64))
                lengths.append(node.length)
        if not tables:
            return torch.empty(0, dtype=torch.int64, device=self.device)
        offsets = torch.arange(bs, dtype=torch.int64)
        parts = [(table[:, None] * bs + offsets).flatten()[:n] for table, n in zip(tables, lengths)]
        return torch.cat(parts).to(self.device)

    def gather(self, layer: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of ``seq``'s K and V at ``layer``, each ``[length(seq), num_kv_heads, head_dim]``
        in the pool's dtype, root token first (e.g. to run a prefix-cache forward)."""
        self._check_layer(layer)
        slots = self.path_slots(seq)
        return (self._k_slots[layer].index_select(0, slots),
                self._v_slots[layer].index_select(0, slots))

    def step_tree(self, seqs) -> tuple[list[list[int]], list[list[int]], list[int]]:
        """The tree of one decode step of ``seqs``, without its kernel plan: ``(paths,
        node_block_tables, node_lengths)`` as :meth:`TreeLayout.from_paths` takes them (host
        lists; ``TreeLayout.from_paths(*cache.step_tree(seqs), cache.block_size)`` plans the step
        :meth:`layout` plans). The nodes on the seqs' paths are numbered 0..M-1 in order of first
        appearance, as in :meth:`layout`; node ``j`` holds ``node_lengths[j]`` tokens in the
        ``ceil(node_lengths[j] / block_size)`` blocks of ``node_block_tables[j]``."""
        nodes, paths = self._step_nodes(seqs)
        bs = self.block_size
        return (paths, [node.blocks[:-(-node.length // bs)] for node in nodes],
                [node.length for node in nodes])

    def _step_nodes(self, seqs) -> tuple[list[_Node], list[list[int]]]:
        """:meth:`step_tree` with the nodes themselves (valid until the next mutation)."""
        local_id: dict[_Node, int] = {}
        nodes: list[_Node] = []
        paths: list[list[int]] = []
        for i, seq in enumerate(self._seq_list(seqs)):
            path = []
            for node in self._node(seq, i).path:
                j = local_id.get(node)
                if j is None:
                    j = local_id[node] = len(nodes)
                    nodes.append(node)
                path.append(j)
            paths.append(path)
        return nodes, paths

    def layout(self, seqs, kv_chunk_size: int | None = None,
               max_seqs_per_item: int | None = None) -> TreeLayout:
        """The :class:`TreeLayout` of one decode step of ``seqs`` (in that order) over this cache.

        Build it once per step, after :meth:`reserve` and before the layers run (the lengths it
        records include the reserved tokens), and pass it with ``cache.k[layer]`` /
        ``cache.v[layer]`` to :func:`a2r_kernels.tree_decode_attention` for every layer. The nodes
        on the seqs' paths are renumbered 0..M-1 in order of first appearance. Forked (read-only)
        sequences may be listed; so may a sequence twice (it then gets two identical rows).
        ``kv_chunk_size`` and ``max_seqs_per_item`` are as in :meth:`TreeLayout.from_paths`.
        """
        chunk = kv_chunk(kv_chunk_size, self.block_size)
        per_item = seqs_per_item(max_seqs_per_item)
        nodes, paths = self._step_nodes(seqs)
        lengths = [node.length for node in nodes]
        page_starts, page_table, max_block_id = self._tables.sync(nodes,
                                                                  operator.attrgetter("blocks"))
        # Host copies of the tables only when asked for (the torch reference, tests). The first
        # ceil(length / block_size) blocks of a node never change while the step is valid, so
        # the layout keeps the lists themselves (a snapshot is taken on first access).
        block_lists = [node.blocks for node in nodes]
        bs = self.block_size

        def node_tables() -> list[list[int]]:
            return [blocks[:-(-n // bs)] for blocks, n in zip(block_lists, lengths)]

        # The tree guarantees what from_paths would check (ids in range, no repeats, lengths
        # that fit their blocks): plan directly.
        return TreeLayout._plan(paths, None, lengths, self.block_size, chunk, self.device,
                                per_item, page_starts=page_starts, page_table=page_table,
                                node_tables=node_tables, max_block_id=max_block_id)
