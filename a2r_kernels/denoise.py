"""``denoise_step``: one step of masked iterative denoising (LLaDA / Fast-dLLM), as one op.

Formulas, tie rules and the counter-based RNG layout live in
:mod:`a2r_kernels.reference_denoise` (the spec); the Triton kernels in
:mod:`a2r_kernels.triton.denoise`; the CUDA twin in ``csrc/`` (``a2r_kernels._cuda_ops``).
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch

from . import reference_denoise
from .backend import resolve_backend
from .vocab import INT32_MAX, REMASKING, SEED_BOUND, as_int, non_negative_int

_LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (r * V) >> 32 of a uint32 r must fit int64, and vocabulary ids int32 inside the kernels.
_MAX_VOCAB = INT32_MAX


class DenoiseResult(NamedTuple):
    """Outputs of :func:`denoise_step`, each ``[B, L]`` on the logits' device.

    x0: int64, the predicted token of every position (the token itself where unmasked).
    confidence: float32, the remasking score (``-inf`` where unmasked).
    transferred: bool, the positions committed to ``tokens`` by this step.
    """

    x0: torch.Tensor
    confidence: torch.Tensor
    transferred: torch.Tensor


def _draw_seed(generator: torch.Generator | None) -> int:
    """A seed in ``[0, SEED_BOUND = 2**63 - 1)`` from ``generator`` (default: torch's global CPU generator).

    A CPU generator costs no device sync; a CUDA generator costs one ``.item()``.
    """
    device = generator.device if generator is not None else torch.device("cpu")
    return int(torch.randint(0, SEED_BOUND, (1,), generator=generator, device=device).item())


def _check_logits_and_tokens(logits, tokens, tokens_name: str) -> tuple[int, int, int]:
    """Checks of a diffusion step's ``logits [B, L, V]`` (fp32/fp16/bf16, ``1 <= V <=
    _MAX_VOCAB``) and its int64 ``[B, L]`` token state on the logits' device (called
    ``tokens_name`` in the errors); returns ``(B, L, V)``."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise ValueError("logits must be a tensor [B, L, V], got "
                         f"{list(logits.shape) if isinstance(logits, torch.Tensor) else type(logits)}")
    if logits.dtype not in _LOGIT_DTYPES:
        raise ValueError(f"logits must be float32, float16 or bfloat16, got {logits.dtype}")
    batch, length, vocab = logits.shape
    if not 1 <= vocab <= _MAX_VOCAB:
        raise ValueError(f"logits must have 1 <= V <= {_MAX_VOCAB} (shape [B, L, V]), got V = {vocab}")
    if not isinstance(tokens, torch.Tensor) or tuple(tokens.shape) != (batch, length):
        raise ValueError(f"{tokens_name} must be a tensor [B, L] = [{batch}, {length}], got "
                         f"{list(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens)}")
    if tokens.dtype != torch.int64:
        raise ValueError(f"{tokens_name} must be int64, got {tokens.dtype}")
    if tokens.device != logits.device:
        raise ValueError(f"{tokens_name} must be on the logits' device {logits.device}, "
                         f"got {tokens.device}")
    return batch, length, vocab


def _check_num_transfer(num_transfer, batch: int, device: torch.device) -> torch.Tensor:
    """``num_transfer`` (int or integer tensor ``[B]``) -> contiguous int64 ``[B]`` on ``device``."""
    if not isinstance(num_transfer, torch.Tensor):
        count = non_negative_int(num_transfer, "num_transfer")
        return torch.full((batch,), count, dtype=torch.int64, device=device)
    if num_transfer.dtype.is_floating_point or num_transfer.dtype.is_complex or \
            num_transfer.dtype == torch.bool:
        raise ValueError(f"num_transfer must have an integer dtype, got {num_transfer.dtype}")
    if tuple(num_transfer.shape) != (batch,):
        raise ValueError(f"num_transfer must have shape [B] = [{batch}], got "
                         f"{list(num_transfer.shape)}")
    if num_transfer.device != device and num_transfer.device.type != "cpu":
        raise ValueError(f"num_transfer must be on {device} (or the CPU), got {num_transfer.device}")
    # One host sync on CUDA; skipped while capturing a CUDA graph (the kernels clamp negative
    # counts to zero, so nothing can go out of bounds either way).
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if not capturing and batch > 0 and bool((num_transfer < 0).any()):
        raise ValueError(f"num_transfer must be >= 0, got {num_transfer.tolist()}")
    return num_transfer.to(device=device, dtype=torch.int64, non_blocking=True).contiguous()


