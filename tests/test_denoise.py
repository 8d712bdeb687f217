"""denoise_step: every kernel backend against the fp32 reference (odd shapes, chunks and splits,
low precision, strides, offsets past int32), its randomness, random small problems and bad
input. The selection rules and the LLaDA / Fast-dLLM comparison: tests/test_denoise_rules.py.

Without a GPU, Triton kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set before
anything imports triton), on small shapes; with a GPU the compiled kernels run unless
TRITON_INTERPRET says otherwise. All randomness is seeded; hypothesis is derandomized.
"""

import os
import subprocess
import sys
import textwrap

import torch  # importing torch does not import triton

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import a2r_kernels as ak  # noqa: E402
from a2r_kernels import reference_denoise  # noqa: E402
from a2r_kernels.triton import denoise as triton_denoise  # noqa: E402

from _denoise_helpers import (ALL_BACKENDS, DEVICE, KERNEL_BACKENDS, MASK_ID,  # noqa: E402
                              REMASKING, _assert_same, _backend_or_skip, _check_invariants,
                              _make_case, _run)


# --------------------------------------------------------------------------------------------
# Kernels against the reference
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("remasking", REMASKING)
@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("selection", [{"num_transfer": 3}, {"threshold": 0.05}])
@pytest.mark.parametrize("shape", [(3, 7, 1000), (1, 1, 1000), (2, 5, 1)])
def test_matches_reference(backend, remasking, temperature, selection, shape):
    _backend_or_skip(backend)
    logits, tokens = _make_case(*shape, seed=sum(shape))
    mask_id = MASK_ID
    if shape[2] == 1:   # V = 1: the mask token is the whole vocabulary; every position masked
        mask_id, tokens = 0, torch.zeros_like(tokens)
    kwargs = dict(temperature=temperature, remasking=remasking, mask_id=mask_id, **selection)
    result, after = _run(backend, logits, tokens, **kwargs)
    expected, expected_after = _run("torch", logits, tokens, **kwargs)
    _assert_same(result, after, expected, expected_after, remasking)
    _check_invariants(result, tokens, after, mask_id)


@pytest.mark.parametrize("remasking", REMASKING)
@pytest.mark.parametrize("temperature", [0.0, 1.3])
def test_triton_several_chunks_and_splits(remasking, temperature):
    """Small BLOCK_V and several V splits: the lane and split merges of every statistic."""
    logits, tokens = _make_case(2, 4, 1000, masked_fraction=0.8, seed=11)
    expected_tokens = tokens.clone()
    seed = 987654321987
    expected = reference_denoise.denoise_step(
        logits, expected_tokens, MASK_ID, torch.tensor([2, 4]), None, temperature, remasking, seed)
    for config in ({"block_v": 128, "num_splits": 3, "num_warps": 4},
                   {"block_v": 256, "num_splits": 4, "num_warps": 4}):
        updated = tokens.clone()
        x0 = torch.empty_like(tokens)
        confidence = torch.empty(tokens.shape, dtype=torch.float32)
        transferred = torch.empty(tokens.shape, dtype=torch.bool)
        triton_denoise.denoise_step(logits, updated, MASK_ID, torch.tensor([2, 4]), None,
                                    temperature, remasking, seed, x0, confidence, transferred,
                                    config=config)
        _assert_same(ak.DenoiseResult(x0, confidence, transferred), updated,
                     ak.DenoiseResult(*expected), expected_tokens, remasking)


