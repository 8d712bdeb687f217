"""The CUDA backend (a2r_kernels._C from csrc/, wrapped by a2r_kernels._cuda_ops).

Without a GPU (CI) only the build and input-checking tests run: the extension must import
whenever nvcc was available at install time, its functions must fail cleanly (no crash) without a
device, and the wrappers must reject bad tensors with ValueError. With a GPU the kernels are
compared against the fp32 torch reference over odd shapes (lengths 0/1/17/50, random trees,
GQA 1/2/4/8, head_dim 64/128 and odd ones, fp16/bf16/fp32, block sizes 16/32, non-contiguous
inputs; denoise: V 1000/50257, L=1, all/none masked, ties, thresholds).
"""

from __future__ import annotations

import math
import os
import random
from pathlib import Path

import pytest
import torch
from torch.utils.dlpack import to_dlpack

import a2r_kernels as ak
from a2r_kernels import _cuda_ops, reference_denoise
from a2r_kernels import vocab as _vocab
from a2r_kernels.backend import cuda_extension

from _fake_dlpack import fake_cuda
from _helpers import huge_finite_logits

try:   # host builds of the kernels' code (csrc/testing_bindings.cpp), written next to the tests
    import _C_testing as TESTING
except ImportError:
    TESTING = None

HAS_GPU = torch.cuda.is_available()
EXT = cuda_extension()
needs_gpu = pytest.mark.skipif(not HAS_GPU or EXT is None,
                               reason="needs a CUDA device and the built a2r_kernels._C")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Output tolerance vs the fp32 reference: both read the same low-precision inputs and accumulate
# in fp32; the output is rounded once to the dtype (fp16: 2^-11, bf16: 2^-8 relative).
OUT_TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
LSE_TOL = 2e-5


# ------------------------------------------------------------------------------ build / CPU
def test_extension_imports_when_nvcc_was_available():
    """A build that silently skipped csrc/ (or a compile error swallowed) fails here in CI
    (which forces the build with A2R_BUILD_CUDA=1). setup.py's own rule says when it is due."""
    import runpy

    setup = runpy.run_path(str(Path(__file__).resolve().parents[1] / "setup.py"),
                           run_name="a2r_setup")
    expected, why = setup["cuda_build_decision"](os.environ.get("A2R_BUILD_CUDA", ""),
                                                 setup["find_nvcc"](), setup["gpu_visible"])
    if not expected:
        pytest.skip(f"the extension is not expected: {why}")
    import a2r_kernels._C as ext  # noqa: F401  (must not raise)

    assert ext.cuda_runtime_version() >= 11000
    assert set(ext.PUBLIC_OPS) == {"tree_decode_attention", "paged_decode_attention",
                                   "merge_attention_states", "denoise_step"}
    assert ext.MAX_HEAD_DIM == _cuda_ops.MAX_HEAD_DIM
    import _C_testing  # noqa: F401  (the test-only host build comes with it)


@pytest.mark.skipif(EXT is None, reason="a2r_kernels._C not built")
def test_extension_constants_equal_the_vocabulary():
    """csrc/ops.h defines the kernels' constants once and _C exports them; the Python side reads
    a2r_kernels/vocab.py (also without the extension): the two must agree."""
    assert EXT.MAX_HEAD_DIM == _vocab.MAX_HEAD_DIM
    assert EXT.WORK_INFO_COLUMNS == _vocab.WORK_INFO_COLUMNS
    assert dict(EXT.REMASKING_CODES) == _vocab.REMASKING_CODES


@pytest.mark.skipif(EXT is None, reason="a2r_kernels._C not built")
def test_extension_exposes_no_test_entry_points():
    """Host builds of kernel code for the tests live in tests/_C_testing, not in the package."""
    assert not {"philox_uniform", "denoise_predict_row_host"} & set(dir(EXT))


@pytest.mark.skipif(EXT is None, reason="a2r_kernels._C not built")
def test_extension_without_device_fails_cleanly():
    """Static cudart: importing needs no driver; calling without a device raises RuntimeError
    (valid CUDA-looking views get past the boundary's checks to the runtime, which fails)."""
    count = EXT.device_count()
    assert isinstance(count, int) and count >= 0
    if count > 0:
        pytest.skip("a device is present")
    rows, lse = (lambda: fake_cuda([2, 3, 8])), (lambda: fake_cuda([2, 3]))
    with pytest.raises(RuntimeError, match="cuda"):
        EXT.merge_states(rows(), lse(), rows(), lse(), rows(), lse(), 0)