def _check_finite_rows(logits: torch.Tensor, masked: torch.Tensor) -> None:
    """ValueError naming the first masked position whose row max is not finite: the max
    propagates NaN, is +inf with a +inf entry and -inf with no entry above -inf."""
    if logits.numel() == 0:
        return
    bad = masked & ~torch.isfinite(logits.amax(dim=-1))
    if bool(bad.any()):
        b, l = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"logits[{b}, {l}] (a masked position) holds a NaN or +inf, or no logit "
                         "above -inf (check_finite=True)")


class _StepArgs(NamedTuple):
    """The checked scalar arguments of a denoise step: exactly one of ``quota`` (int64 ``[B]`` on
    the logits' device) and ``threshold`` is set."""

    mask_id: int
    quota: torch.Tensor | None
    threshold: float | None
    temperature: float


def _check_step_args(logits, tokens, mask_id, num_transfer, threshold, temperature, remasking,
                     generator, check_finite) -> _StepArgs:
    """Every check of :func:`denoise_step` (ValueError naming the argument), nothing changed."""
    batch, _, vocab = _check_logits_and_tokens(logits, tokens, "tokens")
    mask_id = as_int(mask_id, "mask_id")
    if not 0 <= mask_id < vocab:
        raise ValueError(f"mask_id must be an int in [0, V) = [0, {vocab}), got {mask_id!r}")
    if (num_transfer is None) == (threshold is None):
        raise ValueError("exactly one of num_transfer and threshold must be given, got "
                         f"num_transfer={num_transfer!r}, threshold={threshold!r}")
    if threshold is not None:
        if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or \
                not math.isfinite(threshold):
            raise ValueError(f"threshold must be a finite float, got {threshold!r}")
        threshold = float(threshold)
        quota = None
    else:
        quota = _check_num_transfer(num_transfer, batch, logits.device)
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or \
            not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite float >= 0, got {temperature!r}")
    if remasking not in REMASKING:
        raise ValueError(f"remasking must be one of {REMASKING}, got {remasking!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator)}")
    if not isinstance(check_finite, bool):
        raise ValueError(f"check_finite must be a bool, got {check_finite!r}")
    if check_finite:
        _check_finite_rows(logits, tokens == mask_id)
    return _StepArgs(mask_id, quota, threshold, float(temperature))


def _dispatch(chosen: str, logits: torch.Tensor, tokens: torch.Tensor, args: _StepArgs,
              remasking: str, seed: int) -> DenoiseResult:
    """Run the step on backend ``chosen`` (checked inputs, logits unit-stride in V)."""
    step_args = (args.mask_id, args.quota, args.threshold, args.temperature, remasking, seed)
    if chosen == "torch":
        x0, confidence, transferred = reference_denoise.denoise_step(logits, tokens, *step_args)
        return DenoiseResult(x0, confidence.float(), transferred)

    batch, length = tokens.shape
    x0 = torch.empty(batch, length, dtype=torch.int64, device=logits.device)
    confidence = torch.empty(batch, length, dtype=torch.float32, device=logits.device)
    transferred = torch.empty(batch, length, dtype=torch.bool, device=logits.device)
    if chosen == "triton":
        from .triton import denoise as triton_denoise
        triton_denoise.denoise_step(logits, tokens, *step_args, x0, confidence, transferred)
    else:  # "cuda"
        from . import _cuda_ops
        _cuda_ops.denoise_step(logits, tokens, *step_args, x0, confidence, transferred)
    return DenoiseResult(x0, confidence, transferred)