@pytest.mark.parametrize("num_splits", [1, 2])
def test_triton_argmax_ties_across_chunks(num_splits):
    """A maximum tied inside one lane (entries 64 apart, BLOCK_V = 64: fp32 lanes hold groups of
    4 entries), inside one group, across lanes and across V splits: x0 is the lowest index, and
    the margin p1 - p2 is exactly 0."""
    vocab = 300
    logits = torch.zeros(1, 4, vocab)
    logits[0, 0, [70, 134, 198]] = 4.0        # same lane (70 % 64 == 6: lane 1) in three chunks
    logits[0, 1, [250, 131, 3 + 128]] = 4.0   # lanes 14 and 0, and a duplicate
    logits[0, 2, [299, 190, 10]] = 4.0        # across both splits when num_splits == 2
    logits[0, 3, [67, 65, 200]] = 4.0         # twice in one group (64..67), then a later lane
    tokens = torch.full((1, 4), MASK_ID)
    for remasking in ("low_confidence", "margin"):
        updated = tokens.clone()
        x0 = torch.empty_like(tokens)
        confidence = torch.empty(tokens.shape, dtype=torch.float32)
        transferred = torch.empty(tokens.shape, dtype=torch.bool)
        triton_denoise.denoise_step(logits, updated, MASK_ID, torch.tensor([3]), None, 0.0,
                                    remasking, 0, x0, confidence, transferred,
                                    config={"block_v": 64, "num_splits": num_splits,
                                            "num_warps": 4})
        assert x0.tolist() == [[70, 131, 10, 65]]
        if remasking == "margin":
            assert confidence.tolist() == [[0.0, 0.0, 0.0, 0.0]]
    # a tie only inside one group: the margin needs the group's runner-up to be the max itself
    logits = torch.zeros(1, 1, vocab)
    logits[0, 0, [66, 65]] = 4.0
    logits[0, 0, 250] = 3.0
    x0 = torch.empty(1, 1, dtype=torch.int64)
    confidence = torch.empty(1, 1)
    transferred = torch.empty(1, 1, dtype=torch.bool)
    triton_denoise.denoise_step(logits, torch.full((1, 1), MASK_ID), MASK_ID, torch.tensor([1]),
                                None, 0.0, "margin", 0, x0, confidence, transferred,
                                config={"block_v": 64, "num_splits": num_splits, "num_warps": 4})
    assert x0.item() == 65 and confidence.item() == 0.0


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("remasking,temperature", [("low_confidence", 0.0), ("entropy", 1.0),
                                                   ("margin", 0.5)])
def test_large_vocab(backend, remasking, temperature):
    """V = 50257 (GPT-2): a vocabulary that is not a multiple of any block size."""
    _backend_or_skip(backend)
    logits, tokens = _make_case(1, 2, 50257, masked_fraction=1.0, seed=5)
    kwargs = dict(num_transfer=1, temperature=temperature, remasking=remasking)
    result, after = _run(backend, logits, tokens, **kwargs)
    expected, expected_after = _run("torch", logits, tokens, **kwargs)
    _assert_same(result, after, expected, expected_after, remasking)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("remasking", ["low_confidence", "margin", "entropy"])
def test_low_precision_logits(backend, dtype, remasking):
    """fp16/bf16 logits are read as is and upcast: many exact argmax ties (lowest index wins)."""
    _backend_or_skip(backend)
    logits, tokens = _make_case(3, 9, 333, dtype=dtype, seed=2)
    assert logits.dtype == dtype
    kwargs = dict(num_transfer=torch.tensor([1, 4, 9]), remasking=remasking)
    result, after = _run(backend, logits, tokens, **kwargs)
    expected, expected_after = _run("torch", logits, tokens, **kwargs)
    _assert_same(result, after, expected, expected_after, remasking)
    masked = tokens == MASK_ID
    assert torch.equal(result.x0[masked], logits.float().argmax(-1)[masked])


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_non_contiguous_inputs(backend):
    """Strided logits (B/L permuted, V sliced out of a wider buffer, V strided) and tokens that are
    a transposed view: the in-place update must land in the viewed storage."""
    _backend_or_skip(backend)
    base, _ = _make_case(6, 3, 700, seed=4)
    storage = torch.full((6, 4), 99, dtype=torch.int64, device=DEVICE)
    gen = torch.Generator().manual_seed(4)
    storage[torch.rand(6, 4, generator=gen).to(DEVICE) < 0.6] = MASK_ID
    variants = [base.transpose(0, 1)[:, :, :512],     # [3, 6, 512], L stride != V
                base[::2].transpose(0, 1),            # [3, 3, 700], strided B
                base.transpose(0, 1)[:, :, ::2]]      # last-dim stride 2
    for logits in variants:
        assert not logits.is_contiguous()
        batch, length, _ = logits.shape
        tokens_view = storage.t()[:batch, :length]   # [B, L] view, strides (1, 4)
        assert not tokens_view.is_contiguous()
        before = tokens_view.clone()
        for selection in ({"num_transfer": 2}, {"threshold": 0.2}):
            view_storage = storage.clone()
            view = view_storage.t()[:batch, :length]
            result = ak.denoise_step(logits, view, MASK_ID, backend=backend, **selection)
            expected_tokens = before.clone()
            expected = ak.denoise_step(logits.contiguous(), expected_tokens, MASK_ID,
                                       backend="torch", **selection)
            _assert_same(result, view, expected, expected_tokens)
            _check_invariants(result, before, view)
            untouched = torch.ones_like(storage, dtype=torch.bool)
            untouched.t()[:batch, :length] = False
            assert torch.equal(view_storage[untouched], storage[untouched])


