"""TreeKVCache against a plain-Python model of its sequences, driven by hypothesis' stateful
testing: random reserve / fork / free / prefix / layout steps keep every invariant.
"""

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import a2r_kernels as ak

from _cache_helpers import DIM, HEADS, assert_reads_back, token_kv


# ---------------------------------------------------------------------------- stateful model
class CacheMachine(RuleBasedStateMachine):
    """Random new/fork/reserve+write/free and prefix reuse on a tiny pool (so keyed blocks are
    evicted often) against a Python model of each sequence's token values.

    Token ids come from a two-letter alphabet, so prompts share blocks often; KV values are
    unique per write, so a reused block must read back values some sequence wrote for exactly
    that token prefix (``block_values``), and live sequences must read back their own."""

    NUM_BLOCKS, BLOCK_SIZE = 12, 4

    def __init__(self):
        super().__init__()
        self.cache = ak.TreeKVCache(1, HEADS, DIM, self.NUM_BLOCKS, block_size=self.BLOCK_SIZE,
                                    dtype=torch.float32)
        self.tokens: dict[int, list[int]] = {}    # live seq -> its token values, root first
        self.own_len: dict[int, int] = {}         # seq -> tokens appended since it began
        self.parent_of: dict[int, int | None] = {}
        self.forked: set[int] = set()
        self.dead: list[int] = []
        self.next_value = 0
        self.names: dict[int, list[int | None]] = {}   # seq -> token id per token (None: unnamed)
        # Token ids from the root to the end of an aligned full block -> the values that block
        # was written with (by any sequence, live or freed).
        self.block_values: dict[tuple[int, ...], set[tuple[int, ...]]] = {}

    def _blocks(self, num_tokens):
        return -(-num_tokens // self.BLOCK_SIZE)

    @rule()
    def new_sequence(self):
        seq = self.cache.new_sequence()
        assert seq not in self.tokens and seq not in self.dead
        self.tokens[seq], self.own_len[seq], self.parent_of[seq] = [], 0, None
        self.names[seq] = []

    @rule(data=st.data(), extra=st.lists(st.integers(0, 1), max_size=9))
    def new_sequence_reusing_a_prefix(self, data, extra):
        prefixes = sorted(self.block_values)
        source = list(data.draw(st.sampled_from(prefixes))) if prefixes else []
        self._reuse(data, source[:data.draw(st.integers(0, len(source)))] + extra)

    def _reuse(self, data, prefix):
        """new_sequence(prefix): what it reuses must be what was written for that prefix."""
        before = self.cache.blocks_used()
        seq = self.cache.new_sequence(prefix=prefix)
        reused = self.cache.length(seq)
        assert reused % self.BLOCK_SIZE == 0 and reused <= len(prefix)
        assert reused == self.cache.match_prefix(prefix)
        values = self._check_reused(seq, prefix)
        assert self.cache.blocks_used() <= before + reused // self.BLOCK_SIZE
        self.tokens[seq], self.own_len[seq], self.parent_of[seq] = values, reused, None
        self.names[seq] = prefix[:reused]
        rest = prefix[reused:]
        if rest and data.draw(st.sampled_from([True, True, False])):   # a prefill: the rest
            needed = self._blocks(len(prefix)) - self._blocks(reused)
            if needed <= self.cache.num_free_blocks:
                self._write([seq], self.cache.reserve([seq], len(rest), token_ids=[rest]),
                            [rest])

    def _check_reused(self, seq, prefix) -> list[int]:
        """The values ``seq`` (just made by ``new_sequence(prefix)``) reads back: each reused
        block's must be values some sequence wrote for that very token prefix."""
        k, _ = self.cache.gather(0, seq)
        values = k[:, 0, 0].round().long().tolist()
        bs = self.BLOCK_SIZE
        for end in range(bs, len(values) + 1, bs):
            assert tuple(values[end - bs:end]) in self.block_values[tuple(prefix[:end])]
        return values

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), n=st.integers(1, 3))
    def fork(self, data, n):
        parent = data.draw(st.sampled_from(sorted(self.tokens)))
        used = self.cache.blocks_used()
        kids = self.cache.fork(parent, n)
        assert self.cache.blocks_used() == used
        self.forked.add(parent)
        for kid in kids:
            self.tokens[kid], self.own_len[kid] = list(self.tokens[parent]), 0
            self.parent_of[kid] = parent
            self.names[kid] = list(self.names[parent])

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), num_tokens=st.integers(0, 7), named=st.booleans())
    def reserve_and_write(self, data, num_tokens, named):
        seqs = data.draw(st.lists(st.sampled_from(sorted(self.tokens)), min_size=1, max_size=4,
                                  unique=True))
        ids = [data.draw(st.lists(st.integers(0, 1), min_size=num_tokens, max_size=num_tokens))
               for _ in seqs] if named else None
        before = self._snapshot()
        needed = sum(self._blocks(self.own_len[s] + num_tokens) - self._blocks(self.own_len[s])
                     for s in seqs)
        if any(s in self.forked for s in seqs):
            with pytest.raises(ValueError, match="forked"):
                self.cache.reserve(seqs, num_tokens, token_ids=ids)
            assert self._snapshot() == before
            return
        if needed > self.cache.num_free_blocks:
            with pytest.raises(ak.CacheFullError):
                self.cache.reserve(seqs, num_tokens, token_ids=ids)
            assert self._snapshot() == before
            return
        slots = self.cache.reserve(seqs, num_tokens, token_ids=ids)
        assert slots.shape == (len(seqs) * num_tokens,)
        assert len(set(slots.tolist())) == slots.numel()
        assert self.cache.num_free_blocks == before[0] - needed
        self._write(seqs, slots, ids if named else [[None] * num_tokens] * len(seqs))

    def _write(self, seqs, slots, ids):
        """Write fresh values into ``slots`` (reserved for ``seqs``, ``len(ids[i])`` tokens each)."""
        num_tokens = len(ids[0])
        values = list(range(self.next_value, self.next_value + slots.numel()))
        self.next_value += slots.numel()
        self.cache.write(0, slots, *token_kv(values))
        bs = self.BLOCK_SIZE
        for i, seq in enumerate(seqs):
            self.tokens[seq] += values[i * num_tokens:(i + 1) * num_tokens]
            self.own_len[seq] += num_tokens
            self.names[seq] += ids[i]
            names = self.names[seq]
            for end in range(bs, len(names) + 1, bs):   # every aligned full block, all named
                if None in names[:end]:
                    break
                self.block_values.setdefault(tuple(names[:end]), set()).add(
                    tuple(self.tokens[seq][end - bs:end]))

    @rule(data=st.data())
    def pool_pressure(self, data):
        """A new sequence of up to every free block: evicts cached blocks once the never-keyed
        free ones run out."""
        self.new_sequence()
        seq = max(self.tokens)
        never_keyed = self.cache.num_free_blocks - self.cache.num_cached_blocks
        evict = data.draw(st.integers(0, self.cache.num_cached_blocks))
        num_tokens = (never_keyed + evict) * self.BLOCK_SIZE
        cached = self.cache.num_cached_blocks
        self._write([seq], self.cache.reserve([seq], num_tokens), [[None] * num_tokens])
        assert self.cache.num_cached_blocks == cached - evict   # never-keyed blocks go first

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def free(self, data):
        seq = data.draw(st.sampled_from(sorted(self.tokens)))
        self.cache.free(seq)
        del self.tokens[seq]
        self.dead.append(seq)
        names = self.names.pop(seq)
        if None not in names and len(names) >= self.BLOCK_SIZE:   # re-prefill the freed prompt
            self._reuse(data, names)

    @precondition(lambda self: self.dead)
    @rule(data=st.data())
    def free_dead_sequence_is_an_error(self, data):
        seq = data.draw(st.sampled_from(self.dead))
        before = self._snapshot()
        with pytest.raises(ValueError, match=f"sequence {seq} was freed"):
            self.cache.free(seq)
        assert self._snapshot() == before

    def _snapshot(self):
        return (self.cache.num_free_blocks, self.cache.num_cached_blocks,
                self.cache.block_refcount, {s: self.cache.length(s) for s in self.tokens},
                {p: self.cache.match_prefix(list(p)) for p in self.block_values})

    @invariant()
    def blocks_are_accounted(self):
        cache = self.cache
        refcount = cache.block_refcount
        assert cache.num_free_blocks == refcount.count(0) == self.NUM_BLOCKS - cache.blocks_used()
        assert cache.num_cached_blocks <= cache.num_free_blocks
        assert cache.sequences == sorted(self.tokens)
        # Every block in use is on a live path and held by exactly refcount nodes (nothing leaks);
        # a block shared by several nodes (prefix reuse) is a full one.
        holders = {}
        if self.tokens:
            layout = cache.layout(sorted(self.tokens))
            for table, length in zip(layout.node_block_tables, layout.node_lengths):
                assert len(table) == self._blocks(length)
                for i, block in enumerate(table):
                    holders.setdefault(block, []).append((i + 1) * self.BLOCK_SIZE <= length)
        assert {b for b, c in enumerate(refcount) if c} == set(holders)
        for block, full in holders.items():
            assert refcount[block] == len(full)
            assert len(full) == 1 or all(full)

    @invariant()
    def every_cached_prefix_reads_back_what_was_written_for_it(self):
        # The longest prefixes only: a match walks from the start, so new_sequence(q) reuses (and
        # checks) every block new_sequence(p) would for each prefix p of q.
        keys = set(self.block_values)
        for prefix in keys:
            if any(len(q) > len(prefix) and q[:len(prefix)] == prefix for q in keys):
                continue
            if self.cache.match_prefix(list(prefix)):
                seq = self.cache.new_sequence(prefix=list(prefix))
                self._check_reused(seq, list(prefix))
                self.cache.free(seq)

    @invariant()
    def every_sequence_reads_back_its_tokens(self):
        for seq, values in self.tokens.items():
            assert_reads_back(self.cache, seq, values)

    def teardown(self):
        for seq in sorted(self.tokens):   # parents first: their kids must keep reading
            self.cache.free(seq)
            del self.tokens[seq]
            self.blocks_are_accounted()
            self.every_sequence_reads_back_its_tokens()
        assert self.cache.num_free_blocks == self.NUM_BLOCKS
        assert self.cache.block_refcount == [0] * self.NUM_BLOCKS
        assert self.cache.sequences == []


TestCacheMachine = CacheMachine.TestCase
TestCacheMachine.settings = settings(max_examples=100, stateful_step_count=30, derandomize=True,
                                     deadline=None, suppress_health_check=[HealthCheck.too_slow])