def _partials_args(**changes):
    """Valid tree_attention_partials arguments (S=3, Hq=4, Hkv=2, D=64, 5 blocks of 16, W=2,
    R=6), as fake CUDA DLPack capsules, with ``changes`` (name -> capsule) applied."""
    args = dict(q=fake_cuda([3, 4, 64], "float16"), k_cache=fake_cuda([5, 16, 2, 64], "float16"),
                v_cache=fake_cuda([5, 16, 2, 64], "float16"),
                work_info=fake_cuda([2, _vocab.WORK_INFO_COLUMNS], "int32"),
                row_seq=fake_cuda([3], "int32"), page_table=fake_cuda([5], "int32"),
                partial_o=fake_cuda([6, 4, 64]), partial_lse=fake_cuda([6, 4]),
                sm_scale=0.125, stream=0)
    return {**args, **changes}


PARTIALS_REJECTED = [
    (dict(q=None), "q must be a tensor"),
    (dict(q=to_dlpack(torch.zeros(3, 4, 64, dtype=torch.float16))), "q must be a CUDA tensor"),
    (dict(q=torch.zeros(3, 4, 64, dtype=torch.float16)), "q must be a tensor"),
    (dict(q=torch.zeros(3, 4, 64).__dlpack__(max_version=(1, 0))), "q must be a CUDA tensor"),
    (dict(q=fake_cuda([3, 4, 300], "float16"), k_cache=fake_cuda([5, 16, 2, 300], "float16"),
          v_cache=fake_cuda([5, 16, 2, 300], "float16"), partial_o=fake_cuda([6, 4, 300])),
     rf"q must have head_dim \(shape\[2\]\) in \[1, {_vocab.MAX_HEAD_DIM}\]"),
    (dict(q=fake_cuda([3, 4, 64], "float64")), "q must have dtype float32, float16 or bfloat16"),
    (dict(q=fake_cuda([3, 4, 64], "float16", strides=[512, 128, 2])), "q must have unit stride"),
    (dict(k_cache=fake_cuda([5, 16, 2, 64])), "k_cache must have dtype float16"),
    (dict(k_cache=fake_cuda([5, 16, 128], "float16")), r"k_cache must be \[num_blocks"),
    (dict(k_cache=fake_cuda([5, 16, 2, 64], "float16", strides=[4096, 256, 128, 2])),
     "k_cache must have unit stride in its last dimension"),
    (dict(k_cache=fake_cuda([5, 16, 2, 64], "float16", device=1)),
     "k_cache is on cuda:1 but q is on cuda:0"),
    (dict(v_cache=fake_cuda([4, 16, 2, 64], "float16")), r"v_cache must have shape\[0\]"),
    (dict(work_info=fake_cuda([2, 5], "int32")), "work_info must have shape\\[1\\]"),
    (dict(work_info=fake_cuda([2, 6], "int64")), "work_info must have dtype int32"),
    (dict(work_info=fake_cuda([2, 6], "int32", strides=[12, 2])), "work_info must be contiguous"),
    (dict(row_seq=fake_cuda([4], "int32")), r"row_seq must have shape\[0\] = q's S = 3"),
    (dict(partial_o=fake_cuda([6, 4, 32])), r"partial_o must have shape\[2\]"),
    (dict(partial_lse=fake_cuda([5, 4])), r"partial_lse must have shape\[0\] = partial_o's R"),
]


@pytest.mark.skipif(EXT is None, reason="a2r_kernels._C not built")
@pytest.mark.parametrize("changes,match", PARTIALS_REJECTED,
                         ids=[f"{i}-{'-'.join(c)}" for i, (c, _) in enumerate(PARTIALS_REJECTED)])
def test_extension_rejects_bad_tensors_by_name(changes, match):
    """Tensors cross as DLPack views; what would send a kernel out of bounds (or reinterpret
    memory) is rejected next to the launch, naming the argument, before any memory or the CUDA
    runtime is touched (the fake views' data pointers are null)."""
    with pytest.raises(ValueError, match=match):
        EXT.tree_attention_partials(**_partials_args(**changes))


