"""Helpers shared by the denoise_step tests: the backends under test, tolerances, random cases,
one step on a backend and the checks of its result.

Without a GPU, Triton kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set here too,
before anything imports triton).
"""

import os

import torch  # importing torch does not import triton

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import a2r_kernels as ak  # noqa: E402


DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
KERNEL_BACKENDS = ["triton"] + (["cuda"] if torch.cuda.is_available() else [])
ALL_BACKENDS = ["torch"] + KERNEL_BACKENDS
REMASKING = ["low_confidence", "margin", "entropy", "random"]
# Both sides compute in fp32 from the same (upcast) logits; they differ only in summation order
# and the exp/log implementation. entropy sums V terms of p log p, hence its looser atol.
CONF_RTOL = 1e-5
CONF_ATOL = {"low_confidence": 1e-6, "margin": 1e-6, "entropy": 2e-5, "random": 0.0}
MASK_ID = 7


def _backend_or_skip(backend):
    try:
        ak.backend.resolve_backend("denoise_step", backend, DEVICE)
    except ak.BackendUnavailable as exc:
        pytest.skip(str(exc))


def _make_case(batch, length, vocab, *, masked_fraction=0.7, dtype=torch.float32, scale=3.0,
               seed=0):
    """Random logits [B, L, V] and tokens [B, L] with about ``masked_fraction`` masked."""
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(batch, length, vocab, generator=gen) * scale).to(dtype)
    tokens = torch.randint(0, vocab, (batch, length), generator=gen)
    tokens[tokens == MASK_ID] = (MASK_ID + 1) % max(vocab, 1)
    masked = torch.rand(batch, length, generator=gen) < masked_fraction
    tokens[masked] = MASK_ID
    return logits.to(DEVICE), tokens.to(DEVICE)


def _run(backend, logits, tokens, seed=1234, mask_id=MASK_ID, **kwargs):
    """One step on a copy of ``tokens``; returns (result, updated tokens)."""
    updated = tokens.clone()
    generator = torch.Generator().manual_seed(seed)
    result = ak.denoise_step(logits, updated, mask_id, backend=backend, generator=generator,
                             **kwargs)
    return result, updated


def _assert_same(result, tokens_after, expected, expected_tokens, remasking="low_confidence"):
    torch.testing.assert_close(result.x0, expected.x0, rtol=0, atol=0)
    torch.testing.assert_close(result.confidence, expected.confidence, rtol=CONF_RTOL,
                               atol=CONF_ATOL[remasking])
    assert torch.equal(result.transferred, expected.transferred)
    assert torch.equal(tokens_after, expected_tokens)


def _check_invariants(result, tokens_before, tokens_after, mask_id=MASK_ID):
    """What must hold for any backend, whatever the logits."""
    masked = tokens_before == mask_id
    assert result.x0.dtype == torch.int64 and result.confidence.dtype == torch.float32
    assert result.transferred.dtype == torch.bool
    assert torch.equal(result.x0[~masked], tokens_before[~masked])
    assert bool((result.confidence[~masked] == float("-inf")).all())
    assert bool(torch.isfinite(result.confidence[masked]).all())
    assert not bool(result.transferred[~masked].any())
    expected_tokens = torch.where(result.transferred, result.x0, tokens_before)
    assert torch.equal(tokens_after, expected_tokens)
