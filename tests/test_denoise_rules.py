"""denoise_step's selection rules on every backend, checked against the rules themselves (not only
the reference): all / none masked, per-row num_transfer, the threshold rule, ties, empty and
single positions, banned entries, non-finite and huge finite logits, check_finite; and the
reference against an independent LLaDA / Fast-dLLM style step written here.

Without a GPU, Triton kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set before
anything imports triton), on small shapes.
"""

import math
import os

import torch  # importing torch does not import triton

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import a2r_kernels as ak  # noqa: E402
from a2r_kernels import reference_denoise  # noqa: E402
from a2r_kernels.triton import denoise as triton_denoise  # noqa: E402
from _helpers import huge_finite_logits  # noqa: E402

from _denoise_helpers import (ALL_BACKENDS, CONF_ATOL, CONF_RTOL, DEVICE, MASK_ID,  # noqa: E402
                              REMASKING, _assert_same, _backend_or_skip, _check_invariants,
                              _make_case, _run)


# --------------------------------------------------------------------------------------------
# Selection rules (checked on every backend, against the rule itself, not only the reference)
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_all_masked_and_none_masked(backend):
    _backend_or_skip(backend)
    logits, tokens = _make_case(2, 5, 64, masked_fraction=1.0, seed=8)
    tokens[1] = torch.arange(5, device=DEVICE) + 20          # row 1: nothing masked
    before = tokens.clone()
    result, after = _run(backend, logits, tokens, num_transfer=3)
    assert int(result.transferred[0].sum()) == 3
    assert not bool(result.transferred[1].any())
    assert torch.equal(after[1], before[1])
    _check_invariants(result, before, after)
    result, after = _run(backend, logits, tokens, threshold=2.0)   # nothing reaches 2
    assert result.transferred.sum(1).tolist() == [1, 0]
    _check_invariants(result, before, after)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_num_transfer_clamped_and_per_row(backend):
    _backend_or_skip(backend)
    logits, tokens = _make_case(4, 9, 50, masked_fraction=0.5, seed=9)
    masked_count = (tokens == MASK_ID).sum(1)
    result, after = _run(backend, logits, tokens, num_transfer=100)
    assert torch.equal(result.transferred.sum(1), masked_count)
    assert torch.equal(after, torch.where(tokens == MASK_ID, result.x0, tokens))
    quota = torch.tensor([0, 1, 2, 1000], device=DEVICE)
    result, after = _run(backend, logits, tokens, num_transfer=quota)
    assert torch.equal(result.transferred.sum(1), torch.minimum(quota, masked_count))
    # The committed ones are the most confident of their row.
    for b in range(4):
        chosen = result.confidence[b][result.transferred[b]]
        rest = result.confidence[b][(tokens[b] == MASK_ID) & ~result.transferred[b]]
        if chosen.numel() and rest.numel():
            assert float(chosen.min()) >= float(rest.max())
    result, after = _run(backend, logits, tokens, num_transfer=0)
    assert not bool(result.transferred.any()) and torch.equal(after, tokens)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_threshold_rule(backend):
    _backend_or_skip(backend)
    logits, tokens = _make_case(3, 11, 40, masked_fraction=0.8, scale=4.0, seed=10)
    tokens[2] = 3                                              # row 2: nothing masked
    for threshold in (0.0, 0.3, 0.6, 1.5):
        result, after = _run(backend, logits, tokens, threshold=threshold)
        masked = tokens == MASK_ID
        for b in range(3):
            conf = result.confidence[b]
            if not bool(masked[b].any()):
                assert not bool(result.transferred[b].any())
                continue
            expected = masked[b] & (conf >= threshold)
            expected[int(conf.argmax())] = True                # the most confident, always
            assert torch.equal(result.transferred[b], expected)
        _check_invariants(result, tokens, after)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_ties_go_to_lower_positions(backend):
    """Identical logits rows give identical confidences: the lower positions are committed."""
    _backend_or_skip(backend)
    gen = torch.Generator().manual_seed(12)
    logits = torch.randn(2, 8, 30, generator=gen)
    logits[:, :] = logits[:, :1]                               # every position the same row
    logits = logits.to(DEVICE)
    tokens = torch.full((2, 8), MASK_ID, device=DEVICE)
    tokens[0, 1] = 3
    tokens[1, 0] = 3
    for remasking in ("low_confidence", "margin", "entropy"):
        result, after = _run(backend, logits, tokens, num_transfer=3, remasking=remasking)
        assert result.transferred[0].nonzero().flatten().tolist() == [0, 2, 3]
        assert result.transferred[1].nonzero().flatten().tolist() == [1, 2, 3]
        result, after = _run(backend, logits, tokens, threshold=2.0, remasking=remasking)
        assert result.transferred.nonzero().tolist() == [[0, 0], [1, 1]]
    # Argmax ties inside a row: the lowest vocabulary index.
    tied = torch.zeros(1, 3, 30, device=DEVICE)
    tied[0, :, [4, 9, 17]] = 5.0
    result, _ = _run(backend, tied, torch.full((1, 3), MASK_ID, device=DEVICE), num_transfer=1)
    assert result.x0.tolist() == [[4, 4, 4]]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_empty_and_single_position(backend):
    _backend_or_skip(backend)
    for batch, length in ((0, 4), (3, 0)):
        logits = torch.randn(batch, length, 10, device=DEVICE)
        tokens = torch.full((batch, length), MASK_ID, device=DEVICE)
        result = ak.denoise_step(logits, tokens, MASK_ID, num_transfer=1, backend=backend)
        assert result.x0.shape == (batch, length) and result.transferred.shape == (batch, length)
    logits, tokens = _make_case(1, 1, 100, masked_fraction=1.0, seed=13)
    result, after = _run(backend, logits, tokens, threshold=0.999)
    assert result.transferred.tolist() == [[True]]
    assert after.tolist() == [[int(logits[0, 0].argmax())]]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_masked_out_vocabulary_entries(backend):
    """-inf logits (banned tokens) contribute p = 0 and 0 log 0 = 0: finite scores, no NaN."""
    _backend_or_skip(backend)
    logits, tokens = _make_case(2, 4, 90, masked_fraction=1.0, seed=14)
    logits[..., ::3] = float("-inf")
    logits[1, 2, :] = float("-inf")
    logits[1, 2, 1] = 0.5                                      # a single live entry
    for remasking in ("low_confidence", "margin", "entropy"):
        result, after = _run(backend, logits, tokens, num_transfer=2, remasking=remasking)
        expected, expected_after = _run("torch", logits, tokens, num_transfer=2,
                                        remasking=remasking)
        assert bool(torch.isfinite(result.confidence).all())
        _assert_same(result, after, expected, expected_after, remasking)
        assert int(result.x0[1, 2]) == 1


