"""Paged decode attention and the LSE merge of attention states: every backend against the fp32
reference.

Without a GPU, Triton kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set before
anything imports triton). With a GPU the compiled kernels run unless TRITON_INTERPRET says
otherwise.
"""

import os

import torch  # importing torch does not import triton

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import a2r_kernels as ak  # noqa: E402
from a2r_kernels import reference  # noqa: E402

from _attention_helpers import (ATOL, DEVICE, KERNEL_BACKENDS, _backend_or_skip,  # noqa: E402
                                check_close, make_inputs)


# ------------------------------------------------------------------------------- paged decode
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype,bs,hq,hkv,d", [
    (torch.float16, 16, 8, 2, 64), (torch.bfloat16, 32, 4, 1, 128), (torch.float32, 16, 6, 3, 64)])
def test_paged_kernel_matches_reference(backend, dtype, bs, hq, hkv, d):
    _backend_or_skip(backend)
    g = torch.Generator().manual_seed(7)
    seq_lens = torch.tensor([0, 1, 17, 50, 33], dtype=torch.int32)
    max_blocks = 4 if bs == 16 else 2
    seq_lens = seq_lens.clamp(max=max_blocks * bs)
    nb = 5 * max_blocks + 1
    block_tables = torch.randperm(nb, generator=g)[:5 * max_blocks].reshape(5, max_blocks)
    block_tables = block_tables.to(torch.int32)
    q = torch.randn(5, hq, d, generator=g).to(dtype).to(DEVICE)
    k = torch.randn(nb, bs, hkv, d, generator=g).to(dtype).to(DEVICE)
    v = torch.randn(nb, bs, hkv, d, generator=g).to(dtype).to(DEVICE)
    out, lse = ak.paged_decode_attention(q, k, v, block_tables.to(DEVICE), seq_lens.to(DEVICE),
                                         backend=backend, return_lse=True)
    ref_out, ref_lse = reference.paged_decode_attention(q, k, v, block_tables.to(DEVICE),
                                                        seq_lens.to(DEVICE), d ** -0.5)
    check_close(out, lse, ref_out, ref_lse, dtype)
    # and it agrees with the tree op on the equivalent one-node-per-sequence layout
    tables = [block_tables[i].tolist() for i in range(5)]
    layout = ak.TreeLayout.from_paths([[i] for i in range(5)], tables, seq_lens.tolist(), bs, DEVICE)
    tree_out = ak.tree_decode_attention(q, k, v, layout, backend=backend)
    torch.testing.assert_close(tree_out.float(), out.float(), atol=ATOL[dtype], rtol=0)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_paged_several_splits_and_strided_tables(backend):
    """Rows longer than one 256-token split (so the LSE merge of splits runs, with empty trailing
    splits for short rows), block tables that are a strided view, GQA 3."""
    _backend_or_skip(backend)
    g = torch.Generator().manual_seed(9)
    bs, max_blocks, hq, hkv, d, dtype = 16, 37, 6, 2, 32, torch.float16   # 592 tokens: 3 splits
    seq_lens = torch.tensor([0, 1, 256, 257, 592, 300, 17], dtype=torch.int32)
    num_seqs = len(seq_lens)
    nb = num_seqs * max_blocks
    wide = torch.randperm(nb, generator=g).to(torch.int32).reshape(max_blocks, num_seqs)
    block_tables = wide.t()                    # [num_seqs, max_blocks], strides (1, num_seqs)
    assert not block_tables.is_contiguous()
    q = torch.randn(num_seqs, hq, d, generator=g).to(dtype).to(DEVICE)
    k = torch.randn(nb, bs, hkv, d, generator=g).to(dtype).to(DEVICE)
    v = torch.randn(nb, bs, hkv, d, generator=g).to(dtype).to(DEVICE)
    out, lse = ak.paged_decode_attention(q, k, v, block_tables.to(DEVICE), seq_lens.to(DEVICE),
                                         backend=backend, return_lse=True)
    ref_out, ref_lse = reference.paged_decode_attention(
        q, k, v, block_tables.contiguous().to(DEVICE), seq_lens.to(DEVICE), d ** -0.5)
    check_close(out, lse, ref_out, ref_lse, dtype)
    assert torch.isneginf(lse[0]).all() and (out[0] == 0).all()


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_paged_unchecked_lengths_stay_inside_the_table(backend):
    """check_bounds=False with seq_lens beyond max_blocks * block_size (or negative): the kernels
    read no further than the row's own blocks and agree with the reference, which clamps."""
    _backend_or_skip(backend)
    g = torch.Generator().manual_seed(8)
    q = torch.randn(3, 4, 32, generator=g).to(DEVICE)
    k = torch.randn(7, 16, 2, 32, generator=g).to(DEVICE)
    v = torch.randn(7, 16, 2, 32, generator=g).to(DEVICE)
    # The last row's table ends the tensor: reading past it is reading past the allocation.
    tables = torch.tensor([[0, 1], [2, 3], [4, 5]], dtype=torch.int32, device=DEVICE)
    lens = torch.tensor([33, -5, 10 ** 6], dtype=torch.int32, device=DEVICE)
    out, lse = ak.paged_decode_attention(q, k, v, tables, lens, backend=backend,
                                         return_lse=True, check_bounds=False)
    ref_out, ref_lse = ak.paged_decode_attention(q, k, v, tables, lens.clamp(0, 32),
                                                 backend="torch", return_lse=True)
    check_close(out, lse, ref_out, ref_lse, torch.float32)


