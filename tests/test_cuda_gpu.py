"""The CUDA kernels (a2r_kernels._C) on a GPU against the fp32 torch reference: tree decode over
random trees and odd shapes (lengths 0/1/17/50, GQA 1/2/4/8, head_dim 64/128 and odd ones,
fp16/bf16/fp32, block sizes 16/32, non-contiguous inputs), paged decode, the LSE merge, and
denoise_step (V 1000/50257, L=1, all/none masked, ties, thresholds, forced splits, sampling).
Every test here needs a CUDA device and the built extension, and skips without them.
"""

import random

import pytest
import torch

import a2r_kernels as ak
from a2r_kernels import _cuda_ops, reference_denoise
from a2r_kernels.backend import cuda_extension

HAS_GPU = torch.cuda.is_available()
EXT = cuda_extension()
needs_gpu = pytest.mark.skipif(not HAS_GPU or EXT is None,
                               reason="needs a CUDA device and the built a2r_kernels._C")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Output tolerance vs the fp32 reference: both read the same low-precision inputs and accumulate
# in fp32; the output is rounded once to the dtype (fp16: 2^-11, bf16: 2^-8 relative).
OUT_TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
LSE_TOL = 2e-5


# ------------------------------------------------------------------------------ GPU helpers
def random_tree(rng: random.Random, num_nodes: int, lengths: list[int], block_size: int,
                num_blocks: int):
    """A random tree of ``num_nodes`` nodes (node 0 the root) with block tables drawn from a
    shuffled pool; returns (paths root->leaf, node_block_tables, node_lengths)."""
    parent = [-1] + [rng.randrange(0, j) for j in range(1, num_nodes)]
    node_lengths = [rng.choice(lengths) for _ in range(num_nodes)]
    free = list(range(num_blocks))
    rng.shuffle(free)
    tables = []
    for length in node_lengths:
        need = -(-length // block_size) + rng.randrange(0, 2)  # sometimes one spare block
        tables.append([free.pop() for _ in range(need)])
    children = {j: [] for j in range(num_nodes)}
    for j in range(1, num_nodes):
        children[parent[j]].append(j)
    paths = []
    for leaf in (j for j in range(num_nodes) if not children[j]):
        path, node = [], leaf
        while node != -1:
            path.append(node)
            node = parent[node]
        paths.append(path[::-1])
    rng.shuffle(paths)
    return paths, tables, node_lengths


def _pool(num_blocks, block_size, num_kv_heads, head_dim, dtype, gen, strided: bool):
    """K/V pools; ``strided`` gives views with padded heads (odd strides, unaligned rows)."""
    shape = (num_blocks, block_size, num_kv_heads, head_dim + (3 if strided else 0))
    k = torch.randn(shape, generator=gen).to(dtype)
    v = torch.randn(shape, generator=gen).to(dtype)
    if strided:
        k, v = k[..., 1:head_dim + 1], v[..., 1:head_dim + 1]
    return k.cuda(), v.cuda()


def _check_attention(out, lse, ref_out, ref_lse, dtype):
    tol = OUT_TOL[dtype]
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    torch.testing.assert_close(out.float(), ref_out.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(lse, ref_lse, atol=LSE_TOL, rtol=LSE_TOL)


TREE_CASES = [
    # (seed, num_nodes, block_size, num_kv_heads, group, head_dim, kv_chunk)
    (0, 1, 16, 2, 1, 64, None),
    (1, 5, 16, 2, 2, 64, 32),
    (2, 9, 32, 1, 4, 128, None),
    (3, 12, 16, 2, 8, 128, 48),
    (4, 7, 32, 3, 2, 96, 32),
    (5, 6, 16, 1, 8, 256, 64),
    (6, 8, 16, 2, 4, 40, 16),
    (7, 20, 32, 1, 8, 64, 64),   # many leaves x G=8: several 16-row tiles per work item
]


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", TREE_CASES, ids=lambda c: f"seed{c[0]}")
@pytest.mark.parametrize("strided", [False, True], ids=["contig", "strided"])
def test_tree_decode_matches_reference(case, dtype, strided):
    seed, num_nodes, block_size, num_kv_heads, group, head_dim, chunk = case
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    num_blocks = num_nodes * 6 + 4
    paths, tables, lengths = random_tree(rng, num_nodes, [0, 1, 17, 50], block_size, num_blocks)
    layout = ak.TreeLayout.from_paths(paths, tables, lengths, block_size, "cuda",
                                      kv_chunk_size=chunk)
    num_q_heads = num_kv_heads * group
    k, v = _pool(num_blocks, block_size, num_kv_heads, head_dim, dtype, gen, strided)
    q = torch.randn(len(paths), num_q_heads, head_dim + 5, generator=gen).to(dtype).cuda()
    q = q[..., 2:head_dim + 2] if strided else q[..., :head_dim].contiguous()
    out, lse = ak.tree_decode_attention(q, k, v, layout, backend="cuda", return_lse=True)
    ref_out, ref_lse = ak.tree_decode_attention(q, k, v, layout, backend="torch",
                                                return_lse=True)
    _check_attention(out, lse, ref_out, ref_lse, dtype)


@needs_gpu
def test_tree_decode_empty_paths_and_sm_scale():
    """Paths of only empty nodes get out 0 / lse -inf; a custom sm_scale is honoured."""
    gen = torch.Generator().manual_seed(11)
    paths = [[0, 1], [0, 2], [3]]
    tables = [[0, 1], [2], [], []]
    lengths = [17, 1, 0, 0]
    layout = ak.TreeLayout.from_paths(paths, tables, lengths, 16, "cuda")
    k, v = _pool(4, 16, 2, 64, torch.float32, gen, False)
    q = torch.randn(3, 4, 64, generator=gen).cuda()
    out, lse = ak.tree_decode_attention(q, k, v, layout, sm_scale=0.3, backend="cuda",
                                        return_lse=True)
    ref_out, ref_lse = ak.tree_decode_attention(q, k, v, layout, sm_scale=0.3, backend="torch",
                                                return_lse=True)
    _check_attention(out, lse, ref_out, ref_lse, torch.float32)
    pos = paths.index([3])
    assert torch.all(out[pos] == 0) and torch.all(lse[pos] == float("-inf"))


@needs_gpu
def test_tree_decode_any_q_and_out_strides():
    """q with a non-unit head_dim stride and a strided out= (valid public inputs) on the real
    kernels: the op hands _C unit-stride copies and writes back through the view."""
    gen = torch.Generator().manual_seed(12)
    paths, tables, lengths = [[0, 1], [0, 2]], [[0, 1], [2], [3]], [20, 9, 5]
    layout = ak.TreeLayout.from_paths(paths, tables, lengths, 16, "cuda")
    k, v = _pool(4, 16, 2, 64, torch.bfloat16, gen, False)
    q = torch.randn(64, 4, 2, generator=gen).to(torch.bfloat16).cuda().permute(2, 1, 0)
    out_buffer = torch.zeros(2, 4, 64, 3, dtype=torch.bfloat16, device="cuda")
    out, lse = ak.tree_decode_attention(q, k, v, layout, backend="cuda", return_lse=True,
                                        out=out_buffer[..., 1])
    ref_out, ref_lse = ak.tree_decode_attention(q, k, v, layout, backend="torch",
                                                return_lse=True)
    _check_attention(out, lse, ref_out, ref_lse, torch.bfloat16)
    assert torch.all(out_buffer[..., 0] == 0) and torch.all(out_buffer[..., 2] == 0)


@needs_gpu
def test_tree_decode_zero_sequences():
    layout = ak.TreeLayout.from_paths([], [[0]], [5], 16, "cuda")
    q = torch.zeros(0, 2, 64, device="cuda")
    k = torch.randn(1, 16, 2, 64, device="cuda")
    out = ak.tree_decode_attention(q, k, k, layout, backend="cuda")
    assert out.shape == (0, 2, 64)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (8, 1)], ids=lambda h: f"hq{h[0]}hkv{h[1]}")