def _non_finite_case(vocab=50):
    """Logits [3, 6, vocab] whose masked rows hold NaN, +inf and all -inf, and what each position
    must give: ``undefined`` (x0 = mask_id, confidence NaN, never committed) or the index of a
    point mass (x0 = the lowest +inf index), else None (an ordinary row)."""
    nan, inf = float("nan"), float("inf")
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 6, vocab, generator=gen) * 2
    tokens = torch.full((3, 6), MASK_ID)
    expect = [[None] * 6 for _ in range(3)]
    logits[0, 0, 5] = nan;                                   expect[0][0] = "undefined"
    logits[0, 1, [20, 7]] = inf;                             expect[0][1] = 7
    logits[0, 2, :] = -inf;                                  expect[0][2] = "undefined"
    logits[0, 3, 3] = inf; logits[0, 3, vocab - 1] = nan;    expect[0][3] = "undefined"
    logits[0, 5, :] = nan; tokens[0, 5] = 11                 # unmasked: its logits are unread
    logits[1, 0, 0] = nan;                                   expect[1][0] = "undefined"
    logits[1, 1, vocab - 1] = nan;                           expect[1][1] = "undefined"
    logits[1, 3, :] = nan;                                   expect[1][3] = "undefined"
    logits[1, 4, :] = -inf;                                  expect[1][4] = "undefined"
    logits[1, 5, vocab - 6] = inf;                           expect[1][5] = vocab - 6
    logits[2, :, 1] = nan;                                   # row 2: nothing committable
    expect[2] = ["undefined"] * 6
    tokens[2, 0] = 3
    expect[2][0] = None
    return logits, tokens, expect


