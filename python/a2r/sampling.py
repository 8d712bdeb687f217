"""Next-token sampling: temperature, top-k, top-p, min-p, the way transformers' logits warpers
do it.

The warpers run in transformers' order (``TemperatureLogitsWarper``, ``TopKLogitsWarper``,
``TopPLogitsWarper``, ``MinPLogitsWarper``), each keeping at least one token. Sampling uses the
exponential-race form of the Gumbel-max trick (``argmax(p / E)``, ``E ~ Exp(1)``, as vLLM and
nano-vllm do): it draws from ``p`` exactly, takes a ``torch.Generator`` for reproducibility, and
needs no host sync.

:class:`SamplingParams` holds the knobs (nano-vllm's and vLLM's ``SamplingParams``): it flows
from the CLI (one ``--flag`` per field, :func:`a2r.cli`) through :class:`a2r.config.A2RConfig`
and the engines (:mod:`a2r.engine`) to :func:`sample_next`. A new knob is a field here, its warp
in :func:`_warp_logits`, and its vLLM name in :mod:`a2r.engine`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How a stage draws each next token from the model's logits.

    ``metadata["help"]`` is the CLI's help text (``a2r`` adds ``--<field-name>`` for each field).
    """

    temperature: float = field(default=1.0, metadata={
        "help": "explorer sampling temperature; 0 = greedy (default: %(default)s)"})
    top_p: float = field(default=1.0, metadata={
        "help": "explorer nucleus sampling: keep the most likely tokens up to this mass "
                "(1 = off; default: %(default)s)"})
    top_k: int = field(default=0, metadata={
        "help": "explorer top-k sampling (0 = off; default: %(default)s)"})
    min_p: float = field(default=0.0, metadata={
        "help": "explorer min-p sampling: drop tokens less likely than min_p times the most "
                "likely one (0 = off; default: %(default)s)"})

    def validate(self) -> "SamplingParams":
        """Raise ValueError naming the first field out of range; returns ``self``."""
        check_sampling_args(self.temperature, self.top_k, self.top_p, self.min_p)
        return self

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


def sampling_params(sampling: SamplingParams | None, fields_given: dict) -> SamplingParams:
    """``sampling``, or a :class:`SamplingParams` of the keyword fields ``fields_given`` (the
    shorthand ``explore(..., temperature=0)``), checked. Both at once is a ValueError; a keyword
    that is no field a TypeError, as for any unknown keyword argument."""
    unknown = sorted(set(fields_given) - set(SamplingParams.field_names()))
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {', '.join(unknown)} (sampling fields: "
                        f"{', '.join(SamplingParams.field_names())})")
    if sampling is None:
        sampling = SamplingParams(**fields_given)
    elif fields_given:
        raise ValueError(f"sampling: give a SamplingParams or its fields as keywords, not both "
                         f"(got sampling= and {', '.join(sorted(fields_given))}=)")
    elif not isinstance(sampling, SamplingParams):
        raise ValueError(f"sampling must be an a2r.sampling.SamplingParams, "
                         f"got {type(sampling).__name__}")
    return sampling.validate()


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_sampling_args(temperature: float, top_k: int, top_p: float, min_p: float = 0.0) -> None:
    """Raise ValueError naming the argument when a sampling parameter is out of range."""
    if not _is_number(temperature) or not math.isfinite(temperature) or not temperature >= 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), "
                         f"got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be >= 0, an int (0 disables it), got {top_k!r}")
    if not _is_number(top_p) or not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], a number (1 disables it), got {top_p!r}")
    if not _is_number(min_p) or not 0.0 <= min_p <= 1.0:
        raise ValueError(f"min_p must be in [0, 1], a number (0 disables it), got {min_p!r}")


def warp_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
                top_p: float = 1.0, min_p: float = 0.0) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p filtering of ``logits`` (fp32 ``[B, V]``, not
    modified).

    - temperature ``t > 0``: ``logits / t`` (skipped when ``t == 1``).
    - top-k ``k > 0``: tokens scoring below the k-th largest get ``-inf`` (ties at the k-th value
      are kept, as in ``TopKLogitsWarper``).
    - top-p ``p < 1``: sort ascending; tokens whose cumulative probability is ``<= 1 - p`` get
      ``-inf``; the most likely token always stays (``TopPLogitsWarper``).
    - min-p ``m > 0``: tokens with ``softmax(scores) < m * max(softmax(scores))`` get ``-inf``
      (``MinPLogitsWarper``; the most likely token always stays).

    Returns a new fp32 ``[B, V]`` tensor.
    """
    check_sampling_args(temperature, top_k, top_p, min_p)
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, V], got {tuple(logits.shape)}")
    return _warp_logits(logits, temperature, top_k, top_p, min_p)


def _warp_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                 min_p: float = 0.0) -> torch.Tensor:
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
    if min_p > 0.0:
        probs = scores.softmax(dim=-1)
        threshold = min_p * probs.amax(dim=-1, keepdim=True)
        scores = scores.masked_fill(probs < threshold, float("-inf"))
    return scores


def sample_tokens(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0, min_p: float = 0.0,
                  generator: torch.Generator | None = None,
                  noise: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row of ``logits`` (``[B, V]``, any float dtype) -> int64 ``[B]``, same device.

    ``temperature == 0`` is greedy (``argmax``; top-k / top-p are then irrelevant). Otherwise
    ``argmax(softmax(warp_logits(logits)) / E)`` with ``E ~ Exp(1)``, which is an exact sample
    from the warped distribution. ``E`` is ``noise`` (fp32 ``[B, V]`` of Exp(1) draws, e.g. rows
    of a larger draw so that a row's randomness does not depend on which other rows are in the
    batch) or, by default, drawn from ``generator``. No host sync.
    """
    check_sampling_args(temperature, top_k, top_p, min_p)
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, V], got {tuple(logits.shape)}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = _warp_logits(logits, temperature, top_k, top_p, min_p).softmax(dim=-1)
    if noise is None:
        noise = torch.empty_like(probs).exponential_(1.0, generator=generator)
    elif noise.shape != probs.shape:
        raise ValueError(f"noise must be [B, V] = {tuple(probs.shape)}, got {tuple(noise.shape)}")
    # Exp(1) can round to 0: clamp so a filtered token (p = 0) never scores 0/0 = NaN.
    return (probs / noise.float().clamp_min(torch.finfo(torch.float32).tiny)).argmax(dim=-1)


def sample_next(logits: torch.Tensor, params: SamplingParams, *,
                generator: torch.Generator | None = None,
                noise: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`sample_tokens` with every knob of ``params`` (int64 ``[B]``)."""
    return sample_tokens(logits, **{name: getattr(params, name) for name in params.field_names()},
                         generator=generator, noise=noise)
