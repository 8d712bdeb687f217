"""Token confidence and the running group confidence on the device, inside the explorer's step
(issue 22; the formulas and the host side: :mod:`a2r.confidence`).

Cost per decode step, ``[n, V]`` logits: ``topk`` and ``logsumexp`` over V (two reductions the
sampler does not share: it reads the *warped* logits, at the sampling temperature, and greedy
reads only an ``argmax``), then ``O(n * w)`` for the window; torch ops, not fused into one kernel.
Nothing here reads a value on the host.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from a2r_kernels.layout import host_to_device

from .confidence import ConfidenceConfig, stop_below

__all__ = ["WindowTracker", "token_confidence"]


def token_confidence(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """``C`` of each row of ``logits`` (``[B, V]``, any float dtype): fp32 ``[B]``, same device.

    ``logsumexp(z) - mean(top-k(z))`` in fp32, i.e. minus the mean top-k log-probability of
    ``softmax(z)``. Two reductions over V (``topk``, ``logsumexp``); no host sync."""
    scores = logits.float()
    k = min(top_k, scores.shape[-1])
    top = scores.topk(k, dim=-1, sorted=False).values if k < scores.shape[-1] else scores
    return torch.logsumexp(scores, dim=-1) - top.mean(dim=-1)


class WindowTracker:
    """Running group confidence of the live rows of one exploration, on the device.

    State: ``ring`` fp32 ``[n, w]`` (the last w token confidences of each row; unused slots 0)
    and ``tokens`` (host int: every live row has produced this many tokens, since rows start
    together and the budget is per level). :meth:`step` takes the logits the step samples from;
    :meth:`keep` and :meth:`fork` follow the explorer's rows.
    """

    def __init__(self, config: ConfidenceConfig, device: torch.device,
                 threshold: float | None = None):
        self.config = config
        self.threshold = config.threshold if threshold is None else threshold
        self.ring = torch.zeros((1, config.window), dtype=torch.float32, device=device)
        self.tokens = 0

    def step(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Confidence fp32 ``[n]`` of the step's distributions and the stop flags bool ``[n]``:
        the running window is full and its mean is below the threshold
        (:func:`a2r.confidence.stop_below`)."""
        confidence = token_confidence(logits, self.config.top_k)
        window = self.config.window
        self.ring[:, self.tokens % window] = confidence
        self.tokens += 1
        if self.threshold is None or self.tokens < window:
            return confidence, torch.zeros_like(confidence, dtype=torch.bool)
        return confidence, self.ring.sum(dim=-1) / window < stop_below(self.threshold)

    @staticmethod
    def pack(token_ids: torch.Tensor, confidence: torch.Tensor, stop: torch.Tensor
             ) -> torch.Tensor:
        """int64 ``[3, n]``: tokens, the confidences' fp32 bits, stop flags: one host read."""
        bits = confidence.contiguous().view(torch.int32).to(torch.int64)
        return torch.stack([token_ids, bits, stop.to(torch.int64)])

    @staticmethod
    def unpack(rows: list[list[int]]) -> tuple[list[int], list[float], list[bool]]:
        """:meth:`pack`'s rows after ``tolist()``: tokens, confidences, stop flags."""
        tokens, bits, stop = rows   # [n] each, or [n, steps] for a level read at its end
        confidence = np.asarray(bits, dtype=np.int64).astype(np.int32).view(np.float32)
        return tokens, confidence.tolist(), np.asarray(stop, dtype=bool).tolist()

    def keep(self, rows: torch.Tensor) -> None:
        """Only these rows (int64 ``[m]`` on the device) go on."""
        self.ring = self.ring.index_select(0, rows)

    def fork(self, rows: Sequence[int]) -> None:
        """New rows, each a copy of row ``rows[i]`` (a level's forks of its parents)."""
        index = host_to_device(torch.tensor(list(rows), dtype=torch.int64), self.ring.device)
        self.ring = self.ring.index_select(0, index)