POINT_MASS_CONFIDENCE = {"low_confidence": 1.0, "margin": 1.0, "entropy": 0.0}


@pytest.mark.filterwarnings("ignore::RuntimeWarning")   # NaN arithmetic in the interpreter
@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("remasking", REMASKING)
@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("selection", [{"num_transfer": 3}, {"threshold": 0.5}])
def test_non_finite_logits(backend, remasking, temperature, selection):
    """NaN / +inf / all -inf rows: the documented semantics, the same on every backend (the
    Triton kernel also over several V splits and chunks): a NaN row is never committed, whatever
    its confidence would sort as, and a +inf row is the point mass on its lowest +inf index."""
    _backend_or_skip(backend)
    logits, tokens, expect = _non_finite_case()
    logits = logits.to(DEVICE)
    tokens = tokens.to(DEVICE)
    result, after = _run(backend, logits, tokens, temperature=temperature, remasking=remasking,
                         **selection)
    x0, conf = result.x0.cpu(), result.confidence.cpu()
    transferred, after = result.transferred.cpu(), after.cpu()
    for b in range(3):
        for l in range(6):
            want = expect[b][l]
            if tokens[b, l] != MASK_ID:
                assert x0[b, l] == tokens[b, l] and conf[b, l] == float("-inf")
                assert not transferred[b, l]
            elif want == "undefined":
                assert x0[b, l] == MASK_ID and bool(conf[b, l].isnan()), (b, l)
                assert not transferred[b, l] and after[b, l] == MASK_ID, (b, l)
            else:
                assert not bool(conf[b, l].isnan()), (b, l)
                if want is not None:
                    assert x0[b, l] == want, (b, l)
                    if remasking != "random":
                        assert conf[b, l] == POINT_MASS_CONFIDENCE[remasking], (b, l)
    # rows 0 and 1 have two committable positions each (a point mass and an ordinary row):
    # num_transfer=3 clamps to them; the threshold rule takes at least one, row 2 none
    committed = transferred.sum(dim=1).tolist()
    if "num_transfer" in selection:
        assert committed == [2, 2, 0]
    else:
        assert committed[0] >= 1 and committed[1] >= 1 and committed[2] == 0
    if backend != "torch":
        expected, expected_after = _run("torch", logits, tokens, temperature=temperature,
                                        remasking=remasking, **selection)
        torch.testing.assert_close(result.confidence, expected.confidence, rtol=CONF_RTOL,
                                   atol=CONF_ATOL[remasking], equal_nan=True)
        assert torch.equal(result.x0, expected.x0)
        assert torch.equal(result.transferred, expected.transferred)
        assert torch.equal(after.to(DEVICE), expected_after)
    if backend == "triton":   # the split merge and the lane merge of the classification
        for config in ({"block_v": 16, "num_splits": 3, "num_warps": 4},):
            updated = tokens.clone()
            out = (torch.empty_like(tokens), torch.empty(tokens.shape, device=DEVICE),
                   torch.empty(tokens.shape, dtype=torch.bool, device=DEVICE))
            quota = torch.full((3,), 3, device=DEVICE) if "num_transfer" in selection else None
            triton_denoise.denoise_step(logits, updated, MASK_ID, quota,
                                        selection.get("threshold"), temperature, remasking,
                                        4321, *out, config=config)
            split_result = ak.DenoiseResult(*out)
            expected_tokens = tokens.clone()
            expected = reference_denoise.denoise_step(
                logits, expected_tokens, MASK_ID, quota, selection.get("threshold"),
                temperature, remasking, 4321)
            torch.testing.assert_close(split_result.confidence, expected[1], rtol=CONF_RTOL,
                                       atol=CONF_ATOL[remasking], equal_nan=True)
            assert torch.equal(split_result.x0, expected[0])
            assert torch.equal(split_result.transferred, expected[2])
            assert torch.equal(updated, expected_tokens)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")   # intended fp32 overflow to -inf