@pytest.mark.parametrize("head_dim", [64, 128])
def test_paged_decode_matches_reference(dtype, block_size, heads, head_dim):
    num_q_heads, num_kv_heads = heads
    gen = torch.Generator().manual_seed(block_size + head_dim)
    seq_lens = torch.tensor([0, 1, 17, 50, 300], dtype=torch.int32)
    max_blocks = -(-int(seq_lens.max()) // block_size)
    num_blocks = len(seq_lens) * max_blocks
    block_tables = torch.randperm(num_blocks, generator=gen).to(torch.int32)
    block_tables = block_tables.view(len(seq_lens), max_blocks).cuda()
    k, v = _pool(num_blocks, block_size, num_kv_heads, head_dim, dtype, gen, False)
    q = torch.randn(len(seq_lens), num_q_heads, head_dim, generator=gen).to(dtype).cuda()
    seq_lens = seq_lens.cuda()
    out, lse = ak.paged_decode_attention(q, k, v, block_tables, seq_lens, backend="cuda",
                                         return_lse=True)
    ref_out, ref_lse = ak.paged_decode_attention(q, k, v, block_tables, seq_lens,
                                                 backend="torch", return_lse=True)
    _check_attention(out, lse, ref_out, ref_lse, dtype)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [1, 64, 100])
