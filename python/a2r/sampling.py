"""Next-token sampling: temperature, top-k, top-p, the way transformers' logits warpers do it.

The warpers run in transformers' order (``TemperatureLogitsWarper``, ``TopKLogitsWarper``,
``TopPLogitsWarper``), each keeping at least one token. Sampling uses the exponential-race form
of the Gumbel-max trick (``argmax(p / E)``, ``E ~ Exp(1)``, as vLLM and nano-vllm do): it draws
from ``p`` exactly, takes a ``torch.Generator`` for reproducibility, and needs no host sync.
"""

from __future__ import annotations

import torch


def check_sampling_args(temperature: float, top_k: int, top_p: float) -> None:
    """Raise ValueError naming the argument when a sampling parameter is out of range."""
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not temperature >= 0:
        raise ValueError(f"temperature must be a float >= 0, got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 disables it), got {top_k!r}")
    if not isinstance(top_p, (int, float)) or isinstance(top_p, bool) or not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be a float in (0, 1] (1 disables it), got {top_p!r}")


def warp_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
                top_p: float = 1.0) -> torch.Tensor:
    """Temperature, then top-k, then top-p filtering of ``logits`` (fp32 ``[B, V]``, not modified).

    - temperature ``t > 0``: ``logits / t`` (skipped when ``t == 1``).
    - top-k ``k > 0``: tokens scoring below the k-th largest get ``-inf`` (ties at the k-th value
      are kept, as in ``TopKLogitsWarper``).
    - top-p ``p < 1``: sort ascending; tokens whose cumulative probability is ``<= 1 - p`` get
      ``-inf``; the most likely token always stays (``TopPLogitsWarper``).

    Returns a new fp32 ``[B, V]`` tensor.
    """
    check_sampling_args(temperature, top_k, top_p)
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, V], got {tuple(logits.shape)}")
    return _warp_logits(logits, temperature, top_k, top_p)


def _warp_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float
                 ) -> torch.Tensor:
    """:func:`warp_logits` on arguments already checked."""
    scores = logits.float()
    if temperature not in (0, 1):   # every step below is out of place: logits stays untouched
        scores = scores / temperature
    if top_k > 0:
        k = min(top_k, scores.shape[-1])
        kth = torch.topk(scores, k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, sorted_idx = torch.sort(scores, dim=-1, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= (1.0 - top_p)
        remove_sorted[..., -1:] = False
        remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)
        scores = scores.masked_fill(remove, float("-inf"))
    return scores


def sample_tokens(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0, generator: torch.Generator | None = None,
                  noise: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row of ``logits`` (``[B, V]``, any float dtype) -> int64 ``[B]``, same device.

    ``temperature == 0`` is greedy (``argmax``; top-k / top-p are then irrelevant). Otherwise
    ``argmax(softmax(warp_logits(logits)) / E)`` with ``E ~ Exp(1)``, which is an exact sample
    from the warped distribution. ``E`` is ``noise`` (fp32 ``[B, V]`` of Exp(1) draws, e.g. rows
    of a larger draw so that a row's randomness does not depend on which other rows are in the
    batch) or, by default, drawn from ``generator``. No host sync.
    """
    check_sampling_args(temperature, top_k, top_p)
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, V], got {tuple(logits.shape)}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = _warp_logits(logits, temperature, top_k, top_p).softmax(dim=-1)
    if noise is None:
        noise = torch.empty_like(probs).exponential_(1.0, generator=generator)
    elif noise.shape != probs.shape:
        raise ValueError(f"noise must be [B, V] = {tuple(probs.shape)}, got {tuple(noise.shape)}")
    # Exp(1) can round to 0: clamp so a filtered token (p = 0) never scores 0/0 = NaN.
    return (probs / noise.float().clamp_min(torch.finfo(torch.float32).tiny)).argmax(dim=-1)