def test_paged_bad_inputs():
    q = torch.randn(2, 4, 64)
    k = torch.randn(4, 16, 2, 64)
    tables = torch.zeros(2, 2, dtype=torch.int32)
    lens = torch.tensor([3, 5], dtype=torch.int32)
    with pytest.raises(ValueError, match="block_tables"):
        ak.paged_decode_attention(q, k, k, tables.long(), lens)
    with pytest.raises(ValueError, match="seq_lens"):
        ak.paged_decode_attention(q, k, k, tables, lens[:1])
    with pytest.raises(ValueError, match="seq_lens must lie"):
        ak.paged_decode_attention(q, k, k, tables, torch.tensor([3, 40], dtype=torch.int32))
    with pytest.raises(ValueError, match="block id"):
        ak.paged_decode_attention(q, k, k, torch.tensor([[0, 0], [9, 0]], dtype=torch.int32), lens)


# ------------------------------------------------------------------------------- merge
@pytest.mark.parametrize("backend", ["torch"] + KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_merge_states_is_attention_over_union(backend, dtype):
    """Attention over keys A u B == merge(attention over A, attention over B)."""
    _backend_or_skip(backend)
    paths_a = [[0], [1], [2], [1]]   # row 1: A empty; row 2: B empty; row 3: both empty
    tables = [[0], [1], [2], [3]]
    lengths_a = [5, 0, 9, 0]
    q, k, v = make_inputs(paths_a, 4, 16, 4, 2, 64, dtype, 1)
    lay_a = ak.TreeLayout.from_paths(paths_a, tables, lengths_a, 16, DEVICE)
    lay_b = ak.TreeLayout.from_paths([[3], [3], [1], [1]], tables, [0, 0, 0, 7], 16, DEVICE)
    lay_ab = ak.TreeLayout.from_paths([[0, 3], [1, 3], [2, 1], [1]], tables, [5, 0, 9, 7], 16,
                                      DEVICE)
    out_a, lse_a = ak.tree_decode_attention(q, k, v, lay_a, backend="torch", return_lse=True)
    out_b, lse_b = ak.tree_decode_attention(q, k, v, lay_b, backend="torch", return_lse=True)
    want, want_lse = ak.tree_decode_attention(q, k, v, lay_ab, backend="torch", return_lse=True)
    out, lse = ak.merge_attention_states(out_a, lse_a, out_b, lse_b, backend=backend)
    check_close(out, lse, want, want_lse, dtype)
    assert torch.all(lse[3] == float("-inf")) and torch.all(out[3] == 0)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the NaN payloads
@pytest.mark.parametrize("backend", ["torch"] + KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_merge_states_ignores_the_payload_of_empty_states(backend, dtype):
    """An empty state (lse -inf) contributes nothing, even when its out holds NaN / inf: row 0 a
    empty, row 1 b empty, row 2 both empty (out 0, lse -inf), row 3 both non-empty."""
    _backend_or_skip(backend)
    gen = torch.Generator().manual_seed(5)
    out_a = torch.randn(4, 3, 7, generator=gen).to(dtype)
    out_b = torch.randn(4, 3, 7, generator=gen).to(dtype)
    lse_a = torch.randn(4, 3, generator=gen) * 3
    lse_b = torch.randn(4, 3, generator=gen) * 3
    lse_a[[0, 2]] = float("-inf")
    lse_b[[1, 2]] = float("-inf")
    out_a[[0, 2]] = float("nan")
    out_b[1] = float("inf")
    out_b[2] = float("nan")
    args = [t.to(DEVICE) for t in (out_a, lse_a, out_b, lse_b)]
    out, lse = ak.merge_attention_states(*args, backend=backend)
    out, lse = out.cpu(), lse.cpu()
    assert not out.isnan().any() and not lse.isnan().any()
    assert torch.equal(out[0], out_b[0]) and torch.equal(lse[0], lse_b[0])
    assert torch.equal(out[1], out_a[1]) and torch.equal(lse[1], lse_a[1])
    assert torch.all(out[2] == 0) and torch.all(lse[2] == float("-inf"))
    w_a = torch.exp(lse_a[3] - torch.logaddexp(lse_a[3], lse_b[3]))[..., None]
    want = w_a * out_a[3].float() + (1 - w_a) * out_b[3].float()
    torch.testing.assert_close(out[3].float(), want, atol=ATOL[dtype], rtol=0)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the NaN payloads
def test_triton_merge_partials_ignores_the_payload_of_empty_rows():
    """The tree kernels' per-sequence merge: a partial row with lse -inf and NaN o adds nothing;
    a sequence whose rows are all empty gets out 0 and lse -inf."""
    from a2r_kernels.triton import attention as triton_attention
    gen = torch.Generator().manual_seed(3)
    partial_o = torch.randn(6, 2, 16, generator=gen)
    partial_lse = torch.randn(6, 2, generator=gen)
    partial_lse[[1, 4, 5]] = float("-inf")
    partial_o[[1, 4, 5]] = float("nan")
    indptr = torch.tensor([0, 3, 3, 5, 6], dtype=torch.int32)
    rows = torch.tensor([0, 4, 2, 3, 1, 5], dtype=torch.int32)   # seq 1: no rows; seq 3: empty only
    partial_o, partial_lse, indptr, rows = (t.to(DEVICE) for t in (partial_o, partial_lse, indptr,
                                                                   rows))
    out = torch.empty(4, 2, 16, dtype=torch.float32, device=DEVICE)
    lse = torch.empty(4, 2, device=DEVICE)
    triton_attention.merge_partials(partial_o, partial_lse, indptr, rows, out, lse)
    out, lse = out.cpu(), lse.cpu()
    assert not out.isnan().any() and not lse.isnan().any()
    for seq in (1, 3):
        assert torch.all(out[seq] == 0) and torch.all(lse[seq] == float("-inf"))
    for seq, live in ((0, [0, 2]), (2, [3])):
        want_lse = torch.logsumexp(partial_lse[live].cpu(), dim=0)
        weights = torch.exp(partial_lse[live].cpu() - want_lse)[..., None]
        torch.testing.assert_close(lse[seq], want_lse, atol=1e-5, rtol=0)
        torch.testing.assert_close(out[seq], (weights * partial_o[live].cpu()).sum(0), atol=1e-5,
                                   rtol=0)


def test_merge_bad_inputs():
    o = torch.randn(2, 4, 8)
    lse = torch.randn(2, 4)
    with pytest.raises(ValueError, match="lse_b"):
        ak.merge_attention_states(o, lse, o, lse.half())
    with pytest.raises(ValueError, match="out_b"):
        ak.merge_attention_states(o, lse, o[:1], lse)