def _denoise_args(**changes):
    """Valid denoise_step arguments (B=2, L=3, V=10, top-k mode), fake CUDA capsules."""
    args = dict(logits=fake_cuda([2, 3, 10]), tokens=fake_cuda([2, 3], "int64"),
                num_transfer=fake_cuda([2], "int64"), x0=fake_cuda([2, 3], "int64"),
                confidence=fake_cuda([2, 3]), transferred=fake_cuda([2, 3], "bool"),
                split_stats=None, mask_id=0, threshold=None, temperature=0.0, remasking=0, seed=0,
                num_splits=1, stream=0)
    return {**args, **changes}


DENOISE_REJECTED = [
    (dict(threshold=0.5), "exactly one"),
    (dict(num_transfer=None), "exactly one"),
    (dict(logits=fake_cuda([2, 3, 0])), r"logits must have V \(shape\[2\]\) in \[1"),
    (dict(transferred=fake_cuda([2, 3], "int64")), "transferred must have dtype bool"),
    (dict(x0=fake_cuda([2, 4], "int64")), r"x0 must have shape\[1\] = logits' L"),
    (dict(num_transfer=fake_cuda([3], "int64")), r"num_transfer must have shape\[0\]"),
    (dict(remasking=4), "remasking code"),
    (dict(num_splits=0), "num_splits"),
    (dict(num_splits=2), "needs split_stats"),                   # no scratch for the splits
    (dict(num_splits=2, split_stats=fake_cuda([2 * 3 * 2 * 8 - 1])), "split_stats must hold"),
    (dict(num_splits=2, split_stats=fake_cuda([96], data=8)), "16-byte aligned"),
]


@pytest.mark.skipif(EXT is None, reason="a2r_kernels._C not built")
@pytest.mark.parametrize("changes,match", DENOISE_REJECTED,
                         ids=[f"{i}-{'-'.join(c)}" for i, (c, _) in enumerate(DENOISE_REJECTED)])
def test_extension_rejects_bad_denoise_tensors_by_name(changes, match):
    with pytest.raises(ValueError, match=match):
        EXT.denoise_step(**_denoise_args(**changes))


@pytest.mark.skipif(TESTING is None, reason="tests/_C_testing not built")
def test_philox_stream_is_bitwise_the_reference_stream():
    """The kernels' Philox4x32-10 (host build of the same code) against reference_denoise."""
    rng = random.Random(0)
    for seed in (0, 1, 0x1234_5678_9ABC_DEF0, 2 ** 63 - 1):
        c0 = [0, 1, 2, 3, 50256, 2 ** 32 - 1] + [rng.randrange(2 ** 32) for _ in range(20)]
        c1 = [rng.randrange(2 ** 32) for _ in c0]
        for stream in (0, 1):
            want = reference_denoise.philox_uniform(seed, torch.tensor(c0), torch.tensor(c1),
                                                    stream)
            got = torch.tensor([TESTING.philox_uniform(seed, a, b, stream) for a, b in zip(c0, c1)])
            assert torch.equal(got, want), (seed, stream)
            assert bool(((got > 0) & (got < 1)).all())


def _host_predict(row: torch.Tensor, temperature: float, remasking: str, seed: int, pos: int,
                  group_width: int, num_splits: int, mask_id: int = 0):
    row = row.float().contiguous()
    return TESTING.denoise_predict_row_host(row.data_ptr(), row.numel(), temperature,
                                            _vocab.REMASKING_CODES[remasking], seed, pos,
                                            mask_id, group_width, num_splits)