@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("remasking", REMASKING)
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_huge_finite_logits(backend, dtype, remasking, temperature):
    """Finite logits at the ends of the dtype's range (finfo.min rows as InfNanRemoveLogitsProcessor
    writes them, values up to finfo.max): no NaN, and every backend gives the reference's answer,
    also over several chunks and V splits. Independently of the reference: a row at finfo.min
    everywhere is uniform, and elsewhere a finfo.min entry is a banned (-inf) one. With T = 0.8
    the keys x / T of the largest entries overflow to +-inf: ties, lowest index."""
    _backend_or_skip(backend)
    rows, uniform_row = huge_finite_logits(dtype)
    vocab = rows.shape[1]
    logits = rows.unsqueeze(0).to(DEVICE)                       # [1, 10, V], all masked
    tokens = torch.full((1, rows.shape[0]), MASK_ID, device=DEVICE)
    kwargs = dict(temperature=temperature, remasking=remasking, num_transfer=4)
    result, after = _run(backend, logits, tokens, **kwargs)
    assert not bool(result.confidence.isnan().any()), result.confidence
    expected, expected_after = _run("torch", logits, tokens, **kwargs)
    _assert_same(result, after, expected, expected_after, remasking)
    if remasking != "random":
        want = {"low_confidence": 1 / vocab, "margin": 0.0, "entropy": -math.log(vocab)}
        assert float(result.confidence[0, uniform_row]) == pytest.approx(
            want[remasking], rel=1e-5, abs=1e-6)
    banned = torch.where(logits == torch.finfo(dtype).min, float("-inf"), logits)
    banned[0, uniform_row] = logits[0, uniform_row]
    as_banned, _ = _run(backend, banned, tokens, **kwargs)
    _assert_same(result, after, as_banned, _run(backend, banned, tokens, **kwargs)[1], remasking)
    if backend == "triton":   # lanes, chunks and splits that see only finfo.min
        for config in ({"block_v": 16, "num_splits": 1, "num_warps": 4},
                       {"block_v": 16, "num_splits": 3, "num_warps": 4}):
            updated = tokens.clone()
            out = (torch.empty_like(tokens), torch.empty(tokens.shape, device=DEVICE),
                   torch.empty(tokens.shape, dtype=torch.bool, device=DEVICE))
            triton_denoise.denoise_step(logits, updated, MASK_ID, torch.tensor([4], device=DEVICE),
                                        None, temperature, remasking, 1234, *out, config=config)
            expected_tokens = tokens.clone()
            reference = reference_denoise.denoise_step(logits, expected_tokens, MASK_ID,
                                                       torch.tensor([4]), None, temperature,
                                                       remasking, 1234)
            _assert_same(ak.DenoiseResult(*out), updated, ak.DenoiseResult(*reference),
                         expected_tokens, remasking)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_check_finite_raises_before_anything_changes(backend):
    _backend_or_skip(backend)
    logits, tokens, expect = _non_finite_case()
    for b, l in ((0, 0), (0, 1), (0, 2)):   # NaN, +inf, all -inf
        rows = torch.zeros_like(logits)
        rows[b, l] = logits[b, l]
        work = tokens.to(DEVICE)
        with pytest.raises(ValueError, match=rf"logits\[{b}, {l}\].*check_finite"):
            ak.denoise_step(rows.to(DEVICE), work, MASK_ID, num_transfer=2, backend=backend,
                            check_finite=True)
        assert torch.equal(work.cpu(), tokens)
    unmasked_nan = torch.zeros_like(logits)
    unmasked_nan[0, 5] = float("nan")         # an unmasked position: never read, never an error
    unmasked_nan[1, 2, :] = float("-inf")
    unmasked_nan[1, 2, 4] = 0.0               # one live entry is enough
    result = ak.denoise_step(unmasked_nan.to(DEVICE), tokens.to(DEVICE), MASK_ID, num_transfer=1,
                             backend=backend, check_finite=True)
    assert not bool(result.confidence.isnan().any())
    with pytest.raises(ValueError, match="check_finite"):
        ak.denoise_step(logits.to(DEVICE), tokens.to(DEVICE), MASK_ID, num_transfer=1,
                        backend=backend, check_finite=1)