# A batch stride that fits int32 while b * stride does not (B * L * V = 5e9 logits, e.g. B=32,
# L=1024, V=151936, has the same property): offsets must be 64-bit. In a subprocess, so that a
# wrapped offset (an out-of-bounds read: a segfault in the interpreter) fails this test only.
_FAR_ROWS = textwrap.dedent("""
    import sys
    import torch
    import a2r_kernels as ak

    device, backend = sys.argv[1], sys.argv[2]
    batch, vocab, mask_id = 3, 300, 7
    stride_b = 2 ** 30 + 64                     # row b = 2 starts at element 2**31 + 128
    try:  # 4.3 GB of address space; only the three rows are ever touched
        storage = torch.empty(2 * stride_b + vocab, dtype=torch.float16, device=device)
    except (RuntimeError, MemoryError) as exc:
        print("SKIP", exc)
        sys.exit(0)
    logits = storage.as_strided((batch, 1, vocab), (stride_b, vocab, 1))
    gen = torch.Generator().manual_seed(0)
    for b in range(batch):
        logits[b] = (torch.randn(1, vocab, generator=gen) * 3).half()
    for temperature, remasking in ((0.0, "margin"), (0.7, "entropy")):
        tokens = torch.full((batch, 1), mask_id, device=device)
        want_tokens = tokens.clone()
        got = ak.denoise_step(logits, tokens, mask_id, num_transfer=1, temperature=temperature,
                              remasking=remasking, generator=torch.Generator().manual_seed(1),
                              backend=backend)
        want = ak.denoise_step(logits.contiguous(), want_tokens, mask_id, num_transfer=1,
                               temperature=temperature, remasking=remasking,
                               generator=torch.Generator().manual_seed(1), backend="torch")
        assert torch.equal(got.x0, want.x0) and torch.equal(tokens, want_tokens), remasking
        torch.testing.assert_close(got.confidence, want.confidence, rtol=1e-5, atol=2e-5)
    print("OK")
""")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_logit_offsets_beyond_int32(backend):
    _backend_or_skip(backend)
    env = dict(os.environ)
    if DEVICE.type == "cpu":
        env["TRITON_INTERPRET"] = "1"
    result = subprocess.run([sys.executable, "-c", _FAR_ROWS, str(DEVICE), backend],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, f"failed ({result.returncode}):\n{result.stderr[-3000:]}"
    if result.stdout.startswith("SKIP"):
        pytest.skip(f"cannot reserve 4.3 GB of address space: {result.stdout}")
    assert result.stdout.strip().endswith("OK"), result.stdout


# --------------------------------------------------------------------------------------------
# Randomness: reproducible, seed-dependent, and distributed as softmax(logits / T)
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("temperature,remasking", [(1.0, "low_confidence"), (0.0, "random")])
def test_generator_reproducibility(backend, temperature, remasking):
    _backend_or_skip(backend)
    logits, tokens = _make_case(2, 16, 200, masked_fraction=1.0, scale=0.5, seed=16)
    kwargs = dict(num_transfer=4, temperature=temperature, remasking=remasking)
    first, first_tokens = _run(backend, logits, tokens, seed=1, **kwargs)
    again, again_tokens = _run(backend, logits, tokens, seed=1, **kwargs)
    other, other_tokens = _run(backend, logits, tokens, seed=2, **kwargs)
    assert torch.equal(first.x0, again.x0) and torch.equal(first_tokens, again_tokens)
    assert torch.equal(first.confidence, again.confidence)
    if temperature > 0:   # flat logits (scale 0.5, V = 200): 32 samples cannot all coincide
        assert not torch.equal(first.x0, other.x0)
    else:
        assert not torch.equal(first.confidence, other.confidence)
        assert not torch.equal(first.transferred, other.transferred)
    # The global generator is used when none is given.
    torch.manual_seed(5)
    a = ak.denoise_step(logits, tokens.clone(), MASK_ID, backend=backend, **kwargs)
    torch.manual_seed(5)
    b = ak.denoise_step(logits, tokens.clone(), MASK_ID, backend=backend, **kwargs)
    assert torch.equal(a.x0, b.x0) and torch.equal(a.confidence, b.confidence)


def test_deterministic_step_draws_nothing():
    """temperature 0 with a deterministic score leaves the generator untouched."""
    logits, tokens = _make_case(1, 4, 20, seed=17)
    generator = torch.Generator().manual_seed(3)
    state = generator.get_state()
    ak.denoise_step(logits, tokens.clone(), MASK_ID, num_transfer=1, generator=generator,
                    backend="torch")
    assert torch.equal(generator.get_state(), state)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_gumbel_sampling_follows_softmax(temperature):
    """x0 frequencies over 30000 independent positions ~ softmax(logits / T): chi-square test."""
    logits_row = torch.tensor([1.0, 0.0, -0.5, 2.0, 0.3])
    num_samples = 30000
    logits = logits_row.expand(1, num_samples, 5).to(DEVICE)
    tokens = torch.full((1, num_samples), 0, device=DEVICE)
    result = ak.denoise_step(logits, tokens, 0, num_transfer=0, temperature=temperature,
                             generator=torch.Generator().manual_seed(18), backend="torch")
    counts = torch.bincount(result.x0.flatten().cpu(), minlength=5).double()
    expected = torch.softmax(logits_row.double() / temperature, 0) * num_samples
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 20.5   # chi-square, 4 degrees of freedom: P(chi2 > 20.5) ~ 4e-4


def test_philox_uniform_matches_triton_and_is_uniform():
    """The reference's Philox is bit-exact with the kernels' stream (a Triton kernel run of the
    random score) and looks uniform."""
    seed = 2 ** 40 + 12345
    u = reference_denoise.philox_uniform(seed, torch.arange(20000), torch.full((20000,), 3), 0)
    assert 0.0 < float(u.min()) and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.var()) - 1 / 12) < 0.003
    histogram = torch.histc(u, bins=10, min=0.0, max=1.0)
    assert float(((histogram - 2000) ** 2 / 2000).sum()) < 30.0   # 9 dof
    batch, length = 2, 33
    tokens = torch.full((batch, length), 0)
    x0 = torch.empty_like(tokens)
    confidence = torch.empty(batch, length)
    transferred = torch.empty(batch, length, dtype=torch.bool)
    triton_denoise.denoise_step(torch.zeros(batch, length, 3), tokens, 0, None, 0.5, 0.0,
                                "random", seed, x0, confidence, transferred)
    assert torch.equal(confidence, reference_denoise.random_scores(seed, batch, length, "cpu"))


