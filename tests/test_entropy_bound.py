"""entropy_bound_step: the Triton kernels against the fp32 reference, and the reference against
transformers' DiffusionGemma EntropyBoundSampler on the same logits.

Without a GPU, Triton kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set before
anything imports triton), on small shapes. All randomness is seeded.
"""

import math
import os

import torch  # importing torch does not import triton

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import a2r_kernels as ak  # noqa: E402
from a2r_kernels import reference_denoise, reference_entropy_bound  # noqa: E402
from a2r_kernels.triton import entropy_bound as triton_eb  # noqa: E402
from _helpers import huge_finite_logits  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Both sides compute the entropy in fp32 from the same (upcast) logits; they differ in summation
# order and the exp/log implementation.
ENTROPY_ATOL = 2e-5
ENTROPY_RTOL = 1e-5


def _triton_or_skip():
    try:
        ak.backend.resolve_backend("entropy_bound_step", "triton", DEVICE)
    except ak.BackendUnavailable as exc:
        pytest.skip(str(exc))


def _hf_sampler(entropy_bound, length, vocab):
    generation = pytest.importorskip(
        "transformers.models.diffusion_gemma.generation_diffusion_gemma",
        reason="this transformers has no DiffusionGemma")
    config = generation.EntropyBoundSamplerConfig(entropy_bound=float(entropy_bound))
    return generation.EntropyBoundSampler(config, length, vocab, max_denoising_steps=1)


def _case(batch, length, vocab, *, dtype=torch.float32, scale=3.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(batch, length, vocab, generator=gen) * scale).to(dtype)
    canvas = torch.randint(0, vocab, (batch, length), generator=gen)
    return logits.to(DEVICE), canvas.to(DEVICE)


def _run(backend, logits, canvas, entropy_bound, seed=1234):
    """One step on a copy of ``canvas``; returns (result, updated canvas)."""
    updated = canvas.clone()
    result = ak.entropy_bound_step(logits, updated, entropy_bound, backend=backend,
                                   generator=torch.Generator().manual_seed(seed))
    return result, updated


def _assert_same(result, canvas, expected, expected_canvas):
    assert torch.equal(result.sample, expected.sample)
    assert torch.equal(result.argmax, expected.argmax)
    torch.testing.assert_close(result.entropy, expected.entropy, rtol=ENTROPY_RTOL,
                               atol=ENTROPY_ATOL)
    assert torch.equal(result.accepted, expected.accepted)
    assert torch.equal(canvas, expected_canvas)


def _check_invariants(result, canvas_after, vocab):
    assert result.sample.dtype == torch.int64 and result.argmax.dtype == torch.int64
    assert result.entropy.dtype == torch.float32 and result.accepted.dtype == torch.bool
    assert not bool(torch.isnan(result.entropy).any())
    assert torch.equal(canvas_after[result.accepted], result.sample[result.accepted])
    assert bool(((canvas_after >= 0) & (canvas_after < vocab)).all())
    # every row with a finite entropy accepts at least its lowest-entropy position
    finite_rows = torch.isfinite(result.entropy).any(-1)
    assert bool(result.accepted.any(-1)[finite_rows].all())


# --------------------------------------------------------------------------------------------
# Triton against the reference
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,entropy_bound", [
    ((3, 7, 1000), 0.0), ((3, 7, 1000), 1.5), ((3, 7, 1000), float("inf")),
    ((1, 1, 1000), 1.5), ((2, 5, 1), 1.5), ((1, 3, 4099), 1.5),
    ((2, 67, 20), 4.0),        # L > 64: several select programs per row
])
def test_triton_matches_reference(shape, entropy_bound):
    _triton_or_skip()
    logits, canvas = _case(*shape, seed=sum(shape))
    result, after = _run("triton", logits, canvas, entropy_bound)
    expected, expected_after = _run("torch", logits, canvas, entropy_bound)
    _assert_same(result, after, expected, expected_after)
    _check_invariants(result, after, shape[2])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_low_precision_logits(dtype):
    _triton_or_skip()
    logits, canvas = _case(2, 6, 777, dtype=dtype, seed=3)
    result, after = _run("triton", logits, canvas, 2.0)
    expected, expected_after = _run("torch", logits, canvas, 2.0)
    _assert_same(result, after, expected, expected_after)
    # the reference upcasts: the same as running it on fp32 copies of the logits
    upcast, upcast_after = _run("torch", logits.float(), canvas, 2.0)
    _assert_same(expected, expected_after, upcast, upcast_after)


