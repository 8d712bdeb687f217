"""TreeKVCache: zero-copy forks, refcounted frees, reserve/write/gather roundtrips, layouts.

Every test writes a unique value per token (its global token id, per layer and for K and V) and
checks what each sequence reads back against a plain-Python model of its token list.
"""

import math
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import a2r_kernels as ak

HEADS, DIM = 2, 3   # odd, small: the pool is tiny and every element is checked


def make_cache(num_blocks=16, block_size=4, num_layers=2, dtype=torch.float32, device="cpu"):
    return ak.TreeKVCache(num_layers, HEADS, DIM, num_blocks, block_size=block_size, dtype=dtype,
                          device=device)


def token_kv(values, dtype=torch.float32, device="cpu"):
    """K and V rows ``[T, HEADS, DIM]`` that encode one value per token (V = -K)."""
    values = torch.as_tensor(values, dtype=torch.float32)
    grid = torch.arange(HEADS * DIM, dtype=torch.float32).view(1, HEADS, DIM) / 8
    k = (values.view(-1, 1, 1) + grid).to(dtype=dtype, device=device)
    return k, -k


def append(cache, seqs, values_per_seq, model=None):
    """reserve + write one token block per seq; ``values_per_seq[i]`` lists seq i's new values."""
    num_tokens = len(values_per_seq[0]) if values_per_seq else 0
    slots = cache.reserve(seqs, num_tokens=num_tokens)
    flat = [v for vals in values_per_seq for v in vals]
    for layer in range(cache.num_layers):
        k, v = token_kv([x + 1000 * layer for x in flat], cache.dtype, cache.device)
        cache.write(layer, slots, k, v)
    if model is not None:
        for seq, vals in zip(seqs, values_per_seq):
            model[seq] = model[seq] + list(vals)
    return slots


def assert_reads_back(cache, seq, expected_values):
    assert cache.length(seq) == len(expected_values)
    for layer in range(cache.num_layers):
        k, v = cache.gather(layer, seq)
        exp_k, exp_v = token_kv([x + 1000 * layer for x in expected_values], cache.dtype,
                                cache.device)
        assert k.dtype == cache.dtype and k.shape == (len(expected_values), HEADS, DIM)
        torch.testing.assert_close(k, exp_k, rtol=0, atol=0)
        torch.testing.assert_close(v, exp_v, rtol=0, atol=0)


# ---------------------------------------------------------------------------- construction
def test_pool_shapes_views_and_repr():
    cache = make_cache(num_blocks=5, block_size=3, num_layers=3, dtype=torch.bfloat16)
    assert cache.k_pool.shape == (3, 5, 3, HEADS, DIM) and cache.k_pool.dtype == torch.bfloat16
    assert len(cache.k) == len(cache.v) == 3
    for layer in range(3):
        assert cache.k[layer].shape == (5, 3, HEADS, DIM)
        assert cache.k[layer].data_ptr() == cache.k_pool[layer].data_ptr()
        assert cache.v[layer].data_ptr() == cache.v_pool[layer].data_ptr()
    assert cache.num_free_blocks == 5 and cache.blocks_used() == 0
    assert cache.block_refcount == [0] * 5
    assert (cache.num_layers, cache.num_kv_heads, cache.head_dim) == (3, HEADS, DIM)
    assert cache.device == torch.device("cpu") and cache.dtype == torch.bfloat16
    assert cache.nbytes == 2 * 3 * 5 * 3 * HEADS * DIM * 2
    seq = cache.new_sequence()
    cache.reserve([seq], 4)
    assert "blocks used/free=2/3" in repr(cache) and "sequences=1" in repr(cache)


@pytest.mark.parametrize("arg, value", [
    ("num_layers", 0), ("num_kv_heads", -1), ("head_dim", 2.0), ("num_blocks", 0),
    ("block_size", 0), ("block_size", True), ("dtype", torch.int32), ("dtype", torch.float64),
])
def test_constructor_rejects_bad_args(arg, value):
    kwargs = dict(num_layers=1, num_kv_heads=1, head_dim=4, num_blocks=2, block_size=4,
                  dtype=torch.float32)
    kwargs[arg] = value
    with pytest.raises(ValueError, match=arg):
        ak.TreeKVCache(**kwargs)