def denoise_step(logits: torch.Tensor, tokens: torch.Tensor, mask_id: int, *,
                 num_transfer: int | torch.Tensor | None = None, threshold: float | None = None,
                 temperature: float = 0.0, remasking: str = "low_confidence",
                 generator: torch.Generator | None = None, backend: str = "auto",
                 check_finite: bool = False) -> DenoiseResult:
    r"""One masked-denoising step: predict every masked position, commit the most confident ones.

    For each row ``b`` and position ``l`` (Gumbel noise ``g = -log(-log u)``, ``p = softmax(x)``)::

        x0[b, l]   = argmax_v x[b, l, v]                          if temperature == 0
                   = argmax_v x[b, l, v] / temperature + g[b, l, v]  otherwise  (LLaDA's
                                                                   add_gumbel_noise, in log space)
        confidence = p[x0]          ("low_confidence")      p_(1) - p_(2)  ("margin")
                   = sum_v p log p  ("entropy")             u[b, l]        ("random")
                     at masked positions (tokens == mask_id), -inf elsewhere
        commit     = the min(num_transfer[b], #masked) most confident masked positions of row b
                     (ties -> lower position), or with ``threshold``: every masked position with
                     confidence >= threshold, and always the most confident one (Fast-dLLM)
        tokens[b, l] = x0[b, l] where committed   (in place; other positions never change)

    At ``temperature=0, remasking="low_confidence"`` this is one step of LLaDA's reference sampler
    (``generate.py``) over the given window. Argmax ties go to the lowest index (``torch.argmax``).

    Non-finite logits at a masked position (the same answer on every backend, at no extra pass
    over the logits; unmasked positions never read their logits):

    - a row holding a NaN, or no logit above ``-inf``, has no distribution: ``x0 = mask_id``,
      ``confidence = NaN`` and the position is never committed. Only committable positions
      (masked, confidence not NaN) are ranked: ``num_transfer`` clamps to their count and the
      threshold rule's "at least one" is the most confident committable position, if any;
    - a row holding ``+inf`` (and no NaN) is the point mass on its lowest ``+inf`` index: that is
      ``x0`` at any temperature, with confidence 1 (``"low_confidence"``, ``"margin"``), 0
      (``"entropy"``) or the uniform score (``"random"``);
    - ``-inf`` entries are banned tokens: ``p = 0``, ``0 log 0 = 0``.

    ``check_finite=True`` instead raises ``ValueError`` on the first two (one more pass over the
    masked rows, and a host sync).

    Args:
        logits: ``[B, L, V]`` float32 / float16 / bfloat16, any strides (last-dim stride 1 is the
            fast path). NaN and ``+inf`` entries are allowed: see above.
        tokens: ``[B, L]`` int64 on the logits' device, any strides. Updated in place.
        mask_id: the mask token, ``0 <= mask_id < V``.
        num_transfer: int, or integer tensor ``[B]`` (on the logits' device or the CPU): how many
            masked positions each row commits; clamped to the masked count; negative is an error.
        threshold: finite float, instead of ``num_transfer``. Exactly one of the two is given.
        temperature: ``>= 0``; 0 is greedy.
        remasking: ``"low_confidence"``, ``"margin"``, ``"entropy"`` or ``"random"``.
        generator: source of the step's seed when ``temperature > 0`` or ``remasking="random"``
            (default: torch's global CPU generator); nothing is drawn otherwise. All backends turn
            the seed into the same Philox stream (see :mod:`a2r_kernels.reference_denoise`), so a
            seeded step gives the same sample on every backend up to fp32 rounding.
        backend: ``"auto"``, ``"cuda"``, ``"triton"`` or ``"torch"``.
        check_finite: raise ``ValueError`` (before anything changes) when a masked position's
            logits hold a NaN or ``+inf`` or no logit above ``-inf``.

    Returns:
        :class:`DenoiseResult` ``(x0 int64 [B, L], confidence float32 [B, L],
        transferred bool [B, L])``, contiguous, on the logits' device.

    Example::

        >>> logits = torch.randn(2, 8, 1000)
        >>> tokens = torch.full((2, 8), 999)                  # all masked, mask_id = 999
        >>> res = denoise_step(logits, tokens, 999, num_transfer=2)
        >>> int(res.transferred.sum()), bool((tokens != 999).sum() == 4)
        (4, True)
    """
    args = _check_step_args(logits, tokens, mask_id, num_transfer, threshold, temperature,
                            remasking, generator, check_finite)
    if logits.stride(-1) != 1 and logits.numel() > 0:
        logits = logits.contiguous()   # the kernels stream each row of V as a unit-stride vector
    chosen = resolve_backend("denoise_step", backend, logits.device)
    needs_seed = args.temperature > 0 or remasking == "random"
    seed = _draw_seed(generator) if needs_seed else 0
    return _dispatch(chosen, logits, tokens, args, remasking, seed)
