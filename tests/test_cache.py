"""TreeKVCache: zero-copy forks, refcounted frees, reserve/write/gather roundtrips, a full cache.

Every test writes a unique value per token (its global token id, per layer and for K and V) and
checks what each sequence reads back against a plain-Python model of its token list.
"""

import math

import pytest
import torch

import a2r_kernels as ak

from _cache_helpers import DIM, HEADS, append, assert_reads_back, make_cache, token_kv


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