# --------------------------------------------------------------------------------------------
# Against an independent LLaDA / Fast-dLLM style step
# --------------------------------------------------------------------------------------------

def _llada_step(logits, x, mask_id, num_transfer_tokens):
    """One step of LLaDA's generate.py at temperature 0, low_confidence (written out here)."""
    mask_index = x == mask_id
    x0 = torch.argmax(logits, dim=-1)
    p = F.softmax(logits.to(torch.float64), dim=-1)
    x0_p = torch.squeeze(torch.gather(p, dim=-1, index=torch.unsqueeze(x0, -1)), -1)
    x0 = torch.where(mask_index, x0, x)
    confidence = torch.where(mask_index, x0_p, -math.inf)
    transfer_index = torch.zeros_like(x0, dtype=torch.bool)
    for j in range(confidence.shape[0]):
        _, select_index = torch.topk(confidence[j], k=int(num_transfer_tokens[j]))
        transfer_index[j, select_index] = True
    x = x.clone()
    x[transfer_index] = x0[transfer_index]
    return x0, confidence, transfer_index, x


def _fastdllm_step(logits, x, mask_id, threshold):
    """Fast-dLLM's threshold rule: top-1 always, then every masked one with confidence >= it."""
    mask_index = x == mask_id
    x0 = torch.argmax(logits, dim=-1)
    p = F.softmax(logits.to(torch.float64), dim=-1)
    x0_p = torch.gather(p, -1, x0.unsqueeze(-1)).squeeze(-1)
    confidence = torch.where(mask_index, x0_p, -math.inf)
    transfer_index = torch.zeros_like(x0, dtype=torch.bool)
    for j in range(confidence.shape[0]):
        count = int(mask_index[j].sum())
        if count == 0:
            continue
        values, select_index = torch.topk(confidence[j], k=count)
        transfer_index[j, select_index[0]] = True
        transfer_index[j, select_index[1:][values[1:] >= threshold]] = True
    x = x.clone()
    x[transfer_index] = torch.where(mask_index, x0, x)[transfer_index]
    return transfer_index, x


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_matches_llada_step(backend):
    _backend_or_skip(backend)
    logits, tokens = _make_case(4, 13, 257, masked_fraction=0.75, scale=2.0, seed=15)
    masked_count = (tokens == MASK_ID).sum(1)
    quota = torch.minimum(torch.tensor([1, 3, 5, 13], device=DEVICE), masked_count)
    x0, confidence, transfer_index, expected_tokens = _llada_step(logits, tokens, MASK_ID, quota)
    result, after = _run(backend, logits, tokens, num_transfer=quota)
    assert torch.equal(result.x0, x0)
    torch.testing.assert_close(result.confidence, confidence.float(), rtol=1e-5, atol=1e-7)
    assert torch.equal(result.transferred, transfer_index)
    assert torch.equal(after, expected_tokens)
    for threshold in (0.1, 0.5, 0.9):
        transfer_index, expected_tokens = _fastdllm_step(logits, tokens, MASK_ID, threshold)
        result, after = _run(backend, logits, tokens, threshold=threshold)
        assert torch.equal(result.transferred, transfer_index)
        assert torch.equal(after, expected_tokens)
