"""Confidence-aware exploration (DeepConf, arXiv 2508.15260): token and group confidence, the
online early stop, confidence-weighted voting, and AUROC.

Token confidence of step t, from the model's next-token logits ``z`` (``[V]``) at that step::

    C_t = -(1/k) * sum_{i in top-k(z)} log softmax(z)_i  =  logsumexp(z) - mean(top-k values of z)

with ``k = min(top_k, V)`` (``k >= V``: the mean over the whole vocabulary). The distribution is
the model's *raw* one, ``softmax(z)`` at temperature 1 before top-k / top-p, as vLLM returns it in
``logprobs`` (its default ``raw_logprobs`` mode) and as DeepConf scored it: the score then means
the same thing at every sampling temperature (greedy included), and our engine and ``--engine
vllm`` agree. High C: a peaked distribution (the top token near log 1, the others far below).

Group confidence of a path with token confidences ``C_1 .. C_L`` and window ``w``: the sliding
means ``G_t = mean(C_{t-w+1} .. C_t)`` for ``t = w .. L``; a path shorter than the window
(``L < w``) has one group, the mean of all its tokens. Its *lowest group confidence* is the least
of them (DeepConf's "lowest group", what the online stop and the offline filter use).

Online stop (:class:`ConfidenceConfig` with ``warmup_paths`` or ``threshold``): a branch whose
running window ``G_t`` (a full window: ``t >= w``) falls below the threshold (by more than float
rounding, :func:`stop_below`) stops at that step,
keeping the token sampled there. With ``warmup_paths = W`` the first W paths run to the end
without a threshold; the threshold is the ``percentile``-th percentile of their lowest group
confidences (DeepConf-low: 90, keep about the top 10%; DeepConf-high: 10), and the other paths
run with it. A path shorter than the window can not be stopped (it has no full window).

Defaults: ``window = 16`` and ``top_k = 20``. DeepConf's ``w = 2048`` is 3-20% of its traces
(10k-60k tokens); the embedded models write 50-100 tokens, where 16 tokens is the same order of
share, leaves room to stop a path in its first half, and is still several tokens of the
sum the task works on. ``k`` is about the candidate set, not the path length: 20 of the embedded
models' 192 tokens as in DeepConf.

This module is the host side (torch-free: the CLI imports it for its defaults). The device side,
:func:`a2r.confidence_tracker.token_confidence` and its window tracker, keeps the token
confidences of the live rows (``[n]`` fp32) in a ring ``[n, w]``; the stop flags ``G_t <
threshold`` are computed there and reach the host in the same pinned read as the step's tokens:
no new sync.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import numpy as np

__all__ = ["ConfidenceConfig", "STOP_REASONS", "auroc", "explore_with_warmup",
           "group_confidences", "lowest_group_confidence", "merge_warmup", "stop_below",
           "threshold_from_warmup", "token_confidence_from_logprobs", "top_fraction",
           "weighted_vote"]

# Why a path ended: a stop token (EOS / stop string), its token budget, or the online stop.
STOP_REASONS = ("eos", "length", "confidence")


@dataclass(frozen=True)
class ConfidenceConfig:
    """Confidence tracking, and optionally the online stop, of one exploration.

    Attributes:
        window: w, tokens per group (>= 1).
        top_k: k, log-probabilities averaged per token (>= 1; ``>= V`` means all V).
        threshold: stop a branch once its running group confidence (a full window) is below
            this; None: no fixed threshold.
        warmup_paths: W >= 1 runs W paths fully first and sets the threshold from them (not
            together with ``threshold``; needs one level and more than W paths); 0: none.
        percentile: with ``warmup_paths``: the threshold is this percentile (0-100) of the
            warm-up paths' lowest group confidences.
    """

    window: int = 16
    top_k: int = 20
    threshold: float | None = None
    warmup_paths: int = 0
    percentile: float = 90.0

    def __post_init__(self):
        for name in ("window", "top_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"confidence.{name} must be an int >= 1, got {value!r}")
        if isinstance(self.warmup_paths, bool) or not isinstance(self.warmup_paths, int) \
                or self.warmup_paths < 0:
            raise ValueError(f"confidence.warmup_paths must be an int >= 0, "
                             f"got {self.warmup_paths!r}")
        if self.threshold is not None and not (isinstance(self.threshold, (int, float))
                                               and math.isfinite(self.threshold)):
            raise ValueError(f"confidence.threshold must be a finite number or None, "
                             f"got {self.threshold!r}")
        if self.threshold is not None and self.warmup_paths:
            raise ValueError("confidence.threshold and confidence.warmup_paths exclude each "
                             "other (the warm-up paths set the threshold)")
        if not (isinstance(self.percentile, (int, float)) and 0 <= self.percentile <= 100):
            raise ValueError(f"confidence.percentile must be in [0, 100], got {self.percentile!r}")

    @property
    def stops(self) -> bool:
        """Whether branches can stop on confidence (a threshold, given or from a warm-up)."""
        return self.threshold is not None or self.warmup_paths > 0


def token_confidence_from_logprobs(top_logprobs: Sequence[float], top_k: int) -> float:
    """``C`` from one step's returned log-probabilities (e.g. vLLM's ``logprobs=k`` dict values):
    minus the mean of the ``top_k`` largest (vLLM adds the sampled token when it is not among
    them; it is left out here, as it is not a top-k candidate)."""
    values = sorted((float(v) for v in top_logprobs), reverse=True)[:top_k]
    if not values:
        raise ValueError("top_logprobs is empty: no log-probabilities were returned")
    return -sum(values) / len(values)


def group_confidences(confidences: Sequence[float], window: int) -> np.ndarray:
    """Sliding-window means ``G_t`` (``t = w .. L``; one value, the mean of all, when ``L < w``),
    float64 ``[max(L - w + 1, 1)]``. Empty path: an empty array."""
    values = np.asarray(confidences, dtype=np.float64)
    if values.size == 0:
        return values
    if values.size < window:
        return values.mean(keepdims=True)
    sums = np.cumsum(np.concatenate([[0.0], values]))
    return (sums[window:] - sums[:-window]) / window


def lowest_group_confidence(confidences: Sequence[float], window: int) -> float:
    """The least group confidence of a path (``nan`` for an empty path)."""
    groups = group_confidences(confidences, window)
    return float(groups.min()) if groups.size else float("nan")


# Relative margin below the threshold before a branch stops: a path equal to a warm-up path (the
# tiny models often write one path 8 times) has the same group confidence up to float rounding
# (fp32 ring on the device against float64 on the host, summed in other orders), and must not
# stop on that rounding. 1e-5 is far above fp32 sums of windows of up to 2048 tokens in practice.
STOP_MARGIN = 1e-5


def stop_below(threshold: float) -> float:
    """The value a running group confidence must fall below to stop a branch: ``threshold``
    less :data:`STOP_MARGIN` of its magnitude (so a path tied with the threshold goes on)."""
    return threshold - STOP_MARGIN * abs(threshold)


def threshold_from_warmup(lowest: Sequence[float], percentile: float) -> float:
    """The stop threshold: the ``percentile``-th percentile (linear, numpy's default) of the
    warm-up paths' lowest group confidences (empty paths left out)."""
    values = [v for v in lowest if not math.isnan(v)]
    if not values:
        raise ValueError("the warm-up paths have no tokens: no threshold can be set")
    return float(np.percentile(values, percentile))


def merge_warmup(warmup, rest, threshold: float):
    """One result from a warm-up exploration and the thresholded one (same prompt): the warm-up
    paths first; the pool's peak is the larger; steps add up."""
    return replace(
        rest, sequences=warmup.sequences + rest.sequences, stopped=warmup.stopped + rest.stopped,
        stop_reasons=warmup.stop_reasons + rest.stop_reasons,
        confidences=warmup.confidences + rest.confidences,
        lowest_group_confidence=warmup.lowest_group_confidence + rest.lowest_group_confidence,
        peak_blocks_used=max(warmup.peak_blocks_used, rest.peak_blocks_used),
        peak_kv_bytes=max(warmup.peak_kv_bytes, rest.peak_kv_bytes),
        decode_steps=warmup.decode_steps + rest.decode_steps, threshold=threshold,
        warmup_paths=len(warmup.sequences))


def explore_with_warmup(run_phase: Callable, n: int, config: ConfidenceConfig):
    """The online stop with a warm-up: ``run_phase(count, first_row, config)`` explores
    ``count`` paths (noise rows ``first_row ..`` of ``n``) below one shared prefilled prompt.
    The first ``config.warmup_paths`` run without a threshold, the rest with the threshold set
    from them."""
    warmup_count = config.warmup_paths
    if not 0 < warmup_count < n:
        raise ValueError(f"confidence.warmup_paths must be in [1, n - 1] = [1, {n - 1}], "
                         f"got {warmup_count}")
    tracking = replace(config, warmup_paths=0)
    warmup = run_phase(warmup_count, 0, tracking)
    threshold = threshold_from_warmup(warmup.lowest_group_confidence, config.percentile)
    rest = run_phase(n - warmup_count, warmup_count, replace(tracking, threshold=threshold))
    return merge_warmup(warmup, rest, threshold)


def weighted_vote(answers: Sequence[str | None], weights: Sequence[float]) -> str | None:
    """The answer with the largest total weight (``None`` answers are skipped; ties go to the
    answer seen first); None when no answer is left."""
    totals: dict[str, float] = {}
    for answer, weight in zip(answers, weights):
        if answer is not None:
            totals[answer] = totals.get(answer, 0.0) + float(weight)
    return max(totals, key=totals.__getitem__) if totals else None


def top_fraction(scores: Sequence[float], eta: float) -> list[int]:
    """Indices of the ``ceil(eta * len)`` highest scores (at least 1), best first (stable:
    equal scores keep their order). ``eta`` in (0, 1]."""
    if not 0 < eta <= 1:
        raise ValueError(f"eta must be in (0, 1], got {eta!r}")
    if not scores:
        return []
    count = max(1, math.ceil(eta * len(scores)))
    return sorted(range(len(scores)), key=lambda i: -scores[i])[:count]


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """Area under the ROC curve of ``scores`` separating ``labels`` True from False: the
    probability that a random positive scores above a random negative (ties count 1/2). None
    when one class is empty."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        return None
    ranks = _average_ranks(np.asarray(pos + neg, dtype=np.float64))
    return float((ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given their average rank (Mann-Whitney U)."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    sorted_values = values[order]
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start:end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranks
