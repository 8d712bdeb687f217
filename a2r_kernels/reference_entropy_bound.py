"""Plain-torch fp32 reference of ``entropy_bound_step``: the spec the Triton kernels match.

One step of uniform-noise diffusion with the entropy-bound sampler of transformers'
DiffusionGemma (``EntropyBoundSampler``; Lavenant et al., arXiv 2505.24857), for ``B`` rows of
``L`` positions over a vocabulary of ``V``. ``x = logits`` are already temperature-processed.

1. Per position ``pos = b * L + l``:
   ``argmax = argmax_v x[v]`` (ties -> lowest ``v``, as ``torch.argmax``);
   ``sample = argmax_v (x[v] + g[v])``, ``g = -log(-log u)`` the Gumbel noise of ``denoise_step``
   (Philox counter ``(v, pos, 0, 0)``, :mod:`a2r_kernels.reference_denoise`), i.e. a draw from
   ``softmax(x)``;
   ``entropy = -sum_v p_v log p_v`` with ``p = softmax(x)`` (``0 log 0 = 0``), in fp32.
2. Per row, positions ordered by entropy ascending (a stable sort: ties -> lower position) with
   sorted entropies ``e_(1) <= e_(2) <= ...``: position ``(k)`` is accepted when
   ``cumsum(e)_(k) - e_(k) <= entropy_bound``, transformers' rule verbatim (for exact arithmetic
   that is the longest prefix whose entropies before the last sum to at most the bound: the
   first position is always accepted).
3. ``canvas[pos] = sample`` where accepted; elsewhere the position is renoised with the uniform
   token ``(r * V) >> 32`` (``r`` the uint32 Philox word at counter ``(0, pos, 2, 0)``; exactly
   uniform when ``V`` is a power of two, otherwise within ``V / 2**32`` of uniform).

Non-finite logits (the rules of ``denoise_step``): a position whose logits hold a NaN, or no
entry above ``-inf``, has no distribution: its ``entropy`` is ``+inf``, ``sample`` and ``argmax``
are 0, and it is never accepted (so always renoised). A position holding ``+inf`` (and no NaN) is
the point mass on its lowest ``+inf`` index: ``sample = argmax =`` that index, ``entropy = 0``.
``-inf`` logits (banned tokens) are ordinary: probability 0. Nothing is NaN.

The Gumbel-max here skips, exactly, the Philox draws that cannot win (see :func:`gumbel_argmax`).
"""

from __future__ import annotations

import torch

from .reference_denoise import gumbel_argmax, philox_word
from .vocab import GUMBEL_BOUND, NEG_HUGE, RENOISE_STREAM, TOPK_PROBE  # noqa: F401


def entropy_and_argmax(x: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(entropy fp32 [N], argmax int64 [N], valid bool [N], point_mass bool [N]) of fp32
    ``x [N, V]``, the rows classified by their max (which propagates NaN): ``valid`` = no NaN and
    some entry above ``-inf``; ``point_mass`` = valid with a ``+inf`` entry (entropy 0, argmax
    its first ``+inf``). Invalid rows get entropy ``+inf`` and argmax 0.
    """
    row_max, argmax = x.max(dim=-1)          # first index of the max, as torch.argmax
    valid = row_max > float("-inf")          # False for NaN too
    point_mass = row_max == float("inf")
    # H = log s - a / s with z = x - max, s = sum e^z, a = sum e^z z: one exp per entry and no
    # log (softmax + entr would take both). A -inf logit's z is clamped to a finite NEG_HUGE, whose
    # weight e^z is exactly 0, so it adds 0 rather than 0 * (-inf).
    z = (x - row_max[:, None]).clamp_(min=NEG_HUGE)
    weights = z.exp()
    total = weights.sum(dim=-1)
    weighted = (weights * z).sum(dim=-1)
    entropy = torch.where(point_mass, 0.0, total.log() - weighted / total)
    return (torch.where(valid, entropy, float("inf")), torch.where(valid, argmax, 0), valid,
            point_mass)


def accept(entropy: torch.Tensor, entropy_bound: float) -> torch.Tensor:
    """bool ``[B, L]``: transformers' entropy-bound acceptance of fp32 ``entropy [B, L]``, with a
    stable sort (ties -> lower position) and non-finite entropies never accepted."""
    sorted_entropy, order = torch.sort(entropy, dim=-1, stable=True)
    cumulative = torch.cumsum(sorted_entropy, dim=-1)
    selected = (cumulative - sorted_entropy <= entropy_bound) & torch.isfinite(sorted_entropy)
    return torch.zeros_like(selected).scatter(-1, order, selected)


def renoise_tokens(seed: int, batch: int, length: int, vocab: int, device) -> torch.Tensor:
    """int64 ``[batch, length]`` uniform tokens in ``[0, vocab)``: ``(r * vocab) >> 32`` with
    ``r`` the Philox word at counter ``(0, b * length + l, RENOISE_STREAM, 0)``."""
    positions = torch.arange(batch * length, device=device).view(batch, length)
    r = philox_word(seed, torch.zeros_like(positions), positions, RENOISE_STREAM)
    return (r * vocab) >> 32


def entropy_bound_step(logits: torch.Tensor, canvas: torch.Tensor, entropy_bound: float,
                       seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fp32 reference step; see the module docstring for the formulas.

    logits [B, L, V] float (any strides); canvas int64 [B, L], updated in place;
    ``seed`` in ``[0, 2**63)``. Returns (sample int64, argmax int64, entropy fp32,
    accepted bool), each [B, L]. Inputs are assumed valid (the public op checks them).
    """
    batch, length, vocab = logits.shape
    x = logits.float().reshape(batch * length, vocab)
    entropy, argmax, valid, point_mass = entropy_and_argmax(x)
    sample = torch.where(point_mass, argmax, gumbel_argmax(x, seed, valid & ~point_mass))
    entropy = entropy.view(batch, length)
    accepted = accept(entropy, entropy_bound)
    sample = sample.view(batch, length)
    noise = renoise_tokens(seed, batch, length, vocab, logits.device)
    canvas.copy_(torch.where(accepted, sample, noise))
    return sample, argmax.view(batch, length), entropy, accepted