# ---------------------------------------------------------------------------- reserve
def test_reserve_slots_are_seq_major_lowest_block_first():
    cache = make_cache(num_blocks=8, block_size=4)
    a, b = cache.new_sequence(), cache.new_sequence()
    slots = cache.reserve([a, b], num_tokens=5)
    assert slots.dtype == torch.int64 and slots.shape == (10,)
    # a: blocks 0, 1; b: blocks 2, 3 (lowest free block first, allocated seq by seq)
    assert slots.tolist() == [0, 1, 2, 3, 4, 8, 9, 10, 11, 12]
    slots = cache.reserve([b, a], num_tokens=4)
    assert slots.tolist() == [13, 14, 15, 16, 5, 6, 7, 20]   # b fills block 3, then block 4
    assert cache.length(a) == cache.length(b) == 9
    assert cache.num_free_blocks == 2 and cache.block_refcount == [1] * 6 + [0, 0]


@pytest.mark.parametrize("num_tokens", [1, 3, 64, 65, 131])
def test_reserve_slots_match_path_slots(num_tokens):
    """reserve's fast paths (one token; Python ranges; tensor runs for long prefills) all return
    the slots that path_slots later reports, at unaligned starting offsets."""
    cache = make_cache(num_blocks=200, block_size=5)
    root = cache.new_sequence()
    cache.reserve([root], 7)
    kids = cache.fork(root, 3)
    cache.reserve([kids[1]], 2)                      # the kids start at different offsets,
    cache.reserve([kids[2]], 13)                     # in their first or third block
    before = {kid: cache.path_slots(kid) for kid in kids}
    order = [kids[2], kids[0], kids[1]]
    slots = cache.reserve(order, num_tokens)
    assert slots.dtype == torch.int64 and slots.shape == (3 * num_tokens,)
    for i, kid in enumerate(order):
        after = cache.path_slots(kid)
        assert torch.equal(after[: before[kid].numel()], before[kid])
        assert torch.equal(after[before[kid].numel():], slots[i * num_tokens:(i + 1) * num_tokens])
    assert cache.blocks_used() == 2 + sum(-(-(cache.length(k) - 7) // 5) for k in kids)


def test_reserve_zero_tokens_and_empty_seqs_change_nothing():
    cache = make_cache()
    seq = cache.new_sequence()
    empty = cache.reserve([seq], num_tokens=0)
    assert empty.dtype == torch.int64 and empty.shape == (0,)
    assert cache.reserve([], num_tokens=3).shape == (0,)
    assert cache.reserve([], num_tokens=100).shape == (0,)
    assert cache.length(seq) == 0 and cache.num_free_blocks == 16


@pytest.mark.parametrize("num_tokens", [-1, 1.5, True, None])
def test_reserve_rejects_bad_num_tokens(num_tokens):
    cache = make_cache()
    with pytest.raises(ValueError, match="num_tokens"):
        cache.reserve([cache.new_sequence()], num_tokens=num_tokens)


def test_reserve_rejects_duplicates_unknown_and_freed_without_changes():
    cache = make_cache()
    a, b = cache.new_sequence(), cache.new_sequence()
    cache.reserve([a], 3)
    with pytest.raises(ValueError, match="duplicate"):
        cache.reserve([a, b, a])
    with pytest.raises(ValueError, match="unknown sequence 99"):
        cache.reserve([a, 99])
    cache.free(b)
    with pytest.raises(ValueError, match=f"sequence {b} was freed"):
        cache.reserve([a, b])
    with pytest.raises(ValueError, match="int sequence id"):
        cache.reserve(["a"])
    assert cache.length(a) == 3 and cache.num_free_blocks == 15


def test_reserve_accepts_a_tensor_or_single_id():
    cache = make_cache()
    a, b = cache.new_sequence(), cache.new_sequence()
    assert cache.reserve(torch.tensor([a, b]), 2).shape == (4,)
    assert cache.reserve(a, 1).shape == (1,)
    assert (cache.length(a), cache.length(b)) == (3, 2)


# ---------------------------------------------------------------------------- fork
@pytest.mark.parametrize("prefix_len", [0, 1, 3, 4, 5, 7, 8])
def test_fork_shares_prefix_without_copy_or_allocation(prefix_len):
    bs, n = 4, 3
    cache = make_cache(num_blocks=32, block_size=bs)
    model = {}
    root = cache.new_sequence()
    model[root] = []
    append(cache, [root], [list(range(prefix_len))], model)
    root_blocks = cache.blocks_used()
    assert root_blocks == math.ceil(prefix_len / bs)
    root_slots = cache.path_slots(root)
    pool_before = cache.k_pool.clone()

    kids = cache.fork(root, n)
    assert len(kids) == n and len(set(kids)) == n and root not in kids
    assert cache.blocks_used() == root_blocks            # fork allocates nothing
    assert torch.equal(cache.k_pool, pool_before)        # ... and copies nothing
    assert all(cache.parent(kid) == root for kid in kids) and cache.parent(root) is None
    assert cache.is_forked(root) and not cache.is_forked(kids[0])
    for kid in kids:
        model[kid] = list(model[root])
        assert cache.length(kid) == prefix_len
        assert torch.equal(cache.path_slots(kid), root_slots)

    child_len = 6
    append(cache, kids, [[100 * (i + 1) + t for t in range(child_len)] for i in range(n)], model)
    # Children start in fresh blocks: the parent's partial block is not copied nor appended to.
    assert cache.blocks_used() == root_blocks + n * math.ceil(child_len / bs)
    for kid in kids:
        kid_slots = cache.path_slots(kid)
        assert torch.equal(kid_slots[:prefix_len], root_slots)
        assert kid_slots[prefix_len].item() % bs == 0
        assert_reads_back(cache, kid, model[kid])
    assert_reads_back(cache, root, model[root])   # the parent stays readable

    layout = cache.layout(kids)
    shared = {path[0] for path in layout.paths}
    assert len(shared) == 1 and all(len(path) == 2 for path in layout.paths)
    root_node = shared.pop()
    assert layout.node_lengths[root_node] == prefix_len
    root_blocks_seen = sorted(set(root_slots.div(bs, rounding_mode="floor").tolist()))
    assert layout.node_block_tables[root_node] == root_blocks_seen
    assert len({path[1] for path in layout.paths}) == n


def test_fork_of_forked_parent_is_reserve_error_but_readable():
    cache = make_cache()
    model = {}
    root = cache.new_sequence()
    model[root] = []
    append(cache, [root], [[1, 2, 3, 4, 5]], model)
    kid = cache.fork(root, 1)[0]
    model[kid] = list(model[root])
    free_before = cache.num_free_blocks
    with pytest.raises(ValueError, match=f"sequence {root} was forked; append to its children"):
        cache.reserve([kid, root])
    assert cache.num_free_blocks == free_before and cache.length(kid) == 5
    # Forking a forked sequence again is allowed: more siblings of the same shared node.
    kid2 = cache.fork(root, 1)[0]
    model[kid2] = list(model[root])
    append(cache, [kid, kid2], [[6], [7]], model)
    for seq in (root, kid, kid2):
        assert_reads_back(cache, seq, model[seq])


def test_multi_level_fork():
    bs = 4
    cache = make_cache(num_blocks=40, block_size=bs)
    model = {}
    counter = iter(range(10_000))

    def grow(seqs, n):
        append(cache, seqs, [[next(counter) for _ in range(n)] for _ in seqs], model)

    root = cache.new_sequence()
    model[root] = []
    grow([root], 6)
    a, b = cache.fork(root, 2)
    model[a], model[b] = list(model[root]), list(model[root])
    grow([a, b], 3)
    a1, a2, a3 = cache.fork(a, 3)
    for s in (a1, a2, a3):
        model[s] = list(model[a])
    grow([a1, a2, a3, b], 5)
    b1 = cache.fork(b, 1)[0]
    model[b1] = list(model[b])
    grow([b1], 2)
    for seq in (root, a, b, a1, a2, a3, b1):
        assert_reads_back(cache, seq, model[seq])
    assert cache.length(a2) == 6 + 3 + 5 and cache.length(b1) == 6 + 3 + 5 + 2

    seqs = [a1, b1, a2, a3]
    layout = cache.layout(seqs)
    assert [len(p) for p in layout.paths] == [3, 3, 3, 3]   # root, a|b, leaf
    assert len({p[0] for p in layout.paths}) == 1                        # the root node
    assert layout.paths[0][1] == layout.paths[2][1] == layout.paths[3][1]  # a's node
    assert layout.paths[1][1] != layout.paths[0][1]
    assert layout.seq_lens.tolist() == [cache.length(s) for s in seqs]
    for i, seq in enumerate(seqs):
        row = layout.seq_slots()[i]
        assert torch.equal(row[row >= 0], cache.path_slots(seq))
    bytes_ = layout.kv_bytes(HEADS, DIM, cache.dtype)
    assert bytes_["shared"] < bytes_["unshared"]
    per_token = 2 * HEADS * DIM * 4
    assert bytes_["unshared"] == sum(cache.length(s) for s in seqs) * per_token
    assert bytes_["shared"] == (6 + 3 + 3 * 5 + (3 + 5) + 2) * per_token  # each node once


def test_fork_rejects_bad_n_and_dead_seqs():
    cache = make_cache()
    seq = cache.new_sequence()
    for n in (0, -2, 1.0, True):
        with pytest.raises(ValueError, match="n must be"):
            cache.fork(seq, n)
    assert not cache.is_forked(seq)
    with pytest.raises(ValueError, match="unknown sequence 7"):
        cache.fork(7, 2)
    cache.free(seq)
    with pytest.raises(ValueError, match=f"sequence {seq} was freed"):
        cache.fork(seq, 2)


# ---------------------------------------------------------------------------- free
def test_free_returns_blocks_only_when_unused():
    bs = 4
    cache = make_cache(num_blocks=12, block_size=bs)
    root = cache.new_sequence()
    append(cache, [root], [list(range(5))])     # 2 blocks
    kids = cache.fork(root, 2)
    append(cache, kids, [[10, 11], [20, 21]])   # 1 block each
    assert cache.num_free_blocks == 8
    cache.free(root)                            # the children still read the root's tokens
    assert cache.num_free_blocks == 8
    assert_reads_back(cache, kids[1], list(range(5)) + [20, 21])
    cache.free(kids[0])
    assert cache.num_free_blocks == 9
    assert sum(cache.block_refcount) == 3
    cache.free(kids[1])                         # last user: the root node goes too
    assert cache.num_free_blocks == 12 and cache.block_refcount == [0] * 12
    assert cache.sequences == []


def test_free_children_first_then_parent():
    cache = make_cache(num_blocks=8)
    root = cache.new_sequence()
    append(cache, [root], [[1, 2, 3]])
    kids = cache.fork(root, 3)
    append(cache, kids, [[4], [5], [6]])
    for kid in kids:
        cache.free(kid)
    assert cache.num_free_blocks == 7           # root still alive
    assert_reads_back(cache, root, [1, 2, 3])
    with pytest.raises(ValueError, match="forked"):
        cache.reserve([root])                   # still frozen: its KV was shared
    cache.free(root)
    assert cache.num_free_blocks == 8


@pytest.mark.parametrize("bad", [True, False, 1.0, torch.tensor(1.0), torch.tensor(True), None])
def test_sequence_ids_reject_bools_and_non_ints(bad):
    """``True`` used to be sequence 1 (``free(True)`` freed it) and ``1.0`` was looked up as 1."""
    cache = make_cache()
    seqs = [cache.new_sequence(), cache.new_sequence()]
    cache.reserve(seqs, 2)
    calls = {"free": cache.free, "length": cache.length, "parent": cache.parent,
             "is_forked": cache.is_forked, "path_slots": cache.path_slots,
             "gather": lambda s: cache.gather(0, s), "fork": lambda s: cache.fork(s, 2)}
    for what, call in calls.items():
        with pytest.raises(ValueError, match="seq must be an int sequence id"):
            call(bad)
    for seqs_arg in ([seqs[0], bad], (bad,), bad):
        with pytest.raises(ValueError, match="must be an int sequence id"):
            cache.reserve(seqs_arg)
        with pytest.raises(ValueError, match="must be an int sequence id"):
            cache.layout(seqs_arg)
    with pytest.raises(ValueError, match=r"seqs\[0\] must be an int sequence id"):
        cache.reserve(torch.tensor([False, True]))
    assert cache.sequences == seqs and [cache.length(s) for s in seqs] == [2, 2]
    assert cache.num_free_blocks == 14 and not cache.is_forked(1)


def test_sequence_ids_accept_numpy_and_integer_tensors():
    np = pytest.importorskip("numpy")
    cache = make_cache()
    a, b = cache.new_sequence(), cache.new_sequence()
    cache.reserve(np.array([a, b]), 1)
    cache.reserve(torch.tensor([a, b], dtype=torch.int32), 1)
    assert cache.length(np.int64(b)) == 2 and cache.length(torch.tensor(a)) == 2
    kids = cache.fork(np.int32(a), 2)
    assert cache.parent(kids[0]) == a and cache.is_forked(torch.tensor(a))
    cache.free(np.int64(b))
    assert cache.sequences == [a] + kids


def test_double_free_and_unknown_free():
    cache = make_cache()
    seq = cache.new_sequence()
    cache.reserve([seq], 2)
    cache.free(seq)
    with pytest.raises(ValueError, match=f"sequence {seq} was freed"):
        cache.free(seq)
    with pytest.raises(ValueError, match="unknown sequence 12345"):
        cache.free(12345)
    with pytest.raises(ValueError, match="unknown sequence -1"):
        cache.free(-1)
    for call in (cache.length, cache.path_slots, cache.parent, lambda s: cache.layout([s]),
                 lambda s: cache.gather(0, s)):
        with pytest.raises(ValueError, match="freed"):
            call(seq)
    assert cache.num_free_blocks == 16


def test_freed_ids_are_not_reused():
    cache = make_cache()
    a = cache.new_sequence()
    cache.free(a)
    b = cache.new_sequence()
    assert b != a and cache.sequences == [b]


# ---------------------------------------------------------------------------- cache full
def test_cache_full_changes_nothing():
    bs = 4
    cache = make_cache(num_blocks=6, block_size=bs)
    model = {}
    root = cache.new_sequence()
    model[root] = []
    append(cache, [root], [[1, 2, 3, 4, 5]], model)   # 2 blocks
    kids = cache.fork(root, 3)
    for kid in kids:
        model[kid] = list(model[root])
    append(cache, kids, [[10], [20], [30]], model)     # 3 blocks: 1 free left
    refcount, pool = cache.block_refcount, cache.k_pool.clone()
    lengths = {s: cache.length(s) for s in model}
    # kids[0] alone fits (3 more tokens in its block, then 1 new block); all three do not.
    for seqs, num_tokens in (([kids[0], kids[1], kids[2]], 4), ([kids[0]], 8), ([kids[2]], 100)):
        with pytest.raises(ak.CacheFullError, match="free"):
            cache.reserve(seqs, num_tokens=num_tokens)
        assert cache.num_free_blocks == 1 and cache.block_refcount == refcount
        assert {s: cache.length(s) for s in model} == lengths
        assert torch.equal(cache.k_pool, pool)
        for seq in model:
            assert_reads_back(cache, seq, model[seq])
    # The cache still works after the error, up to exactly full.
    append(cache, [kids[0]], [[11, 12, 13, 14, 15, 16, 17]], model)
    assert cache.num_free_blocks == 0
    assert_reads_back(cache, kids[0], model[kids[0]])
    assert issubclass(ak.CacheFullError, Exception)


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


# ---------------------------------------------------------------------------- write / gather
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_write_gather_roundtrip_dtypes(dtype):
    cache = make_cache(num_blocks=9, block_size=5, num_layers=3, dtype=dtype)
    model = {}
    root = cache.new_sequence()
    model[root] = []
    # Both sides round to the pool dtype the same way: the check is exact (fp32 tests keep
    # every token value distinct; here the point is the storage dtype).
    append(cache, [root], [list(range(7))], model)
    kids = cache.fork(root, 2)
    for kid in kids:
        model[kid] = list(model[root])
    append(cache, kids, [[50 + t for t in range(11)], [80 + t for t in range(11)]], model)
    for seq in model:
        assert_reads_back(cache, seq, model[seq])


def test_write_accepts_non_contiguous_k_v():
    cache = make_cache(num_blocks=4, block_size=3, num_layers=1)
    seq = cache.new_sequence()
    slots = cache.reserve([seq], 5)
    k_big, _ = token_kv(range(10))
    k = k_big[::2]                                    # [5, HEADS, DIM], stride 2 in T
    v = torch.randn(DIM, HEADS, 5).permute(2, 1, 0)   # [5, HEADS, DIM], fully permuted
    assert not k.is_contiguous() and not v.is_contiguous()
    cache.write(0, slots, k, v)
    got_k, got_v = cache.gather(0, seq)
    assert torch.equal(got_k, k) and torch.equal(got_v, v)
    # Non-contiguous slots too: the second half, reversed.
    cache.write(0, slots.flip(0), k, v)
    assert torch.equal(cache.gather(0, seq)[0], k.flip(0))


def test_write_rejects_bad_inputs_without_touching_the_pool():
    cache = make_cache(num_blocks=4, block_size=4, num_layers=2)
    seq = cache.new_sequence()
    slots = cache.reserve([seq], 3)
    k, v = token_kv([1, 2, 3])
    bad_calls = [
        ("layer", (2, slots, k, v)), ("layer", (-1, slots, k, v)), ("layer", (0.0, slots, k, v)),
        ("slots", (0, slots.int(), k, v)), ("slots", (0, slots.view(3, 1), k, v)),
        ("slots", (0, slots.tolist(), k, v)),
        ("k must have shape", (0, slots, k[:2], v)),
        ("v must have shape", (0, slots, k, v[..., :2])),
        ("k must have shape", (0, slots, k.reshape(3, HEADS * DIM), v)),
        ("k must have shape", (0, slots, k.transpose(1, 2), v)),
        ("k must have the pool's dtype", (0, slots, k.half(), v)),
        ("v must have the pool's dtype", (0, slots, k, v.double())),
        ("slots must lie in", (0, slots + 16 - 2, k, v)),
        ("slots must lie in", (0, slots - 1, k, v)),
        ("k must have shape", (0, slots, None, v)),
    ]
    for match, args in bad_calls:
        with pytest.raises(ValueError, match=match):
            cache.write(*args)
    assert not cache.k_pool.any() and not cache.v_pool.any()
    cache.write(1, slots, k, v)                       # the good call still works
    assert torch.equal(cache.gather(1, seq)[0], k) and not cache.k_pool[0].any()


def test_write_empty_and_gather_empty():
    cache = make_cache(num_layers=1)
    seq = cache.new_sequence()
    slots = cache.reserve([seq], 0)
    cache.write(0, slots, torch.empty(0, HEADS, DIM), torch.empty(0, HEADS, DIM))
    k, v = cache.gather(0, seq)
    assert k.shape == v.shape == (0, HEADS, DIM)
    assert cache.path_slots(seq).shape == (0,)
    with pytest.raises(ValueError, match="layer"):
        cache.gather(1, seq)


# ---------------------------------------------------------------------------- layout
def test_layout_shared_bytes_below_unshared_and_chunk_passthrough():
    cache = make_cache(num_blocks=64, block_size=4)
    root = cache.new_sequence()
    cache.reserve([root], 30)
    kids = cache.fork(root, 4)
    cache.reserve(kids, 3)
    layout = cache.layout(kids, kv_chunk_size=8)
    assert isinstance(layout, ak.TreeLayout)
    assert layout.kv_chunk_size == 8 and layout.num_seqs == 4
    assert layout.seq_lens.tolist() == [33] * 4
    bytes_ = layout.kv_bytes(HEADS, DIM, cache.dtype)
    assert bytes_["shared"] == (30 + 4 * 3) * 2 * HEADS * DIM * 4
    assert bytes_["unshared"] == 4 * 33 * 2 * HEADS * DIM * 4
    # The root node is split into ceil(30 / 8) chunks, each read once for all 4 children.
    root_items = [w for w in layout.work_info.tolist() if w[1] == 4]
    assert len(root_items) == 4
    assert cache.layout([]).num_seqs == 0


def test_layout_against_attention_reference():
    """The layout drives the torch tree attention to the same result as attending over gather."""
    torch.manual_seed(0)
    cache = make_cache(num_blocks=32, block_size=4, num_layers=1)
    root = cache.new_sequence()
    slots = cache.reserve([root], 9)
    cache.write(0, slots, torch.randn(9, HEADS, DIM), torch.randn(9, HEADS, DIM))
    kids = cache.fork(root, 3)
    slots = cache.reserve(kids, 2)
    cache.write(0, slots, torch.randn(6, HEADS, DIM), torch.randn(6, HEADS, DIM))
    seqs = [kids[2], root, kids[0]]
    q = torch.randn(len(seqs), 2 * HEADS, DIM)
    out = ak.tree_decode_attention(q, cache.k[0], cache.v[0], cache.layout(seqs), backend="torch")
    for i, seq in enumerate(seqs):
        k, v = cache.gather(0, seq)
        k = k.repeat_interleave(2, dim=1)              # GQA: q head h reads kv head h // 2
        v = v.repeat_interleave(2, dim=1)
        scores = torch.einsum("hd,thd->ht", q[i], k) * DIM ** -0.5
        expected = torch.einsum("ht,thd->hd", scores.softmax(-1), v)
        torch.testing.assert_close(out[i], expected, rtol=1e-5, atol=1e-5)


PLAN_TENSORS = ("work_info", "row_seq", "page_table", "merge_indptr", "merge_rows", "seq_lens")


def blocks_read(layout):
    """Per work item, the block ids it reads: what the kernels see through page_start, whether
    the layout concatenates its tables or reads the cache's device block tables by reference."""
    pages = layout.page_table.tolist()
    bs = layout.block_size
    return [pages[w[2] + w[3] // bs:w[2] + -(-w[4] // bs)] for w in layout.work_info.tolist()]


def assert_same_plan(a, b):
    """Two TreeLayouts hold the same plan: same inputs, same int32 tensors, same scalars, and
    work items that read the same blocks (page_start may point into different page tables)."""
    for name in ("paths", "node_block_tables", "node_lengths", "block_size", "kv_chunk_size",
                 "num_partials", "max_block_id", "max_seq_len", "max_q_len"):
        assert getattr(a, name) == getattr(b, name), name
    for name in PLAN_TENSORS:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype == torch.int32 and x.device == y.device, name
        assert x.is_contiguous(), name
        if name == "work_info":
            x, y = x[:, [0, 1, 3, 4, 5]], y[:, [0, 1, 3, 4, 5]]
        if name != "page_table":
            assert torch.equal(x, y), name
        # The tensors share one buffer; each slice keeps the 16-byte alignment Triton expects.
        assert x.numel() == 0 or x.data_ptr() % 16 == 0, name
    assert blocks_read(a) == blocks_read(b)


def test_layout_is_a_snapshot_of_the_step():
    """A layout keeps the blocks and lengths of the step it was built for, whatever the cache
    does afterwards (it must not alias the cache's growing block lists)."""
    cache = make_cache(num_blocks=64, block_size=4)
    root = cache.new_sequence()
    cache.reserve([root], 6)
    kids = cache.fork(root, 3)
    cache.reserve(kids, 4)
    layout = cache.layout(kids)
    before = ([list(t) for t in layout.node_block_tables], list(layout.node_lengths),
              blocks_read(layout), layout.seq_slots().clone())
    cache.reserve(kids, 5)   # every kid's node gets more tokens and a new block
    cache.free(kids[1])
    assert [list(t) for t in layout.node_block_tables] == before[0]
    assert layout.node_lengths == before[1]
    assert blocks_read(layout) == before[2]   # the device tables it reads by reference
    assert_same_plan(layout, ak.TreeLayout.from_paths(layout.paths, before[0], before[1], 4))
    assert_same_plan(layout.to("cpu"), layout)
    assert torch.equal(layout.seq_slots(), before[3])


@st.composite
def random_trees(draw):
    """A random tree of sequences, as a list of ops to replay on a cache."""
    ops = []
    num_live = 0
    for _ in range(draw(st.integers(1, 12))):
        kinds = ["new", "fork", "grow", "grow", "free"] if num_live else ["new"]
        kind = draw(st.sampled_from(kinds))
        if kind == "new":
            ops.append(("new",))
            num_live += 1
        elif kind == "fork":
            ops.append(("fork", draw(st.integers(0, 10**6)), draw(st.integers(1, 3))))
            num_live += ops[-1][2]
        elif kind == "grow":
            ops.append(("grow", draw(st.integers(0, 10**6)), draw(st.integers(0, 6))))
        else:
            ops.append(("free", draw(st.integers(0, 10**6))))
            num_live -= 1
    return ops, draw(st.integers(1, 5)), draw(st.randoms(use_true_random=False))


@settings(max_examples=60, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(random_trees())
def test_layout_seq_slots_match_path_slots(tree):
    ops, block_size, rng = tree
    cache = make_cache(num_blocks=200, block_size=block_size, num_layers=1)
    live, growable = [], []
    for op in ops:
        if op[0] == "new":
            seq = cache.new_sequence()
            live.append(seq)
            growable.append(seq)
        elif op[0] == "fork" and live:
            parent = live[op[1] % len(live)]
            kids = cache.fork(parent, op[2])
            if parent in growable:
                growable.remove(parent)
            live += kids
            growable += kids
        elif op[0] == "grow" and growable:
            cache.reserve([growable[op[1] % len(growable)]], op[2])
        elif op[0] == "free" and live:
            seq = live.pop(op[1] % len(live))
            if seq in growable:
                growable.remove(seq)
            cache.free(seq)
    seqs = rng.sample(live, k=len(live))
    if seqs:
        seqs.append(seqs[0])   # a sequence listed twice gets two identical rows
    layout = cache.layout(seqs, kv_chunk_size=2 * block_size)
    assert layout.seq_lens.tolist() == [cache.length(s) for s in seqs]
    # cache.layout plans without from_paths' checks: the plan must be the one from_paths makes.
    assert_same_plan(layout, ak.TreeLayout.from_paths(
        layout.paths, layout.node_block_tables, layout.node_lengths, block_size,
        kv_chunk_size=2 * block_size))
    seq_slots = layout.seq_slots()
    for i, seq in enumerate(seqs):
        row = seq_slots[i]
        expected = cache.path_slots(seq)
        assert torch.equal(row[: expected.numel()], expected)
        assert (row[expected.numel():] == -1).all()


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


# ---------------------------------------------------------------------------- CUDA
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_roundtrip_and_layout_device():
    cache = make_cache(num_blocks=16, block_size=4, dtype=torch.bfloat16, device="cuda")
    assert cache.device.type == "cuda"
    model = {}
    root = cache.new_sequence()
    model[root] = []
    slots = append(cache, [root], [list(range(6))], model)
    assert slots.device == cache.device
    kids = cache.fork(root, 2)
    for kid in kids:
        model[kid] = list(model[root])
    append(cache, kids, [[40, 41, 42], [60, 61, 62]], model)
    for seq in model:
        assert_reads_back(cache, seq, model[seq])
    assert cache.layout(kids).work_info.device == cache.device
    with pytest.raises(ValueError, match="slots must be on"):
        cache.write(0, slots.cpu(), *token_kv(range(6), torch.bfloat16, "cuda"))


# ------------------------------------------------------------------ device block tables
@pytest.mark.parametrize("seed", range(3))
def test_layout_reads_the_device_block_tables_by_reference(seed):
    """Layouts of many steps (forks, growth in place and by moving, unreserve, frees, fresh
    arenas) read the blocks from_paths would, from the cache's arena without copying the
    tables; a layout keeps reading its step's blocks while the cache goes on."""
    rng = random.Random(seed)
    cache = make_cache(num_blocks=40, block_size=2, num_layers=1)
    live = [cache.new_sequence()]
    cache.reserve(live, 3)
    arenas, kept = set(), []
    for step in range(60):
        action = rng.random()
        while cache.num_free_blocks < 12:    # keep room: free the oldest, restart when empty
            cache.free(live.pop(0))
            if not live:
                live = [cache.new_sequence()]
        growable = [s for s in live if not cache.is_forked(s)]
        if action < 0.15 and len(live) < 6:
            live += cache.fork(rng.choice(live), rng.randint(1, 2))
        elif action < 0.25 and len(live) > 1:
            cache.free(live.pop(rng.randrange(len(live))))
        elif action < 0.35 and growable:
            seq = rng.choice(growable)
            cache.reserve([seq], 3)
            cache.layout(live)               # a step whose forward fails:
            cache.unreserve([seq], 3)       # blocks popped, the arena copy must be rewritten
            other = [s for s in growable if s != seq]
            if other:                        # someone else takes the freed blocks first
                cache.reserve(other[:1], 3)
            cache.reserve([seq], 3)          # as many blocks as before, other ids
        growable = [s for s in live if not cache.is_forked(s)]
        try:
            cache.reserve(growable, rng.randint(1, 3))
        except ak.CacheFullError:
            pass
        layout = cache.layout(live)
        assert layout.page_table.untyped_storage().data_ptr() == \
            cache._tables.arena.untyped_storage().data_ptr()
        arenas.add(cache._tables.arena.untyped_storage().data_ptr())
        assert_same_plan(layout, ak.TreeLayout.from_paths(
            layout.paths, layout.node_block_tables, layout.node_lengths, 2))
        kept.append((layout, blocks_read(layout)))
        for old, read in kept:   # regions are never rewritten below what a layout reads
            assert blocks_read(old) == read
    assert len(arenas) > 1, "the test should also start fresh arenas"