@pytest.mark.skipif(TESTING is None, reason="tests/_C_testing not built")
@pytest.mark.parametrize("remasking", ["low_confidence", "margin", "entropy", "random"])
@pytest.mark.parametrize("temperature", [0.0, 0.7])
@pytest.mark.parametrize("group_width", [4, 8])
@pytest.mark.parametrize("num_splits", [1, 3, 7])
def test_denoise_position_math_host_build_matches_reference(remasking, temperature, group_width,
                                                            num_splits):
    """The kernels' per-position code (per-group online max / sum-exp / entropy, second largest,
    argmax by re-reading the max's group, Gumbel-max, the split merge, the confidence formulas)
    with their work split (groups of 4 logits as the fp32 kernel, 8 as the fp16 / bf16 ones, 256
    threads, a tail group, V split across CTAs, splits without any group when V is small),
    compiled for the host, against the fp32 reference on the CPU: odd vocab sizes, ties for the
    max inside one group and across groups, threads and splits, -inf entries, V = 1."""
    gen = torch.Generator().manual_seed(7)
    seed = 987654321
    rows = []
    for vocab in (1, 2, 7, 257, 1000, 5003):
        rows.append((torch.randn(vocab, generator=gen) * 4))
    tied = torch.randn(1000, generator=gen)
    tied[[3, 600, 999]] = tied.max() + 2.0            # argmax tie -> lowest index
    rows.append(tied)
    in_group = torch.randn(5003, generator=gen)
    in_group[[4101, 4099, 4102]] = in_group.max() + 1.0   # a tie inside one group, not at its start
    rows.append(in_group)
    across = torch.randn(40000, generator=gen)
    # A tie inside one thread's groups (17 and 17 + 256 * 8 land on the same thread for both
    # group widths), across threads (4000) and in the tail group (39999).
    across[[39999, 4000, 2065, 17]] = across.max() + 1.0
    rows.append(across)
    runner_up = torch.randn(3000, generator=gen)
    runner_up[[72, 75]] = runner_up.max() + 1.0       # the max twice in one group: margin 0
    rows.append(runner_up)
    with_neg_inf = torch.randn(300, generator=gen)
    with_neg_inf[::3] = float("-inf")                 # masked-out vocabulary entries
    rows.append(with_neg_inf)
    rows.append(torch.full((64,), 1.5))                # all equal
    agree = total = 0
    for row in rows:
        vocab = row.numel()
        length = 4
        logits = row.repeat(1, length, 1)
        tokens = torch.full((1, length), vocab, dtype=torch.int64)  # mask_id = vocab: all masked
        logits = torch.cat([logits, torch.zeros(1, length, 1)], dim=-1)  # mask_id column
        logits[..., vocab] = float("-inf")
        x0, conf, _ = reference_denoise.denoise_step(logits, tokens.clone(), vocab,
                                                     torch.tensor([1]), None, temperature,
                                                     remasking, seed)
        for pos in range(length):
            got_x0, got_conf = _host_predict(logits[0, pos], temperature, remasking, seed, pos,
                                             group_width, num_splits)
            total += 1
            if temperature == 0.0:
                assert got_x0 == int(x0[0, pos]), (vocab, pos)
            if got_x0 == int(x0[0, pos]):
                agree += 1
                assert got_conf == pytest.approx(float(conf[0, pos]), rel=1e-4, abs=2e-5), \
                    (vocab, pos, remasking)
    assert agree >= total - 1  # a Gumbel key may differ in its last bit (log implementations)


@pytest.mark.skipif(TESTING is None, reason="tests/_C_testing not built")
@pytest.mark.parametrize("remasking", ["low_confidence", "margin", "entropy", "random"])
@pytest.mark.parametrize("temperature", [0.0, 0.7])
@pytest.mark.parametrize("group_width,num_splits", [(4, 1), (8, 3), (4, 7)])
def test_denoise_non_finite_rows_host_build_matches_reference(remasking, temperature, group_width,
                                                              num_splits):
    """The CUDA per-position code (host build) on NaN / +inf / all -inf rows: the reference's
    semantics (x0 = mask_id and NaN confidence without a distribution; the lowest +inf index as
    a point mass), with the NaN in another thread, group or split than the max."""
    nan, inf = float("nan"), float("inf")
    gen = torch.Generator().manual_seed(11)
    vocab = 5003
    rows = []
    for spots, value in (([4000], nan), ([17, 2065], inf), ([], None), ([9], None),
                         ([4999, 3], inf)):
        row = torch.randn(vocab, generator=gen) * 3
        row[spots] = value if value is not None else row[spots]
        rows.append(row)
    rows[2][:] = -inf                          # no logit above -inf
    rows[3][:] = -inf
    rows[3][9] = nan                           # NaN among -inf
    both = torch.randn(vocab, generator=gen)
    both[[100, 4500]] = inf
    both[2] = nan                              # +inf and NaN: NaN wins
    rows.append(both)
    mask_id = vocab                            # the extra column, as in the test above
    logits = torch.stack(rows).unsqueeze(0)
    logits = torch.cat([logits, torch.full((1, len(rows), 1), -inf)], dim=-1)
    tokens = torch.full((1, len(rows)), mask_id, dtype=torch.int64)
    seed = 24680
    x0, conf, _ = reference_denoise.denoise_step(logits, tokens.clone(), mask_id,
                                                 torch.tensor([1]), None, temperature, remasking,
                                                 seed)
    assert x0[0].tolist()[:2] == [mask_id, 17] and x0[0, 4] == 3
    assert conf[0, [0, 2, 3, 5]].isnan().all()
    for pos in range(len(rows)):
        got_x0, got_conf = _host_predict(logits[0, pos], temperature, remasking, seed, pos,
                                         group_width, num_splits, mask_id)
        assert got_x0 == int(x0[0, pos]), (pos, got_x0)
        if math.isnan(float(conf[0, pos])):
            assert math.isnan(got_conf), (pos, got_conf)
        else:
            assert got_conf == pytest.approx(float(conf[0, pos]), rel=1e-5, abs=1e-6), pos