@pytest.mark.parametrize("block_v,num_splits", [(16, 1), (16, 3), (64, 4), (128, 2)])
def test_triton_several_chunks_and_splits(block_v, num_splits):
    """The split-V merge and the chunk loop, on a vocabulary the interpreter sees in one chunk
    by default; ties of the max across chunks go to the lowest index."""
    _triton_or_skip()
    logits, canvas = _case(2, 4, 150, seed=block_v + num_splits)
    logits[0, 1, [20, 90, 140]] = 50.0                        # argmax ties in 3 chunks
    seed = 99
    expected_canvas = canvas.clone()
    expected = ak.EntropyBoundResult(*reference_entropy_bound.entropy_bound_step(
        logits, expected_canvas, 1.0, seed))
    updated = canvas.clone()
    out = [torch.empty(2, 4, dtype=torch.int64), torch.empty(2, 4, dtype=torch.int64),
           torch.empty(2, 4), torch.empty(2, 4, dtype=torch.bool)]
    triton_eb.entropy_bound_step(logits, updated, 1.0, seed, *out,
                                 config={"block_v": block_v, "num_splits": num_splits,
                                         "num_warps": 4})
    result = ak.EntropyBoundResult(*out)
    _assert_same(result, updated, expected, expected_canvas)
    assert int(result.argmax[0, 1]) == 20


def test_triton_non_contiguous_inputs():
    _triton_or_skip()
    logits, canvas = _case(3, 8, 200, seed=5)
    wide = torch.zeros(3, 8, 400, device=DEVICE)
    wide[..., ::2] = logits                                   # last-dim stride 2
    wide_canvas = torch.zeros(8, 3, dtype=torch.int64, device=DEVICE)
    canvas_t = wide_canvas.t()                                # [3, 8], strides (1, 3)
    canvas_t.copy_(canvas)
    strided = wide[..., ::2]
    result = ak.entropy_bound_step(strided, canvas_t, 1.0, backend="triton",
                                   generator=torch.Generator().manual_seed(8))
    expected, expected_after = _run("torch", logits, canvas, 1.0, seed=8)
    _assert_same(result, canvas_t, expected, expected_after)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_empty_shapes(backend):
    if backend == "triton":
        _triton_or_skip()
    for batch, length in ((0, 4), (2, 0)):
        logits = torch.randn(batch, length, 10, device=DEVICE)
        canvas = torch.zeros(batch, length, dtype=torch.int64, device=DEVICE)
        result = ak.entropy_bound_step(logits, canvas, 0.5, backend=backend)
        assert result.sample.shape == (batch, length) == result.accepted.shape


# --------------------------------------------------------------------------------------------
# Against transformers' EntropyBoundSampler
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("entropy_bound", [0.1, 1.0, 6.0])
def test_matches_transformers_sampler(backend, entropy_bound):
    """Same logits: entropy = Categorical(logits).entropy(), argmax = torch.argmax, acceptance =
    the sampler's accept_canvas mask, and the canvas = accept_canvas(our sample) outside the
    renoised positions."""
    if backend == "triton":
        _triton_or_skip()
    batch, length, vocab = 3, 24, 501
    gen = torch.Generator().manual_seed(17)
    # A spread of peaked and flat positions, so the bound cuts inside each row.
    scale = torch.rand(batch, length, 1, generator=gen) * 12
    logits = (torch.randn(batch, length, vocab, generator=gen) * scale).to(DEVICE)
    canvas = torch.randint(0, vocab, (batch, length), generator=gen).to(DEVICE)
    result, after = _run(backend, logits, canvas, entropy_bound)

    sampler = _hf_sampler(entropy_bound, length, vocab)
    hf_entropy = torch.distributions.Categorical(logits=logits).entropy()
    torch.testing.assert_close(result.entropy, hf_entropy, rtol=ENTROPY_RTOL, atol=ENTROPY_ATOL)
    assert torch.equal(result.argmax, torch.argmax(logits, dim=-1))
    accepted_canvas = sampler.accept_canvas(canvas, result.sample, logits, cur_step=1)
    assert torch.equal(result.accepted, sampler.accepted_token_mask)
    assert 0 < int(result.accepted.sum()) < batch * length
    assert torch.equal(after[result.accepted], accepted_canvas[result.accepted])


def _gumbel_rows_case(scale_low, scale_high):
    gen = torch.Generator().manual_seed(4)
    num_rows, vocab = 64, 3000
    scale = torch.linspace(scale_low, scale_high, num_rows)[:, None]
    x = torch.randn(num_rows, vocab, generator=gen) * scale
    x[::5, ::2] = float("-inf")
    x[3] = 1.0                                                 # all tied
    x[7, 100:110] = x[7].max() + 25.0                          # a tied peak far above the rest
    x[9] = float("-inf")
    x[9, 2999] = 0.0                                           # a single live entry, last
    return x