# --------------------------------------------------------------------------------------------
# Random small problems (hypothesis)
# --------------------------------------------------------------------------------------------

@settings(max_examples=20, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.integers(1, 3), length=st.integers(1, 9), vocab=st.integers(8, 300),
       masked_fraction=st.sampled_from([0.0, 0.4, 1.0]), remasking=st.sampled_from(REMASKING),
       temperature=st.sampled_from([0.0, 0.7]), use_threshold=st.booleans(),
       quota=st.integers(0, 10), block_v=st.sampled_from([16, 64, 512]),
       num_splits=st.integers(1, 4), seed=st.integers(0, 2 ** 20))
def test_random_problems_triton(batch, length, vocab, masked_fraction, remasking, temperature,
                                use_threshold, quota, block_v, num_splits, seed):
    logits, tokens = _make_case(batch, length, vocab, masked_fraction=masked_fraction, seed=seed)
    num_transfer = None if use_threshold else torch.full((batch,), quota)
    threshold = 0.3 if use_threshold else None
    expected_tokens = tokens.clone()
    expected = reference_denoise.denoise_step(logits, expected_tokens, MASK_ID, num_transfer,
                                              threshold, temperature, remasking, seed)
    updated = tokens.clone()
    x0 = torch.empty_like(tokens)
    confidence = torch.empty(tokens.shape, dtype=torch.float32)
    transferred = torch.empty(tokens.shape, dtype=torch.bool)
    triton_denoise.denoise_step(logits, updated, MASK_ID, num_transfer, threshold, temperature,
                                remasking, seed, x0, confidence, transferred,
                                config={"block_v": block_v, "num_splits": num_splits,
                                        "num_warps": 4})
    result = ak.DenoiseResult(x0, confidence, transferred)
    _assert_same(result, updated, ak.DenoiseResult(*expected), expected_tokens, remasking)
    _check_invariants(result, tokens, updated)


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------