@pytest.mark.skipif(TESTING is None, reason="tests/_C_testing not built")
@pytest.mark.parametrize("remasking", ["low_confidence", "margin", "entropy", "random"])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("dtype,group_width,num_splits", [
    (torch.float32, 4, 1), (torch.float32, 4, 3), (torch.bfloat16, 8, 1), (torch.bfloat16, 8, 3),
    (torch.float16, 8, 3)])
def test_denoise_huge_finite_rows_host_build_matches_reference(remasking, temperature, dtype,
                                                                group_width, num_splits):
    """The CUDA per-position code (host build) on finite logits at the ends of the dtype's range
    (finfo.min rows, values up to finfo.max; V = 2100, so threads fold several groups and
    merge): no NaN, the reference's x0 and confidence."""
    rows, _ = huge_finite_logits(dtype, vocab=2100)
    vocab = rows.shape[1]
    mask_id = vocab                            # an extra -inf column, as in the tests above
    logits = torch.cat([rows.float(), torch.full((rows.shape[0], 1), float("-inf"))], dim=-1)
    logits = logits.unsqueeze(0)
    tokens = torch.full((1, rows.shape[0]), mask_id, dtype=torch.int64)
    seed = 13579
    x0, conf, _ = reference_denoise.denoise_step(logits, tokens.clone(), mask_id,
                                                 torch.tensor([1]), None, temperature, remasking,
                                                 seed)
    assert not bool(conf.isnan().any())
    for pos in range(rows.shape[0]):
        got_x0, got_conf = _host_predict(logits[0, pos], temperature, remasking, seed, pos,
                                         group_width, num_splits, mask_id)
        assert got_x0 == int(x0[0, pos]), (pos, got_x0, int(x0[0, pos]))
        assert got_conf == pytest.approx(float(conf[0, pos]), rel=1e-5, abs=2e-5), pos


@pytest.mark.skipif(EXT is None, reason="a2r_kernels._C not built")
def test_wrappers_reject_cpu_tensors_naming_the_argument():
    """Real torch tensors through the DLPack boundary: CPU ones are rejected by name."""
    q = torch.zeros(2, 4, 64)
    cache = torch.zeros(3, 16, 2, 64)
    i32 = torch.zeros(1, 6, dtype=torch.int32)
    with pytest.raises(ValueError, match="q must be a CUDA tensor"):
        _cuda_ops.tree_attention_partials(q, cache, cache, i32, i32[0, :2], i32[0], q, q[..., 0],
                                          0.125)
    with pytest.raises(ValueError, match="out must be a CUDA tensor"):
        _cuda_ops.merge_partials(q, q[..., 0], i32[0, :3], i32[0], q, q[..., 0])
    with pytest.raises(ValueError, match="out_a must be a tensor"):
        _cuda_ops.merge_states(None, None, None, None, None, None)
    tokens = torch.zeros(1, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match="logits must be a CUDA tensor"):
        _cuda_ops.denoise_step(torch.zeros(1, 2, 10), tokens, 0, None, 0.5, 0.0, "low_confidence",
                               0, tokens.clone(), torch.zeros(1, 2), tokens.bool())


def test_cuda_backend_on_cpu_is_unavailable_not_a_fallback():
    layout = ak.TreeLayout.from_paths([[0]], [[0]], [3], 16)
    q = torch.zeros(1, 2, 64)
    cache = torch.zeros(1, 16, 2, 64)
    with pytest.raises(ak.BackendUnavailable):
        ak.tree_decode_attention(q, cache, cache, layout, backend="cuda")
    with pytest.raises(ak.BackendUnavailable):
        ak.denoise_step(torch.zeros(1, 1, 8), torch.zeros(1, 1, dtype=torch.int64), 0,
                        num_transfer=1, backend="cuda")


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