def test_merge_states_matches_reference(dtype, head_dim):
    gen = torch.Generator().manual_seed(head_dim)
    num_seqs, num_heads = 7, 3
    out_a = torch.randn(num_seqs, num_heads, head_dim + 4, generator=gen).to(dtype).cuda()
    out_a = out_a[..., :head_dim]                                   # non-contiguous
    out_b = torch.randn(num_seqs, num_heads, head_dim, generator=gen).to(dtype).cuda()
    lse_a = (torch.randn(num_seqs, num_heads, generator=gen) * 4).cuda()
    lse_b = (torch.randn(num_heads, num_seqs, generator=gen) * 4).cuda().t()  # strided
    lse_a[0, :] = float("-inf")            # a empty
    lse_b[1, :] = float("-inf")            # b empty
    lse_a[2, :] = float("-inf")            # both empty
    lse_b[2, :] = float("-inf")
    out_a[0] = float("nan")                # an empty state's payload is never read into out
    out_b[1] = float("nan")
    out_a[2] = out_b[2] = float("nan")
    out, lse = ak.merge_attention_states(out_a, lse_a, out_b, lse_b, backend="cuda")
    ref_out, ref_lse = ak.merge_attention_states(out_a, lse_a, out_b, lse_b, backend="torch")
    _check_attention(out, lse, ref_out, ref_lse, dtype)
    assert not out.isnan().any() and not ref_out.isnan().any()
    assert torch.all(out[2] == 0) and torch.all(lse[2] == float("-inf"))


@needs_gpu
def test_merge_partials_direct_with_empty_rows():
    """merge_partials straight: a sequence without rows, rows with -inf lse, strided out."""
    gen = torch.Generator().manual_seed(3)
    partial_o = torch.randn(6, 2, 32, generator=gen).cuda()
    partial_lse = torch.randn(6, 2, generator=gen).cuda()
    partial_lse[4] = float("-inf")
    partial_o[4] = float("nan")            # an empty state's o must never be read into out
    indptr = torch.tensor([0, 3, 3, 6], dtype=torch.int32, device="cuda")
    rows = torch.tensor([0, 4, 2, 1, 3, 5], dtype=torch.int32, device="cuda")
    out = torch.empty(3, 2, 40, dtype=torch.float16, device="cuda")[..., :32]
    lse = torch.empty(3, 2, device="cuda")
    _cuda_ops.merge_partials(partial_o, partial_lse, indptr, rows, out, lse)
    for i in range(3):
        sel = rows[indptr[i]:indptr[i + 1]].long()
        expect_lse = torch.logsumexp(partial_lse[sel], dim=0) if len(sel) else \
            torch.full((2,), float("-inf"), device="cuda")
        assert torch.allclose(lse[i], expect_lse, atol=1e-5)
        if len(sel):
            weights = torch.exp(partial_lse[sel] - expect_lse)[..., None]
            expect = torch.nan_to_num(weights * partial_o[sel], nan=0.0).sum(0)
        else:
            expect = torch.zeros(2, 32, device="cuda")
        torch.testing.assert_close(out[i].float(), expect, atol=2e-3, rtol=2e-3)


# ------------------------------------------------------------------------------ denoise
MASK_ID = 3


def _denoise_case(batch, length, vocab, dtype, masked_fraction, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(batch, length, vocab, generator=gen) * 3).to(dtype)
    tokens = torch.randint(0, vocab, (batch, length), generator=gen)
    tokens[tokens == MASK_ID] = MASK_ID + 1
    tokens[torch.rand(batch, length, generator=gen) < masked_fraction] = MASK_ID
    return logits.cuda(), tokens.cuda()