def _bad_calls():
    logits = torch.randn(2, 3, 10)
    tokens = torch.full((2, 3), 1)
    ok = dict(num_transfer=1)
    return [
        ("logits", lambda: ak.denoise_step(logits[0], tokens, 1, **ok)),
        ("logits", lambda: ak.denoise_step(logits.double(), tokens, 1, **ok)),
        ("logits", lambda: ak.denoise_step(logits[..., :0], tokens, 0, **ok)),
        ("logits", lambda: ak.denoise_step(logits[..., :1].expand(2, 3, 2 ** 31), tokens, 1,
                                           **ok)),   # V past the kernels' int32 ids (no copy)
        ("tokens", lambda: ak.denoise_step(logits, tokens[:, :2], 1, **ok)),
        ("tokens", lambda: ak.denoise_step(logits, tokens.int(), 1, **ok)),
        ("mask_id", lambda: ak.denoise_step(logits, tokens, 10, **ok)),
        ("mask_id", lambda: ak.denoise_step(logits, tokens, -1, **ok)),
        ("mask_id", lambda: ak.denoise_step(logits, tokens, 1.0, **ok)),
        ("exactly one", lambda: ak.denoise_step(logits, tokens, 1)),
        ("exactly one", lambda: ak.denoise_step(logits, tokens, 1, num_transfer=1, threshold=0.5)),
        ("num_transfer", lambda: ak.denoise_step(logits, tokens, 1, num_transfer=-1)),
        ("num_transfer", lambda: ak.denoise_step(logits, tokens, 1,
                                                 num_transfer=torch.tensor([1, -2]))),
        ("num_transfer", lambda: ak.denoise_step(logits, tokens, 1,
                                                 num_transfer=torch.tensor([1, 2, 3]))),
        ("num_transfer", lambda: ak.denoise_step(logits, tokens, 1,
                                                 num_transfer=torch.tensor([1.0, 2.0]))),
        ("num_transfer", lambda: ak.denoise_step(logits, tokens, 1, num_transfer=1.5)),
        ("threshold", lambda: ak.denoise_step(logits, tokens, 1, threshold=float("nan"))),
        ("threshold", lambda: ak.denoise_step(logits, tokens, 1, threshold=float("inf"))),
        ("threshold", lambda: ak.denoise_step(logits, tokens, 1, threshold="0.5")),
        ("temperature", lambda: ak.denoise_step(logits, tokens, 1, temperature=-0.1, **ok)),
        ("temperature", lambda: ak.denoise_step(logits, tokens, 1, temperature=float("nan"),
                                                **ok)),
        ("remasking", lambda: ak.denoise_step(logits, tokens, 1, remasking="confidence", **ok)),
        ("backend", lambda: ak.denoise_step(logits, tokens, 1, backend="numpy", **ok)),
        ("generator", lambda: ak.denoise_step(logits, tokens, 1, generator=3, **ok)),
    ]


@pytest.mark.parametrize("argument,call", _bad_calls(), ids=[c[0] for c in _bad_calls()])
def test_bad_input_raises_value_error(argument, call):
    with pytest.raises(ValueError, match=argument):
        call()


def test_bad_input_leaves_tokens_alone():
    logits = torch.randn(2, 3, 10)
    tokens = torch.full((2, 3), 1)
    with pytest.raises(ValueError):
        ak.denoise_step(logits, tokens, 1, num_transfer=torch.tensor([5, -1]))
    assert bool((tokens == 1).all())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only path")
def test_cuda_backend_unavailable_on_cpu():
    logits = torch.randn(1, 2, 10)
    tokens = torch.full((1, 2), 1)
    with pytest.raises(ak.BackendUnavailable):
        ak.denoise_step(logits, tokens, 1, num_transfer=1, backend="cuda")
    assert bool((tokens == 1).all())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_mismatch_raises():
    logits = torch.randn(1, 2, 10, device="cuda")
    with pytest.raises(ValueError, match="tokens"):
        ak.denoise_step(logits, torch.full((1, 2), 1), 1, num_transfer=1)
