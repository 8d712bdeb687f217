"""The CUDA backend (a2r_kernels._C from csrc/, wrapped by a2r_kernels._cuda_ops): the build
and the input checks.

Without a GPU (CI) only these run: the extension must import whenever nvcc was available at
install time, its functions must fail cleanly (no crash) without a device, and the wrappers must
reject bad tensors with ValueError; the kernels' per-position code, built for the host
(csrc/testing_bindings.cpp), is compared with the reference. The kernels themselves are compared
on a GPU in tests/test_cuda_gpu.py.
"""

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

EXT = cuda_extension()


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