def _both(logits, tokens, seed=77, **kwargs):
    results = {}
    for backend in ("cuda", "torch"):
        updated = tokens.clone()
        res = ak.denoise_step(logits, updated, MASK_ID, backend=backend,
                              generator=torch.Generator().manual_seed(seed), **kwargs)
        results[backend] = (res, updated)
    return results["cuda"], results["torch"]


def _check_denoise(got, want, exact_x0=True):
    (res, tokens), (ref, ref_tokens) = got, want
    if exact_x0:
        assert torch.equal(res.x0, ref.x0)
    else:  # Gumbel keys may round differently in the last bit: allow rare flips
        assert (res.x0 == ref.x0).float().mean() >= 0.99
    masked = torch.isfinite(ref.confidence)
    assert torch.equal(torch.isfinite(res.confidence), masked)
    same = res.x0 == ref.x0
    torch.testing.assert_close(res.confidence[same], ref.confidence[same], atol=2e-5, rtol=1e-4)
    if exact_x0:
        assert torch.equal(res.transferred, ref.transferred)
        assert torch.equal(tokens, ref_tokens)
    else:
        assert torch.equal(res.transferred.sum(1), ref.transferred.sum(1))


def test_denoise_split_policy():
    """V is split only where B * L leaves the SMs idle, and never below 8 loop iterations per split."""
    # the target shape: 2048 positions fill 132 SMs by themselves
    assert _cuda_ops.denoise_num_splits(8 * 256, 126464, 2, 132) == 1
    # one position of a 126k bf16 vocabulary: 126464 / (8 x 256 x 8) -> 8 splits at most
    assert _cuda_ops.denoise_num_splits(1, 126464, 2, 132) == 8
    assert _cuda_ops.denoise_num_splits(1, 126464, 4, 132) == 16     # fp32: 4 logits per group
    assert _cuda_ops.denoise_num_splits(32, 151936, 2, 132) == 10    # wanted 33, at most 10
    assert _cuda_ops.denoise_num_splits(200, 151936, 2, 132) == 6    # 8 * 132 / 200 -> 6
    assert _cuda_ops.denoise_num_splits(3, 1000, 2, 132) == 1        # small V: one split
    assert _cuda_ops.denoise_num_splits(0, 1000, 2, 132) == 1


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_splits", [2, 7])
@pytest.mark.parametrize("remasking", ["low_confidence", "margin", "entropy"])
def test_denoise_forced_splits_match_reference(dtype, num_splits, remasking):
    """V split across CTAs (partial states merged by the combine kernel) on small vocabularies,
    with more splits than groups for V = 9, a tie for the max across splits, unmasked positions."""
    for vocab in (9, 1000, 5003):
        logits, tokens = _denoise_case(2, 7, vocab, dtype, 0.7, seed=vocab + num_splits)
        logits[0, 0, [vocab // 3, vocab - 1]] = 50.0   # tie across splits -> lower index
        tokens[0, 0] = MASK_ID
        num_transfer = torch.tensor([2, 3], device="cuda")
        want_tokens = tokens.clone()
        want = ak.denoise_step(logits, want_tokens, MASK_ID, num_transfer=num_transfer,
                               remasking=remasking, backend="torch")
        x0 = torch.empty(2, 7, dtype=torch.int64, device="cuda")
        confidence = torch.empty(2, 7, device="cuda")
        transferred = torch.empty(2, 7, dtype=torch.bool, device="cuda")
        got_tokens = tokens.clone()
        _cuda_ops.denoise_step(logits, got_tokens, MASK_ID, num_transfer, None, 0.0, remasking, 0,
                               x0, confidence, transferred, num_splits=num_splits)
        assert torch.equal(x0, want.x0), vocab
        assert int(x0[0, 0]) == vocab // 3
        torch.testing.assert_close(confidence, want.confidence, atol=2e-5, rtol=1e-4)
        assert torch.equal(got_tokens, want_tokens)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("remasking", ["low_confidence", "margin", "entropy", "random"])
@pytest.mark.parametrize("shape", [(2, 17, 1000), (1, 1, 50257), (3, 5, 50257), (4, 1, 1)],
                         ids=lambda s: "x".join(map(str, s)))
def test_denoise_matches_reference_topk(dtype, remasking, shape):
    logits, tokens = _denoise_case(*shape, dtype, 0.7, seed=sum(shape))
    num_transfer = torch.tensor([0, 1, 4, 100][:shape[0]], device="cuda")
    _check_denoise(*_both(logits, tokens, num_transfer=num_transfer, remasking=remasking))


@needs_gpu
@pytest.mark.parametrize("temperature", [0.5, 1.0])
@pytest.mark.parametrize("vocab", [1000, 50257])
def test_denoise_gumbel_sampling_matches_reference(temperature, vocab):
    logits, tokens = _denoise_case(2, 9, vocab, torch.float32, 1.0, seed=vocab)
    got, want = _both(logits, tokens, num_transfer=3, temperature=temperature)
    _check_denoise(got, want, exact_x0=False)


@needs_gpu
@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.9, 2.0])
def test_denoise_threshold_mode(threshold):
    logits, tokens = _denoise_case(3, 33, 1000, torch.float32, 0.6, seed=5)
    logits[0, :5] *= 8  # a few very confident positions
    got, want = _both(logits, tokens, threshold=threshold)
    _check_denoise(got, want)
    assert (got[0].transferred.sum(1) >= (tokens == MASK_ID).sum(1).clamp(max=1)).all()