def test_gumbel_pruning_equals_definition(monkeypatch):
    """On peaked rows gumbel_argmax draws noise only for candidates (it never draws dense rows of
    noise); the result equals argmax(x + g) over the whole vocabulary, for peaked, tied
    and partly -inf rows."""
    x = _gumbel_rows_case(5.0, 30.0)
    seed = 2 ** 33 + 7
    expected = (x + reference_denoise.gumbel_noise(seed, 1, x.shape[0], x.shape[1], "cpu")[0]
                ).argmax(dim=-1)

    def no_dense_noise(*args):
        raise AssertionError("the sparse path should not draw dense noise here")

    monkeypatch.setattr(reference_denoise, "_gumbel_rows", no_dense_noise)
    valid = torch.ones(x.shape[0], dtype=torch.bool)
    assert torch.equal(reference_entropy_bound.gumbel_argmax(x, seed, valid), expected)
    assert int(expected[9]) == 2999 and 100 <= int(expected[7]) < 110


def test_gumbel_flat_rows_take_the_dense_path():
    x = _gumbel_rows_case(0.1, 1.0)
    seed = 11
    expected = (x + reference_denoise.gumbel_noise(seed, 1, x.shape[0], x.shape[1], "cpu")[0]
                ).argmax(dim=-1)
    valid = torch.ones(x.shape[0], dtype=torch.bool)
    valid[5] = False
    result = reference_entropy_bound.gumbel_argmax(x, seed, valid)
    assert torch.equal(result[valid], expected[valid]) and int(result[5]) == 0


def test_gumbel_bound_bounds_every_draw():
    """GUMBEL_BOUND exceeds the largest Gumbel value any uniform of the stream can give."""
    largest_u = torch.tensor([((2 ** 23 - 1) + 0.5) * 2.0 ** -23], dtype=torch.float32)
    assert float(largest_u) < 1.0
    assert float(-torch.log(-torch.log(largest_u))) < reference_entropy_bound.GUMBEL_BOUND


def test_sample_frequencies_follow_softmax():
    """sample frequencies over 30000 positions ~ softmax(logits): chi-square test."""
    logits_row = torch.tensor([1.0, 0.0, -0.5, 2.0, 0.3, float("-inf")])
    num_samples = 30000
    logits = logits_row.expand(1, num_samples, 6).contiguous().to(DEVICE)
    canvas = torch.zeros(1, num_samples, dtype=torch.int64, device=DEVICE)
    result = ak.entropy_bound_step(logits, canvas, 0.0, backend="torch",
                                   generator=torch.Generator().manual_seed(18))
    counts = torch.bincount(result.sample.flatten().cpu(), minlength=6).double()
    assert counts[5] == 0                                      # probability 0: never drawn
    expected = torch.softmax(logits_row.double(), 0)[:5] * num_samples
    chi2 = float(((counts[:5] - expected) ** 2 / expected).sum())
    assert chi2 < 20.5   # chi-square, 4 degrees of freedom: P(chi2 > 20.5) ~ 4e-4


