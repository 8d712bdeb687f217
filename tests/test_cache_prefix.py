"""TreeKVCache's automatic prefix reuse: keyed full blocks shared by live sequences, kept after a
free and evicted least recently freed first; what is keyed, and bad prefix input.

Every test writes a unique value per token and checks what each sequence reads back.
"""

import math

import pytest
import torch

import a2r_kernels as ak

from _cache_helpers import append, assert_reads_back, make_cache, token_kv


# ---------------------------------------------------------------------------- prefix reuse
def prefill(cache, token_ids, values):
    """A new root that reuses what it can of ``token_ids`` and appends the rest (KV ``values``
    per token, like :func:`append`). Returns (seq, tokens reused, blocks taken)."""
    seq = cache.new_sequence(prefix=token_ids[:-1])
    reused, free = cache.length(seq), cache.num_free_blocks
    rest = token_ids[reused:]
    slots = cache.reserve([seq], len(rest), token_ids=[rest])
    for layer in range(cache.num_layers):
        cache.write(layer, slots, *token_kv([x + 1000 * layer for x in values[reused:]],
                                            cache.dtype, cache.device))
    return seq, reused, free - cache.num_free_blocks


def test_prefix_reuse_shares_a_live_sequences_blocks():
    """A prompt sharing 80 of 110 tokens with a live one takes only the rest's blocks, reads the
    shared KV, and corrupts nothing of the live one."""
    bs = 16
    cache = make_cache(num_blocks=32, block_size=bs)
    first = list(range(110))
    second = first[:80] + [500 + t for t in range(30)]
    a, reused, taken = prefill(cache, first, list(range(110)))
    assert (reused, taken) == (0, 7)
    b, reused, taken = prefill(cache, second, list(range(2000, 2110)))
    assert reused == 80 and taken == math.ceil(30 / bs) == 2
    assert cache.blocks_used() == 9
    shared = cache.block_refcount
    assert shared.count(2) == 5 and shared.count(1) == 4
    assert_reads_back(cache, a, list(range(110)))
    assert_reads_back(cache, b, list(range(80)) + list(range(2080, 2110)))
    cache.free(a)   # b still holds the shared blocks
    assert_reads_back(cache, b, list(range(80)) + list(range(2080, 2110)))
    assert cache.blocks_used() == 7 and cache.num_cached_blocks == 1   # a's own 6th full block


@pytest.mark.parametrize("prompt_len", [1, 2, 15, 16, 17, 32, 33, 110, 112, 113])
def test_just_freed_prompt_takes_at_most_one_new_block(prompt_len):
    bs = 16
    cache = make_cache(num_blocks=20, block_size=bs)
    tokens = [(7 * t) % 23 for t in range(prompt_len)]
    a, _, _ = prefill(cache, tokens, list(range(prompt_len)))
    cache.free(a)
    assert cache.blocks_used() == 0 and cache.num_free_blocks == 20
    b, reused, taken = prefill(cache, tokens, list(range(5000, 5000 + prompt_len)))
    assert reused == (prompt_len - 1) // bs * bs and taken <= 1
    assert_reads_back(cache, b, list(range(reused)) + list(range(5000 + reused, 5000 + prompt_len)))


def test_freed_keyed_blocks_are_evicted_least_recently_freed_first():
    bs = 4
    cache = make_cache(num_blocks=6, block_size=bs)
    a, _, _ = prefill(cache, [1] * 9, list(range(9)))          # blocks 0, 1 keyed, 2 partial
    b, _, _ = prefill(cache, [2] * 9, list(range(100, 109)))   # blocks 3, 4 keyed, 5 partial
    cache.free(b)
    cache.free(a)                                              # a freed last
    assert cache.num_cached_blocks == 4 and cache.num_free_blocks == 6
    assert cache.match_prefix([1] * 8) == cache.match_prefix([2] * 8) == 8
    c = cache.new_sequence()
    cache.reserve([c], 8)               # never-keyed blocks 2 and 5 first: nothing evicted
    assert cache.num_cached_blocks == 4
    cache.reserve([c], 4)               # then b's first block, the least recently freed
    assert cache.match_prefix([2] * 8) == 0 and cache.match_prefix([1] * 8) == 8
    d, reused, taken = prefill(cache, [1] * 9, list(range(200, 209)))
    assert (reused, taken) == (8, 1)    # a's blocks live again; the last free one holds the rest
    assert_reads_back(cache, d, list(range(8)) + [208])
    with pytest.raises(ak.CacheFullError):
        cache.reserve([c], 1)


