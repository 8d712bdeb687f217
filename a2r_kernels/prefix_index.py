"""Automatic prefix reuse of a :class:`~a2r_kernels.TreeKVCache` (vLLM's automatic prefix caching,
nano-vllm's hash-chained blocks): the index of keyed blocks.

When ``reserve(..., token_ids=...)`` is told the tokens it appends, every *aligned* full block (its
first token at a position that is a multiple of ``block_size``) is keyed by ``(content id of the
previous block, its tokens)``: a chain that names the block's tokens and the whole prefix before
them. Keys are exact (each registered block gets a fresh content id; no lossy hash), so a match is
never a collision. ``new_sequence(prefix=ids)`` starts a root that already holds the longest run of
whole cached blocks matching ``ids``, whether a live sequence holds them (the block's refcount
grows) or a freed one left them behind. Freed keyed blocks stay in the pool, still matchable, until
a ``reserve`` needs a block and no never-keyed block is free: then the least recently freed keyed
block is evicted (LRU). Free keyed blocks count in ``num_free_blocks``, so ``CacheFullError`` keeps
its "changes nothing" promise. Decode tokens are not passed (that would be a host sync), so the
blocks a branch generates are never keyed; ``fork`` is unchanged and zero cost.
"""

from __future__ import annotations

import torch

ROOT_ID = 0   # the content id the first block of every root chains from

Key = tuple[int, tuple[int, ...]]   # (content id of the previous block, the block's token ids)


class PrefixIndex:
    """The keyed blocks of one cache: key -> ``(block, content id)`` and each block's key.

    A node that keys its blocks carries ``chain`` (``chain[0]``: the content id its first block
    chains from, then one content id per keyed full block), ``token_ids`` (its own tokens),
    ``blocks`` and ``length``; :meth:`key_new_blocks` extends them.
    """

    def __init__(self, num_blocks: int, block_size: int):
        self.block_size = block_size
        self._cached: dict[Key, tuple[int, int]] = {}
        self._block_key: list[Key | None] = [None] * num_blocks
        self._next_content_id = ROOT_ID + 1

    def match(self, prefix: list[int]) -> list[tuple[int, int]]:
        """(block, content id) of the cached whole blocks that start ``prefix``, in order."""
        bs, found, prev = self.block_size, [], ROOT_ID
        for start in range(0, len(prefix) - bs + 1, bs):
            hit = self._cached.get((prev, tuple(prefix[start:start + bs])))
            if hit is None:
                break
            found.append(hit)
            prev = hit[1]
        return found

    def is_keyed(self, block: int) -> bool:
        return self._block_key[block] is not None

    def unregister(self, block: int) -> None:
        """Drop ``block``'s key, if it has one (its KV is about to change or was never written)."""
        key = self._block_key[block]
        if key is not None:
            del self._cached[key]
            self._block_key[block] = None

    def key_new_blocks(self, node, token_ids: list[int]) -> None:
        """Record ``token_ids`` (just appended to ``node``) and key the blocks they fill."""
        bs = self.block_size
        first_new_full = len(node.chain) - 1
        node.token_ids += token_ids
        for index in range(first_new_full, node.length // bs):
            tokens = tuple(node.token_ids[index * bs:(index + 1) * bs])
            key = (node.chain[-1], tokens)
            hit = self._cached.get(key)
            if hit is None:   # first block with these contents: it becomes the cached one
                block = node.blocks[index]
                hit = (block, self._next_content_id)
                self._next_content_id += 1
                self._cached[key] = hit
                self._block_key[block] = key
            node.chain.append(hit[1])   # a duplicate chains on from the cached copy's id


def token_list(token_ids, name: str) -> list[int]:
    """``token_ids`` (int ids ``[L]`` / ``[1, L]`` tensor, or a list of ints) as a host list;
    ValueError naming ``name`` otherwise."""
    if isinstance(token_ids, torch.Tensor):
        if token_ids.dtype not in (torch.int64, torch.int32) or token_ids.dim() > 2 or (
                token_ids.dim() == 2 and token_ids.shape[0] != 1):
            raise ValueError(f"{name} must be int token ids [L] or [1, L], got "
                             f"{token_ids.dtype} {tuple(token_ids.shape)}")
        return token_ids.reshape(-1).tolist()
    if not isinstance(token_ids, (list, tuple)) or not all(type(t) is int for t in token_ids):
        raise ValueError(f"{name} must be a list of int token ids or an int tensor, got "
                         f"{type(token_ids).__name__}")
    return list(token_ids)


def token_rows(token_ids, num_seqs: int, num_tokens: int) -> list[list[int]]:
    """``token_ids`` as ``num_seqs`` host lists of ``num_tokens`` ints, or ValueError."""
    if isinstance(token_ids, torch.Tensor):
        if token_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"token_ids must be int64 or int32, got {token_ids.dtype}")
        rows = token_ids.reshape(num_seqs, -1).tolist() if token_ids.numel() == (
            num_seqs * num_tokens) else None
    else:
        rows = [list(r) for r in token_ids] if isinstance(token_ids, (list, tuple)) else None
    if rows is None or len(rows) != num_seqs or any(
            len(r) != num_tokens or not all(type(t) is int for t in r) for r in rows):
        got = (f"{token_ids.dtype} {tuple(token_ids.shape)}"
               if isinstance(token_ids, torch.Tensor) else type(token_ids).__name__)
        raise ValueError(f"token_ids must be [len(seqs)={num_seqs}, num_tokens={num_tokens}] "
                         f"ints, got {got}")
    return rows