@needs_gpu
@pytest.mark.parametrize("fraction", [0.0, 1.0], ids=["none_masked", "all_masked"])
def test_denoise_all_or_none_masked(fraction):
    logits, tokens = _denoise_case(2, 20, 1000, torch.bfloat16, fraction, seed=9)
    _check_denoise(*_both(logits, tokens, num_transfer=7))


@needs_gpu
def test_denoise_ties_go_to_lower_positions_and_index():
    """Identical rows -> identical confidences (ties by position); repeated max logit -> lowest v."""
    row = torch.randn(1000)
    row[[10, 500]] = row.max() + 1  # tie for the argmax
    logits = row.repeat(2, 12, 1).cuda()
    tokens = torch.full((2, 12), MASK_ID, device="cuda")
    tokens[1, ::3] = 5
    got, want = _both(logits, tokens, num_transfer=torch.tensor([4, 2], device="cuda"))
    _check_denoise(got, want)
    res, _ = got
    assert torch.all(res.x0[tokens == MASK_ID] == 10)
    assert res.transferred[0].nonzero().flatten().tolist() == [0, 1, 2, 3]


@needs_gpu
def test_denoise_noncontiguous_and_unmasked_logits_never_read():
    gen = torch.Generator().manual_seed(2)
    full = torch.randn(3, 14, 1003, generator=gen).cuda()
    logits = full[:, ::2, 1:1001]                 # odd row strides, unaligned rows
    tokens_full = torch.full((3, 14), MASK_ID, device="cuda")
    tokens = tokens_full[:, 1::2]                 # strided, updated in place through the view
    tokens[:, 0] = 11
    logits[:, 0] = float("nan")                   # unmasked positions: never read
    ref_tokens = tokens.clone()
    ref = ak.denoise_step(logits, ref_tokens, MASK_ID, num_transfer=2, remasking="margin",
                          backend="torch")
    res = ak.denoise_step(logits, tokens, MASK_ID, num_transfer=2, remasking="margin",
                          backend="cuda")
    assert not torch.isnan(res.confidence).any()
    assert torch.all(res.x0[:, 0] == 11) and torch.all(res.confidence[:, 0] == float("-inf"))
    _check_denoise((res, tokens), (ref, ref_tokens))
    assert torch.all(tokens_full[:, 0::2] == MASK_ID)   # the other columns are untouched


@needs_gpu
def test_denoise_random_scores_bitwise_match_the_reference_stream():
    """The "random" score is Philox counter (0, pos, 1, 0) of the seed: same bits as the spec."""
    logits, tokens = _denoise_case(2, 40, 64, torch.float32, 1.0, seed=1)
    x0 = torch.empty_like(tokens)
    conf = torch.empty(2, 40, device="cuda")
    transferred = torch.empty(2, 40, dtype=torch.bool, device="cuda")
    seed = 0x1234_5678_9ABC
    _cuda_ops.denoise_step(logits, tokens.clone(), MASK_ID, None, 2.0, 0.0, "random", seed, x0,
                           conf, transferred)
    expect = reference_denoise.random_scores(seed, 2, 40, "cuda")
    assert torch.equal(conf, expect)