def test_cache_full_with_cached_blocks_changes_nothing():
    bs = 4
    cache = make_cache(num_blocks=4, block_size=bs)
    a, _, _ = prefill(cache, list(range(9)), list(range(9)))
    cache.free(a)
    seq = cache.new_sequence()
    before = (cache.num_free_blocks, cache.num_cached_blocks, cache.block_refcount,
              cache.match_prefix(list(range(9))))
    with pytest.raises(ak.CacheFullError):
        cache.reserve([seq], 17, token_ids=[list(range(17))])
    assert (cache.num_free_blocks, cache.num_cached_blocks, cache.block_refcount,
            cache.match_prefix(list(range(9)))) == before == (4, 2, [0] * 4, 8)
    assert cache.length(seq) == 0


def test_only_named_aligned_tokens_are_keyed():
    bs = 4
    cache = make_cache(num_blocks=16, block_size=bs)
    plain = cache.new_sequence()
    append(cache, [plain], [list(range(8))])                  # no token ids: never keyed
    assert cache.match_prefix(list(range(8))) == 0
    root = cache.new_sequence()
    cache.reserve([root], 8, token_ids=[[5] * 8])
    aligned = cache.fork(root, 1)[0]                           # starts at token 8: keyed on
    cache.reserve([aligned], 4, token_ids=[[6] * 4])
    assert cache.match_prefix([5] * 8 + [6] * 4) == 12
    cache.reserve([aligned], 2, token_ids=[[7] * 2])
    mid = cache.fork(aligned, 1)[0]                            # starts mid-block: never keyed
    cache.reserve([mid], 6, token_ids=[[8] * 6])
    assert cache.match_prefix([5] * 8 + [6] * 4 + [7] * 2 + [8] * 6) == 12
    kid = cache.fork(root, 1)[0]
    cache.reserve([kid], 3, token_ids=[[9] * 3])
    cache.reserve([kid], 1)                                    # one unnamed token ends it
    cache.reserve([kid], 4, token_ids=[[9] * 4])
    assert cache.match_prefix([5] * 8 + [9] * 8) == 8


def test_unreserve_drops_the_keys_it_made():
    cache = make_cache(num_blocks=8, block_size=4)
    seq = cache.new_sequence()
    cache.reserve([seq], 2, token_ids=[[1, 2]])
    cache.reserve([seq], 7, token_ids=[[3, 4, 5, 6, 7, 8, 9]])
    assert cache.match_prefix(list(range(1, 10))) == 8
    cache.unreserve([seq], 7)
    assert cache.match_prefix(list(range(1, 10))) == 0 and cache.length(seq) == 2
    cache.reserve([seq], 2, token_ids=[[3, 4]])                # keyed again, as new
    assert cache.match_prefix([1, 2, 3, 4, 0]) == 4
    assert cache.num_free_blocks == 7


def test_prefix_and_token_ids_bad_input():
    cache = make_cache()
    seq = cache.new_sequence()
    for bad in ([1.0, 2.0], "ab", torch.zeros(2, 3, dtype=torch.long), torch.zeros(3)):
        with pytest.raises(ValueError, match="prefix"):
            cache.new_sequence(prefix=bad)
    for bad in ([[1, 2]], [[1, 2, 3], [4, 5, 6]], torch.zeros(1, 2, dtype=torch.long),
                [[1.0, 2.0, 3.0]], torch.zeros(1, 3)):
        with pytest.raises(ValueError, match="token_ids"):
            cache.reserve([seq], 3, token_ids=bad)
    assert cache.length(seq) == 0 and cache.num_free_blocks == 16
    assert cache.new_sequence(prefix=torch.arange(3)) != seq   # tensors [L] / [1, L] are fine
    cache.reserve([seq], 3, token_ids=torch.arange(3)[None])