def test_renoised_tokens_uniform_and_in_range():
    """With bound 0 and equal entropies only the first position of a row is accepted; the other
    positions are renoised uniformly over a non-power-of-two vocabulary."""
    vocab, batch, length = 7, 40, 500
    logits = torch.zeros(batch, length, vocab, device=DEVICE)
    canvas = torch.full((batch, length), -1, dtype=torch.int64, device=DEVICE)
    result = ak.entropy_bound_step(logits, canvas, 0.0, backend="torch",
                                   generator=torch.Generator().manual_seed(21))
    expected_accepted = torch.zeros(batch, length, dtype=torch.bool, device=DEVICE)
    expected_accepted[:, 0] = True                             # ties -> lower position
    assert torch.equal(result.accepted, expected_accepted)
    renoised = canvas[:, 1:].flatten().cpu()
    assert bool(((renoised >= 0) & (renoised < vocab)).all())
    counts = torch.bincount(renoised, minlength=vocab).double()
    expected = renoised.numel() / vocab
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 22.5   # 6 degrees of freedom: P(chi2 > 22.5) ~ 1e-3


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_entropy_ties_go_to_lower_positions(backend):
    """Identical rows have identical entropies: the bound admits the lower positions first."""
    if backend == "triton":
        _triton_or_skip()
    row = torch.randn(50, generator=torch.Generator().manual_seed(2))
    logits = row.expand(2, 6, 50).contiguous().to(DEVICE)
    entropy = float(torch.distributions.Categorical(logits=row).entropy())
    canvas = torch.zeros(2, 6, dtype=torch.int64, device=DEVICE)
    result = ak.entropy_bound_step(logits, canvas, 2.5 * entropy, backend=backend)
    expected = torch.tensor([[True, True, True, False, False, False]] * 2, device=DEVICE)
    assert torch.equal(result.accepted, expected)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_non_finite_logits(backend):
    """NaN and all -inf positions: entropy +inf, sample = argmax = 0, never accepted. A +inf
    position: the point mass on its first +inf (entropy 0). -inf entries elsewhere are
    probability-0 tokens."""
    if backend == "triton":
        _triton_or_skip()
    logits, canvas = _case(2, 5, 40, seed=9)
    logits[..., ::4] = float("-inf")
    logits[0, 1, 3] = float("nan")
    logits[0, 2, [7, 9]] = float("inf")
    logits[1, 0] = float("-inf")
    result, after = _run(backend, logits, canvas, float("inf"))
    bad = torch.zeros(2, 5, dtype=torch.bool, device=DEVICE)
    bad[0, 1] = bad[1, 0] = True
    assert bool(torch.isinf(result.entropy[bad]).all())
    assert bool(torch.isfinite(result.entropy[~bad]).all())
    assert torch.equal(result.accepted, ~bad)                  # the bound is inf
    assert bool((result.sample[bad] == 0).all()) and bool((result.argmax[bad] == 0).all())
    assert (int(result.sample[0, 2]), int(result.argmax[0, 2])) == (7, 7)
    assert float(result.entropy[0, 2]) == 0.0
    assert bool((result.sample[~bad] % 4 != 0).all())          # never a -inf token
    _check_invariants(result, after, 40)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")   # intended fp32 overflow to -inf
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_huge_finite_logits(backend, dtype):
    """Finite logits at the ends of the dtype's range (finfo.min rows as InfNanRemoveLogitsProcessor
    writes them, values up to finfo.max): finite entropies equal to the reference's, also over
    several chunks and V splits. Independently of the reference: a row at finfo.min everywhere
    is uniform (entropy log V), and elsewhere a finfo.min entry is a banned (-inf) one."""
    if backend == "triton":
        _triton_or_skip()
    rows, uniform_row = huge_finite_logits(dtype)
    vocab = rows.shape[1]
    logits = rows.unsqueeze(0).to(DEVICE)                           # [1, 10, V]
    canvas = torch.zeros(1, rows.shape[0], dtype=torch.int64, device=DEVICE)
    result, after = _run(backend, logits, canvas, 2.0)
    assert bool(torch.isfinite(result.entropy).all()), result.entropy
    assert bool(result.accepted.any())
    expected, expected_after = _run("torch", logits, canvas, 2.0)
    _assert_same(result, after, expected, expected_after)
    assert float(result.entropy[0, uniform_row]) == pytest.approx(math.log(vocab), rel=1e-5)
    banned = torch.where(logits == torch.finfo(dtype).min, float("-inf"), logits)
    banned[0, uniform_row] = logits[0, uniform_row]
    as_banned, as_banned_after = _run(backend, banned, canvas, 2.0)
    _assert_same(result, after, as_banned, as_banned_after)
    if backend == "triton":   # lanes, chunks and splits that see only finfo.min
        for num_splits in (1, 3):
            updated = canvas.clone()
            out = [torch.empty_like(canvas), torch.empty_like(canvas),
                   torch.empty(canvas.shape, device=DEVICE),
                   torch.empty(canvas.shape, dtype=torch.bool, device=DEVICE)]
            triton_eb.entropy_bound_step(logits, updated, 2.0, 1234, *out,
                                         config={"block_v": 16, "num_splits": num_splits,
                                                 "num_warps": 4})
            expected_canvas = canvas.clone()
            reference = reference_entropy_bound.entropy_bound_step(logits, expected_canvas, 2.0,
                                                                   1234)
            _assert_same(ak.EntropyBoundResult(*out), updated, ak.EntropyBoundResult(*reference),
                         expected_canvas)


# --------------------------------------------------------------------------------------------
# Seeds, errors
# --------------------------------------------------------------------------------------------

