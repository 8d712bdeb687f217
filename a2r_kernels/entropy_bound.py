"""``entropy_bound_step``: one step of uniform-noise diffusion (DiffusionGemma's entropy-bound
sampler), as one op.

Formulas, tie rules and the RNG layout live in :mod:`a2r_kernels.reference_entropy_bound` (the
spec); the Triton kernels in :mod:`a2r_kernels.triton.entropy_bound`. There is no CUDA kernel yet.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch

from . import reference_entropy_bound
from .backend import resolve_backend
from .errors import BackendUnavailable
from .denoise import _check_logits_and_tokens, _draw_seed


class EntropyBoundResult(NamedTuple):
    """Outputs of :func:`entropy_bound_step`, each ``[B, L]``, contiguous, on the logits' device.

    sample: int64, a draw from ``softmax(logits)`` at every position.
    argmax: int64, ``argmax_v logits`` (lowest index on ties).
    entropy: float32, the entropy of ``softmax(logits)`` (``+inf`` where there is no
        distribution, see :func:`entropy_bound_step`).
    accepted: bool, the positions whose ``sample`` was written to the canvas.
    """

    sample: torch.Tensor
    argmax: torch.Tensor
    entropy: torch.Tensor
    accepted: torch.Tensor


def resolve_entropy_bound_backend(backend: str, device: torch.device) -> str:
    """The backend ``entropy_bound_step`` runs for ``backend`` on ``device``; raises
    :class:`BackendUnavailable` (``"cuda"``: no CUDA kernel yet) or ValueError. Callers that run
    models first use it to fail before any forward."""
    chosen = resolve_backend("entropy_bound_step", backend, torch.device(device))
    if chosen == "cuda":
        raise BackendUnavailable("entropy_bound_step: backend='cuda' is unavailable: the CUDA "
                                 "extension has no entropy-bound kernel; use 'triton'")
    return chosen


def entropy_bound_step(logits: torch.Tensor, canvas: torch.Tensor, entropy_bound: float, *,
                       generator: torch.Generator | None = None,
                       backend: str = "auto") -> EntropyBoundResult:
    r"""One entropy-bound step: sample every position, accept the low-entropy ones, renoise the rest.

    Per position ``(b, l)``, with ``p = softmax(x)``, ``x = logits[b, l]`` and Gumbel noise
    ``g = -log(-log u)``::

        sample  = argmax_v (x_v + g_v)        a draw from p (Gumbel-max; denoise_step's stream)
        argmax  = argmax_v x_v
        entropy = -sum_v p_v log p_v          (fp32; 0 log 0 = 0)

    then per row ``b``, positions sorted by entropy ascending (stable: ties -> lower position),
    ``e_(1) <= e_(2) <= ...``::

        accepted_(k) = cumsum(e)_(k) - e_(k) <= entropy_bound
        canvas[b, l] = sample[b, l]           where accepted
                     = uniform token in [0, V) elsewhere (renoised)

    This is one step of transformers' DiffusionGemma ``EntropyBoundSampler`` (its
    ``torch.multinomial`` draw, ``argmax``, ``Categorical(logits).entropy()``, ``accept_canvas``
    and ``renoise_canvas``) in one pass over V per position, with no ``[B, L, V]`` intermediate
    on the Triton backend. The temperature schedule is the caller's: pass processed logits.

    Non-finite logits (as ``denoise_step``): ``-inf`` entries are tokens of probability 0. A
    position whose logits hold a NaN, or no entry above ``-inf``, has no distribution: its
    ``entropy`` is ``+inf``, its ``sample`` and ``argmax`` are 0, and it is never accepted (always
    renoised). A position holding ``+inf`` (no NaN) is the point mass on its lowest ``+inf``
    index: ``sample = argmax =`` that index, ``entropy = 0``. Nothing is NaN; no extra pass over
    the logits is spent on these checks.

    Args:
        logits: ``[B, L, V]`` float32 / float16 / bfloat16, any strides (last-dim stride 1 is the
            fast path), ``1 <= V < 2**31``.
        canvas: ``[B, L]`` int64 on the logits' device, any strides. Updated in place.
        entropy_bound: float ``>= 0`` (``inf`` accepts everything).
        generator: source of the step's seed (default: torch's global CPU generator); one seed
            is drawn per call. All backends turn it into the same Philox stream (see
            :mod:`a2r_kernels.reference_entropy_bound`), so a seeded step gives the same
            ``sample`` and renoise tokens on every backend (up to fp32 rounding of the logits).
        backend: ``"auto"``, ``"triton"`` or ``"torch"``; ``"cuda"`` raises
            :class:`BackendUnavailable` (no CUDA kernel yet).

    Returns:
        :class:`EntropyBoundResult` ``(sample, argmax, entropy, accepted)``, each ``[B, L]``.

    Example::

        >>> logits = torch.randn(2, 8, 1000)
        >>> canvas = torch.randint(0, 1000, (2, 8))
        >>> res = entropy_bound_step(logits, canvas, 0.1)
        >>> bool((canvas[res.accepted] == res.sample[res.accepted]).all())
        True
    """
    batch, length, vocab = _check_logits_and_tokens(logits, canvas, "canvas")
    if isinstance(entropy_bound, bool) or not isinstance(entropy_bound, numbers.Real) or \
            math.isnan(entropy_bound) or entropy_bound < 0:
        raise ValueError(f"entropy_bound must be a float >= 0, got {entropy_bound!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator)}")
    chosen = resolve_entropy_bound_backend(backend, logits.device)
    if logits.stride(-1) != 1 and logits.numel() > 0:
        logits = logits.contiguous()   # the kernels stream each row of V as a unit-stride vector
    seed = _draw_seed(generator)
    bound = float(entropy_bound)

    if chosen == "torch":
        return EntropyBoundResult(*reference_entropy_bound.entropy_bound_step(
            logits, canvas, bound, seed))
    from .triton import entropy_bound as triton_entropy_bound

    shape = (batch, length)
    sample = torch.empty(shape, dtype=torch.int64, device=logits.device)
    argmax = torch.empty(shape, dtype=torch.int64, device=logits.device)
    entropy = torch.empty(shape, dtype=torch.float32, device=logits.device)
    accepted = torch.empty(shape, dtype=torch.bool, device=logits.device)
    triton_entropy_bound.entropy_bound_step(logits, canvas, bound, seed, sample, argmax, entropy,
                                            accepted)
    return EntropyBoundResult(sample, argmax, entropy, accepted)