def test_generator_reproducibility_and_advance():
    logits, canvas = _case(2, 16, 300, scale=0.5, seed=11)
    generator = torch.Generator().manual_seed(5)
    first = ak.entropy_bound_step(logits, canvas.clone(), 0.5, generator=generator)
    second = ak.entropy_bound_step(logits, canvas.clone(), 0.5, generator=generator)
    again = ak.entropy_bound_step(logits, canvas.clone(), 0.5,
                                  generator=torch.Generator().manual_seed(5))
    assert torch.equal(first.sample, again.sample)
    assert not torch.equal(first.sample, second.sample)       # one fresh seed per call


def _bad_calls():
    logits = torch.randn(2, 3, 10)
    canvas = torch.zeros(2, 3, dtype=torch.int64)
    return [
        ("logits", lambda: ak.entropy_bound_step(logits[0], canvas, 0.1)),
        ("logits", lambda: ak.entropy_bound_step(logits.double(), canvas, 0.1)),
        ("logits", lambda: ak.entropy_bound_step(logits[..., :0], canvas, 0.1)),
        ("canvas", lambda: ak.entropy_bound_step(logits, canvas[:, :2], 0.1)),
        ("canvas", lambda: ak.entropy_bound_step(logits, canvas.int(), 0.1)),
        ("canvas", lambda: ak.entropy_bound_step(logits, [[0, 0, 0]] * 2, 0.1)),
        ("entropy_bound", lambda: ak.entropy_bound_step(logits, canvas, -0.1)),
        ("entropy_bound", lambda: ak.entropy_bound_step(logits, canvas, float("nan"))),
        ("entropy_bound", lambda: ak.entropy_bound_step(logits, canvas, "0.1")),
        ("entropy_bound", lambda: ak.entropy_bound_step(logits, canvas, True)),
        ("generator", lambda: ak.entropy_bound_step(logits, canvas, 0.1, generator=3)),
        ("backend", lambda: ak.entropy_bound_step(logits, canvas, 0.1, backend="numpy")),
    ]


@pytest.mark.parametrize("argument,call", _bad_calls(), ids=[c[0] for c in _bad_calls()])
def test_bad_input_raises_value_error(argument, call):
    with pytest.raises(ValueError, match=argument):
        call()


def test_bad_input_leaves_canvas_alone():
    logits = torch.randn(2, 3, 10)
    canvas = torch.full((2, 3), 4, dtype=torch.int64)
    with pytest.raises(ValueError):
        ak.entropy_bound_step(logits, canvas, -1.0)
    assert bool((canvas == 4).all())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only path")
def test_cuda_backend_unavailable():
    logits = torch.randn(1, 2, 10)
    canvas = torch.full((1, 2), 4, dtype=torch.int64)
    with pytest.raises(ak.BackendUnavailable):
        ak.entropy_bound_step(logits, canvas, 0.1, backend="cuda")
    assert bool((canvas == 4).all())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_device_checks():
    logits = torch.randn(1, 2, 10, device="cuda")
    with pytest.raises(ValueError, match="canvas"):
        ak.entropy_bound_step(logits, torch.zeros(1, 2, dtype=torch.int64), 0.1)
    with pytest.raises(ak.BackendUnavailable):
        ak.entropy_bound_step(logits, torch.zeros(1, 2, dtype=torch.int64, device="cuda"), 0.1,
                              backend="cuda")
    assert math.isfinite(float(ak.entropy_bound_step(
        logits, torch.zeros(1, 2, dtype=torch.int64, device="cuda"), 0.1).entropy[0, 0]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["flat", "lm-like"])
def test_cuda_triton_at_gemma_vocabulary(kind):
    """The compiled Triton kernels (split V, the chunk skip of the Gumbel draws) against the
    reference at DiffusionGemma's vocabulary, bf16."""
    batch, length, vocab = 2, 64, 262144
    gen = torch.Generator(device="cuda").manual_seed(1)
    raw = torch.randn(batch, length, vocab, generator=gen, device="cuda")
    if kind == "lm-like":
        peaks = torch.randint(0, vocab, (batch, length, 16), generator=gen, device="cuda")
        raw = raw * 1.5
        raw.scatter_add_(-1, peaks, torch.full((batch, length, 16), 12.0, device="cuda"))
        raw = raw / 0.6
    logits = raw.to(torch.bfloat16)
    canvas = torch.randint(0, vocab, (batch, length), generator=gen, device="cuda")
    result, after = _run("triton", logits, canvas, 0.5)
    expected, expected_after = _run("torch", logits, canvas, 0.5)
    _assert_same(result, after, expected, expected_after)
    _check_invariants(result, after, vocab)
